"""A trained run ready to classify uint8 images: load once, predict many times."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint, evaluate, images
from .device import Runtime, resolve


class Predictor:
    def __init__(self, model: torch.nn.Module, info: dict[str, Any], runtime: Runtime):
        self.model, self.info, self.runtime = model.eval(), info, runtime
        self.class_names: list[str] = list(info["class_names"])
        self.tta_flip = bool(info.get("tta_flip", False))

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", precision: str | None = None) -> "Predictor":
        model, info = checkpoint.load_model(run_dir)
        wanted = precision or info.get("precision", "auto")
        rt = resolve(device, "auto" if wanted == "bf16" else wanted,
                     conv_model=info["architecture"].get("channels_last", True))
        if wanted == "bf16" and rt.precision != "bf16":
            wanted = "fp32"  # the run was trained in bf16 but this device has no fast bf16: fp32 is exact enough
        rt = Runtime(rt.device, rt.precision if wanted == "auto" else wanted, rt.channels_last and wanted == "bf16")
        model = model.to(rt.device)
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return cls(model, info, rt)

    def probabilities(self, batch: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """(N, 28, 28) uint8 -> (N, classes) float32 probabilities."""
        logits = evaluate.predict_logits(self.model, torch.from_numpy(np.ascontiguousarray(batch)), self.runtime,
                                         batch_size, self.tta_flip)
        return torch.softmax(logits, 1).numpy()

    def rank(self, probs: np.ndarray, top_k: int | None = None) -> list[list[dict[str, Any]]]:
        k = len(self.class_names) if not top_k else min(top_k, len(self.class_names))
        out = []
        for p in probs:
            order = np.argsort(-p, kind="stable")[:k]
            out.append([{"label": self.class_names[i], "index": int(i), "score": float(p[i])} for i in order])
        return out

    def predict(self, batch: np.ndarray, top_k: int | None = 3) -> list[list[dict[str, Any]]]:
        return self.rank(self.probabilities(batch), top_k)


__all__ = ["Predictor", "images"]
