"""vision.registry: the contract of register/create — ignored classes, index maps,
class order, duplicate names, options."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import vision
from vision.registry import ImageDataset, check_class_order, register, unregister
from vision.sources.base import RawImages, SplitSource


def labels_of(ds) -> list[int]:
    return [int(v) for v in ds[:]["labels"]]


@pytest.fixture
def temp_names():
    """Names registered by a test are removed afterwards."""
    names: list[str] = []
    yield names
    for n in names:
        if n in vision.available():
            unregister(n)


def test_available_lists_builtins():
    assert {"digits", "sample-images", "cifar10", "cifar100", "cifar10-c", "office31", "hf"} <= set(vision.available())
    info = vision.get_info("cifar10")
    assert info.classes[1] == "automobile" and info.canonical("car") == "automobile"
    assert vision.get_info("cifar10-c").shift_type == "Image Corruptions"


def test_ignore_classes_removes_samples():
    full = labels_of(vision.load("digits", split="val"))
    kept = labels_of(vision.load("digits", split="val", ignore_classes=["3", "7"]))
    assert 3 not in kept and 7 not in kept
    assert kept == [v for v in full if v not in (3, 7)]  # same samples otherwise, same order


def test_idx_map_remaps_labels_and_names():
    idx_map = {i: 9 - i for i in range(10)}
    plain = vision.load("digits", split="test")
    mapped = vision.load("digits", split="test", idx_map=idx_map)
    assert labels_of(mapped) == [9 - v for v in labels_of(plain)]
    assert mapped.features["labels"].names == [str(9 - i) for i in range(10)]
    merged = vision.load("digits", split="test", ignore_classes=["9"], idx_map={i: i % 2 for i in range(9)})
    assert set(labels_of(merged)) == {0, 1}
    assert merged.features["labels"].names == ["0|2|4|6|8", "1|3|5|7"]


def test_idx_map_must_cover_kept_classes():
    with pytest.raises(ValueError, match=r"idx_map has no entry for class indices \[2, 3, 4, 5, 6, 7, 8, 9\]"):
        vision.load("digits", split="val", idx_map={0: 0, 1: 1})


def test_unknown_ignore_class_and_option_and_split():
    with pytest.raises(ValueError, match=r"ignore_classes has names that are not classes.*\['ten'\]"):
        vision.load("digits", ignore_classes=["ten"])
    with pytest.raises(ValueError, match=r"digits: unknown option\(s\) \['colour'\]; accepted: .*'image_size'"):
        vision.load("digits", colour=True)
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'val', 'test'\], got 'dev'"):
        vision.load("digits", split="dev")
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; registered: \["):
        vision.load("mnist")
    with pytest.raises(ValueError, match=r"val_fraction \+ test_fraction must be < 1"):
        vision.load("digits", val_fraction=0.5, test_fraction=0.5)


def test_duplicate_name_refused(temp_names):
    with pytest.raises(ValueError, match=r"dataset name 'digits' is already registered \(by vision\.sources\.digits\.Digits\)"):

        @register(name="digits", classes=["a", "b"])
        @dataclass
        class Again(ImageDataset):
            def create(self, *args):
                raise AssertionError


def test_bad_registrations():
    with pytest.raises(ValueError, match=r"classes has duplicates \['a'\]"):
        register(name="x-dupe", classes=["a", "b", "a"])
    with pytest.raises(ValueError, match=r"class_aliases group \['car', 'auto'\] names no registered class"):
        register(name="x-alias", classes=["a", "b"], class_aliases=[["car", "auto"]])
    with pytest.raises(ValueError, match=r"task_type must be one of \['Image Classification'\]"):
        register(name="x-task", classes=["a"], task_type="Detection")
    with pytest.raises(ValueError, match=r"must decorate a subclass of vision\.registry\.ImageDataset"):
        register(name="x-cls", classes=["a"])(object)


@dataclass
class _Toy(SplitSource):
    """6 images per class of 3 classes; the data itself names its classes ``found``."""

    found: tuple = ("cat", "dog", "fox")

    def read(self, root_dir, part):
        labels = np.repeat(np.arange(3), 6)
        images = np.broadcast_to(labels[:, None, None, None] / 2.0, (18, 3, 8, 8)).astype(np.float32)
        return RawImages(labels=labels, images=images, found_classes=list(self.found), where="the toy source")


def test_custom_source_and_wrong_class_order(temp_names):
    register(name="toy", classes=["cat", "dog", "fox"])(_Toy)
    temp_names.append("toy")
    ds = vision.load("toy", split="train", val_fraction=0.5, test_fraction=0.0)
    assert len(ds) == 9 and set(labels_of(ds)) == {0, 1, 2}
    # the pixel value says which class an image was read as: labels and images stay aligned
    x = ds[:]
    assert torch.allclose(x["pixel_values"][:, 0, 0, 0], x["labels"].float() / 2.0)
    with pytest.raises(ValueError, match=r"toy: the registered class order does not match the labels in the toy source: label 0 is 'dog' in the data but 'cat'"):
        vision.load("toy", found=("dog", "cat", "fox"))


def test_custom_create_must_return_registered_order(temp_names):
    @register(name="toy-create", classes=["b", "a"])
    @dataclass
    class Reordered(ImageDataset):
        def create(self, root_dir, split, transform, classes, ignore_classes, idx_map):
            return vision.arrow.from_arrays(np.zeros((2, 3, 8, 8), np.float32), np.array([0, 1]), ["a", "b"])

    temp_names.append("toy-create")
    with pytest.raises(ValueError, match=r"toy-create: the registered class order does not match the labels"):
        vision.load("toy-create")


def test_check_class_order_message():
    with pytest.raises(ValueError, match=r"missing \['c'\], unexpected \['d'\]"):
        check_class_order("ds", ["a", "b", "c"], ["a", "b", "d"], "here")
    check_class_order("ds", ["a"], ["a"], "here")


@dataclass
class _Numbered(SplitSource):
    """40 images, each filled with its own index: splits can be checked by identity."""

    def read(self, root_dir, part):
        labels = np.arange(40) % 4
        images = np.broadcast_to((np.arange(40) / 100.0)[:, None, None, None], (40, 3, 8, 8)).astype(np.float32)
        return RawImages(labels=labels, images=images)


def test_split_is_deterministic_disjoint_and_complete(temp_names):
    register(name="numbered", classes=["a", "b", "c", "d"])(_Numbered)
    temp_names.append("numbered")

    def ids(split, **kw):
        ds = vision.load("numbered", split=split, **kw)
        return [round(float(v) * 100) for v in ds[:]["pixel_values"][:, 0, 0, 0]]

    parts = {s: ids(s, seed=4) for s in ("train", "val", "test")}
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == list(range(40))
    assert (len(parts["val"]), len(parts["test"])) == (4, 8)
    assert ids("val", seed=4) == parts["val"] and ids("val", seed=5) != parts["val"]
    # ignoring a class only removes its samples: nobody changes split
    assert ids("test", seed=4, ignore_classes=["b"]) == [i for i in parts["test"] if i % 4 != 1]


def test_ready_for_dataloader_and_transform():
    ds = vision.load("digits", split="val", transform=vision.transforms.Normalize([0.5] * 3, [0.5] * 3))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch["pixel_values"].shape == (8, 3, 32, 32) and batch["labels"].dtype == torch.int64
    assert float(batch["pixel_values"].min()) < 0  # normalised
