"""The batch as a knob: a loader batch split into several optimizer updates, with the learning rate scaled.

The loader yields the user's batch (``per_device_train_batch_size``, the largest the engine may use). Under a
`MemoryConfig` with a smaller ``batch_size`` b, one Trainer step runs ``loader batch / b`` updates on consecutive
slices of it: every sample is used once per epoch, as before, and epochs, ``max_steps`` and the scheduler still
count loader batches (Trainer steps); only the number of optimizer updates per step changes. The last update is
Trainer's own (its clipping, ``optimizer.step``, scheduler step and callbacks); the ones before it are made here,
each through the same guarded path (out-of-memory retry, non-finite skip), without ``on_pre_optimizer_step``
callbacks. The learning rate of an update at batch b is the scheduler's times ``lr_scale``, applied around the
optimizer's step and put back after it, so that no scheduler (chainable or not) ever sees a scaled value.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config import LR_SCALINGS, MemoryConfig, check_choice
from .grad_cache import RngState, device_anchors
from .microbatch import batch_size_of, split_batch


def lr_scale(config: MemoryConfig, reference_batch: int, scaling: str) -> float:
    """The learning rate's factor at ``config``'s batch per update, relative to ``reference_batch`` (the batch the
    user's learning rate was set for): 1, b / B, or sqrt(b / B)."""
    check_choice("lr_scaling", scaling, LR_SCALINGS)
    if config.batch_size is None or config.batch_size == reference_batch:
        return 1.0
    ratio = config.batch_size / reference_batch
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[scaling]


@contextlib.contextmanager
def scaled_learning_rate(optimizer: Any, factor: float) -> Iterator[None]:
    """Every param group's learning rate times ``factor`` inside the block, restored after it (even when the
    step raises, e.g. out of memory, so that a retry does not scale twice)."""
    if factor == 1.0:
        yield
        return
    groups = getattr(optimizer, "param_groups", [])
    saved = [group["lr"] for group in groups]
    try:
        for group in groups:
            group["lr"] = group["lr"] * factor
        yield
    finally:
        for group, lr in zip(groups, saved):
            group["lr"] = lr


class BatchUpdates:
    """`MPOptTrainer`'s split of a loader batch into updates (a mixin over its step machinery)."""

    lr_scaling: str = "sqrt"

    def learning_rate_scale(self, config: MemoryConfig | None = None) -> float:
        """The factor on the scheduler's learning rate under ``config`` (default: the one in effect)."""
        config = config or self.memory_config
        return lr_scale(config, self.args.per_device_train_batch_size, self.lr_scaling)

    def _step_gradients(self, model: nn.Module) -> torch.Tensor:
        """The step's gradient; under a smaller batch per update, all updates but the last are made here."""
        self._switch_if_pending(model)
        batch = self.memory_config.batch_size
        whole = self._step_batches
        if batch is None or len(whole) != 1 or batch >= batch_size_of(whole[0]):
            return self._gradients(model)
        parts = split_batch(whole[0], batch)
        losses = []
        for index, part in enumerate(parts):
            self._step_batches = [part]
            self._step_random = RngState.capture(device_anchors(model.parameters()))  # its own dropout masks
            loss = self._gradients(model)
            if index < len(parts) - 1:
                self._inner_update(model, loss)
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def _inner_update(self, model: nn.Module, loss: torch.Tensor) -> None:
        """One update of the step that Trainer does not see: clip, step (guarded), clear the gradients."""
        if not torch.isfinite(loss):
            self._flag_nonfinite("loss")
        norm = self._clip_grad_norm(model) if self.args.max_grad_norm > 0 else None
        self._get_grad_norm(model, grad_norm=norm)
        self.optimizer.step()
        model.zero_grad(set_to_none=True)
        self._skip_reason = None


__all__ = ["BatchUpdates", "lr_scale", "scaled_learning_rate"]
