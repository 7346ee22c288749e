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

ResNet is the pre-activation residual network (He et al. 2016) with a width multiplier, so
WRN-d-k (Zagoruyko & Komodakis) is ResNet(blocks=((d-4)//6,)*3, widths=(16k, 32k, 64k)).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import FASHION_MEAN, FASHION_STD, ModelEntry, Normalize, register, register_family


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


class FastNet(nn.Module):
    def __init__(self, stem: int = 24, widths=(64, 128, 256), convs_per_block: int = 2, pool_stem: bool = False,
                 head_scale: float = 1 / 8, num_classes: int = 10, mean=FASHION_MEAN, std=FASHION_STD,
                 resize=None, whiten: bool = False):
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one block")
        if convs_per_block < 1:
            raise ValueError(f"convs_per_block must be >= 1, got {convs_per_block}")
        side = resize or 28
        layers: list[nn.Module] = [Normalize(mean, std, resize)]
        c_in = 1
        if stem:
            layers += _conv_bn(1, stem)
            c_in = stem
            if pool_stem:  # the blocks then start at half resolution: ~4x cheaper, a little less accurate
                layers.append(nn.MaxPool2d(2))
                side //= 2
        for w in widths:
            if side < 2:
                raise ValueError(f"input of side {resize or 28} is too small for {len(widths)} pooling blocks")
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(w), nn.GELU()]
            side //= 2
            for _ in range(convs_per_block - 1):
                layers += _conv_bn(w, w)
            c_in = w
        layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes, bias=False)]
        self.net = nn.Sequential(*layers)
        self.head_scale = float(head_scale)
        self.whiten = bool(whiten)
        if self.whiten:
            first = self.net[1]
            if 2 * first.weight[0].numel() > first.out_channels:
                raise ValueError(f"whiten needs at least {2 * first.weight[0].numel()} channels in the first "
                                 f"convolution (two per patch dimension); it has {first.out_channels}")
            first.weight.requires_grad_(False)

    def forward(self, x):
        return self.net(x) * self.head_scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 1e-2) -> None:
        """Set the frozen first filters to whiten image patches: each eigenvector of the patch
        covariance, scaled by 1/sqrt(eigenvalue + eps), with both signs (so a ReLU-like activation
        keeps either half). images: (N, 1, H, W) pixels in [0, 1], a few thousand are enough."""
        if not self.whiten:
            return
        norm, first = self.net[0], self.net[1]
        x = norm(images.float().cpu())  # on the CPU: float64 eigh is not available on every device
        k = first.kernel_size[0]
        patches = F.unfold(x, k, padding=first.padding[0]).transpose(1, 2).reshape(-1, x.shape[1] * k * k)
        evals, evecs = torch.linalg.eigh(torch.cov(patches.T.double()))
        filters = (evecs / (evals + eps).sqrt()).T.float().reshape(-1, *first.weight.shape[1:])
        filters = torch.cat([filters, -filters])
        first.weight[: len(filters)] = filters.to(first.weight)


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
    ModelEntry("fast", "fastnet", dict(stem=0, widths=(32, 64, 128), convs_per_block=1, whiten=True),
               "time-to-accuracy record: airbench-style conv-pool-BN-GELU blocks 32, 64, 128 behind a frozen "
               "whitening first layer, max-pooled head"),
    ModelEntry("best", "resnet", dict(blocks=(1, 1, 1), widths=(32, 64, 128), stem=32),
               "accuracy record on a CPU budget: pre-activation ResNet, 3 stages of 1 block, widths 32-64-128"),
    ModelEntry("wrn16_4", "resnet", dict(blocks=wide_resnet_blocks(16), widths=(64, 128, 256), stem=16),
               "wide ResNet WRN-16-4 (Zagoruyko & Komodakis), for a GPU"),
]:
    register(_entry)
