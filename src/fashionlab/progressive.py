"""Progressive resizing: the early epochs train on smaller images, the late ones at full size.

A convolution's work grows with the image's area, so an epoch at 20 pixels costs about half of one at
28 (20² / 28² = 0.51). The early epochs learn coarse shapes, which smaller images still show; the late
ones, at the learning rate's low end, fit the details at the size the model is evaluated at. The side
grows linearly from `start` pixels at the first epoch to full size at fraction `until` of the run,
and stays there (EfficientNetV2's progressive learning and FFCV's ResNet recipes grow the image size
over training too).

Each training batch is resized after augmentation, bilinearly with antialiasing (a smaller image
averages the pixels it covers, as a photo taken from farther away would, instead of dropping rows).
The side depends on the epoch only, so a resumed run trains the sizes the uninterrupted one did, and
it is rounded to an even number of pixels: a run meets at most a handful of shapes (20, 22, 24, 26,
28), each of which costs kernels created once (oneDNN's, or torch.compile's graphs). Evaluation,
BatchNorm's recomputed statistics and every later use of the model see full-size images only.

Only models that pool over the whole image before their classifier take smaller images; a model that
flattens a fixed-size feature map (the dense net, the LSTM over rows) is refused by name when the
settings are checked (TrainConfig.validate), before any data is read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import IMAGE_SHAPE

FULL = IMAGE_SHAPE[0]  # images are square: 28 pixels a side


def full_from(epochs: int, until: float) -> int:
    """The first epoch (0-based) at full size: round(until * epochs), and at the latest the last epoch,
    so that the model ends its training on the size it is evaluated at."""
    return max(0, min(epochs - 1, max(1, round(until * epochs))))


def side_at(epoch: int, epochs: int, start: int, until: float) -> int:
    """The side, in pixels, of the training images at `epoch` (0-based) of `epochs`: `start` at the
    first epoch, growing linearly to FULL at epoch full_from(epochs, until), an even number of pixels
    on the way (start itself, if odd, at the first epoch)."""
    end = full_from(epochs, until)
    if not start or epoch >= end:
        return FULL
    side = start + (FULL - start) * epoch / end
    return start if epoch == 0 else min(FULL, 2 * round(side / 2))


def sides(epochs: int, start: int, until: float) -> list[int]:
    """Each epoch's side, in order."""
    return [side_at(e, epochs, start, until) for e in range(epochs)]


def resize(batch: torch.Tensor, side: int) -> torch.Tensor:
    """The (N, C, H, W) batch at side x side pixels: bilinear, antialiased when it shrinks."""
    return F.interpolate(batch, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
