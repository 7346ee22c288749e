"""The HTTP service: a JSON API, the SageMaker and Open Inference (KServe v2) contracts, a web page.

A thin shell over the library: images.py turns bodies into (N, 28, 28) uint8 batches, a
predictor (predict.Predictor on PyTorch, export.OnnxPredictor on ONNX Runtime) classifies them,
loaded once when the app is created. Settings come from one place (Settings: arguments, then
environment, then defaults). Every client mistake is a 4xx JSON error {"error": "..."}.

Endpoints
    GET  /                          the web page (static/), GET /v1/samples[/{i}.png] its test images
    POST /v1/predict                image body, multipart `file`, JSON base64 or arrays, .npy; ?top_k=
    POST /v1/explain                one image -> preprocessed input, all probabilities, saliency
    GET  /ping, POST /invocations   SageMaker inference contract
    GET  /v2, /v2/health/{live,ready}, /v2/models/{name}[/ready], POST /v2/models/{name}/infer
         (the Open Inference codec is in openinference.py)
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the string annotations against these globals

from . import __version__, images, openinference
from .errors import UserError

log = logging.getLogger("fashionlab.serve")

STATIC_DIR = Path(__file__).with_name("static")
SAGEMAKER_MODEL_DIR = "/opt/ml/model"
BACKENDS = ("torch", "onnx")
NPY_MAGIC = b"\x93NUMPY"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp", "image/tiff")
NPY_TYPES = ("application/x-npy", "application/npy")
ACCEPTED_TYPES = ("application/json", *NPY_TYPES, "multipart/form-data", "application/octet-stream", *IMAGE_TYPES)


# --------------------------------------------------------------------------- settings

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
    max_pixels: int = images.MAX_PIXELS
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
        for name in ("port", "workers", "max_body_bytes", "max_pixels", "default_top_k"):
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


# --------------------------------------------------------------------------- errors

class ClientError(Exception):
    """A request the client got wrong: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _image_error_status(e: images.ImageError) -> int:
    return 413 if isinstance(e, images.ImageTooLargeError) else 400


# --------------------------------------------------------------------------- the model

class ModelService:
    """The loaded model (once, at start-up), its saliency model and the web page's sample images."""

    def __init__(self, settings: Settings):
        from . import checkpoint
        self.settings = settings
        path = settings.model_path
        if not path.is_dir():
            raise checkpoint.RunError(
                f"{path}: no such model folder" + ("" if settings.run else
                                                   " (no run given, so the SageMaker model folder is used)"))
        self.saliency_model = None
        if settings.threads:
            import torch
            torch.set_num_threads(settings.threads)
        if settings.backend == "onnx":
            from .export import OnnxPredictor
            self.predictor = OnnxPredictor.from_run(path, threads=settings.threads or None)
            if (path / checkpoint.MODEL_WEIGHTS).is_file():  # saliency needs gradients: PyTorch
                self.saliency_model, _ = checkpoint.load_model(path)
            self.platform = "onnxruntime_onnx"
        else:
            from .predict import Predictor
            self.predictor = Predictor.from_run(path, device=settings.device)
            self.saliency_model = self.predictor.model
            self.platform = "pytorch"
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
            from .saliency import saliency
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
        from . import data
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


# --------------------------------------------------------------------------- request bodies

def _media_type(request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def decode_blob(blob: bytes, name: str, max_pixels: int, media_type: str = "") -> np.ndarray:
    """Image or .npy bytes -> (N, 28, 28) uint8, images preprocessed to the dataset's style."""
    if media_type in NPY_TYPES or blob[:6] == NPY_MAGIC or name.lower().endswith(".npy"):
        return images.decode_npy(blob, name)
    return images.to_dataset_style(images.decode_image(blob, name, max_pixels))[None]


def _b64(text: Any, field: str) -> bytes:
    if isinstance(text, dict) and "b64" in text:  # TensorFlow Serving's convention {"b64": "..."}
        text = text["b64"]
    if not isinstance(text, str):
        raise ClientError(400, f"JSON field {field}: expected a base64 string; got {type(text).__name__}")
    if text.startswith("data:") and "," in text:  # a data URL from a browser
        text = text.split(",", 1)[1]
    try:
        blob = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ClientError(400, f"JSON field {field}: not valid base64 ({e})") from None
    if not blob:
        raise ClientError(400, f"JSON field {field}: empty after base64 decoding; expected image or .npy bytes")
    return blob


def _json_images(doc: Any, max_pixels: int) -> tuple[np.ndarray, Any]:
    """{"image": b64} | {"images": [b64, ...]} | {"instances": [...]} | {"array": nested list} | [...]."""
    if isinstance(doc, list):
        doc = {"instances": doc}
    if not isinstance(doc, dict):
        raise ClientError(400, f"JSON body: expected an object with 'image', 'images', 'instances' or 'array'; "
                               f"got {type(doc).__name__}")
    top_k = doc.get("top_k")
    if "image" in doc:
        return decode_blob(_b64(doc["image"], "image"), "image", max_pixels), top_k
    if "array" in doc:
        return _nested_array(doc["array"], "array"), top_k
    key = "images" if "images" in doc else "instances" if "instances" in doc else None
    if key is None:
        raise ClientError(400, "JSON body: no 'image' (base64), 'images' (list of base64), 'instances' or "
                               f"'array' (pixel arrays) field; got fields {sorted(doc)[:10]}")
    items = doc[key]
    if not isinstance(items, list) or not items:
        raise ClientError(400, f"JSON field {key}: expected a non-empty list")
    if all(isinstance(x, (str, dict)) for x in items):
        batches = [decode_blob(_b64(x, f"{key}[{i}]"), f"{key}[{i}]", max_pixels) for i, x in enumerate(items)]
        return np.concatenate(batches), top_k
    return _nested_array(items, key), top_k


def _nested_array(value: Any, field: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise ClientError(400, f"JSON field {field}: not a rectangular array of numbers ({e})") from None
    if arr.dtype.kind not in "biuf":
        raise ClientError(400, f"JSON field {field}: expected numbers (pixels) in a (28, 28) or (N, 28, 28) array; "
                               f"got array of {arr.dtype} with shape {arr.shape}")
    return images.array_to_images(arr, f"JSON field {field}")


async def read_batch(request, settings: Settings) -> tuple[np.ndarray, Any]:
    """Any accepted request body -> ((N, 28, 28) uint8 images, top_k given in the body or None)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    media = _media_type(request)
    if media == "multipart/form-data":
        try:
            form = await request.form(max_files=1000, max_fields=1000)
        except ClientError:
            raise
        except Exception as e:  # malformed multipart (bad boundary, truncated part)
            raise ClientError(400, f"malformed multipart body ({getattr(e, 'detail', None) or e})") from None
        uploads = [(i, f) for i, f in enumerate(form.getlist("file")) if isinstance(f, UploadFile)]
        if not uploads:
            raise ClientError(400, "multipart body has no file in a field named 'file'")
        parts = []
        for i, f in uploads:
            blob = await f.read()
            name = f.filename or f"file[{i}]"
            if not blob:
                raise ClientError(400, f"{name}: empty file (0 bytes); expected a PNG or JPEG image or a .npy array")
            parts.append((blob, name, (f.content_type or "").lower()))
        batch = await run_in_threadpool(
            lambda: np.concatenate([decode_blob(b, n, settings.max_pixels, t) for b, n, t in parts]))
        top_k = form.get("top_k")
        return batch, top_k
    body = await request.body()
    if not body:
        raise ClientError(400, "empty request body; send an image, a .npy array or JSON "
                               f"(content types: {', '.join(ACCEPTED_TYPES[:4])}, image/png, image/jpeg)")
    if media == "application/json" or media.endswith("+json"):
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ClientError(400, f"malformed JSON body ({e})") from None
        return await run_in_threadpool(_json_images, doc, settings.max_pixels)
    if media in NPY_TYPES:
        return await run_in_threadpool(images.decode_npy, body, "request body (.npy)"), None
    if media in IMAGE_TYPES or media in ("", "application/octet-stream"):
        return await run_in_threadpool(decode_blob, body, "request body", settings.max_pixels, media), None
    raise ClientError(415, f"content type {media!r} is not accepted; use one of {', '.join(ACCEPTED_TYPES)}")


def _top_k(query: int | None, body: Any, settings: Settings, classes: int) -> int:
    value = query if query is not None else body
    if value is None:
        return min(settings.default_top_k, classes)
    try:
        k = int(value)
        if isinstance(value, float) and value != k or isinstance(value, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise ClientError(400, f"top_k: expected a positive integer; got {value!r}") from None
    if k < 1:
        raise ClientError(400, f"top_k: expected a positive integer; got {k}")
    return min(k, classes)


# --------------------------------------------------------------------------- the app

class _Guard:
    """Pure ASGI middleware: refuses bodies over the limit (413) and logs one line per request."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.limit = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.limit:
                await _send_json(send_status, 413, f"request body of {int(declared):,} bytes is over the limit "
                                                   f"of {self.limit:,} bytes")
                return
            received = [0]

            async def limited_receive():
                message = await receive()
                if message["type"] == "http.request":
                    received[0] += len(message.get("body", b""))
                    if received[0] > self.limit:  # chunked bodies have no Content-Length to check up front
                        raise ClientError(413, f"request body is over the limit of {self.limit:,} bytes")
                return message

            await self.app(scope, limited_receive, send_status)
        except Exception:
            status[0] = status[0] or 500
            raise
        finally:
            log.info("%s %s %d %.1fms", scope.get("method"), scope.get("path"), status[0],
                     (time.perf_counter() - start) * 1000)


async def _send_json(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object", "properties": {
                "image": {"type": "string", "description": "base64 PNG/JPEG/.npy bytes"},
                "images": {"type": "array", "items": {"type": "string"}},
                "array": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                "top_k": {"type": "integer"}}}},
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "string", "format": "binary"}}}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}
_V2_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "data": {"type": "array", "items": {"type": "number"}}}}},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}}}}}}}}


def create_app(settings: Settings | None = None, service: ModelService | None = None):
    """The FastAPI app. Loads the model now (once), unless a loaded service is handed in."""
    from fastapi import FastAPI, Path as PathParam, Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or Settings.from_env()
    service = service or ModelService(settings)
    app = FastAPI(title="fashionlab", version=__version__,
                  description="Fashion-MNIST garment classifier: JSON API, SageMaker and Open Inference contracts.")
    app.state.settings, app.state.service = settings, service

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ClientError)
    async def _client_error(request, e: ClientError):
        return error(e.status, e.message)

    @app.exception_handler(UserError)  # bad input found by library code (a malformed inference request, ...)
    async def _user_error(request, e: UserError):
        return error(400, str(e))

    @app.exception_handler(images.ImageError)
    async def _image_error(request, e: images.ImageError):
        return error(_image_error_status(e), str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
        return error(422, f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, f"internal error ({type(e).__name__}); the request was not processed")

    classes = len(service.class_names)
    TopK = Query(None, description="how many classes to return per image, best first")
    ModelName = PathParam(description="the served model's name", examples=[settings.model_name])

    async def ranked(request: Request, top_k: int | None):
        batch, body_k = await read_batch(request, settings)
        k = _top_k(top_k, body_k, settings, classes)
        return await run_in_threadpool(service.predict, batch, k)

    # ---- JSON API and web page
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.post("/v1/predict", openapi_extra=_PREDICT_BODY,
              summary="Classify one or more images; a list (one per image) of classes sorted by score")
    async def v1_predict(request: Request, top_k: int | None = TopK):
        return await ranked(request, top_k)

    @app.post("/v1/explain", openapi_extra=_PREDICT_BODY,
              summary="One image: preprocessed 28x28 input, probabilities of every class, saliency map")
    async def v1_explain(request: Request):
        batch, _ = await read_batch(request, settings)
        if len(batch) != 1:
            raise ClientError(400, f"/v1/explain takes exactly one image; got {len(batch)}")
        return await run_in_threadpool(service.explain, batch[0])

    @app.get("/v1/model", summary="The served model: classes, backend, input contract")
    async def v1_model():
        return {"name": settings.model_name, "backend": settings.backend, "platform": service.platform,
                "class_names": service.class_names, "max_body_bytes": settings.max_body_bytes,
                "max_pixels": settings.max_pixels, "saliency": service.saliency_model is not None}

    @app.get("/v1/samples", summary="Test images the web page offers")
    async def v1_samples():
        imgs, labels = await run_in_threadpool(service.samples)
        return {"samples": [{"id": i, "label": service.class_names[int(y)], "url": f"/v1/samples/{i}.png"}
                            for i, y in enumerate(labels)], "note": service.samples_note}

    @app.get("/v1/samples/{sample_id}.png", summary="One sample test image as PNG")
    async def v1_sample(sample_id: int):
        imgs, _ = await run_in_threadpool(service.samples)
        if not 0 <= sample_id < len(imgs):
            raise ClientError(404, f"sample {sample_id}: no such sample; ids run from 0 to {len(imgs) - 1}")
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(imgs[sample_id], mode="L").save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    # ---- SageMaker inference contract
    @app.get("/ping", summary="SageMaker health check: 200 once the model is loaded")
    async def ping():
        return {"status": "ok", "model": settings.model_name}

    @app.post("/invocations", openapi_extra=_PREDICT_BODY, summary="SageMaker inference: same bodies as /v1/predict")
    async def invocations(request: Request, top_k: int | None = TopK):
        return await ranked(request, top_k)

    @app.get("/execution-parameters", summary="SageMaker batch transform: how to split and send requests")
    async def execution_parameters():
        return {"MaxConcurrentTransforms": settings.workers, "BatchStrategy": "SINGLE_RECORD",
                "MaxPayloadInMB": max(1, settings.max_body_bytes // (1024 * 1024))}

    # ---- Open Inference protocol (KServe v2); each model route also under /versions/1
    def known(name: str, version: str | None = None) -> None:
        if name != settings.model_name:
            raise ClientError(404, f"model {name!r} not found; this server serves {settings.model_name!r}")
        if version is not None and version != "1":
            raise ClientError(404, f"model {name!r} has no version {version!r}; it has version '1'")

    @app.get("/v2", summary="Open Inference server metadata")
    async def v2_server():
        return {"name": "fashionlab", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def v2_live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def v2_ready():
        return {"ready": True}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def v2_model(name: str = ModelName, version: str | None = None):
        known(name, version)
        return openinference.metadata(settings.model_name, service.platform, service.class_names)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_model_ready(name: str = ModelName, version: str | None = None):
        known(name, version)
        return {"name": name, "ready": True}

    @app.post("/v2/models/{name}/infer", openapi_extra=_V2_BODY)
    @app.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=_V2_BODY)
    async def v2_infer(request: Request, name: str = ModelName, version: str | None = None):
        known(name, version)
        body = await request.body()
        req, batch = await run_in_threadpool(openinference.decode_request, body,
                                             request.headers.get("inference-header-content-length"))
        probs = await run_in_threadpool(service.probabilities, batch)
        content, headers = openinference.encode_response(settings.model_name, service.class_names, req, probs)
        return Response(content, headers=headers, media_type=headers["content-type"])

    app.add_middleware(_Guard, max_body_bytes=settings.max_body_bytes)
    return app


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def app_from_env():
    """uvicorn factory for multi-worker serving: each worker reads the settings the parent wrote."""
    _configure_logging()  # workers are fresh processes: they do not inherit the parent's logging set-up
    raw = os.environ.get("FASHIONLAB_SERVE_SETTINGS")
    settings = Settings(**json.loads(raw)).checked() if raw else Settings.from_env()
    return create_app(settings)


def run(settings: Settings) -> None:
    """Serve until interrupted (what `fashionlab serve` calls)."""
    import uvicorn
    _configure_logging()
    log.info("loading %s with %s from %s", settings.model_name, settings.backend, settings.model_path)
    common = dict(host=settings.host, port=settings.port, access_log=False, log_level="info",
                  timeout_graceful_shutdown=5)
    if settings.workers > 1:
        create_app(settings)  # fail fast in the parent on a bad model folder, with a clear message
        os.environ["FASHIONLAB_SERVE_SETTINGS"] = json.dumps(asdict(settings))
        uvicorn.run("fashionlab.serve:app_from_env", factory=True, workers=settings.workers, **common)
    else:
        uvicorn.run(create_app(settings), **common)
