"""``cifar10`` and ``cifar100`` from the python-pickle folders that
https://www.cs.toronto.edu/~kriz/cifar.html distributes:

    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <root>/cifar-100-python/{train, test, meta}

(``root_dir`` may also be the folder itself). Each pickle is a dict with
``data`` (N x 3072 uint8, channel-major 32x32) and ``labels`` /
``fine_labels``; the meta file holds the class names, which are checked
against the registered order.

The pickles are read with a restricted unpickler (:class:`_BatchUnpickler`):
a pickle can name any importable callable and have it called, so a plain
``pickle.load`` of a received folder runs whatever the file asks for. Only the
globals a CIFAR batch needs (numpy's array, dtype and scalar reconstruction,
a few builtin containers) are admitted; any other global raises
:class:`vision.errors.UnsafePickleError` before it is called.
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import DataLayoutError, UnsafePickleError
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


def _numpy_attr(submodule: str, attr: str):
    """``numpy._core.<submodule>.<attr>`` (numpy >= 2), else ``numpy.core.<submodule>.<attr>`` (numpy 1.x)."""
    try:
        module = importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:  # numpy 1.x
        module = importlib.import_module(f"numpy.core.{submodule}")
    return getattr(module, attr)


_LATIN1_NAMES = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "iso_8859_1", "l1"})


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol 0-2 pickles written by Python 3 use it for bytes: (str, 'latin1') only."""
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1_NAMES:
        raise pickle.UnpicklingError(
            f"_codecs.encode is admitted only as (str, 'latin1'), got ({type(text).__name__}, {encoding!r})"
        )
    return text.encode("latin1", errors="strict")


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], object]:
    """(module, name) -> object, for every global a CIFAR batch pickle may name.

    Python 2 (the original CIFAR release) writes ``__builtin__`` and
    ``numpy.core``; numpy 2 writes ``numpy._core``; protocol 5 writes arrays
    through ``_frombuffer``. Each name maps to the object itself, so nothing is
    imported by the name a file gives. None of these runs code from the file:
    they build arrays, dtypes and scalars from raw bytes, or plain containers.
    """
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _numpy_attr("multiarray", "_reconstruct")
        allowed[(f"{core}.multiarray", "scalar")] = _numpy_attr("multiarray", "scalar")
        allowed[(f"{core}.numeric", "_frombuffer")] = _numpy_attr("numeric", "_frombuffer")
    for builtins_name in ("builtins", "__builtin__"):
        for kind in (set, frozenset, bytearray, complex):
            allowed[(builtins_name, kind.__name__)] = kind
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that admits only the globals of :func:`_allowed_globals`."""

    def __init__(self, file, path: str, dataset: str) -> None:
        super().__init__(file, encoding="bytes")
        self._path, self._dataset = path, dataset
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(self._dataset, self._path, f"{module}.{name}") from None


def _unpickle(path: str, dataset: str, required: tuple[str, ...]) -> dict:
    """The dict in CIFAR pickle ``path``, str keys; ``required`` keys must be present."""
    with open(path, "rb") as f:
        try:
            raw = _BatchUnpickler(f, path, dataset).load()
        except UnsafePickleError:
            raise
        except Exception as err:  # truncated, garbled, or admitted globals fed bad arguments
            raise DataLayoutError(
                dataset,
                "a CIFAR python batch (a pickled dict with numpy 'data' and a label list)",
                f"{os.path.abspath(path)} (not a readable CIFAR pickle: {type(err).__name__}: {err})",
                HOW_TO_GET,
            ) from err
    if not isinstance(raw, dict):
        raise DataLayoutError(
            dataset, "a CIFAR python batch (a pickled dict)",
            f"{os.path.abspath(path)} (holds a {type(raw).__name__}, not a dict)", HOW_TO_GET,
        )
    out = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    missing = [k for k in required if k not in out]
    if missing:
        raise DataLayoutError(
            dataset, f"a CIFAR python batch with keys {list(required)}",
            f"{os.path.abspath(path)} (missing {missing}; keys: {sorted(map(str, out))})", HOW_TO_GET,
        )
    return out


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
        found = _names(_unpickle(os.path.join(folder, self.meta_file), name, (self.meta_key,))[self.meta_key])
        chunks = [_unpickle(os.path.join(folder, f), name, ("data", self.label_key)) for f in files]
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
