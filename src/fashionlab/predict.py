"""A trained run ready to classify uint8 images: load once, predict many times."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import evaluate, images
from .atomic import write_text
from .device import Runtime, inference_runtime
from .run import RunFolder


class Predictor:
    def __init__(self, model: torch.nn.Module, info: dict[str, Any], runtime: Runtime):
        self.model, self.info, self.runtime = model.eval(), info, runtime
        self.class_names: list[str] = list(info["class_names"])
        self.tta_flip = bool(info.get("tta_flip", False))
        self.tta_shift = int(info.get("tta_shift", 0))  # runs saved before shifts existed have none

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", precision: str | None = None) -> "Predictor":
        model, info = RunFolder(run_dir).load_model()
        rt = inference_runtime(info, device, precision or "auto")
        model = model.to(rt.device)
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return cls(model, info, rt)

    def probabilities(self, batch: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """(N, 28, 28) uint8 -> (N, classes) float32 probabilities."""
        logits = evaluate.predict_logits(self.model, torch.from_numpy(np.ascontiguousarray(batch)), self.runtime,
                                         batch_size, self.tta_flip, self.tta_shift)
        return torch.softmax(logits, 1).numpy()

    def rank(self, probs: np.ndarray, top_k: int | None = None) -> list[list[dict[str, Any]]]:
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k={top_k!r}: expected an integer >= 1 (or None for every class)")
        k = len(self.class_names) if top_k is None else min(top_k, len(self.class_names))
        out = []
        for p in probs:
            order = np.argsort(-p, kind="stable")[:k]
            out.append([{"label": self.class_names[i], "index": int(i), "score": float(p[i])} for i in order])
        return out

    def predict(self, batch: np.ndarray, top_k: int | None = 3) -> list[list[dict[str, Any]]]:
        return self.rank(self.probabilities(batch), top_k)


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
    """Yield (path, item, ranked or None, error or None) per image; a bad file is reported, not fatal.

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
    """Write predict_files' rows as CSV (atomically); returns (images classified, files with errors)."""
    import csv
    import io
    buf = io.StringIO()
    writer = csv.writer(buf)
    extra = [c for j in range(2, top_k + 1) for c in (f"label_{j}", f"score_{j}")]
    writer.writerow(["path", "item", "label", "index", "score", *extra, "error"])
    done = errors = 0
    for path, item, ranked, err in rows:
        if ranked is None:
            errors += 1
            writer.writerow([str(path), item, "", "", "", *[""] * len(extra), err])
            continue
        done += 1
        first, rest = ranked[0], ranked[1:]
        cells = [c for r in rest for c in (r["label"], f"{r['score']:.6f}")]
        writer.writerow([str(path), item, first["label"], first["index"], f"{first['score']:.6f}",
                         *cells, *[""] * (len(extra) - len(cells)), ""])
    write_text(out, buf.getvalue())
    return done, errors


__all__ = ["Predictor", "images", "expand_inputs", "predict_files", "write_predictions_csv"]
