"""ModelService: the model loaded once (PyTorch or ONNX Runtime), what every router asks of it.

The model is checked on known inputs before it is served (self_test): a run whose weights are NaN,
or whose class names do not match its outputs, does not start. Every answer is checked the same way,
and the health routes run the self-test again: they answer 200 only while predictions work.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Callable

import anyio
import numpy as np

from .settings import Settings


# Images per forward pass. A request may hold thousands of images (a 10 MB .npy holds 12,700); the
# activations of a pass grow with its batch (cnn_small: about 150 MB more peak at 1,000, 25 MB at 256),
# and each work slot runs one pass at a time.
INFERENCE_BATCH = 256


class ModelUnavailable(Exception):
    """The model cannot answer now (its outputs are not usable): answered 503 with the reason."""


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
        # Decoding and model calls hold memory in proportion to their input: bounding how many run at
        # once bounds the server's memory whatever number of connections arrive. Waiting requests hold
        # no thread, only their body.
        self._slots = anyio.CapacityLimiter(settings.max_concurrent_decodes)
        failure = self.self_test()
        if failure:
            raise checkpoint.RunError(f"{path}: {failure}; not serving it")

    async def work(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in a worker thread, once one of the work slots is free."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._slots)

    # ----------------------------------------------------------------------- is the model usable?

    def self_test(self) -> str | None:
        """None when the model gives a probability per class name for each of a few known images
        (blank, white, a bright shape, noise), else what is wrong with it."""
        probes = probe_images()
        try:
            probs = self.predictor.probabilities(probes)
        except Exception as e:
            return (f"the model fails on {len(probes)} test images ({type(e).__name__}: "
                    f"{(str(e).splitlines() or [''])[0]})")
        return output_problem(probs, len(probes), self.class_names)

    async def require_ready(self) -> None:
        """Returns if the self-test passes now, else raises ModelUnavailable (the health routes: 503).
        Four tiny images: it takes no work slot, so a busy server still answers its health checks."""
        failure = await anyio.to_thread.run_sync(self.self_test)
        if failure:
            raise ModelUnavailable(f"the model is not ready: {failure}")

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(N, 28, 28) uint8 -> (N, classes) probabilities, checked: unusable outputs are never returned."""
        probs = self.predictor.probabilities(batch, INFERENCE_BATCH)
        failure = output_problem(probs, len(batch), self.class_names)
        if failure:
            raise ModelUnavailable(f"{failure}; nothing was returned")
        return probs

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


def probe_images() -> np.ndarray:
    """Known (28, 28) inputs for the self-test: blank, white, a bright centred shape, seeded noise."""
    shape = np.zeros((28, 28), np.uint8)
    shape[6:22, 9:19] = 220
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    return np.stack([np.zeros((28, 28), np.uint8), np.full((28, 28), 255, np.uint8), shape, noise])


def output_problem(probs: Any, n: int, class_names: list[str]) -> str | None:
    """What is wrong with a model's probabilities for n images (None when nothing is)."""
    shape = getattr(probs, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != n:
        return f"the model's output for {n} images has shape {shape}; expected ({n}, {len(class_names)})"
    if shape[1] != len(class_names):
        return (f"the model gives {shape[1]} outputs per image but has {len(class_names)} class names; "
                "model.json's class_names must list one name per output")
    if not np.isfinite(probs).all():
        return "the model's outputs are not finite (NaN or infinity): its weights are damaged"
    if (probs < 0).any() or np.abs(probs.sum(1) - 1).max() > 1e-3:
        return "the model's outputs are not probabilities (each row must be >= 0 and sum to 1)"
    return None
