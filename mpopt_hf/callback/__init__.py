"""`MPOptCallback`: Trainer events to engine calls, engine choices to trainer calls (`callback`); the gain signal
(`gain`, `gain_signal`, `train_loss_gain`); building the cost model, store and engine from `MPOptArguments`
(`setup`); the engine's state in a checkpoint (`engine_state`, `checkpoints`); decision logs (`decision_log`)."""

from __future__ import annotations

from ..lazy_exports import lazy_getattr

_STATE = f"{__name__}.engine_state"
__all__ = ["MPOptCallback", "EngineStateError", "EngineStateWarning", "SNAPSHOT_FILE", "STATE_FILE"]
__getattr__ = lazy_getattr(
    __name__, {"MPOptCallback": f"{__name__}.callback", **{name: _STATE for name in __all__[1:]}}
)
