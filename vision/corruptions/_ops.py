"""Batched image operations the corruptions share.

Every function takes and returns a float32 tensor of shape (N, C, H, W) (or a
numpy field of shape (N, H, W)) and draws its randomness from the numpy
``Generator`` it is given, so that a corruption is a pure function of
(images, severity, seed). They work on the whole batch at once: the per-image
Python loops of the reference scripts are what makes CIFAR-10-C slow to build.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as in an RGB -> gray conversion


def gaussian_blur(x: torch.Tensor, sigma: float, mode: str = "nearest") -> torch.Tensor:
    """Gaussian blur over H and W only (scipy handles any sigma/size ratio, unlike a padded conv)."""
    if sigma <= 0:
        return x
    out = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode=mode, truncate=4.0)
    return torch.from_numpy(out)


def smooth_field(field: np.ndarray, sigma: float, mode: str = "reflect") -> np.ndarray:
    """Gaussian-smooth a stack of 2-D random fields (N, H, W) along H and W."""
    if sigma <= 0:
        return field
    return ndimage.gaussian_filter(field, sigma=(0, sigma, sigma), mode=mode, truncate=4.0)


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    w = torch.tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _zoom_matrix(n: int, factor: float) -> torch.Tensor:
    """(n, n) matrix R with ``R @ v`` = v zoomed into its centre by ``factor``, bilinear.

    Matches ``grid_sample(align_corners=False, padding_mode="border")`` along one
    axis; bilinear zoom is separable, so an image zooms as ``R_h @ X @ R_w.T``.
    """
    i = torch.arange(n, dtype=torch.float64)
    src = ((2 * i + 1) / n - 1) / factor  # normalised source coordinate
    pos = (((src + 1) * n - 1) / 2).clamp(0, n - 1)
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = pos - lo
    r = torch.zeros(n, n, dtype=torch.float64)
    r[i.long(), lo] += 1 - frac
    r[i.long(), hi] += frac
    return r


@lru_cache(maxsize=16)
def _zoom_sum_map(h: int, w: int, factors: tuple[float, ...]) -> torch.Tensor:
    """(H*W, H*W) float32 matrix of sum_k R_h,k (x) R_w,k; cached, it only depends on sizes and factors."""
    rh = torch.stack([_zoom_matrix(h, f) for f in factors])  # (K, H, H)
    rw = torch.stack([_zoom_matrix(w, f) for f in factors])  # (K, W, W)
    return torch.einsum("kia,kjb->ijab", rh, rw).reshape(h * w, h * w).float()


def zoom_sum(x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """Sum over ``factors`` of the image zoomed into its centre by each factor (>= 1).

    For small images the whole sum is one linear map of the flattened image,
    sum_k R_h,k (x) R_w,k, applied as a single matrix product (26 zooms cost one
    product); larger images fall back to two small matrix products per factor.
    """
    n, c, h, w = x.shape
    if h * w <= 32 * 32:
        m = _zoom_sum_map(h, w, tuple(factors)).to(x.dtype)
        return (x.reshape(n * c, h * w) @ m.T).reshape(n, c, h, w)
    out = torch.zeros_like(x)
    for f in factors:
        out += _zoom_matrix(h, f).to(x.dtype) @ x @ _zoom_matrix(w, f).to(x.dtype).T
    return out


def zoom_center(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom into the centre by ``factor`` >= 1 and keep the size (bilinear)."""
    if factor == 1.0:
        return x
    theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / factor
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def motion_blur(x: torch.Tensor, radius: int, sigma: float, angles_deg: np.ndarray) -> torch.Tensor:
    """One-sided motion blur, a different direction per image.

    Taps at distances 0..2*radius behind each pixel along the direction, weighted
    by a Gaussian of ``sigma`` in the distance (the ImageMagick ``-motion-blur``
    recipe), splatted bilinearly into one kernel per image; taps of negligible
    weight are dropped. The per-image kernels are applied by FFT on the
    replicate-padded batch: a long blur (snow uses 29 taps) then costs the same
    as a short one, where a dense per-image convolution would be mostly zeros.
    """
    n, c, h, w = x.shape
    dist = np.arange(0, 2 * radius + 1, dtype=np.float64)
    wts = np.exp(-(dist**2) / (2.0 * sigma**2))
    keep = wts >= 1e-3 * wts[0]
    dist, wts = dist[keep], wts[keep] / wts[keep].sum()
    reach = int(math.ceil(dist[-1])) + 1
    hp, wp = h + 2 * reach, w + 2 * reach
    theta = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    # kernel offsets, x right / y down, angle counter-clockwise from +x
    ox = dist[None, :] * np.cos(theta)[:, None]  # (N, T)
    oy = -dist[None, :] * np.sin(theta)[:, None]
    x0, y0 = np.floor(ox).astype(np.int64), np.floor(oy).astype(np.int64)
    fx, fy = ox - x0, oy - y0
    kernel = np.zeros((n, hp, wp), dtype=np.float64)
    rows = np.repeat(np.arange(n), dist.size)
    for dy, dx, share in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        # an offset q sits at index q mod size: the FFT product is a circular convolution
        np.add.at(kernel, (rows, ((y0 + dy) % hp).ravel(), ((x0 + dx) % wp).ravel()), (share * wts).ravel())
    padded = F.pad(x, (reach, reach, reach, reach), mode="replicate")
    spec = torch.fft.rfft2(padded) * torch.fft.rfft2(torch.from_numpy(kernel.astype(np.float32)))[:, None]
    out = torch.fft.irfft2(spec, s=(hp, wp))
    return out[..., reach : reach + h, reach : reach + w].contiguous()


def shared_conv(x: torch.Tensor, kernel: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
    """Convolve every channel of every image with one (k, k) kernel."""
    n, c, h, w = x.shape
    k = kernel.shape[-1]
    pad = k // 2
    xp = x.reshape(n * c, 1, h, w)
    if pad > 0:
        if mode == "reflect" and (pad >= h or pad >= w):
            mode = "replicate"
        xp = F.pad(xp, (pad, pad, pad, pad), mode=mode)
    out = F.conv2d(xp, torch.flip(kernel, dims=(-2, -1)).view(1, 1, k, k))
    return out.reshape(n, c, h, w)


def plasma_fractal(n: int, size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` tileable diamond-square fractal maps of shape (size, size), each scaled to [0, 1].

    ``size`` must be a power of two. The random displacement shrinks by
    ``decay**2`` per octave, so a larger ``decay`` gives a smoother (lower
    frequency) cloud; this is the knob the fog severities turn.
    """
    if size < 2 or size & (size - 1):
        raise ValueError(f"plasma_fractal size must be a power of two >= 2, got {size}")
    m = np.zeros((n, size, size), dtype=np.float64)
    step, amp = size, 1.0
    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        right = np.roll(corners, -1, axis=2)
        down = np.roll(corners, -1, axis=1)
        diag = np.roll(right, -1, axis=1)
        centres = (corners + right + down + diag) / 4.0
        centres += amp * rng.uniform(-1.0, 1.0, centres.shape)
        m[:, half::step, half::step] = centres
        # diamond step: points between two corners, next to two centres
        up_centres = np.roll(centres, 1, axis=1)
        left_centres = np.roll(centres, 1, axis=2)
        top = (corners + right + centres + up_centres) / 4.0
        left = (corners + down + centres + left_centres) / 4.0
        m[:, 0::step, half::step] = top + amp * rng.uniform(-1.0, 1.0, top.shape)
        m[:, half::step, 0::step] = left + amp * rng.uniform(-1.0, 1.0, left.shape)
        step = half
        amp /= decay**2
    m -= m.min(axis=(1, 2), keepdims=True)
    m /= np.maximum(m.max(axis=(1, 2), keepdims=True), 1e-12)
    return m


def next_pow2(v: int) -> int:
    return 1 << max(1, int(math.ceil(math.log2(max(v, 2)))))


@lru_cache(maxsize=8)
def frost_bank(size: int, count: int = 6) -> np.ndarray:
    """A fixed set of procedural frost textures, (count, 3, size, size) in [0, 1].

    Stands in for the six photographs of frosted glass the reference uses: ice
    needles with side branches at +-60 degrees (the hexagonal habit of ice),
    drawn over a faint fractal haze and tinted blue-white. The bank is the same
    for every call (fixed seed), like a set of shipped images; a corruption call
    only picks textures and crop positions from it with its own seed.
    """
    rng = np.random.default_rng(20190328)
    bank = np.empty((count, 3, size, size), dtype=np.float32)
    for t in range(count):
        bank[t] = _frost_texture(size, rng)
    return bank


def _frost_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    canvas = np.zeros((size, size), dtype=np.float64)
    n_needles = int(0.02 * size * size / 8) + 12
    starts = rng.uniform(0, size, (n_needles, 2))
    angles = rng.uniform(0, 2 * np.pi, n_needles)
    lengths = rng.uniform(0.08, 0.3, n_needles) * size
    strength = rng.uniform(0.35, 1.0, n_needles)
    segs = [(starts, angles, lengths, strength)]
    # side branches spawned along every needle
    n_br = 6
    frac = rng.uniform(0.15, 0.9, (n_needles, n_br))
    side = rng.choice([-1.0, 1.0], (n_needles, n_br))
    b_start = starts[:, None, :] + frac[..., None] * lengths[:, None, None] * np.stack(
        (np.cos(angles), np.sin(angles)), axis=-1
    )[:, None, :]
    b_angle = angles[:, None] + side * np.pi / 3
    b_len = lengths[:, None] * rng.uniform(0.15, 0.4, (n_needles, n_br))
    segs.append(
        (b_start.reshape(-1, 2), b_angle.ravel(), b_len.ravel(), np.repeat(strength * 0.8, n_br))
    )
    for st, ang, ln, s in segs:
        n_pts = int(np.ceil(ln.max() * 2)) + 1
        tt = np.linspace(0, 1, n_pts)[None, :] * ln[:, None]
        xs = (st[:, 0:1] + tt * np.cos(ang)[:, None]) % size
        ys = (st[:, 1:2] + tt * np.sin(ang)[:, None]) % size
        # needles fade towards their tips
        wts = s[:, None] * (1.0 - 0.6 * tt / np.maximum(ln[:, None], 1e-6))
        np.add.at(canvas, (ys.astype(int).ravel(), xs.astype(int).ravel()), wts.ravel())
    canvas = np.clip(canvas, 0, 1.5)
    canvas = ndimage.gaussian_filter(canvas, 0.6, mode="wrap")
    haze = plasma_fractal(1, next_pow2(size), 1.6, rng)[0, :size, :size]
    grain = ndimage.gaussian_filter(rng.uniform(0, 1, (size, size)), 0.8, mode="wrap")
    tex = 1.6 * canvas + 0.45 * haze + 0.25 * grain
    tex = (tex - tex.min()) / max(tex.max() - tex.min(), 1e-12)
    tex = np.clip(tex * 1.35, 0, 1)
    tint = np.array([0.86, 0.93, 1.0])[:, None, None]
    return (tint * tex[None] + 0.06).clip(0, 1).astype(np.float32)
