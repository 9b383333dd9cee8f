"""Selective activation checkpointing: which ops a selectively checkpointed block keeps for backward.

Whole-block checkpointing keeps a block's input and runs its forward again in backward. The selective
policy keeps the outputs of the ops that cost the most to run again (matmuls, convolutions, attention) and
recomputes only the cheap ones around them (norms, activations, adds, casts). It saves less memory than
whole-block checkpointing and spends less time recomputing: the knob between "off" and "block". The
mechanism is PyTorch's own, `torch.utils.checkpoint.create_selective_checkpoint_contexts`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
)

# Ops as the dispatcher sees them (composites such as linear, matmul and conv2d arrive as these).
_COSTLY_OP_NAMES = (
    "mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
)


@functools.cache
def costly_ops() -> frozenset[Any]:
    """The overloads whose outputs the selective policy keeps (those this build of PyTorch has)."""
    ops = set()
    for name in _COSTLY_OP_NAMES:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            ops.update(getattr(packet, overload) for overload in packet.overloads())
    return frozenset(ops)


def _keep_costly(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in costly_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """The (forward, recompute) context pair of one selectively checkpointed call."""
    return create_selective_checkpoint_contexts(_keep_costly)


@contextlib.contextmanager
def entered(*managers: contextlib.AbstractContextManager) -> Iterator[None]:
    """Enter several context managers as one (the recompute context of a block that also restores state)."""
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield
