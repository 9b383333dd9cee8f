"""``digits``: scikit-learn's 1797 handwritten digits (8x8, 16 grey levels), shipped
with scikit-learn, up-sampled to 32x32 RGB so CIFAR-size models and the
CIFAR-10-C corruptions apply unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import register
from .base import RawImages, SplitSource

CLASSES = tuple(str(d) for d in range(10))


@lru_cache(maxsize=4)
def digits_arrays(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 (N, 3, S, S) in [0, 1] (bilinear up-sampling) and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    images = x.expand(-1, 3, -1, -1).contiguous().numpy()
    images.setflags(write=False)  # cached: callers must copy before writing
    return images, bunch.target.astype(np.int64)


@register(name="digits", classes=CLASSES, task_type="Image Classification", shift_type=None)
@dataclass
class Digits(SplitSource):
    image_size: int = field(default=32, metadata={"help": "side of the up-sampled square image, pixels"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"Digits.image_size must be an int >= 8, got {self.image_size!r}")

    def read(self, root_dir: str | None, part: str) -> RawImages:
        images, labels = digits_arrays(self.image_size)
        return RawImages(labels=labels, images=images, where="sklearn.datasets.load_digits()")
