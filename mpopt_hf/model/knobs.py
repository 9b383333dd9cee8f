"""Apply, switch and remove a `MemoryConfig` on a model.

The knobs change *how* a step runs, never the optimizer: frozen parameters keep
their place in the optimizer and simply get no gradient, so a switch at a step
boundary needs no rebuild and loses no optimizer state.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import MemoryConfig
from .blocks import ModelBlocks, find_blocks, unwrap_model
from .lora import LoraPlacement, adapted_base_parameters, adapter_parameters, lora_targets, place_lora
from .plan import KnobPlan, plan_knobs
from .selective_checkpoint import entered, selective_contexts

_STATE_ATTR = "_mpopt_knob_state"


def check_precision(precision: str, device_type: str) -> None:
    """fp16 autocast needs a loss scaler and a CUDA device; refuse it elsewhere with the fix in the message."""
    if precision == "fp16" and device_type != "cuda":
        raise ValueError(
            f"MemoryConfig.precision='fp16' needs a CUDA device (this run is on {device_type!r}); "
            "use precision='bf16' or 'fp32' here."
        )


def autocast_context(config: MemoryConfig | str, device_type: str) -> contextlib.AbstractContextManager:
    """The autocast context for the forward pass of a configuration (a no-op for fp32)."""
    precision = config if isinstance(config, str) else config.precision
    check_precision(precision, device_type)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


@dataclass
class KnobState:
    """What the knobs changed on a model, so that the next switch (or removal) can undo it exactly."""

    blocks: ModelBlocks
    baseline_requires_grad: dict[int, bool]
    config: MemoryConfig | None = None
    plan: KnobPlan | None = None
    bn_hooks: list[Any] = field(default_factory=list)
    wrapped_blocks: list[nn.Module] = field(default_factory=list)
    hf_checkpointing: bool = False


def knob_state(model: nn.Module) -> KnobState | None:
    return getattr(unwrap_model(model), _STATE_ATTR, None)


def apply_memory_config(
    model: nn.Module, config: MemoryConfig, blocks: ModelBlocks | None = None, device_type: str | None = None,
    lora_seed: int = 0,
) -> KnobState:
    """Put ``config``'s adapters, freezing, checkpointing and precision checks into effect; call at a step
    boundary. New LoRA adapters are initialised from ``lora_seed`` (not from the global generator)."""
    base = unwrap_model(model)
    if device_type is None:
        device_type = next((p.device.type for p in base.parameters()), "cpu")
    check_precision(config.precision, device_type)
    state = knob_state(base)
    if state is None:
        blocks = blocks or find_blocks(base)
        baseline = {id(p): p.requires_grad for p in base.parameters()}
        state = KnobState(blocks=blocks, baseline_requires_grad=baseline)
        setattr(base, _STATE_ATTR, state)
    plan = plan_knobs(config, state.blocks.n_blocks)  # validates before anything changes
    _apply_lora(base, state, plan, config.lora_rank, lora_seed)
    _apply_freezing(base, state, plan)
    _apply_checkpointing(base, state, plan)
    state.config, state.plan = config, plan
    return state


def remove_knobs(model: nn.Module, keep_lora: bool = False) -> None:
    """Undo every knob: adapters merged into their weights, baseline ``requires_grad``, no checkpointing,
    BatchNorm back to the model's mode. ``keep_lora`` leaves the adapters in place (trainable, like the weights
    under them): a copy can then be taken and the knobs re-applied without touching what the adapters hold."""
    base = unwrap_model(model)
    state = knob_state(base)
    if state is None:
        return
    empty = KnobPlan(n_blocks=state.blocks.n_blocks, n_frozen=0, checkpointed=())
    if not keep_lora:
        _apply_lora(base, state, empty, 0, 0)
    _apply_freezing(base, state, empty, lora_frozen=False)
    _apply_checkpointing(base, state, empty)
    delattr(base, _STATE_ATTR)


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in unwrap_model(model).parameters() if p.requires_grad)


# ---------------------------------------------------------------------------- LoRA


def _apply_lora(model: nn.Module, state: KnobState, plan: KnobPlan, rank: int, seed: int) -> None:
    baseline = state.baseline_requires_grad
    targets = lora_targets(model, state.blocks, plan.n_frozen, lambda p: baseline.get(id(p), p.requires_grad)) \
        if rank else ()
    _place(model, state, LoraPlacement(rank, targets), seed)


def _place(model: nn.Module, state: KnobState | None, placement: LoraPlacement, seed: int) -> bool:
    before = {id(p) for p in adapter_parameters(model)}
    if not place_lora(model, placement, seed):
        return False
    if state is not None:
        for key in before:  # the merged adapters are gone: a later parameter may reuse their id
            state.baseline_requires_grad.pop(key, None)
        for p in adapter_parameters(model):
            state.baseline_requires_grad[id(p)] = True
    return True


def place_adapters(model: nn.Module, placement: LoraPlacement, seed: int = 0) -> bool:
    """Give the model ``placement``'s adapters outside a configuration switch (a race copy restored, training
    ended); the weights under new adapters train again until the next `apply_memory_config` freezes them."""
    base = unwrap_model(model)
    state = knob_state(base)
    if not _place(base, state, placement, seed):
        return False
    if state is not None and state.plan is not None:
        _apply_freezing(base, state, state.plan)  # adapters in or out: the base weights follow
    if state is not None and state.config is not None:  # what the model now carries, for whoever re-applies it
        state.config = state.config.replace(lora_rank=placement.rank)
    return True


# ---------------------------------------------------------------------------- freezing


def _frozen_modules(blocks: ModelBlocks, plan: KnobPlan) -> list[nn.Module]:
    return (list(blocks.stem) if plan.stem_frozen else []) + [
        module for index in range(plan.n_frozen) for module in blocks.block_modules(index)
    ]


def _apply_freezing(model: nn.Module, state: KnobState, plan: KnobPlan, lora_frozen: bool = True) -> None:
    frozen: set[int] = {id(p) for p in adapted_base_parameters(model)} if lora_frozen else set()
    if plan.stem_frozen:
        frozen.update(id(p) for p in state.blocks.stem_params())
    for index in range(plan.n_frozen):
        frozen.update(id(p) for p in state.blocks.block_params(index))
    for p in model.parameters():
        if id(p) not in state.baseline_requires_grad:  # a parameter added after the first apply (e.g. a new head)
            state.baseline_requires_grad[id(p)] = p.requires_grad
        trainable = state.baseline_requires_grad[id(p)] and id(p) not in frozen
        if not trainable and p.grad is not None:
            p.grad = None  # a stale gradient must not reach the optimizer
        p.requires_grad_(trainable)

    for handle in state.bn_hooks:
        handle.remove()
    state.bn_hooks.clear()
    for module in model.modules():  # BatchNorm leaving a frozen block follows the model's mode again
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(model.training)
    for module in _frozen_modules(state.blocks, plan):
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.eval()
                # Trainer calls model.train() every step; the hook keeps frozen statistics frozen.
                state.bn_hooks.append(bn.register_forward_pre_hook(_keep_eval))


def _keep_eval(module: nn.Module, args: Any) -> None:
    if module.training:
        module.train(False)


# ---------------------------------------------------------------------------- checkpointing


def _hf_checkpointable(model: nn.Module, blocks: ModelBlocks) -> bool:
    """True when the library's own activation checkpointing can express a per-block choice."""
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    return (
        isinstance(model, PreTrainedModel)
        and getattr(model, "supports_gradient_checkpointing", False)
        and all(isinstance(b, GradientCheckpointingLayer) for b in blocks.blocks)
    )


def _apply_checkpointing(model: nn.Module, state: KnobState, plan: KnobPlan) -> None:
    for block in state.wrapped_blocks:  # undo our own wrappers first
        block.__dict__.pop("forward", None)
    state.wrapped_blocks.clear()
    chosen = [state.blocks.blocks[i] for i in plan.checkpointed]

    if _hf_checkpointable(model, state.blocks):
        if not chosen:
            if state.hf_checkpointing:
                model.activation_checkpointing_disable()
                state.hf_checkpointing = False
            return
        _enable_hf_checkpointing(model, state.blocks, chosen, plan.selective)
        state.hf_checkpointing = True
        return

    for block in chosen:
        _wrap_block(block, plan.selective)
        state.wrapped_blocks.append(block)


def _enable_hf_checkpointing(model: nn.Module, blocks: ModelBlocks, chosen: list[nn.Module], selective: bool) -> None:
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    wanted = {id(b) for b in chosen}
    every_n = len(layers) // len(chosen)
    expressible = every_n >= 1 and {id(layer) for layer in layers[::every_n]} == wanted
    model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every_n if expressible else 1
    )
    if not expressible:  # e.g. a frozen prefix: the library's flags are per layer, set them to our choice
        for layer in layers:
            layer.gradient_checkpointing = id(layer) in wanted
    # Non-reentrant checkpointing needs no input that requires grad; the hook the library adds for it would
    # make every frozen block record a graph and keep its activations.
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()
    for layer in chosen:  # enabling again above reset every layer's function to the library's plain one
        if selective or _has_batchnorm(layer):
            layer._gradient_checkpointing_func = functools.partial(
                checkpoint, use_reentrant=False, context_fn=functools.partial(_recompute_context, layer, selective)
            )


def _wrap_block(block: nn.Module, selective: bool) -> None:
    """Checkpoint ``block`` with non-reentrant ``torch.utils.checkpoint`` (for blocks the library cannot reach)."""
    original = type(block).forward.__get__(block)

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if block.training and torch.is_grad_enabled():
            return checkpoint(
                original, *args, use_reentrant=False,
                context_fn=functools.partial(_recompute_context, block, selective), **kwargs
            )
        return original(*args, **kwargs)

    block.forward = forward


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _recompute_context(
    block: nn.Module, selective: bool = False
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Recomputation must not update BatchNorm running statistics a second time; a selective block also
    keeps its costly ops' outputs (`selective_checkpoint`)."""
    if not selective:
        return contextlib.nullcontext(), _bn_stats_restored(block)
    forward, recompute = selective_contexts()
    return forward, entered(_bn_stats_restored(block), recompute)  # the statistics copies run outside its cache


@contextlib.contextmanager
def _bn_stats_restored(block: nn.Module) -> Iterator[None]:
    saved = [
        (bn, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
        for bn in block.modules()
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats and bn.running_mean is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, mean, var, count in saved:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
