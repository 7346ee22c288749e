"""Turning user images into model input: PNG, JPEG, GIF, WebP, BMP or TIFF files of any size and
colour, or .npy arrays.

Fashion-MNIST images are light garments on a black background, trimmed to the object, with the
longest edge scaled to 28 pixels and centred. Product photos are the opposite (dark garment on
white, with margins), so preprocessing converts to grayscale, inverts a light background, crops
to the object, pads to a square and resizes: a photo then looks like the dataset image it shows.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from .errors import UserError

SIDE = 28
MAX_PIXELS = 40_000_000  # decoded size limit: refuses decompression bombs before decoding
WORKING_SIDE = 1024  # larger images are reduced to about this size before preprocessing


class ImageError(UserError):
    """An input that is not a usable image or array; the message says what was wrong."""


class ImageTooLargeError(ImageError):
    """An image whose decoded size is over the pixel limit (a service answers 413, not 400)."""


class UnsupportedFormatError(ImageError):
    """A file of a format that is not accepted (a service answers 415)."""


def brief(value, limit: int = 80) -> str:
    """repr(value), shortened: error messages quote what was sent, never all of it."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 64:  # Python refuses to print integers of over 4,300 digits
            return f"{'-' if value < 0 else ''}over 10^{int((value.bit_length() - 1) * 0.30103)}"
        return f"{value:,}"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])


def _median(values: np.ndarray) -> np.floating:
    """np.median of a 1-D float array, the same value and type, without its general machinery (a sixth of the
    time: this runs for every image a service classifies)."""
    ordered, n = np.sort(values), len(values)
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2 if n % 2 == 0 else ordered[n // 2]


LIGHT_BACKGROUND = 127  # a border median above this is a light background (a photo): inverted
FULL_PEAK = 250  # a 28x28 image peaking below this is faint and stretched; dataset images peak at 254-255

# _border's pixels of a (28, 28) image, as indices into its flattened pixels: one numpy call, not five
_BORDER_28 = _border(np.arange(SIDE * SIDE).reshape(SIDE, SIDE))


def _already_dataset_style(gray: np.ndarray) -> bool:
    """True when to_dataset_style would return this (28, 28) uint8 image unchanged: its background (the
    border's median) is dark and it is blank or peaks at FULL_PEAK or more. Decided on the uint8 pixels, which
    is what a service's every dataset-style request takes (a third of the time of the float path)."""
    border = np.sort(gray.ravel()[_BORDER_28])
    n = len(border)
    if int(border[(n - 1) // 2]) + int(border[n // 2]) > 2 * LIGHT_BACKGROUND:  # the median, doubled
        return False
    peak = int(gray.max())
    return peak == 0 or peak >= FULL_PEAK


def to_dataset_style(gray: np.ndarray) -> np.ndarray:
    """A 2-D uint8 image -> (28, 28) uint8 in the dataset's style (object light on black).

    A 28x28 image is taken as already in that style (only inverted if its background is light,
    stretched if faint), so dataset images pass through unchanged. Anything else is treated as a photo:
    background removed, cropped to the object, centred on a square, resized with antialiasing,
    and stretched so its brightest pixel is 255: every dataset image peaks at 254 or 255, and a
    coloured or grey garment would otherwise look faint (measured: benchmarks/photo_accuracy.py).
    """
    if gray.shape == (SIDE, SIDE) and gray.dtype == np.uint8 and _already_dataset_style(gray):
        return gray.copy()
    a = gray.astype(np.float32)
    background = float(_median(_border(a)))
    if background > LIGHT_BACKGROUND:  # a photo: invert so the object is light
        a = 255.0 - a
        background = 255.0 - background
    if a.shape == (SIDE, SIDE):
        peak = float(a.max())
        if 0 < peak < FULL_PEAK:  # a faint (e.g. coloured) small image; dataset images pass as they are
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


# --------------------------------------------------------------------------- decoding image files

# The formats clients send. Which one a file is gets decided from its first bytes before anything
# is decoded, and Image.open is told to use that one reader only (formats=): Pillow's other readers
# never see an upload (the EPS reader runs Ghostscript, a PostScript interpreter, where installed).
ACCEPTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "GIF": "GIF", "WEBP": "WebP", "BMP": "BMP", "TIFF": "TIFF"}
ACCEPTED_TEXT = "a PNG, JPEG, GIF, WebP, BMP or TIFF image (or a .npy array)"

# First bytes -> format: the accepted ones (Pillow's names), then others, only to name them in the refusal.
_PREFIXES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),  # classic and BigTIFF
    (b"%PDF", "PDF"), (b"%!PS", "EPS (PostScript)"), (b"\xc5\xd0\xd3\xc6", "EPS (PostScript)"),
    (b"\x00\x00\x01\x00", "ICO (Windows icon)"), (b"\x00\x00\x02\x00", "CUR (Windows cursor)"),
    (b"8BPS", "PSD (Photoshop)"), (b"icns", "ICNS (macOS icon)"), (b"qoif", "QOI"), (b"DDS ", "DDS"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"#define", "XBM"),
    (b"/* XPM */", "XPM"), (b"\x01\xda", "SGI"), (b"Image type:", "IM"), (b"DanM", "MSP"), (b"LinS", "MSP"),
    (b"BLP1", "BLP"), (b"BLP2", "BLP"), (b"SIMPLE  =", "FITS"), (b"\x59\xa6\x6a\x95", "Sun raster"),
    (b"\x89HDF\r\n\x1a\n", "HDF5"), (b"GRIB", "GRIB"), (b"BUFR", "BUFR"), (b"FTEX", "FTEX"), (b"gimp xcf", "XCF"),
    (b"\xd7\xcd\xc6\x9a", "WMF"), (b"\xb1\x68\xde\x3a", "DCX"), (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"#?RADIANCE", "Radiance HDR"),
)


def sniff_format(blob: bytes) -> str | None:
    """The format `blob` is in, from its first bytes alone: Pillow's name for an accepted one, a
    description for another known one, None when it starts like nothing known."""
    head = bytes(blob[:64])
    for prefix, fmt in _PREFIXES:
        if head.startswith(prefix):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"):
        return "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIF"
    if len(head) > 2 and head[0] == 0x0A and head[1] in (0, 2, 3, 4, 5) and head[2] == 1:
        return "PCX"
    if len(head) > 2 and head[0] == ord("P") and head[1] in b"1234567fF" and head[2] in b" \t\r\n":
        return "PNM (PPM, PGM, PBM, PAM or PFM)"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<?xml", b"<svg", b"<!doctype svg")):
        return "SVG" if b"<svg" in bytes(blob[:4096]).lower() else "XML"
    return None


class DecodeBudget:
    """What one request may decode in all: pixels, and bytes once decoded. Each image is charged from
    its header before any image of the request is decoded, so a refused request costs no decoding."""

    def __init__(self, max_pixels: int, max_bytes: int):
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.pixels = self.bytes = 0

    def charge(self, name: str, pixels: int, nbytes: int) -> None:
        self.pixels += pixels
        self.bytes += nbytes
        if self.pixels > self.max_pixels:
            raise ImageTooLargeError(f"{name}: the request's images decode to {self.pixels:,} pixels in all "
                                     f"(this one {pixels:,}), over the limit of {self.max_pixels:,} pixels per request")
        if self.bytes > self.max_bytes:
            raise ImageTooLargeError(f"{name}: the request's images take {self.bytes:,} bytes once decoded "
                                     f"(this one {nbytes:,}), over the limit of {self.max_bytes:,} bytes per request")


def decoded_bytes(mode: str, pixels: int) -> int:
    """Bytes Pillow holds for `pixels` pixels of `mode`: one for bilevel, grey and palette, two for
    16-bit grey, four for everything else (colour is stored padded to four bands)."""
    return pixels * (1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4)


# How each mode becomes grey (pil_to_gray); a mode not listed is refused, naming it, before decoding.
ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa")
DEEP_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # 16/32-bit integer or float grey: scaled, not clipped
DIRECT_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV", "LAB")
GRAY_MODES = ALPHA_MODES + DEEP_MODES + DIRECT_MODES


def open_image(blob: bytes, name: str = "image", max_pixels: int = MAX_PIXELS,
               budget: DecodeBudget | None = None) -> "Image.Image":
    """Image bytes -> the opened, not yet decoded image, set to decode small where the format allows
    (JPEG: grey, scaled down in the decoder) and charged to `budget`. Only accepted formats are opened."""
    if not blob:
        raise ImageError(f"{name}: empty file (0 bytes); expected {ACCEPTED_TEXT}")
    fmt = sniff_format(blob)
    if fmt is None:
        raise ImageError(f"{name}: not a recognised image format; expected {ACCEPTED_TEXT}")
    if fmt not in ACCEPTED_FORMATS:
        raise UnsupportedFormatError(f"{name}: {fmt} files are not accepted; send {ACCEPTED_TEXT}")
    label = ACCEPTED_FORMATS[fmt]
    try:
        img = Image.open(io.BytesIO(blob), formats=[fmt])
    except Image.DecompressionBombError as e:  # Pillow's own, larger limit: still a too-large image
        raise ImageTooLargeError(f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format: starts like a {label} file but its header "
                         "cannot be read (truncated or corrupt)") from None
    except Exception as e:  # a damaged header can raise almost anything inside a format plugin
        raise ImageError(f"{name}: corrupt {label} header ({type(e).__name__}: {e})") from None
    check_header(img, name, max_pixels)
    if img.format in ("JPEG", "MPO"):  # DCT-domain downscale, straight to grey from the luminance channel
        w, h = img.size
        longest = max(w, h)
        img.draft("L" if img.mode in ("RGB", "YCbCr") else img.mode,
                  (max(1, w * WORKING_SIDE // longest), max(1, h * WORKING_SIDE // longest)))
    if budget is not None:
        pixels = img.size[0] * img.size[1]
        budget.charge(name, pixels, decoded_bytes(img.mode, pixels))
    return img


def decode_image(blob: bytes, name: str = "image", max_pixels: int = MAX_PIXELS,
                 budget: DecodeBudget | None = None) -> np.ndarray:
    """PNG/JPEG/GIF/WebP/BMP/TIFF bytes -> 2-D uint8 grayscale (alpha composited over white)."""
    return pil_to_gray(open_image(blob, name, max_pixels, budget), name, max_pixels)


def check_header(img: "Image.Image", name: str, max_pixels: int) -> None:
    """Refuses, from what the header says, an image too large or in a mode that has no grey."""
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{name}: image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
    if w < 1 or h < 1:
        raise ImageError(f"{name}: image is {w}x{h} pixels; expected at least 1x1")
    if img.mode not in GRAY_MODES:
        raise ImageError(f"{name}: image mode {img.mode!r} cannot be converted to grey; "
                         f"expected one of {', '.join(GRAY_MODES)}")


def pil_to_gray(img: "Image.Image", name: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An opened (not yet decoded) or in-memory PIL image -> 2-D uint8 grayscale (alpha over white).

    A large image is box-reduced to about WORKING_SIDE in its own mode before anything else, so the
    conversions after it cost little: the answer is 28x28 anyway."""
    check_header(img, name, max_pixels)
    try:
        img.load()
        turn = _ORIENTATIONS.get(img.getexif().get(ExifTags.Base.Orientation, 1))
        img, premultiplied = _shrink(img)
        if turn is not None:
            img = img.transpose(turn)
        gray = _to_gray(img, premultiplied)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: {e}") from None
    except Exception as e:  # OSError for truncation; plugins raise others (SyntaxError, ValueError, struct.error)
        raise ImageError(f"{name}: truncated or corrupt image ({type(e).__name__}: {e})") from None
    if gray is None:
        raise ImageError(f"{name}: a float image holding NaN or infinite values; expected finite pixel values")
    if gray.ndim != 2 or min(gray.shape) < 1:
        raise ImageError(f"{name}: decoded to shape {gray.shape}; expected a 2-D image")
    return gray


# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose does; it is
# applied after shrinking, to the small image, which no longer carries the EXIF data).
_ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                 8: Image.Transpose.ROTATE_90}


def _has_alpha(img: "Image.Image") -> bool:
    return img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)


def _shrink(img: "Image.Image") -> tuple["Image.Image", bool]:
    """(image reduced to about WORKING_SIDE, whether its grey is premultiplied by alpha), in a mode
    Image.reduce handles and whose averages mean what they should."""
    if _has_alpha(img):
        img = img.convert("LA")
    elif img.mode in ("1", "P"):
        img = img.convert("L")
    elif img.mode.startswith("I;16"):
        img = img.convert("I")
    elif img.mode == "HSV":  # hue is an angle: averaging it is meaningless
        img = img.convert("RGB")
    if max(img.size) <= WORKING_SIDE:
        return img, False
    premultiplied = img.mode == "LA"
    if premultiplied:  # average colour weighted by opacity, so transparent pixels do not bleed in
        img = img.convert("La")
    return img.reduce(-(-max(img.size) // WORKING_SIDE)), premultiplied


def _to_gray(img: "Image.Image", premultiplied: bool) -> np.ndarray | None:
    """A _shrink-ed image -> 2-D uint8 grey; None for a float image with non-finite values."""
    if img.mode in ("LA", "La"):  # composite over white
        grey, alpha = (np.asarray(band, dtype=np.float32) for band in img.split())
        over = grey if premultiplied else grey * alpha / 255.0
        return np.clip(np.rint(over + (255.0 - alpha)), 0, 255).astype(np.uint8)
    if img.mode in ("I", "F"):  # 16-bit or integer/float grey: Pillow's "L" would clip
        deep = np.asarray(img, dtype=np.float64)
        if not np.isfinite(deep).all():
            return None
        return np.clip(deep / (257.0 if deep.max() > 255 else 1.0), 0, 255).astype(np.uint8)
    if img.mode == "LAB":  # Pillow converts LAB to RGB but not to L
        img = img.convert("RGB")
    return np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8)


def array_to_images(arr: np.ndarray, name: str = "array") -> np.ndarray:
    """A (28, 28) or (N, 28, 28) array (uint8, or floats in [0, 1] or [0, 255]) -> (N, 28, 28) uint8."""
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        # booleans too: a mask of true/false is not pixel values, and taking it as 0/1 gives a black image
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
    needed = math.prod(shape) * dtype.itemsize  # exact: a header may claim dimensions of any size
    if needed > len(blob) - stream.tell():
        raise ImageError(f"{name}: .npy header claims shape {brief(shape)} of {dtype} ({brief(needed)} bytes) but "
                         f"only {len(blob) - stream.tell():,} bytes of data follow; truncated or corrupt")
    return shape, dtype


def decode_npy(blob: bytes, name: str = "array", budget: DecodeBudget | None = None) -> np.ndarray:
    if not blob:
        raise ImageError(f"{name}: empty file (0 bytes); expected a .npy array")
    shape, dtype = _npy_header(blob, name)
    if budget is not None:
        pixels = math.prod(shape)
        budget.charge(name, pixels, pixels * dtype.itemsize)
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
