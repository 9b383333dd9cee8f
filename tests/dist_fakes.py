"""Fakes shared by the engine/OOM/callback tests and the 2-process script: fake out-of-memory, cost, clock."""

from __future__ import annotations

import torch

from mpopt_hf.config import MemoryConfig

MIB = 2**20


class FakeOOM:
    """A forward pre-hook that raises torch.OutOfMemoryError when a micro-batch exceeds ``limit`` samples.

    ``train_limit``/``eval_limit`` apply in training/eval mode (None = never). Every forward's batch size is
    recorded in ``sizes`` (with a marker ``"!"`` appended when it raised), so a test can assert the exact
    sequence tried.
    """

    def __init__(self, model: torch.nn.Module, train_limit: int | None = None, eval_limit: int | None = None):
        self.train_limit, self.eval_limit = train_limit, eval_limit
        self.sizes: list[str] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        values = kwargs.get("pixel_values", kwargs.get("input_ids"))
        size = int(values.shape[0])
        limit = self.train_limit if module.training else self.eval_limit
        mode = "train" if module.training else "eval"
        if limit is not None and size > limit:
            self.sizes.append(f"{mode}{size}!")
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a fake micro-batch of {size}.")
        self.sizes.append(f"{mode}{size}")


class FakeCost:
    """Peak grows with the micro-batch and the trainable share, falls with checkpoint segments."""

    def __init__(self, base_mib: float = 10.0, per_sample_mib: float = 8.0):
        self.base, self.per_sample = base_mib, per_sample_mib

    def peak(self, c: MemoryConfig) -> float:
        return (self.base + self.per_sample * c.micro_batch_size * (1 - c.freeze_rate) / (1 + c.checkpoint_segments)) * MIB

    def predict(self, c: MemoryConfig) -> tuple[float, float]:
        step_s = (1.0 + 0.3 * c.checkpoint_segments) * (1 - 0.5 * c.freeze_rate) / (1 + 0.1 * c.micro_batch_size)
        return self.peak(c), step_s


class StepClock:
    """A clock that advances ``tick`` seconds per call: step times become deterministic."""

    def __init__(self, tick: float = 0.5):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now
