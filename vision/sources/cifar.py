"""``cifar10`` and ``cifar100`` from the python-pickle folders that
https://www.cs.toronto.edu/~kriz/cifar.html distributes:

    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <root>/cifar-100-python/{train, test, meta}

(``root_dir`` may also be the folder itself). Each pickle is a dict with
``data`` (N x 3072 uint8, channel-major 32x32) and ``labels`` /
``fine_labels``; the meta file holds the class names, which are checked
against the registered order.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import DataLayoutError
from ..registry import register
from .base import RawImages, SplitSource, find_folder, resolve_root

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# fmt: off
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table",
    "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
# fmt: on
HOW_TO_GET = (
    "download the 'python version' tarball from https://www.cs.toronto.edu/~kriz/cifar.html "
    "and extract it into root_dir (nothing here downloads it for you)"
)


def _unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def _names(values: list) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _to_images(data: np.ndarray) -> np.ndarray:
    return (np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).astype(np.float32)) / 255.0


@dataclass
class _CifarPickles(SplitSource):
    has_test_split: ClassVar[bool] = True
    folder: ClassVar[str] = ""
    train_files: ClassVar[tuple[str, ...]] = ()
    test_file: ClassVar[str] = ""
    meta_file: ClassVar[str] = ""
    meta_key: ClassVar[str] = ""
    label_key: ClassVar[str] = ""

    def _layout(self) -> str:
        files = ", ".join(self.train_files + (self.test_file, self.meta_file))
        return f"<root_dir>/{self.folder}/ with {files} (python pickles)"

    def read(self, root_dir: str | None, part: str) -> RawImages:
        name = self.info.name
        root = resolve_root(root_dir, name, self._layout(), HOW_TO_GET)
        folder = find_folder(root, [self.folder], lambda d: os.path.isfile(os.path.join(d, self.meta_file)))
        if folder is None:
            raise DataLayoutError(name, self._layout(), os.path.abspath(root), HOW_TO_GET)
        files = self.train_files if part == "train" else (self.test_file,)
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise DataLayoutError(
                name, self._layout(), f"{os.path.abspath(folder)} (missing {', '.join(missing)})", HOW_TO_GET
            )
        found = _names(_unpickle(os.path.join(folder, self.meta_file))[self.meta_key])
        chunks = [_unpickle(os.path.join(folder, f)) for f in files]
        images = np.concatenate([_to_images(c["data"]) for c in chunks])
        labels = np.concatenate([np.asarray(c[self.label_key], dtype=np.int64) for c in chunks])
        return RawImages(labels=labels, images=images, found_classes=found, where=os.path.join(folder, self.meta_file))


@register(name="cifar10", classes=CIFAR10_CLASSES, class_aliases=[["automobile", "car"]], shift_type=None)
@dataclass
class CIFAR10(_CifarPickles):
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_file = "test_batch"
    meta_file = "batches.meta"
    meta_key = "label_names"
    label_key = "labels"


@register(name="cifar100", classes=CIFAR100_CLASSES, shift_type=None)
@dataclass
class CIFAR100(_CifarPickles):
    folder = "cifar-100-python"
    train_files = ("train",)
    test_file = "test"
    meta_file = "meta"
    meta_key = "fine_label_names"
    label_key = "fine_labels"
