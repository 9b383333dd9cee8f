"""A user's own segmentation folder (``--data_dir DIR``): images and their object masks as PNG files.

The layout::

    DIR/
      images/NAME.png        # or NAME.jpg / NAME.jpeg: any image PIL reads, converted to RGB
      masks/NAME.png         # one PNG per image, same NAME, same width and height, single channel
                             # (mode 1, L, P, I;16 or I): 0 is background, every other value is one object,
                             # so a 0/255 mask holds one object and an instance-id PNG (1, 2, 3, ...) several

Each object becomes one sample: the image, the object's binary mask, and its box prompt ``[x0, y0, x1, y1]``
derived from the mask (smallest and largest column and row). Images are scaled so their longer side is
``image_size`` (the model's input side: 1024 for SAM ViT-B), bilinearly, and padded to a square at the bottom and
right with ``pad_value`` (the recipe pads with SAM's pixel mean, which its normalisation turns into the zeros
SamProcessor pads with); masks the same way with nearest-neighbour sampling. An object that keeps
fewer than ``min_pixels`` pixels at that size is left out. Train/val/test are split by image (never one image's
objects on two sides), by a seeded permutation of the sorted names.

Only PIL decodes the files: nothing is unpickled, nothing is downloaded. Images are held decoded, float32 at
``image_size`` (12 MiB each at 1024), so cap a large folder with ``--train_per_task`` / ``--test_per_task``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from vision.errors import DataLayoutError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_MODES = ("1", "L", "P", "I;16", "I")
LAYOUT = ("DIR/images/NAME.png (or .jpg/.jpeg) and DIR/masks/NAME.png with the same NAME and size: a single-channel "
          "PNG, 0 = background, each other value one object")
FOLDER_DATASET = "segmentation folder"


def _layout_error(root: str, problem: str) -> DataLayoutError:
    return DataLayoutError(dataset=FOLDER_DATASET, expected=f"{LAYOUT}; {problem}", looked_in=os.path.abspath(root),
                           how_to_get="write your images and masks in that layout (e.g. PIL's Image.save); nothing "
                           "is downloaded. Without --data_dir the recipe generates its own shapes offline")


def pair_files(root: str) -> list[tuple[str, str, str]]:
    """``(name, image path, mask path)`` of every mask in ``root/masks``, sorted by name; its image must exist."""
    images_dir, masks_dir = os.path.join(root, "images"), os.path.join(root, "masks")
    for folder in (images_dir, masks_dir):
        if not os.path.isdir(folder):
            raise _layout_error(root, f"the folder {os.path.basename(folder)}/ is missing")
    images = {}
    for file in os.listdir(images_dir):
        stem, suffix = os.path.splitext(file)
        if suffix.lower() in IMAGE_SUFFIXES:
            images.setdefault(stem, os.path.join(images_dir, file))
    masks = sorted(f for f in os.listdir(masks_dir) if os.path.splitext(f)[1].lower() == ".png")
    if not masks:
        raise _layout_error(root, "masks/ holds no .png file")
    missing = [m for m in masks if os.path.splitext(m)[0] not in images]
    if missing:
        raise _layout_error(root, f"no image in images/ for the masks {missing[:5]}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return [(os.path.splitext(m)[0], images[os.path.splitext(m)[0]], os.path.join(masks_dir, m)) for m in masks]


def _fit(image: Image.Image, side: int, resample: Image.Resampling) -> tuple[Image.Image, tuple[int, int]]:
    """``image`` scaled so its longer side is ``side`` (the shorter rounded), and that size (w, h)."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, resample), size


def read_pair(image_path: str, mask_path: str, side: int, root: str, pad_value: Sequence[float] = (0.0, 0.0, 0.0)
              ) -> tuple[np.ndarray, np.ndarray]:
    """Image float32 (3, side, side) in [0, 1] and the mask's object ids int64 (side, side), scaled and padded."""
    with Image.open(image_path) as image, Image.open(mask_path) as mask:
        if mask.mode not in MASK_MODES:
            raise _layout_error(root, f"{os.path.basename(mask_path)} is a {mask.mode} PNG, expected a single "
                                f"channel ({', '.join(MASK_MODES)})")
        if image.size != mask.size:
            raise _layout_error(root, f"{os.path.basename(image_path)} is {image.size[0]}x{image.size[1]} but its "
                                f"mask {mask.size[0]}x{mask.size[1]}")
        rgb, (w, h) = _fit(image.convert("RGB"), side, Image.Resampling.BILINEAR)
        ids, _ = _fit(mask if mask.mode != "1" else mask.convert("L"), side, Image.Resampling.NEAREST)
        pixels = np.empty((3, side, side), dtype=np.float32)
        pixels[:] = np.asarray(pad_value, dtype=np.float32)[:, None, None]
        pixels[:, :h, :w] = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
        objects = np.zeros((side, side), dtype=np.int64)
        objects[:h, :w] = np.asarray(ids, dtype=np.int64)
    return pixels, objects


def split_names(names: list[str], seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """Image names per split: a seeded permutation of the sorted names, cut by the fractions (each split >= 1)."""
    if len(names) < 3:
        raise ValueError(f"A segmentation folder needs at least 3 images (one per split), got {len(names)}.")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_val = max(1, round(len(order) * val_fraction))
    n_test = max(1, round(len(order) * test_fraction))
    return {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}


def load_folder(root: str, side: int, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                min_pixels: int = 4, pad_value: Sequence[float] = (0.0, 0.0, 0.0)
                ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """split -> (images (N, 3, side, side), masks (N, side, side) float32 0/1, boxes (N, 1, 4)), one row per object."""
    from .shapes import box_of

    root = os.path.expanduser(root)
    pairs = {name: (image, mask) for name, image, mask in pair_files(root)}
    splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for split, names in split_names(sorted(pairs), seed, val_fraction, test_fraction).items():
        images, masks, boxes = [], [], []
        for name in names:
            pixels, objects = read_pair(*pairs[name], side, root, pad_value)
            for value in np.unique(objects[objects != 0]):
                mask = objects == value
                if mask.sum() >= min_pixels:
                    images.append(pixels)
                    masks.append(mask.astype(np.float32))
                    boxes.append(box_of(mask)[None])
        if not images:
            raise _layout_error(root, f"the {split} split's images ({names[:5]}) hold no object of at least "
                                f"{min_pixels} pixels at {side}x{side}")
        splits[split] = (np.stack(images), np.stack(masks), np.stack(boxes))
    return splits
