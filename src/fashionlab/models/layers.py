"""Building blocks shared by the model families: input normalisation, the dense head, pooling."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # pixel statistics of the training set


class Normalize(nn.Module):
    """(x - mean) / std, optionally resizing first (bilinear) to the size a recipe trains at."""

    def __init__(self, mean: float = FASHION_MEAN, std: float = FASHION_STD, resize: int | None = None):
        super().__init__()
        self.mean, self.std, self.resize = float(mean), float(std), resize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}, resize={self.resize}"


def dense_head(width: int, hidden, dropout: float, num_classes: int) -> list[nn.Module]:
    """Dense layers with ReLU (and dropout after each hidden layer), then the classifier."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    return layers + [nn.Linear(width, num_classes)]


def pool2d(kind: str) -> nn.Module:
    """A 2x2 pooling layer: "max" or "avg"."""
    return nn.MaxPool2d(2) if kind == "max" else nn.AvgPool2d(2)
