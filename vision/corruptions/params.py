"""Severity tables of the corruptions, one row per severity 1..5, in two named tables.

``"published"`` (the default, ``DEFAULT_TABLE``) holds the values of Hendrycks &
Dietterich's CIFAR-10-C (the 32x32 variant of "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations", ICLR 2019), so numbers
measured on it compare with papers. Source of every row: ``make_cifar_c.py``
in github.com/hendrycks/robustness (``ImageNet-C/create_c/``, commit ca360085),
the script that built the released CIFAR-10-C.

``"monotone"`` is the published table with ``MONOTONE_ROWS`` swapped in: the
corruptions whose published rows do not move an image monotonically further
from the clean one as severity grows (a stream that walks severity 1 -> 5 must
get harder at every step; ``tests/test_vision_corruptions.py`` checks the RMS
distance on real photo patches). It is exactly the table this package used
before the published one became the default, so older runs reproduce with
``table="monotone"``. What the monotone rows change, and why:

* ``glass_blur``: published (sigma, shift, iterations) = (0.05,1,1), (0.25,1,1),
  (0.4,1,1), (0.25,1,2), (0.4,1,2). More blur pulls the scrambled image back
  towards the clean one, so rows 2, 3 and 5 each move the image *less* than the
  row before. The monotone rows keep sigma non-decreasing and let the pixel
  shift and the number of swap passes grow instead (as the ImageNet-C table does).
* ``frost``: (image, frost) weights of severity 3 and 4 are (0.9, 0.4) and
  (0.85, 0.4): darkening the image while adding the same frost moves it back
  towards the clean one. Frost weights 0.38 and 0.43 restore the order.
* ``elastic_transform``: the published rows shrink the affine jitter
  (0.08 -> 0.03 of the image size) while the elastic field grows, and the net
  displacement falls with severity. The monotone rows keep the elastic
  (alpha, sigma) pairs and let the affine jitter grow, 0.02 -> 0.08.
* ``motion_blur``: published (radius, sigma) = (6,1), (6,1.5), (6,2), (8,2),
  (9,2.5); severities 3 and 4 share sigma 2, and the taps past ~3.7 sigma weigh
  nothing, so the two rows blur identically. The monotone rows are Tiny-ImageNet-C's
  (``make_tinyimagenet_c.py``, same repository), whose sigma grows at every step.
* ``spatter`` (extra): the mud rows (severity 4, 5) threshold at 0.69 and 0.68,
  which leaves less of the image covered than the dense water of severity 3;
  the monotone rows use 0.66 and 0.64. Either way the water and mud rendering
  is our own (see ``weather.spatter``), not the reference's OpenCV pipeline.
* ``saturate`` (extra): published as (x0.3, x0.1, x1.5, x2+0.1, x2.5+0.2), two
  desaturating rows then three oversaturating ones, so severity 3 is milder
  than 2. The monotone rows keep one direction: the three oversaturating rows
  as severities 1-3, continued as x3+0.3 and x4+0.4.

The rows are tuned for 32x32 images: on larger images the spatial corruptions
(blurs, elastic, pixel swaps) are proportionally weaker.
"""

from __future__ import annotations

from collections.abc import Mapping

SIZE = 32  # the image size the tables were made for

# name -> five rows (severity 1..5), as in make_cifar_c.py (see the module docstring)
PUBLISHED: dict[str, tuple] = {
    # std of additive Gaussian noise
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    # photons per unit intensity (lower = noisier)
    "shot_noise": (500, 250, 100, 75, 50),
    # fraction of values set to 0 or 1
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    # std of multiplicative Gaussian noise
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    # Gaussian sigma in pixels
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    # (sigma, max pixel shift, iterations of the swap pass)
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    # (disk radius, sigma of the anti-alias blur of the disk)
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)),
    # (radius, sigma) of a one-sided motion kernel; angle uniform in [-45, 45] degrees
    "motion_blur": ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5)),
    # number of zoom factors 1.00, 1.01, ... averaged with the image
    "zoom_blur": (6, 11, 16, 21, 26),
    # (mean, std, zoom, threshold, blur radius, blur sigma, image weight)
    "snow": (
        (0.10, 0.20, 1.00, 0.60, 8, 3, 0.95),
        (0.10, 0.20, 1.00, 0.50, 10, 4, 0.90),
        (0.15, 0.30, 1.75, 0.55, 10, 4, 0.90),
        (0.25, 0.30, 2.25, 0.60, 12, 6, 0.85),
        (0.30, 0.30, 1.25, 0.65, 14, 12, 0.80),
    ),
    # (image weight, frost weight)
    "frost": ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    # (fog strength, fractal decay: larger = smoother)
    "fog": ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75)),
    # added to the HSV value
    "brightness": (0.05, 0.10, 0.15, 0.20, 0.30),
    # factor towards the per-channel mean
    "contrast": (0.75, 0.50, 0.40, 0.30, 0.15),
    # (alpha, sigma, affine jitter), as fractions of the image size (make_cifar_c.py: IMSIZE * these)
    "elastic_transform": (
        (0.00, 0.00, 0.08),
        (0.05, 0.20, 0.07),
        (0.08, 0.06, 0.06),
        (0.10, 0.04, 0.05),
        (0.10, 0.03, 0.03),
    ),
    # down-scaling factor before scaling back up
    "pixelate": (0.95, 0.90, 0.85, 0.75, 0.65),
    # JPEG quality
    "jpeg_compression": (80, 65, 58, 50, 40),
    # (mean, std, sigma, threshold, intensity, mode 0 = water / 1 = mud)
    "spatter": (
        (0.62, 0.1, 0.7, 0.70, 0.5, 0),
        (0.65, 0.1, 0.8, 0.70, 0.5, 0),
        (0.65, 0.3, 1.0, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1),
        (0.65, 0.1, 0.5, 0.68, 0.6, 1),
    ),
    # (saturation factor, saturation offset) in HSV
    "saturate": ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2)),
}

# the rows the "monotone" table puts in place of the published ones (why: the module docstring)
MONOTONE_ROWS: dict[str, tuple] = {
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 2), (0.25, 2, 1), (0.4, 2, 2), (0.4, 2, 3)),
    "frost": ((1.0, 0.2), (1.0, 0.3), (0.9, 0.38), (0.85, 0.43), (0.75, 0.45)),
    "elastic_transform": (
        (0.00, 0.00, 0.02),
        (0.05, 0.20, 0.03),
        (0.08, 0.06, 0.04),
        (0.10, 0.04, 0.05),
        (0.10, 0.03, 0.08),
    ),
    # Tiny-ImageNet-C's rows (make_tinyimagenet_c.py)
    "motion_blur": ((10, 1.0), (10, 1.5), (10, 2.0), (10, 2.5), (12, 3.0)),
    "spatter": (
        (0.62, 0.1, 0.7, 0.70, 0.5, 0),
        (0.65, 0.1, 0.8, 0.70, 0.5, 0),
        (0.65, 0.3, 1.0, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.66, 0.6, 1),
        (0.65, 0.1, 0.5, 0.64, 0.6, 1),
    ),
    "saturate": ((1.5, 0.0), (2.0, 0.1), (2.5, 0.2), (3.0, 0.3), (4.0, 0.4)),
}

DEFAULT_TABLE = "published"
TABLES: Mapping[str, Mapping[str, tuple]] = {
    "published": PUBLISHED,
    "monotone": {**PUBLISHED, **MONOTONE_ROWS},
}

# the default table under its historical name
PARAMS = PUBLISHED


def check_table(table: str) -> None:
    """Raise ValueError unless ``table`` names a severity table (a typo must not silently give the default)."""
    if not isinstance(table, str) or table not in TABLES:
        raise ValueError(
            f"unknown severity table {table!r} (argument table); accepted: {', '.join(map(repr, TABLES))} "
            f"(default {DEFAULT_TABLE!r}: the CIFAR-10-C values; 'monotone' changes {', '.join(MONOTONE_ROWS)})"
        )
