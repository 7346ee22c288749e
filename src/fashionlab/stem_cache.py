"""The frozen stem of a model, computed once per training image instead of once per step.

FastNet with a whitening layer begins with layers that training never changes (normalise, the
frozen convolution, its max-pool, and with fixed_stem_norm the activation after it): a fixed
function of the image. The cache keeps that function's output for every training image, computed
at the start of the first epoch (inside its timed part) and read by every step, so no step runs
those layers (about 15% of a `fast` step on a CPU with AMX).

With random mirror images, one entry per image serves both orientations: the whitening filters
come in mirror pairs, so the stem's output for a mirrored image is the mirrored output with the
channels swapped (FastNet.frozen_stem), and a step mirrors the entries whose image it draws the
other way round. The flips are drawn from the run's generator exactly as augment.random_flip draws
them, so a cached run sees the same batches as an uncached one.

The stem's output for a mirrored image equals the mirrored output only up to rounding, so which
orientation an entry was computed from shows in the last bits. Each image's is computed from the
orientation the first epoch's step draws for it (first_epoch_mirrors replays those draws), so the
first epoch mirrors nothing; the cache remembers that orientation per image, and a checkpoint keeps
it (state/load): a resumed run recomputes the entries from the same orientations, and goes on
exactly as the uninterrupted run.

Filled all at once, a batch of images in index order at a time, one entry per image: 60,000 `fast`
entries (359 MiB in bf16) in about 0.4 s on 2 cores of a CPU with AMX. Filling two entries per image
(each orientation) in the steps, as the cache did before, cost 0.8 s there: writing twice the memory,
scattered, cost more than the stem itself; mirroring half of each later batch costs far less. A
batch's images are computed each independently of the others in its batch, so the entries are the
same to the bit either way.

Only mirroring commutes with the stem: a run with any other augmentation (crops, rotations,
erasing) changes the image before the stem, and trains without the cache.
"""

from __future__ import annotations

import torch

from . import evaluate
from .augment import Augment, flip_mask, flip_where
from .device import Runtime
from .schema import RunError

MAX_BYTES = 4 << 30  # a larger cache (a bigger stem output or dataset) is not worth its memory: train without it


class StemCache:
    def __init__(self, stem: torch.nn.Module, order: torch.Tensor, n: int, mirrors: bool, sample: torch.Tensor):
        self.stem, self.n = stem, n
        self.order = order.to(sample.device)
        # Mirroring as one gather over the (N, H, W * C) view: position w's channel c comes from position
        # W - 1 - w's channel order[c] (see mirror).
        width, channels = sample.shape[-1], sample.shape[1]
        self.mirror_index = ((width - 1 - torch.arange(width, device=sample.device))[:, None] * channels
                             + self.order[None, :]).reshape(-1)
        layout = torch.channels_last if sample.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        self.features = torch.empty((n, *sample.shape[1:]), dtype=sample.dtype, device=sample.device,
                                    memory_format=layout)
        self.filled = torch.zeros(n, dtype=torch.bool, device=sample.device)
        # Per image, whether the stem ran on its mirror image (the entry is then the mirror image's).
        self.computed_mirrored = torch.zeros(n, dtype=torch.bool, device=sample.device) if mirrors else None
        self.complete = False  # every entry filled: from then on the stem is never run

    @classmethod
    def for_run(cls, model: torch.nn.Module, augment: Augment, images_u8: torch.Tensor,
                runtime: Runtime) -> tuple["StemCache | None", str]:
        """A cache for training `model` on `images_u8` with `augment`, or None; and why, in words."""
        frozen = model.frozen_stem() if hasattr(model, "frozen_stem") else None
        if frozen is None:
            return None, "the model has no frozen stem that mirroring maps onto itself"
        others = {k: v for k, v in augment.to_dict().items() if k != "flip"}
        if others:
            return None, f"augmentation {', '.join(sorted(others))} changes the image before the stem"
        stem, order = frozen
        with torch.no_grad(), runtime.autocast():
            sample = stem(evaluate.to_input(images_u8[:1], runtime))
        mirrors = bool(augment.flip)
        size = sample[0].numel() * sample.element_size() * len(images_u8)
        if size > MAX_BYTES:
            return None, f"it would take {size / 2**30:.1f} GiB (limit {MAX_BYTES / 2**30:.0f} GiB)"
        cache = cls(stem, order, len(images_u8), mirrors, sample)
        return cache, (f"{len(images_u8):,} x {tuple(sample.shape[1:])} {str(sample.dtype).removeprefix('torch.')}"
                       f"{', mirrored when drawn the other way round' if mirrors else ''}, {size / 2**20:,.0f} MiB")

    def mirror(self, h: torch.Tensor) -> torch.Tensor:
        """The stem's output for the mirror images, from the output for the images (and back)."""
        # In the (N, H, W, C) view, which keeps a channels_last batch channels_last, the flip and the
        # channel swap are one index_select along the flattened (W, C): one copy of the batch instead of
        # a flip's copy and then the swap's.
        n, c, height, width = h.shape
        rows = h.permute(0, 2, 3, 1).reshape(n, height, width * c)
        return rows.index_select(2, self.mirror_index).view(n, height, width, c).permute(0, 3, 1, 2)

    @staticmethod
    def first_epoch_mirrors(n: int, perm: torch.Tensor, batch_size: int, augment: Augment,
                            g: torch.Generator) -> torch.Tensor | None:
        """Which of n images the steps still to come of an epoch mirror: the epoch trains on perm's
        images, batch_size at a time, each step drawing its batch's flips from g first (batch does);
        the draws are replayed on a copy of g, so g itself does not move. None without flips."""
        if not augment.flip:
            return None
        replay = torch.Generator(g.device).set_state(g.get_state())
        mirrored = torch.zeros(n, dtype=torch.bool, device=perm.device)
        for idx in perm.split(batch_size):
            mirrored[idx] = flip_mask(len(idx), augment.flip, replay, idx.device)
        return mirrored

    def fill(self, images_u8: torch.Tensor, mirrored: torch.Tensor | None, batch_size: int, runtime: Runtime,
             which: torch.Tensor | None = None) -> int:
        """Compute the entries of the images at `which` (by default every one not filled yet), batch_size
        images at a time in index order, each image from its orientation in mirrored (None: as it is);
        returns how many. Call under the run's autocast."""
        todo = (~self.filled).nonzero().squeeze(1) if which is None else which
        for part in todo.split(batch_size):
            first, last = int(part[0]), int(part[-1])  # todo is sorted: a run of indices is a range
            rows = slice(first, last + 1) if last - first + 1 == len(part) else part
            self._fill(images_u8, rows, mirrored[rows] if mirrored is not None else None, runtime)
        self.complete = bool(self.filled.all())
        return len(todo)

    def batch(self, idx: torch.Tensor, augment: Augment, g: torch.Generator) -> torch.Tensor:
        """The stem's output for the training images at idx, each mirrored with probability
        augment.flip (drawn from g as random_flip draws it), read from the filled cache."""
        if not self.complete:
            raise RuntimeError("the stem cache is read before it was filled (StemCache.fill)")
        h = self.features[idx]
        if not augment.flip:
            return h
        other_way = flip_mask(len(idx), augment.flip, g, idx.device) != self.computed_mirrored[idx]
        # A GPU mirrors the whole batch and keeps what it needs, as asking which images to mirror would
        # wait for the queued steps. A CPU mirrors only the images drawn the other way round (about half;
        # none in the first epoch, which drew the orientations the entries have), in place: h is a copy.
        if h.is_cuda:
            return torch.where(other_way[:, None, None, None], self.mirror(h), h)
        which = other_way.nonzero().squeeze(1)
        if len(which):
            h[which] = self.mirror(h[which])
        return h

    def run_stem(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The stem's output for images x, without autograd, written into `out` if given (a view of the
        cache: the result is then stored without a copy). A 2x2 max-pool over even sides runs as the
        maximum of its four strided views: the same values, without the indices max_pool2d keeps for a
        backward pass, and a fifth less time to fill (0.42 against 0.51 s for 60,000 images in bf16 on 2
        cores of a CPU with AMX). The layers after the pool (an activation) then run on its output."""
        layers = list(self.stem)
        at = max(i for i, layer in enumerate(layers) if isinstance(layer, torch.nn.MaxPool2d))  # frozen_stem's pool
        x = self._run(layers[:at], x)
        pool, after = layers[at], layers[at + 1:]
        if not _plain_2x2(pool) or x.shape[-2] % 2 or x.shape[-1] % 2:
            return self._run([pool, *after], x, out)
        top = torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2])
        bottom = torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2])
        return self._run(after, torch.maximum(top, bottom) if out is None else torch.maximum(top, bottom, out=out), out)

    @staticmethod
    def _run(layers: list[torch.nn.Module], x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x through layers, the result in `out` if given (an in-place layer on out's own memory writes it
        there without a copy)."""
        for layer in layers:
            x = layer(x)
        return x if out is None or x is out else out.copy_(x)

    def _fill(self, images_u8: torch.Tensor, rows: slice | torch.Tensor, mirrored: torch.Tensor | None,
              runtime: Runtime) -> None:
        """Run the stem on the images at rows, mirrored where `mirrored` says, and store the outputs."""
        x = evaluate.to_input(images_u8[rows], runtime)
        if mirrored is not None:
            x = flip_where(x, mirrored)
            self.computed_mirrored[rows] = mirrored
        with torch.no_grad():
            if isinstance(rows, slice):  # a range of entries: computed straight into the cache
                self.run_stem(x, out=self.features[rows])
            else:
                self.features[rows] = self.run_stem(x)
        self.filled[rows] = True

    # A checkpoint keeps which images are filled and from which orientation; resuming recomputes them.
    def state(self) -> dict[str, torch.Tensor]:
        state = {"stem.filled": self.filled.cpu()}
        if self.computed_mirrored is not None:
            state["stem.mirrored"] = self.computed_mirrored.cpu()
        return state

    def load(self, extra: dict[str, torch.Tensor], images_u8: torch.Tensor, batch_size: int, runtime: Runtime,
             where: str = "checkpoint") -> int:
        """Recompute the entries a checkpoint's state() says were filled, each from the orientation it was
        (schema.py checked the types); returns how many. Call under the run's autocast."""
        filled, mirrored = extra.get("stem.filled"), extra.get("stem.mirrored")
        if filled is None:
            return 0
        if len(filled) != self.n:
            raise RunError(f"{where}: tensor extra.stem.filled holds {len(filled):,} entries; this run trains on "
                           f"{self.n:,} images")
        if (mirrored is None) != (self.computed_mirrored is None):
            raise RunError(f"{where}: tensor extra.stem.mirrored is {'missing' if mirrored is None else 'there'}, "
                           f"but this run {'flips' if mirrored is None else 'does not flip'} its images")
        device = self.features.device
        return self.fill(images_u8, mirrored.to(device) if mirrored is not None else None, batch_size, runtime,
                         which=filled.nonzero().squeeze(1).to(device))


def _plain_2x2(layer: torch.nn.Module) -> bool:
    """A max-pool of 2x2 windows at stride 2, without padding or dilation."""
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return (isinstance(layer, torch.nn.MaxPool2d) and pair(layer.kernel_size) == (2, 2)
            and pair(layer.stride) == (2, 2) and pair(layer.padding) == (0, 0) and pair(layer.dilation) == (1, 1))
