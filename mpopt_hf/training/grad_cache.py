"""Gradient caching: the whole batch's gradient of a batch-coupled loss with micro-batch memory.

Gao et al. 2021. Three passes over the micro-batches the trainer already made:

1. embed every micro-batch under ``torch.no_grad`` (no graph: only the embeddings stay);
2. the loss of the whole batch from the concatenated embeddings, as leaf tensors; its gradient
   with respect to them is the *cached gradient*;
3. re-run each micro-batch's forward with a graph and backpropagate its slice of the cached
   gradient, ``backward((embeddings * cached).sum())``.

By the chain rule the accumulated gradient is the whole batch's, at the cost of one extra
forward per micro-batch. Model-level parameters used by the loss (CLIP's ``logit_scale``) get
their gradient once, from the loss recomputed on the cached (gradient-free) embeddings and
backpropagated together with the last micro-batch: under DDP inside the synchronised backward,
and through the same ``backward`` hook that scales fp16 losses.

Dropout: pass 3 must draw the masks of pass 1, or the embeddings it differentiates are not the
ones the loss saw. The CPU and device RNG states are captured before each micro-batch's pass-1
forward and restored before its re-run; after the step the RNG is where pass 1 left it, as if
each micro-batch had been forwarded once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import nn
from torch.utils.checkpoint import get_device_states, set_device_states

from .coupled_loss import CoupledLossAdapter, Embeddings
from .microbatch import batch_size_of


def _plain_backward(tensor: torch.Tensor) -> None:
    tensor.backward()


# ---------------------------------------------------------------------------- RNG replay


@dataclass
class RngState:
    """The CPU generator and the generators of the accelerator devices a forward may draw from."""

    cpu: torch.Tensor
    device_type: str | None
    devices: list[int]
    states: list[torch.Tensor]

    @classmethod
    def capture(cls, anchors: Sequence[torch.Tensor]) -> "RngState":
        """``anchors``: one tensor on each non-CPU device in use (see `device_anchors`)."""
        device_type = anchors[0].device.type if anchors else None
        devices, states = get_device_states(*anchors) if anchors else ([], [])
        return cls(torch.get_rng_state(), device_type, list(devices), list(states))

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.devices:
            set_device_states(self.devices, self.states, device_type=self.device_type)


def device_anchors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """One tensor per accelerator device among ``tensors``, of a single device type (CUDA first)."""
    by_device: dict[torch.device, torch.Tensor] = {}
    for t in tensors:
        if t.device.type not in ("cpu", "meta") and t.device not in by_device:
            by_device[t.device] = t
    if not by_device:
        return []
    types = {d.type for d in by_device}
    kind = "cuda" if "cuda" in types else sorted(types)[0]
    return [t for d, t in by_device.items() if d.type == kind]


def _tensors(micro_batch: Mapping[str, Any]) -> list[torch.Tensor]:
    return [v for v in micro_batch.values() if torch.is_tensor(v)]


# ---------------------------------------------------------------------------- the step


def grad_cache_backward(
    model: nn.Module,
    micro_batches: Sequence[Mapping[str, Any]],
    adapter: CoupledLossAdapter,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    backward: Callable[[torch.Tensor], None] = _plain_backward,
    no_sync: Callable[[], ContextManager] | None = None,
) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradient of the whole batch's coupled loss; return that loss, detached.

    ``micro_batches``: the split of the effective batch (`mpopt_hf.training.microbatch.split_batch`), in
    order; any sizes. ``autocast``: the forward's precision context, entered for each forward and
    for the loss. ``backward``: called once per micro-batch with a scalar (e.g.
    ``accelerator.backward``, which scales fp16 losses). ``no_sync``: entered around every
    micro-batch's re-run and backward but the last (DDP's ``no_sync``); to keep them all
    unsynchronised, enter it around the whole call instead. The caller sets train mode, zeroes
    gradients between steps and steps the optimizer, as for any accumulation.
    """
    if not micro_batches:
        raise ValueError("grad_cache_backward needs at least one micro-batch.")
    anchors = device_anchors(list(model.parameters()) + [t for mb in micro_batches for t in _tensors(mb)])

    # 1. embeddings without a graph, remembering the RNG each forward started from
    starts: list[RngState] = []
    parts: list[Embeddings] = []
    for index, micro_batch in enumerate(micro_batches):
        starts.append(RngState.capture(anchors))
        with torch.no_grad(), autocast():
            embeddings = adapter.embed(model, micro_batch)
        parts.append(_checked(embeddings, micro_batch, index, adapter, parts[0] if parts else None))
    after_pass_one = RngState.capture(anchors)

    # 2. the loss of the whole batch and its gradient with respect to the embeddings
    leaves = {key: torch.cat([part[key] for part in parts]).requires_grad_() for key in parts[0]}
    sizes = [batch_size_of(mb) for mb in micro_batches]
    del parts
    with autocast():
        loss = adapter.loss(model, leaves, micro_batches)
    if loss.dim() != 0:
        raise ValueError(f"The {adapter.name!r} coupled loss must be a scalar, got shape {tuple(loss.shape)}.")
    # Only the embeddings here: the parameters the loss uses get their gradient once, in step 3.
    cached = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
    slices = {key: (g.split(sizes) if g is not None else [None] * len(sizes)) for key, g in cached.items()}
    values = {key: leaf.detach() for key, leaf in leaves.items()}
    del cached, leaves

    # 3. each micro-batch again, with a graph and the same dropout masks; backpropagate its cached slice
    try:
        for index, micro_batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            sync = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with sync:
                starts[index].restore()
                with autocast():
                    embeddings = adapter.embed(model, micro_batch)
                surrogate = _surrogate(embeddings, {key: s[index] for key, s in slices.items()})
                if last:  # the loss's own parameters (logit_scale), exactly once
                    surrogate = _plus(surrogate, _parameter_loss(model, adapter, values, micro_batches, autocast))
                if surrogate is not None and surrogate.requires_grad:
                    backward(surrogate)
                del embeddings, surrogate
    finally:
        after_pass_one.restore()
    return loss.detach()


def _parameter_loss(
    model: nn.Module, adapter: CoupledLossAdapter, values: Embeddings, micro_batches: Sequence[Mapping[str, Any]],
    autocast: Callable[[], ContextManager],
) -> torch.Tensor | None:
    """The loss again, on embeddings that need no gradient: its backward reaches only the parameters the
    loss itself uses. Recomputing (a batch x batch product) beats keeping step 2's graph through step 3,
    and its backward leaves no gradient on the embeddings."""
    with autocast():
        loss = adapter.loss(model, values, micro_batches)
    return loss if loss.requires_grad else None


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _surrogate(embeddings: Embeddings, grads: Mapping[str, torch.Tensor | None]) -> torch.Tensor | None:
    """``sum((e * g).sum())``: its gradient with respect to each embedding is exactly ``g``."""
    total = None
    for key, value in embeddings.items():
        grad = grads.get(key)
        if grad is None or not value.requires_grad:
            continue
        term = (value.float() * grad.float()).sum()
        total = term if total is None else total + term
    return total


def _checked(
    embeddings: Embeddings, micro_batch: Mapping[str, Any], index: int, adapter: CoupledLossAdapter,
    first: Embeddings | None,
) -> Embeddings:
    """Detached embeddings, after checking that each has the micro-batch as dim 0 and the keys agree."""
    if not isinstance(embeddings, Mapping) or not embeddings:
        raise ValueError(f"The {adapter.name!r} adapter's embed() must return a non-empty dict of tensors.")
    size = batch_size_of(micro_batch)
    for key, value in embeddings.items():
        if not torch.is_tensor(value) or value.dim() == 0 or value.shape[0] != size:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(
                f"The {adapter.name!r} adapter's embedding {key!r} of micro-batch {index} has shape {shape}; "
                f"every embedding needs the micro-batch ({size} samples) as dim 0."
            )
    if first is not None and set(embeddings) != set(first):
        raise ValueError(
            f"The {adapter.name!r} adapter returned keys {sorted(embeddings)} for micro-batch {index} but "
            f"{sorted(first)} for micro-batch 0."
        )
    return {key: value.detach() for key, value in embeddings.items()}
