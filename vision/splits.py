"""The label bookkeeping every loader does: drop ignored classes, remap indices,
and carve train/val/test splits.

All of it works on index arrays, before any image is decoded or copied, so a
loader selects what it needs and reads only that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """How a source without its own val (or test) split is divided."""

    val_fraction: float = field(
        default=0.1, metadata={"help": "share of the source's train data carved out as val (per class)"}
    )
    test_fraction: float = field(
        default=0.2,
        metadata={"help": "share carved out as test, only for sources that have no test split of their own"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the deterministic split"})

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"SplitConfig.{name} must be a number in [0, 1), got {v!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"SplitConfig.val_fraction + test_fraction must be < 1 (something must be left to train on), "
                f"got {self.val_fraction} + {self.test_fraction}"
            )


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def keep_mask(labels: np.ndarray, classes: Sequence[str], ignore_classes: Sequence[str]) -> np.ndarray:
    """Boolean mask of the samples whose class is not ignored."""
    unknown = [c for c in ignore_classes if c not in classes]
    if unknown:
        raise ValueError(
            f"ignore_classes has names that are not classes of this dataset: {unknown}; classes: {list(classes)}"
        )
    ignored = [classes.index(c) for c in ignore_classes]
    return ~np.isin(labels, ignored)


def remap(labels: np.ndarray, idx_map: Mapping[int, int] | None) -> np.ndarray:
    """Labels after ``idx_map`` (original index -> new index); every remaining label must be mapped."""
    if idx_map is None:
        return labels
    present = np.unique(labels)
    missing = [int(v) for v in present if int(v) not in idx_map]
    if missing:
        raise ValueError(
            f"idx_map has no entry for class indices {missing} that remain after ignore_classes; "
            "map every kept class, or add the others to ignore_classes"
        )
    bad = {k: v for k, v in idx_map.items() if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0}
    if bad:
        raise ValueError(f"idx_map values must be ints >= 0, got {bad}")
    lut = np.full(max(int(present.max(initial=0)), max(idx_map, default=0)) + 1, -1, dtype=np.int64)
    for k, v in idx_map.items():
        if 0 <= int(k) < lut.size:
            lut[int(k)] = int(v)
    return lut[labels]


def mapped_class_names(classes: Sequence[str], idx_map: Mapping[int, int] | None) -> list[str]:
    """Names of the label indices after ``idx_map``: merged classes are joined with '|'."""
    if idx_map is None:
        return list(classes)
    size = max(idx_map.values(), default=-1) + 1
    names: list[list[str]] = [[] for _ in range(size)]
    for old, new in sorted(idx_map.items()):
        if 0 <= int(old) < len(classes):
            names[int(new)].append(classes[int(old)])
    return ["|".join(n) if n else f"unused_{i}" for i, n in enumerate(names)]


def _allocate(sizes: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Per-class counts summing to round(fraction * total), each close to fraction * size.

    Largest-remainder rounding, ties broken at random: with small classes
    (4 images, 10%) per-class rounding would give every class 0.
    """
    quota = fraction * sizes
    take = np.floor(quota).astype(np.int64)
    short = int(round(fraction * sizes.sum())) - int(take.sum())
    if short > 0:
        remainder = quota - take + rng.uniform(0, 1e-6, sizes.size)  # jitter breaks ties
        take[np.argsort(-remainder)[:short]] += 1
    return np.minimum(take, sizes)


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices into len(fractions)+1 parts, per class, deterministic for ``seed``.

    Part k gets about fraction_k of each class (exactly round(fraction_k * n) in
    all), the last part the rest; each part's indices come back sorted, so the
    original order is kept. Each class is shuffled by its own generator (seeded
    by ``seed`` and the class).
    """
    classes, sizes = np.unique(labels, return_counts=True)
    rng = np.random.default_rng([seed, 2**31])
    left = sizes.copy()
    counts = []
    for frac in fractions:
        take = np.minimum(_allocate(sizes, frac, rng), left)
        counts.append(take)
        left = left - take
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for ci, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.random.default_rng([seed, int(c)]).permutation(idx.size)]
        start = 0
        for k, take in enumerate(counts):
            parts[k].append(idx[start : start + take[ci]])
            start += take[ci]
        parts[-1].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def carve(labels: np.ndarray, split: str, cfg: SplitConfig, carve_val: bool, carve_test: bool) -> np.ndarray:
    """Indices of ``split`` among ``labels`` (a source's train part) when val and/or test
    must be carved out of it; ``split`` must be one of the carved parts or "train"."""
    check_split(split)
    names = [n for n, on in (("val", carve_val), ("test", carve_test)) if on]
    if split != "train" and split not in names:
        raise ValueError(f"carve: {split!r} is not carved out of train here (carved: {names})")
    fractions = [cfg.val_fraction if n == "val" else cfg.test_fraction for n in names]
    parts = stratified_split(labels, fractions, cfg.seed)
    return dict(zip(names + ["train"], parts))[split]


def select_split(labels: np.ndarray, split: str, cfg: SplitConfig, has_test: bool) -> np.ndarray:
    """Indices of ``split`` (train/val, or also test) in a source without its own val split.

    ``has_test``: the source ships its own test split (used as test as is), so
    ``labels`` is its train part and only val is carved out of it. Otherwise
    val and test are both carved out of ``labels``.
    """
    check_split(split)
    if has_test and split == "test":
        raise ValueError("select_split: the source's own test split is used as test, do not carve it")
    return carve(labels, split, cfg, carve_val=True, carve_test=not has_test)
