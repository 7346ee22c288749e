"""Probabilities that mean what they say: temperature scaling (Guo et al., 2017).

A trained net's softmax is rarely an honest confidence: label smoothing and test-time augmentation
leave `fast-full` under-confident (ECE 0.10 on the test set), long training leaves nets over-confident.
Temperature scaling divides the logits by one number T fitted to minimise the negative
log-likelihood on held-out images: the ranking of the classes, and so the accuracy, does not change;
the probabilities do.

The held-out images are those the out-of-distribution threshold is calibrated on (run.ood_images):
the run's validation images, or for a run trained on every training image, one half of the test set
(stratified, fixed seed). The ECE reported after calibration is measured on images the temperature
never saw: the test set for a run with validation images, the other half of the test set otherwise.

Written here rather than taken from netcal: one parameter, a convex objective (the NLL is convex in
1/T) and a golden-section search are a few lines, with no dependency and the same answer everywhere.

The temperature is stored with the run as calibration.json (run.py writes it atomically; schema.py
checks it before anything is read from it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import evaluate
from .errors import UserError
from .schema import MAX_TEMPERATURE, MIN_TEMPERATURE

# The search range (schema.MIN_TEMPERATURE to MAX_TEMPERATURE, 0.05 to 20) covers any net worth
# calibrating; the file check allows the same range.
TOLERANCE = 1e-6  # of 1/T, where the search stops
METHOD = "temperature scaling: the logits divided by one temperature fitted by minimising the NLL on held-out images"
BINS = 15  # of the reliability diagram and the ECE (evaluate.calibration)


class CalibrationError(UserError):
    """A temperature cannot be fitted (no held-out images, logits not finite)."""


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature), in float64."""
    return float(F.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """The temperature (MIN_TEMPERATURE to MAX_TEMPERATURE) minimising the NLL of the labels: a golden-section
    search over 1/T, on which the NLL is convex, so the search finds its minimum in the range."""
    z = torch.as_tensor(logits).detach().double().cpu()
    y = torch.as_tensor(labels, dtype=torch.long).cpu()
    if z.ndim != 2 or len(z) == 0 or len(z) != len(y):
        raise CalibrationError(f"no held-out images to fit a temperature on (logits of shape {tuple(z.shape)}, "
                               f"{len(y)} labels)")
    if not torch.isfinite(z).all():
        raise CalibrationError("the model's logits are not finite on held-out images: its weights are damaged "
                               "or training diverged")

    def loss(inverse: float) -> float:
        return float(F.cross_entropy(z * inverse, y))

    lo, hi = 1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > TOLERANCE:
        if fa <= fb:  # the minimum lies left of b
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(min(max(1 / ((lo + hi) / 2), MIN_TEMPERATURE), MAX_TEMPERATURE))


def calibrated_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / temperature) in float32: what predictors, the service and the ONNX graph give."""
    return torch.softmax(logits.float() / temperature, 1)


@dataclass(frozen=True)
class Calibration:
    """A run's temperature and how it was fitted and measured (calibration.json)."""

    temperature: float
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, **self.info}


def reliability(logits: torch.Tensor, labels: np.ndarray, temperature: float = 1.0) -> dict[str, Any]:
    """ECE and reliability bins of softmax(logits / temperature) (evaluate.calibration)."""
    probs = calibrated_probabilities(logits, temperature).numpy()
    return evaluate.calibration(probs, np.asarray(labels), BINS)


def before_and_after(logits: torch.Tensor, labels: np.ndarray, temperature: float) -> dict[str, Any]:
    """On the same images: accuracy (unchanged by any temperature), NLL, ECE and reliability bins with
    the raw probabilities (before) and the calibrated ones (after)."""
    y = torch.as_tensor(labels, dtype=torch.long)
    before, after = reliability(logits, labels), reliability(logits, labels, temperature)
    return {"images": int(len(y)), "accuracy": float((logits.argmax(1) == y).double().mean()) if len(y) else math.nan,
            "nll_before": nll(logits, y, 1.0), "nll_after": nll(logits, y, temperature),
            "ece_before": before["ece"], "ece_after": after["ece"],
            "reliability_before": before["bins"], "reliability_after": after["bins"]}


def fit(held_out_logits: torch.Tensor, held_out_labels: np.ndarray, measure_logits: torch.Tensor,
        measure_labels: np.ndarray, about: dict[str, Any] | None = None) -> Calibration:
    """The temperature fitted on the held-out logits, with its effect measured on other images (the measure
    set) and on the held-out images themselves."""
    temperature = fit_temperature(held_out_logits, held_out_labels)
    fitted = before_and_after(held_out_logits, held_out_labels, temperature)
    measured = before_and_after(measure_logits, measure_labels, temperature)
    info = {"method": METHOD, "fit_images": fitted["images"], "fit_nll_before": fitted["nll_before"],
            "fit_nll_after": fitted["nll_after"], "measured_images": measured["images"],
            **{k: measured[k] for k in ("nll_before", "nll_after", "ece_before", "ece_after",
                                        "reliability_before", "reliability_after")},
            "bins": BINS, **(about or {})}
    return Calibration(temperature, info)
