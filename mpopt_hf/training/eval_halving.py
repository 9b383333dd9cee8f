"""Evaluation under the knobs: a batch that runs out of memory is split in halves (recursively), and the halves'
losses are averaged by their items, so the result is the whole batch's. The training configuration is not touched.
A mixin of `MPOptTrainer` (it relies on its ``knobs_active`` and ``_count_items``)."""

from __future__ import annotations

from typing import Any

import torch

from .microbatch import batch_size_of, split_batch
from .oom import free_memory, is_out_of_memory


class HalvingEvaluation:
    """`MPOptTrainer.prediction_step` with out-of-memory halving."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # type: ignore[override]
        """Evaluate; with knobs active, on out-of-memory split the batch in halves (recursively)."""
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        except Exception as exc:  # noqa: BLE001
            if not self.knobs_active or not is_out_of_memory(exc):
                raise
            size = batch_size_of(inputs)
            if size <= 1:
                raise
        free_memory()
        halves = split_batch(inputs, -(-size // 2))
        results = [self.prediction_step(model, half, prediction_loss_only, ignore_keys) for half in halves]
        sizes = [self._count_items(half) for half in halves]  # each half's loss is a mean over its items
        losses = [r[0] for r in results]
        loss = None if any(x is None for x in losses) else sum(x * n for x, n in zip(losses, sizes)) / max(sum(sizes), 1)
        return loss, _concat([r[1] for r in results]), _concat([r[2] for r in results])


def _concat(parts: list[Any]) -> Any:
    """Concatenate per-half predictions (tensors, or tuples/lists of them) along the batch dimension."""
    if parts[0] is None:
        return None
    if torch.is_tensor(parts[0]):
        return torch.cat(parts, dim=0)
    return type(parts[0])(_concat(list(items)) for items in zip(*parts))
