"""Refuse to micro-batch a loss that couples the batch unless it declares how to split it.

Once per model, at setup, when micro-batching is active: the gradient of a few samples split in
two micro-batches (each loss weighted by its share, as the trainer weights it) is compared with
their gradient in one batch. A per-sample mean agrees to float rounding; an in-batch softmax or a
batch-normalised objective does not, and is refused with the way out in the message.

Determinism: the check runs with every module in eval mode (restored module by module after), so
dropout and stochastic depth draw nothing and BatchNorm uses its running statistics. That is
deliberate for BatchNorm too: its batch coupling is the known trade of ``micro_batch_size`` that
the engine's BatchNorm rule prices, not a reason to refuse micro-batching, and eval mode leaves
its running statistics untouched. The RNG is forked, so the training stream is not advanced.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..model.blocks import unwrap_model
from .coupled_loss import CoupledLossAdapter, find_coupled_loss
from .grad_cache import device_anchors, grad_cache_backward
from .microbatch import batch_size_of, micro_batch_shares, split_batch

# (model, micro-batch, its share of the batch) -> the weighted loss, as the trainer computes it
LossFn = Callable[[nn.Module, Mapping[str, Any], float], torch.Tensor]


class CoupledLossError(ValueError):
    """The model's loss couples the batch and no `CoupledLossAdapter` declares how to split it."""


@dataclass(frozen=True)
class CouplingCheck:
    """What the check compared: relative gradient differences (norm of difference / norm of the whole's)."""

    n_samples: int
    micro_batch_size: int
    micro_difference: float  # naive micro-batching vs the whole batch
    adapter: str | None = None
    adapter_difference: float | None = None  # gradient caching with the adapter vs the whole batch


def mean_loss(model: nn.Module, micro_batch: Mapping[str, Any], share: float) -> torch.Tensor:
    """The model's own loss weighted by the micro-batch's share of samples (the trainer's default)."""
    out = model(**micro_batch)
    loss = out["loss"] if isinstance(out, Mapping) else out[0]
    if loss is None:
        raise ValueError(f"{type(unwrap_model(model)).__name__} returned no loss for the check's batch; pass its labels.")
    return loss * share


def check_batch_coupling(
    model: nn.Module,
    batch: Mapping[str, Any],
    n_samples: int = 4,
    loss_fn: LossFn = mean_loss,
    rtol: float = 1e-3,
    adapter: CoupledLossAdapter | None = None,
    count_items: Callable[[Mapping[str, Any]], int] | None = None,
) -> CouplingCheck:
    """Compare the first ``n_samples`` samples' gradient split in two micro-batches with the whole's.

    Its peak is ``n_samples`` samples' forward and backward plus one set of gradients: the trainer takes
    ``n_samples`` no larger than its micro-batch, so the check costs no more than a step of that configuration.
    Raises `CoupledLossError` (a ValueError) when they differ by more than ``rtol`` and no
    ``adapter`` is given. With an ``adapter``, its gradient-cached gradient must match the
    whole's instead (a wrong adapter is refused too). ``loss_fn`` must weight micro-batches as the
    trainer does; a loss normalised by the whole batch's item count (``num_items_in_batch``)
    needs the trainer's own. ``count_items`` gives the items each half's loss averages over (labelled
    tokens, say; `mpopt_hf.training.loss_items`), so that the shares are the trainer's; None: samples. The
    model's gradients, modes and RNG are as before on return.
    """
    total = batch_size_of(batch)
    n = min(n_samples, total)
    if n < 2:
        return CouplingCheck(n, n, 0.0)
    sample = split_batch(batch, n)[0]
    halves = split_batch(sample, -(-n // 2))
    params = [p for p in model.parameters() if p.requires_grad]
    if count_items is None:
        shares = micro_batch_shares(halves)
    else:
        counts = [count_items(half) for half in halves]
        shares = [c / max(sum(counts), 1) for c in counts]
    # No copy of a gradient is kept: the whole's gradient is accumulated, then the halves' is subtracted from it in
    # .grad itself, so the check holds one gradient's bytes, as the training step does.
    with _isolated(model, params):
        loss_fn(model, sample, 1.0).backward()
        scale = _grad_norm(params)
        for half, share in zip(halves, shares):
            if share != 0:
                loss_fn(model, half, -share).backward()
        micro = _relative(_grad_norm(params), scale)
        cached = None
        if adapter is not None:
            _clear(params)
            loss_fn(model, sample, 1.0).backward()
            grad_cache_backward(model, halves, adapter, backward=lambda loss: (-loss).backward())
            cached = _relative(_grad_norm(params), scale)
    result = CouplingCheck(n, batch_size_of(halves[0]), micro, adapter.name if adapter else None, cached)
    name = type(unwrap_model(model)).__name__
    if adapter is not None and cached is not None and cached > rtol:
        raise CoupledLossError(
            f"The {adapter.name!r} coupled-loss adapter does not reproduce {name}'s own loss: on {n} samples its "
            f"gradient-cached gradient differs from the whole batch's by {cached:.2%} (allowed {rtol:.0e}). Check "
            "that its embed() returns the embeddings the model's loss uses and its loss() computes that loss."
        )
    if adapter is None and micro > rtol:
        raise CoupledLossError(
            f"The loss of {name} couples the batch: on {n} samples, the gradient accumulated over micro-batches of "
            f"{batch_size_of(halves[0])} (each loss weighted by its share) differs from the whole batch's by "
            f"{micro:.2%} (allowed {rtol:.0e}). A loss that compares samples with each other (an in-batch softmax, "
            "a contrastive loss) is a different objective on a smaller batch, so micro-batching would silently "
            "change what is trained. Declare how the loss splits, and micro-batches will use gradient caching "
            "(exact): mpopt_hf.training.coupled_loss.register_coupled_loss(name, CoupledLossAdapter(name, matches, embed, "
            "loss)) with embed(model, micro_batch) -> per-sample embeddings and loss(model, embeddings, "
            "micro_batches) -> the whole batch's loss; or keep micro_batch_size equal to the effective batch. If the "
            "loss is a plain mean, the micro-batches' weights are wrong instead: pass MPOptTrainer(loss_items=fn) "
            "counting what the loss averages over."
        )
    return result


def resolve_coupled_loss(
    model: nn.Module, batch: Mapping[str, Any], check: bool = True, **check_kwargs: Any
) -> CoupledLossAdapter | None:
    """The trainer's setup call: the model's adapter (validated on a few samples), or None after the
    check has shown that plain micro-batching is exact; raises `CoupledLossError` otherwise."""
    adapter = find_coupled_loss(model, batch)
    if check:
        check_batch_coupling(model, batch, adapter=adapter, **check_kwargs)
    return adapter


# ---------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _isolated(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Eval mode, forked RNG, gradients stashed; all restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    stash = [(p, p.grad) for p in params]
    for p in params:
        p.grad = None
    anchors = device_anchors(list(model.parameters()))
    devices = [t.device.index or 0 for t in anchors]
    kind = anchors[0].device.type if anchors else "cuda"
    try:
        model.eval()
        with torch.random.fork_rng(devices=devices, device_type=kind):
            yield
    finally:
        for module, training in modes:
            module.training = training
        for p, grad in stash:
            p.grad = grad


def _grad_norm(params: list[nn.Parameter]) -> float:
    return math.sqrt(sum(float(p.grad.detach().float().pow(2).sum()) for p in params if p.grad is not None))


def _clear(params: list[nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def _relative(difference: float, scale: float) -> float:
    return difference / scale if scale > 0 else (0.0 if difference == 0 else math.inf)
