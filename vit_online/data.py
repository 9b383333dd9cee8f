"""The ViT recipe's streams: a clean source domain to pre-train on, then one task per corruption.

=========  ==============================================  =====================================================
dataset    source (pre-training, ``--pretrain_steps``)     targets, in order
=========  ==============================================  =====================================================
digits     ``digits`` (scikit-learn's, up-sampled)         the digits under each of ``--corruptions`` (vision's
                                                           CIFAR-10-C-style corruptions, fresh images per task)
cifar10-c  ``cifar10`` in ``--data_dir``                   the released corruptions at ``--severity``
           (``cifar-10-batches-py/``; read only when
           pre-training)
=========  ==============================================  =====================================================

Images stay at the data set's size (digits ``--image_size``, CIFAR 32 px); the model resizes them to its own
(`vit_online.modeling`), so a stream costs the same memory whichever ViT it feeds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mpopt_hf.config import check_choice, check_int, check_list, check_str
from online_recipe.arguments import CorruptedImagesArguments, check_corruption_table
from online_recipe.arguments import IMAGE_DATASETS as DATASETS

DIGITS_SIZE = 16  # the 8x8 digits hold no more; with patch 4 a 16 px image is 16 patches (32 px: 64, 4x the cost)
NEEDS_DATA_DIR = ("the folder holding CIFAR-10-C/ (the .npy release) and, to pre-train on clean CIFAR-10, "
                  "cifar-10-batches-py/")


@dataclass
class DataArguments(CorruptedImagesArguments):
    data_dir: str | None = field(
        default=None, metadata={"help": "cifar10-c: the data folder (else $MPOPT_DATA_DIR). digits is built in."}
    )
    image_size: int | None = field(
        default=None, metadata={"help": f"digits: side of the square images, pixels. None: {DIGITS_SIZE} on digits, "
                                "32 on cifar10-c (its only size)."}
    )
    train_per_task: int = field(default=512, metadata={"help": "At most this many training images per task."})
    test_per_task: int = field(default=360, metadata={"help": "At most this many test (and val) images per task."})
    stream_seed: int = field(default=0, metadata={"help": "Seed of the splits and of the corruption noise."})

    def __post_init__(self) -> None:
        from vision.corruptions import ALL_CORRUPTIONS

        where = "DataArguments."
        check_choice(where + "dataset (--dataset)", self.dataset, DATASETS)
        check_str(where + "data_dir (--data_dir)", self.data_dir, "a folder path or None", optional=True)
        if self.dataset == "cifar10-c":
            if self.root is None:
                raise ValueError(f"DataArguments.data_dir: --dataset cifar10-c needs --data_dir DIR, {NEEDS_DATA_DIR} "
                                 "(or set $MPOPT_DATA_DIR); nothing is downloaded. --dataset digits runs offline.")
            if not os.path.isdir(os.path.expanduser(self.root)):
                raise ValueError(f"DataArguments.data_dir (--data_dir) {self.root!r} is not a folder; expected "
                                 f"{NEEDS_DATA_DIR}.")
        elif self.data_dir is not None:
            raise ValueError(f"DataArguments.data_dir {self.data_dir!r} is given but the data set 'digits' is built "
                             "in and reads no folder; --data_dir is for cifar10-c (or leave it out).")
        self.corruptions = check_list(where + "corruptions (--corruptions)", self.corruptions,
                                      lambda c: isinstance(c, str) and c in ALL_CORRUPTIONS,
                                      f"corruption names from {list(ALL_CORRUPTIONS)}")
        self.severity = check_int(where + "severity (--severity)", self.severity, lambda v: 1 <= v <= 5,
                                  "an int in 1..5")
        check_corruption_table(where, self.corruption_table, self.dataset)
        self.image_size = check_int(where + "image_size (--image_size)", self.image_size, lambda v: v >= 8,
                                    "an int >= 8 or None", optional=True)
        if self.image_size is None:
            self.image_size = DIGITS_SIZE if self.dataset == "digits" else 32
        if self.dataset == "cifar10-c" and self.image_size != 32:
            raise ValueError(f"DataArguments.image_size {self.image_size}: cifar10-c images are 32x32 (the model "
                             "resizes them to its own size); leave --image_size out.")
        for name in ("train_per_task", "test_per_task"):
            setattr(self, name, check_int(f"{where}{name} (--{name})", getattr(self, name), lambda v: v >= 1,
                                          "an int >= 1"))
        self.stream_seed = check_int(where + "stream_seed", self.stream_seed, lambda v: v >= 0, "an int >= 0")

    @property
    def root(self) -> str | None:
        return self.data_dir if self.data_dir is not None else os.environ.get("MPOPT_DATA_DIR")


def load_stream(data: DataArguments, with_source: bool = True):
    """``(class_names, source_task or None, target_tasks)``: the source's train split is whole (it pre-trains),
    every other split holds at most ``train_per_task`` / ``test_per_task`` images (random subsets by
    ``stream_seed``)."""
    import vision
    from online_recipe import at_most
    from vision.streams import Task, cifar10c_stream, corruption_stream

    cap = {"train": data.train_per_task, "val": data.test_per_task, "test": data.test_per_task}
    seed, source = data.stream_seed, None
    if data.dataset == "digits":
        # vision draws each task's images from the clean pool and corrupts them with a seed of its own
        targets = corruption_stream(data.corruptions, data.severity, source="digits", seed=seed,
                                    max_samples_per_task=max(cap.values()), image_size=data.image_size,
                                    table=data.corruption_table)
        if with_source:
            source = Task("digits", *(vision.load("digits", split=split, image_size=data.image_size, seed=seed,
                                                  max_samples=None if split == "train" else cap[split])
                                      for split in ("train", "val", "test")), {"domain": "clean"})
    else:
        targets = cifar10c_stream(data.root, corruptions=data.corruptions, severity=data.severity,
                                  max_samples_per_task=max(cap.values()), seed=seed)
        if with_source:
            source = Task("cifar10", *(vision.load("cifar10", root_dir=data.root, split=split, seed=seed,
                                                   max_samples=None if split == "train" else cap[split])
                                       for split in ("train", "val", "test")), {"domain": "clean"})
    for task in targets:
        task.train = at_most(task.train, cap["train"], seed)
        task.val, task.test = at_most(task.val, cap["val"], seed + 1), at_most(task.test, cap["test"], seed + 2)
    return list(vision.get_info(data.dataset).classes), source, targets
