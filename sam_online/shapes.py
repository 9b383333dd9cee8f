"""The offline segmentation set: discs, squares and triangles cut from one photograph, laid over another.

Every image is a crop of one of the photographs scikit-image ships (``vision.sources.sample_images``, never
fetched) with one to ``max_objects`` shapes on it, each filled with a crop of a *different* photograph and a
brightness shift, so an object is told from its background by texture and tone, not by a flat colour. The
later shapes occlude the earlier ones; one shape whose visible part covers at least ``min_area`` of the image
is the sample's object: its visible mask is the label, and the prompt is the mask's bounding box with each edge
moved out by a random share (up to ``box_jitter``) of the box's side, as SAM's own training perturbs its boxes.
Squares and triangles are rotated and the box is loose, so the box alone is not the answer (filling it scores an
IoU of about 0.4): the model has to find the object's edges in the image, which the corruptions then blur.

Sample ``i`` of a seed is a pure function of ``(seed, i, image_size, ...)``: its own
``numpy.random.default_rng([*seed, i])`` (a seed is an int or a tuple of ints, e.g. ``(stream_seed, split)``), so a
subset or a longer set regenerates the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

SHAPES = ("disc", "square", "triangle")
# the photographs of vision.sources.sample_images that scikit-image ships (scikit-learn's two are left out)
TEXTURES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "brick", "grass")


@dataclass(frozen=True)
class ShapesConfig:
    """How the images are drawn; sizes are shares of the image side unless said otherwise."""

    image_size: int = field(default=64, metadata={"help": "side of the square images, pixels (>= 16)"})
    max_objects: int = field(default=3, metadata={"help": "shapes per image, 1..max_objects"})
    min_radius: float = field(default=0.12, metadata={"help": "smallest shape radius (half side), share of the side"})
    max_radius: float = field(default=0.3, metadata={"help": "largest shape radius, share of the side"})
    min_area: float = field(default=0.02, metadata={"help": "the object's visible area at least, share of the image"})
    box_jitter: float = field(default=0.3, metadata={"help": "each prompt edge moves out by up to this share of the "
                                                      "box's side (0: the mask's tight bounding box)"})
    tone: float = field(default=0.1, metadata={"help": "a shape's fill is scaled by 1 +- tone and shifted by +- tone: "
                                                "how far it may differ in brightness from its texture"})

    def __post_init__(self) -> None:
        from mpopt_hf.config import check_int, check_number

        where = "ShapesConfig."
        check_int(where + "image_size", self.image_size, lambda v: v >= 16, "an int >= 16")
        check_int(where + "max_objects", self.max_objects, lambda v: 1 <= v <= 8, "an int in 1..8")
        check_number(where + "min_radius", self.min_radius, lambda v: 0.02 <= v <= 0.5, "in [0.02, 0.5]")
        check_number(where + "max_radius", self.max_radius, lambda v: self.min_radius <= v <= 0.5,
                     f"in [min_radius={self.min_radius}, 0.5]")
        check_number(where + "min_area", self.min_area, lambda v: 0 < v < 0.25, "in (0, 0.25)")
        check_number(where + "box_jitter", self.box_jitter, lambda v: 0 <= v <= 1, "in [0, 1]")
        check_number(where + "tone", self.tone, lambda v: 0 <= v <= 0.5, "in [0, 0.5]")


@lru_cache(maxsize=8)
def _texture(name: str, side: int) -> np.ndarray:
    """Photograph ``name`` scaled so its shorter side is ``side`` pixels: float32 (H, W, 3) in [0, 1], read-only."""
    from vision.sources.sample_images import read_source_image

    image = Image.fromarray(read_source_image(name))
    scale = side / min(image.size)
    image = image.resize((max(side, round(image.width * scale)), max(side, round(image.height * scale))),
                         Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    array.setflags(write=False)
    return array


def _crop(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """A random ``size`` x ``size`` crop of a photograph scaled to twice that side (a piece, not a flat area)."""
    texture = _texture(name, 2 * size)
    top = int(rng.integers(0, texture.shape[0] - size + 1))
    left = int(rng.integers(0, texture.shape[1] - size + 1))
    return texture[top:top + size, left:left + size]


def _shape_mask(rng: np.random.Generator, kind: str, size: int, cfg: ShapesConfig) -> np.ndarray:
    """A boolean (size, size) mask of one shape: centre inside the image, radius and rotation drawn by ``rng``."""
    radius = float(rng.uniform(cfg.min_radius, cfg.max_radius)) * size
    cy, cx = rng.uniform(radius * 0.5, size - radius * 0.5, 2)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if kind == "disc":
        return (rows - cy) ** 2 + (cols - cx) ** 2 <= radius ** 2
    corners = 4 if kind == "square" else 3
    angle = float(rng.uniform(0, 2 * np.pi))
    theta = angle + 2 * np.pi * np.arange(corners) / corners
    ys, xs = cy + radius * np.sin(theta), cx + radius * np.cos(theta)
    inside = np.ones((size, size), dtype=bool)
    for k in range(corners):  # a convex polygon, counter-clockwise corners: inside every edge's half-plane
        y0, x0, y1, x1 = ys[k], xs[k], ys[(k + 1) % corners], xs[(k + 1) % corners]
        inside &= (x1 - x0) * (rows - y0) - (y1 - y0) * (cols - x0) >= 0
    return inside


def box_of(mask: np.ndarray) -> np.ndarray:
    """The prompt of a mask: float32 ``[x0, y0, x1, y1]``, the smallest and largest column and row it covers."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("box_of: the mask is empty; an object needs at least one pixel.")
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float32)


def loosen(box: np.ndarray, rng: np.random.Generator, jitter: float, size: int) -> np.ndarray:
    """``box`` with each edge moved out by ``uniform(0, jitter)`` of the box's width (x) or height (y), kept inside
    the image; it still contains every pixel of the mask."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    grow = rng.uniform(0, jitter, 4) * np.array([w, h, w, h])
    loose = np.array([x0 - grow[0], y0 - grow[1], x1 + grow[2], y1 + grow[3]])
    return np.clip(np.round(loose), 0, size - 1).astype(np.float32)


def _key(seed: int | Sequence[int]) -> list[int]:
    return [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]


def draw_sample(seed: int | Sequence[int], index: int, cfg: ShapesConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample ``index`` of ``seed``: image float32 (3, S, S) in [0, 1], mask float32 (S, S) of 0/1, box (4,)."""
    rng = np.random.default_rng([*_key(seed), index])
    size = cfg.image_size
    while True:  # redraw (same generator, so still deterministic) until some shape shows enough of itself
        background, *fills = rng.permutation(len(TEXTURES))[: 1 + cfg.max_objects]
        image = _crop(rng, TEXTURES[background], size).copy()
        owner = np.full((size, size), -1, dtype=np.int64)  # which shape each pixel shows (-1: background)
        count = int(rng.integers(1, cfg.max_objects + 1))
        for k in range(count):
            mask = _shape_mask(rng, SHAPES[int(rng.integers(len(SHAPES)))], size, cfg)
            fill = _crop(rng, TEXTURES[fills[k]], size) * rng.uniform(1 - cfg.tone, 1 + cfg.tone) \
                + rng.uniform(-cfg.tone, cfg.tone)
            image[mask] = np.clip(fill[mask], 0.0, 1.0)
            owner[mask] = k
        areas = np.bincount(owner[owner >= 0], minlength=count)
        visible = np.flatnonzero(areas >= cfg.min_area * size * size)
        if visible.size:
            target = owner == int(visible[int(rng.integers(visible.size))])
            return (np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32), target.astype(np.float32),
                    loosen(box_of(target), rng, cfg.box_jitter, size))


def draw_samples(n: int, seed: int | Sequence[int], cfg: ShapesConfig | None = None, start: int = 0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples ``start .. start + n - 1`` of ``seed``: images (N, 3, S, S), masks (N, S, S), boxes (N, 1, 4)."""
    cfg = cfg or ShapesConfig()
    samples = [draw_sample(seed, start + i, cfg) for i in range(n)]
    images, masks, boxes = (np.stack(parts) for parts in zip(*samples))
    return images, masks, boxes[:, None, :]
