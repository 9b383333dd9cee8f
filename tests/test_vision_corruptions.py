"""vision.corruptions: contract (shape, dtype, range), severity order, determinism, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vision
from vision.corruptions import ALL_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, PARAMS
from vision.sources.sample_images import PatchConfig, cut_patches


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def patches() -> torch.Tensor:
    """Real photo patches (10 photos x 12), colour and texture: every corruption shows on them."""
    images, _ = cut_patches(PatchConfig(patches_per_image=12, seed=3))
    return torch.from_numpy(images.copy())


def test_names():
    assert len(CORRUPTIONS) == 15 and len(EXTRA_CORRUPTIONS) == 4
    assert vision.ALL_CORRUPTIONS == CORRUPTIONS + EXTRA_CORRUPTIONS
    assert set(PARAMS) == set(ALL_CORRUPTIONS)
    assert all(len(rows) == 5 for rows in PARAMS.values())


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_contract_and_severity_order(name, patches):
    """Every severity keeps shape/dtype/range, and the RMS distance to the clean
    images grows strictly from severity 1 to 5."""
    dists = []
    for severity in range(1, 6):
        out = vision.corrupt(patches, name, severity, seed=0)
        assert out.shape == patches.shape and out.dtype == patches.dtype
        assert torch.isfinite(out).all()
        assert out.min() >= 0.0 and out.max() <= 1.0
        dists.append((out - patches).pow(2).mean().sqrt().item())
    assert dists[0] > 1e-3, f"{name} severity 1 changes nothing"
    assert all(b > a for a, b in zip(dists, dists[1:])), f"{name}: distance by severity {dists}"


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_same_seed_same_output(name, patches):
    x = patches[:6]
    a = vision.corrupt(x, name, 3, seed=7)
    b = vision.corrupt(x, name, 3, seed=7)
    assert torch.equal(a, b)


def test_other_seed_other_noise(patches):
    x = patches[:6]
    assert not torch.equal(vision.corrupt(x, "gaussian_noise", 3, seed=1), vision.corrupt(x, "gaussian_noise", 3, seed=2))


def test_global_rng_untouched(patches):
    torch.manual_seed(0)
    np.random.seed(0)
    expected_t, expected_n = torch.rand(1), np.random.rand()
    torch.manual_seed(0)
    np.random.seed(0)
    vision.corrupt(patches[:4], "snow", 5, seed=0)
    assert torch.equal(torch.rand(1), expected_t) and np.random.rand() == expected_n


def test_single_image_numpy_and_dtypes(patches):
    img = patches[0]
    out = vision.corrupt(img, "fog", 2)
    assert out.shape == (3, 32, 32)
    arr = patches[:3].numpy().astype(np.float64)
    out_np = vision.corrupt(arr, "motion_blur", 4, seed=1)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float64 and out_np.shape == arr.shape
    half = vision.corrupt(patches[:2].half(), "contrast", 5)
    assert half.dtype == torch.float16


@pytest.mark.parametrize("size", [(40, 24), (48, 64)])
@pytest.mark.parametrize("name", ["glass_blur", "zoom_blur", "elastic_transform", "frost", "fog", "pixelate", "snow"])
def test_other_sizes(name, size, patches):
    x = torch.nn.functional.interpolate(patches[:2], size=size, mode="bilinear", align_corners=False)
    out = vision.corrupt(x, name, 5)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_unknown_corruption():
    with pytest.raises(ValueError, match=r"unknown corruption 'rain'.*accepted: gaussian_noise"):
        vision.corrupt(torch.rand(1, 3, 32, 32), "rain", 1)


@pytest.mark.parametrize("severity", [0, 6, 2.0, True])
def test_bad_severity(severity):
    with pytest.raises(ValueError, match=r"severity must be an int in 1\.\.5"):
        vision.corrupt(torch.rand(1, 3, 32, 32), "fog", severity)


@pytest.mark.parametrize("shape", [(32, 32), (2, 1, 3, 32, 32)])
def test_bad_rank(shape):
    with pytest.raises(ValueError, match=r"rank 3 \(3, H, W\) or 4 \(N, 3, H, W\)"):
        vision.corrupt(torch.rand(shape), "fog", 1)


def test_bad_channels_dtype_type():
    with pytest.raises(ValueError, match=r"channels-first RGB"):
        vision.corrupt(torch.rand(2, 32, 32, 3), "fog", 1)
    with pytest.raises(ValueError, match=r"floating point.*divide by 255"):
        vision.corrupt(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "fog", 1)
    with pytest.raises(ValueError, match=r"torch.Tensor or numpy.ndarray"):
        vision.corrupt([[0.0]], "fog", 1)
