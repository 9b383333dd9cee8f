"""vision.transforms: plain-torch transforms, on tensors and as datasets formatting callables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vision
from vision.transforms import (
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    ToTensor,
    cifar_train_transform,
    to_tensor,
)


def test_to_tensor_accepts_common_forms():
    hwc = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    t = to_tensor(hwc)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32 and float(t.max()) <= 1.0
    assert torch.allclose(to_tensor(Image.fromarray(hwc)), t)
    assert torch.equal(to_tensor(t.tolist()), t)  # nested lists, as datasets' python formatter gives
    assert to_tensor(Image.fromarray(hwc[..., 0])).shape == (3, 5, 7)  # grey -> RGB
    with pytest.raises(ValueError, match=r"rank 2 \(H, W\) or 3"):
        to_tensor(np.zeros((1, 2, 3, 4)))


def test_resize_normalize_flip_crop():
    x = torch.rand(3, 8, 8)
    assert Resize(16)(x).shape == (3, 16, 16) and Resize((4, 6))(x).shape == (3, 4, 6)
    n = Normalize([0.5] * 3, [0.25] * 3)(torch.full((3, 2, 2), 0.75))
    assert torch.allclose(n, torch.ones(3, 2, 2))
    assert torch.equal(RandomHorizontalFlip(p=1.0)(x), x.flip(-1))
    assert torch.equal(RandomHorizontalFlip(p=0.0)(x), x)
    g = torch.Generator().manual_seed(0)
    crops = [RandomCrop(8, padding=2, generator=g)(x) for _ in range(20)]
    assert all(c.shape == (3, 8, 8) for c in crops) and any(not torch.equal(c, x) for c in crops)
    assert torch.equal(RandomCrop(8)(x), x)  # no padding, same size: identity
    batch = torch.rand(4, 3, 8, 8)
    assert Compose([Resize(4), Normalize([0] * 3, [1] * 3)])(batch).shape == (4, 3, 4, 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"Resize.size must be an int >= 1"):
        Resize(0)
    with pytest.raises(ValueError, match=r"RandomCrop.padding must be an int >= 0"):
        RandomCrop(8, padding=-1)
    with pytest.raises(ValueError, match=r"padding_mode must be 'constant', 'reflect' or 'replicate'"):
        RandomCrop(8, padding_mode="wrap")
    with pytest.raises(ValueError, match=r"RandomHorizontalFlip.p must be in \[0, 1\]"):
        RandomHorizontalFlip(1.5)
    with pytest.raises(ValueError, match=r"Normalize.std must be > 0"):
        Normalize([0.0], [0.0])
    with pytest.raises(ValueError, match=r"Compose.transforms\[0\] must be a vision.transforms.Transform"):
        Compose([lambda x: x])


def test_as_dataset_transform():
    ds = vision.load("digits", split="val")
    ds.set_transform(cifar_train_transform())
    batch = ds[:5]
    assert batch["pixel_values"].shape == (5, 3, 32, 32) and len(batch["labels"]) == 5
    item = ds.with_transform(Compose([ToTensor(), Resize(16)]))[0]
    assert item["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match=r"batch dict must have a 'pixel_values' column"):
        Resize(4)({"image": []})
