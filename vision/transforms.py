"""Image transforms in plain torch (no torchvision).

Each transform works on a float tensor (C, H, W) or a batch (N, C, H, W), and
is also a ``datasets`` formatting callable: given a batch dict (what
``Dataset.set_transform`` / ``with_transform`` pass), it converts
``pixel_values`` (PIL images, numpy arrays, nested lists or tensors) to float
CHW tensors in [0, 1], applies itself to each image, and returns the batch with
``pixel_values`` replaced (stacked when all images share a shape)::

    ds.set_transform(Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), Normalize(MEAN, STD)]))

Random transforms draw per image from ``torch``'s global generator, or from
``generator`` if one is given, so DataLoader workers seeded by torch differ.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_KEY = "pixel_values"


def to_tensor(image: Any) -> torch.Tensor:
    """One image (PIL, numpy HWC/CHW, nested list CHW, or tensor CHW) -> float32 (C, H, W).

    Integer data is scaled from [0, 255] to [0, 1]; float data is kept. A PIL
    image is converted to RGB, so grey and palette images come out with 3 channels.
    """
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
    if isinstance(image, torch.Tensor):
        t = image
    else:
        arr = np.asarray(image)
        if arr.dtype == object:
            raise ValueError(f"cannot convert an image of ragged/object data (type {type(image).__name__}) to a tensor")
        t = torch.from_numpy(np.array(arr, copy=True))
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3:
        raise ValueError(f"an image must have rank 2 (H, W) or 3 (C, H, W) / (H, W, C), got shape {tuple(t.shape)}")
    if t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.permute(2, 0, 1)  # channels-last -> channels-first
    if not t.is_floating_point():
        t = t.float() / 255.0
    return t.float()


class Transform:
    """Base class: subclasses implement ``apply`` on one float (C, H, W) tensor."""

    def apply(self, image: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, data: Any) -> Any:
        if isinstance(data, dict):
            return self._call_batch(data)
        if isinstance(data, torch.Tensor) and data.ndim == 4:
            return torch.stack([self.apply(img) for img in data])
        if isinstance(data, torch.Tensor) and data.ndim == 3:
            return self.apply(data)
        return self.apply(to_tensor(data))

    def _call_batch(self, batch: dict) -> dict:
        if IMAGE_KEY not in batch:
            raise ValueError(f"a batch dict must have a {IMAGE_KEY!r} column, got columns {sorted(batch)}")
        images = batch[IMAGE_KEY]
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            items = list(images)
        else:
            items = [to_tensor(img) for img in images]
        out = [self.apply(img) for img in items]
        shapes = {tuple(o.shape) for o in out}
        result = dict(batch)
        result[IMAGE_KEY] = torch.stack(out) if len(shapes) == 1 and out else out
        return result

    def __repr__(self) -> str:
        fields_ = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields_})"


class Compose(Transform):
    """Apply transforms in order (the batch dict is converted once, not per transform)."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise ValueError(
                    f"Compose.transforms[{i}] must be a vision.transforms.Transform, got {type(t).__name__}"
                )
        self.transforms = list(transforms)

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            image = t.apply(image)
        return image


class ToTensor(Transform):
    """Only the conversion to float CHW in [0, 1]; useful as the first step of a pipeline."""

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        return image


def _size_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{name} must be an int >= 1 or a pair (height, width) of them, got {value!r}")
    return pair  # type: ignore[return-value]


class Resize(Transform):
    """Resize to ``size`` (an int: square) with antialiased bilinear interpolation."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size_pair(size, "Resize.size")

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        if tuple(image.shape[-2:]) == self.size:
            return image
        return F.interpolate(image[None], size=self.size, mode="bilinear", antialias=True, align_corners=False)[0]


class Normalize(Transform):
    """(x - mean) / std per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std):
            raise ValueError(f"Normalize.mean and .std must have the same length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize.std must be > 0 everywhere, got {list(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] != len(self.mean):
            raise ValueError(f"Normalize has {len(self.mean)} channels, the image has {image.shape[0]}")
        mean = torch.tensor(self.mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype).view(-1, 1, 1)
        return (image - mean) / std


class _Random:
    """Draws from ``generator``, or from torch's global generator when it is None."""

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator

    def rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def randint(self, high: int) -> int:
        return int(torch.randint(0, high, (), generator=self.generator))


class RandomCrop(Transform):
    """Pad by ``padding`` on every side (zeros, or ``padding_mode`` 'reflect' / 'replicate'),
    then crop ``size`` at a random position."""

    def __init__(
        self,
        size: int | Sequence[int],
        padding: int = 0,
        padding_mode: str = "constant",
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = _size_pair(size, "RandomCrop.size")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"RandomCrop.padding must be an int >= 0, got {padding!r}")
        if padding_mode not in ("constant", "reflect", "replicate"):
            raise ValueError(
                f"RandomCrop.padding_mode must be 'constant', 'reflect' or 'replicate', got {padding_mode!r}"
            )
        self.padding, self.padding_mode = padding, padding_mode
        self._rng = _Random(generator)

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        if self.padding:
            p = self.padding
            image = F.pad(image[None], (p, p, p, p), mode=self.padding_mode)[0]
        h, w = image.shape[-2:]
        th, tw = self.size
        if th > h or tw > w:
            raise ValueError(f"RandomCrop.size {self.size} is larger than the (padded) image {(h, w)}")
        top = self._rng.randint(h - th + 1)
        left = self._rng.randint(w - tw + 1)
        return image[..., top : top + th, left : left + tw]


class RandomHorizontalFlip(Transform):
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip.p must be in [0, 1], got {p!r}")
        self.p = float(p)
        self._rng = _Random(generator)

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        return torch.flip(image, dims=(-1,)) if self._rng.rand() < self.p else image


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cifar_train_transform(size: int = 32) -> Compose:
    """The usual CIFAR augmentation: 4-pixel padded random crop, random flip, normalise."""
    return Compose([RandomCrop(size, padding=4), RandomHorizontalFlip(), Normalize(CIFAR_MEAN, CIFAR_STD)])


def cifar_eval_transform() -> Compose:
    return Compose([Normalize(CIFAR_MEAN, CIFAR_STD)])
