"""Hard-example epochs: after the first epoch, train only on the images of highest loss.

Most of Fashion-MNIST is easy: after one epoch a small net is nearly certain of almost every
trouser, bag, sandal and boot, and a step spent on them moves the weights little. The errors
left are among shirts, T-shirts, pullovers and coats. So with `hard_fraction` below 1, the first
epoch trains on every image and each later epoch on that fraction of them: the images whose loss
was highest when the model last trained on them (an image not trained on yet counts as the
hardest). The losses come from the training steps' own forward passes, so ranking costs no
extra pass over the data: an epoch at fraction f costs f of a full one.

Within an epoch the chosen images keep the order of the epoch's random permutation (the same
draw a full epoch makes): choosing draws nothing from the run's generator. BatchNorm's running statistics then
follow the hard images, which measured no worse than recomputing them over all images. A hard
epoch's train_loss and train_accuracy in history.jsonl are over the images it trained on.
"""

from __future__ import annotations

import math

import torch

from .schema import RunError


class HardExamples:
    """Made only for a run with hard_fraction below 1 (Trainer.set_up): with 1 the plain loop runs."""

    def __init__(self, n: int, fraction: float, device: torch.device | str = "cpu"):
        if not 0 < fraction < 1:
            raise ValueError(f"hard_fraction must be in (0, 1) for hard-example epochs, got {fraction}")
        self.n, self.fraction = n, fraction
        self.loss = torch.full((n,), math.inf, device=device)  # never trained on: the hardest
        self.chosen: torch.Tensor | None = None  # the current epoch's images (a mask), fixed at its start

    def images_in(self, epoch: int) -> int:
        """How many images epoch (0-based) trains on."""
        if epoch == 0:
            return self.n
        return max(1, round(self.fraction * self.n))

    def begin_epoch(self, epoch: int, perm: torch.Tensor) -> torch.Tensor:
        """The epoch's images in training order: the hardest images_in(epoch), in perm's order.
        A run resumed mid-epoch keeps the choice it had made at the epoch's start (self.chosen)."""
        if epoch == 0:
            self.chosen = None
            return perm
        if self.chosen is None:
            hardest = torch.topk(self.loss, self.images_in(epoch), sorted=False).indices
            self.chosen = torch.zeros(self.n, dtype=torch.bool, device=self.loss.device).index_fill_(0, hardest, True)
        return perm[self.chosen[perm]]

    def end_epoch(self) -> None:
        self.chosen = None

    def record(self, idx: torch.Tensor, losses: torch.Tensor) -> None:
        """Each image's loss (one per image, before averaging) from the step that just trained on it."""
        self.loss[idx] = losses.detach()

    # A checkpoint keeps the losses and, mid-epoch, the epoch's choice: resuming continues the same run.
    def state(self) -> dict[str, torch.Tensor]:
        state = {"hard.loss": self.loss.cpu()}
        if self.chosen is not None:
            state["hard.chosen"] = self.chosen.cpu()
        return state

    def load(self, extra: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
        """The state a checkpoint kept (schema.py checked its types); its length must be this run's."""
        loss = extra.get("hard.loss")
        if loss is None:
            return
        if len(loss) != self.n:
            raise RunError(f"{where}: tensor extra.hard.loss holds {len(loss):,} losses; this run trains on "
                           f"{self.n:,} images")
        self.loss = loss.to(self.loss.device)
        chosen = extra.get("hard.chosen")
        self.chosen = chosen.to(self.loss.device) if chosen is not None else None
