"""Sensor noise: additive, photon (shot), salt-and-pepper and multiplicative."""

from __future__ import annotations

import numpy as np
import torch


def _noise(rng: np.random.Generator, shape: torch.Size, kind: str, **kw) -> torch.Tensor:
    draw = getattr(rng, kind)
    return torch.from_numpy(draw(size=tuple(shape), **kw).astype(np.float32))


def gaussian_noise(x: torch.Tensor, std: float, rng: np.random.Generator) -> torch.Tensor:
    return x + _noise(rng, x.shape, "normal", scale=std)


def shot_noise(x: torch.Tensor, photons: float, rng: np.random.Generator) -> torch.Tensor:
    counts = rng.poisson(x.numpy().astype(np.float64) * photons)
    return torch.from_numpy((counts / photons).astype(np.float32))


def impulse_noise(x: torch.Tensor, amount: float, rng: np.random.Generator) -> torch.Tensor:
    """Each value independently becomes 0 or 1 (equally likely) with probability ``amount``."""
    u = rng.random(tuple(x.shape))
    hit = torch.from_numpy(u < amount)
    salt = torch.from_numpy(u < amount / 2)  # the lower half of the hits
    out = torch.where(hit, torch.zeros_like(x), x)
    return torch.where(salt, torch.ones_like(x), out)


def speckle_noise(x: torch.Tensor, std: float, rng: np.random.Generator) -> torch.Tensor:
    return x + x * _noise(rng, x.shape, "normal", scale=std)
