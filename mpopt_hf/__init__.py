"""mpopt_hf: memory-aware retraining for Hugging Face models.

Chooses the memory-related hyperparameters of a training run (micro-batch size with
gradient accumulation, freezing rate, activation-checkpointing segments, precision)
under a memory budget, and keeps re-choosing them as the data drifts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import MemoryConfig

__version__ = "0.1.0"

# The trainer pulls in transformers' Trainer (slow to import): load it on first use.
_LAZY = {
    "MPOptTrainer": "mpopt_hf.trainer",
    "MPOptArguments": "mpopt_hf.config",
    "MPOptCallback": "mpopt_hf.callback",
    "apply_memory_config": "mpopt_hf.knobs",
    "find_blocks": "mpopt_hf.blocks",
    "WallClockLimit": "mpopt_hf.wall_clock",
    "BudgetTrace": "mpopt_hf.budget",
}

__all__ = ["MemoryConfig", *_LAZY]

if TYPE_CHECKING:  # pragma: no cover  (the redundant aliases re-export for type checkers)
    from .blocks import find_blocks as find_blocks
    from .budget import BudgetTrace as BudgetTrace
    from .callback import MPOptCallback as MPOptCallback
    from .config import MPOptArguments as MPOptArguments
    from .knobs import apply_memory_config as apply_memory_config
    from .trainer import MPOptTrainer as MPOptTrainer
    from .wall_clock import WallClockLimit as WallClockLimit


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        if not hasattr(module, name):
            raise AttributeError(f"mpopt_hf.{name} is not available yet in this version")
        return getattr(module, name)
    raise AttributeError(f"module 'mpopt_hf' has no attribute {name!r}")
