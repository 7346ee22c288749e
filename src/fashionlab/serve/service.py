"""ModelService: the model loaded once (PyTorch or ONNX Runtime), what every router asks of it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from .settings import Settings


class ModelService:
    """The loaded model (once, at start-up), its saliency model and the web page's sample images."""

    def __init__(self, settings: Settings):
        from .. import checkpoint
        self.settings = settings
        path = settings.model_path
        if not path.is_dir():
            raise checkpoint.RunError(
                f"{path}: no such model folder" + ("" if settings.run else
                                                   " (no run given, so the SageMaker model folder is used)"))
        if settings.threads:
            import torch
            torch.set_num_threads(settings.threads)
        self.predictor, self.saliency_model, self.platform = _load(path, settings)
        self.class_names: list[str] = list(self.predictor.class_names)
        self._samples: tuple[np.ndarray, np.ndarray] | None = None
        self.samples_note = ""
        self._lock = threading.Lock()

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.predictor.probabilities(batch)

    def predict(self, batch: np.ndarray, top_k: int) -> list[list[dict[str, Any]]]:
        return self.predictor.rank(self.probabilities(batch), top_k)

    def explain(self, image: np.ndarray) -> dict[str, Any]:
        """One (28, 28) uint8 image -> what the web page shows."""
        probs = self.probabilities(image[None])[0]
        out: dict[str, Any] = {
            "input": image.tolist(),
            "probabilities": [{"label": n, "index": i, "score": float(p)}
                              for i, (n, p) in enumerate(zip(self.class_names, probs))],
            "prediction": self.predictor.rank(probs[None], 1)[0][0],
            "saliency": None,
        }
        if self.saliency_model is not None:
            from ..saliency import saliency
            target = np.array([out["prediction"]["index"]])
            out["saliency"] = np.rint(saliency(self.saliency_model, image[None], target)[0] * 255).astype(int).tolist()
        return out

    def samples(self) -> tuple[np.ndarray, np.ndarray]:
        """A fixed sample of test images, the same few per class (loaded on first use, then kept)."""
        with self._lock:
            if self._samples is None:
                self._samples = self._load_samples()
            return self._samples

    def _load_samples(self) -> tuple[np.ndarray, np.ndarray]:
        empty = (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64))
        if self.settings.samples == 0:
            return empty
        from .. import data
        try:
            ds = data.load(data.FASHION_MNIST, data_dir=self.settings.data_dir, offline=True)
        except Exception as e:  # the service works without the dataset; the page just offers no samples
            self.samples_note = f"no test images available ({str(e).splitlines()[0]})"
            return empty
        if list(ds.class_names) != self.class_names:
            self.samples_note = "no test images: this model's classes are not Fashion-MNIST's"
            return empty
        per_class = max(1, -(-self.settings.samples // ds.num_classes))
        picks = [np.flatnonzero(ds.test_labels == c)[:per_class] for c in range(ds.num_classes)]
        order = np.stack([np.pad(p, (0, per_class - len(p)), constant_values=-1) for p in picks], 1).ravel()
        order = order[order >= 0][: self.settings.samples]  # interleaved: every class appears early
        return ds.test_images[order], ds.test_labels[order]


def _load(path: Path, settings: Settings) -> tuple[Any, Any, str]:
    """(predictor, saliency model or None, Open Inference platform) for the configured backend."""
    from ..run import RunFolder
    if settings.backend == "onnx":
        from ..export import OnnxPredictor
        predictor = OnnxPredictor.from_run(path, threads=settings.threads or None)
        saliency_model = None
        if RunFolder(path).weights_path.is_file():  # saliency needs gradients: PyTorch
            saliency_model, _ = RunFolder(path).load_model()
        return predictor, saliency_model, "onnxruntime_onnx"
    from ..predict import Predictor
    predictor = Predictor.from_run(path, device=settings.device)
    return predictor, predictor.model, "pytorch"
