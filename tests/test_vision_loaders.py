"""Built-in sources on tiny fixture folders written in their documented layouts."""

from __future__ import annotations

import os
import pickle

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import vision
from vision.sources.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES
from vision.sources.office31 import OFFICE31_CLASSES


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def labels_of(ds) -> list[int]:
    return [int(v) for v in ds[:]["labels"]]


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _images_uint8(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


@pytest.fixture
def cifar10_root(tmp_path):
    """cifar-10-batches-py with 5 train batches of 20 and a test batch of 10."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _pickle(
            folder / f"data_batch_{i}",
            {b"data": _images_uint8(20, i), b"labels": [k % 10 for k in range(20)], b"batch_label": b"x"},
        )
    _pickle(folder / "test_batch", {b"data": _images_uint8(10, 9), b"labels": list(range(10))})
    _pickle(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072})
    return tmp_path


def test_cifar10_splits(cifar10_root):
    train = vision.load("cifar10", root_dir=str(cifar10_root), split="train")
    val = vision.load("cifar10", root_dir=str(cifar10_root), split="val")
    test = vision.load("cifar10", root_dir=str(cifar10_root / "cifar-10-batches-py"), split="test")
    assert (len(train), len(val), len(test)) == (90, 10, 10)  # val: 10% of each class of the 100 train images
    item = train[0]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert 0.0 <= float(item["pixel_values"].min()) and float(item["pixel_values"].max()) <= 1.0
    assert train.features["labels"].names == list(CIFAR10_CLASSES)
    assert labels_of(test) == list(range(10))  # the source's own test split, untouched
    # the first test image decodes exactly: channel-major bytes / 255
    raw = _images_uint8(10, 9)[0].reshape(3, 32, 32) / 255.0
    assert np.allclose(test[0]["pixel_values"].numpy(), raw, atol=1e-6)
    again = vision.load("cifar10", root_dir=str(cifar10_root), split="val")
    assert torch.equal(again[:]["pixel_values"], val[:]["pixel_values"])  # deterministic by seed
    other = vision.load("cifar10", root_dir=str(cifar10_root), split="val", seed=1)
    assert not torch.equal(other[:]["pixel_values"], val[:]["pixel_values"])


def test_cifar10_wrong_class_order(cifar10_root):
    meta = cifar10_root / "cifar-10-batches-py" / "batches.meta"
    names = list(CIFAR10_CLASSES)
    names[0], names[1] = names[1], names[0]
    _pickle(meta, {b"label_names": [c.encode() for c in names]})
    with pytest.raises(ValueError, match=r"class order does not match the labels.*label 0 is 'automobile'"):
        vision.load("cifar10", root_dir=str(cifar10_root))


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _pickle(folder / "train", {b"data": _images_uint8(200, 1), b"fine_labels": [k % 100 for k in range(200)]})
    _pickle(folder / "test", {b"data": _images_uint8(5, 2), b"fine_labels": [0, 1, 2, 3, 99]})
    _pickle(folder / "meta", {b"fine_label_names": [c.encode() for c in CIFAR100_CLASSES]})
    test = vision.load("cifar100", root_dir=str(tmp_path), split="test")
    assert len(CIFAR100_CLASSES) == 100 and test.features["labels"].names[99] == "worm"
    assert labels_of(test) == [0, 1, 2, 3, 99]
    assert len(vision.load("cifar100", root_dir=str(tmp_path), split="train")) == 180  # 20 carved out as val


def test_missing_folder_says_layout_and_how(tmp_path):
    with pytest.raises(vision.DataLayoutError, match=r"(?s)expected: <root_dir>/cifar-10-batches-py/.*looked in: .*how to get it: .*cifar\.html"):
        vision.load("cifar10", root_dir=str(tmp_path))
    with pytest.raises(vision.DataLayoutError, match=r"not a folder"):
        vision.load("cifar10", root_dir=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"pass root_dir="):  # DataLayoutError is a FileNotFoundError
        vision.load("office31", root_dir=None) if "MPOPT_DATA_DIR" not in os.environ else pytest.skip("env set")


def write_cifar10c(root, corruptions=("fog",), n=40):
    """Write ``root/CIFAR-10-C`` with n base images: 5*n rows per corruption file.

    Pixels encode where a row came from: red = which base image, green = 50 x (severity - 1),
    blue = 10 x the corruption's position in ``corruptions``.
    """
    folder = root / "CIFAR-10-C"
    folder.mkdir()
    labels = np.tile(np.arange(n) % 10, 5).astype(np.uint8)
    np.save(folder / "labels.npy", labels)
    for k, name in enumerate(corruptions):
        data = np.zeros((5 * n, 32, 32, 3), dtype=np.uint8)
        for s in range(5):
            data[s * n : (s + 1) * n, :, :, 0] = np.arange(n)[:, None, None]  # red: which base image
            data[s * n : (s + 1) * n, :, :, 1] = 50 * s  # green: which severity
        data[..., 2] = 10 * k  # blue: which corruption
        np.save(folder / f"{name}.npy", data)
    return root


@pytest.fixture
def cifar10c_root(tmp_path):
    """CIFAR-10-C layout with n=40 base images: 200 rows per corruption file."""
    return write_cifar10c(tmp_path)


def test_cifar10c(cifar10c_root):
    parts = {s: vision.load("cifar10-c", root_dir=str(cifar10c_root), split=s, corruption="fog", severity=3) for s in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == 40
    assert (len(parts["val"]), len(parts["test"])) == (4, 8)  # 10% / 20% of each class
    assert np.allclose(parts["train"][:]["pixel_values"][:, 1].numpy(), 100 / 255)  # severity 3 block
    sev1 = vision.load("cifar10-c", root_dir=str(cifar10c_root), split="test", corruption="fog", severity=1)
    assert float(sev1[:]["pixel_values"][:, 1].max()) == 0.0
    # the same base images are the test images at every severity
    assert torch.equal(sev1[:]["pixel_values"][:, 0], parts["test"][:]["pixel_values"][:, 0])


def test_cifar10c_missing_corruption(cifar10c_root):
    with pytest.raises(vision.DataLayoutError, match=r"snow\.npy \(missing; corruptions present: \['fog'\]\)"):
        vision.load("cifar10-c", root_dir=str(cifar10c_root), corruption="snow")
    with pytest.raises(ValueError, match=r"unknown corruption 'haze'"):
        vision.load("cifar10-c", root_dir=str(cifar10c_root), corruption="haze")


def _write_image_folder(folder, classes, per_class, size=(20, 14), seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / c / f"frame_{i:04d}.png")


@pytest.fixture
def office_root(tmp_path):
    """Office-31 with amazon (flat layout) and dslr (images/ layout), 2 images per class."""
    _write_image_folder(tmp_path / "amazon", OFFICE31_CLASSES, 2)
    _write_image_folder(tmp_path / "dslr" / "images", OFFICE31_CLASSES, 2, size=(30, 24), seed=1)
    return tmp_path


def test_office31(office_root):
    train = vision.load("office31", root_dir=str(office_root), domain="amazon", image_size=16, val_fraction=0.5, test_fraction=0.0)
    assert len(train) == 31 and train.features["labels"].names == list(OFFICE31_CLASSES)
    batch = train[:4]
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    dslr = vision.load("office31", root_dir=str(office_root), domain="dslr", split="test", image_size=8, test_fraction=0.5)
    assert len(dslr) == 31 and dslr[0]["pixel_values"].shape == (3, 8, 8)
    with pytest.raises(vision.DataLayoutError, match=r"no webcam/ folder"):
        vision.load("office31", root_dir=str(office_root), domain="webcam")
    with pytest.raises(ValueError, match=r"domain must be one of \['amazon', 'dslr', 'webcam'\]"):
        vision.load("office31", root_dir=str(office_root), domain="phone")


def test_office31_missing_class_folder(office_root):
    import shutil

    shutil.rmtree(office_root / "amazon" / "mug")
    with pytest.raises(ValueError, match=r"do not match the registration: missing \['mug'\]"):
        vision.load("office31", root_dir=str(office_root))


def test_hf_saved_and_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)) for _ in range(30)]
    feats = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["a", "b", "c"])})
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"img": imgs[:24], "fine": [i % 3 for i in range(24)]}, features=feats),
            "test": datasets.Dataset.from_dict({"img": imgs[24:], "fine": [0, 1, 2, 0, 1, 2]}, features=feats),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    train = vision.load("hf", root_dir=str(tmp_path / "saved"), image_size=8)
    val = vision.load("hf", root_dir=str(tmp_path / "saved"), split="val", image_size=8)
    test = vision.load("hf", root_dir=str(tmp_path / "saved"), split="test", image_size=8, ignore_classes=["c"])
    assert (len(train), len(val), len(test)) == (22, 2, 4)  # val: round(10% of 24)
    assert train.features["labels"].names == ["a", "b", "c"] and labels_of(test) == [0, 1, 0, 1]
    assert train[0]["pixel_values"].shape == (3, 8, 8)
    # a plain ImageFolder directory, read through datasets.load_dataset (local, no network)
    _write_image_folder(tmp_path / "folder", ["cat", "dog"], 5)
    ds = vision.load("hf", root_dir=str(tmp_path / "folder"), split="test", image_size=8, cache_dir=str(tmp_path / "cache"))
    assert sorted(ds.features["labels"].names) == ["cat", "dog"] and len(ds) == 2
    with pytest.raises(vision.DataLayoutError, match=r"(?s)hf: .*not a folder"):
        vision.load("hf", root_dir=str(tmp_path / "missing"))


def test_digits_and_sample_images():
    digits = vision.load("digits", split="test")
    assert len(digits) == 359 and digits[0]["pixel_values"].shape == (3, 32, 32)
    x = digits[:]["pixel_values"]
    assert torch.equal(x[:, 0], x[:, 2])  # grey as RGB
    patches = vision.load("sample-images", split="val", patches_per_image=20)
    assert len(patches) == 20 and len(patches.features["labels"].names) == 10
    assert vision.load("digits", max_samples=50).num_rows == 50
