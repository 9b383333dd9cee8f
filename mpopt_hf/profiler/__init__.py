"""The online resource profiler: what a training step under a `MemoryConfig` costs.

* `measure` (`profiler.measure`): run real steps, report peak memory by category and step time
  (CUDA allocator counters; on CPU MemTracker and the profiler's allocation events);
* `predict_step` and `build_memory_model` (`profiler.tracing`): the same step on fake tensors, and
  the per-block span traces the fitted memory model is built from;
* `fit_profile` (`profiler.fitting`): the memory model of a configuration space, calibrated on at
  most 3 measurements and kept in the profile store.
"""

from .fitting import Profile, choose_fit_configs, fit_profile, input_signature, profile_key
from .measure import (
    CATEGORIES,
    Measurement,
    device_type_of,
    loss_of,
    measure,
    new_tracker,
    restored_after,
    train_step,
)
from .tracing import (
    FakeSetup,
    build_memory_model,
    fake_batch,
    fake_setup,
    init_optimizer_state,
    model_structure,
    optimizer_cost,
    predict_step,
    trace_step,
    units_of,
)

__all__ = [
    "CATEGORIES", "FakeSetup", "Measurement", "Profile", "build_memory_model", "choose_fit_configs", "device_type_of",
    "fake_batch", "fake_setup", "fit_profile", "init_optimizer_state", "input_signature", "loss_of", "measure",
    "model_structure", "new_tracker", "optimizer_cost", "predict_step", "profile_key", "restored_after", "trace_step",
    "train_step", "units_of",
]
