"""The shared ``create`` of the built-in sources: a source only says how to read
its images and labels (``read``), and this class does the registry contract's
filtering, remapping and splitting the same way for all of them.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Sequence

import datasets
import numpy as np

from .. import arrow
from ..errors import DataLayoutError
from ..registry import ImageDataset, check_class_order
from ..splits import SplitConfig, check_split, keep_mask, mapped_class_names, remap, select_split

DATA_DIR_ENV = "MPOPT_DATA_DIR"


@dataclass
class RawImages:
    """What ``read`` returns: labels plus either in-memory images or image files."""

    labels: np.ndarray
    images: np.ndarray | None = None  # float32 (N, 3, H, W) in [0, 1]
    paths: Sequence[str] | None = None
    found_classes: Sequence[str] | None = None  # class names as the data itself orders them, when it says
    where: str = ""  # where the data was read from, for messages


@dataclass
class SplitSource(ImageDataset):
    """Base of the built-in sources (the options every one of them has)."""

    seed: int = field(default=0, metadata={"help": "seed of the train/val(/test) split and of max_samples"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the train data carved out as val"})
    test_fraction: float = field(
        default=0.2, metadata={"help": "share carved out as test where the source has no test split"}
    )
    max_samples: int | None = field(
        default=None, metadata={"help": "keep at most this many samples of the split (random, by seed)"}
    )

    has_test_split: ClassVar[bool] = False  # the source ships its own test split

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{type(self).__name__}.seed must be an int >= 0, got {self.seed!r}")
        self.split_config = SplitConfig(self.val_fraction, self.test_fraction, self.seed)
        if self.max_samples is not None and (
            isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int) or self.max_samples < 1
        ):
            raise ValueError(f"{type(self).__name__}.max_samples must be None or an int >= 1, got {self.max_samples!r}")

    @abstractmethod
    def read(self, root_dir: str | None, part: str) -> RawImages:
        """Read ``part``: "train" or "test" of a source with its own test split, else "all"."""

    def default_transform(self, split: str) -> Callable | None:
        """The transform used when the caller gives none: plain [0, 1] tensors, no augmentation."""
        return None

    def filter_indices(
        self, labels: np.ndarray, idx: np.ndarray, classes: Sequence[str], ignore_classes: Sequence[str], split: str
    ) -> np.ndarray:
        """``idx`` without ignored classes, then cut to ``max_samples`` (a random subset by seed, order kept)."""
        idx = idx[keep_mask(labels[idx], classes, ignore_classes)]
        if self.max_samples is not None and idx.size > self.max_samples:
            rng = np.random.default_rng([self.seed, 1 + ("train", "val", "test").index(split)])
            idx = np.sort(rng.choice(idx, self.max_samples, replace=False))
        return idx

    def create(
        self,
        root_dir: str | None,
        split: str,
        transform: Callable | None,
        classes: Sequence[str] | None,
        ignore_classes: Sequence[str],
        idx_map: Mapping[int, int] | None,
    ) -> datasets.Dataset:
        check_split(split)
        if transform is None:
            transform = self.default_transform(split)
        if self.has_test_split:
            part = "test" if split == "test" else "train"
        else:
            part = "all"
        raw = self.read(root_dir, part)
        names = list(classes) if classes is not None else list(raw.found_classes or [])
        if classes is not None and raw.found_classes is not None:
            check_class_order(self.info.name, classes, raw.found_classes, raw.where or "the data")
        if raw.labels.size and (raw.labels.min() < 0 or raw.labels.max() >= len(names)):
            raise ValueError(
                f"{self.info.name}: labels in {raw.where or 'the data'} run from {raw.labels.min()} to "
                f"{raw.labels.max()}, but there are {len(names)} classes (labels must be 0..{len(names) - 1})"
            )
        # split first, on all classes, so a sample's split never depends on ignore_classes
        if part == "test":
            idx = np.arange(raw.labels.size)
        else:
            idx = select_split(raw.labels, split, self.split_config, has_test=self.has_test_split)
        idx = self.filter_indices(raw.labels, idx, names, ignore_classes, split)
        labels = remap(raw.labels[idx], idx_map)
        label_names = mapped_class_names(names, idx_map)
        if raw.images is not None:
            return arrow.from_arrays(raw.images[idx], labels, label_names, transform)
        if raw.paths is None:
            raise ValueError(f"{type(self).__name__}.read returned neither images nor paths")
        size = getattr(self, "image_size", None)
        if size is None:
            raise ValueError(f"{type(self).__name__} reads image files and needs an image_size option")
        return arrow.from_files([raw.paths[i] for i in idx], labels, label_names, size, transform)


def resolve_root(root_dir: str | None, dataset: str, expected: str, how_to_get: str) -> str:
    """``root_dir``, or ``$MPOPT_DATA_DIR`` when it is None; refuse a path that is not a folder."""
    root = root_dir if root_dir is not None else os.environ.get(DATA_DIR_ENV)
    if root is None:
        raise DataLayoutError(
            dataset, expected, f"nowhere: pass root_dir=... (or set ${DATA_DIR_ENV})", how_to_get
        )
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise DataLayoutError(dataset, expected, os.path.abspath(root) + " (not a folder)", how_to_get)
    return root


def find_folder(root: str, names: Sequence[str], is_it: Callable[[str], bool]) -> str | None:
    """``root`` itself or the first ``root/<name>`` for which ``is_it`` holds."""
    for cand in [root] + [os.path.join(root, n) for n in names]:
        if os.path.isdir(cand) and is_it(cand):
            return cand
    return None
