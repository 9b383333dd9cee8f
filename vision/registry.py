"""The dataset registry: a name -> (class list, dataset class) table.

A data source is a subclass of :class:`ImageDataset` decorated with
:func:`register`::

    @register(name="cifar10", classes=["airplane", "automobile", ...],
              class_aliases=[["automobile", "car"]], task_type="Image Classification", shift_type=None)
    class CIFAR10(ImageDataset):
        def create(self, root_dir, split, transform, classes, ignore_classes, idx_map) -> datasets.Dataset: ...

``classes`` must list the class names in label order (``classes[i]`` is the
name of label ``i``): the registry refuses a dataset whose labels carry another
order. A name can be registered once. ``create`` must (1) fall back to a default
transform when given none, (2) read the source, (3) drop the samples of
``ignore_classes``, (4) remap labels through ``idx_map`` (original index -> new
index) and (5) return the ``split`` ("train", "val" or "test"): the source's own
test split is the test split, and val is carved out of train (deterministically
by seed) when the source has none. Most sources get all five from
:class:`vision.sources.base.SplitSource` and only implement ``read``.

The options of a source (seed, split fractions, a corruption, a domain, ...)
are the dataclass fields of its class, passed as keyword arguments to
:func:`load`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import datasets

from .arrow import LABEL_KEY
from .splits import check_split, mapped_class_names

TASK_TYPES = ("Image Classification",)


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`register` records about a data source."""

    name: str
    classes: tuple[str, ...] | None  # None: the source reads its class list from the data (e.g. "hf")
    class_aliases: tuple[tuple[str, ...], ...]
    task_type: str
    shift_type: str | None
    cls: type["ImageDataset"] = field(repr=False)

    def canonical(self, class_name: str) -> str:
        """The registered class a name or one of its aliases stands for (``car`` -> ``automobile``)."""
        if self.classes is not None and class_name in self.classes:
            return class_name
        for group in self.class_aliases:
            if class_name in group:
                for member in group:
                    if self.classes is None or member in self.classes:
                        return member
        raise ValueError(f"{self.name}: {class_name!r} is neither a class nor an alias of one")


@dataclass
class ImageDataset(ABC):
    """A data source. Subclasses are dataclasses: their fields are the source's options."""

    info: ClassVar[DatasetInfo]

    @abstractmethod
    def create(
        self,
        root_dir: str | None,
        split: str,
        transform: Callable | None,
        classes: Sequence[str] | None,
        ignore_classes: Sequence[str],
        idx_map: Mapping[int, int] | None,
    ) -> datasets.Dataset:
        """The ``split`` of this source as a dataset with ``pixel_values`` and ``labels``."""


_REGISTRY: dict[str, DatasetInfo] = {}


def register(
    name: str,
    classes: Sequence[str] | None,
    class_aliases: Sequence[Sequence[str]] = (),
    task_type: str = "Image Classification",
    shift_type: str | None = None,
) -> Callable[[type[ImageDataset]], type[ImageDataset]]:
    """Class decorator that adds a data source to the registry under ``name``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register: name must be a non-empty string, got {name!r}")
    class_tuple = _check_classes(name, classes)
    aliases = _check_aliases(name, class_tuple, class_aliases)
    if task_type not in TASK_TYPES:
        raise ValueError(f"register({name!r}): task_type must be one of {list(TASK_TYPES)}, got {task_type!r}")
    if shift_type is not None and (not isinstance(shift_type, str) or not shift_type.strip()):
        raise ValueError(f"register({name!r}): shift_type must be None or a non-empty string, got {shift_type!r}")

    def decorate(cls: type[ImageDataset]) -> type[ImageDataset]:
        if not (isinstance(cls, type) and issubclass(cls, ImageDataset)):
            raise ValueError(
                f"register({name!r}) must decorate a subclass of vision.registry.ImageDataset, got {cls!r}"
            )
        if name in _REGISTRY:
            other = _REGISTRY[name].cls
            raise ValueError(
                f"dataset name {name!r} is already registered (by {other.__module__}.{other.__qualname__}); "
                "choose another name, or call vision.registry.unregister(name) first"
            )
        info = DatasetInfo(name, class_tuple, aliases, task_type, shift_type, cls)
        cls.info = info
        _REGISTRY[name] = info
        return cls

    return decorate


def _check_classes(name: str, classes: Sequence[str] | None) -> tuple[str, ...] | None:
    if classes is None:
        return None
    if isinstance(classes, str) or not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"register({name!r}): classes must be a sequence of non-empty strings, got {classes!r}")
    dupes = sorted(c for c, k in Counter(classes).items() if k > 1)
    if dupes:
        raise ValueError(f"register({name!r}): classes has duplicates {dupes}; each label needs one name")
    if not classes:
        raise ValueError(f"register({name!r}): classes is empty; pass None if the source reads them from the data")
    return tuple(classes)


def _check_aliases(
    name: str, classes: tuple[str, ...] | None, class_aliases: Sequence[Sequence[str]]
) -> tuple[tuple[str, ...], ...]:
    groups = tuple(tuple(g) for g in class_aliases)
    seen: set[str] = set()
    for g in groups:
        if len(g) < 2 or not all(isinstance(a, str) and a for a in g):
            raise ValueError(f"register({name!r}): each class_aliases group must list >= 2 names, got {list(g)}")
        if classes is not None and not any(a in classes for a in g):
            raise ValueError(
                f"register({name!r}): class_aliases group {list(g)} names no registered class; "
                "a group must contain the class it is an alias of"
            )
        overlap = seen.intersection(g)
        if overlap:
            raise ValueError(f"register({name!r}): {sorted(overlap)} appear in more than one class_aliases group")
        seen.update(g)
    return groups


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (for tests and for replacing a source deliberately)."""
    if name not in _REGISTRY:
        raise ValueError(f"dataset {name!r} is not registered; registered: {available()}")
    del _REGISTRY[name]


def available() -> list[str]:
    """The registered dataset names, sorted."""
    return sorted(_REGISTRY)


def get_info(name: str) -> DatasetInfo:
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; registered: {available()}")
    return _REGISTRY[name]


def check_class_order(dataset: str, registered: Sequence[str], found: Sequence[str], where: str) -> None:
    """Refuse data whose label order differs from the registered class list."""
    registered, found = list(registered), list(found)
    if registered == found:
        return
    if set(registered) == set(found):
        i = next(k for k, (a, b) in enumerate(zip(registered, found)) if a != b)
        raise ValueError(
            f"{dataset}: the registered class order does not match the labels in {where}: label {i} is "
            f"{found[i]!r} in the data but {registered[i]!r} in the registration. classes must be listed in "
            f"label order; the data's order is {found}"
        )
    missing = [c for c in registered if c not in found]
    extra = [c for c in found if c not in registered]
    raise ValueError(
        f"{dataset}: the classes in {where} do not match the registration: missing {missing}, unexpected {extra}"
    )


def build(
    name: str,
    root_dir: str | None = None,
    split: str = "train",
    transform: Callable | None = None,
    ignore_classes: Sequence[str] = (),
    idx_map: Mapping[int, int] | None = None,
    **options: Any,
) -> datasets.Dataset:
    """Create ``split`` of the registered source ``name``; ``options`` set the source's fields."""
    info = get_info(name)
    check_split(split)
    if isinstance(ignore_classes, str):
        raise ValueError(f"ignore_classes must be a sequence of class names, got the string {ignore_classes!r}")
    known = {f.name for f in dataclasses.fields(info.cls)} if dataclasses.is_dataclass(info.cls) else set()
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; accepted: {sorted(known)}")
    source = info.cls(**options)
    ds = source.create(root_dir, split, transform, info.classes, list(ignore_classes), idx_map)
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"{name}: create() must return a datasets.Dataset, got {type(ds).__name__}")
    label_feature = ds.features.get(LABEL_KEY)
    if info.classes is not None and isinstance(label_feature, datasets.ClassLabel):
        expected = mapped_class_names(info.classes, idx_map)
        check_class_order(name, expected, label_feature.names, f"the dataset {name} created")
    return ds

