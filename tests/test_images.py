"""Image preprocessing: photos become dataset-style 28x28 inputs; bad inputs get clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fashionlab import images


def photo_of(img28: np.ndarray, size=168, margin=(40, 24), fmt="JPEG") -> bytes:
    """A dataset image rendered like a product photo: dark on white, upscaled, RGB, off-centre margin."""
    big = Image.fromarray(255 - img28).resize((size, size), Image.BICUBIC).convert("RGB")
    canvas = Image.new("RGB", (size + 2 * margin[0], size + 2 * margin[1]), "white")
    canvas.paste(big, margin)
    buf = io.BytesIO()
    canvas.save(buf, format=fmt, quality=92)
    return buf.getvalue()


def test_photo_comes_back_close_to_the_dataset_image(real_data):
    worst = 1.0
    for i in range(20):
        original = real_data.test_images[i]
        got = images.to_dataset_style(images.decode_image(photo_of(original)))
        assert got.shape == (28, 28) and got.dtype == np.uint8
        worst = min(worst, np.corrcoef(got.ravel().astype(float), original.ravel().astype(float))[0, 1])
    assert worst > 0.8


def test_dataset_sized_images_pass_through(real_data):
    for img in real_data.test_images[:50]:  # dataset images peak at 254-255: unchanged
        assert np.array_equal(images.to_dataset_style(img), img)
    img = np.zeros((28, 28), np.uint8)
    img[5:20, 8:18] = 255
    assert np.array_equal(images.to_dataset_style(255 - img), img)  # light background: inverted
    faint = (img // 2).astype(np.uint8)
    assert images.to_dataset_style(faint).max() == 255  # a faint image is stretched to full range


def test_dataset_sized_uint8_images_take_the_float_paths_answer(real_data):
    """The uint8 shortcut for 28x28 images already in the dataset's style returns exactly what the float
    path does (the same pixels as int16 take the float path), at the edges of both of its conditions."""
    rng = np.random.default_rng(0)
    cases = [real_data.test_images[i] for i in range(200)] + [255 - real_data.test_images[i] for i in range(50)]
    cases += [np.zeros((28, 28), np.uint8), np.full((28, 28), 255, np.uint8)]
    for peak in (1, 248, 249, 250, 251, 255):  # faint (stretched) below 250, kept from 250
        img = np.zeros((28, 28), np.uint8)
        img[10, 10] = peak
        cases.append(img)
    medians = set()
    for dark in range(40, 73):  # border pixels 127 or 128, more of them dark each time: medians 128 to 127
        img = rng.integers(0, 256, (28, 28)).astype(np.uint8)
        ring = np.ones((28, 28), bool)
        ring[1:-1, 1:-1] = False
        img[ring] = np.where(np.arange(ring.sum()) < dark * 108 // 112, 127, 128).astype(np.uint8)
        img[14, 14] = 255
        medians.add(float(images._median(images._border(img).astype(np.float32))))
        cases.append(img)
    assert {127.0, 127.5, 128.0} <= medians
    cases += [rng.integers(0, 256, (28, 28)).astype(np.uint8) for _ in range(50)]
    for img in cases:
        got = images.to_dataset_style(img)
        want = images.to_dataset_style(img.astype(np.int16))
        assert got.dtype == want.dtype == np.uint8 and np.array_equal(got, want)
        assert got is not img  # a new array, as from the float path


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (10, 10, 40, 40))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    gray = images.decode_image(buf.getvalue())
    assert gray[0, 0] == 255 and gray[25, 25] == 0


@pytest.mark.parametrize("blob, message", [
    (b"", "empty file"),
    (b"GIF89a-but-not-really", "not a recognised image format"),
    (b"hello world", "not a recognised image format"),
])
def test_bad_bytes(blob, message):
    with pytest.raises(images.ImageError, match=message):
        images.decode_image(blob, "upload")


def test_truncated_png_and_pixel_limit():
    buf = io.BytesIO()
    Image.new("L", (300, 300), 128).save(buf, format="PNG")
    with pytest.raises(images.ImageError, match="truncated or corrupt"):
        images.decode_image(buf.getvalue()[:-40])
    with pytest.raises(images.ImageError, match="300x300 = 90,000 pixels, over the limit of 10,000"):
        images.decode_image(buf.getvalue(), max_pixels=10_000)


def test_arrays():
    assert images.array_to_images(np.ones((28, 28), np.float32)).max() == 255
    assert images.array_to_images(np.full((2, 28, 28), 7, np.int64)).dtype == np.uint8
    with pytest.raises(images.ImageError, match=r"array shape \(28, 27\)"):
        images.array_to_images(np.zeros((28, 27)))
    with pytest.raises(images.ImageError, match="NaN"):
        images.array_to_images(np.full((28, 28), np.nan))
    with pytest.raises(images.ImageError, match="not numeric"):
        images.array_to_images(np.array([["a"] * 28] * 28))
    with pytest.raises(images.ImageError, match="not a valid .npy"):
        images.decode_npy(b"\x93NUMPY garbage")
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object))
    with pytest.raises(images.ImageError):
        images.decode_npy(buf.getvalue())  # pickled objects are refused, never loaded


# --------------------------------------------------------------------------- hostile files (issue 18)

def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def shapes_image(size=(60, 40)) -> Image.Image:
    """A dark rectangle (grey 40) on a light background (grey 220), as RGB."""
    img = Image.new("RGB", size, (220, 220, 220))
    img.paste((40, 40, 40), (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    return img


def in_mode(img: Image.Image, mode: str) -> Image.Image:
    """`img` in `mode`, with the same greys (16-bit grey scaled to 0-65535, 32-bit and float as 0-255)."""
    grey = np.asarray(img.convert("L"))
    if mode.startswith("I;16"):
        return Image.fromarray(grey.astype(np.uint16) * 257)  # numpy uint16 arrays become mode I;16
    if mode in ("I", "F"):
        return Image.fromarray(grey.astype(np.int32 if mode == "I" else np.float32)).convert(mode)
    if mode == "1":
        return img.convert("1", dither=Image.Dither.NONE)
    if mode in ("P", "PA"):  # an adaptive palette holds both greys exactly (the default web palette dithers)
        img = img.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode in ("LA", "PA", "RGBA"):  # opaque: the alpha band must not change the greys
        return img.convert("RGBA" if mode == "RGBA" else mode)
    return img.convert(mode)


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "I;16", "I", "F"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(60, 40), (2100, 1100)], ids=["small", "larger than WORKING_SIDE"])
def test_every_tiff_mode_decodes_to_the_right_greys(mode, size):
    """LAB, CMYK, YCbCr, 16-bit, 32-bit, float...: converted correctly, never 'truncated or corrupt'."""
    blob = encoded(in_mode(shapes_image(size), mode), "TIFF")
    assert Image.open(io.BytesIO(blob)).mode.startswith(mode[:4])
    gray = images.decode_image(blob, "scan.tif")
    h, w = gray.shape
    background, rectangle = int(gray[1, 1]), int(gray[h // 2, w // 2])
    if mode == "1":  # bilevel: black and white
        assert (background, rectangle) == (255, 0)
    else:
        assert abs(background - 220) <= 3 and abs(rectangle - 40) <= 3, (background, rectangle)


def test_transparent_palette_and_grey_alpha_are_composited_on_white():
    for mode in ("LA", "PA", "P"):
        img = Image.new("RGBA", (2100, 60), (0, 0, 0, 0))  # transparent, larger than WORKING_SIDE
        img.paste((0, 0, 0, 255), (700, 15, 1400, 45))
        if mode == "P":
            img = img.convert("P", palette=Image.Palette.ADAPTIVE)
            img.info["transparency"] = img.getpixel((0, 0))
        else:
            img = img.convert(mode)
        gray = images.decode_image(encoded(img, "TIFF" if mode == "PA" else "PNG"))  # PNG cannot hold PA
        assert gray[0, 0] == 255 and gray[gray.shape[0] // 2, gray.shape[1] // 2] == 0, mode


def test_an_unconvertible_mode_is_refused_naming_it():
    with pytest.raises(images.ImageError, match="mode 'La'"):
        images.as_images(Image.new("La", (30, 30)))


def test_float_image_with_nan_is_refused():
    img = Image.fromarray(np.full((30, 30), np.nan, np.float32))
    with pytest.raises(images.ImageError, match="NaN or infinite"):
        images.decode_image(encoded(img, "TIFF"))


def test_exif_orientation_is_applied_after_shrinking():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 270 to stand it upright
    for size in ((60, 20), (2100, 700)):
        img = Image.new("L", size, 200)
        for fmt in ("JPEG", "PNG"):
            gray = images.decode_image(encoded(img, fmt, exif=exif.tobytes()))
            assert gray.shape[0] > gray.shape[1], (size, fmt, gray.shape)


ACCEPTED = {"PNG": ("PNG", "L"), "JPEG": ("JPEG", "RGB"), "GIF": ("GIF", "P"), "WEBP": ("WEBP", "RGB"),
            "BMP": ("BMP", "RGB"), "TIFF": ("TIFF", "RGB")}


@pytest.mark.parametrize("fmt", sorted(ACCEPTED))
def test_accepted_formats_are_opened_by_their_own_reader_only(fmt, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(images.Image, "open", lambda fp, *a, **k: opened.append(k.get("formats")) or real_open(fp, *a, **k))
    save_as, mode = ACCEPTED[fmt]
    blob = encoded(shapes_image().convert(mode), save_as)
    assert images.sniff_format(blob) == fmt
    assert images.decode_image(blob).shape == (40, 60)
    assert opened == [[fmt]]


@pytest.mark.parametrize("fmt,mode,name", [("EPS", "L", "EPS"), ("ICO", "L", "ICO"), ("PPM", "L", "PNM"),
                                           ("QOI", "RGB", "QOI"), ("PCX", "L", "PCX"), ("SGI", "L", "SGI"),
                                           ("DDS", "L", "DDS"), ("XBM", "1", "XBM"), ("JPEG2000", "L", "JPEG 2000")])
def test_other_formats_never_reach_pillow(fmt, mode, name, monkeypatch):
    monkeypatch.setattr(images.Image, "open", lambda *a, **k: pytest.fail("Image.open was called"))
    with pytest.raises(images.UnsupportedFormatError, match=f"{name}.* not accepted; send a PNG, JPEG"):
        images.decode_image(encoded(Image.new(mode, (16, 16)), fmt), "upload")


def test_unknown_bytes_name_no_format():
    assert images.sniff_format(b"hello, world") is None
    assert images.sniff_format(b'<svg xmlns="http://www.w3.org/2000/svg"/>') == "SVG"
    assert images.sniff_format(b"%PDF-1.7") == "PDF"


def test_large_jpeg_decodes_in_draft_mode_to_small_grey():
    blob = encoded(shapes_image((4096, 3072)), "JPEG", quality=80)
    img = images.open_image(blob, "photo.jpg")
    assert img.mode == "L" and img.size == (1024, 768)  # scaled by 4 in the decoder, luminance only
    budget = images.DecodeBudget(10**9, 10**9)
    images.open_image(blob, "photo.jpg", budget=budget)
    assert (budget.pixels, budget.bytes) == (1024 * 768, 1024 * 768)  # charged as decoded, not as stored
    gray = images.pil_to_gray(img, "photo.jpg")
    assert gray.shape == (768, 1024) and abs(int(gray[0, 0]) - 220) <= 3


def test_budget_refuses_from_headers_naming_the_limit():
    budget = images.DecodeBudget(max_pixels=1_000_000, max_bytes=10**9)
    blob = encoded(Image.new("L", (800, 800)), "PNG")
    images.open_image(blob, "a.png", budget=budget)
    with pytest.raises(images.ImageTooLargeError, match="b.png: .*1,280,000 pixels in all .* limit of 1,000,000 pixels"):
        images.open_image(blob, "b.png", budget=budget)
    budget = images.DecodeBudget(max_pixels=10**9, max_bytes=1_000_000)
    with pytest.raises(images.ImageTooLargeError, match="2,560,000 bytes once decoded.* limit of 1,000,000 bytes"):
        images.open_image(encoded(Image.new("RGB", (800, 800)), "PNG"), "c.png", budget=budget)


def test_boolean_arrays_are_not_pixels():
    with pytest.raises(images.ImageError, match="dtype bool is not numeric"):
        images.array_to_images(np.ones((28, 28), bool))


def test_the_fast_median_is_numpys_value_and_type():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 112, 113):
        for values in (rng.integers(0, 256, n).astype(np.float32), (rng.random(n) * 255).astype(np.float32)):
            got, want = images._median(values), np.median(values)
            assert got == want and type(got) is type(want), (n, values)
