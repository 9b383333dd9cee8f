"""mpopt_hf: memory-aware retraining for Hugging Face models.

Chooses the memory-related hyperparameters of a training run (micro-batch size with
gradient accumulation, freezing rate, activation-checkpointing segments, precision)
under a memory budget, and keeps re-choosing them as the data drifts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import MemoryConfig
from .lazy_exports import lazy_getattr

__version__ = "0.1.0"

# The trainer pulls in transformers' Trainer (slow to import): load it on first use.
_LAZY = {
    "MPOptTrainer": "mpopt_hf.training.trainer",
    "MPOptArguments": "mpopt_hf.config.arguments",
    "MPOptCallback": "mpopt_hf.callback.callback",
    "apply_memory_config": "mpopt_hf.model.knobs",
    "find_blocks": "mpopt_hf.model.blocks",
    "WallClockLimit": "mpopt_hf.training.wall_clock",
    "BudgetTrace": "mpopt_hf.budget",
}

__all__ = ["MemoryConfig", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover  (the redundant aliases re-export for type checkers)
    from .budget import BudgetTrace as BudgetTrace
    from .callback.callback import MPOptCallback as MPOptCallback
    from .config.arguments import MPOptArguments as MPOptArguments
    from .model.blocks import find_blocks as find_blocks
    from .model.knobs import apply_memory_config as apply_memory_config
    from .training.trainer import MPOptTrainer as MPOptTrainer
    from .training.wall_clock import WallClockLimit as WallClockLimit


__getattr__ = lazy_getattr(__name__, _LAZY)
