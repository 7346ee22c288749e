"""The service's settings, each named once: explicit arguments, then the environment, then defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .. import images

SAGEMAKER_MODEL_DIR = "/opt/ml/model"
BACKENDS = ("torch", "onnx")


@dataclass
class Settings:
    """Everything the service can be told. `from_env` fills what the caller left as None."""

    run: str | None = None  # run folder (or folder with model.json + model.safetensors [+ model.onnx])
    model_dir: str = SAGEMAKER_MODEL_DIR  # where the model is when no run is given (SageMaker's contract)
    backend: str = "torch"
    device: str = "auto"
    threads: int = 0  # threads per inference call (torch / ONNX Runtime); 0: the library's default (all cores)
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
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
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        for name in ("port", "workers", "max_body_bytes", "max_pixels", "max_request_pixels", "max_decoded_bytes",
                     "max_concurrent_decodes", "default_top_k"):
            if getattr(self, name) < (0 if name == "port" else 1):
                raise ValueError(f"setting {name} must be a positive integer; got {getattr(self, name)}")
        for name in ("samples", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"setting {name} must be >= 0; got {getattr(self, name)}")
        return self

    @property
    def model_path(self) -> Path:
        return Path(self.run or self.model_dir)


def _convert(var: str, text: str, kind: Any) -> Any:
    if kind in (int, "int"):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"environment variable {var}={text!r}: expected an integer") from None
    return text
