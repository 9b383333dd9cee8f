"""vision.streams: task streams built from clean sources and corruptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vision
from vision.sources.office31 import OFFICE31_CLASSES
from test_vision_loaders import write_cifar10c
from vision.streams import (
    build_stream,
    cifar10c_stream,
    corruption_stream,
    digits_stream,
    office31_stream,
    severity_stream,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_corruption_cycle():
    names = ["fog", "snow", "pixelate"]
    tasks = corruption_stream(names, severity=4, max_samples_per_task=30, include_clean=True)
    assert [t.name for t in tasks] == ["clean", "fog-4", "snow-4", "pixelate-4"]
    assert tasks[1].domain == {"corruption": "fog", "severity": 4} and tasks[0].domain == {}
    assert (tasks[1].corruption, tasks[1].severity, tasks[0].corruption) == ("fog", 4, None)
    for t in tasks:
        assert t.sizes == {"train": 30, "val": 30, "test": 30}
        x = t.train[:]["pixel_values"]
        assert x.shape == (30, 3, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
        assert t.train.features["labels"].names == [str(d) for d in range(10)]
    again = corruption_stream(names, severity=4, max_samples_per_task=30, include_clean=True)
    assert torch.equal(again[2].train[:]["pixel_values"], tasks[2].train[:]["pixel_values"])  # reproducible


def test_severity_stream_goes_up_and_down():
    tasks = severity_stream("gaussian_noise", max_samples_per_task=40, source="sample-images", patches_per_image=10)
    assert [t.domain["severity"] for t in tasks] == [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert tasks[0].name == "gaussian_noise-1" and tasks[0].sizes == {"train": 40, "val": 10, "test": 20}
    # the 20 test patches are under max_samples_per_task: every task has the same ones, corrupted
    clean = vision.load("sample-images", split="test", patches_per_image=10)[:]["pixel_values"]
    dist = [(t.test[:]["pixel_values"] - clean).pow(2).mean().sqrt().item() for t in tasks]
    assert all(a < b for a, b in zip(dist[:5], dist[1:5])) and all(a > b for a, b in zip(dist[4:], dist[5:]))


def test_severity_stream_table():
    """The monotone table makes a glass_blur drift harder at every step; the published rows (the default) do not:
    severity 3 blurs the swapped pixels back towards the clean image."""
    clean = vision.load("sample-images", split="test", patches_per_image=10)[:]["pixel_values"]

    def dist(tasks):
        return [(t.test[:]["pixel_values"] - clean).pow(2).mean().sqrt().item() for t in tasks]

    opts = {"severities": (1, 2, 3), "max_samples_per_task": 40, "source": "sample-images", "patches_per_image": 10}
    published = severity_stream("glass_blur", **opts)
    monotone = severity_stream("glass_blur", table="monotone", **opts)
    assert [t.domain for t in published] == [{"corruption": "glass_blur", "severity": s} for s in (1, 2, 3)]
    assert [t.domain for t in monotone] == [{"corruption": "glass_blur", "severity": s, "table": "monotone"}
                                            for s in (1, 2, 3)]
    assert [t.name for t in monotone] == [t.name for t in published]
    d_pub, d_mono = dist(published), dist(monotone)
    assert d_mono[0] == d_pub[0]  # severity 1: the same row in both tables
    assert d_mono[0] < d_mono[1] < d_mono[2], d_mono
    assert d_pub[2] < d_pub[1], d_pub


def test_streams_thread_the_table():
    mono = digits_stream(["glass_blur", "fog"], severity=2, max_samples_per_task=20, table="monotone")
    default = digits_stream(["glass_blur", "fog"], severity=2, max_samples_per_task=20)
    assert [t.domain for t in mono] == [{}, {"corruption": "glass_blur", "severity": 2, "table": "monotone"},
                                        {"corruption": "fog", "severity": 2, "table": "monotone"}]
    assert "table" not in default[1].domain  # the default stays unrecorded: older records read the same
    px = [[t.val[:]["pixel_values"] for t in tasks] for tasks in (mono, default)]
    assert torch.equal(px[0][0], px[1][0])  # clean
    assert not torch.equal(px[0][1], px[1][1])  # glass_blur-2: another row
    assert torch.equal(px[0][2], px[1][2])  # fog: published-only, the same under both tables
    same = build_stream("corruptions", corruptions=["glass_blur"], severity=2, source="digits", seed=0,
                        max_samples_per_task=20, table="monotone")
    assert same[0].domain == mono[1].domain
    with pytest.raises(ValueError, match=r"unknown severity table 'monotonic' \(argument table\)"):
        corruption_stream(["fog"], table="monotonic", source="no-such-source")  # refused before any data is read
    with pytest.raises(ValueError, match=r"unknown severity table"):
        severity_stream("fog", table="Published")


def test_digits_stream_and_build_stream():
    tasks = digits_stream(["contrast"], max_samples_per_task=20)
    assert [t.name for t in tasks] == ["clean", "contrast-5"]
    x_clean = tasks[0].val[:]["pixel_values"]
    x_low = tasks[1].val[:]["pixel_values"]
    assert x_low.std() < 0.5 * x_clean.std()  # severity-5 contrast squeezes the pixel spread
    same = build_stream("digits", corruptions=["contrast"], max_samples_per_task=20)
    assert torch.equal(same[1].val[:]["pixel_values"], x_low)
    with pytest.raises(ValueError, match=r"unknown stream kind 'rain'; accepted: \['cifar10-c', 'corruptions', 'digits', 'office31', 'severity'\]"):
        build_stream("rain")
    with pytest.raises(ValueError, match=r"unknown corruption 'rain'"):
        corruption_stream(["rain"])
    with pytest.raises(ValueError, match=r"max_samples_per_task must be None or an int >= 1"):
        corruption_stream(["fog"], max_samples_per_task=0)


def test_office31_stream(tmp_path):
    rng = np.random.default_rng(0)
    for domain in ("amazon", "dslr", "webcam"):
        for c in OFFICE31_CLASSES:
            (tmp_path / domain / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / domain / c / f"{i}.jpg")
    tasks = office31_stream(str(tmp_path), image_size=16, max_samples_per_task=40)
    assert [t.name for t in tasks] == ["amazon", "dslr", "webcam"]
    assert tasks[1].sizes["train"] == 40 and tasks[2].train[0]["pixel_values"].shape == (3, 16, 16)


def test_cifar10c_stream(tmp_path):
    root = write_cifar10c(tmp_path, corruptions=("fog", "snow", "pixelate"), n=60)
    tasks = cifar10c_stream(str(root), ["snow", "fog"], severity=4, max_samples_per_task=10, seed=3)
    assert [t.name for t in tasks] == ["snow-4", "fog-4"]
    assert [t.domain for t in tasks] == [{"corruption": c, "severity": 4} for c in ("snow", "fog")]
    assert tasks[0].sizes == {"train": 10, "val": 6, "test": 10}  # of 60 images: 42 / 6 / 12 before the cap
    assert tasks[0].train.features["labels"].names == list(vision.get_info("cifar10-c").classes)
    snow, fog = (t.test[:]["pixel_values"] for t in tasks)
    assert snow.shape == (10, 3, 32, 32) and torch.allclose(snow[:, 1], torch.tensor(150 / 255))  # the severity-4 block
    assert torch.allclose(snow[:, 2], torch.tensor(10 / 255)) and float(fog[:, 2].max()) == 0.0  # each its own file
    assert torch.equal(snow[:, 0], fog[:, 0])  # the same base images under every corruption
    ids = {s: set((getattr(tasks[0], s)[:]["pixel_values"][:, 0, 0, 0] * 255).round().int().tolist()) for s in ("train", "val", "test")}
    assert not (ids["train"] & ids["test"] or ids["train"] & ids["val"] or ids["val"] & ids["test"])  # disjoint splits
    again = build_stream("cifar10-c", root_dir=str(root), corruptions=["snow"], severity=4, max_samples_per_task=10, seed=3,
                         table="published")
    assert torch.equal(again[0].train[:]["pixel_values"], tasks[0].train[:]["pixel_values"])  # reproducible
    other = cifar10c_stream(str(root), ["snow"], severity=4, max_samples_per_task=10, seed=4)
    assert not torch.equal(other[0].train[:]["pixel_values"], tasks[0].train[:]["pixel_values"])


def test_cifar10c_stream_layout_errors(tmp_path):
    root = write_cifar10c(tmp_path, corruptions=("fog",), n=20)
    with pytest.raises(vision.DataLayoutError, match=r"(?s)expected: <root_dir>/CIFAR-10-C/<corruption>\.npy.*"
                       r"looked in: .*missing: \['snow\.npy', 'frost\.npy'\]; corruptions present: \['fog'\].*"
                       r"how to get it: .*zenodo"):
        cifar10c_stream(str(root), ["fog", "snow", "frost"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(vision.DataLayoutError, match=r"(?s)expected: .*labels\.npy.*looked in: .*empty \(no labels\.npy\)"):
        cifar10c_stream(str(tmp_path / "empty"), ["fog"])
    with pytest.raises(vision.DataLayoutError, match=r"not a folder"):
        cifar10c_stream(str(tmp_path / "nope"), ["fog"])
    with pytest.raises(ValueError, match=r"unknown corruption 'haze'"):
        cifar10c_stream(str(root), ["haze"])
    with pytest.raises(ValueError, match=r"no tasks"):
        cifar10c_stream(str(root), [])
    with pytest.raises(ValueError, match=r"table='monotone', but the released CIFAR-10-C was rendered with the "
                                         r"published severity table"):
        cifar10c_stream(str(root), ["fog"], table="monotone")
