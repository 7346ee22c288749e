"""The Open Inference protocol (KServe v2) for one image classifier: its routes, its metadata, and the
request and response codec, JSON and the binary tensor extension that stock clients (tritonclient)
use by default.

One input, "input": UINT8 pixels (or FP32 in [0, 1]) of shape [N, 28, 28] or [N, 1, 28, 28].
Outputs: "probabilities" FP32 [N, classes], "class_index" INT64 [N], "label" BYTES [N], and where the
model has an out-of-distribution detector, "ood_score" FP32 [N] and "unsure" BOOL [N] (the score is
above the model's threshold: probably not a garment). Every model route is also served under /versions/1.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Path as PathParam, Request
from fastapi.responses import Response

from .. import __version__, images
from ..errors import UserError
from .decoding import ClientError, brief, json_numbers, json_type, load_json, read_body
from .routing import bind
from .service import ModelService
from .settings import Settings


class InferenceRequestError(UserError):
    """A malformed inference request (answered 400, with this message)."""


# The numeric types the input may have; not BOOL (true/false are not pixel values) nor BYTES.
DTYPES = {"UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "INT8": np.int8,
          "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16, "FP32": np.float32,
          "FP64": np.float64}
OUTPUTS = ("probabilities", "class_index", "label")
OOD_OUTPUTS = ("ood_score", "unsure")  # only where the model has an out-of-distribution detector

# The documented {name} path parameter; router() replaces it with one whose example is the served name.
MODEL_NAME = PathParam(description="the served model's name")


# --------------------------------------------------------------------------- the protocol

def outputs_of(service: ModelService) -> tuple[str, ...]:
    """The outputs the served model gives: the out-of-distribution ones only with a detector."""
    return OUTPUTS + (OOD_OUTPUTS if service.predictor.ood is not None else ())


def metadata(name: str, platform: str, class_names: list[str], outputs: tuple[str, ...] = OUTPUTS,
             ood: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET /v2/models/{name}: the model's one input and its outputs (`ood`: the detector's status)."""
    n = len(class_names)
    specs = {"probabilities": {"datatype": "FP32", "shape": [-1, n]},
             "class_index": {"datatype": "INT64", "shape": [-1]}, "label": {"datatype": "BYTES", "shape": [-1]},
             "ood_score": {"datatype": "FP32", "shape": [-1]}, "unsure": {"datatype": "BOOL", "shape": [-1]}}
    return {
        "name": name, "versions": ["1"], "platform": platform,
        "inputs": [{"name": "input", "datatype": "UINT8", "shape": [-1, 28, 28]}],
        "outputs": [{"name": output, **specs[output]} for output in outputs],
        "parameters": {"class_names": class_names,
                       "input_note": "UINT8 pixels (or FP32 in [0, 1]) of shape [N, 28, 28] or [N, 1, 28, 28], "
                                     "object light on black as in the dataset",
                       **({"ood": ood} if ood is not None else {})},
    }


def decode_request(body: bytes | bytearray, header_length: str | None, outputs: tuple[str, ...] = OUTPUTS
                   ) -> tuple[dict[str, Any], np.ndarray]:
    """An inference request (JSON, or JSON + binary tensors) -> (request JSON, (N, 28, 28) uint8).
    Every field is checked (check_request, against the model's `outputs`) before anything is decoded or run."""
    json_part, binary = _split_body(body, header_length)
    if not json_part:
        raise InferenceRequestError("empty inference request; expected JSON with an 'inputs' list")
    req = load_json(json_part, "inference request")
    check_request(req, outputs)
    tensor = req["inputs"][0]
    arr = _tensor_values(tensor, binary)
    if arr.ndim == 4 and arr.shape[1] == 1:  # (N, 1, 28, 28): the model's own layout
        arr = arr[:, 0]
    return req, images.array_to_images(arr, f"inputs[0] ({tensor['datatype']} {list(tensor['shape'])})")


def check_request(req: Any, outputs: tuple[str, ...] = OUTPUTS) -> None:
    """Every field the protocol defines has its type (and the values this model can take: `outputs` are
    the ones it gives), or a 400 names the field: the request is refused before any work, never halfway
    through the answer."""
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or len(req["inputs"]) != 1:
        raise InferenceRequestError("inference request: expected {'inputs': [one tensor named 'input']}")
    _optional(req, "id", str, "id", "a string")  # echoed in the answer: never NaN or a deep structure
    params = _optional(req, "parameters", dict, "parameters", "an object")
    _optional(params, "binary_data_output", bool, "parameters.binary_data_output", "true or false")
    _check_input(req["inputs"][0])
    for i, spec in enumerate(_optional(req, "outputs", list, "outputs", "a list of objects") or ()):
        _check_output(i, spec, outputs)


def _check_input(tensor: Any) -> None:
    if not isinstance(tensor, dict):
        raise InferenceRequestError("inputs[0]: expected an object with name, shape, datatype and data; "
                                    f"got {json_type(tensor)}")
    _optional(tensor, "name", str, "inputs[0].name", "a string")
    dtype_name, shape = tensor.get("datatype"), tensor.get("shape")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise InferenceRequestError(f"inputs[0].datatype {brief(dtype_name)}: expected one of {', '.join(DTYPES)} "
                                    "(UINT8 pixels, or FP32 in [0, 1])")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InferenceRequestError(f"inputs[0].shape {brief(shape)}: expected a list of non-negative integers")
    if len(shape) > 4:
        raise InferenceRequestError(f"inputs[0].shape {brief(shape)}: expected [N, 28, 28] or [N, 1, 28, 28]")
    params = _optional(tensor, "parameters", dict, "inputs[0].parameters", "an object")
    size = _optional(params, "binary_data_size", int, "inputs[0].parameters.binary_data_size",
                     "a non-negative integer")
    if size is not None and size < 0:
        raise InferenceRequestError(f"inputs[0].parameters.binary_data_size {size}: expected a non-negative integer")


def _check_output(i: int, spec: Any, outputs: tuple[str, ...]) -> None:
    if not isinstance(spec, dict):
        raise InferenceRequestError(f"outputs[{i}]: expected an object with a 'name'; got {json_type(spec)}")
    name = spec.get("name")
    if not isinstance(name, str) or name not in outputs:
        missing = (" (it has no out-of-distribution detector: see GET /v1/model)"
                   if name in OOD_OUTPUTS else "")
        raise InferenceRequestError(f"outputs[{i}].name: requested output {brief(name)}: this model has "
                                    f"outputs {', '.join(outputs)}{missing}")
    params = _optional(spec, "parameters", dict, f"outputs[{i}].parameters", "an object")
    _optional(params, "binary_data", bool, f"outputs[{i}].parameters.binary_data", "true or false")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(obj: dict[str, Any] | None, key: str, kind: type, field: str, expected: str) -> Any:
    """obj[key] when it has type `kind` (booleans are not integers), None when absent or null;
    anything else is a 400 naming `field`."""
    value = (obj or {}).get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InferenceRequestError(f"{field}: expected {expected}; got {json_type(value)} {brief(value, 40)}")
    return value


def _split_body(body: bytes | bytearray, header_length: str | None) -> tuple[bytes | bytearray, memoryview]:
    """(JSON part, binary tensors): Inference-Header-Content-Length, when given, says where JSON ends.
    The binary part is a view of the body, not a copy."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise InferenceRequestError(
            f"Inference-Header-Content-Length: expected an integer; got {brief(header_length)}") from None
    if not 0 < n <= len(body):
        raise InferenceRequestError(f"Inference-Header-Content-Length {n}: outside the body's {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:n]), view[n:]


def _tensor_values(tensor: dict[str, Any], binary: memoryview) -> np.ndarray:
    """The input tensor's values, from the binary part (binary_data_size) or its JSON `data`, in its shape.
    The shape's size is an exact integer compared with what was sent, so no shape can ask for more."""
    dtype_name, shape = tensor["datatype"], tensor["shape"]
    dtype = np.dtype(DTYPES[dtype_name])
    count = math.prod(shape)
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size > len(binary):
            raise InferenceRequestError(
                f"inputs[0].parameters.binary_data_size {brief(size)}: only {len(binary):,} binary bytes follow")
        if size != count * dtype.itemsize:
            raise InferenceRequestError(f"inputs[0]: {size} binary bytes do not hold shape {brief(shape)} of "
                                        f"{dtype_name} ({brief(count * dtype.itemsize)} bytes)")
        return np.frombuffer(binary[:size], dtype=dtype).reshape(shape)
    if "data" not in tensor:
        raise InferenceRequestError("inputs[0]: no 'data' and no binary_data_size parameter")
    values = json_numbers(tensor["data"], "inputs[0].data", integers=dtype.kind in "iu")
    if values.size != count:
        raise InferenceRequestError(f"inputs[0]: {values.size} values do not fill shape {brief(shape)}")
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        low, high = int(values.min()), int(values.max())
        if low < info.min or high > info.max:
            raise InferenceRequestError(f"inputs[0].data: values from {low} to {high} do not fit {dtype_name}")
    with np.errstate(over="ignore"):  # a float too large for FP16/FP32 becomes infinite: refused as such later
        return values.astype(dtype).reshape(shape)


def encode_response(model_name: str, class_names: list[str], req: dict[str, Any], probs: np.ndarray,
                    scores: np.ndarray | None = None, unsure: np.ndarray | None = None) -> tuple[bytes, dict[str, str]]:
    """Outputs as JSON, or as JSON + binary tensors where the request asked for binary data; every output
    when the request names none. `scores` and `unsure`: the out-of-distribution outputs (None where the
    model has no detector). `req` has passed check_request."""
    idx = probs.argmax(1).astype(np.int64)
    labels = [class_names[i] for i in idx]
    tensors = {"probabilities": ("FP32", list(probs.shape), probs.astype(np.float32)),
               "class_index": ("INT64", [len(idx)], idx), "label": ("BYTES", [len(idx)], labels)}
    if scores is not None and unsure is not None:
        tensors.update(ood_score=("FP32", [len(idx)], scores.astype(np.float32)),
                       unsure=("BOOL", [len(idx)], unsure.astype(bool)))
    wanted = req.get("outputs") or [{"name": n} for n in tensors]
    binary_default = bool((req.get("parameters") or {}).get("binary_data_output", False))
    outputs, chunks = [], []
    for spec in wanted:
        output = spec["name"]
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
    header = json.dumps(doc, allow_nan=False).encode()  # never a bare NaN token: the service checked the outputs
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


async def v2_ready(service: ModelService):
    await service.require_ready()
    return {"ready": True}


async def v2_model(service: ModelService, settings: Settings, name: str = MODEL_NAME, version: str | None = None):
    known(settings, name, version)
    return metadata(settings.model_name, service.platform, service.class_names, outputs_of(service),
                    service.predictor.ood_status())


async def v2_model_ready(service: ModelService, settings: Settings, name: str = MODEL_NAME,
                         version: str | None = None):
    known(settings, name, version)
    await service.require_ready()
    return {"name": name, "ready": True}


async def v2_infer(service: ModelService, settings: Settings, request: Request, name: str = MODEL_NAME,
                   version: str | None = None):
    known(settings, name, version)
    body = await read_body(request)
    req, batch = await service.work(decode_request, body, request.headers.get("inference-header-content-length"),
                                    outputs_of(service))
    probs, scores = await service.work(service.infer, batch)
    detector = service.predictor.ood
    content, headers = encode_response(settings.model_name, service.class_names, req, probs,
                                       *((scores, detector.unsure(scores)) if detector is not None else ()))
    return Response(content, headers=headers, media_type=headers["content-type"])


def router(service: ModelService, settings: Settings) -> APIRouter:
    name = PathParam(description=MODEL_NAME.description, examples=[settings.model_name])
    model = bind(v2_model, service, settings, name=name)
    ready = bind(v2_model_ready, service, settings, name=name)
    infer = bind(v2_infer, service, settings, name=name)
    r = APIRouter()
    r.add_api_route("/v2", v2_server, methods=["GET"], summary="Open Inference server metadata")
    r.add_api_route("/v2/health/live", v2_live, methods=["GET"])
    r.add_api_route("/v2/health/ready", bind(v2_ready, service), methods=["GET"])
    for suffix, endpoint, method, extra in (("", model, "GET", None), ("/ready", ready, "GET", None),
                                            ("/infer", infer, "POST", V2_BODY)):
        for prefix in ("/v2/models/{name}/versions/{version}", "/v2/models/{name}"):
            r.add_api_route(prefix + suffix, endpoint, methods=[method], openapi_extra=extra)
    return r
