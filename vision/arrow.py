"""Build the ``datasets.Dataset`` every loader returns: ``pixel_values`` (float CHW in
[0, 1]) and ``labels`` (a ``ClassLabel``, so the class names travel with the data).

Two storage forms, one output:

* in-memory arrays (digits, CIFAR, CIFAR-10-C, sample patches) are stored as
  float32 ``Array3D`` and formatted as torch: ``ds[i]["pixel_values"]`` is a
  (3, H, W) tensor with no per-access work;
* image files (Office-31, image folders) are stored as a lazily decoded
  ``Image`` column, still named ``pixel_values``; a formatting transform decodes,
  converts to RGB and resizes to a fixed size on access, so a folder of large
  photos never sits decoded in memory.

Because the stored column is already called ``pixel_values``, the HF Trainer's
``remove_unused_columns`` keeps it, whichever form it is.
"""

from __future__ import annotations

from typing import Callable, Sequence

import datasets
import numpy as np
import pyarrow as pa
from datasets.fingerprint import generate_random_fingerprint

from .transforms import Compose, Resize, ToTensor, Transform

IMAGE_KEY = "pixel_values"
LABEL_KEY = "labels"


def _array3d_column(images: np.ndarray) -> pa.Array:
    """(N, C, H, W) float32 -> an Array3D extension column, without a Python-object round trip."""
    n, c, h, w = images.shape
    flat = pa.array(np.ascontiguousarray(images, dtype=np.float32).reshape(-1))
    arr: pa.Array = flat
    for width in (w, h, c):
        count = len(arr) // width
        arr = pa.ListArray.from_arrays(pa.array(np.arange(count + 1, dtype=np.int32) * width), arr)
    ext_type = datasets.features.features.Array3DExtensionType((c, h, w), "float32")
    return pa.ExtensionArray.from_storage(ext_type, arr)


def from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    transform: Callable | None = None,
) -> datasets.Dataset:
    """A dataset from float images (N, 3, H, W) in [0, 1] and int labels (N,).

    Without ``transform`` it is formatted as torch; with one, the transform is
    set as its formatting function (it receives the batch dict, see
    ``vision.transforms``).
    """
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    features = datasets.Features(
        {
            IMAGE_KEY: datasets.Array3D(shape=tuple(images.shape[1:]), dtype="float32"),
            LABEL_KEY: datasets.ClassLabel(names=list(class_names)),
        }
    )
    table = pa.table({IMAGE_KEY: _array3d_column(images), LABEL_KEY: pa.array(labels)})
    # a random fingerprint: hashing the whole table costs more than building it, and an
    # in-memory dataset has no on-disk cache for a content fingerprint to find
    info = datasets.DatasetInfo(features=features)
    ds = datasets.Dataset(table, info=info, fingerprint=generate_random_fingerprint())
    return _format(ds, transform)


def from_files(
    paths: Sequence[str],
    labels: np.ndarray,
    class_names: Sequence[str],
    image_size: int | tuple[int, int],
    transform: Callable | None = None,
) -> datasets.Dataset:
    """A dataset over image files, decoded and resized to ``image_size`` on access."""
    features = datasets.Features(
        {IMAGE_KEY: datasets.Image(), LABEL_KEY: datasets.ClassLabel(names=list(class_names))}
    )
    ds = datasets.Dataset.from_dict(
        {IMAGE_KEY: list(paths), LABEL_KEY: np.asarray(labels, dtype=np.int64).tolist()}, features=features
    )
    return set_image_transform(ds, image_size, transform)


def set_image_transform(
    ds: datasets.Dataset, image_size: int | tuple[int, int], transform: Callable | None = None
) -> datasets.Dataset:
    """Format an ``Image``-column dataset: decode -> RGB -> resize -> ``transform``."""
    steps: list[Transform] = [ToTensor(), Resize(image_size)]
    pipeline = Compose(steps)
    if transform is None:
        ds.set_transform(pipeline)
    elif isinstance(transform, Transform):
        ds.set_transform(Compose(steps + [transform]))
    else:
        ds.set_transform(lambda batch: transform(pipeline(batch)))
    return ds


def _format(ds: datasets.Dataset, transform: Callable | None) -> datasets.Dataset:
    if transform is None:
        ds.set_format("torch", columns=[IMAGE_KEY, LABEL_KEY])
    else:
        ds.set_transform(transform)
    return ds


def to_arrays(ds: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """All images as float32 (N, 3, H, W) and labels (N,), whatever the storage form.

    Used to corrupt a clean dataset; only for data that fits in memory.
    """
    if isinstance(ds.features[IMAGE_KEY], datasets.Array3D):
        with ds.formatted_as("numpy", columns=[IMAGE_KEY, LABEL_KEY]):
            batch = ds[:]
        return np.asarray(batch[IMAGE_KEY], dtype=np.float32), np.asarray(batch[LABEL_KEY], dtype=np.int64)
    batch = ds[:]
    images = batch[IMAGE_KEY]
    if isinstance(images, list):
        raise ValueError("images in this dataset differ in size; resize them (image_size=...) before to_arrays")
    return images.numpy().astype(np.float32), np.asarray(batch[LABEL_KEY], dtype=np.int64)


def class_names(ds: datasets.Dataset) -> list[str]:
    """The class names carried by the ``labels`` feature."""
    return list(ds.features[LABEL_KEY].names)
