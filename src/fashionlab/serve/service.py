"""ModelService: the model loaded once (PyTorch or ONNX Runtime), what every router asks of it.

The model is checked on known inputs before it is served (self_test): a run whose weights are NaN,
or whose class names do not match its outputs, does not start. Every answer is checked the same way,
and the health routes run the known inputs again: they answer 200 only while predictions work.

Every model call goes through one Batcher (batching.py): the images of concurrent requests share
forward passes on the worker's one inference thread, which uses the worker's share of the cores.
Each image's answer is bit-identical whatever images share its pass (identical_passes).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable

import anyio
import numpy as np

from .batching import Batcher, BatcherClosed, identical_passes
from .settings import Settings

log = logging.getLogger("fashionlab.serve")

# A request holding more images than this is ranked in a work thread, not on the event loop.
RANK_INLINE_IMAGES = 64


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
        import torch
        # One inference thread per worker process: each worker's passes use its share of the cores.
        self.threads = inference_threads(settings)
        torch.set_num_threads(self.threads)
        self.predictor, self.saliency_model, self.platform = _load(path, settings)
        self.version = model_version(path, settings.backend)
        self.class_names: list[str] = list(self.predictor.class_names)
        self._samples: tuple[np.ndarray, np.ndarray] | None = None
        self.samples_note = ""
        self._lock = threading.Lock()
        self._health_check: asyncio.Task | None = None  # the health check running now, shared by callers
        # Decoding and model calls hold memory in proportion to their input: bounding how many run at
        # once bounds the server's memory whatever number of connections arrive. Waiting requests hold
        # no thread, only their body.
        self._slots = anyio.CapacityLimiter(settings.max_concurrent_decodes)
        failure = self.self_test()
        if failure:
            raise checkpoint.RunError(f"{path}: {failure}; not serving it")
        # The one function every forward pass runs, in passes that keep each image's answer identical.
        self.forward, self.passes_note = identical_passes(
            lambda batch: self.predictor.infer(batch, max(1, len(batch))), probe_images(), settings.max_batch)
        self.passes_on = passes_on(settings)
        self.batcher = Batcher(functools.partial(with_usable_rows, self.forward, len(self.class_names)),
                               settings.max_batch, settings.max_wait_ms / 1000, on_loop=self.passes_on == "loop")
        log.info("batching: up to %d images per pass, %g ms wait, %d threads, passes on the %s; %s",
                 settings.max_batch, settings.max_wait_ms, self.threads,
                 "event loop" if self.passes_on == "loop" else "inference thread", self.passes_note)

    async def work(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args). A coroutine function (the model calls: they wait in the batcher's queue, holding no
        thread) is awaited here; any other function runs in a worker thread once a work slot is free."""
        if inspect.iscoroutinefunction(fn):
            return await fn(*args)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._slots)

    def close(self, timeout: float | None = None) -> None:
        """Finishes the queued passes and stops the inference thread (at shutdown)."""
        self.batcher.close(timeout)

    # ----------------------------------------------------------------------- is the model usable?

    def self_test(self) -> str | None:
        """None when the model gives a probability per class name, and an out-of-distribution score, for
        each of a few known images (blank, white, a bright shape, noise; flagged unsure or not), else what
        is wrong with it."""
        probes = probe_images()
        try:
            probs, scores = self.predictor.infer(probes)
        except Exception as e:
            return (f"the model fails on {len(probes)} test images ({type(e).__name__}: "
                    f"{(str(e).splitlines() or [''])[0]})")
        return output_problem(probs, len(probes), self.class_names) or score_problem(scores, len(probes))

    async def require_ready(self) -> None:
        """Returns if the known images get usable answers now, else raises ModelUnavailable (the health
        routes: 503). The four tiny images join the next forward pass ahead of queued requests, so a busy
        server answers its health checks within a pass, and the check proves the batched path works.
        Health checks that arrive while a check is running share its answer: a storm of them costs one
        check per pass, not four images each."""
        loop = asyncio.get_running_loop()
        check = self._health_check
        if check is None or check.done() or check.get_loop() is not loop:
            check = self._health_check = loop.create_task(self._probe_problem())
        failure = await asyncio.shield(check)
        if failure:
            raise ModelUnavailable(failure)

    async def _probe_problem(self) -> str | None:
        """What is wrong with the batched answers for the known images (None when nothing is)."""
        probes = probe_images()
        try:
            probs, scores, _ = await self.batcher.submit(probes, urgent=True)
        except BatcherClosed as e:
            return str(e)
        except Exception as e:
            return (f"the model is not ready: the model fails on {len(probes)} test images "
                    f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
        failure = output_problem(probs, len(probes), self.class_names) or score_problem(scores, len(probes))
        return f"the model is not ready: {failure}" if failure else None

    async def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 28, 28) uint8 -> (probabilities (N, classes), out-of-distribution scores (N,), NaN where the
        model has no detector), row-aligned, from the same forward passes: every route's one call into the
        model, in passes shared with concurrent requests. Checked: unusable outputs are never returned."""
        try:
            probs, scores, usable = await self.batcher.submit(batch)
        except BatcherClosed as e:
            raise ModelUnavailable(str(e)) from None
        if not usable.all():
            failure = (output_problem(probs, len(batch), self.class_names) or score_problem(scores, len(batch))
                       or "the model's outputs for these images are not usable")
            raise ModelUnavailable(f"{failure}; nothing was returned")
        return probs, scores

    async def predict(self, batch: np.ndarray, top_k: int) -> list[dict[str, Any]]:
        """Per image: {"classes": top_k of {"label", "index", "score"}, best first, "ood_score", "unsure"}
        (the last two null when the model has no out-of-distribution detector)."""
        probs, scores = await self.infer(batch)
        answers = functools.partial(self._answers, probs, scores, top_k)
        return answers() if len(batch) <= RANK_INLINE_IMAGES else await self.work(answers)

    def _answers(self, probs: np.ndarray, scores: np.ndarray, top_k: int) -> list[dict[str, Any]]:
        return [ranked.to_dict() for ranked in self.predictor.rank(probs, top_k, scores)]

    async def explain(self, image: np.ndarray) -> dict[str, Any]:
        """One (28, 28) uint8 image -> what the web page shows."""
        probs, scores = await self.infer(image[None])
        ranked = self.predictor.rank(probs, 1, scores)[0]
        out: dict[str, Any] = {
            "input": image.tolist(),
            "probabilities": [{"label": n, "index": i, "score": float(p)}
                              for i, (n, p) in enumerate(zip(self.class_names, probs[0]))],
            "prediction": ranked[0],
            "ood_score": ranked.ood_score,
            "unsure": ranked.unsure,
            "saliency": None,
        }
        if self.saliency_model is not None:  # gradients through PyTorch: in a work slot, not the inference thread
            out["saliency"] = await self.work(self._saliency, image, out["prediction"]["index"])
        return out

    def _saliency(self, image: np.ndarray, index: int) -> list[list[int]]:
        from ..saliency import saliency
        return np.rint(saliency(self.saliency_model, image[None], np.array([index]))[0] * 255).astype(int).tolist()

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


def inference_threads(settings: Settings) -> int:
    """Threads per forward pass: as set, else this process's share of the cores it may run on once each
    worker's event loop has one, the `workers` processes sharing them (at least 1). The event loop decodes
    and answers every request; a pass whose threads crowd it out waits for it. On 2 cores with one worker,
    1 thread against 2: PyTorch 1,638 against 1,419 req/s at 32 connections and a lone request's p50
    2.2 against 4.0 ms; ONNX Runtime 1,675 against 1,609 req/s and 1.15 against 1.28 ms (wrk, one run)."""
    if settings.threads:
        return settings.threads
    return max(1, _spare_cores_per_worker(settings))


def passes_on(settings: Settings) -> str:
    """Where a worker's forward passes run (batching.Batcher): as set, else on an inference thread beside
    the event loop where each worker has a core to spare for it, and on the event loop where it has not
    (as many workers as cores, or more): a worker then has one core, and a pass on its loop costs no
    hand-over between threads and no contention for the GIL. On 2 cores two workers with passes on their
    loops served as many requests as one worker with its thread or more, at every connection count, and
    more than two with threads but at 32 connections with PyTorch (docs/deploy.md, "Measurements"); one
    worker with passes on its loop far fewer, its loop idle while the pass runs. One core and one worker
    (no spare core either) also gets the loop: not measured."""
    if settings.passes_on:
        return settings.passes_on
    return "thread" if _spare_cores_per_worker(settings) >= 1 else "loop"


def _spare_cores_per_worker(settings: Settings) -> int:
    """The cores this process may run on, less one per worker's event loop, divided between the workers."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return (cores - settings.workers) // settings.workers


def model_version(path: Path, backend: str) -> str:
    """The served file's identity: the first 12 hex digits of its SHA-256 (the metrics' model version)."""
    from ..export import ONNX_FILE
    from ..run import RunFolder
    file = path / ONNX_FILE if backend == "onnx" else RunFolder(path).weights_path
    if not file.is_file():  # a predictor loaded from elsewhere
        return "unknown"
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(functools.partial(fh.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _load(path: Path, settings: Settings) -> tuple[Any, Any, str]:
    """(predictor, saliency model or None, Open Inference platform) for the configured backend."""
    from ..run import RunFolder
    if settings.backend == "onnx":
        from ..export import OnnxPredictor
        predictor = OnnxPredictor.from_run(path, threads=inference_threads(settings), data_dir=settings.data_dir)
        saliency_model = None
        if RunFolder(path).weights_path.is_file():  # saliency needs gradients: PyTorch
            saliency_model, _ = RunFolder(path).load_model()
        return predictor, saliency_model, "onnxruntime_onnx"
    from ..predict import Predictor
    predictor = Predictor.from_run(path, device=settings.device, data_dir=settings.data_dir)
    log.info("%s", predictor.trace(probe_images()))  # one call into PyTorch per pass, where answers stay identical
    return predictor, predictor.model, "pytorch"


def probe_images() -> np.ndarray:
    """Known (28, 28) inputs for the self-test: blank, white, a bright centred shape, seeded noise."""
    shape = np.zeros((28, 28), np.uint8)
    shape[6:22, 9:19] = 220
    noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    return np.stack([np.zeros((28, 28), np.uint8), np.full((28, 28), 255, np.uint8), shape, noise])


def with_usable_rows(forward: Callable[[np.ndarray], tuple[Any, Any]], classes: int,
                     batch: np.ndarray) -> tuple[Any, Any, np.ndarray]:
    """forward(batch)'s (probabilities, out-of-distribution scores) and, per image, whether both are
    usable (what output_problem and score_problem accept), all False when their shapes are wrong: checked
    once per pass, so a request only looks up its own rows, and a request whose rows are unusable does not
    fail the others in its pass."""
    probs, scores = forward(batch)
    n = len(batch)
    if getattr(probs, "shape", None) != (n, classes) or getattr(scores, "shape", None) != (n,):
        return probs, scores, np.zeros(n, bool)
    with np.errstate(invalid="ignore"):
        return probs, scores, _finite_rows(probs) & _probability_rows(probs) & _distance_rows(scores)


# What output_problem and score_problem accept, per image (row); with_usable_rows asks the same.

def _finite_rows(probs: np.ndarray) -> np.ndarray:
    return np.isfinite(probs).all(1)


def _probability_rows(probs: np.ndarray) -> np.ndarray:
    return (probs >= 0).all(1) & (np.abs(probs.sum(1) - 1) <= 1e-3)


def _distance_rows(scores: np.ndarray) -> np.ndarray:
    """>= 0 or NaN (a model without a detector); never infinite, so every answer is valid JSON."""
    return ~np.isinf(scores) & ~(scores < 0)


def output_problem(probs: Any, n: int, class_names: list[str]) -> str | None:
    """What is wrong with a model's probabilities for n images (None when nothing is)."""
    shape = getattr(probs, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != n:
        return f"the model's output for {n} images has shape {shape}; expected ({n}, {len(class_names)})"
    if shape[1] != len(class_names):
        return (f"the model gives {shape[1]} outputs per image but has {len(class_names)} class names; "
                "model.json's class_names must list one name per output")
    if not _finite_rows(probs).all():
        return "the model's outputs are not finite (NaN or infinity): its weights are damaged"
    if not _probability_rows(probs).all():
        return "the model's outputs are not probabilities (each row must be >= 0 and sum to 1)"
    return None


def score_problem(scores: Any, n: int) -> str | None:
    """What is wrong with the out-of-distribution scores for n images (None when nothing is): one per
    image, each >= 0 or NaN (no detector); never infinite, so every answer is valid JSON."""
    shape = getattr(scores, "shape", None)
    if shape != (n,):
        return f"the model's out-of-distribution scores for {n} images have shape {shape}; expected ({n},)"
    if not _distance_rows(scores).all():
        return "the model's out-of-distribution scores are not distances (infinite or negative)"
    return None
