"""Is an input a garment at all? The out-of-distribution score and the `unsure` flag.

A classifier gives every input one of its classes, a blank page included ("Sandal 74%"). The
detector here measures how far an image's penultimate features (the input of the model's last
nn.Linear, averaged over the run's test-time augmentation as the logits are) lie from those of the
training images: the Mahalanobis distance to the nearest class mean, with one covariance shared by
the classes (Lee et al., 2018), of the features' direction (scaled to unit length) and the logarithm
of their length (`embed`). The score is that distance; an image scoring above the run's threshold is
`unsure`.

Why direction and log length rather than the features as they are: measured on a `fast` run
(benchmarks/ood_detection.py), the raw features found 4% of upscaled handwritten digits at the 5%
false-alarm threshold (AUROC 0.830; all non-garments 0.885), direction and log length 99% (AUROC
0.991; all 0.990), where the maximum-softmax baseline has 0.955. Non-garments give shorter feature
vectors there (median length 21 for the digits, 29 for garments); kept apart from the direction,
that difference is one coordinate of its own. On a weak one-epoch `cnn_small` it is also the best
of the three (AUROC over all non-garments 0.960, against 0.944 and 0.757).

The threshold is calibrated on held-out in-distribution images for a stated false-alarm rate (5%
by default): the run's validation images when it has them, else one half of the test set
(stratified, fixed seed), the other half measuring the rate. The detector is stored with the run
as ood.safetensors (run.py writes it; schema.py checks it before anything is read from it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import data as data_mod, schema
from .atomic import write_bytes
from .errors import ArgumentError, UserError

FIT_IMAGES = 10_000  # training images the class means and covariance are fitted on (stratified)
SEED = 0  # of the stratified draws: the fit subset and the halves of the test set
# Added to the covariance's diagonal, relative to its mean variance: features after a ReLU include
# units that never fire, which leave the covariance singular.
RIDGE = 1e-3
DEFAULT_FALSE_ALARM_RATE = 0.05
SHORTEST = 1e-6  # a feature vector's length is taken as at least this (a blank image may give zeros)
# what a threshold was calibrated on: the run's validation images, or one half of the test set
ON_VALIDATION, ON_TEST_HALF = "validation images", "test images (one half)"
SCORE = ("Mahalanobis distance to the nearest class mean (shared covariance) of the penultimate features' "
         "direction and log length")


class OodError(UserError):
    """The detector cannot be fitted or calibrated (the model's features are not finite, no images)."""


def check_rate(false_alarm_rate: Any, name: str = "false_alarm_rate") -> float:
    """The target false-alarm rate: a number strictly between 0 and 1."""
    if isinstance(false_alarm_rate, bool) or not isinstance(false_alarm_rate, (int, float)) \
            or not 0 < false_alarm_rate < 1:
        raise ArgumentError(f"{name}={false_alarm_rate!r}: expected a number between 0 and 1 (exclusive), the share "
                         f"of in-distribution images flagged unsure, e.g. 0.05")
    return float(false_alarm_rate)


def embed(features: np.ndarray) -> np.ndarray:
    """(N, D) features -> (N, D + 1) float64: each vector's direction (unit length) and the logarithm of its
    length, what the detector models. Row by row: a row's values do not depend on the other rows."""
    f = np.asarray(features, dtype=np.float64)
    length = np.sqrt((f * f).sum(1))
    return np.concatenate([f / np.maximum(length, SHORTEST)[:, None], np.log(length + SHORTEST)[:, None]], 1)


@dataclass(frozen=True, eq=False)
class OodDetector:
    """Class means and the shared precision matrix of the embedded penultimate features (embed), and the
    threshold."""

    means: np.ndarray  # (K, D + 1) float64: one row per class that had training images
    precision: np.ndarray  # (D + 1, D + 1) float64: the inverse of the shared covariance (with the ridge)
    threshold: float  # scores above it are unsure
    info: dict[str, Any] = field(default_factory=dict)  # how it was fitted and calibrated (the file's metadata)
    _factor: np.ndarray = field(init=False, repr=False)  # L with precision = L L^T
    _means_projected: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # d^2(x, m) = |L^T x - L^T m|^2: project once, then distances are dot products.
        factor = np.linalg.cholesky(self.precision)
        object.__setattr__(self, "_factor", factor)
        object.__setattr__(self, "_means_projected", self.means @ factor)

    @property
    def feature_size(self) -> int:
        """D: the model's features per image (the embedding adds their log length)."""
        return int(self.means.shape[1]) - 1

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N,) float64 distances to the nearest class mean (NaN where not finite).

        Each row's arithmetic is the same whatever other rows come with it (einsum's own loops, not
        BLAS, whose kernels change with the number of rows), so an image's score does not depend on
        the batch it is scored in: the service's batching relies on that."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.feature_size:
            raise ValueError(f"features of shape {f.shape}: expected (N, {self.feature_size})")
        m = self._means_projected
        z = np.einsum("nd,de->ne", embed(f), self._factor, optimize=False)
        cross = np.einsum("nd,kd->nk", z, m, optimize=False)
        squared = (z * z).sum(1)[:, None] - 2 * cross + (m * m).sum(1)[None, :]
        return np.sqrt(np.maximum(squared.min(1), 0.0)) if len(f) else np.zeros(0)

    def unsure(self, scores: np.ndarray) -> np.ndarray:
        """True where a score is above the threshold."""
        return np.asarray(scores) > self.threshold

    def describe(self) -> dict[str, Any]:
        """The threshold and how it was calibrated (what /v1/model and `fashionlab calibrate` show)."""
        return {"threshold": self.threshold, **self.info}


# --------------------------------------------------------------------------- fitting and calibrating

def fit(features: np.ndarray, labels: np.ndarray, ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Class means (of the classes present) of the embedded features (embed) and the precision matrix of
    the covariance they share."""
    raw = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if len(raw) == 0:
        raise OodError("no training images to fit the out-of-distribution detector on")
    if not np.isfinite(raw).all():
        raise OodError("the model's features are not finite (NaN or infinity) on training images: its weights "
                       "are damaged or training diverged")
    f = embed(raw)
    classes, which = np.unique(labels, return_inverse=True)
    means = np.stack([f[which == k].mean(0) for k in range(len(classes))])
    centred = f - means[which]
    covariance = centred.T @ centred / len(f)
    scale = float(np.trace(covariance)) / f.shape[1]
    covariance[np.diag_indices_from(covariance)] += ridge * (scale if scale > 0 else 1.0)
    precision = np.linalg.inv(covariance)
    return means, (precision + precision.T) / 2  # exactly symmetric, as the file check expects


def threshold_for(scores: np.ndarray, false_alarm_rate: float) -> float:
    """The smallest score that at most `false_alarm_rate` of these in-distribution scores exceed."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1 - false_alarm_rate, method="higher"))


def false_alarms(scores: np.ndarray, threshold: float) -> float:
    """The share of (in-distribution) scores above the threshold."""
    return float((np.asarray(scores) > threshold).mean()) if len(scores) else math.nan


def calibrate(features_of: Callable[[Any], np.ndarray], fit_images: Any, fit_labels: np.ndarray, calibration: Any,
              measure: Any, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
              about: dict[str, Any] | None = None) -> OodDetector:
    """Fit on (fit_images, fit_labels), set the threshold for `false_alarm_rate` on the `calibration`
    images, and measure the rate on the `measure` images (all in-distribution, none seen in the fit).
    features_of(images) gives the model's penultimate features. `about` is added to the detector's info."""
    rate = check_rate(false_alarm_rate)
    if len(calibration) == 0:
        raise OodError("no held-out images to calibrate the threshold on")
    means, precision = fit(features_of(fit_images), fit_labels)
    provisional = OodDetector(means, precision, math.inf)
    calibration_scores = provisional.scores(features_of(calibration))
    if not np.isfinite(calibration_scores).all():
        raise OodError("the model's features are not finite on held-out images")
    threshold = threshold_for(calibration_scores, rate)
    measured = false_alarms(provisional.scores(features_of(measure)), threshold) if len(measure) else None
    info = {"score": SCORE, "false_alarm_rate": rate, "calibration_false_alarm_rate": false_alarms(calibration_scores,
                                                                                                   threshold),
            "measured_false_alarm_rate": measured, "calibration_images": int(len(calibration)),
            "measured_images": int(len(measure)), "fit_images": int(len(fit_labels)),
            "feature_size": int(means.shape[1]) - 1, "ridge": RIDGE, "seed": SEED, **(about or {})}
    return OodDetector(means, precision, threshold, info)


def fit_subset(labels: np.ndarray) -> np.ndarray:
    """Indices of the training images the detector is fitted on: at most FIT_IMAGES, stratified."""
    return data_mod.stratified_subset(np.asarray(labels), min(FIT_IMAGES, len(labels)), SEED)


def split_test_set(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, held-out) indices of the test set for a run without validation images: two
    stratified halves, always the same for the same labels."""
    held_out, calibration = data_mod.stratified_split(np.asarray(labels), 0.5, SEED)
    return calibration, held_out


# --------------------------------------------------------------------------- evaluation

def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve of telling out-of-distribution (higher scores) from in-distribution
    images: the chance that a random outsider scores above a random insider, ties counting half."""
    a, b = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    if not len(a) or not len(b):
        return math.nan
    _, inverse, counts = np.unique(np.concatenate([a, b]), return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based, ties share their mean rank
    rank_sum = average_rank[inverse[len(a):]].sum()
    return float((rank_sum - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


# --------------------------------------------------------------------------- the file

def save(path: str | Path, detector: OodDetector) -> Path:
    """Write the detector as safetensors (atomically): tensors means and precision, the threshold and
    its calibration as JSON metadata."""
    from safetensors.numpy import save as to_bytes
    meta = {"threshold": detector.threshold, **detector.info}
    blob = to_bytes({"means": np.ascontiguousarray(detector.means, dtype=np.float64),
                     "precision": np.ascontiguousarray(detector.precision, dtype=np.float64)},
                    metadata={schema.OOD_METADATA: json.dumps(meta, allow_nan=False)})
    return write_bytes(path, blob)


def load(path: str | Path, feature_size: int | None = None, num_classes: int | None = None) -> OodDetector:
    """Read a detector, checked first (schema.ood_file: metadata, dtypes, shapes against the model's
    feature size and classes, sizes, then finite values and a positive definite precision matrix)."""
    means, precision, meta = schema.ood_file(Path(path), feature_size, num_classes)
    info = {k: v for k, v in meta.items() if k != "threshold"}
    return OodDetector(means, precision, float(meta["threshold"]), info)
