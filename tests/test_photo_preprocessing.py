"""Photo-style inputs come back to the dataset's style; saliency is the input gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fashionlab import images
from fashionlab.saliency import saliency


def test_photo_renderings_preprocess_back_close_to_the_dataset_image(real_data):
    x = real_data.test_images[:40]
    for steps, limit in [(("invert",), 0.0), (("rgb",), 3.0), (("jpeg",), 6.0), (images.PHOTO_STEPS, 25.0)]:
        diffs = [np.abs(images.preprocess_blob(images.render_photo_style(a, steps)).astype(int) - a).mean() for a in x]
        assert np.mean(diffs) <= limit, (steps, np.mean(diffs))
    photo = images.decode_image(images.render_photo_style(x[0]))
    assert photo.shape[0] > 224 and photo.mean() > 127  # really a large image on a light background


def test_dataset_images_pass_through_unchanged(real_data):
    for a in real_data.test_images[:20]:
        assert np.array_equal(images.to_dataset_style(a), a)


def test_blank_and_tiny_images_do_not_fail():
    assert images.to_dataset_style(np.full((300, 200), 255, np.uint8)).max() == 0
    assert images.to_dataset_style(np.zeros((1, 1), np.uint8)).shape == (28, 28)


def test_pixel_limit_is_enforced_before_decoding():
    blob = images.render_photo_style(np.zeros((28, 28), np.uint8), ("upscale",), scale=10)  # 280 x 280
    with pytest.raises(images.ImageTooLargeError, match="78,400 pixels, over the limit of 10,000"):
        images.decode_image(blob, "x.png", max_pixels=10_000)


def test_saliency_of_a_linear_model_is_its_weights_for_the_target_class():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    x = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    target = np.array([2, 5, 9])
    maps = saliency(model, x, target)
    w = model[1].weight.detach().abs().numpy()
    for m, c in zip(maps, target):
        assert np.allclose(m, (w[c] / w[c].max()).reshape(28, 28), atol=1e-6)
    top = saliency(model, x)  # default target: the model's top class
    predicted = model(torch.from_numpy(x).float().div(255).unsqueeze(1)).argmax(1).numpy()
    assert np.allclose(top, saliency(model, x, predicted))
    assert model[1].weight.grad is None  # parameters untouched: safe to call from many threads
