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


@pytest.mark.parametrize("name", [None, 3, ["fog"], "Fog", ""])
def test_bad_name_type_or_value(name):
    with pytest.raises(ValueError, match=r"unknown corruption .* \(argument name\); accepted: gaussian_noise, .*saturate"):
        vision.corrupt(torch.rand(1, 3, 32, 32), name, 1)


def test_extra_corruptions_and_numpy_int_severity_accepted(patches):
    out = vision.corrupt(patches[:2], "saturate", np.int64(2), seed=0)
    assert out.shape == (2, 3, 32, 32)


def test_bad_severity_message_names_value_and_type():
    with pytest.raises(ValueError, match=r"severity must be an int in 1\.\.5, got True \(bool\)"):
        vision.corrupt(torch.rand(1, 3, 32, 32), "fog", True)
    with pytest.raises(ValueError, match=r"severity must be an int in 1\.\.5, got '3' \(str\)"):
        vision.corrupt(torch.rand(1, 3, 32, 32), "fog", "3")


def test_source_names_its_corruption_argument():
    with pytest.raises(ValueError, match=r"unknown corruption 'rain' \(argument corruption\)"):
        vision.load("cifar10-c", corruption="rain")


@pytest.mark.parametrize("as_numpy", [False, True])
def test_0_255_floats_refused_not_whitened(patches, as_numpy):
    x = patches[:2] * 255
    x = x.numpy() if as_numpy else x
    with pytest.raises(ValueError, match=r"images must be floats in \[0, 1\], got float32 values in \[.*, 25\d.*\]; .*0\.\.255 .*divide by 255"):
        vision.corrupt(x, "fog", 3)
    assert torch.allclose(torch.as_tensor(vision.corrupt(x / 255, "brightness", 1, seed=0)).mean(), torch.as_tensor(x / 255).mean(), atol=0.2)


def test_normalized_and_other_ranges_refused(patches):
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with pytest.raises(ValueError, match=r"in \[-\d.*\]; they look mean/std-normalized: .*images \* std \+ mean.*clamp\(0, 1\)"):
        vision.corrupt((patches[:2] - mean) / std, "fog", 1)
    with pytest.raises(ValueError, match=r"got float32 values in \[0, 1000\]; rescale them to \[0, 1\]"):
        vision.corrupt(torch.full((1, 3, 32, 32), 1000.0).index_fill_(1, torch.tensor([0]), 0.0), "fog", 1)
    with pytest.raises(ValueError, match=r"got float32 values in \[0[.0-9]*, 1\.01\]; they overshoot 1 .*clamp\(0, 1\)"):
        vision.corrupt(patches[:1].clamp(0, 0.9).index_fill_(2, torch.tensor([0]), 1.01), "fog", 1)


def test_rounding_slack_is_clamped(patches):
    from vision.corruptions import RANGE_SLACK

    x = patches[:2].clone()
    x[0, 0, 0, 0], x[1, 2, 3, 4] = -RANGE_SLACK, 1 + RANGE_SLACK
    out = vision.corrupt(x, "contrast", 1)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_refused(bad):
    x = torch.rand(2, 3, 32, 32)
    x[1, 0, 5, 5] = bad
    with pytest.raises(ValueError, match=r"images must be finite values in \[0, 1\], got 1 NaN or infinite value\(s\) of 6144"):
        vision.corrupt(x, "fog", 1)


def test_float64_overflowing_float32_reported_as_range_not_inf():
    x = np.full((1, 3, 32, 32), 1e300)
    with pytest.raises(ValueError, match=r"got float64 values in \[1e\+300, 1e\+300\]"):
        vision.corrupt(x, "fog", 1)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_empty_batch_refused(as_numpy):
    x = np.zeros((0, 3, 32, 32), dtype=np.float32) if as_numpy else torch.zeros(0, 3, 32, 32)
    with pytest.raises(ValueError, match=r"images is an empty batch, shape \(0, 3, 32, 32\); pass at least one image"):
        vision.corrupt(x, "fog", 1)


def test_seed_none_is_not_deterministic(patches):
    x = patches[:2]
    a, b = vision.corrupt(x, "gaussian_noise", 3, seed=None), vision.corrupt(x, "gaussian_noise", 3, seed=None)
    assert not torch.equal(a, b)
    doc = vision.corrupt.__doc__
    assert "None" in doc and "cannot be" in doc and "reproduced" in doc
