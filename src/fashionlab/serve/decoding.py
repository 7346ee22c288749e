"""Request bodies -> (N, 28, 28) uint8 images, and the client errors they can raise.

Accepted: image bytes (PNG, JPEG, ...), .npy arrays, JSON (base64 images or nested pixel arrays)
and multipart forms with one or more `file` fields. images.py does the decoding proper.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request

from .. import images
from .settings import Settings

NPY_MAGIC = b"\x93NUMPY"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp", "image/tiff")
NPY_TYPES = ("application/x-npy", "application/npy")
ACCEPTED_TYPES = ("application/json", *NPY_TYPES, "multipart/form-data", "application/octet-stream", *IMAGE_TYPES)


class ClientError(Exception):
    """A request the client got wrong: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def image_error_status(e: images.ImageError) -> int:
    return 413 if isinstance(e, images.ImageTooLargeError) else 400


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def decode_blob(blob: bytes, name: str, max_pixels: int, media_type: str = "") -> np.ndarray:
    """Image or .npy bytes -> (N, 28, 28) uint8, images preprocessed to the dataset's style."""
    if media_type in NPY_TYPES or blob[:6] == NPY_MAGIC or name.lower().endswith(".npy"):
        return images.decode_npy(blob, name)
    return images.to_dataset_style(images.decode_image(blob, name, max_pixels))[None]


async def read_batch(request: Request, settings: Settings) -> tuple[np.ndarray, Any]:
    """Any accepted request body -> ((N, 28, 28) uint8 images, top_k given in the body or None)."""
    media = media_type(request)
    if media == "multipart/form-data":
        return await _read_multipart(request, settings)
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


async def _read_multipart(request: Request, settings: Settings) -> tuple[np.ndarray, Any]:
    """A multipart form: every `file` field decoded, and its `top_k` field (or None)."""
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
    batch = await run_in_threadpool(_decode_parts, parts, settings.max_pixels)
    return batch, form.get("top_k")


def _decode_parts(parts: list[tuple[bytes, str, str]], max_pixels: int) -> np.ndarray:
    return np.concatenate([decode_blob(blob, name, max_pixels, kind) for blob, name, kind in parts])


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


def _nested_array(value: Any, field: str) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise ClientError(400, f"JSON field {field}: not a rectangular array of numbers ({e})") from None
    if arr.dtype.kind not in "biuf":
        raise ClientError(400, f"JSON field {field}: expected numbers (pixels) in a (28, 28) or (N, 28, 28) array; "
                               f"got array of {arr.dtype} with shape {arr.shape}")
    return images.array_to_images(arr, f"JSON field {field}")


def parse_top_k(query: int | None, body: Any, settings: Settings, classes: int) -> int:
    """How many classes to return per image: the query's top_k, else the body's, else the default."""
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
