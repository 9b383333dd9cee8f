"""``hf``: any image-classification dataset the ``datasets`` library can open.

``root_dir`` (or the ``path`` option) is either a folder written by
``save_to_disk``, a local folder ``load_dataset`` understands (e.g. ImageFolder:
``<dir>/<class>/<image>``), or a Hub id. Only a Hub id can download, and only
because the caller named it: no default points at the Hub.

The class list comes from the data's ``ClassLabel`` feature (the source is
registered with ``classes=None``). The source's test split is kept as test, its
validation split as val; whatever is missing is carved out of train by seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import datasets
import numpy as np
import pyarrow as pa
from datasets.fingerprint import generate_random_fingerprint

from .. import arrow
from ..errors import DataLayoutError
from ..registry import register
from ..splits import carve, check_split, mapped_class_names, remap
from .base import RawImages, SplitSource

VAL_NAMES = ("validation", "val", "valid", "dev")
LAYOUT = (
    "a datasets folder written by save_to_disk, a local ImageFolder (<dir>/<class>/<image>), or a Hub id; "
    "with an Image column and a ClassLabel column"
)
HOW_TO_GET = "pass root_dir= (or path=) pointing at one of those; a Hub id downloads only when you name it"


def open_any(path: str, config: str | None = None, cache_dir: str | None = None) -> datasets.DatasetDict:
    """Open ``path`` as a DatasetDict: saved folder, local folder, or Hub id."""
    if path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
        raise DataLayoutError("hf", LAYOUT, f"{os.path.abspath(os.path.expanduser(path))} (not a folder)", HOW_TO_GET)
    path = os.path.expanduser(path)
    saved = os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json", "dataset_info.json")
    )
    opened = datasets.load_from_disk(path) if saved else datasets.load_dataset(path, config, cache_dir=cache_dir)
    if isinstance(opened, datasets.Dataset):
        opened = datasets.DatasetDict({"train": opened})
    if not isinstance(opened, datasets.DatasetDict) or ("train" not in opened and len(opened) != 1):
        raise DataLayoutError("hf", LAYOUT, f"{path} (splits: {list(opened)})", HOW_TO_GET)
    if "train" not in opened:
        opened = datasets.DatasetDict({"train": next(iter(opened.values()))})
    return opened


def _column(ds: datasets.Dataset, kind: type, given: str | None, what: str, where: str) -> str:
    if given is not None:
        if given not in ds.features:
            raise ValueError(f"hf: {what}_column {given!r} is not a column of {where}; columns: {list(ds.features)}")
        return given
    for name, feat in ds.features.items():
        if isinstance(feat, kind):
            return name
    raise ValueError(
        f"hf: {where} has no {kind.__name__} column to use as the {what}; columns: {dict(ds.features)}; "
        f"pass {what}_column=..."
    )


@register(name="hf", classes=None, shift_type=None)
@dataclass
class HubImages(SplitSource):
    path: str | None = field(default=None, metadata={"help": "saved folder, local folder or Hub id (else root_dir)"})
    config: str | None = field(default=None, metadata={"help": "dataset configuration name, if it has several"})
    image_column: str | None = field(default=None, metadata={"help": "default: the first Image column"})
    label_column: str | None = field(default=None, metadata={"help": "default: the first ClassLabel column"})
    image_size: int = field(default=224, metadata={"help": "images are resized to this square size, pixels"})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets cache for load_dataset (default: HF's)"})

    def read(self, root_dir: str | None, part: str) -> RawImages:
        raise NotImplementedError("HubImages overrides create(): its splits come from the DatasetDict")

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
        where = self.path or root_dir
        if where is None:
            raise DataLayoutError("hf", LAYOUT, "nowhere: neither path= nor root_dir= was given", HOW_TO_GET)
        dd = open_any(str(where), self.config, self.cache_dir)
        val_name = next((n for n in VAL_NAMES if n in dd), None)
        has_val, has_test = val_name is not None, "test" in dd
        own = {"train": "train", "val": val_name, "test": "test" if has_test else None}[split]
        ds = dd[own] if own is not None else dd["train"]
        image_col = _column(ds, datasets.Image, self.image_column, "image", str(where))
        label_col = _column(ds, datasets.ClassLabel, self.label_column, "label", str(where))
        names = list(ds.features[label_col].names)
        labels = np.asarray(ds.with_format("numpy")[label_col], dtype=np.int64)
        if split == "train" or own is None:  # train, or a split carved out of train
            idx = carve(labels, split, self.split_config, carve_val=not has_val, carve_test=not has_test)
        else:
            idx = np.arange(labels.size)
        idx = self.filter_indices(labels, idx, names, ignore_classes, split)
        new_labels = remap(labels[idx], idx_map)
        # gather the (still encoded) image column with arrow: no decoding, no cache files
        images = ds.with_format("arrow")[idx.tolist()][image_col]
        label_feature = datasets.ClassLabel(names=mapped_class_names(names, idx_map))
        features = datasets.Features({arrow.IMAGE_KEY: datasets.Image(), arrow.LABEL_KEY: label_feature})
        table = pa.table({arrow.IMAGE_KEY: images, arrow.LABEL_KEY: pa.array(new_labels, type=pa.int64())})
        info = datasets.DatasetInfo(features=features)
        out = datasets.Dataset(table, info=info, fingerprint=generate_random_fingerprint())
        return arrow.set_image_transform(out, self.image_size, transform)
