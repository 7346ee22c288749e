"""Prediction over tensors and the metrics of DESIGN.md: accuracy, loss, per-class scores,
confusion matrix (rows = true class), most-confused pairs, calibration (ECE, reliability bins)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .device import Runtime


def to_input(images_u8: torch.Tensor, runtime: Runtime | None = None) -> torch.Tensor:
    """uint8 (N, 28, 28) or (N, 1, 28, 28) -> float pixels in [0, 1], (N, 1, 28, 28)."""
    x = images_u8.float().div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if runtime is not None and runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


DIRECTIONS = ((-1, 0), (1, 0), (0, -1), (0, 1))  # up, down, left, right


def moves(shift: int) -> list[tuple[int, int]]:
    """The (dy, dx) views of shift test-time augmentation: the image itself, then its copies moved by
    1 to `shift` pixels up, down, left and right (1 + 4 * shift views)."""
    return [(0, 0)] + [(dy * k, dx * k) for k in range(1, shift + 1) for dy, dx in DIRECTIONS]


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Images moved by (dy, dx) pixels, the uncovered border filled with 0 (the background)."""
    if dy == dx == 0:
        return x
    p = max(abs(dy), abs(dx))
    h, w = x.shape[-2:]
    return F.pad(x, (p, p, p, p))[..., p - dy: p - dy + h, p - dx: p - dx + w]


def tta_logits(model: torch.nn.Module, x: torch.Tensor, flip: bool = False, shift: int = 0) -> torch.Tensor:
    """Float32 logits averaged over a run's test-time augmentation.

    flip averages each image with its mirror image. shift (pixels) averages, with equal weights, over
    the views of moves(shift): the image and its copies moved by 1 to `shift` pixels in the four
    directions, each with its mirror when flip is on: 2 passes for flip, 18 for flip and shift 2.
    Equal weights over 1- and 2-pixel moves were chosen on three trained `best` nets and then scored
    higher than airbench's weighting (the image half, its 1-pixel moves the other half) on each of
    12 others, by 0.10 points on average (docs/records.md). The same function serves evaluation,
    prediction and the exported ONNX graph.
    """
    def view(v):
        out = model(v).float()
        return (out + model(v.flip(-1)).float()) / 2 if flip else out

    views = moves(shift)
    return sum(view(shifted(x, dy, dx)) for dy, dx in views) / len(views)


def feature_layer(model: torch.nn.Module) -> torch.nn.Linear:
    """The model's last nn.Linear: its input is the penultimate features (ood.py scores them)."""
    last = None
    for module in model.modules():  # every family registers its layers in the order they run
        if isinstance(module, torch.nn.Linear):
            last = module
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer whose input could serve as its features")
    return last


@contextmanager
def captured_features(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """A list that collects the input of the model's last nn.Linear at each forward pass in the block.
    Reading the input changes nothing the model computes."""
    seen: list[torch.Tensor] = []
    handle = feature_layer(model).register_forward_hook(lambda module, args, output: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def tta_outputs(model: torch.nn.Module, x: torch.Tensor, flip: bool = False, shift: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """tta_logits and, from the same passes, the penultimate features averaged as the logits are: every
    pass has the same weight in both (each view's two mirror passes average, then the views)."""
    with captured_features(model) as seen:
        logits = tta_logits(model, x, flip, shift)
    return logits, torch.stack([f.float() for f in seen]).mean(0)


@torch.no_grad()
def predict_outputs(model: torch.nn.Module, images: torch.Tensor | np.ndarray, runtime: Runtime,
                    batch_size: int = 1000, tta_flip: bool = False, tta_shift: int = 0, features: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, features or None), float32 on CPU, for uint8 images, in batches, in eval mode, under the
    run's precision, averaged over the run's test-time augmentation (tta_logits; tta_outputs for the
    features, with features=True). The logits are the same with or without the features."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    was_training = model.training
    model.eval()
    out, feats = [], []
    try:
        for i in range(0, len(images), batch_size):
            x = to_input(images[i: i + batch_size].to(runtime.device), runtime)
            with runtime.autocast():
                if features:
                    logits, f = tta_outputs(model, x, tta_flip, tta_shift)
                    feats.append(f.cpu())
                else:
                    logits = tta_logits(model, x, tta_flip, tta_shift)
                out.append(logits.cpu())
    finally:
        model.train(was_training)
    logits = torch.cat(out) if out else torch.empty(0, 0)
    return logits, ((torch.cat(feats) if feats else torch.empty(0, 0)) if features else None)


def predict_logits(model: torch.nn.Module, images: torch.Tensor | np.ndarray, runtime: Runtime,
                   batch_size: int = 1000, tta_flip: bool = False, tta_shift: int = 0) -> torch.Tensor:
    """Logits (float32, on CPU) for uint8 images, in batches, in eval mode, under the run's precision,
    averaged over the run's test-time augmentation (tta_logits)."""
    return predict_outputs(model, images, runtime, batch_size, tta_flip, tta_shift)[0]


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_scores(cm: np.ndarray, class_names: list[str]) -> dict[str, dict[str, float]]:
    tp = np.diag(cm).astype(float)
    predicted, support = cm.sum(0).astype(float), cm.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(class_names)
    }


def most_confused(cm: np.ndarray, class_names: list[str], k: int = 5) -> list[dict[str, Any]]:
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None)[:k]
    pairs = []
    for flat in order:
        t, p = divmod(int(flat), cm.shape[0])
        if off[t, p] == 0:
            break
        pairs.append({"true": class_names[t], "predicted": class_names[p], "count": int(off[t, p])})
    return pairs


def calibration(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Expected calibration error over equal-width confidence bins, with the bins for a reliability diagram."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        acc = float(correct[sel].mean()) if n else 0.0
        mean_conf = float(conf[sel].mean()) if n else 0.0
        ece += n / max(len(conf), 1) * abs(acc - mean_conf)
        rows.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": n,
                     "accuracy": acc, "confidence": mean_conf})
    return {"ece": float(ece), "bins": rows}


def compute_metrics(logits: torch.Tensor, labels: np.ndarray | torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    y = torch.as_tensor(labels, dtype=torch.long)
    loss = float(F.cross_entropy(logits, y))
    probs = torch.softmax(logits, 1).numpy()
    y_np = y.numpy()
    pred = probs.argmax(1)
    cm = confusion_matrix(y_np, pred, len(class_names))
    cal = calibration(probs, y_np)
    return {
        "test_accuracy": float((pred == y_np).mean()),
        "test_loss": loss,
        "per_class": per_class_scores(cm, class_names),
        "confusion_matrix": cm.tolist(),
        "most_confused": most_confused(cm, class_names),
        "ece": cal["ece"],
        "reliability": cal["bins"],
        "num_test": int(len(y_np)),
    }


def quick_scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) for validation during training."""
    labels = labels.cpu()
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


def evaluate_model(model, images, labels, class_names, runtime: Runtime, batch_size: int = 1000,
                   tta_flip: bool = False, tta_shift: int = 0) -> dict[str, Any]:
    logits = predict_logits(model, images, runtime, batch_size, tta_flip, tta_shift)
    return compute_metrics(logits, labels, class_names)

