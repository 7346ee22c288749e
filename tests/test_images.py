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
