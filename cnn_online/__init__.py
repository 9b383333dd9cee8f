"""The MPOptimizer seed's CNN retraining experiment on the Hugging Face stack: a ``small_cnn`` zoo model,
pre-trained on a source domain, retrained over a stream of target domains under a memory budget.

    python recipes/cnn_retrain.py                                   # offline: digits -> mnist-m, svhn, usps
    python recipes/cnn_retrain.py --dataset cifar10-c --data_dir DIR --model resnet50 --task 5 --epoch 1

``cnn_online.run.main`` is the recipe; ``cnn_online.data`` builds its streams.
"""

from __future__ import annotations

from .data import DATASETS, DataArguments, load_stream
from .run import ModelArguments, SeedArguments, apply_seed_flags, main, parse

__all__ = ["DATASETS", "DataArguments", "ModelArguments", "SeedArguments", "apply_seed_flags", "load_stream", "main",
           "parse"]
