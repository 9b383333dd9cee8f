"""CIFAR-10-C-style corruptions of image batches.

``corrupt(images, name, severity, seed, table)`` applies one of the 15
benchmark corruptions of Hendrycks & Dietterich (``CORRUPTIONS``) or one of
their 4 extra ones (``EXTRA_CORRUPTIONS``) at a severity 1..5. ``table`` picks
the severity rows (``params.py``): ``"published"`` (the default) are the
CIFAR-10-C values, so results compare with papers; ``"monotone"`` replaces the
rows of ``MONOTONE_ROWS`` (glass_blur, frost, elastic_transform, motion_blur,
spatter, saturate) with ones that move an image further at every severity, for
streams that must get harder step by step.

Input: a float torch tensor or numpy array, shape (N, 3, H, W) with N >= 1 or
(3, H, W), values in [0, 1]. Output: the same type, shape and dtype, values in
[0, 1]. The parameters were made for 32x32 images; any H, W >= 8 works.
Refused with a ValueError: uint8 or channels-last data (convert with
``torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255``), float values
outside [0, 1] (beyond half a uint8 step, ``RANGE_SLACK``: divide 0..255 data
by 255, undo a mean/std normalization, or ``clamp(0, 1)`` a resize overshoot),
NaN or infinite values, and an empty batch.

With an int seed (default 0) the output is a pure function of (images, name,
severity, seed): all randomness comes from ``numpy.random.default_rng(seed)``,
never from a global generator. ``seed=None`` draws fresh OS entropy: each call
differs and is not reproducible.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import numpy as np
import torch

from . import blur, digital, noise, weather
from .params import DEFAULT_TABLE, MONOTONE_ROWS, PARAMS, PUBLISHED, TABLES, check_table

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

_FUNCS: dict[str, Callable] = {
    name: getattr(module, name)
    for module in (noise, blur, weather, digital)
    for name in ALL_CORRUPTIONS
    if hasattr(module, name)
}
# a developer error, caught at import: every table must have a row set for every corruption
if not all(set(_FUNCS) == set(ALL_CORRUPTIONS) == set(rows) for rows in TABLES.values()):
    raise RuntimeError("vision.corruptions: function table, names and severity TABLES are out of sync")

# float inputs may stray this far outside [0, 1] (half a uint8 step: rounding, float16) and are clamped;
# anything further is refused, since clamping it silently would change the image (e.g. 0..255 data turns white)
RANGE_SLACK = 0.5 / 255

# pixels per internal chunk (2048 CIFAR images): bounds the temporaries (grids, FFTs) for big inputs
_CHUNK_PIXELS = 2048 * 32 * 32

ArrayLike = TypeVar("ArrayLike", torch.Tensor, np.ndarray)


def check_corruption(name: str, severity: int, name_arg: str = "name") -> None:
    """Raise ValueError unless ``name`` is a known corruption and ``severity`` an int in 1..5.

    ``name_arg`` is what the caller calls the name argument (``corruption`` in
    the sources and streams), for the message.
    """
    if not isinstance(name, str) or name not in _FUNCS:
        raise ValueError(
            f"unknown corruption {name!r} (argument {name_arg}); accepted: {', '.join(ALL_CORRUPTIONS)} "
            f"(the first {len(CORRUPTIONS)} are the CIFAR-10-C benchmark set, vision.CORRUPTIONS)"
        )
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(
            f"severity must be an int in 1..5, got {severity!r} ({type(severity).__name__})"
        )


def corrupt(
    images: ArrayLike, name: str, severity: int, seed: int | None = 0, table: str = DEFAULT_TABLE
) -> ArrayLike:
    """Corrupt ``images`` with corruption ``name`` at ``severity`` (1..5) of severity table ``table``.

    ``images``: float, (N, 3, H, W) with N >= 1 or (3, H, W), values in [0, 1]
    (see the module docstring for what is refused). ``name``: one of
    ``ALL_CORRUPTIONS``. ``seed``: an int (default 0) makes the output
    deterministic: the same inputs and seed give the same output, on any
    machine; ``None`` draws fresh OS entropy, so each call differs and cannot be
    reproduced. Anything ``numpy.random.default_rng`` accepts works.
    ``table``: ``"published"`` (default, the CIFAR-10-C rows) or ``"monotone"``
    (see the module docstring); only the rows differ, never the rendering.
    """
    check_corruption(name, severity)
    check_table(table)
    x, restore = _as_batch(images)
    rng = np.random.default_rng(seed)
    fn, p = _FUNCS[name], TABLES[table][name][int(severity) - 1]
    chunk = max(1, _CHUNK_PIXELS // (x.shape[-2] * x.shape[-1]))
    with torch.no_grad():
        outs = [fn(x[i : i + chunk].contiguous(), p, rng).clamp_(0.0, 1.0) for i in range(0, x.shape[0], chunk)]
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return restore(out)


def _check_range(given: torch.Tensor) -> None:
    """Refuse non-finite values and values outside [0, 1] (beyond ``RANGE_SLACK``), saying how to rescale.

    ``given`` is the input as passed, checked in its own dtype (a float32 cast could overflow).
    """
    dtype = str(given.dtype).removeprefix("torch.")
    finite = torch.isfinite(given)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"images must be finite values in [0, 1], got {bad} NaN or infinite value(s) of {given.numel()}; "
            "replace or drop those images first"
        )
    lo, hi = (float(v) for v in torch.aminmax(given))
    slack = RANGE_SLACK + 1e-6  # + float32 rounding of the bound itself
    if lo >= -slack and hi <= 1.0 + slack:
        return
    if lo < -slack:
        how = (
            "they look mean/std-normalized: corrupt before normalizing, or undo it first "
            "(images * std + mean), or clamp(0, 1) if they only overshoot (e.g. after bicubic resizing)"
        )
    elif hi <= 1.5:
        how = "they overshoot 1 (e.g. after bicubic resizing or sharpening): clamp(0, 1) them first"
    elif hi <= 255.0 + slack:
        how = "they look like 0..255 pixel values: divide by 255 first (images / 255)"
    else:
        how = "rescale them to [0, 1] first (e.g. (images - min) / (max - min)), or clamp(0, 1) a small overshoot"
    raise ValueError(f"images must be floats in [0, 1], got {dtype} values in [{lo:.4g}, {hi:.4g}]; {how}")


def _as_batch(images: ArrayLike) -> tuple[torch.Tensor, Callable[[torch.Tensor], ArrayLike]]:
    """Validate and convert to a float32 (N, 3, H, W) tensor; return it and the inverse conversion."""
    is_numpy = isinstance(images, np.ndarray)
    if not is_numpy and not isinstance(images, torch.Tensor):
        raise ValueError(
            f"images must be a torch.Tensor or numpy.ndarray of shape (N, 3, H, W) or (3, H, W), "
            f"got {type(images).__name__}"
        )
    t = torch.from_numpy(np.ascontiguousarray(images)) if is_numpy else images
    if not t.is_floating_point():
        raise ValueError(
            f"images must be floating point in [0, 1] (float16/32/64), got dtype {t.dtype}; "
            "for uint8 images divide by 255 first"
        )
    if t.ndim not in (3, 4):
        raise ValueError(f"images must have rank 3 (3, H, W) or 4 (N, 3, H, W), got rank {t.ndim} {tuple(t.shape)}")
    single = t.ndim == 3
    b = t.unsqueeze(0) if single else t
    if b.shape[1] != 3:
        raise ValueError(
            f"images must be channels-first RGB: shape (N, 3, H, W) or (3, H, W), got {tuple(t.shape)}"
        )
    if b.shape[0] == 0:
        raise ValueError(
            f"images is an empty batch, shape {tuple(t.shape)}; pass at least one image (N >= 1), "
            "or skip the call when there is nothing to corrupt"
        )
    if b.shape[-1] < 8 or b.shape[-2] < 8:
        raise ValueError(f"images must be at least 8x8 pixels, got H={b.shape[-2]}, W={b.shape[-1]}")
    dtype, device = t.dtype, t.device
    _check_range(b.detach())
    x = b.detach().to(device="cpu", dtype=torch.float32).clamp(0.0, 1.0).contiguous()

    def restore(out: torch.Tensor) -> ArrayLike:
        out = out.to(dtype=dtype)
        if single:
            out = out[0]
        if is_numpy:
            return out.numpy()
        return out.to(device)

    return x, restore


__all__ = [
    "ALL_CORRUPTIONS",
    "CORRUPTIONS",
    "DEFAULT_TABLE",
    "EXTRA_CORRUPTIONS",
    "MONOTONE_ROWS",
    "PARAMS",
    "PUBLISHED",
    "RANGE_SLACK",
    "SEVERITIES",
    "TABLES",
    "check_corruption",
    "check_table",
    "corrupt",
]
