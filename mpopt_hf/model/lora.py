"""The LoRA knob (`MemoryConfig.lora_rank`): peft's adapters on the Linear layers of the trainable blocks.

A LoRA layer trains ``B @ A`` (rank r) beside its frozen weight, so the weight needs no gradient and no optimizer
moments: ``r x (in + out)`` trained elements instead of ``in x out``. The adapters are peft's own
(`peft.inject_adapter_in_model`); this module only decides where they go and takes them out again.

A switch (another rank, or another set of trainable blocks) first *merges* every adapter into its weight
(``W += scale x B @ A``, peft's ``merge``) and puts the plain layer back, then injects fresh adapters (``B = 0``, so
the model's function is unchanged at the switch). What the adapters learned is kept in the weights; their
optimizer moments are not (new adapters are new parameters).

Initialising ``A`` draws random numbers: they come from a generator seeded by the caller, never from the global
generator, so that a switch does not change the dropout masks or the data order of the rest of the run.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import ModelBlocks

ALPHA_PER_RANK = 2.0  # lora_alpha = 2 x rank: the scale alpha / r is 2 at every rank (the usual choice)
ADAPTER_NAME = "default"
_MARK = "_mpopt_lora"  # on the LoRA layers this module made: a user's own peft adapters are never merged here


@dataclass(frozen=True)
class LoraPlacement:
    """Which layers carry adapters, at which rank (``rank == 0``: none)."""

    rank: int = 0
    targets: tuple[str, ...] = ()


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import (
        Conv1D,  # GPT-2's transposed Linear, which peft adapts too
    )

    return (nn.Linear, Conv1D)


def lora_targets(model: nn.Module, blocks: ModelBlocks, first_trainable: int,
                 trainable: Callable[[nn.Parameter], bool] = lambda p: True) -> tuple[str, ...]:
    """Qualified names of the Linear layers (``nn.Linear``, transformers' ``Conv1D``) inside blocks
    ``first_trainable..``, in module order, whose weight is ``trainable`` (a layer the user froze stays frozen, with
    no adapter). The output projection of ``nn.MultiheadAttention`` is left out: that module reads its weight
    directly, so an adapter there would never be used."""
    wanted = {id(m) for block in blocks.blocks[first_trainable:] for m in block.modules()}
    inside_mha = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    kinds = _linear_types()
    return tuple(name for name, module in _plain_modules(model)
                 if id(module) in wanted and isinstance(module, kinds) and id(module) not in inside_mha
                 and trainable(module.weight))


def current_placement(model: nn.Module) -> LoraPlacement:
    """The adapters the model carries now, read from the model itself (so a copy, or a state rebuilt after
    `remove_knobs(keep_lora=True)`, sees them)."""
    layers = _own_layers(model)
    if not layers:
        return LoraPlacement()
    return LoraPlacement(rank=int(layers[0][1].r[ADAPTER_NAME]), targets=tuple(name for name, _ in layers))


def place_lora(model: nn.Module, wanted: LoraPlacement, seed: int = 0) -> bool:
    """Make the model carry ``wanted``'s adapters; returns True when anything changed.

    Every parameter keeps its ``requires_grad`` (peft would freeze the whole model): the knobs decide it."""
    if wanted == current_placement(model):
        return False
    if wanted.rank and _users_adapters(model):
        raise ValueError(
            f"MemoryConfig.lora_rank={wanted.rank}: {type(model).__name__} already carries peft adapters of its own; "
            "the knobs leave them as they are. Use lora_rank=0 with this model."
        )
    if wanted.rank and not wanted.targets:
        raise ValueError(
            f"MemoryConfig.lora_rank={wanted.rank}: the trainable blocks of {type(model).__name__} hold no Linear "
            "layer (nn.Linear or transformers' Conv1D) to put an adapter on; use lora_rank=0 (or a lower "
            "freeze_rate) for this model."
        )
    merge_lora(model)
    if wanted.rank:
        _inject(model, wanted, seed)
    return True


def merge_lora(model: nn.Module) -> int:
    """Merge every adapter this module made into its layer's weight and put the plain layer back; returns how
    many."""
    layers = _own_layers(model)
    for name, layer in layers:
        with torch.no_grad():
            layer.merge(adapter_names=[ADAPTER_NAME])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    return len(layers)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' own parameters (``lora_A`` and ``lora_B`` of every LoRA layer this module made)."""
    out: list[nn.Parameter] = []
    for _, module in _own_layers(model):
        for part in (module.lora_A, module.lora_B):
            out.extend(part[ADAPTER_NAME].parameters())
    return out


def adapted_base_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of the layers that carry an adapter: what LoRA freezes."""
    return [p for _, m in _own_layers(model) for p in m.get_base_layer().parameters()]


def plain_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict the model would have without adapters, each adapter merged out of place: what a checkpoint
    holds, so that it loads into the plain model (and a run resumes from it whatever its rank)."""
    state = dict(model.state_dict() if state_dict is None else state_dict)
    for name, layer in _own_layers(model):
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith(prefix + "lora_")]:
            del state[key]
        for part in ("weight", "bias"):
            value = state.pop(f"{prefix}base_layer.{part}", None)
            if value is not None:
                if part == "weight":
                    with torch.no_grad():
                        value = value + layer.get_delta_weight(ADAPTER_NAME).to(value.dtype)
                state[prefix + part] = value
    return state


def _own_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if getattr(m, _MARK, False)]


def _users_adapters(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and not getattr(m, _MARK, False) for m in model.modules())


def _plain_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules, without descending into a LoRA layer's adapters (its base layer is listed by its own name)."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            continue
        parent = name.rpartition(".")[0]
        if parent.endswith((".base_layer", ".lora_A", ".lora_B")):
            continue
        yield name.replace(".base_layer", ""), module


def _inject(model: nn.Module, placement: LoraPlacement, seed: int) -> None:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    flags = {id(p): p.requires_grad for p in model.parameters()}
    had_config = hasattr(model, "peft_config")
    transposed = not isinstance(model.get_submodule(placement.targets[0]), nn.Linear)  # Conv1D stores W^T
    config = LoraConfig(r=placement.rank, lora_alpha=ALPHA_PER_RANK * placement.rank, lora_dropout=0.0,
                        target_modules=list(placement.targets), bias="none", fan_in_fan_out=transposed)
    with _seeded(seed), warnings.catch_warnings():
        # peft sets fan_in_fan_out per layer type itself, and says so when a model mixes the two
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    if not had_config:  # peft's record of its config: the knobs keep their own, and the next injection warns
        model.__dict__.pop("peft_config", None)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and name in placement.targets:
            setattr(module, _MARK, True)
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), True))  # peft froze everything but the adapters; the knobs decide


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


__all__ = ["ALPHA_PER_RANK", "LoraPlacement", "adapted_base_parameters", "adapter_parameters", "current_placement",
           "lora_targets",
           "merge_lora", "place_lora", "plain_state_dict"]
