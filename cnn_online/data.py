"""The task streams of the CNN recipe: a source domain to pre-train on, then ``--task`` target domains.

=========  ==========================================  ==============================================
dataset    source (pre-training)                       targets, in order (cycled past the last)
=========  ==========================================  ==============================================
digits     ``digits`` (scikit-learn's, up-sampled)     ``digits-domains``: mnist-m, svhn, usps
cifar10-c  ``cifar10`` in ``--data_dir``               the 15 CIFAR-10-C corruptions at ``--severity``
office31   Office-31 ``amazon`` in ``--data_dir``      ``dslr``, ``webcam``
=========  ==========================================  ==============================================

A digits domain revisited (``--task`` above 3) is rendered again with the next ``style_seed``: new
backgrounds and colours, the same digits. Office-31 images are decoded once, at ``--image_size``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mpopt_hf.config import check_choice, check_int, check_str

DATASETS = ("digits", "cifar10-c", "office31")
NEEDS_DATA_DIR = {
    "cifar10-c": "the folder holding CIFAR-10-C/ (the .npy release) and, to pre-train on clean CIFAR-10, "
                 "cifar-10-batches-py/",
    "office31": "the Office-31 folder holding amazon/, dslr/ and webcam/",
}
DIGIT_DOMAINS = ("mnist-m", "svhn", "usps")
OFFICE_SOURCE, OFFICE_TARGETS = "amazon", ("dslr", "webcam")
DIGITS_SIZE = 16


def _corruptions() -> tuple[str, ...]:
    from vision.corruptions import CORRUPTIONS

    return CORRUPTIONS


def target_domains(dataset: str) -> tuple[str, ...]:
    """The target domains of ``dataset`` in stream order."""
    return {"digits": DIGIT_DOMAINS, "cifar10-c": _corruptions(), "office31": OFFICE_TARGETS}[dataset]


@dataclass
class DataArguments:
    dataset: str = field(default="digits", metadata={"help": f"One of {list(DATASETS)} (the seed's --dataset)."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "cifar10-c, office31: the data folder (else $MPOPT_DATA_DIR). digits is built in."},
    )
    task: int | None = field(
        default=None,
        metadata={"help": "Number of target tasks in the stream (the seed's --task); past the last domain the stream "
                  "starts again. None: each target domain once (digits 3, cifar10-c 15, office31 2)."},
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": f"Side of the square images, pixels. None: {DIGITS_SIZE} on digits (the 8x8 digits hold no "
                  "more, and a step costs a quarter of 32x32's), 32 else (cifar10-c: 32 only)."},
    )
    severity: int = field(default=5, metadata={"help": "cifar10-c: corruption severity 1..5."})
    train_per_task: int = field(default=512, metadata={"help": "At most this many training images per task."})
    test_per_task: int = field(default=360, metadata={"help": "At most this many test (and val) images per task."})
    stream_seed: int = field(default=0, metadata={"help": "Seed of the splits and of the domains' rendering."})

    def __post_init__(self) -> None:
        where = "DataArguments."
        check_choice(where + "dataset (--dataset)", self.dataset, DATASETS)
        check_str(where + "data_dir (--data_dir)", self.data_dir, "a folder path or None", optional=True)
        if self.dataset in NEEDS_DATA_DIR:
            root = self.data_dir if self.data_dir is not None else os.environ.get("MPOPT_DATA_DIR")
            if root is None:
                raise ValueError(f"DataArguments.data_dir: --dataset {self.dataset} needs --data_dir DIR, "
                                 f"{NEEDS_DATA_DIR[self.dataset]} (or set $MPOPT_DATA_DIR); nothing is downloaded. "
                                 "--dataset digits runs offline.")
            if not os.path.isdir(os.path.expanduser(root)):
                raise ValueError(f"DataArguments.data_dir (--data_dir) {root!r} is not a folder; expected "
                                 f"{NEEDS_DATA_DIR[self.dataset]}.")
        elif self.data_dir is not None:
            raise ValueError(f"DataArguments.data_dir {self.data_dir!r} is given but the data set 'digits' is built "
                             "in and reads no folder; --data_dir is for cifar10-c and office31 (or leave it out).")
        self.task = check_int(where + "task (--task)", self.task, lambda v: v >= 1, "an int >= 1 or None",
                              optional=True)
        self.image_size = check_int(where + "image_size", self.image_size, lambda v: v >= 8, "an int >= 8 or None",
                                    optional=True)
        if self.image_size is None:
            self.image_size = DIGITS_SIZE if self.dataset == "digits" else 32
        if self.dataset == "cifar10-c" and self.image_size != 32:
            raise ValueError(f"DataArguments.image_size {self.image_size}: cifar10-c images are 32x32; "
                             "leave --image_size at 32.")
        self.severity = check_int(where + "severity", self.severity, lambda v: 1 <= v <= 5, "an int in 1..5")
        self.train_per_task = check_int(where + "train_per_task", self.train_per_task, lambda v: v >= 1,
                                        "an int >= 1")
        self.test_per_task = check_int(where + "test_per_task", self.test_per_task, lambda v: v >= 1, "an int >= 1")
        self.stream_seed = check_int(where + "stream_seed", self.stream_seed, lambda v: v >= 0, "an int >= 0")

    @property
    def root(self) -> str | None:
        return self.data_dir if self.data_dir is not None else os.environ.get("MPOPT_DATA_DIR")

    def plan(self) -> list[tuple[str, int]]:
        """The targets as (domain, visit): ``--task`` of them, cycling through the dataset's domains."""
        domains = target_domains(self.dataset)
        n = len(domains) if self.task is None else self.task
        return [(domains[i % len(domains)], i // len(domains)) for i in range(n)]


def _in_memory(ds):
    """A lazily decoded (image-file) dataset as float arrays, so every consumer may ``with_format("torch")``."""
    from vision import arrow

    images, labels = arrow.to_arrays(ds)
    return arrow.from_arrays(images, labels, arrow.class_names(ds))


def _task(name: str, domain: dict, build) -> object:
    from vision.streams import Task

    return Task(name, build("train"), build("val"), build("test"), domain)


def load_stream(data: DataArguments, with_source: bool = True):
    """``(class_names, source_task or None, target_tasks)``; the source's train split is whole (it pre-trains),
    every other split holds at most ``train_per_task`` / ``test_per_task`` images."""
    import vision
    from online_recipe import at_most
    from vision.streams import cifar10c_stream

    cap = {"train": data.train_per_task, "val": data.test_per_task, "test": data.test_per_task}
    size, seed = data.image_size, data.stream_seed
    source = None
    if data.dataset == "digits":
        if with_source:
            source = _task("digits", {"domain": "digits"}, lambda split: vision.load(
                "digits", split=split, image_size=size, seed=seed, max_samples=None if split == "train" else cap[split]))
        targets = [
            _task(domain if visit == 0 else f"{domain}#{visit + 1}", {"domain": domain, "style_seed": seed + visit},
                  lambda split, d=domain, v=visit: vision.load(
                      "digits-domains", split=split, domain=d, image_size=size, seed=seed, style_seed=seed + v,
                      max_samples=cap[split]))
            for domain, visit in data.plan()
        ]
    elif data.dataset == "cifar10-c":
        if with_source:
            source = _task("cifar10", {"domain": "clean"}, lambda split: vision.load(
                "cifar10", root_dir=data.root, split=split, seed=seed,
                max_samples=None if split == "train" else cap[split]))
        targets = cifar10c_stream(data.root, corruptions=[d for d, _ in data.plan()], severity=data.severity,
                                  max_samples_per_task=max(cap.values()), seed=seed)
        for task, (_, visit) in zip(targets, data.plan()):
            task.name = task.name if visit == 0 else f"{task.name}#{visit + 1}"
            task.train = at_most(task.train, cap["train"], seed)
            task.val, task.test = at_most(task.val, cap["val"], seed + 1), at_most(task.test, cap["test"], seed + 2)
    else:
        def office(domain: str, split: str, whole: bool = False):
            return _in_memory(vision.load("office31", root_dir=data.root, split=split, domain=domain, image_size=size,
                                          seed=seed, max_samples=None if whole else cap[split]))

        if with_source:
            source = _task(OFFICE_SOURCE, {"domain": OFFICE_SOURCE},
                           lambda split: office(OFFICE_SOURCE, split, whole=split == "train"))
        targets = [_task(domain if visit == 0 else f"{domain}#{visit + 1}", {"domain": domain},
                         lambda split, d=domain: office(d, split)) for domain, visit in data.plan()]
    classes = list(vision.get_info(data.dataset).classes)
    return classes, source, targets
