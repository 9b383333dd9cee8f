"""Photometric and digital corruptions: brightness, contrast, saturation, elastic
warps, pixelation, JPEG artefacts."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import _ops


def brightness(x: torch.Tensor, shift: float, rng: np.random.Generator) -> torch.Tensor:
    """Add ``shift`` to the HSV value (the largest channel), keeping hue and saturation.

    With hue and saturation fixed every channel is proportional to the value,
    so this is a per-pixel rescale; no full HSV round trip is needed.
    """
    x = x.clamp(0, 1)
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + shift).clamp(0, 1)
    return torch.where(v > 0, x * (v_new / v.clamp_min(1e-12)), v_new.expand_as(x))


def contrast(x: torch.Tensor, factor: float, rng: np.random.Generator) -> torch.Tensor:
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * factor + means


def saturate(x: torch.Tensor, p: tuple[float, float], rng: np.random.Generator) -> torch.Tensor:
    """Set the HSV saturation s to clip(s * scale + offset), keeping hue and value.

    With hue and value fixed, each channel sits at v - s * (v - c) / s_old, so the
    change is a per-pixel stretch of (v - c). Grey pixels have hue 0 (red) in
    HSV, so a positive offset tints them red, as the HSV round trip does.
    """
    scale, offset = p
    x = x.clamp(0, 1)
    v = x.amax(dim=1, keepdim=True)
    s = torch.where(v > 0, (v - x.amin(dim=1, keepdim=True)) / v.clamp_min(1e-12), torch.zeros_like(v))
    s_new = (s * scale + offset).clamp(0, 1)
    coloured = v - (v - x) * (s_new / s.clamp_min(1e-12))
    red = torch.tensor([0.0, 1.0, 1.0], dtype=x.dtype).view(1, 3, 1, 1)  # grey: hue 0 -> (v, v(1-s), v(1-s))
    grey = v * (1 - s_new * red)
    return torch.where(s > 1e-6, coloured, grey)


def elastic_transform(x: torch.Tensor, p: tuple[float, float, float], rng: np.random.Generator) -> torch.Tensor:
    """A random affine jitter composed with a smooth random displacement field.

    The affine part moves three points around the centre by up to ``jitter``;
    the elastic part is uniform noise smoothed by ``sigma`` and scaled by
    ``alpha``. Both are resolved into one sampling grid, so the image is
    resampled once (reflecting at the border).
    """
    n, _, h, w = x.shape
    size = min(h, w)
    alpha, sigma, jitter = (v * size for v in p)
    cy, cx = h / 2.0, w / 2.0
    s = size // 3
    src = np.array([[cx + s, cy + s], [cx + s, cy - s], [cx - s, cy - s]], dtype=np.float64)  # (3, [x, y])
    dst = src[None] + rng.uniform(-jitter, jitter, (n, 3, 2))
    # inverse map: for an output pixel at dst coordinates, where to read in the source
    ones = np.ones((n, 3, 1))
    a_dst = np.concatenate([dst, ones], axis=2)  # (N, 3, 3)
    inv = np.linalg.solve(a_dst, np.broadcast_to(src, (n, 3, 2)))  # (N, 3, 2): [x y 1] @ inv -> src
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    if alpha > 0:
        dx = _ops.smooth_field(rng.uniform(-1, 1, (n, h, w)), sigma) * alpha
        dy = _ops.smooth_field(rng.uniform(-1, 1, (n, h, w)), sigma) * alpha
    else:
        dx = dy = np.zeros((n, h, w))
    px, py = xx[None] + dx, yy[None] + dy
    sx = px * inv[:, 0, 0, None, None] + py * inv[:, 1, 0, None, None] + inv[:, 2, 0, None, None]
    sy = px * inv[:, 0, 1, None, None] + py * inv[:, 1, 1, None, None] + inv[:, 2, 1, None, None]
    grid = np.stack([2 * sx / (w - 1) - 1, 2 * sy / (h - 1) - 1], axis=-1).astype(np.float32)
    return F.grid_sample(x, torch.from_numpy(grid), mode="bilinear", padding_mode="reflection", align_corners=True)


def pixelate(x: torch.Tensor, factor: float, rng: np.random.Generator) -> torch.Tensor:
    """Box-filter down to ``factor`` of the size and box-filter back up (PIL's BOX
    resampling, on float planes so nothing is quantised)."""
    n, c, h, w = x.shape
    small = (max(1, int(w * factor)), max(1, int(h * factor)))
    planes = x.reshape(n * c, h, w).numpy()
    out = np.empty_like(planes)
    for i, plane in enumerate(planes):
        img = Image.fromarray(plane).resize(small, Image.Resampling.BOX)
        out[i] = np.asarray(img.resize((w, h), Image.Resampling.BOX))
    return torch.from_numpy(out).reshape(n, c, h, w)


def jpeg_compression(x: torch.Tensor, quality: int, rng: np.random.Generator) -> torch.Tensor:
    """Round-trip through a JPEG encoder at ``quality`` (8-bit, as any JPEG is)."""
    arr = (x.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = np.empty_like(arr)
    for i, img in enumerate(arr):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0
