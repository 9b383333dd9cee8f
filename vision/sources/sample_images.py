"""``sample-images``: labelled patches cut from the photographs that scikit-image and
scikit-learn ship inside their wheels. The class of a patch is the photograph it
came from, so the task is "which picture is this piece of?" — real photographic
texture and colour with no download, for tests and for colour corruptions that
digits (grey) cannot show.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DataLayoutError
from ..registry import register
from .base import RawImages, SplitSource

# class name -> (package, file name inside the package's bundled data folder)
SOURCES: dict[str, tuple[str, str]] = {
    "china": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
    "astronaut": ("skimage", "astronaut.png"),
    "chelsea": ("skimage", "chelsea.png"),
    "coffee": ("skimage", "coffee.png"),
    "rocket": ("skimage", "rocket.jpg"),
    "hubble_deep_field": ("skimage", "hubble_deep_field.jpg"),
    "immunohistochemistry": ("skimage", "ihc.png"),
    "brick": ("skimage", "brick.png"),
    "grass": ("skimage", "grass.png"),
}
CLASSES: tuple[str, ...] = tuple(SOURCES)


def _bundled_path(package: str, filename: str) -> str:
    """Path of a file bundled in a wheel; never calls a fetcher (skimage's may download)."""
    if package == "sklearn":
        import sklearn.datasets

        folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    else:
        import skimage

        folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    return os.path.join(folder, filename)


def read_source_image(name: str) -> np.ndarray:
    """The photograph behind class ``name`` as uint8 (H, W, 3)."""
    package, filename = SOURCES[name]
    path = _bundled_path(package, filename)
    if not os.path.isfile(path):
        raise DataLayoutError(
            dataset="sample-images",
            expected=f"the image {filename!r} bundled with the installed {package} package",
            looked_in=path,
            how_to_get=f"reinstall {package} from a wheel (it ships the file); nothing is downloaded",
        )
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@dataclass(frozen=True)
class PatchConfig:
    """How patches are cut: the photo is first scaled so its shorter side is
    ``scale_to`` pixels, so a patch holds a recognisable piece, not a flat area."""

    patches_per_image: int = field(default=100, metadata={"help": "patches cut from each photograph"})
    patch_size: int = field(default=32, metadata={"help": "side of a square patch, pixels"})
    scale_to: int = field(default=96, metadata={"help": "shorter side of the photo before cutting, pixels"})
    seed: int = field(default=0, metadata={"help": "seed of the patch positions"})

    def __post_init__(self) -> None:
        for name in ("patches_per_image", "patch_size", "scale_to"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PatchConfig.{name} must be an int >= 1, got {v!r}")
        if self.scale_to < self.patch_size:
            raise ValueError(
                f"PatchConfig.scale_to ({self.scale_to}) must be >= patch_size ({self.patch_size})"
            )


def cut_patches(cfg: PatchConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All patches, float32 (N, 3, P, P) in [0, 1], and int64 labels (N,), class-major."""
    cfg = cfg or PatchConfig()
    rng = np.random.default_rng(cfg.seed)
    images, labels = [], []
    p = cfg.patch_size
    for label, name in enumerate(CLASSES):
        img = torch.from_numpy(read_source_image(name).copy()).permute(2, 0, 1)[None].float() / 255.0
        h, w = img.shape[-2:]
        scale = cfg.scale_to / min(h, w)
        size = (max(p, round(h * scale)), max(p, round(w * scale)))
        img = F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
        top = rng.integers(0, size[0] - p + 1, cfg.patches_per_image)
        left = rng.integers(0, size[1] - p + 1, cfg.patches_per_image)
        rows = (top[:, None] + np.arange(p))[:, None, :, None]
        cols = (left[:, None] + np.arange(p))[:, None, None, :]
        images.append(img.numpy()[np.arange(3)[None, :, None, None], rows, cols])
        labels.append(np.full(cfg.patches_per_image, label, dtype=np.int64))
    return np.concatenate(images).astype(np.float32), np.concatenate(labels)


@lru_cache(maxsize=4)
def _cached_patches(cfg: PatchConfig) -> tuple[np.ndarray, np.ndarray]:
    images, labels = cut_patches(cfg)
    images.setflags(write=False)
    return images, labels


@register(name="sample-images", classes=CLASSES, shift_type=None)
@dataclass
class SampleImages(SplitSource):
    patches_per_image: int = field(default=100, metadata={"help": "patches cut from each photograph"})
    patch_size: int = field(default=32, metadata={"help": "side of a square patch, pixels"})
    scale_to: int = field(default=96, metadata={"help": "shorter side of each photo before cutting, pixels"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.patches = PatchConfig(self.patches_per_image, self.patch_size, self.scale_to, self.seed)

    def read(self, root_dir: str | None, part: str) -> RawImages:
        images, labels = _cached_patches(self.patches)
        return RawImages(labels=labels, images=images, where="images bundled with scikit-image / scikit-learn")
