"""The online resource profiler: what a training step under a `MemoryConfig` costs.

* `measure` (`profiler.measure`): run real steps, report peak memory by category and step time
  (CUDA allocator counters; on CPU MemTracker and the profiler's allocation events);
* `predict_step` (`profiler.fake`): the same step on fake copies of the model, optimizer and batch;
* `build_memory_model` (`profiler.tracing`): the memory model, from the per-block span traces of fake
  steps (`profiler.spans`) and the exact terms read off the model (`profiler.structure`);
* `fit_profile` (`profiler.fitting`): the memory model of a configuration space, calibrated on at
  most 3 measurements and kept in the profile store.
"""

from .fake import FakeSetup, fake_batch, fake_setup, init_optimizer_state, predict_step
from .fitting import (
    Profile,
    choose_fit_configs,
    fit_profile,
    input_signature,
    profile_key,
)
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
from .spans import trace_step
from .structure import model_structure, optimizer_cost, units_of
from .tracing import build_memory_model

__all__ = [
    "CATEGORIES", "FakeSetup", "Measurement", "Profile", "build_memory_model", "choose_fit_configs", "device_type_of",
    "fake_batch", "fake_setup", "fit_profile", "init_optimizer_state", "input_signature", "loss_of", "measure",
    "model_structure", "new_tracker", "optimizer_cost", "predict_step", "profile_key", "restored_after", "trace_step",
    "train_step", "units_of",
]
