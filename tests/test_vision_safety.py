"""Received data folders cannot run code: CIFAR pickles go through a restricted unpickler.

A crafted pickle names a callable (``open``, ``Path.touch``, ``os.system``) that
plain ``pickle.load`` would call; the loader must refuse it, name the file and
the global, and leave no trace. Genuine batches (Python 3 at every protocol,
and Python 2 style as the original release was written) still load.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import struct

import numpy as np
import pytest

import vision
from vision.errors import UnsafePickleError
from vision.sources.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, _unpickle


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _OpenMarker:
    """Unpickles to ``open(marker, "w")``: creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _TouchMarker:
    """Unpickles to ``pathlib.Path.touch(Path(marker))``: creates the marker file."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class _SystemMarker:
    """Unpickles to ``os.system("touch marker")``: runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


PAYLOADS = {"open": (_OpenMarker, "open"), "Path.touch": (_TouchMarker, "Path.touch"), "os.system": (_SystemMarker, "system")}


def _dump(path, obj, protocol=None):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _images_uint8(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _cifar10_folder(root, protocol=None, dump=None):
    dump = dump or (lambda path, obj: _dump(path, obj, protocol))
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        dump(folder / f"data_batch_{i}", {b"data": _images_uint8(10, i), b"labels": [(i + k) % 10 for k in range(10)]})
    dump(folder / "test_batch", {b"data": _images_uint8(10, 9), b"labels": list(range(10))})
    dump(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072})
    return folder


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("target", ["batches.meta", "data_batch_3", "test_batch"])
def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path, payload, target):
    folder = _cifar10_folder(tmp_path / "data")
    marker = tmp_path / "marker"
    cls, refused = PAYLOADS[payload]
    if target == "batches.meta":
        obj = {b"label_names": cls(marker)}
    else:
        obj = {b"data": cls(marker), b"labels": list(range(10))}
    _dump(folder / target, obj)
    split = "test" if target == "test_batch" else "train"
    with pytest.raises(UnsafePickleError, match=rf"(?s)cifar10: refused to unpickle .*{target}.*names the global '.*{refused}'.*Nothing from the file was run"):
        vision.load("cifar10", root_dir=str(tmp_path / "data"), split=split)
    assert not marker.exists()
    # control: the file really is hostile, plain pickle.load runs it
    with open(folder / target, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_refusal_is_an_unpickling_error_naming_file_and_global(tmp_path):
    path = tmp_path / "data_batch_1"
    _dump(path, {b"data": _OpenMarker(tmp_path / "marker"), b"labels": []})
    with pytest.raises(pickle.UnpicklingError) as info:
        _unpickle(str(path), "cifar10", ("data", "labels"))
    err = info.value
    assert isinstance(err, UnsafePickleError) and err.dataset == "cifar10"
    assert err.path == str(path) and err.refused in ("io.open", "builtins.open")
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_genuine_cifar10_loads_at_every_protocol(tmp_path, protocol):
    _cifar10_folder(tmp_path, protocol=protocol)
    test = vision.load("cifar10", root_dir=str(tmp_path), split="test")
    assert len(test) == 10 and [int(v) for v in test[:]["labels"]] == list(range(10))
    raw = _images_uint8(10, 9)[0].reshape(3, 32, 32) / 255.0
    assert np.allclose(test[0]["pixel_values"].numpy(), raw, atol=1e-6)
    assert len(vision.load("cifar10", root_dir=str(tmp_path), split="train")) == 45  # 5 of 50 carved out as val


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote the original CIFAR release: str and bytes as py2 str (BINSTRING)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        n = len(raw)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + raw if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _dump_py2(path, obj):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    data = buf.getvalue().replace(b"cnumpy._core.", b"cnumpy.core.")  # Python 2's numpy had no numpy._core
    assert b"_codecs" not in data
    if b"data" in obj:
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in data and b"cnumpy\ndtype\n" in data
    path.write_bytes(data)


def test_genuine_python2_style_cifar_loads(tmp_path):
    def dump(path, obj):
        obj = dict(obj, batch_label="testing batch 1 of 1", filenames=[f"img_{k}.png" for k in range(3)])
        obj[b"coarse"] = {1, 2}  # py2 writes a set as __builtin__.set
        _dump_py2(path, obj)

    _cifar10_folder(tmp_path, dump=dump)
    test = vision.load("cifar10", root_dir=str(tmp_path), split="test")
    assert [int(v) for v in test[:]["labels"]] == list(range(10))
    assert np.allclose(test[0]["pixel_values"].numpy(), _images_uint8(10, 9)[0].reshape(3, 32, 32) / 255.0, atol=1e-6)


def test_genuine_cifar100_str_keys_load(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _dump(folder / "train", {"data": _images_uint8(100, 1), "fine_labels": list(range(100))})
    _dump(folder / "test", {"data": _images_uint8(5, 2), b"fine_labels": [0, 1, 2, 3, 99]})
    _dump(folder / "meta", {"fine_label_names": list(CIFAR100_CLASSES)})
    test = vision.load("cifar100", root_dir=str(tmp_path), split="test")
    assert [int(v) for v in test[:]["labels"]] == [0, 1, 2, 3, 99]


def test_broken_or_wrong_pickles_say_which_file(tmp_path):
    folder = _cifar10_folder(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _images_uint8(10, 9)})[:50])  # truncated
    with pytest.raises(vision.DataLayoutError, match=r"(?s)looked in: .*test_batch \(not a readable CIFAR pickle"):
        vision.load("cifar10", root_dir=str(tmp_path), split="test")
    _dump(folder / "test_batch", [1, 2, 3])
    with pytest.raises(vision.DataLayoutError, match=r"test_batch \(holds a list, not a dict\)"):
        vision.load("cifar10", root_dir=str(tmp_path), split="test")
    _dump(folder / "test_batch", {b"data": _images_uint8(10, 9)})
    with pytest.raises(vision.DataLayoutError, match=r"test_batch \(missing \['labels'\]; keys: \['data'\]\)"):
        vision.load("cifar10", root_dir=str(tmp_path), split="test")


def test_codecs_encode_is_latin1_only(tmp_path):
    class _Codec:
        def __reduce__(self):
            import _codecs

            return (_codecs.encode, ("x", "rot13"))

    path = tmp_path / "test_batch"
    _dump(path, {b"data": _Codec(), b"labels": []}, protocol=2)
    with pytest.raises(vision.DataLayoutError, match=r"test_batch \(not a readable CIFAR pickle: UnpicklingError: _codecs\.encode is admitted only as \(str, 'latin1'\), got \(str, 'rot13'\)"):
        _unpickle(str(path), "cifar10", ("data", "labels"))


@pytest.mark.parametrize("target", ["labels.npy", "fog.npy"])
def test_cifar10c_object_npy_is_refused_and_runs_nothing(tmp_path, target):
    from test_vision_loaders import write_cifar10c

    write_cifar10c(tmp_path)
    marker = tmp_path / "marker"
    hostile = np.empty(200, dtype=object)
    hostile[0] = _OpenMarker(marker)
    np.save(tmp_path / "CIFAR-10-C" / target, hostile, allow_pickle=True)
    with pytest.raises(vision.DataLayoutError, match=rf"(?s)looked in: .*{target} \(not a plain numeric \.npy: .*(allow_pickle=False|Python objects in dtype)"):
        vision.load("cifar10-c", root_dir=str(tmp_path), corruption="fog", severity=1)
    assert not marker.exists()
    np.load(tmp_path / "CIFAR-10-C" / target, allow_pickle=True)  # control: with pickles allowed it runs
    assert marker.exists()
