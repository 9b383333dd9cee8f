"""vision's digits-domains: the offline MNIST-M / SVHN / USPS-style targets derived from scikit-learn's digits."""

from __future__ import annotations

import numpy as np
import pytest

import vision
from vision.sources import digits_domains
from vision.sources.digits import digits_arrays
from vision.sources.digits_domains import DOMAINS, domain_arrays, mnist_m, source_ink, svhn, usps

SIZE = 16


def _pixels(ds) -> np.ndarray:
    return ds[:]["pixel_values"].numpy()


def _labels(ds) -> list[int]:
    return [int(v) for v in ds[:]["labels"]]


def test_registered_next_to_digits_with_its_classes():
    assert {"digits", "digits-domains"} <= set(vision.available())
    info = vision.get_info("digits-domains")
    assert info.classes == vision.get_info("digits").classes == tuple(str(d) for d in range(10))
    assert info.shift_type == "Domain Shift"


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_labels_split_and_size_are_the_sources(domain, split):
    source = vision.load("digits", split=split, image_size=SIZE, seed=3)
    target = vision.load("digits-domains", split=split, domain=domain, image_size=SIZE, seed=3)
    assert _labels(target) == _labels(source)  # the same digits in the same split, in the same order
    assert target.features["labels"].names == source.features["labels"].names
    pixels = _pixels(target)
    assert pixels.dtype == np.float32 and pixels.shape == (len(source), 3, SIZE, SIZE)
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0 and np.isfinite(pixels).all()


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_image_and_label_is_kept(domain):
    images, labels = domain_arrays(domain, 32)
    src_images, src_labels = digits_arrays(32)
    assert images.shape == src_images.shape == (1797, 3, 32, 32) and images.dtype == np.float32
    assert np.array_equal(labels, src_labels)
    assert not images.flags.writeable  # cached: a caller cannot change what the next one reads


def test_rendering_is_deterministic_given_the_seed():
    ink = source_ink(SIZE)
    for render in (mnist_m, svhn):
        first, again, other = render(ink, 5), render(ink, 5), render(ink, 6)
        assert first.numpy().tobytes() == again.numpy().tobytes()
        assert np.abs(first.numpy() - other.numpy()).mean() > 0.05  # another seed: other backgrounds and colours
    assert usps(ink).numpy().tobytes() == usps(ink).numpy().tobytes()
    loaded = [_pixels(vision.load("digits-domains", split="val", domain="svhn", image_size=SIZE, style_seed=2))
              for _ in range(2)]
    assert loaded[0].tobytes() == loaded[1].tobytes()


def test_domains_differ_measurably_from_the_source_and_each_other():
    source = digits_arrays(SIZE)[0]
    images = {d: domain_arrays(d, SIZE)[0] for d in DOMAINS}
    for domain, pixels in images.items():
        assert np.abs(pixels - source).mean() > 0.15, domain  # mean per-pixel distance to the source image
    for a, b in [("mnist-m", "svhn"), ("mnist-m", "usps"), ("svhn", "usps")]:
        assert np.abs(images[a] - images[b]).mean() > 0.15, (a, b)
    # colour: mnist-m and svhn have it, usps is grey like the source
    assert images["mnist-m"].std(axis=1).mean() > 0.03 and images["svhn"].std(axis=1).mean() > 0.03
    assert images["usps"].std(axis=1).max() < 1e-6 and source.std(axis=1).max() < 1e-6
    # usps: the digit fills its box and the strokes are thicker, so more of the image is ink
    assert (images["usps"] > 0.5).mean() > 1.2 * (source > 0.5).mean()
    thin = domain_arrays("usps", SIZE, stroke=-1)[0]
    assert (thin > 0.5).mean() < (images["usps"] > 0.5).mean()


def test_svhn_shows_neighbours_at_the_edges():
    images = domain_arrays("svhn", 32)[0]
    edges = np.concatenate([images[..., :3], images[..., -3:]], axis=-1)
    # the border columns vary along the rows (a neighbour's strokes, not a smooth background) in most images
    assert (edges.std(axis=-2).mean(axis=(1, 2)) > 0.04).mean() > 0.5


def _polarity_free(ds) -> np.ndarray:
    """|standardised luminance| per pixel: light-on-dark and dark-on-light ink look alike."""
    grey = _pixels(ds).mean(axis=1)
    grey = (grey - grey.mean(axis=(1, 2), keepdims=True)) / (grey.std(axis=(1, 2), keepdims=True) + 1e-6)
    return np.abs(grey).reshape(len(ds), -1)


def test_the_image_still_says_the_digit():
    """A nearest-class-mean classifier fitted on each domain's train split beats chance by far on its test split."""
    for domain in DOMAINS:
        train = vision.load("digits-domains", split="train", domain=domain, image_size=SIZE)
        test = vision.load("digits-domains", split="test", domain=domain, image_size=SIZE)
        x, y = _polarity_free(train), np.array(_labels(train))
        means = np.stack([x[y == c].mean(axis=0) for c in range(10)])
        predicted = np.argmin(((_polarity_free(test)[:, None] - means[None]) ** 2).sum(-1), axis=1)
        assert (predicted == np.array(_labels(test))).mean() > 0.3, domain  # chance: 0.1


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"domain": "mnist"}, r"DigitDomains\.domain must be one of \['mnist-m', 'svhn', 'usps'\], got 'mnist'"),
        ({"domain": None}, r"DigitDomains\.domain must be one of"),
        ({"image_size": 4}, r"DigitDomains\.image_size must be an int >= 8, got 4"),
        ({"image_size": 16.0}, r"DigitDomains\.image_size must be an int >= 8, got 16\.0"),
        ({"style_seed": -1}, r"DigitDomains\.style_seed must be an int >= 0, got -1"),
        ({"usps_size": True}, r"DigitDomains\.usps_size must be an int >= 4, got True"),
        ({"stroke": 4}, r"DigitDomains\.stroke must be an int in -2\.\.3, got 4"),
        ({"colour": True}, r"digits-domains: unknown option\(s\) \['colour'\]; accepted: .*'domain'"),
    ],
)
def test_bad_arguments_are_refused_by_name(options, match):
    with pytest.raises(ValueError, match=match):
        vision.load("digits-domains", **options)


def test_domain_arrays_refuses_an_unknown_domain():
    with pytest.raises(ValueError, match=r"unknown domain 'usps-2'; domains: \['mnist-m', 'svhn', 'usps'\]"):
        digits_domains.domain_arrays("usps-2")
