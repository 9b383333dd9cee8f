"""Weather and occlusion: snow, frost, fog, spatter."""

from __future__ import annotations

import numpy as np
import torch

from . import _ops


def snow(x: torch.Tensor, p: tuple, rng: np.random.Generator) -> torch.Tensor:
    """Flakes: a thresholded, zoomed noise layer, motion-blurred as if falling, added twice
    (the layer and its 180-degree rotation), over an image whitened towards its luma."""
    mean, std, zoom, threshold, radius, sigma, keep = p
    n, _, h, w = x.shape
    layer = torch.from_numpy(rng.normal(mean, std, (n, 1, h, w)).astype(np.float32))
    layer = _ops.zoom_center(layer, zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer).clamp(0, 1)
    layer = _ops.motion_blur(layer, radius, sigma, rng.uniform(-135.0, -45.0, n))
    whitened = torch.maximum(x, _ops.to_gray(x) * 1.5 + 0.5)
    x = keep * x + (1 - keep) * whitened
    return x + layer + torch.rot90(layer, 2, dims=(2, 3))


def frost(x: torch.Tensor, p: tuple[float, float], rng: np.random.Generator) -> torch.Tensor:
    """Blend with a crop of a frost texture (procedural, see ``_ops.frost_bank``)."""
    keep, amount = p
    n, _, h, w = x.shape
    size = max(96, 3 * max(h, w))
    bank = _ops.frost_bank(size)
    which = rng.integers(0, bank.shape[0], n)
    top = rng.integers(0, size - h + 1, n)
    left = rng.integers(0, size - w + 1, n)
    rows = (top[:, None] + np.arange(h))[:, None, :, None]
    cols = (left[:, None] + np.arange(w))[:, None, None, :]
    crops = bank[which[:, None, None, None], np.arange(3)[None, :, None, None], rows, cols]
    return keep * x + amount * torch.from_numpy(crops)


def fog(x: torch.Tensor, p: tuple[float, float], rng: np.random.Generator) -> torch.Tensor:
    """Add a plasma-fractal cloud, then rescale so the brightest pixel keeps its value."""
    strength, decay = p
    n, _, h, w = x.shape
    size = _ops.next_pow2(max(h, w, 32))
    cloud = _ops.plasma_fractal(n, size, decay, rng)[:, None, :h, :w]
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    x = x + strength * torch.from_numpy(cloud.astype(np.float32))
    return x * peak / (peak + strength)


_WATER = (0.69, 0.93, 0.93)  # pale cyan, the colour of light through a drop
_MUD = (63 / 255, 42 / 255, 20 / 255)


def spatter(x: torch.Tensor, p: tuple, rng: np.random.Generator) -> torch.Tensor:
    """Drops of water (a bright, shaded film) or mud (opaque brown blots) on the lens.

    Both start from a smoothed Gaussian field thresholded into blobs. Water adds
    a light colour whose strength follows a relief shading of the blobs (bright
    on one rim, dark on the other); mud covers the blobs' cores with brown.
    """
    mean, std, sigma, threshold, intensity, mode = p
    n, _, h, w = x.shape
    liquid = _ops.smooth_field(rng.normal(mean, std, (n, h, w)), sigma)
    liquid = np.where(liquid < threshold, 0.0, liquid)
    if mode == 0:
        blobs = _ops.smooth_field((liquid > 0).astype(np.float64), 0.7)
        gy, gx = np.gradient(blobs, axis=(1, 2))
        relief = np.clip(0.6 + 2.0 * (gx + gy), 0.0, 1.5)
        m = liquid * relief
        m /= np.maximum(m.max(axis=(1, 2), keepdims=True), 1e-12)
        m = torch.from_numpy((m * intensity).astype(np.float32))[:, None]
        colour = torch.tensor(_WATER, dtype=x.dtype).view(1, 3, 1, 1)
        return x + m * colour
    m = _ops.smooth_field((liquid > threshold).astype(np.float64), intensity)
    m = np.where(m < 0.8, 0.0, m)
    m = torch.from_numpy(m.astype(np.float32))[:, None]
    colour = torch.tensor(_MUD, dtype=x.dtype).view(1, 3, 1, 1)
    return x * (1 - m) + m * colour
