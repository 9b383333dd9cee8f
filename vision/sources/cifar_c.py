"""``cifar10-c``: Hendrycks & Dietterich's CIFAR-10-C in its distributed ``.npy`` layout:

    <root>/CIFAR-10-C/<corruption>.npy   uint8 (5*n, 32, 32, 3): severity 1 first, n images each
    <root>/CIFAR-10-C/labels.npy         (5*n,) labels, the same n repeated per severity

(``root_dir`` may also be the folder itself; n is 10000 in the real data). One
corruption at one severity is one domain. The source has no train split, so
train/val/test are carved from its n images by seed — by image index, so the
same image is in the same split for every corruption and severity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..corruptions import ALL_CORRUPTIONS, check_corruption
from ..errors import DataLayoutError
from ..registry import register
from .base import RawImages, SplitSource, find_folder, resolve_root
from .cifar import CIFAR10_CLASSES

FOLDER = "CIFAR-10-C"
LAYOUT = f"<root_dir>/{FOLDER}/<corruption>.npy (uint8, 5 severities x n images of 32x32x3) and labels.npy"
HOW_TO_GET = (
    "download CIFAR-10-C.tar from https://zenodo.org/record/2535967 and extract it into root_dir, "
    "or build it from CIFAR-10 with vision.corrupt (nothing here downloads it for you)"
)


def _load_npy(path: str, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` with allow_pickle=False spelled out: an object-dtype .npy is a pickle and is refused."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except ValueError as err:  # object arrays (pickles), or not a .npy at all
        raise DataLayoutError(
            "cifar10-c", LAYOUT, f"{os.path.abspath(path)} (not a plain numeric .npy: {err})", HOW_TO_GET
        ) from err


@register(
    name="cifar10-c",
    classes=CIFAR10_CLASSES,
    class_aliases=[["automobile", "car"]],
    shift_type="Image Corruptions",
)
@dataclass
class CIFAR10C(SplitSource):
    corruption: str = field(default="gaussian_noise", metadata={"help": f"one of {ALL_CORRUPTIONS}"})
    severity: int = field(default=5, metadata={"help": "1..5"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_corruption(self.corruption, self.severity, name_arg="corruption")

    def read(self, root_dir: str | None, part: str) -> RawImages:
        root = resolve_root(root_dir, "cifar10-c", LAYOUT, HOW_TO_GET)
        folder = find_folder(root, [FOLDER], lambda d: os.path.isfile(os.path.join(d, "labels.npy")))
        if folder is None:
            raise DataLayoutError("cifar10-c", LAYOUT, f"{os.path.abspath(root)} (no labels.npy)", HOW_TO_GET)
        path = os.path.join(folder, f"{self.corruption}.npy")
        if not os.path.isfile(path):
            have = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".npy") and f != "labels.npy")
            raise DataLayoutError(
                "cifar10-c", LAYOUT, f"{os.path.abspath(path)} (missing; corruptions present: {have})", HOW_TO_GET
            )
        data = _load_npy(path, mmap_mode="r")
        labels = _load_npy(os.path.join(folder, "labels.npy"))
        if data.ndim != 4 or data.shape[1:] != (32, 32, 3) or data.shape[0] % 5 or labels.shape != (data.shape[0],):
            raise DataLayoutError(
                "cifar10-c",
                LAYOUT,
                f"{os.path.abspath(path)} (shape {data.shape}, labels {labels.shape})",
                HOW_TO_GET,
            )
        n = data.shape[0] // 5
        block = slice((self.severity - 1) * n, self.severity * n)
        images = np.ascontiguousarray(data[block]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        return RawImages(labels=np.asarray(labels[block], dtype=np.int64), images=images, where=path)
