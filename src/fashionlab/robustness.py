"""How a run holds up off the clean test set: accuracy, ECE and the unsure share on corrupted test images.

Each of the 15 corruptions of corruptions.py at each of its 5 severities is applied to the run's
held-out test images (those neither its temperature nor its out-of-distribution threshold saw:
run.unseen_test_images), and the corrupted images are classified as the service classifies them
(predict.Predictor: the run's test-time augmentation, calibrated probabilities, one pass for the
probabilities and the features the detector scores). Per corruption and severity: accuracy, ECE (of
the calibrated probabilities) and the share flagged `unsure`; then the means over all 75, the mean
corruption accuracy being the headline (ImageNet-C's mean corruption error is one minus it, without
the AlexNet normalisation, which has no counterpart here).

The images are corrupted and scored CHUNK at a time, so memory stays bounded whatever the set's size,
and the random draws (seeded by corruption, severity and chunk) are the same on every machine.
Results go to RUN/robustness.json (validated by schema.robustness before any reader uses them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from . import corruptions, data as data_mod, evaluate, pages
from .predict import Predictor
from .run import RunFolder, unseen_test_images
from .errors import ArgumentError
from .schema import RunError

CHUNK = 1000  # images corrupted and scored at a time
SEED = 0  # of the stratified subset when fewer images are asked for


def check_images(images: Any, name: str = "images") -> int | None:
    """The number of held-out test images to score: an integer >= 1, or None for all of them."""
    if images is not None and (isinstance(images, bool) or not isinstance(images, int) or images < 1):
        raise ArgumentError(f"{name}={images!r}: expected an integer >= 1 (held-out test images scored per "
                         f"corruption), or none for all of them")
    return images


def scores(predictor: Predictor, batches: Iterable[np.ndarray], labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, ECE and unsure share (None without a detector) of the predictor on uint8 images that come
    in batches (only the probabilities and scores of the whole set are kept: a few numbers per image)."""
    probs, ood_scores = (np.concatenate(part) for part in zip(*(predictor.infer(b) for b in batches)))
    unsure = float(predictor.ood.unsure(ood_scores).mean()) if predictor.ood is not None else None
    return {"accuracy": float((probs.argmax(1) == labels).mean()),
            "ece": evaluate.calibration(probs, labels)["ece"], "unsure": unsure}


def measure(predictor: Predictor, images: np.ndarray, labels: np.ndarray, names: list[str] | None = None,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The clean scores and, per corruption and severity, the scores on the corrupted images."""
    names = [corruptions.check_name(n) for n in (names or list(corruptions.CORRUPTIONS))]
    offsets = range(0, len(images), CHUNK)
    clean = scores(predictor, (images[i: i + CHUNK] for i in offsets), labels)
    results: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        rows = []
        for severity in range(1, corruptions.SEVERITIES + 1):
            corrupted = (corruptions.corrupt(images[i: i + CHUNK], name, severity, i) for i in offsets)
            rows.append({"severity": severity, **scores(predictor, corrupted, labels)})
        results[name] = rows
        if progress:
            progress(f"{name:<15} accuracy by severity " + " ".join(f"{r['accuracy']:.3f}" for r in rows))
    every = [r for rows in results.values() for r in rows]
    unsure = [r["unsure"] for r in every]
    return {"images": int(len(labels)), "clean": clean, "results": results,
            "mean_corruption_accuracy": float(np.mean([r["accuracy"] for r in every])),
            "mean_corruption_ece": float(np.mean([r["ece"] for r in every])),
            "mean_corruption_unsure": None if None in unsure else float(np.mean(unsure)),
            "severities": corruptions.SEVERITIES, "seed": corruptions.SEED}


def measure_run(run_dir: str | Path, dataset: data_mod.Dataset | None = None, images: int | None = None,
                device: str = "auto", data_dir=None, offline: bool | None = None, write: bool = True,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """A run's robustness (measure) on its held-out test images, or a stratified subset of `images` of
    them; written to RUN/robustness.json unless write=False."""
    check_images(images)
    folder = RunFolder(run_dir).require_finished()
    cfg, names = folder.config, folder.class_names
    predictor = Predictor.from_run(folder.path, device=device, calibrate_missing=False)
    ds = dataset or folder.dataset(data_dir, offline)
    if list(ds.class_names) != names:
        raise RunError(f"{folder.model_json_path}: the run's classes {names} differ from the dataset's "
                       f"{list(ds.class_names)}")
    unseen = unseen_test_images(cfg, ds.test_labels)
    measured_on = "test images" if len(unseen) == len(ds.test_labels) else "test images (the other half)"
    if images is not None and images < len(unseen):
        unseen = np.sort(unseen[data_mod.stratified_subset(ds.test_labels[unseen], images, SEED)])
        measured_on += ", a stratified subset"
    result = measure(predictor, ds.test_images[unseen], ds.test_labels[unseen], progress=progress)
    result.update(measured_on=measured_on, temperature=predictor.temperature if not predictor.calibration_note
                  else None, precision=predictor.runtime.precision, model_sha256=folder.weights_sha256())
    if write:
        folder.write_robustness(result)
    return result


# --------------------------------------------------------------------------- text and figures

def table_lines(result: dict[str, Any]) -> list[str]:
    """The accuracy per corruption and severity as text, with the clean figures and the means."""
    clean, sev = result["clean"], range(1, result.get("severities", corruptions.SEVERITIES) + 1)
    lines = [f"{'corruption':<15} " + " ".join(f"{'s' + str(s):>6}" for s in sev) + f" {'mean':>6} {'ECE':>6} "
             f"{'unsure':>6}"]
    for name, rows in result["results"].items():
        unsure = [r["unsure"] for r in rows]
        lines.append(f"{name:<15} " + " ".join(f"{r['accuracy']:>6.3f}" for r in rows)
                     + f" {np.mean([r['accuracy'] for r in rows]):>6.3f} {np.mean([r['ece'] for r in rows]):>6.3f} "
                     + (f"{np.mean(unsure):>6.3f}" if None not in unsure else f"{'-':>6}"))
    clean_unsure = "-" if clean["unsure"] is None else f"{clean['unsure']:.3f}"
    mean_unsure = result["mean_corruption_unsure"]
    lines += ["", f"clean accuracy {clean['accuracy']:.4f} (ECE {clean['ece']:.4f}, unsure {clean_unsure}); mean "
                  f"corruption accuracy {result['mean_corruption_accuracy']:.4f} (ECE "
                  f"{result['mean_corruption_ece']:.4f}, unsure "
                  f"{'-' if mean_unsure is None else f'{mean_unsure:.3f}'}) on {result['images']:,} "
                  f"{result['measured_on']}"]
    return lines


def robustness_figure(result: dict[str, Any]):
    """Accuracy by corruption (rows) and severity (columns) as an annotated heatmap, and the unsure share
    beside it where the run has a detector."""
    names = list(result["results"])
    accuracy = np.array([[r["accuracy"] for r in rows] for rows in result["results"].values()])
    unsure = [[r["unsure"] for r in rows] for rows in result["results"].values()]
    panels = [("accuracy", accuracy, "viridis")]
    if all(u is not None for row in unsure for u in row):
        panels.append(("share flagged unsure", np.array(unsure, dtype=float), "magma"))
    fig = pages.new_figure(4.2 * len(panels) + 1.2, 0.32 * len(names) + 1.6)
    for i, (what, values, cmap) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(values, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for (r, c), v in np.ndenumerate(values):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6.5, color="white" if v < 0.6 else "black")
        ax.set_xticks(range(values.shape[1]), [str(s + 1) for s in range(values.shape[1])], fontsize=7)
        ax.set_yticks(range(len(names)), names if i == 0 else [""] * len(names), fontsize=7)
        ax.set_xlabel("severity", fontsize=8)
        ax.set_title(what.capitalize(), fontsize=9)
    clean = result["clean"]
    fig.suptitle(f"Clean accuracy {clean['accuracy']:.3f}; mean corruption accuracy "
                 f"{result['mean_corruption_accuracy']:.3f} ({result['images']:,} {result['measured_on']})",
                 fontsize=8.5)
    return fig


def examples_figure(image: np.ndarray, names: list[str] | None = None):
    """One image under every corruption (rows) at every severity (columns), the clean image first."""
    names = names or list(corruptions.CORRUPTIONS)
    cols = corruptions.SEVERITIES + 1
    fig = pages.new_figure(cols * 0.85 + 0.9, len(names) * 0.85 + 0.3)
    for r, name in enumerate(names):
        row = [image] + [corruptions.corrupt(image[None], name, s)[0] for s in range(1, cols)]
        for c, shown in enumerate(row):
            ax = fig.add_subplot(len(names), cols, r * cols + c + 1)
            ax.imshow(shown, cmap="gray", vmin=0, vmax=255)
            pages.hide_axes(ax)
            if c == 0:
                ax.set_ylabel(name, fontsize=6.5, rotation=0, ha="right", va="center")
            if r == 0:
                ax.set_title("clean" if c == 0 else f"severity {c}", fontsize=6.5)
    return fig
