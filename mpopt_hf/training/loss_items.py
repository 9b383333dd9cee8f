"""Count the items a loss averages over, so that micro-batches add up to the whole batch's loss exactly.

A micro-batch's mean loss, weighted by its share of the *items* of the effective batch, sums to the
effective batch's mean loss. The items are what the loss divides by: the labelled tokens of a token loss
(``labels != -100``, after the one-position shift of a causal LM), the samples of a per-sample loss. This
is how transformers counts ``num_items_in_batch``; a model whose loss is a mean over something else
passes its own counter (`LossItemCounter`) to `MPOptTrainer(loss_items=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .microbatch import batch_size_of

IGNORE_INDEX = -100

# inputs of one micro-batch -> how many items its loss averages over
LossItemCounter = Callable[[Mapping[str, Any]], int]


def count_loss_items(
    inputs: Mapping[str, Any],
    shifts_labels: bool = False,
    label_name: str = "labels",
    ignore_index: int = IGNORE_INDEX,
) -> int:
    """Labelled tokens for integer labels (``!= ignore_index``; ``shift_labels`` or ``labels[..., 1:]`` for a
    causal LM), else samples. Integer class labels of shape ``(batch,)`` count their non-ignored samples."""
    labels = inputs.get("shift_labels") if torch.is_tensor(inputs.get("shift_labels")) else None
    if labels is None:
        labels = inputs.get(label_name)
        if torch.is_tensor(labels) and shifts_labels and labels.dim() >= 2:
            labels = labels[..., 1:]
    if not torch.is_tensor(labels) or labels.dim() == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
        return batch_size_of(inputs)  # no labels (a model's own loss), or regression / multi-label targets
    return int(labels.ne(ignore_index).sum())
