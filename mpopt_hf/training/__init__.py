"""One training step, exact: `MPOptTrainer` (`trainer`) splits the batch (`microbatch`, weighted by `loss_items`),
runs each micro-batch under the configuration's knobs, recovers from out-of-memory errors (`oom`, `step_recovery`,
`step_guard`), measures the step's peak (`step_peak`) and switches optimizer-state precision (`optimizer_state`).
The trainer owns the current configuration; nothing else keeps a copy. Imported on first use (transformers is slow
to load), so `from mpopt_hf.training import microbatch` does not load the Trainer."""

from __future__ import annotations

from ..lazy_exports import lazy_getattr

__all__ = ["MPOptTrainer", "WallClockLimit"]
__getattr__ = lazy_getattr(__name__, {"MPOptTrainer": f"{__name__}.trainer", "WallClockLimit": f"{__name__}.wall_clock"})
