"""Turning user images into model input: PNG/JPEG files of any size and colour, or .npy arrays.

Fashion-MNIST images are light garments on a black background, trimmed to the object, with the
longest edge scaled to 28 pixels and centred. Product photos are the opposite (dark garment on
white, with margins), so preprocessing converts to grayscale, inverts a light background, crops
to the object, pads to a square and resizes: a photo then looks like the dataset image it shows.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

SIDE = 28
MAX_PIXELS = 40_000_000  # decoded size limit: refuses decompression bombs before decoding
WORKING_SIDE = 1024  # larger images are reduced to about this size before preprocessing


class ImageError(UserError):
    """An input that is not a usable image or array; the message says what was wrong."""


class ImageTooLargeError(ImageError):
    """An image whose decoded size is over the pixel limit (a service answers 413, not 400)."""


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])


def to_dataset_style(gray: np.ndarray) -> np.ndarray:
    """A 2-D uint8 image -> (28, 28) uint8 in the dataset's style (object light on black).

    A 28x28 image is taken as already in that style (only inverted if its background is light,
    stretched if faint), so dataset images pass through unchanged. Anything else is treated as a photo:
    background removed, cropped to the object, centred on a square, resized with antialiasing,
    and stretched so its brightest pixel is 255: every dataset image peaks at 254 or 255, and a
    coloured or grey garment would otherwise look faint (measured: benchmarks/photo_accuracy.py).
    """
    a = gray.astype(np.float32)
    background = float(np.median(_border(a)))
    if background > 127:  # light background (a photo): invert so the object is light
        a = 255.0 - a
        background = 255.0 - background
    if a.shape == (SIDE, SIDE):
        peak = float(a.max())
        if 0 < peak < 250:  # a faint (e.g. coloured) small image; dataset images peak at 254-255 and pass as they are
            a = a * (255.0 / peak)
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    a = np.clip(a - background, 0, None)
    peak = float(a.max())
    if peak <= 0:  # a blank image: nothing to crop or stretch
        return np.zeros((SIDE, SIDE), dtype=np.uint8)
    # Crop to what stands out from the background: a low threshold keeps faint garment edges,
    # an absolute floor ignores JPEG noise.
    mask = a > max(4.0, 0.04 * peak)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size and cols.size:
        a = a[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    h, w = a.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top: top + h, left: left + w] = a
    small = np.asarray(Image.fromarray(square, mode="F").resize((SIDE, SIDE), Image.LANCZOS), dtype=np.float32)
    small = np.clip(small, 0, None)
    top_value = float(small.max())
    if top_value > 0:
        small *= 255.0 / top_value
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def decode_image(blob: bytes, name: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """PNG/JPEG/... bytes -> 2-D uint8 grayscale (alpha composited over white)."""
    if not blob:
        raise ImageError(f"{name}: empty file (0 bytes); expected a PNG or JPEG image")
    try:
        img = Image.open(io.BytesIO(blob))
    except Image.DecompressionBombError as e:  # Pillow's own, larger limit: still a too-large image
        raise ImageTooLargeError(f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format; expected PNG, JPEG, BMP, GIF or WebP") from None
    except Exception as e:  # a damaged header can raise almost anything inside a format plugin
        raise ImageError(f"{name}: corrupt image header ({type(e).__name__}: {e})") from None
    return pil_to_gray(img, name, max_pixels)


def pil_to_gray(img: "Image.Image", name: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An opened (not yet decoded) or in-memory PIL image -> 2-D uint8 grayscale (alpha over white)."""
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{name}: image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
    if w < 1 or h < 1:
        raise ImageError(f"{name}: image is {w}x{h} pixels; expected at least 1x1")
    try:
        if img.format == "JPEG" and max(w, h) > 2 * WORKING_SIDE:
            img.draft("RGB" if img.mode == "RGB" else img.mode, (WORKING_SIDE, WORKING_SIDE))  # DCT-domain downscale
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba)
        if img.mode.startswith("I") or img.mode == "F":  # 16-bit or integer/float grey: Pillow's "L" would clip
            deep = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(deep / (257.0 if deep.max() > 255 else 1.0), 0, 255).astype(np.uint8), "L")
        img = img.convert("L")
        if max(img.size) > WORKING_SIDE:
            # The answer is 28x28: a large photo is box-reduced first, so preprocessing costs little.
            img = img.reduce(-(-max(img.size) // WORKING_SIDE))
        gray = np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: {e}") from None
    except Exception as e:  # OSError for truncation; plugins raise others (SyntaxError, ValueError, struct.error)
        raise ImageError(f"{name}: truncated or corrupt image ({type(e).__name__}: {e})") from None
    if gray.ndim != 2 or min(gray.shape) < 1:
        raise ImageError(f"{name}: decoded to shape {gray.shape}; expected a 2-D image")
    return gray


def array_to_images(arr: np.ndarray, name: str = "array") -> np.ndarray:
    """A (28, 28) or (N, 28, 28) array (uint8, or floats in [0, 1] or [0, 255]) -> (N, 28, 28) uint8."""
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
                                   or arr.dtype == bool):
        raise ImageError(f"{name}: array dtype {arr.dtype} is not numeric; expected uint8 or float pixels")
    given = arr.shape
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (SIDE, SIDE) or arr.shape[0] == 0:
        raise ImageError(f"{name}: array shape {given}; expected (28, 28) or (N, 28, 28) with N >= 1")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError(f"{name}: array holds NaN or infinite values")
        hi = float(arr.max()) if arr.size else 0.0
        if arr.min() < 0 or hi > 255:
            raise ImageError(f"{name}: float pixel values must lie in [0, 1] or [0, 255]; got [{arr.min()}, {hi}]")
        arr = arr * 255.0 if hi <= 1.0 else arr
        return np.rint(arr).astype(np.uint8)
    if arr.min() < 0 or arr.max() > 255:
        raise ImageError(f"{name}: integer pixel values must lie in [0, 255]; got [{arr.min()}, {arr.max()}]")
    return arr.astype(np.uint8)


def _npy_header(blob: bytes, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header, checked against the bytes present *before* loading:
    a header may claim any shape, and numpy allocates the whole array before reading it."""
    stream = io.BytesIO(blob)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    except Exception as e:  # bad magic, unparsable header dict, unsupported version
        raise ImageError(f"{name}: not a valid .npy array ({e})") from None
    if dtype.hasobject:
        raise ImageError(f"{name}: array dtype {dtype} holds Python objects; expected uint8 or float pixels")
    needed = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if needed > len(blob) - stream.tell():
        raise ImageError(f"{name}: .npy header claims shape {shape} of {dtype} ({needed:,} bytes) but only "
                         f"{len(blob) - stream.tell():,} bytes of data follow; truncated or corrupt")
    return shape, dtype


def decode_npy(blob: bytes, name: str = "array") -> np.ndarray:
    if not blob:
        raise ImageError(f"{name}: empty file (0 bytes); expected a .npy array")
    _npy_header(blob, name)
    try:
        arr = np.load(io.BytesIO(blob), allow_pickle=False)
    except Exception as e:  # ValueError, OSError, EOFError; never let a bad file escape as a crash
        raise ImageError(f"{name}: not a valid .npy array ({e})") from None
    return array_to_images(np.asarray(arr), name)


def load_images(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A file -> (N, 28, 28) uint8: .npy arrays as they are, images preprocessed to the dataset's style."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    blob = path.read_bytes()
    if path.suffix.lower() == ".npy":
        return decode_npy(blob, str(path))
    return to_dataset_style(decode_image(blob, str(path), max_pixels))[None]


def as_images(inputs, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """What a user holds -> (N, 28, 28) uint8 in the dataset's style: a file path (image or .npy), a
    PIL image, a numpy array ((28, 28) or (N, 28, 28); uint8 or floats), or a list of these."""
    if isinstance(inputs, (str, Path)):
        return load_images(inputs, max_pixels)
    if isinstance(inputs, Image.Image):
        return to_dataset_style(pil_to_gray(inputs, "PIL image", max_pixels))[None]
    if isinstance(inputs, np.ndarray):
        return array_to_images(inputs)
    if isinstance(inputs, (list, tuple)) and inputs:
        return np.concatenate([as_images(x, max_pixels) for x in inputs])
    raise ImageError(f"cannot classify a {type(inputs).__name__}: expected a file path, a PIL image, a uint8 "
                     f"array of shape (28, 28) or (N, 28, 28), or a non-empty list of these")


# --------------------------------------------------------------------------- photo-style renderings

PHOTO_STEPS = ("upscale", "invert", "margin", "rgb", "jpeg")


def render_photo_style(image: np.ndarray, steps=PHOTO_STEPS, scale: int = 8, margins=(0.15, 0.25, 0.1, 0.2),
                       colour=(0.55, 0.35, 0.25), jpeg_quality: int = 85) -> bytes:
    """A (28, 28) dataset image rendered the way a product photo looks: PNG or JPEG bytes.

    upscale: bicubic to 28*scale pixels; invert: dark garment on white; margin: background added
    around it (fractions of the side: top, right, bottom, left, deliberately uneven); rgb: the
    garment tinted with `colour`; jpeg: lossy encoding. This is what decode_image and
    to_dataset_style must undo; the photo-accuracy benchmark and the tests use it.
    """
    unknown = set(steps) - set(PHOTO_STEPS)
    if unknown:
        raise ValueError(f"unknown photo steps {sorted(unknown)}; known: {', '.join(PHOTO_STEPS)}")
    img = Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L")
    if "upscale" in steps:
        img = img.resize((SIDE * scale, SIDE * scale), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32) / 255.0  # garment intensity, 1 = most garment
    if "margin" in steps:
        h, w = a.shape
        top, right, bottom, left = (int(round(m * h)) for m in margins)
        a = np.pad(a, ((top, bottom), (left, right)))
    if "rgb" in steps:
        tint = np.asarray(colour, dtype=np.float32)
        # a garment of colour `tint` on a background: white if inverted, black otherwise
        rgb = (1 - a[..., None] * (1 - tint)) if "invert" in steps else a[..., None] * tint
        out = Image.fromarray(np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    else:
        out = Image.fromarray(np.clip(((1 - a) if "invert" in steps else a) * 255 + 0.5, 0, 255).astype(np.uint8),
                              mode="L")
    buf = io.BytesIO()
    if "jpeg" in steps:
        out.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        out.save(buf, format="PNG")
    return buf.getvalue()


def preprocess_blob(blob: bytes, name: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Image bytes -> (28, 28) uint8 in the dataset's style (what the service and `predict` do)."""
    return to_dataset_style(decode_image(blob, name, max_pixels))
