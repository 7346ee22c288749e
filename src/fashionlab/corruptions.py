"""Corrupted copies of test images: 15 corruptions at 5 severities, made offline and deterministically.

Chosen after MNIST-C (Mu and Gilmer, 2019) and Fashion-MNIST-C (Weiss and Tonella, 2022) and the
ImageNet-C families they adapt: noise (Gaussian, shot, impulse, speckle), blur (Gaussian, defocus,
motion), affine transforms (rotate, shear, scale, translate), light (brightness, contrast) and
digital (pixelate, JPEG). Their severities grow from barely visible (1) to the point where a person
still names most garments (5). The fog, frost, snow and spatter of ImageNet-C need photographic
textures, and MNIST-C's line drawings (zigzag, dotted line, canny edges) are stroke corruptions
for digits: left out.

Everything works on whole batches of tensors (affine grids, convolutions, one draw per batch from a
CPU generator seeded by the corruption, its severity and the batch's offset in the set), so a set
corrupted in the same batches is the same bytes on every machine (robustness.py always uses batches
of robustness.CHUNK images); JPEG goes through Pillow, one small image at a time. Written here rather than taken from
imagecorruptions, which is for RGB photographs and needs scikit-image and ImageMagick's wand.
"""

from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ArgumentError, UnknownNameError

SEVERITIES = 5
SEED = 0  # of every random draw; combined with the corruption, the severity and the batch's offset
Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]  # (N, 1, H, W) floats in [0, 1]


def _level(values: tuple, severity: int):
    return values[severity - 1]


def _signs(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


# --------------------------------------------------------------------------- noise

def gaussian_noise(x, severity, g):
    return x + torch.randn(x.shape, generator=g) * _level((0.05, 0.1, 0.15, 0.2, 0.3), severity)


def shot_noise(x, severity, g):
    """Photon counting: each pixel a Poisson count of its brightness times the number of photons."""
    photons = _level((60, 25, 12, 6, 3), severity)
    return torch.poisson(x * photons, generator=g) / photons


def impulse_noise(x, severity, g):
    """Salt and pepper: a share of pixels set to black or white."""
    share = _level((0.02, 0.04, 0.07, 0.11, 0.17), severity)
    hit = torch.rand(x.shape, generator=g) < share
    salt = torch.rand(x.shape, generator=g) < 0.5
    return torch.where(hit, salt.float(), x)


def speckle_noise(x, severity, g):
    """Noise that grows with the pixel's brightness."""
    return x + x * torch.randn(x.shape, generator=g) * _level((0.15, 0.25, 0.4, 0.55, 0.75), severity)


# --------------------------------------------------------------------------- blur

def _convolve(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """x (N, 1, H, W) with one kernel (k, k), or one per image (N, k, k), zero-padded to the same size."""
    k = kernel.shape[-1]
    if kernel.dim() == 2:
        return F.conv2d(x, kernel[None, None], padding=k // 2)
    n = x.shape[0]
    return F.conv2d(x.reshape(1, n, *x.shape[2:]), kernel[:, None], padding=k // 2, groups=n).reshape(x.shape)


def gaussian_blur(x, severity, g):
    sigma = _level((0.5, 0.7, 0.9, 1.2, 1.6), severity)
    r = math.ceil(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    line = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = line[:, None] * line[None, :]
    return _convolve(x, kernel / kernel.sum())


def defocus_blur(x, severity, g):
    """An out-of-focus lens: the image averaged over a disk."""
    radius = _level((1.0, 1.5, 2.0, 2.5, 3.0), severity)
    r = math.ceil(radius)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2 + 0.25).float()
    return _convolve(x, disk / disk.sum())


def motion_blur(x, severity, g):
    """A shaken camera: each image averaged along a line of its own random direction."""
    length = _level((3, 5, 7, 9, 11), severity)
    n, r = x.shape[0], length // 2
    angle = torch.rand(n, generator=g) * math.pi
    t = torch.linspace(-r, r, 4 * length)  # points along the line, rounded to the kernel's pixels
    cols = torch.round(t[None] * torch.cos(angle)[:, None]).long() + r
    rows = torch.round(t[None] * torch.sin(angle)[:, None]).long() + r
    kernel = torch.zeros(n, length, length)
    kernel.view(n, -1).scatter_(1, rows * length + cols, 1.0)
    return _convolve(x, kernel / kernel.sum((1, 2), keepdim=True))


# --------------------------------------------------------------------------- affine transforms

def _affine(x: torch.Tensor, matrix: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """Each image resampled through its own 2x2 matrix (output -> input coordinates, in units of half the
    image) and shift, bilinear, the uncovered border background (0)."""
    n = x.shape[0]
    theta = torch.cat([matrix, (shift if shift is not None else torch.zeros(n, 2))[:, :, None]], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotate(x, severity, g):
    degrees = _level((10, 20, 30, 40, 50), severity)
    a = _signs(x.shape[0], g) * math.radians(degrees)
    c, s = torch.cos(a), torch.sin(a)
    return _affine(x, torch.stack([torch.stack([c, -s], 1), torch.stack([s, c], 1)], 1))


def shear(x, severity, g):
    k = _signs(x.shape[0], g) * _level((0.1, 0.2, 0.3, 0.45, 0.6), severity)
    one, zero = torch.ones_like(k), torch.zeros_like(k)
    return _affine(x, torch.stack([torch.stack([one, k], 1), torch.stack([zero, one], 1)], 1))


def scale(x, severity, g):
    """The garment shrunk (zoomed out) around the centre: the framing a far camera gives."""
    zoom = _level((0.9, 0.8, 0.7, 0.6, 0.5), severity)
    eye = torch.eye(2).expand(x.shape[0], 2, 2) / zoom
    return _affine(x, eye)


def translate(x, severity, g):
    """Moved by a fixed number of pixels in a random direction."""
    pixels = _level((2, 3, 4, 5, 6), severity)
    a = torch.rand(x.shape[0], generator=g) * 2 * math.pi
    shift = torch.stack([torch.cos(a), torch.sin(a)], 1) * (-2 * pixels / x.shape[-1])  # in half-image units
    return _affine(x, torch.eye(2).expand(x.shape[0], 2, 2), shift)


# --------------------------------------------------------------------------- light

def brightness(x, severity, g):
    """A lighter picture: the dark background turns grey."""
    return x + _level((0.1, 0.2, 0.3, 0.4, 0.5), severity)


def contrast(x, severity, g):
    """Pixels pulled towards each image's mean brightness."""
    keep = _level((0.6, 0.45, 0.3, 0.2, 0.12), severity)
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * keep + mean


# --------------------------------------------------------------------------- digital

def pixelate(x, severity, g):
    side = _level((20, 16, 12, 10, 8), severity)
    small = F.interpolate(x, size=(side, side), mode="area")
    return F.interpolate(small, size=x.shape[-2:], mode="nearest")


def jpeg(x, severity, g):
    """Saved as a JPEG of low quality and read back (Pillow)."""
    from PIL import Image
    quality = _level((30, 18, 12, 8, 5), severity)
    pixels = _to_uint8(x).numpy()
    out = np.empty_like(pixels)
    for i, image in enumerate(pixels[:, 0]):
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="JPEG", quality=quality)
        out[i, 0] = np.asarray(Image.open(buffer))
    return torch.from_numpy(out).float() / 255


# name -> corruption, in the order tables and figures show them
CORRUPTIONS: dict[str, Corruption] = {f.__name__: f for f in (
    gaussian_noise, shot_noise, impulse_noise, speckle_noise, gaussian_blur, defocus_blur, motion_blur,
    rotate, shear, scale, translate, brightness, contrast, pixelate, jpeg)}


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def check_name(name: str) -> str:
    if name not in CORRUPTIONS:
        raise UnknownNameError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    return name


def check_severity(severity) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= SEVERITIES:
        raise ArgumentError(f"severity={severity!r}: expected an integer from 1 to {SEVERITIES}")
    return severity


def generator(name: str, severity: int, offset: int = 0) -> torch.Generator:
    """The CPU generator a corruption draws from for the images starting at `offset` of a set."""
    index = list(CORRUPTIONS).index(name)
    return torch.Generator().manual_seed(((SEED * 100 + index) * 10 + severity) * 1_000_003 + offset)


def corrupt(images: np.ndarray | torch.Tensor, name: str, severity: int, offset: int = 0) -> np.ndarray:
    """uint8 images (N, 28, 28) -> their corrupted copies, uint8 (N, 28, 28). `offset`: the position of the
    first image in the set it belongs to; it seeds the draws, so that each batch of a set draws its own."""
    fn = CORRUPTIONS[check_name(name)]
    severity = check_severity(severity)
    x = torch.as_tensor(np.asarray(images)).float().div(255)
    if x.dim() == 3:
        x = x[:, None]
    with torch.no_grad():
        out = fn(x, severity, generator(name, severity, offset))
    return _to_uint8(out)[:, 0].numpy()
