"""vision.corruptions: contract (shape, dtype, range), severity order, severity tables, determinism, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vision
from vision.corruptions import (
    ALL_CORRUPTIONS,
    CORRUPTIONS,
    DEFAULT_TABLE,
    EXTRA_CORRUPTIONS,
    MONOTONE_ROWS,
    PARAMS,
    TABLES,
)
from vision.sources.sample_images import PatchConfig, cut_patches


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The CIFAR-10-C rows, written out from hendrycks/robustness ImageNet-C/create_c/make_cifar_c.py (the script that
# built the release; elastic_transform's are its IMSIZE multiples / 32), to hold the default table to them.
CIFAR10C_ROWS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1),
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": (6, 11, 16, 21, 26),  # len(np.arange(1, 1.06, 0.01)), ... len(np.arange(1, 1.26, 0.01))
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
}
VARIANTS = ("glass_blur", "frost", "elastic_transform", "motion_blur", "spatter", "saturate")


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
    assert set(TABLES) == {"published", "monotone"} and DEFAULT_TABLE == "published"
    assert all(set(rows) == set(ALL_CORRUPTIONS) for rows in TABLES.values())
    assert all(len(r) == 5 for rows in TABLES.values() for r in rows.values())


def _distances(x: torch.Tensor, name: str, table: str) -> list[float]:
    """RMS distance to the clean images at severities 1..5."""
    return [(vision.corrupt(x, name, s, seed=0, table=table) - x).pow(2).mean().sqrt().item() for s in range(1, 6)]


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_contract_and_severity_order(name, patches):
    """Every severity keeps shape/dtype/range, and the RMS distance to the clean
    images grows strictly from severity 1 to 5: on the published rows where they
    are monotone, on the monotone table where they are not (that is its purpose)."""
    table = "monotone" if name in MONOTONE_ROWS else "published"
    dists = []
    for severity in range(1, 6):
        out = vision.corrupt(patches, name, severity, seed=0, table=table)
        assert out.shape == patches.shape and out.dtype == patches.dtype
        assert torch.isfinite(out).all()
        assert out.min() >= 0.0 and out.max() <= 1.0
        dists.append((out - patches).pow(2).mean().sqrt().item())
    assert dists[0] > 1e-3, f"{name} severity 1 changes nothing"
    assert all(b > a for a, b in zip(dists, dists[1:])), f"{name} ({table}): distance by severity {dists}"


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_default_table_is_cifar10c(name):
    """The default rows are the published CIFAR-10-C ones, exactly (every variant included), so numbers compare
    with papers; and the variants are exactly the corruptions whose published rows are not monotone."""
    assert set(MONOTONE_ROWS) == set(VARIANTS) and set(CIFAR10C_ROWS) == set(ALL_CORRUPTIONS)
    assert TABLES[DEFAULT_TABLE][name] == CIFAR10C_ROWS[name] and PARAMS[name] == CIFAR10C_ROWS[name]
    if name in VARIANTS:
        assert TABLES["monotone"][name] == MONOTONE_ROWS[name] != CIFAR10C_ROWS[name]
    else:
        assert TABLES["monotone"][name] == CIFAR10C_ROWS[name]


def test_variants_exist_because_published_rows_are_not_monotone(patches):
    """Each monotone variant earns its place: on the published rows that corruption's distance fails to grow
    at some step (glass_blur: more blur pulls the scrambled image back; motion_blur: severities 3 and 4 tie)."""
    for name in MONOTONE_ROWS:
        d = _distances(patches[::3], name, "published")
        assert not all(b > a for a, b in zip(d, d[1:])), f"{name}: published rows are monotone, {d}"
        m = _distances(patches[::3], name, "monotone")
        assert all(b > a for a, b in zip(m, m[1:])), f"{name}: monotone rows are not, {m}"


def test_table_by_name_changes_only_the_variants(patches):
    x = patches[:8]
    default = vision.corrupt(x, "glass_blur", 2, seed=0)
    assert torch.equal(default, vision.corrupt(x, "glass_blur", 2, seed=0, table="published"))
    monotone = vision.corrupt(x, "glass_blur", 2, seed=0, table="monotone")
    assert not torch.equal(monotone, default)
    # the monotone row (two swap passes) scrambles further than the published one (one pass)
    assert (monotone - x).pow(2).mean() > (default - x).pow(2).mean()
    # same rows at severity 1: a table picks rows, the rendering is the same
    assert torch.equal(vision.corrupt(x, "glass_blur", 1, seed=0, table="monotone"), vision.corrupt(x, "glass_blur", 1))
    for name in ALL_CORRUPTIONS:
        if name in MONOTONE_ROWS:
            continue
        for severity in (2, 5):
            assert torch.equal(
                vision.corrupt(x, name, severity, seed=1, table="monotone"), vision.corrupt(x, name, severity, seed=1)
            ), f"{name}-{severity} changed with the table"


@pytest.mark.parametrize("table", ["monotonic", "Published", None, 0])
def test_unknown_table_refused(table, patches):
    with pytest.raises(ValueError, match=r"unknown severity table .* \(argument table\); accepted: 'published', "
                                         r"'monotone' \(default 'published'.*changes glass_blur"):
        vision.corrupt(patches[:1], "fog", 1, table=table)


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
