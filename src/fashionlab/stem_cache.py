"""The frozen stem of a model, computed once per training image instead of once per step.

FastNet with a whitening layer begins with layers that training never changes (normalise, the
frozen convolution, its max-pool): a fixed function of the image. The cache keeps that function's
output for every training image, filled as the first epoch sees each image and read from then on,
so later epochs skip those layers (about 7% of a `fast` step) without a separate set-up pass
(filling makes first-epoch steps about 4% slower).

With random mirror images the cache keeps two entries per image, the image's and its mirror's,
so that a batch is one gather (a 60,000-image `fast` cache is then 718 MiB in bf16). Both are
filled from one computation: the whitening filters come in mirror pairs, so the stem's output for
a mirrored image is the mirrored output with the channels swapped (FastNet.frozen_stem). The
flips are drawn from the run's generator exactly as augment.random_flip draws them, so a cached
run sees the same batches as an uncached one.

The stem's output for a mirrored image equals the mirrored output only up to rounding, so which
of the two an entry was computed from shows in the last bits. The cache remembers that orientation
per image, and a checkpoint keeps it (state/load): a resumed run recomputes the entries it had
from the same orientations, and goes on exactly as the uninterrupted run.

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
        layout = torch.channels_last if sample.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        rows = 2 * n if mirrors else n  # rows n + i hold image i's mirror
        self.features = torch.empty((rows, *sample.shape[1:]), dtype=sample.dtype, device=sample.device,
                                    memory_format=layout)
        self.filled = torch.zeros(n, dtype=torch.bool, device=sample.device)
        # Per image, whether the stem ran on its mirror image (the other entry is then the mirrored output).
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
        rows = len(images_u8) * (2 if mirrors else 1)
        size = sample[0].numel() * sample.element_size() * rows
        if size > MAX_BYTES:
            return None, f"it would take {size / 2**30:.1f} GiB (limit {MAX_BYTES / 2**30:.0f} GiB)"
        cache = cls(stem, order, len(images_u8), mirrors, sample)
        return cache, (f"{rows:,} x {tuple(sample.shape[1:])} {str(sample.dtype).removeprefix('torch.')}"
                       f"{' (the images and their mirrors)' if mirrors else ''}, {size / 2**20:,.0f} MiB")

    def mirror(self, h: torch.Tensor) -> torch.Tensor:
        """The stem's output for the mirror images, from the output for the images (and back)."""
        # In the (N, H, W, C) view, which keeps a channels_last batch channels_last; index_select on
        # the channels is 3x faster there than indexing with [..., order].
        return h.permute(0, 2, 3, 1).flip(2).index_select(3, self.order).permute(0, 3, 1, 2)

    def batch(self, images_u8: torch.Tensor, idx: torch.Tensor, augment: Augment, g: torch.Generator,
              runtime: Runtime) -> torch.Tensor:
        """The stem's output for the training images at idx, each mirrored with probability
        augment.flip (drawn from g as random_flip draws it). Call under the run's autocast."""
        chosen = flip_mask(len(idx), augment.flip, g, idx.device) if augment.flip else None
        rows = idx + self.n * chosen if chosen is not None else idx
        if self.complete:
            return self.features[rows]
        return self._fill(images_u8, idx, chosen, runtime)

    def _fill(self, images_u8: torch.Tensor, idx: torch.Tensor, chosen: torch.Tensor | None,
              runtime: Runtime) -> torch.Tensor:
        """Run the stem on the images at idx (mirrored where chosen), store both entries, return its output."""
        x = evaluate.to_input(images_u8[idx], runtime)
        if chosen is not None:
            x = flip_where(x, chosen)
        with torch.no_grad():
            h = self.stem(x)
        if chosen is None:
            self.features[idx] = h
        else:
            self.features[idx + self.n * chosen] = h
            self.features[idx + self.n * ~chosen] = self.mirror(h)
            self.computed_mirrored[idx] = chosen
        self.filled[idx] = True
        return h

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
        idx = filled.nonzero().squeeze(1).to(device)
        mirrored = mirrored.to(device) if mirrored is not None else None
        for part in idx.split(batch_size):
            self._fill(images_u8, part, mirrored[part] if mirrored is not None else None, runtime)
        self.end_epoch()
        return len(idx)

    def end_epoch(self) -> None:
        """Once per epoch (one device sync): switch to reading once every image has been seen."""
        self.complete = self.complete or bool(self.filled.all())

