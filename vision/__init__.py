"""Offline image data for retraining under domain shift.

* a dataset registry (``register``, ``load``, ``available``) with built-in
  sources: ``digits`` and ``sample-images`` (shipped with scikit-learn /
  scikit-image, no download), ``digits-domains`` (MNIST-M-, SVHN- and
  USPS-style targets built from those digits), ``cifar10``, ``cifar100``, ``cifar10-c``,
  ``office31`` (from their standard folders) and ``hf`` (any ``datasets``
  image dataset);
* the CIFAR-10-C corruptions (``corrupt``, ``CORRUPTIONS``, ``EXTRA_CORRUPTIONS``), at the published CIFAR-10-C
  severities by default (``table="monotone"``: rows where every severity moves the image further, ``TABLES``);
* task streams (``vision.streams``) and plain-torch transforms (``vision.transforms``).

Every loader returns a ``datasets.Dataset`` with ``pixel_values`` (float CHW in
[0, 1]) and ``labels`` (a ``ClassLabel``), ready for the HF Trainer.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import datasets

from . import sources as _sources  # noqa: F401  (registers the built-in sources)
from . import streams, transforms
from .corruptions import ALL_CORRUPTIONS, CORRUPTIONS, DEFAULT_TABLE, EXTRA_CORRUPTIONS, SEVERITIES, TABLES, corrupt
from .errors import DataLayoutError, UnsafePickleError
from .registry import DatasetInfo, ImageDataset, available, build, get_info, register, unregister
from .streams import Task, build_stream


def load(
    name: str,
    root_dir: str | None = None,
    split: str = "train",
    transform: Callable | None = None,
    ignore_classes: Sequence[str] = (),
    idx_map: Mapping[int, int] | None = None,
    **options: Any,
) -> datasets.Dataset:
    """The ``split`` ("train", "val" or "test") of the registered dataset ``name``.

    ``root_dir`` is the data folder for sources that need one (default
    ``$MPOPT_DATA_DIR``); ``options`` are the source's own settings, e.g.
    ``corruption="fog", severity=3`` for ``cifar10-c`` or ``domain="dslr"`` for
    ``office31``, and ``seed``, ``val_fraction``, ``test_fraction``,
    ``max_samples`` for all built-ins.
    """
    return build(name, root_dir, split, transform, ignore_classes, idx_map, **options)


__all__ = [
    "ALL_CORRUPTIONS",
    "CORRUPTIONS",
    "DEFAULT_TABLE",
    "DataLayoutError",
    "DatasetInfo",
    "EXTRA_CORRUPTIONS",
    "ImageDataset",
    "SEVERITIES",
    "TABLES",
    "Task",
    "UnsafePickleError",
    "available",
    "build_stream",
    "corrupt",
    "get_info",
    "load",
    "register",
    "streams",
    "transforms",
    "unregister",
]
