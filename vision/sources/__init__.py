"""Built-in data sources; importing this package registers them."""

from . import cifar, cifar_c, digits, digits_domains, hub, office31, sample_images  # noqa: F401  (registration side effect)
from .base import RawImages, SplitSource

__all__ = ["RawImages", "SplitSource"]
