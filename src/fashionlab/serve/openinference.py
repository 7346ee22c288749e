"""The Open Inference protocol (KServe v2) for one image classifier: its routes, its metadata, and the
request and response codec, JSON and the binary tensor extension that stock clients (tritonclient)
use by default.

One input, "input": UINT8 pixels (or FP32 in [0, 1]) of shape [N, 28, 28] or [N, 1, 28, 28].
Three outputs: "probabilities" FP32 [N, classes], "class_index" INT64 [N], "label" BYTES [N].
Every model route is also served under /versions/1.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Path as PathParam, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from .. import __version__, images
from ..errors import UserError
from .decoding import ClientError
from .routing import bind
from .service import ModelService
from .settings import Settings


class InferenceRequestError(UserError):
    """A malformed inference request (answered 400, with this message)."""


DTYPES = {"UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "INT8": np.int8,
          "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16, "FP32": np.float32,
          "FP64": np.float64, "BOOL": np.bool_}
OUTPUTS = ("probabilities", "class_index", "label")

# The documented {name} path parameter; router() replaces it with one whose example is the served name.
MODEL_NAME = PathParam(description="the served model's name")


# --------------------------------------------------------------------------- the protocol

def metadata(name: str, platform: str, class_names: list[str]) -> dict[str, Any]:
    """GET /v2/models/{name}: the model's one input and three outputs."""
    n = len(class_names)
    return {
        "name": name, "versions": ["1"], "platform": platform,
        "inputs": [{"name": "input", "datatype": "UINT8", "shape": [-1, 28, 28]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, n]},
                    {"name": "class_index", "datatype": "INT64", "shape": [-1]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}],
        "parameters": {"class_names": class_names,
                       "input_note": "UINT8 pixels (or FP32 in [0, 1]) of shape [N, 28, 28] or [N, 1, 28, 28], "
                                     "object light on black as in the dataset"},
    }


def decode_request(body: bytes, header_length: str | None) -> tuple[dict[str, Any], np.ndarray]:
    """An inference request (JSON, or JSON + binary tensors) -> (request JSON, (N, 28, 28) uint8)."""
    json_part, binary = _split_body(body, header_length)
    if not json_part:
        raise InferenceRequestError("empty inference request; expected JSON with an 'inputs' list")
    try:
        req = json.loads(json_part)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InferenceRequestError(f"malformed JSON inference request ({e})") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or len(req["inputs"]) != 1:
        raise InferenceRequestError("inference request: expected {'inputs': [one tensor named 'input']}")
    tensor = req["inputs"][0]
    if not isinstance(tensor, dict):
        raise InferenceRequestError("inputs[0]: expected an object with name, shape, datatype and data")
    dtype_name, shape = tensor.get("datatype"), tensor.get("shape")
    if dtype_name not in DTYPES:
        raise InferenceRequestError(f"inputs[0].datatype {dtype_name!r}: expected one of {', '.join(DTYPES)} "
                                    "(UINT8 pixels, or FP32 in [0, 1])")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InferenceRequestError(f"inputs[0].shape {shape!r}: expected a list of non-negative integers")
    arr = _tensor_values(tensor, dtype_name, shape, binary)
    if arr.ndim == 4 and arr.shape[1] == 1:  # (N, 1, 28, 28): the model's own layout
        arr = arr[:, 0]
    return req, images.array_to_images(arr, f"inputs[0] ({dtype_name} {list(shape)})")


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary tensors): Inference-Header-Content-Length, when given, says where JSON ends."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise InferenceRequestError(
            f"Inference-Header-Content-Length: expected an integer; got {header_length!r}") from None
    if not 0 < n <= len(body):
        raise InferenceRequestError(f"Inference-Header-Content-Length {n}: outside the body's {len(body)} bytes")
    return body[:n], body[n:]


def _tensor_values(tensor: dict[str, Any], dtype_name: str, shape: list[int], binary: bytes) -> np.ndarray:
    """The input tensor's values, from the binary part (binary_data_size) or its JSON `data`, in `shape`."""
    dtype = np.dtype(DTYPES[dtype_name])
    count = int(np.prod(shape, dtype=np.float64))
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    try:
        if size is not None:
            if not isinstance(size, int) or size < 0 or size > len(binary):
                raise InferenceRequestError(
                    f"inputs[0].parameters.binary_data_size {size!r}: only {len(binary)} binary bytes follow")
            if size != count * dtype.itemsize:
                raise InferenceRequestError(f"inputs[0]: {size} binary bytes do not hold shape {shape} of "
                                            f"{dtype_name} ({count * dtype.itemsize} bytes)")
            return np.frombuffer(binary[:size], dtype=dtype).reshape(shape)
        if "data" not in tensor:
            raise InferenceRequestError("inputs[0]: no 'data' and no binary_data_size parameter")
        arr = np.asarray(tensor["data"], dtype=dtype)
        if arr.size != count:
            raise InferenceRequestError(f"inputs[0]: {arr.size} values do not fill shape {shape}")
        return arr.reshape(shape)
    except InferenceRequestError:
        raise
    except (ValueError, TypeError, OverflowError) as e:
        raise InferenceRequestError(f"inputs[0].data: not {dtype_name} values of shape {shape} ({e})") from None


def encode_response(model_name: str, class_names: list[str], req: dict[str, Any], probs: np.ndarray
                    ) -> tuple[bytes, dict[str, str]]:
    """Outputs as JSON, or as JSON + binary tensors where the request asked for binary data."""
    idx = probs.argmax(1).astype(np.int64)
    labels = [class_names[i] for i in idx]
    tensors = {"probabilities": ("FP32", list(probs.shape), probs.astype(np.float32)),
               "class_index": ("INT64", [len(idx)], idx), "label": ("BYTES", [len(idx)], labels)}
    wanted = req.get("outputs") or [{"name": n} for n in OUTPUTS]
    binary_default = bool((req.get("parameters") or {}).get("binary_data_output", False))
    outputs, chunks = [], []
    for spec in wanted:
        output = spec.get("name") if isinstance(spec, dict) else None
        if output not in tensors:
            raise InferenceRequestError(f"requested output {output!r}: this model has outputs {', '.join(OUTPUTS)}")
        dtype, shape, value = tensors[output]
        as_binary = bool((spec.get("parameters") or {}).get("binary_data", binary_default))
        entry: dict[str, Any] = {"name": output, "datatype": dtype, "shape": shape}
        if as_binary:
            raw = (b"".join(len(s.encode()).to_bytes(4, "little") + s.encode() for s in value) if dtype == "BYTES"
                   else np.ascontiguousarray(value).tobytes())
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = value if dtype == "BYTES" else value.ravel().tolist()
        outputs.append(entry)
    doc = {"model_name": model_name, "model_version": "1", "outputs": outputs}
    if "id" in req:
        doc["id"] = req["id"]
    header = json.dumps(doc).encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {"content-type": "application/octet-stream",
                                       "inference-header-content-length": str(len(header))}


# --------------------------------------------------------------------------- the routes

V2_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "data": {"type": "array", "items": {"type": "number"}}}}},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}}}}}}}}


def known(settings: Settings, name: str, version: str | None = None) -> None:
    """404 unless `name` (and `version`, when given) is the served model."""
    if name != settings.model_name:
        raise ClientError(404, f"model {name!r} not found; this server serves {settings.model_name!r}")
    if version is not None and version != "1":
        raise ClientError(404, f"model {name!r} has no version {version!r}; it has version '1'")


async def v2_server():
    return {"name": "fashionlab", "version": __version__, "extensions": ["binary_tensor_data"]}


async def v2_live():
    return {"live": True}


async def v2_ready():
    return {"ready": True}


async def v2_model(service: ModelService, settings: Settings, name: str = MODEL_NAME, version: str | None = None):
    known(settings, name, version)
    return metadata(settings.model_name, service.platform, service.class_names)


async def v2_model_ready(settings: Settings, name: str = MODEL_NAME, version: str | None = None):
    known(settings, name, version)
    return {"name": name, "ready": True}


async def v2_infer(service: ModelService, settings: Settings, request: Request, name: str = MODEL_NAME,
                   version: str | None = None):
    known(settings, name, version)
    body = await request.body()
    req, batch = await run_in_threadpool(decode_request, body, request.headers.get("inference-header-content-length"))
    probs = await run_in_threadpool(service.probabilities, batch)
    content, headers = encode_response(settings.model_name, service.class_names, req, probs)
    return Response(content, headers=headers, media_type=headers["content-type"])


def router(service: ModelService, settings: Settings) -> APIRouter:
    name = PathParam(description=MODEL_NAME.description, examples=[settings.model_name])
    model = bind(v2_model, service, settings, name=name)
    ready = bind(v2_model_ready, settings, name=name)
    infer = bind(v2_infer, service, settings, name=name)
    r = APIRouter()
    r.add_api_route("/v2", v2_server, methods=["GET"], summary="Open Inference server metadata")
    r.add_api_route("/v2/health/live", v2_live, methods=["GET"])
    r.add_api_route("/v2/health/ready", v2_ready, methods=["GET"])
    for suffix, endpoint, method, extra in (("", model, "GET", None), ("/ready", ready, "GET", None),
                                            ("/infer", infer, "POST", V2_BODY)):
        for prefix in ("/v2/models/{name}/versions/{version}", "/v2/models/{name}"):
            r.add_api_route(prefix + suffix, endpoint, methods=[method], openapi_extra=extra)
    return r
