"""ViT image classification retrained online over a stream of corrupted domains under a memory budget.

    python recipes/vit_cls_online.py                       # offline: a ~0.3 M ViT, digits -> 5 corruptions
    python recipes/vit_cls_online.py --model google/vit-base-patch16-224 --dataset cifar10-c --data_dir DIR

``vit_online.run.main`` is the recipe, ``vit_online.data`` builds its streams and ``vit_online.modeling`` its
models (a ViTForImageClassification that resizes and normalises images in [0, 1] itself).
"""

from __future__ import annotations

from online_recipe.arguments import DEFAULT_CORRUPTIONS

from .data import DATASETS, DataArguments, load_stream
from .modeling import PUBLIC_CONFIGS, TINY, ModelNotAvailableError, ViTOnlineForImageClassification, build_random
from .modeling import build_tiny, load_pretrained, public_config, tiny_config
from .run import ModelArguments, main, parse

__all__ = ["DATASETS", "DEFAULT_CORRUPTIONS", "DataArguments", "ModelArguments", "ModelNotAvailableError",
           "PUBLIC_CONFIGS", "TINY", "ViTOnlineForImageClassification", "build_random", "build_tiny",
           "load_pretrained", "load_stream", "main", "parse", "public_config", "tiny_config"]
