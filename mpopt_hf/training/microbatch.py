"""Split an effective batch into micro-batches that cover it exactly.

Plain functions on dicts of tensors, so the trainer, the profiler and the tests
share one definition of what a micro-batch is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def batch_size_of(inputs: Mapping[str, Any]) -> int:
    """The leading dimension shared by the batch's tensors (``labels`` first, then any tensor)."""
    candidates = [inputs["labels"]] if torch.is_tensor(inputs.get("labels")) else []
    candidates += [v for v in inputs.values() if torch.is_tensor(v) and v.dim() > 0]
    if not candidates:
        raise ValueError(
            f"Cannot find the batch size: the inputs hold no tensor with a batch dimension (keys: {sorted(inputs)})."
        )
    return int(candidates[0].shape[0])


def split_batch(inputs: Mapping[str, Any], micro_batch_size: int) -> list[dict[str, Any]]:
    """Cut ``inputs`` along dim 0 into chunks of ``micro_batch_size`` (the last may be smaller).

    Tensors whose leading dimension is not the batch size (scalars, shared masks) and non-tensor
    values are passed to every micro-batch unchanged.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
    total = batch_size_of(inputs)
    micro_batches = []
    for start in range(0, total, micro_batch_size):
        stop = min(start + micro_batch_size, total)
        micro_batches.append(
            {
                key: value[start:stop] if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == total else value
                for key, value in inputs.items()
            }
        )
    covered = sum(batch_size_of(mb) for mb in micro_batches)
    if covered != total:  # an invariant of this function, not user input
        raise RuntimeError(f"micro-batches cover {covered} samples, the effective batch has {total}")
    return micro_batches


def micro_batch_shares(micro_batches: list[Mapping[str, Any]]) -> list[float]:
    """Each micro-batch's share of the effective batch, by samples; they sum to 1.

    Weighting a per-micro-batch *mean* loss by its share makes the accumulated gradient equal to
    the gradient of the whole batch's mean loss.
    """
    sizes = [batch_size_of(mb) for mb in micro_batches]
    total = sum(sizes)
    return [size / total for size in sizes]
