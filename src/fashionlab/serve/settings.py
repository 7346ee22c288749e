"""The service's settings, each named once: explicit arguments, then the environment, then defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .. import images

SAGEMAKER_MODEL_DIR = "/opt/ml/model"
BACKENDS = ("torch", "onnx")
PASSES_ON = ("thread", "loop")  # where forward passes run: an inference thread, or the event loop


@dataclass
class Settings:
    """Everything the service can be told. `from_env` fills what the caller left as None."""

    run: str | None = None  # run folder (or folder with model.json + model.safetensors [+ model.onnx])
    model_dir: str = SAGEMAKER_MODEL_DIR  # where the model is when no run is given (SageMaker's contract)
    backend: str = "torch"
    device: str = "auto"
    threads: int | None = None  # threads per forward pass (torch / ONNX Runtime); None: the cores / workers
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    passes_on: str | None = None  # "thread" or "loop" (batching.Batcher); None: chosen from cores and workers
    # Dynamic batching (batching.py): images per forward pass, and how long a request that arrives while the
    # model is idle waits for others to share its pass (0: never; passes still fill with what queues while
    # the previous one runs). Chosen by measurement (docs/deploy.md, "Batching").
    max_batch: int = 64
    max_wait_ms: float = 0.0
    keep_alive_timeout: float = 5.0  # seconds an idle connection is kept open between requests
    read_timeout: float = 30.0  # seconds a client may take to send a request head, or between pieces of its body
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int = images.MAX_PIXELS  # one image, from its header
    # One request's images in all, charged from their headers before any is decoded (see docs/deploy.md:
    # with the work slots they keep the server under 1 GB at 32 connections).
    max_request_pixels: int = 64_000_000
    max_decoded_bytes: int = 64 * 1024 * 1024  # as Pillow holds them: 1 byte a pixel for grey, 4 for colour
    max_concurrent_decodes: int = 2  # requests decoding images or running the model at once
    model_name: str = "fashionlab"  # the Open Inference model name
    default_top_k: int = 3
    samples: int = 20  # test images offered on the web page (0: none)
    data_dir: str | None = None

    # environment variable -> field; SageMaker's own names win over ours, as its contract requires
    ENV = {
        "FASHIONLAB_RUN": "run", "FASHIONLAB_MODEL_DIR": "model_dir", "FASHIONLAB_BACKEND": "backend",
        "FASHIONLAB_DEVICE": "device", "FASHIONLAB_THREADS": "threads", "FASHIONLAB_HOST": "host",
        "FASHIONLAB_PORT": "port", "SAGEMAKER_BIND_TO_PORT": "port",
        "FASHIONLAB_WORKERS": "workers", "SAGEMAKER_MODEL_SERVER_WORKERS": "workers",
        "FASHIONLAB_MAX_BODY_BYTES": "max_body_bytes", "FASHIONLAB_MAX_PIXELS": "max_pixels",
        "FASHIONLAB_MAX_REQUEST_PIXELS": "max_request_pixels", "FASHIONLAB_MAX_DECODED_BYTES": "max_decoded_bytes",
        "FASHIONLAB_MAX_CONCURRENT_DECODES": "max_concurrent_decodes",
        "FASHIONLAB_MODEL_NAME": "model_name", "FASHIONLAB_SAMPLES": "samples", "FASHIONLAB_DATA": "data_dir",
        "FASHIONLAB_MAX_BATCH": "max_batch", "FASHIONLAB_MAX_WAIT_MS": "max_wait_ms",
        "FASHIONLAB_KEEP_ALIVE_TIMEOUT": "keep_alive_timeout", "FASHIONLAB_READ_TIMEOUT": "read_timeout",
        "FASHIONLAB_SHUTDOWN_TIMEOUT": "shutdown_timeout", "FASHIONLAB_PASSES_ON": "passes_on",
    }

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **given: Any) -> "Settings":
        """Explicit values (not None) first, then the environment, then the defaults."""
        env = dict(os.environ if env is None else env)
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for var, name in cls.ENV.items():
            if env.get(var, "").strip():
                values[name] = _convert(var, env[var].strip(), types[name])
        values.update({k: v for k, v in given.items() if v is not None})
        unknown = set(values) - set(types)
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**values).checked()

    def checked(self) -> "Settings":
        """The settings, each within its range (RANGES), else a ValueError of one line naming its flag."""
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.passes_on not in (None, *PASSES_ON):
            raise ValueError(f"{describe('passes_on')}: expected one of {', '.join(PASSES_ON)}; got {self.passes_on!r}")
        for name, (low, high) in RANGES.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL:
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (isinstance(low, int) and not isinstance(value, int)) or not low <= value <= high:
                kind, fmt = ("an integer", ",") if isinstance(low, int) else ("a number", ",g")
                raise ValueError(f"{describe(name)}: expected {kind} from {low:{fmt}} to {high:{fmt}}; got {value!r}")
        return self

    @property
    def model_path(self) -> Path:
        return Path(self.run or self.model_dir)


# Each number's accepted range (inclusive). Bounds keep a typo from starting a server that cannot work
# (--port 70000), that oversubscribes the machine (--workers 1000) or that holds unbounded memory.
RANGES: dict[str, tuple[Any, Any]] = {
    "port": (0, 65535), "workers": (1, 256), "threads": (1, 1024), "max_batch": (1, 1024),
    "max_wait_ms": (0.0, 1000.0), "keep_alive_timeout": (0.1, 3600.0), "read_timeout": (0.1, 3600.0),
    "shutdown_timeout": (0.0, 3600.0), "max_body_bytes": (1, 2**31), "max_pixels": (1, 2**31),
    "max_request_pixels": (1, 2**34), "max_decoded_bytes": (1, 2**36), "max_concurrent_decodes": (1, 1024),
    "default_top_k": (1, 2**31), "samples": (0, 10_000),
}
OPTIONAL = {"threads"}  # None: chosen at start-up
NO_FLAG = {"default_top_k"}  # settings `fashionlab serve` has no flag for


def describe(name: str) -> str:
    """A setting as its user knows it: `--flag (setting name; environment variables)`."""
    env = [var for var, field in Settings.ENV.items() if field == name]
    inner = f"setting {name}" + (f"; {', '.join(env)}" if env else "")
    return inner if name in NO_FLAG else f"--{name.replace('_', '-')} ({inner})"


def _convert(var: str, text: str, kind: Any) -> Any:
    kind = str(getattr(kind, "__name__", kind)).split("|")[0].strip()
    converters = {"int": (int, "an integer"), "float": (float, "a number")}
    if kind in converters:
        convert, expected = converters[kind]
        try:
            return convert(text)
        except ValueError:
            raise ValueError(f"environment variable {var}={text!r}: expected {expected}") from None
    return text
