"""``digits-domains``: target domains derived offline from scikit-learn's digits.

The seed experiment retrains a digit classifier from one handwriting domain to
others (MNIST -> MNIST-M, SVHN, USPS). Those sets need a download; these three
domains are *built* from the same 1797 digits that ``digits`` serves, each in the
spirit of one of them, so the stream runs anywhere:

``mnist-m``
    As Ganin & Lempitsky (2015) built MNIST-M from MNIST: each digit is blended
    over a colour patch cut from a photograph, ``|patch - digit|`` per channel (the
    strokes invert the photo's colours). The photographs are those bundled with
    scikit-image / scikit-learn (``vision.sources.sample_images``), patches from
    :func:`~vision.sources.sample_images.cut_patches`, one random patch per digit,
    randomly flipped.
``svhn``
    House-number crops: the digit is narrowed and set in a row with two random
    neighbouring digits, of which only the edges show at the left and right border;
    ink and background get random colours of opposite lightness (light on dark or
    dark on light), the background a random gradient and low-frequency clutter;
    then a light blur and sensor noise.
``usps``
    USPS's normalisation: each digit's ink bounding box is stretched to fill a
    ``usps_size`` x ``usps_size`` box (16, USPS's own size: another resolution and
    aspect than the source's 8x8 in a margin), resampled (bilinear) to twice that
    resolution (or ``image_size`` if larger), its strokes thickened there
    (``stroke`` > 0: that many 3x3 dilations) or thinned (< 0: erosions), then
    resampled to ``image_size``; grey, like the source.

Every domain keeps the source's order, labels (label ``i`` of a domain is label
``i`` of ``digits``) and ``image_size``, so one model fits the source and all the
targets, and — for equal ``seed`` and fractions — the same train/val/test split:
a digit whose source image is in train has its target images in train too.
Everything random is drawn from ``style_seed``; the images are a pure function of
``(domain, image_size, style_seed, usps_size, stroke)``.

    vision.load("digits-domains", domain="svhn", split="test", style_seed=1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import register
from .base import RawImages, SplitSource
from .digits import CLASSES, digits_arrays
from .sample_images import CLASSES as PHOTOS
from .sample_images import PatchConfig, cut_patches

DOMAINS = ("mnist-m", "svhn", "usps")
# photographs with colour (brick and grass are grey) from vision.sources.sample_images.SOURCES
PHOTO_CLASSES = ("china", "flower", "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                 "immunohistochemistry")
PATCHES_PER_PHOTO = 64


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"DigitDomains.{name} must be an int {allowed}, got {value!r}")
    return value


def source_ink(image_size: int) -> torch.Tensor:
    """The source digits as one ink channel, float32 (N, 1, S, S) in [0, 1] (1 = stroke)."""
    images, _ = digits_arrays(image_size)
    return torch.from_numpy(np.array(images[:, :1]))


# ---------------------------------------------------------------------------- mnist-m


def mnist_m(ink: torch.Tensor, seed: int) -> torch.Tensor:
    """``|photo patch - digit|`` per channel, one random (flipped) photo patch per digit."""
    n, _, size, _ = ink.shape
    rng = np.random.default_rng([seed, 1])
    patches, labels = cut_patches(PatchConfig(PATCHES_PER_PHOTO * 2, size, scale_to=4 * size, seed=seed))
    colour = np.isin(labels, [PHOTOS.index(name) for name in PHOTO_CLASSES])
    pool = torch.from_numpy(patches[colour])
    pick = torch.from_numpy(rng.integers(0, len(pool), n))
    background = pool[pick]
    flip_h = torch.from_numpy(rng.random(n) < 0.5)
    flip_v = torch.from_numpy(rng.random(n) < 0.5)
    background = torch.where(flip_h[:, None, None, None], background.flip(-1), background)
    background = torch.where(flip_v[:, None, None, None], background.flip(-2), background)
    return (background - ink).abs()


# ---------------------------------------------------------------------------- svhn


def _place(ink: torch.Tensor, centre_x: torch.Tensor, centre_y: torch.Tensor, half_w: torch.Tensor,
           half_h: torch.Tensor) -> torch.Tensor:
    """Each image of ``ink`` resampled into the box centre +- half extent (normalised [-1, 1] coordinates)."""
    n = ink.shape[0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = 1 / half_w, -centre_x / half_w
    theta[:, 1, 1], theta[:, 1, 2] = 1 / half_h, -centre_y / half_h
    grid = F.affine_grid(theta, list(ink.shape), align_corners=False)
    return F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                   groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                    groups=c)


def svhn(ink: torch.Tensor, seed: int) -> torch.Tensor:
    """A coloured digit between the cut-off edges of two neighbours on a cluttered background."""
    n, _, size, _ = ink.shape
    rng = np.random.default_rng([seed, 2])

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.uniform(low, high, (n, *shape)).astype(np.float32))

    glyphs = fill_boxes(ink, size)  # each digit's ink filling its box, so a neighbour's edge is ink, not margin
    half_w, half_h = uniform(0.45, 0.58), uniform(0.7, 0.85)
    centre_x, centre_y = uniform(-0.06, 0.06), uniform(-0.06, 0.06)
    gap = uniform(0.1, 0.25)
    left = torch.from_numpy(rng.integers(0, n, n))
    right = torch.from_numpy(rng.integers(0, n, n))
    alpha = torch.maximum(
        _place(glyphs, centre_x, centre_y, half_w, half_h),
        torch.maximum(_place(glyphs[left], centre_x - 2 * half_w - gap, centre_y, half_w, half_h),
                      _place(glyphs[right], centre_x + 2 * half_w + gap, centre_y, half_w, half_h)),
    ).clamp(0, 1)
    # background: a base colour, a linear gradient in a random direction, low-frequency clutter
    base = uniform(0.1, 0.9, 3)[:, :, None, None]
    angle = uniform(0, 2 * math.pi)[:, None, None]
    ramp = torch.linspace(-1, 1, size)
    gradient = (torch.cos(angle) * ramp[None, None, :] + torch.sin(angle) * ramp[None, :, None])[:, None]
    clutter = F.interpolate(uniform(-1, 1, 3, 4, 4), size=(size, size), mode="bicubic", align_corners=False)
    background = base + uniform(0.05, 0.2)[:, None, None, None] * gradient + 0.1 * clutter
    # ink: the opposite lightness of the background, with a little hue of its own
    lightness = base.mean(dim=1, keepdim=True)
    sign = torch.where(lightness < 0.5, 1.0, -1.0)
    ink_colour = base + sign * uniform(0.45, 0.7)[:, None, None, None] + uniform(-0.1, 0.1, 3)[:, :, None, None]
    images = background * (1 - alpha) + ink_colour * alpha
    images = _gaussian_blur(images, sigma=0.4 * size / 32 + 0.2)
    noise = torch.from_numpy(rng.normal(0.0, 0.02, images.shape).astype(np.float32))
    return (images + noise).clamp(0, 1)


# ---------------------------------------------------------------------------- usps


def _ink_boxes(ink: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """Per image the ink's bounding box (x0, x1, y0, y1) in normalised [-1, 1] pixel-edge coordinates."""
    size = ink.shape[-1]
    on = ink[:, 0] > threshold
    edges = []
    for axis in (1, 2):  # columns (any over rows), then rows
        hit = on.any(dim=axis)
        idx = torch.arange(size).expand_as(hit)
        first = torch.where(hit, idx, size).min(dim=1).values
        last = torch.where(hit, idx, -1).max(dim=1).values
        empty = last < first
        first, last = torch.where(empty, 0, first), torch.where(empty, size - 1, last)
        edges += [2 * first / size - 1, 2 * (last + 1) / size - 1]
    return torch.stack(edges, dim=1).float()


def fill_boxes(ink: torch.Tensor, out_size: int, max_stretch: float = 1.5) -> torch.Tensor:
    """Each digit's ink bounding box scaled (bilinear) to fill an ``out_size`` x ``out_size`` image.

    The longer side of the box fills the image; the shorter one is stretched at most ``max_stretch``
    times more than the longer (a '1' gets wider, not a blob)."""
    n = ink.shape[0]
    x0, x1, y0, y1 = _ink_boxes(ink).unbind(dim=1)
    half_w, half_h = (x1 - x0) / 2, (y1 - y0) / 2
    longer = torch.maximum(half_w, half_h)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = torch.maximum(half_w, longer / max_stretch), (x1 + x0) / 2
    theta[:, 1, 1], theta[:, 1, 2] = torch.maximum(half_h, longer / max_stretch), (y1 + y0) / 2
    grid = F.affine_grid(theta, [n, 1, out_size, out_size], align_corners=False)
    return F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)


def usps(ink: torch.Tensor, usps_size: int = 16, stroke: int = 1) -> torch.Tensor:
    """The ink's box filling ``usps_size``^2, strokes dilated/eroded at twice that resolution, back to the size."""
    size = ink.shape[-1]
    work = max(size, 2 * usps_size)  # one 3x3 step there is half a pixel of the usps box, whatever the image size
    out = F.interpolate(fill_boxes(ink, usps_size), size=(work, work), mode="bilinear", align_corners=False)
    for _ in range(abs(stroke)):
        out = F.max_pool2d(out, 3, stride=1, padding=1) if stroke > 0 else -F.max_pool2d(-out, 3, stride=1, padding=1)
    if work != size:
        out = F.interpolate(out, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp(0, 1).expand(-1, 3, -1, -1)


# ---------------------------------------------------------------------------- the source


@lru_cache(maxsize=8)
def domain_arrays(domain: str, image_size: int = 32, style_seed: int = 0, usps_size: int = 16,
                  stroke: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits in ``domain``: float32 (N, 3, S, S) in [0, 1] (read-only, cached) and the digits' labels."""
    if domain not in DOMAINS:
        raise ValueError(f"digits-domains: unknown domain {domain!r}; domains: {list(DOMAINS)}")
    ink = source_ink(image_size)
    if domain == "mnist-m":
        images = mnist_m(ink, style_seed)
    elif domain == "svhn":
        images = svhn(ink, style_seed)
    else:
        images = usps(ink, usps_size, stroke)
    out = np.ascontiguousarray(images.numpy(), dtype=np.float32)
    out.setflags(write=False)  # cached: callers must copy before writing
    labels = digits_arrays(image_size)[1]
    return out, labels


@register(name="digits-domains", classes=CLASSES, shift_type="Domain Shift")
@dataclass
class DigitDomains(SplitSource):
    domain: str = field(default="mnist-m", metadata={"help": f"one of {DOMAINS}"})
    image_size: int = field(default=32, metadata={"help": "side of the square image, pixels (as the digits source's)"})
    style_seed: int = field(default=0, metadata={"help": "seed of everything random in the rendering"})
    usps_size: int = field(default=16, metadata={"help": "usps: side of the box the digit is normalised into"})
    stroke: int = field(default=1, metadata={"help": "usps: 3x3 dilations (> 0) or erosions (< 0) of the strokes"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.domain, str) or self.domain not in DOMAINS:
            raise ValueError(f"DigitDomains.domain must be one of {list(DOMAINS)}, got {self.domain!r}")
        _check_int("image_size", self.image_size, 8)
        _check_int("style_seed", self.style_seed, 0)
        _check_int("usps_size", self.usps_size, 4)
        _check_int("stroke", self.stroke, -2, 3)

    def read(self, root_dir: str | None, part: str) -> RawImages:
        images, labels = domain_arrays(self.domain, self.image_size, self.style_seed, self.usps_size, self.stroke)
        return RawImages(labels=labels, images=images, where=f"sklearn.datasets.load_digits() as {self.domain}")
