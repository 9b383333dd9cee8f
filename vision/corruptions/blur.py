"""Optical and motion blurs."""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import convolve1d

from . import _ops


def gaussian_blur(x: torch.Tensor, sigma: float, rng: np.random.Generator) -> torch.Tensor:
    return _ops.gaussian_blur(x, sigma)


def defocus_blur(x: torch.Tensor, p: tuple[float, float], rng: np.random.Generator) -> torch.Tensor:
    """Convolve with an anti-aliased disk: the out-of-focus point spread function."""
    return _ops.shared_conv(x, _disk_kernel(*p), mode="reflect")


def _disk_kernel(radius: float, alias_sigma: float) -> torch.Tensor:
    half = max(1, int(np.ceil(radius)) + 1)
    r = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(r, r, indexing="ij")
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    # soften the disk's jagged edge with a small Gaussian (3x3 support)
    g = np.exp(-(np.arange(-1, 2) ** 2) / (2 * alias_sigma**2))
    g /= g.sum()
    disk = convolve1d(convolve1d(disk, g, axis=0, mode="constant"), g, axis=1, mode="constant")
    disk /= disk.sum()
    return torch.from_numpy(disk.astype(np.float32))


def glass_blur(x: torch.Tensor, p: tuple[float, int, int], rng: np.random.Generator) -> torch.Tensor:
    """Blur, let every pixel trade places with a random neighbour, blur again (frosted glass).

    The swaps are sequential in the pixel scan order (a pixel moved earlier can
    move again), as in the reference; the scan runs once over positions and
    swaps that position in all N images at once, so the cost does not grow with
    a Python loop per image.
    """
    sigma, delta, iterations = p
    x = _ops.gaussian_blur(x, sigma)
    n, c, h, w = x.shape
    arr = np.ascontiguousarray(x.permute(2, 3, 0, 1).numpy())  # (H, W, N, C): arr[h, w] is one block
    idx = np.arange(n)
    hs = np.arange(h - 1 - delta, delta - 1, -1)
    ws = np.arange(w - 1 - delta, delta - 1, -1)
    shifts = rng.integers(-delta, delta + 1, size=(iterations, hs.size, ws.size, 2, n))
    for it in range(iterations):
        for i, hh in enumerate(hs):
            for j, ww in enumerate(ws):
                hp = np.clip(hh + shifts[it, i, j, 0], 0, h - 1)
                wp = np.clip(ww + shifts[it, i, j, 1], 0, w - 1)
                here = arr[hh, ww].copy()
                arr[hh, ww] = arr[hp, wp, idx]
                arr[hp, wp, idx] = here
    x = torch.from_numpy(arr).permute(2, 3, 0, 1).contiguous()
    return _ops.gaussian_blur(x, sigma)


def motion_blur(x: torch.Tensor, p: tuple[int, float], rng: np.random.Generator) -> torch.Tensor:
    radius, sigma = p
    return _ops.motion_blur(x, radius, sigma, rng.uniform(-45.0, 45.0, x.shape[0]))


def zoom_blur(x: torch.Tensor, n_zooms: int, rng: np.random.Generator) -> torch.Tensor:
    """Average of the image and its centre zooms by 1.00, 1.01, ... (a zoom during exposure)."""
    return (x + _ops.zoom_sum(x, [1.0 + 0.01 * k for k in range(n_zooms)])) / (n_zooms + 1)
