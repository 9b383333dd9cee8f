"""Task streams: the ordered domains an online learner retrains through.

A stream is a list of :class:`Task` s; each is one domain (a corruption at a
severity, an Office-31 camera, ...) with its own train/val/test datasets. The
builders:

* :func:`corruption_stream`  — cycle through corruptions at one severity, on a clean source;
* :func:`severity_stream`    — one corruption, severity 1 -> 5 -> 1 (gradual drift and recovery);
* :func:`digits_stream`      — clean digits, then corrupted digits;
* :func:`cifar10c_stream`    — the released (pre-corrupted) CIFAR-10-C, one task per corruption;
* :func:`office31_stream`    — Office-31 amazon -> dslr -> webcam from a root folder.

Each corruption task draws a fresh random subset of the clean source (at most
``max_samples_per_task`` per split) and corrupts it with a seed derived from
(seed, task index, split), so a stream is reproducible and no two tasks see the
same images in the same state. ``STREAMS`` maps a name to its builder, so one
recipe can take the stream kind as a flag.

The builders that corrupt a clean source take ``table``, the severity table of
``vision.corruptions`` (``"published"``, the CIFAR-10-C values, by default;
``"monotone"`` for a severity walk that must get harder at every step). A task
of a non-default table records it in ``domain["table"]``, so results say which
rows made them; the released CIFAR-10-C is published-only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import datasets
import numpy as np
from tqdm.auto import tqdm

from . import arrow, registry
from .corruptions import CORRUPTIONS, DEFAULT_TABLE, check_corruption, check_table, corrupt
from .errors import DataLayoutError
from .splits import SPLITS

DEFAULT_MAX_SAMPLES = 512


@dataclass
class Task:
    """One domain of a stream."""

    name: str
    train: datasets.Dataset
    val: datasets.Dataset
    test: datasets.Dataset
    domain: dict[str, Any] = field(default_factory=dict)  # what defines it, e.g. {"corruption": "fog", "severity": 5}

    @property
    def corruption(self) -> str | None:
        """The corruption of a corruption task (None for clean or Office-31 tasks)."""
        return self.domain.get("corruption")

    @property
    def severity(self) -> int | None:
        return self.domain.get("severity")

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def __repr__(self) -> str:
        return f"Task({self.name!r}, {self.sizes}, domain={self.domain})"


def _check_max(max_samples_per_task: int | None) -> None:
    if max_samples_per_task is not None and (
        isinstance(max_samples_per_task, bool) or not isinstance(max_samples_per_task, int) or max_samples_per_task < 1
    ):
        raise ValueError(f"max_samples_per_task must be None or an int >= 1, got {max_samples_per_task!r}")


def _clean_pool(source: str, root_dir: str | None, seed: int, options: dict) -> dict[str, tuple]:
    """The clean source's splits as arrays: split -> (images, labels, class names)."""
    pool = {}
    for split in SPLITS:
        ds = registry.build(source, root_dir=root_dir, split=split, seed=seed, **options)
        images, labels = arrow.to_arrays(ds)
        pool[split] = (images, labels, arrow.class_names(ds))
    return pool


def _task_from_pool(
    pool: dict[str, tuple],
    name: str,
    index: int,
    corruption: str | None,
    severity: int | None,
    max_samples: int | None,
    seed: int,
    transform: Callable | None,
    eval_transform: Callable | None,
    table: str = DEFAULT_TABLE,
) -> Task:
    parts = {}
    for k, split in enumerate(SPLITS):
        images, labels, names = pool[split]
        rng = np.random.default_rng([seed, index, k])
        if max_samples is not None and labels.size > max_samples:
            idx = np.sort(rng.choice(labels.size, max_samples, replace=False))
            images, labels = images[idx], labels[idx]
        if corruption is not None:
            images = corrupt(
                np.ascontiguousarray(images), corruption, severity, seed=int(rng.integers(2**31)), table=table
            )
        tf = transform if split == "train" else eval_transform
        parts[split] = arrow.from_arrays(images, labels, names, tf)
    domain = {} if corruption is None else {"corruption": corruption, "severity": severity}
    if corruption is not None and table != DEFAULT_TABLE:
        domain["table"] = table
    return Task(name, parts["train"], parts["val"], parts["test"], domain)


def _build(
    plan: Sequence[tuple[str | None, int | None]],
    source: str,
    root_dir: str | None,
    max_samples_per_task: int | None,
    seed: int,
    transform: Callable | None,
    eval_transform: Callable | None,
    source_options: dict,
    table: str = DEFAULT_TABLE,
) -> list[Task]:
    _check_max(max_samples_per_task)
    check_table(table)
    for corruption, severity in plan:
        if corruption is not None:
            check_corruption(corruption, severity, name_arg="corruption")
    pool = _clean_pool(source, root_dir, seed, source_options)
    tasks = []
    bar = tqdm(plan, desc=f"building {source} stream", unit="task", disable=len(plan) < 8, leave=False)
    for i, (corruption, severity) in enumerate(bar):
        name = "clean" if corruption is None else f"{corruption}-{severity}"
        tasks.append(
            _task_from_pool(
                pool, name, i, corruption, severity, max_samples_per_task, seed, transform, eval_transform, table
            )
        )
    return tasks


def corruption_stream(
    corruptions: Sequence[str] = CORRUPTIONS,
    severity: int = 5,
    source: str = "digits",
    root_dir: str | None = None,
    max_samples_per_task: int | None = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
    include_clean: bool = False,
    transform: Callable | None = None,
    eval_transform: Callable | None = None,
    table: str = DEFAULT_TABLE,
    **source_options: Any,
) -> list[Task]:
    """One task per corruption, in order, at ``severity`` of ``table`` (optionally preceded by the clean source)."""
    if isinstance(corruptions, str):
        corruptions = [corruptions]
    plan: list[tuple[str | None, int | None]] = [(None, None)] if include_clean else []
    plan += [(c, severity) for c in corruptions]
    if not plan:
        raise ValueError("corruption_stream: corruptions is empty and include_clean is False: no tasks")
    return _build(plan, source, root_dir, max_samples_per_task, seed, transform, eval_transform, source_options, table)


def severity_stream(
    corruption: str = "gaussian_noise",
    severities: Sequence[int] = (1, 2, 3, 4, 5, 4, 3, 2, 1),
    source: str = "digits",
    root_dir: str | None = None,
    max_samples_per_task: int | None = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
    transform: Callable | None = None,
    eval_transform: Callable | None = None,
    table: str = DEFAULT_TABLE,
    **source_options: Any,
) -> list[Task]:
    """One corruption whose severity drifts (default 1 -> 5 -> 1), rows from ``table``.

    A drift that must get harder at every step wants ``table="monotone"`` for
    the corruptions of ``vision.corruptions.MONOTONE_ROWS``.
    """
    if not severities:
        raise ValueError("severity_stream: severities is empty: no tasks")
    plan = [(corruption, s) for s in severities]
    return _build(plan, source, root_dir, max_samples_per_task, seed, transform, eval_transform, source_options, table)


def digits_stream(
    corruptions: Sequence[str] | str = ("gaussian_noise",),
    severity: int = 5,
    max_samples_per_task: int | None = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
    transform: Callable | None = None,
    eval_transform: Callable | None = None,
    table: str = DEFAULT_TABLE,
) -> list[Task]:
    """Clean digits, then digits under each corruption in turn (rows from ``table``)."""
    return corruption_stream(
        corruptions,
        severity,
        source="digits",
        max_samples_per_task=max_samples_per_task,
        seed=seed,
        include_clean=True,
        transform=transform,
        eval_transform=eval_transform,
        table=table,
    )


def cifar10c_stream(
    root_dir: str | None = None,
    corruptions: Sequence[str] | str = CORRUPTIONS,
    severity: int = 5,
    max_samples_per_task: int | None = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
    transform: Callable | None = None,
    eval_transform: Callable | None = None,
    table: str = DEFAULT_TABLE,
    **source_options: Any,
) -> list[Task]:
    """One task per corruption of the released CIFAR-10-C, at ``severity``, in order.

    Built on the registry's ``cifar10-c`` source (the ``.npy`` layout, see
    ``vision.sources.cifar_c``): train/val/test are carved by ``seed`` from that
    severity's images (10000 in the real data) by image index, and cut to
    ``max_samples_per_task`` per split by ``seed`` too, so every task holds the
    same base images under its own corruption. There is no clean task: the
    release has none. ``source_options`` go to the source (``val_fraction``,
    ``test_fraction``). A missing or misplaced folder raises
    :class:`vision.DataLayoutError` before any task is built. ``table`` is
    accepted so one recipe flag can serve every stream kind, but the release was
    rendered with the published rows: any other table is refused.
    """
    _check_max(max_samples_per_task)
    check_table(table)
    if table != "published":
        raise ValueError(
            f"cifar10c_stream: table={table!r}, but the released CIFAR-10-C was rendered with the published "
            "severity table; another table applies only to streams that corrupt a clean source "
            "(corruption_stream, severity_stream, digits_stream)"
        )
    if isinstance(corruptions, str):
        corruptions = [corruptions]
    if not corruptions:
        raise ValueError("cifar10c_stream: corruptions is empty: no tasks")
    for corruption in corruptions:
        check_corruption(corruption, severity, name_arg="corruption")
    for key in ("corruption", "severity", "max_samples", "seed"):
        if key in source_options:
            raise ValueError(f"cifar10c_stream: pass {key!r} through the stream's own arguments, not as a source option")
    _check_cifar10c_files(root_dir, corruptions)
    tasks = []
    bar = tqdm(corruptions, desc="building cifar10-c stream", unit="task", disable=len(corruptions) < 8, leave=False)
    for corruption in bar:
        parts = _all_splits(
            "cifar10-c", root_dir, transform, eval_transform, corruption=corruption, severity=severity, seed=seed,
            max_samples=max_samples_per_task, **source_options,
        )
        domain = {"corruption": corruption, "severity": severity}
        tasks.append(Task(f"{corruption}-{severity}", parts["train"], parts["val"], parts["test"], domain))
    return tasks


def _check_cifar10c_files(root_dir: str | None, corruptions: Sequence[str]) -> None:
    """Fail fast, naming every missing corruption file, instead of after loading the first tasks."""
    from .sources import cifar_c
    from .sources.base import find_folder, resolve_root

    root = resolve_root(root_dir, "cifar10-c", cifar_c.LAYOUT, cifar_c.HOW_TO_GET)
    folder = find_folder(root, [cifar_c.FOLDER], lambda d: os.path.isfile(os.path.join(d, "labels.npy")))
    if folder is None:
        raise DataLayoutError(
            "cifar10-c", cifar_c.LAYOUT, f"{os.path.abspath(root)} (no labels.npy)", cifar_c.HOW_TO_GET
        )
    missing = [c for c in corruptions if not os.path.isfile(os.path.join(folder, f"{c}.npy"))]
    if missing:
        have = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".npy") and f != "labels.npy")
        raise DataLayoutError(
            "cifar10-c",
            cifar_c.LAYOUT,
            f"{os.path.abspath(folder)} (missing: {[c + '.npy' for c in missing]}; corruptions present: {have})",
            cifar_c.HOW_TO_GET,
        )


def _all_splits(
    name: str, root_dir: str | None, transform: Callable | None, eval_transform: Callable | None, **options: Any
) -> dict[str, datasets.Dataset]:
    """Every split of a registered source; the train split gets ``transform``, the others ``eval_transform``."""
    return {
        split: registry.build(
            name, root_dir=root_dir, split=split, transform=transform if split == "train" else eval_transform, **options
        )
        for split in SPLITS
    }


def office31_stream(
    root_dir: str | None = None,
    domains: Sequence[str] = ("amazon", "dslr", "webcam"),
    image_size: int = 224,
    max_samples_per_task: int | None = None,
    seed: int = 0,
    transform: Callable | None = None,
    eval_transform: Callable | None = None,
) -> list[Task]:
    """Office-31 domains in order (default A -> D -> W); each domain split by seed."""
    _check_max(max_samples_per_task)
    tasks = []
    for domain in domains:
        parts = _all_splits(
            "office31", root_dir, transform, eval_transform, domain=domain, image_size=image_size, seed=seed,
            max_samples=max_samples_per_task,
        )
        tasks.append(Task(domain, parts["train"], parts["val"], parts["test"], {"domain": domain}))
    return tasks


STREAMS: dict[str, Callable[..., list[Task]]] = {
    "corruptions": corruption_stream,
    "severity": severity_stream,
    "digits": digits_stream,
    "cifar10-c": cifar10c_stream,
    "office31": office31_stream,
}


def build_stream(kind: str, **kwargs: Any) -> list[Task]:
    """``STREAMS[kind](**kwargs)``, with an error that lists the kinds."""
    if kind not in STREAMS:
        raise ValueError(f"unknown stream kind {kind!r}; accepted: {sorted(STREAMS)}")
    return STREAMS[kind](**kwargs)
