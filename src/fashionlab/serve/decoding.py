"""Request bodies -> (N, 28, 28) uint8 images, and the client errors they can raise.

Accepted: image bytes (PNG, JPEG, GIF, WebP, BMP, TIFF), .npy arrays, JSON (base64 images or nested
pixel arrays) and multipart forms with one or more `file` fields. images.py does the decoding proper.

What a request may cost is bounded before it is spent: the body's size (the request guard), the
pixels and bytes its images decode to (a DecodeBudget charged from every image's header before any
is decoded), and how many requests decode at once (ModelService.work). Every field of a wrong type is
a 400 that names it; JSON of any depth or with non-finite numbers is refused cleanly.

Small requests (the common one: a single 28x28 image) are decoded on the event loop, where that costs
less than handing them to a work thread and back; anything larger, or whose headers say it decodes
large, takes a work slot.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request

from .. import images
from ..images import brief
from .service import ModelService
from .settings import Settings

NPY_MAGIC = b"\x93NUMPY"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp", "image/tiff")
NPY_TYPES = ("application/x-npy", "application/npy")
ACCEPTED_TYPES = ("application/json", *NPY_TYPES, "multipart/form-data", "application/octet-stream", *IMAGE_TYPES)

# Bodies up to this size are parsed and their headers read on the event loop, and decoded there too when
# their images decode to at most INLINE_DECODED_BYTES (a 28x28 grey image is 784 bytes): a hop to a work
# thread and back costs more than that (docs/deploy.md, "Batching").
INLINE_BODY_BYTES = 16 * 1024
INLINE_DECODED_BYTES = 64 * 1024


class ClientError(Exception):
    """A request the client got wrong: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def image_error_status(e: images.ImageError) -> int:
    if isinstance(e, images.ImageTooLargeError):
        return 413
    return 415 if isinstance(e, images.UnsupportedFormatError) else 400


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


# --------------------------------------------------------------------------- JSON, strictly

JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
              float: "a number", type(None): "null"}


def json_type(value: Any) -> str:
    return type_name(type(value))


def type_name(kind: type) -> str:
    return JSON_TYPES.get(kind, kind.__name__)


def load_json(text: bytes | bytearray, what: str) -> Any:
    """Parsed JSON, or a 400 naming what was wrong: malformed, nested too deeply, an integer too long."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ClientError(400, f"malformed JSON {what}: nested too deeply (a request needs a few levels)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and integers of over 4,300 digits
        raise ClientError(400, f"malformed JSON {what} ({brief(str(e), 200)})") from None


def json_numbers(value: Any, field: str, integers: bool = False) -> np.ndarray:
    """A JSON array of numbers (nested lists, rectangular) -> an int64 or float64 array. Booleans,
    strings, nulls, objects and ragged rows are refused: numpy would quietly take true as 1 and "7" as 7."""
    if not isinstance(value, list):
        raise ClientError(400, f"{field}: expected an array of numbers; got {json_type(value)}")
    try:
        cells = np.array(value, dtype=object)  # stops at numpy's 64 dimensions: deeper lists stay cells
    except (ValueError, TypeError) as e:
        raise ClientError(400, f"{field}: not a rectangular array of numbers ({e})") from None
    kinds = set(map(type, cells.ravel())) if cells.ndim <= 4 else {list}  # an image batch has at most 4
    wrong = kinds - ({int} if integers else {int, float})
    if list in wrong:
        raise ClientError(400, f"{field}: not a rectangular array of numbers (rows of different lengths, "
                               "or nested more deeply than an image batch)")
    if wrong:
        found = ", ".join(sorted("a number with a fraction" if k is float else type_name(k) for k in wrong))
        raise ClientError(400, f"{field}: expected {'integers' if integers else 'numbers'} (pixel values); "
                               f"found {found}")
    try:
        return cells.astype(np.float64 if float in kinds else np.int64)
    except OverflowError:
        raise ClientError(400, f"{field}: holds a number too large for a pixel value") from None


# --------------------------------------------------------------------------- bodies

async def read_body(request: Request) -> bytearray:
    """The whole body. Grown in place (bytearray), not joined from chunks at the end, so a large body
    is held once, not twice, while 32 connections send theirs."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


def decode_blob(blob: bytes, name: str, max_pixels: int, media_type: str = "") -> np.ndarray:
    """Image or .npy bytes -> (N, 28, 28) uint8, images preprocessed to the dataset's style."""
    return _open_blob(blob, name, max_pixels, media_type, None)()


@dataclass
class Opened:
    """A request's images, checked and charged to its budget from their headers, not yet decoded."""

    decoded_bytes: int  # what decoding them will hold (the budget's charge)
    pending: list[Callable[[], np.ndarray]]

    def decode(self) -> np.ndarray:
        return np.concatenate([finish() for finish in self.pending])


def open_blobs(parts: list[tuple[bytes, str, str]], settings: Settings) -> Opened:
    """(bytes, name, media type) parts of one request, every header read and charged to the request's
    budget: a request over it is refused here, before anything is decoded."""
    budget = images.DecodeBudget(settings.max_request_pixels, settings.max_decoded_bytes)
    pending = [_open_blob(blob, name, settings.max_pixels, kind, budget) for blob, name, kind in parts]
    return Opened(budget.bytes, pending)


def decode_blobs(parts: list[tuple[bytes, str, str]], settings: Settings) -> np.ndarray:
    """(bytes, name, media type) parts of one request -> (N, 28, 28) uint8 (open_blobs, then decoded)."""
    return open_blobs(parts, settings).decode()


def _open_blob(blob: bytes, name: str, max_pixels: int, media_type: str,
               budget: images.DecodeBudget | None) -> Callable[[], np.ndarray]:
    """Checks `blob`'s header (and charges it) now; the returned function decodes it."""
    if media_type in NPY_TYPES or blob[:6] == NPY_MAGIC or name.lower().endswith(".npy"):
        arr = images.decode_npy(blob, name, budget)  # no larger than the body: loaded at once
        return lambda: arr
    img = images.open_image(blob, name, max_pixels, budget)
    return lambda: images.to_dataset_style(images.pil_to_gray(img, name, max_pixels))[None]


async def read_batch(request: Request, service: ModelService) -> tuple[np.ndarray, Any]:
    """Any accepted request body -> ((N, 28, 28) uint8 images, top_k given in the body or None).
    The decoding runs in one of the service's work slots."""
    settings = service.settings
    media = media_type(request)
    if media == "multipart/form-data":
        return await _read_multipart(request, service)
    body = await read_body(request)
    if not body:
        raise ClientError(400, "empty request body; send an image, a .npy array or JSON "
                               f"(content types: {', '.join(ACCEPTED_TYPES[:4])}, image/png, image/jpeg)")
    if media == "application/json" or media.endswith("+json"):
        return await _decoded(service, len(body), functools.partial(_open_json, body, settings))
    if media in NPY_TYPES or media in IMAGE_TYPES or media in ("", "application/octet-stream"):
        part = (body, "request body (.npy)" if media in NPY_TYPES else "request body", media)
        return await _decoded(service, len(body), lambda: (open_blobs([part], settings), None))
    raise ClientError(415, f"content type {media!r} is not accepted; use one of {', '.join(ACCEPTED_TYPES)}")


async def _decoded(service: ModelService, body_bytes: int, open_request: Callable[[], tuple[Opened, Any]]
                   ) -> tuple[np.ndarray, Any]:
    """open_request()'s images decoded, and its top_k: on the event loop when small, else in a work slot."""
    if body_bytes > INLINE_BODY_BYTES:
        return await service.work(_open_and_decode, open_request)
    opened, top_k = open_request()
    if opened.decoded_bytes <= INLINE_DECODED_BYTES:
        return opened.decode(), top_k
    return await service.work(opened.decode), top_k


def _open_and_decode(open_request: Callable[[], tuple[Opened, Any]]) -> tuple[np.ndarray, Any]:
    opened, top_k = open_request()
    return opened.decode(), top_k


async def _read_multipart(request: Request, service: ModelService) -> tuple[np.ndarray, Any]:
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
    top_k = form.get("top_k")
    if isinstance(top_k, UploadFile):
        raise ClientError(400, "top_k: expected a positive integer; got a file")
    files = [(f.file, f.filename or f"file[{i}]", (f.content_type or "").lower()) for i, f in uploads]
    return await service.work(_decode_files, files, service.settings), top_k


def _decode_files(files: list[tuple[Any, str, str]], settings: Settings) -> np.ndarray:
    """The form's files, read here in the work slot (large ones wait on disk until then)."""
    parts = []
    for file, name, kind in files:
        blob = file.read()
        if not blob:
            raise ClientError(400, f"{name}: empty file (0 bytes); expected {images.ACCEPTED_TEXT}")
        parts.append((blob, name, kind))
    return decode_blobs(parts, settings)


def _open_json(body: bytearray, settings: Settings) -> tuple[Opened, Any]:
    """{"image": b64} | {"images": [b64, ...]} | {"instances": [...]} | {"array": nested list} | [...]:
    the images opened (pixel arrays are converted here), and the body's top_k."""
    doc = load_json(body, "body")
    if isinstance(doc, list):
        doc = {"instances": doc}
    if not isinstance(doc, dict):
        raise ClientError(400, f"JSON body: expected an object with 'image', 'images', 'instances' or 'array'; "
                               f"got {json_type(doc)}")
    top_k = doc.get("top_k")
    if "image" in doc:
        return open_blobs([(_b64(doc["image"], "image"), "image", "")], settings), top_k
    if "array" in doc:
        return _pixel_arrays(doc["array"], "array"), top_k
    key = "images" if "images" in doc else "instances" if "instances" in doc else None
    if key is None:
        raise ClientError(400, "JSON body: no 'image' (base64), 'images' (list of base64), 'instances' or "
                               f"'array' (pixel arrays) field; got fields {[brief(k, 40) for k in sorted(doc)[:10]]}")
    items = doc[key]
    if not isinstance(items, list) or not items:
        raise ClientError(400, f"JSON field {key}: expected a non-empty list; got {json_type(items)}")
    if all(isinstance(x, (str, dict)) for x in items):
        parts = [(_b64(x, f"{key}[{i}]"), f"{key}[{i}]", "") for i, x in enumerate(items)]
        return open_blobs(parts, settings), top_k
    return _pixel_arrays(items, key), top_k


def _b64(text: Any, field: str) -> bytes:
    if isinstance(text, dict) and "b64" in text:  # TensorFlow Serving's convention {"b64": "..."}
        text = text["b64"]
    if not isinstance(text, str):
        raise ClientError(400, f"JSON field {field}: expected a base64 string; got {json_type(text)}")
    if text.startswith("data:") and "," in text:  # a data URL from a browser
        text = text.split(",", 1)[1]
    try:
        blob = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ClientError(400, f"JSON field {field}: not valid base64 ({e})") from None
    if not blob:
        raise ClientError(400, f"JSON field {field}: empty after base64 decoding; expected image or .npy bytes")
    return blob


def _pixel_arrays(value: Any, field: str) -> Opened:
    arr = images.array_to_images(json_numbers(value, f"JSON field {field}"), f"JSON field {field}")
    return Opened(arr.nbytes, [lambda: arr])


def parse_top_k(query: int | None, body: Any, settings: Settings, classes: int) -> int:
    """How many classes to return per image: the query's top_k, else the body's, else the default."""
    value = query if query is not None else body
    if value is None:
        return min(settings.default_top_k, classes)
    k = _positive_int(value)
    if k is None:
        raise ClientError(400, f"top_k: expected a positive integer; got {brief(value)}")
    return min(k, classes)


def _positive_int(value: Any) -> int | None:
    """An integer >= 1 from JSON (3, 3.0) or a form field ("3"); None for anything else, booleans,
    NaN and infinity included."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:  # not digits, or over 4,300 of them
            return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None
