"""Batch augmentation: shapes, determinism from the generator, and what each transform does."""

from __future__ import annotations

import pytest
import torch

from fashionlab.augment import Augment, random_erase, random_flip, random_light, random_translate


def batch(n=16):
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 10:18, 6:12] = 1.0  # an off-centre block on black
    return x


def test_same_generator_same_stream():
    aug = Augment(flip=0.5, crop=2, rotate=10, scale=0.1, erase=0.5)
    a = aug(batch(), torch.Generator().manual_seed(1))
    b = aug(batch(), torch.Generator().manual_seed(1))
    c = aug(batch(), torch.Generator().manual_seed(2))
    assert a.shape == (16, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)


def test_flip_probability_one_mirrors():
    x = batch()
    assert torch.equal(random_flip(x, 1.0, torch.Generator()), x.flip(-1))
    assert torch.equal(random_flip(x, 0.0, torch.Generator()), x)


def test_translate_moves_but_keeps_the_object():
    x = batch(64)
    y = random_translate(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(y.sum((1, 2, 3)), x.sum((1, 2, 3)))  # the block stays inside the frame
    assert not torch.equal(x, y)


def test_translate_shifts_each_image_by_its_own_offset_within_the_pad():
    x = torch.rand(64, 2, 28, 28)
    y = random_translate(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifts = set()
    for i in range(len(x)):
        # The output is one window of the zero-padded image, the same for both channels.
        found = [(oy, ox) for oy in range(5) for ox in range(5)
                 if torch.equal(y[i], padded[i, :, oy:oy + 28, ox:ox + 28])]
        assert found, f"image {i} is not a shifted copy of its input"
        shifts.add(found[0])
    assert len(shifts) > 10  # offsets differ from image to image


def test_erase_only_removes():
    x = torch.ones(32, 1, 28, 28)
    y = random_erase(x, 1.0, torch.Generator().manual_seed(0))
    removed = 1 - y.mean((1, 2, 3))
    assert (y <= x).all() and (removed > 0.01).all() and (removed < 0.3).all()


def test_unknown_augmentation_is_named():
    with pytest.raises(ValueError, match="unknown augmentation blur; known: crop, erase, flip, light, rotate, scale"):
        Augment.from_dict({"blur": 1})


@pytest.mark.parametrize("values, message", [
    ({"flip": "yes"}, "flip='yes': expected a probability from 0 to 1"),
    ({"flip": 2}, "flip=2: expected a probability from 0 to 1"),
    ({"flip": True}, "flip=True: expected a probability from 0 to 1"),  # a JSON `true` is not a probability
    ({"crop": "abc"}, "crop='abc': expected an integer from 0 to 14 (pixels)"),
    ({"crop": 2.0}, "crop=2.0: expected an integer from 0 to 14 (pixels)"),
    ({"crop": 15}, "crop=15: expected an integer from 0 to 14 (pixels)"),
    ({"rotate": float("inf")}, "rotate=inf: expected degrees from 0 to 180"),
    ({"scale": -0.1}, "scale=-0.1: expected a fraction in [0, 1)"),
    ({"scale": 1.0}, "scale=1.0: expected a fraction in [0, 1)"),  # a zoom of 1 - scale = 0 divides by zero
    ({"erase": float("nan")}, "erase=nan: expected a probability from 0 to 1"),
    ({"light": 1}, "light=1: expected a fraction in [0, 1)"),  # a contrast factor of 0 erases the image
])
def test_bad_augmentation_values_are_named_with_what_they_accept(values, message):
    with pytest.raises(ValueError) as e:
        Augment.from_dict(values)
    assert str(e.value) == message


def test_augmentation_values_at_the_ends_of_their_ranges_work():
    aug = Augment.from_dict({"flip": 1, "crop": 14, "rotate": 180, "scale": 0.99, "erase": 1, "light": 0.99})
    assert aug(batch(), torch.Generator().manual_seed(0)).shape == (16, 1, 28, 28)
    assert Augment.from_dict({"flip": 0, "crop": 0}) == Augment()


def test_light_changes_contrast_and_brightness_of_about_half_the_images_within_range():
    x = batch(400) * 0.8 + 0.1
    out = random_light(x, 0.5, torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(1)
    assert 0.4 < changed.float().mean() < 0.6  # the other half stay as they were
    assert out.min() >= 0 and out.max() <= 1
    spread_before, spread_after = x.flatten(1).std(1), out.flatten(1).std(1)
    assert (spread_after[changed] <= spread_before[changed] + 1e-6).all()  # contrast only ever lowered
    shift = (out.flatten(1).mean(1) - x.flatten(1).mean(1)).abs()
    assert (shift <= 0.25 + 1e-6).all() and shift.max() > 0.1  # brightness moved, by at most 0.5 / 2
