"""A trained run ready to classify uint8 images: load once, predict many times.

Probabilities are calibrated: softmax of the logits divided by the run's temperature
(RUN/calibration.json, calibration.py), the same ranking as the model's own. Every prediction
carries, beside its ranked classes, the out-of-distribution score of its image and whether that
score is above the run's threshold (`unsure`: probably not a garment; ood.py).
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import evaluate, images, run as run_mod
from .calibration import calibrated_probabilities
from .atomic import write_text
from .device import Runtime
from .errors import ArgumentError
from .ood import OodDetector
from .run import RunFolder

UNSURE_MARK = "unsure: not a garment?"  # what the command line prints beside an unsure prediction


class Ranked(list):
    """One image's classes, best first (a list of {"label", "index", "score"}), with its out-of-distribution
    score (`ood_score`, higher is less like the training images) and `unsure` (the score is above the
    run's threshold); both None when the run has no detector."""

    def __init__(self, classes, ood_score: float | None = None, unsure: bool | None = None):
        super().__init__(classes)
        self.ood_score, self.unsure = ood_score, unsure

    def to_dict(self) -> dict[str, Any]:
        """What the service answers per image: {"classes": [...], "ood_score": ..., "unsure": ...}."""
        return {"classes": list(self), "ood_score": self.ood_score, "unsure": self.unsure}

    def __repr__(self) -> str:
        return f"Ranked({list.__repr__(self)}, ood_score={self.ood_score!r}, unsure={self.unsure!r})"


class Predictor:
    """A loaded model: calibrated probabilities, and out-of-distribution scores from the same forward passes."""

    def __init__(self, model: torch.nn.Module, info: dict[str, Any], runtime: Runtime,
                 ood: OodDetector | None = None, ood_note: str = "", temperature: float = 1.0,
                 calibration_note: str = ""):
        self.model, self.info, self.runtime = model.eval(), info, runtime
        # the logits are divided by it before the softmax (1.0: the model's own probabilities)
        self.temperature, self.calibration_note = float(temperature), calibration_note
        self.class_names: list[str] = list(info["class_names"])
        self.tta_flip = bool(info.get("tta_flip", False))
        self.tta_shift = int(info.get("tta_shift", 0))  # runs saved before shifts existed have none
        self.ood, self.ood_note = ood, ("" if ood else ood_note or "no out-of-distribution detector loaded")
        self._pass = _Pass(self).eval()  # one batch's arithmetic; trace() may replace it by its TorchScript
        self._traced: torch.jit.ScriptModule | None = None

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", precision: str | None = None,
                 calibrate_missing: bool = True, data_dir=None) -> "Predictor":
        """The run's model, its temperature (RUN/calibration.json) and its out-of-distribution detector
        (RUN/ood.safetensors). A run made before the detector existed is calibrated now when its dataset is
        on this machine and calibrate_missing (run.load_ood); otherwise its predictions carry no score, and
        `ood_note` says why. A run without a temperature gives the model's own probabilities, and
        `calibration_note` says how to fit one."""
        folder = RunFolder(run_dir)
        model, rt = run_mod.load_for_inference(folder, device, precision or "auto")
        info = folder.model_info
        temperature, calibration_note = run_mod.load_temperature(folder)
        detector, note = run_mod.load_ood(folder, evaluate.feature_layer(model).in_features, len(info["class_names"]),
                                          calibrate_missing, loaded=(model, rt), data_dir=data_dir)
        return cls(model, info, rt, detector, note, temperature, calibration_note)

    def trace(self, probes: np.ndarray) -> str:
        """Run outputs() (and so infer()) as one TorchScript call per batch from now on, when that gives
        bit-identical answers on `probes` ((N, 28, 28) uint8, in passes of 1 to N and 3N images); a line
        saying which.

        Why: an eager forward pass is dozens of calls into PyTorch, and after each the calling thread must
        take Python's GIL back. Beside a busy thread (a server's event loop) each of those waits, and a
        pass that takes 4 ms alone took 300 ms; the traced pass takes the GIL back once."""
        self._traced = None
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes on constants: checked below instead
                example = torch.from_numpy(np.ascontiguousarray(probes)).to(self.runtime.device)
                traced = torch.jit.trace(self._pass, example, check_trace=False)
        except Exception as e:
            return f"forward passes run eagerly: this model cannot be traced ({type(e).__name__})"
        # passes of every size up to the probes', and larger than the example (a size the tracer might
        # have taken for a constant)
        passes = [probes[:n] for n in range(1, len(probes) + 1)] + [np.concatenate([probes, probes[::-1], probes])]
        eager = [self.outputs(batch) for batch in passes]
        self._traced = traced
        try:
            same = all(np.array_equal(e, t) for batch, answers in zip(passes, eager)
                       for e, t in zip(answers, self.outputs(batch)))
        except Exception:  # a size the traced graph cannot take
            same = False
        if not same:
            self._traced = None
            return "forward passes run eagerly: the traced model's answers differ from the eager model's"
        return "forward passes run as one TorchScript call each (answers checked identical to the eager model's)"

    def probabilities(self, batch: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """(N, 28, 28) uint8 -> (N, classes) float32 probabilities."""
        return self.outputs(batch, batch_size)[0]

    @torch.no_grad()
    def outputs(self, batch: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """(N, 28, 28) uint8 -> (probabilities (N, classes), penultimate features (N, D)), float32, from the
        same forward passes, batch_size images a pass (one TorchScript call each once traced)."""
        run = self._traced if self._traced is not None else self._pass
        parts = [run(torch.from_numpy(np.ascontiguousarray(batch[i: i + batch_size])).to(self.runtime.device))
                 for i in range(0, len(batch), batch_size)]
        if not parts:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        return tuple(torch.cat([part[k] for part in parts]).cpu().numpy() for k in (0, 1))  # type: ignore[return-value]

    def infer(self, batch: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """(N, 28, 28) uint8 -> (probabilities (N, classes) float32, out-of-distribution scores (N,)
        float64), row-aligned, from one pass over the batch; the scores are NaN without a detector."""
        if self.ood is None:
            probs = self.probabilities(batch, batch_size)
            return probs, np.full(len(probs), np.nan)
        probs, features = self.outputs(batch, batch_size)
        return probs, self.ood.scores(features)

    def rank(self, probs: np.ndarray, top_k: int | None = None, scores: np.ndarray | None = None) -> list[Ranked]:
        """Each image's top_k classes (None: all), best first, with its score and flag when given."""
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ArgumentError(f"top_k={top_k!r}: expected an integer >= 1 (or None for every class)")
        k = len(self.class_names) if top_k is None else min(top_k, len(self.class_names))
        flags = self.ood.unsure(scores) if self.ood is not None and scores is not None else None
        out = []
        for i, p in enumerate(probs):
            order = np.argsort(-p, kind="stable")[:k]
            score = None if scores is None or math.isnan(scores[i]) else float(scores[i])
            out.append(Ranked([{"label": self.class_names[j], "index": int(j), "score": float(p[j])} for j in order],
                              score, None if flags is None or score is None else bool(flags[i])))
        return out

    def predict(self, batch: np.ndarray, top_k: int | None = 3) -> list[Ranked]:
        """Ranked classes with out-of-distribution score and flag per image."""
        probs, scores = self.infer(batch)
        return self.rank(probs, top_k, scores)

    def ood_status(self) -> dict[str, Any]:
        """The detector's threshold and calibration, or why there is none (/v1/model's "ood")."""
        if self.ood is None:
            return {"available": False, "note": self.ood_note}
        return {"available": True, **self.ood.describe()}

    def calibration_status(self) -> dict[str, Any]:
        """The temperature the probabilities are calibrated with, or why they are not (/v1/model's
        "calibration")."""
        if self.calibration_note:
            return {"calibrated": False, "temperature": self.temperature, "note": self.calibration_note}
        return {"calibrated": True, "temperature": self.temperature}


class _Pass(torch.nn.Module):
    """Predictor.outputs' arithmetic for one batch, uint8 images in, as one module that can be traced:
    the same calls in the same order as evaluate.predict_outputs and the calibrated softmax after it. The
    test-time augmentation and temperature are read from the predictor at each call (a trace fixes the
    ones it saw)."""

    def __init__(self, predictor: Predictor):
        super().__init__()
        self.model, self.predictor = predictor.model, predictor

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.predictor
        x = evaluate.to_input(images_u8, p.runtime)
        with p.runtime.autocast():
            logits, features = evaluate.tta_outputs(self.model, x, p.tta_flip, p.tta_shift)
        return calibrated_probabilities(logits, p.temperature), features


# --------------------------------------------------------------------------- folders of images

INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".npy")


def expand_inputs(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders as their image and .npy files (recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in INPUT_SUFFIXES)
        else:
            out.append(p)
    return out


def predict_files(predictor, files: list[Path], top_k: int | None = 3, batch_size: int = 256,
                  progress: bool = False):
    """Yield (path, item, Ranked or None, error or None) per image; a bad file is reported, not fatal.

    Files are decoded and classified in batches so a large folder is as fast as one array.
    """
    from tqdm import tqdm
    bar = tqdm(total=len(files), unit="file", disable=not progress, file=sys.stderr)
    try:
        for start in range(0, len(files), batch_size):
            chunk, decoded = files[start: start + batch_size], []
            for path in chunk:
                try:
                    decoded.append((path, images.load_images(path), None))
                except images.ImageError as e:
                    decoded.append((path, None, str(e)))
            good = [d for d in decoded if d[1] is not None]
            ranked = iter(predictor.predict(np.concatenate([d[1] for d in good]), top_k) if good else [])
            for path, arr, err in decoded:
                if arr is None:
                    yield path, 0, None, err
                    continue
                for i in range(len(arr)):
                    yield path, i, next(ranked), None
            bar.update(len(chunk))
    finally:
        bar.close()


def write_predictions_csv(rows, out: str | Path, top_k: int) -> tuple[int, int]:
    """Write predict_files' rows as CSV (atomically); returns (images classified, files with errors).
    Columns: path, item, label, index, score, label_2, score_2, ..., ood_score, unsure (true/false;
    both empty when the run has no out-of-distribution detector), error."""
    import csv
    import io
    buf = io.StringIO()
    writer = csv.writer(buf)
    extra = [c for j in range(2, top_k + 1) for c in (f"label_{j}", f"score_{j}")]
    writer.writerow(["path", "item", "label", "index", "score", *extra, "ood_score", "unsure", "error"])
    done = errors = 0
    for path, item, ranked, err in rows:
        if ranked is None:
            errors += 1
            writer.writerow([str(path), item, "", "", "", *[""] * len(extra), "", "", err])
            continue
        done += 1
        first, rest = ranked[0], ranked[1:]
        cells = [c for r in rest for c in (r["label"], f"{r['score']:.6f}")]
        writer.writerow([str(path), item, first["label"], first["index"], f"{first['score']:.6f}",
                         *cells, *[""] * (len(extra) - len(cells)), *ood_cells(ranked), ""])
    write_text(out, buf.getvalue())
    return done, errors


def ood_cells(ranked: Ranked) -> list[str]:
    """A prediction's ood_score and unsure as CSV cells (empty when the run has no detector)."""
    if ranked.ood_score is None:
        return ["", ""]
    return [f"{ranked.ood_score:.4f}", "true" if ranked.unsure else "false"]


def ood_text(ranked: Ranked) -> str:
    """What the command line prints after a prediction's classes: its score, and the mark when unsure."""
    if ranked.ood_score is None:
        return ""
    return f"  ood {ranked.ood_score:.2f}" + (f"  {UNSURE_MARK}" if ranked.unsure else "")


__all__ = ["Predictor", "Ranked", "images", "expand_inputs", "predict_files", "write_predictions_csv"]
