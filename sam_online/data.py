"""The recipe's data: a clean pool of box-prompted masks (generated shapes, or ``--data_dir``), then one task per
corruption of it.

Every sample has ``pixel_values`` float32 (3, S, S) in [0, 1], ``input_boxes`` float32 (1, 4) (``[x0, y0, x1, y1]``
in pixels) and ``labels`` float32 (S, S) 0/1, S being the model's input side. A task draws a random subset of each
clean split (at most ``train_per_task`` / ``test_per_task``) and corrupts its images with ``vision.corrupt``, with
seeds from ``(stream_seed, task index, split)``: the masks and boxes stay those of the clean image (a corruption
moves no object), and a stream is a pure function of its options.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import datasets
import numpy as np
import pyarrow as pa
from datasets.fingerprint import generate_random_fingerprint

from mpopt_hf.config import check_int, check_list, check_str
from online_recipe.arguments import CORRUPTION_TABLE_HELP, check_corruption_table

SPLITS = ("train", "val", "test")
# the corruptions that cost the source model most on 64 px shapes (fog, contrast -0.045 mIoU; frost -0.015; motion
# blur -0.007; gaussian / impulse noise, defocus / glass blur and pixelate at severity 5 cost it < 0.01)
DEFAULT_CORRUPTIONS = ("fog", "contrast", "frost", "motion_blur")
GENERATED = "shapes"  # the data set's name in results and cards when no --data_dir is given
FOLDER = "folder"


@dataclass
class DataArguments:
    data_dir: str | None = field(
        default=None,
        metadata={"help": "A folder of your own images and masks: DIR/images/NAME.png (or .jpg) and DIR/masks/NAME.png "
                  "(single channel, 0 = background, each other value one object; boxes are derived from the masks). "
                  "None: shapes on scikit-image's photographs, generated offline."},
    )
    corruptions: list[str] = field(default_factory=lambda: list(DEFAULT_CORRUPTIONS),
                                   metadata={"help": "The stream: one task per corruption (vision's names), in order."})
    severity: int = field(default=5, metadata={"help": "Corruption severity 1..5."})
    corruption_table: str = field(default="published", metadata={"help": CORRUPTION_TABLE_HELP})
    train_per_task: int = field(default=256, metadata={"help": "At most this many training samples per task."})
    test_per_task: int = field(default=128, metadata={"help": "At most this many test (and val) samples per task."})
    source_size: int = field(default=1024, metadata={"help": "Generated shapes: clean training samples to pre-train "
                                                     "on (the pool the tasks draw from)."})
    max_objects: int = field(default=3, metadata={"help": "Generated shapes: shapes per image, 1..8."})
    stream_seed: int = field(default=0, metadata={"help": "Seed of the shapes, the splits and the corruption noise."})

    def __post_init__(self) -> None:
        from vision.corruptions import ALL_CORRUPTIONS

        where = "DataArguments."
        check_str(where + "data_dir (--data_dir)", self.data_dir, "a folder path or None", optional=True)
        if self.data_dir is not None and not os.path.isdir(os.path.expanduser(self.data_dir)):
            raise ValueError(f"DataArguments.data_dir (--data_dir) {self.data_dir!r} is not a folder; expected one "
                             "holding images/ and masks/ (see --help), or leave it out for the generated shapes.")
        self.corruptions = check_list(where + "corruptions (--corruptions)", self.corruptions,
                                      lambda c: isinstance(c, str) and c in ALL_CORRUPTIONS,
                                      f"corruption names from {list(ALL_CORRUPTIONS)}")
        self.severity = check_int(where + "severity (--severity)", self.severity, lambda v: 1 <= v <= 5,
                                  "an int in 1..5")
        check_corruption_table(where, self.corruption_table)
        for name in ("train_per_task", "test_per_task", "source_size"):
            setattr(self, name, check_int(f"{where}{name} (--{name})", getattr(self, name), lambda v: v >= 1,
                                          "an int >= 1"))
        self.max_objects = check_int(where + "max_objects (--max_objects)", self.max_objects, lambda v: 1 <= v <= 8,
                                     "an int in 1..8")
        self.stream_seed = check_int(where + "stream_seed (--stream_seed)", self.stream_seed, lambda v: v >= 0,
                                     "an int >= 0")

    @property
    def name(self) -> str:
        """What the results and the card call the data set."""
        return GENERATED if self.data_dir is None else FOLDER


# ---------------------------------------------------------------------------- arrays -> datasets


def _array_column(array: np.ndarray) -> pa.Array:
    """(N, ...) float32 -> an Array2D/Array3D extension column, without a Python-object round trip."""
    shape = array.shape[1:]
    arr: pa.Array = pa.array(np.ascontiguousarray(array, dtype=np.float32).reshape(-1))
    for width in reversed(shape):
        count = len(arr) // width
        arr = pa.ListArray.from_arrays(pa.array(np.arange(count + 1, dtype=np.int32) * width), arr)
    kind = {2: datasets.features.features.Array2DExtensionType, 3: datasets.features.features.Array3DExtensionType}
    return pa.ExtensionArray.from_storage(kind[len(shape)](shape, "float32"), arr)


def to_dataset(images: np.ndarray, masks: np.ndarray, boxes: np.ndarray) -> datasets.Dataset:
    """A torch-formatted dataset of images (N, 3, S, S), masks (N, S, S) and boxes (N, 1, 4)."""
    n = len(images)
    if images.ndim != 4 or images.shape[1] != 3 or masks.shape != (n, *images.shape[2:]) or boxes.shape != (n, 1, 4):
        raise ValueError(f"to_dataset: expected images (N, 3, H, W), masks (N, H, W) and boxes (N, 1, 4), got "
                         f"{images.shape}, {masks.shape} and {boxes.shape}.")
    columns = {"pixel_values": images, "input_boxes": boxes, "labels": masks}
    features = datasets.Features({
        "pixel_values": datasets.Array3D(shape=tuple(images.shape[1:]), dtype="float32"),
        "input_boxes": datasets.Array2D(shape=(1, 4), dtype="float32"),
        "labels": datasets.Array2D(shape=tuple(masks.shape[1:]), dtype="float32"),
    })
    table = pa.table({k: _array_column(v) for k, v in columns.items()})
    # a random fingerprint: hashing the table costs more than building it, and nothing is cached on disk
    ds = datasets.Dataset(table, info=datasets.DatasetInfo(features=features),
                          fingerprint=generate_random_fingerprint())
    ds.set_format("torch")
    return ds


def to_arrays(dataset: datasets.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, masks, boxes) of a dataset `to_dataset` made."""
    with dataset.formatted_as("numpy"):
        rows = dataset[:]
    return rows["pixel_values"], rows["labels"], rows["input_boxes"]


# ---------------------------------------------------------------------------- the clean pool and the stream


def clean_pool(data: DataArguments, image_size: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """split -> (images, masks, boxes) of the clean domain at ``image_size``: generated shapes or ``data_dir``."""
    if data.data_dir is not None:
        from .folder import load_folder
        from .modeling import PIXEL_MEAN

        return load_folder(data.data_dir, image_size, seed=data.stream_seed, pad_value=PIXEL_MEAN)
    from .shapes import ShapesConfig, draw_samples

    cfg = ShapesConfig(image_size=image_size, max_objects=data.max_objects)
    sizes = {"train": max(data.source_size, data.train_per_task), "val": data.test_per_task,
             "test": data.test_per_task}
    return {split: draw_samples(sizes[split], (data.stream_seed, k), cfg) for k, split in enumerate(SPLITS)}


def _task(pool, name: str, index: int, corruption: str | None, data: DataArguments):
    from vision import Task, corrupt

    parts = {}
    for k, split in enumerate(SPLITS):
        images, masks, boxes = pool[split]
        rng = np.random.default_rng([data.stream_seed, index, k])
        cap = data.train_per_task if split == "train" else data.test_per_task
        whole = index == 0 and split == "train"  # the source pre-trains on its whole clean train split
        if not whole and len(images) > cap:
            keep = np.sort(rng.choice(len(images), cap, replace=False))
            images, masks, boxes = images[keep], masks[keep], boxes[keep]
        if corruption is not None:
            images = corrupt(np.ascontiguousarray(images), corruption, data.severity, seed=int(rng.integers(2**31)),
                             table=data.corruption_table)
        parts[split] = to_dataset(images, masks, boxes)
    domain = {} if corruption is None else {"corruption": corruption, "severity": data.severity}
    if corruption is not None and data.corruption_table != "published":
        domain["table"] = data.corruption_table  # vision.streams' convention: records say which rows made them
    return Task(name, parts["train"], parts["val"], parts["test"], domain)


def load_stream(data: DataArguments, image_size: int, with_source: bool = True):
    """``(source, targets)``: the clean task (None unless ``with_source``) and one task per corruption, in order."""
    pool = clean_pool(data, image_size)
    source = _task(pool, "clean", 0, None, data) if with_source else None
    targets = [_task(pool, f"{c}-{data.severity}", i, c, data) for i, c in enumerate(data.corruptions, start=1)]
    return source, targets
