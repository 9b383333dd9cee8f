"""``office31``: the Office-31 domain-adaptation benchmark (Saenko et al., 2010) in
ImageFolder layout, one domain at a time:

    <root>/{amazon,dslr,webcam}/<class>/<image>.jpg
    <root>/{amazon,dslr,webcam}/images/<class>/<image>.jpg   (the layout of the original archive)

(``root_dir`` may also be the parent of an ``office31``/``Office-31`` folder.)
Class folders must be exactly the 31 registered classes; the order of the
labels is the sorted folder names, as ImageFolder does. The images are decoded
lazily and resized to ``image_size``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataLayoutError
from ..registry import register
from .base import RawImages, SplitSource, find_folder, resolve_root

# fmt: off
OFFICE31_CLASSES = (
    "back_pack", "bike", "bike_helmet", "bookcase", "bottle", "calculator", "desk_chair", "desk_lamp",
    "desktop_computer", "file_cabinet", "headphones", "keyboard", "laptop_computer", "letter_tray",
    "mobile_phone", "monitor", "mouse", "mug", "paper_notebook", "pen", "phone", "printer", "projector",
    "punchers", "ring_binder", "ruler", "scissors", "speaker", "stapler", "tape_dispenser", "trash_can",
)
# fmt: on
DOMAINS = ("amazon", "dslr", "webcam")
PARENT_NAMES = ("office31", "Office31", "office-31", "Office-31")  # accepted between root_dir and the domains
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
HOW_TO_GET = (
    "download Office-31 (https://faculty.cc.gatech.edu/~judy/domainadapt/, 'office31.tar.gz') and extract it "
    "into root_dir (nothing here downloads it for you)"
)


def scan_image_folder(folder: str) -> tuple[list[str], list[str], np.ndarray]:
    """ImageFolder scan: (sorted class folder names, image paths, labels)."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(folder, name))):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
    return classes, paths, np.asarray(labels, dtype=np.int64)


@register(name="office31", classes=OFFICE31_CLASSES, shift_type="Domain Shift")
@dataclass
class Office31(SplitSource):
    domain: str = field(default="amazon", metadata={"help": f"one of {DOMAINS}"})
    image_size: int = field(default=224, metadata={"help": "images are resized to this square size, pixels"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.domain not in DOMAINS:
            raise ValueError(f"Office31.domain must be one of {list(DOMAINS)}, got {self.domain!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"Office31.image_size must be an int >= 8, got {self.image_size!r}")

    def layout(self) -> str:
        d = self.domain
        return f"<root_dir>/{d}/<class>/*.jpg (or <root_dir>/{d}/images/<class>/*.jpg), 31 class folders"

    def read(self, root_dir: str | None, part: str) -> RawImages:
        root = resolve_root(root_dir, "office31", self.layout(), HOW_TO_GET)
        base = find_folder(root, PARENT_NAMES, lambda d: os.path.isdir(os.path.join(d, self.domain)))
        if base is None:
            where = f"{os.path.abspath(root)} (no {self.domain}/ folder)"
            raise DataLayoutError("office31", self.layout(), where, HOW_TO_GET)
        folder = os.path.join(base, self.domain)
        if os.path.isdir(os.path.join(folder, "images")):
            folder = os.path.join(folder, "images")
        classes, paths, labels = scan_image_folder(folder)
        if not paths:
            raise DataLayoutError("office31", self.layout(), f"{os.path.abspath(folder)} (no images found)", HOW_TO_GET)
        return RawImages(labels=labels, paths=paths, found_classes=classes, where=folder)
