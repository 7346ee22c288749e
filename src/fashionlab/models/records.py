"""Families for the speed and accuracy records: a compact BatchNorm net and a (wide) pre-activation ResNet.

Both follow the registry's contract (pixels in [0, 1], (N, 1, 28, 28) in, logits out, normalisation
inside) and are defined by data: widths and depths are arguments, so a registry entry is a row.

FastNet follows airbench's shape (conv -> max-pool -> BatchNorm -> GELU, then more convs at the
pooled size): pooling right after the first conv of a block keeps most of the arithmetic at the
small resolution, which is what a 2-core CPU can afford. The logits are scaled down (airbench's
temperature) so the early, large learning rates of a one-cycle schedule stay stable. With
whiten=True the first convolution is frozen and its first filters whiten 3x3 patches of the
training images (airbench's frozen whitening layer): the next layers start from decorrelated
inputs, which lifts the accuracy of a two-epoch run by about as much as a third epoch would.
The whitening filters come in mirror pairs (see init_from_data), so with flips as the only
augmentation the frozen layers are computed once per image and cached (stem_cache).
The `fast` entry keeps 16 of the 18 whitening filters (the least varying patch direction is
dropped) and nothing else in that layer: 16 channels instead of 32 made a step about a third
cheaper at the same two-epoch accuracy. It uses ReLU (in place) instead of GELU: 9% less
CPU time per epoch (benchmarks/floor.py), and two-epoch runs were no less accurate (3 seeds each).
A pool of 2 rounds down, so on the 7x7 map it drops the last row and column, the only ones the
image's last row and column of pixels reach: with pool_before_last the last conv never sees them.
ceil_pools=True rounds up instead (7x7 -> 4x4, the edge in a window of its own).
strided_blocks names blocks whose conv and max-pool become one conv of stride 2 (kernel
strided_kernel): the conv then computes a quarter of the positions and no pool runs. On a CPU the
first trained conv (16 -> 48 at 14x14) and the max-pool after it are the largest part of a `fast`
step (its multiply-adds in fp32, the pool's memory traffic in bf16), so striding it made `fast`
reach 91.73% in 13% (AMX, with one epoch more) to 23% (fp32) less time (docs/records.md).
last_padding=0 makes the last block's first conv a valid one (no zero padding): on the 4x4 map of
pool_before_last with ceil_pools it computes 2x2 outputs, a quarter of the positions, each from a whole
3x3 window of real values (a padded conv spends 44 of its 144 multiply-adds there on the zeros around
the map). The four windows cover the whole map, so the global max-pool still reads every position. In
fp32, where the convolutions are most of a step, that cut a `fast` run by a fifth for the same
accuracy, and the time it frees buys a wider last conv for `fast-93` (docs/records.md).
fixed_stem_norm=True replaces the BatchNorm after the whitening conv's pool by that BatchNorm as it
starts, fixed: the data's statistics folded into the frozen conv's filters and a bias, and the ReLU
cutting FIXED_STEM_SHIFT deviations below each channel's mean. Nothing up to the activation then
trains, so the stem cache keeps the activation's output: a step computes nothing at 14x14 (no
BatchNorm or ReLU there, forward or backward) and the first trained conv needs no gradient for its
input. In fp32 that cut a `fast` run by a sixth for the same accuracy (docs/records.md).

ResNet is the pre-activation residual network (He et al. 2016) with a width multiplier, so
WRN-d-k (Zagoruyko & Komodakis) is ResNet(blocks=((d-4)//6,)*3, widths=(16k, 32k, 64k)).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import ModelEntry, register, register_family
from .layers import FASHION_MEAN, FASHION_STD, Normalize


# With fixed_stem_norm, where the ReLU after the whitening conv cuts its normalised output: one
# standard deviation below the mean. A trained BatchNorm there (fast_strided_valid, seed 0) had moved 14
# of its 16 cuts 0.4 to 1.0 deviations below the mean (its beta / gamma). `fast` on seeds 1, 2, 6 and 7
# (fast_strided_valid_fixed, one thread) ended at 91.53% on average with the cut 0.25 below the mean,
# 92.09% at 1.0, 92.07% at 1.5 and 91.92% at 2.5; at the mean itself seed 0 lost a point (91.10%).
FIXED_STEM_SHIFT = 1.0

# FastNet's activations by name. ReLU runs in place: it follows a BatchNorm, whose backward pass
# reads the BatchNorm's input, not its output.
ACTIVATIONS = {"gelu": nn.GELU, "relu": lambda: nn.ReLU(inplace=True)}


def _conv_bn(c_in: int, c_out: int, act: str) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), ACTIVATIONS[act]()]


def _checked_strided(blocks, n_blocks: int, whiten: bool, kernel: int) -> frozenset[int]:
    """The blocks whose conv and max-pool become one conv of stride 2 (FastNet's strided_blocks)."""
    blocks = frozenset(blocks)
    if any(not isinstance(b, int) or not 0 <= b < n_blocks for b in blocks):
        raise ValueError(f"strided_blocks must hold block indices 0 to {n_blocks - 1}; got {sorted(blocks, key=str)}")
    if whiten and 0 in blocks:
        raise ValueError("strided_blocks cannot hold block 0 with whiten: the frozen whitening conv and its pool "
                         "are the stem the cache keeps")
    if kernel < 2:
        raise ValueError(f"strided_kernel must be at least 2, got {kernel}")
    return blocks


def _after(layers: list[nn.Module], side: int, ceil_pools: bool) -> int:
    """The side of a block's map after its 3x3 conv and its 2x2 max-pool, in their order; a valid conv
    (padding 0) is refused a map it would empty."""
    for layer in layers:
        if isinstance(layer, nn.MaxPool2d):
            if side < 2 and not ceil_pools:
                raise ValueError("last_padding=0 leaves the last pool a map of side 1, which a pool that rounds "
                                 "down empties: use ceil_pools or pool_before_last")
            side = -(-side // 2) if ceil_pools else side // 2
        elif layer.padding == (0, 0):
            if side < 3:
                raise ValueError(f"last_padding=0 needs a map of side 3 or more before the last conv; it gets {side}")
            side -= 2
    return side


class FastNet(nn.Module):
    def __init__(self, stem: int = 24, widths=(64, 128, 256), convs_per_block: int = 2, pool_stem: bool = False,
                 head_scale: float = 1 / 8, num_classes: int = 10, mean=FASHION_MEAN, std=FASHION_STD,
                 resize=None, whiten: bool = False, act: str = "gelu", pool_before_last: bool = False,
                 ceil_pools: bool = False, strided_blocks=(), strided_kernel: int = 4, last_padding: int = 1,
                 fixed_stem_norm: bool = False):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {', '.join(ACTIVATIONS)}; got {act!r}")
        if not widths:
            raise ValueError("widths must name at least one block")
        if convs_per_block < 1:
            raise ValueError(f"convs_per_block must be >= 1, got {convs_per_block}")
        strided_blocks = _checked_strided(strided_blocks, len(widths), whiten, strided_kernel)
        if isinstance(last_padding, bool) or last_padding not in (0, 1):
            raise ValueError(f"last_padding must be 1 (the last conv keeps its map's size) or 0 (a valid conv, "
                             f"2 smaller); got {last_padding!r}")
        if fixed_stem_norm and not (whiten and not stem and resize is None):
            raise ValueError("fixed_stem_norm needs whiten=True, stem=0 and no resize: it fixes the norm of the "
                             "whitening conv's output, which must then be the first block's")
        side = resize or 28
        layers: list[nn.Module] = [Normalize(mean, std, resize)]
        c_in = 1
        if stem:
            layers += _conv_bn(1, stem, act)
            c_in = stem
            if pool_stem:  # the blocks then start at half resolution: ~4x cheaper, a little less accurate
                layers.append(nn.MaxPool2d(2))
                side //= 2
        for i, w in enumerate(widths):
            if side < 2:
                raise ValueError(f"input of side {resize or 28} is too small for {len(widths)} pooling blocks")
            if i in strided_blocks:  # one conv of stride 2 in place of the conv and its pool
                pad = (strided_kernel - 1) // 2
                conv_pool = [nn.Conv2d(c_in, w, strided_kernel, stride=2, padding=pad, bias=False)]
                side = (side + 2 * pad - strided_kernel) // 2 + 1
            else:
                last, fixed = i == len(widths) - 1, fixed_stem_norm and i == 0
                conv_pool = [nn.Conv2d(c_in, w, 3, padding=last_padding if last else 1, bias=fixed),
                             nn.MaxPool2d(2, ceil_mode=ceil_pools)]
                if pool_before_last and last:
                    conv_pool.reverse()  # the last conv at the pooled size: 3x3 (4x4 with ceil_pools) instead of 7x7
                side = _after(conv_pool, side, ceil_pools)
            norm = [] if fixed_stem_norm and i == 0 else [nn.BatchNorm2d(w)]  # fixed: in the conv (init_from_data)
            layers += [*conv_pool, *norm, ACTIVATIONS[act]()]
            for _ in range(convs_per_block - 1):
                layers += _conv_bn(w, w, act)
            c_in = w
        layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes, bias=False)]
        self.net = nn.Sequential(*layers)
        self.head_scale = float(head_scale)
        self.whiten = bool(whiten)
        self.has_stem_conv, self.resized = bool(stem), resize is not None
        self.fixed_stem_norm = bool(fixed_stem_norm)
        # The layers that training never changes: normalise, the frozen conv, its max-pool, and with the
        # norm fixed the activation too (nothing trained comes before it).
        self.stem_layers = 4 if self.fixed_stem_norm else 3
        if self.whiten:
            first = self.net[1]
            if first.out_channels < 2:
                raise ValueError(f"whiten needs at least 2 channels in the first convolution (a filter and "
                                 f"its negative); it has {first.out_channels}")
            first.requires_grad_(False)

    def forward(self, x):
        return self.net(x) * self.head_scale

    def frozen_stem(self) -> tuple[nn.Module, torch.Tensor] | None:
        """The frozen first layers and the channel order of their output for mirror images, or None.

        With the whitening layer, every filter's mirror image is another filter of the layer (itself
        or its negative; see init_from_data), so for a horizontally mirrored image the stem's output
        is the mirrored output with the channels in the returned order:
        stem(x.flip(-1)) == stem(x).flip(-1)[:, order]. Training can then compute the stem once per
        image (stem_cache). None when the layer is not frozen, is preceded by a stem convolution or
        a resize, or holds filters without a mirror partner (random channels beyond 18)."""
        if not self.whiten or self.has_stem_conv or self.resized:
            return None
        order = _mirror_order(self.net[1])
        return None if order is None else (self.net[:self.stem_layers], order)

    def forward_from_stem(self, h: torch.Tensor) -> torch.Tensor:
        """The forward pass after the frozen stem: forward(x) == forward_from_stem(stem(x))."""
        return self.net[self.stem_layers:](h) * self.head_scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 1e-2) -> None:
        """Set the frozen first filters to whiten image patches: each eigenvector of the patch
        covariance, scaled by 1/sqrt(eigenvalue + eps), with both signs (so a ReLU-like activation
        keeps either half). The covariance is that of the images and their mirror images, the
        distribution a run with random flips trains on; each eigenvector is then exactly
        mirror-symmetric or antisymmetric (they are found separately in the two subspaces), so every
        filter's mirror image is itself or its negative (frozen_stem relies on this). With fewer than
        two channels per patch dimension (e.g. 16 for 3x3 patches) the eigenvectors of the largest
        eigenvalues are kept: the first to go is the least varying, highest-frequency pattern.
        Channels beyond two per dimension keep their random (frozen) weights.
        images: (N, 1, H, W) pixels in [0, 1], a few thousand are enough."""
        if not self.whiten:
            return
        norm, first = self.net[0], self.net[1]
        x = norm(images.float().cpu())  # on the CPU: float64 eigh is not available on every device
        k = first.kernel_size[0]
        second, mean = _patch_moments(x, k, first.padding[0])
        mirror = torch.arange(len(mean)).reshape(x.shape[1], k, k).flip(-1).reshape(-1)
        # Second moment and mean of the patches and their mirror images (a mirror image's patches are
        # the mirrored patches): a permutation of the same sums, so no second pass over the data.
        second = (second + second[mirror][:, mirror]) / 2
        mean = (mean + mean[mirror]) / 2
        evals, evecs = _mirror_eigh(second - torch.outer(mean, mean), mirror)
        keep = min(first.out_channels // 2, len(evals))
        evals, evecs = evals[:keep], evecs[:, :keep]
        filters = (evecs / (evals + eps).sqrt()).T.float().reshape(-1, *first.weight.shape[1:])
        filters = torch.cat([filters, -filters])
        first.weight[: len(filters)] = filters.to(first.weight)
        if self.fixed_stem_norm:
            self._fix_stem_norm(x)

    @torch.no_grad()
    def _fix_stem_norm(self, x: torch.Tensor, eps: float = 1e-5) -> None:
        """Fold a fixed normalisation into the frozen conv: each channel of its max-pooled output scaled
        to unit variance and its mean moved to FIXED_STEM_SHIFT, by the statistics of the images x
        (normalised) and their mirror images. A positive scale commutes with the max-pool, so it goes
        into the filters, and the shift into the conv's bias. A channel's statistics over the mirror
        images are its mirror partner's over the images, so the two are averaged, which floating point
        does exactly ((a + b) / 2 == (b + a) / 2): the pairs stay exact pairs (frozen_stem). Where a
        filter has no partner (random filters) each keeps its own; the stem is then not cached anyway."""
        first, pool = self.net[1], self.net[2]
        first.bias.zero_()
        h = pool(first(x)).double()
        mean, square = h.mean((0, 2, 3)), h.square().mean((0, 2, 3))
        order = _mirror_order(first)
        if order is not None:
            mean, square = (mean + mean[order]) / 2, (square + square[order]) / 2
        scale = (square - mean.square() + eps).rsqrt()
        first.weight.mul_(scale.float()[:, None, None, None])
        first.bias.copy_((-mean * scale + FIXED_STEM_SHIFT).float())


def _mirror_order(conv: nn.Conv2d) -> torch.Tensor | None:
    """Per filter of conv, the filter that is its mirror image (with the same bias), or None where one
    has no such partner."""
    w, bias = conv.weight, conv.bias
    mirrored = w.flip(-1)
    order = []
    for i in range(len(w)):
        match = [j for j in range(len(w)) if torch.equal(mirrored[i], w[j]) and (bias is None or bias[i] == bias[j])]
        if not match:
            return None
        order.append(match[0])
    return torch.tensor(order)


def _patch_moments(x: torch.Tensor, k: int, padding: int, chunk: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """Second moment (d x d) and mean (d) in float64 of the k x k patches of images x (N, C, H, W),
    d = C k k. A few hundred images at a time, each image's patches as the columns of one matrix: the
    patches of 5,000 images in one (patches, d) matrix took 3.5 times as long (0.26 s against 0.07 s on 2
    cores), mostly in copying them into it. The sums differ from that matrix's in the last bits of
    float64, which the whitening filters, rounded to float32, do not keep."""
    d = x.shape[1] * k * k
    second, total, count = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), 0
    for part in x.split(chunk):
        u = F.unfold(part.double(), k, padding=padding)  # (images, d, patches per image)
        second += torch.bmm(u, u.transpose(1, 2)).sum(0)
        total += u.sum((0, 2))
        count += u.shape[0] * u.shape[2]
    return second / count, total / count


def _mirror_eigh(cov: torch.Tensor, mirror: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of a covariance that mirroring leaves
    unchanged (cov[mirror][:, mirror] == cov), each eigenvector exactly symmetric (v[mirror] == v) or
    antisymmetric (v[mirror] == -v): decomposed within the two subspaces, so that near-equal
    eigenvalues of opposite parity cannot mix. Each vector is finally averaged with its mirror image,
    (v + v[mirror]) / 2 or (v - v[mirror]) / 2, which floating point computes with exact parity
    (a + b == b + a and a - b == -(b - a)) however a matrix library summed the product before it;
    where that product was already exact, as it is here, the step changes no bit."""
    d, half = len(mirror), 2 ** -0.5
    symmetric, antisymmetric = [], []
    for p, q in enumerate(mirror.tolist()):
        if p == q:  # the centre column maps to itself
            symmetric.append(torch.zeros(d, dtype=cov.dtype).index_fill_(0, torch.tensor([p]), 1.0))
        elif p < q:
            v = torch.zeros(d, dtype=cov.dtype)
            v[p], v[q] = half, half
            symmetric.append(v)
            v = torch.zeros(d, dtype=cov.dtype)
            v[p], v[q] = half, -half
            antisymmetric.append(v)
    values, vectors = [], []
    for basis, sign in ((torch.stack(symmetric, 1), 1), (torch.stack(antisymmetric, 1), -1)):
        ev, vec = torch.linalg.eigh(basis.T @ cov @ basis)
        v = basis @ vec
        values.append(ev)
        vectors.append((v + sign * v[mirror]) / 2)
    values, vectors = torch.cat(values), torch.cat(vectors, 1)
    order = values.argsort(descending=True)
    return values[order], vectors[:, order]


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice, plus the identity (or a strided 1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.shortcut = (nn.Conv2d(c_in, c_out, 1, stride, bias=False)
                         if stride != 1 or c_in != c_out else None)
        self.act = nn.ReLU(inplace=False)

    def forward(self, x):
        o = self.act(self.bn1(x))
        # The projection reads the activated input, as in the pre-activation paper.
        skip = self.shortcut(o) if self.shortcut is not None else x
        o = self.conv1(o)
        o = self.conv2(self.drop(self.act(self.bn2(o))))
        return o + skip


class ResNet(nn.Module):
    def __init__(self, blocks=(2, 2, 2), widths=(32, 64, 128), stem: int = 32, dropout: float = 0.0,
                 num_classes: int = 10, mean=FASHION_MEAN, std=FASHION_STD, resize=None):
        super().__init__()
        if len(blocks) != len(widths) or not blocks:
            raise ValueError(f"blocks {tuple(blocks)} and widths {tuple(widths)} must be non-empty and of equal length")
        if min(blocks) < 1:
            raise ValueError(f"every stage needs at least one block, got {tuple(blocks)}")
        layers: list[nn.Module] = [Normalize(mean, std, resize), nn.Conv2d(1, stem, 3, padding=1, bias=False)]
        c_in = stem
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1  # 28 -> 14 -> 7 for three stages
                layers.append(PreActBlock(c_in, w, stride, dropout))
                c_in = w
        layers += [nn.BatchNorm2d(c_in), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def wide_resnet_blocks(depth: int) -> tuple[int, int, int]:
    """WRN-depth has (depth - 4) / 6 blocks per stage."""
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"wide ResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    return ((depth - 4) // 6,) * 3


register_family("fastnet", FastNet)
register_family("resnet", ResNet)

for _entry in [
    ModelEntry("fast", "fastnet", dict(stem=0, widths=(16, 64, 128), convs_per_block=1, whiten=True, act="relu"),
               "time-to-accuracy record: airbench-style conv-pool-BN-ReLU blocks 16, 64, 128, the first conv a "
               "frozen whitening layer (the 8 main patch directions, both signs), max-pooled head"),
    ModelEntry("fast_lean", "fastnet", dict(stem=0, widths=(16, 64, 128), convs_per_block=1, whiten=True, act="relu",
                                            pool_before_last=True),
               "the fast net with its last block pooled before its conv (at 3x3 instead of 7x7): 45% less time "
               "per epoch for about one point of accuracy at equal epochs, which hard-example epochs buy back"),
    ModelEntry("fast_narrow", "fastnet", dict(stem=0, widths=(16, 48, 128), convs_per_block=1, whiten=True,
                                              act="relu", pool_before_last=True),
               "the lean net with its first trained conv 48 wide instead of 64: a quarter fewer multiply-adds, "
               "once the `fast` recipe on a CPU that trains in fp32, where the convolutions are two thirds of the time"),
    ModelEntry("fast_mid", "fastnet", dict(stem=0, widths=(16, 64, 128), convs_per_block=1, whiten=True, act="relu",
                                           pool_before_last=True, ceil_pools=True),
               "the lean net with pools that round up: its last conv runs at 4x4 on the whole 7x7 map (the lean "
               "net's pool drops the map's last row and column), 56% of the fast net's multiply-adds; once fast-93's "
               "net on a CPU that trains in fp32"),
    ModelEntry("fast_wide", "fastnet", dict(stem=0, widths=(16, 96, 192), convs_per_block=1, whiten=True,
                                            act="relu"),
               "the fast net 1.5 times as wide (16, 96, 192; twice the multiply-adds): fast-93's net on a CPU "
               "with AMX, where the convolutions are a third of an epoch's time and width costs little"),
    ModelEntry("fast_slim", "fastnet", dict(stem=0, widths=(16, 48, 128), convs_per_block=1, whiten=True,
                                            act="relu"),
               "the fast net with its first trained conv 48 wide instead of 64: the `fast` recipe on a CPU with "
               "AMX, where a step's max-pools, BatchNorm and the rest cost as much as its convolutions and "
               "scale with the width"),
    ModelEntry("fast_strided", "fastnet", dict(stem=0, widths=(16, 48, 128), convs_per_block=1, whiten=True,
                                               act="relu", strided_blocks=(1,), strided_kernel=3),
               "fast_slim with its first trained conv of stride 2 (3x3) in place of that conv and its max-pool: "
               "a quarter of the conv's positions and no pool at 14x14; the `fast` recipe on a CPU with AMX"),
    ModelEntry("fast_strided_narrow", "fastnet", dict(stem=0, widths=(16, 48, 128), convs_per_block=1, whiten=True,
                                                    act="relu", pool_before_last=True, ceil_pools=True,
                                                    strided_blocks=(1,), strided_kernel=4),
               "fast_mid 48 wide (16, 48, 128) with its first trained conv of stride 2 (4x4) in place of that conv "
               "and its max-pool: 3.2 against fast_narrow's 3.9 MFLOP"),
    ModelEntry("fast_strided_mid", "fastnet", dict(stem=0, widths=(16, 64, 128), convs_per_block=1, whiten=True,
                                                   act="relu", pool_before_last=True, ceil_pools=True,
                                                   strided_blocks=(1,), strided_kernel=4),
               "fast_mid with its first trained conv of stride 2 (4x4) in place of that conv and its max-pool"),
    ModelEntry("fast_strided_valid", "fastnet", dict(stem=0, widths=(16, 48, 128), convs_per_block=1, whiten=True,
                                                   act="relu", pool_before_last=True, ceil_pools=True,
                                                   strided_blocks=(1,), strided_kernel=3, last_padding=0),
               "fast_strided_narrow with a 3x3 strided conv and its last conv valid (no padding: 2x2 outputs of "
               "the 4x4 map): 1.3 against its 3.2 MFLOP"),
    ModelEntry("fast_strided_valid_fixed", "fastnet", dict(stem=0, widths=(16, 48, 128), convs_per_block=1,
                                                         whiten=True, act="relu", pool_before_last=True,
                                                         ceil_pools=True, strided_blocks=(1,), strided_kernel=3,
                                                         last_padding=0, fixed_stem_norm=True),
               "fast_strided_valid with the whitening conv's output normalised by fixed statistics instead of a "
               "BatchNorm: its activation joins the frozen stem, and no step computes anything at 14x14; the "
               "`fast` recipe on a CPU without AMX"),
    ModelEntry("fast_strided_valid_wide", "fastnet", dict(stem=0, widths=(16, 64, 256), convs_per_block=1,
                                                        whiten=True, act="relu", pool_before_last=True,
                                                        ceil_pools=True, strided_blocks=(1,), strided_kernel=4,
                                                        last_padding=0),
               "fast_strided_mid with its last conv valid (2x2 outputs of the 4x4 map) and twice as wide (256): "
               "3.0 against its 4.2 MFLOP; the `fast-93` recipe on a CPU without AMX"),
    # stem=16 with whiten: the whitening layer runs at 28x28 as the stem, and a trained conv sees its
    # output at full resolution before the first pool (the first block's conv); 10% more multiply-adds.
    # widths 16-128-256 (65.9 MFLOP, 1.6x the 16-96-192 net before) with hard-example epochs (the best
    # recipe): 95.28% ± 0.09 over seeds 0 to 4, where the narrower net's 32 full epochs gave 94.98% ± 0.15
    # in about the same time. Wider still (16-144-288): 95.34% ± 0.13 for 1.19x the time, not adopted.
    ModelEntry("best", "fastnet", dict(stem=16, widths=(16, 128, 256), convs_per_block=2, whiten=True),
               "accuracy record on a CPU budget: the fast net's shape, wider and two convs per block (16, 128, "
               "256), a trained conv at full resolution behind the frozen whitening layer"),
    ModelEntry("best_slim", "fastnet", dict(stem=16, widths=(16, 96, 192), convs_per_block=2, whiten=True),
               "the best net at widths 16, 96, 192 (40.5 against 65.9 MFLOP forward per image): best's net "
               "on a CPU that trains in fp32, where the convolutions take most of an epoch and the wider "
               "net's 48 epochs overrun the budget"),
    ModelEntry("resnet8", "resnet", dict(blocks=(1, 1, 1), widths=(32, 64, 128), stem=32),
               "pre-activation ResNet, 3 stages of 1 block, widths 32-64-128 (8 weight layers)"),
    ModelEntry("wrn16_4", "resnet", dict(blocks=wide_resnet_blocks(16), widths=(64, 128, 256), stem=16),
               "wide ResNet WRN-16-4 (Zagoruyko & Komodakis), for a GPU"),
]:
    register(_entry)
