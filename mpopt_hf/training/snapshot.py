"""Host copies of the training state, so that the engine's race trials all start from the same weights.

A race trains each candidate configuration for the same seconds from one starting point and keeps the
winner's end state. The copies hold the model's state dict (parameters and buffers, e.g. BatchNorm
statistics), the optimizer's state (AdamW moments, step counts) and the scheduler's, all on the CPU:
the device whose memory is scarce never holds a second copy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..model.knobs import place_adapters
from ..model.lora import LoraPlacement, current_placement
from .adapter_optimizer import sync_adapters


def to_host(value: Any) -> Any:
    """``value`` (a state dict, nested as it may be) with every tensor copied to the CPU, detached: the one host
    copy the race's snapshots and the profiler's isolation both take. Any mapping, list or tuple is walked (a dict
    subclass too, so no tensor of the training state is kept by reference)."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        items = [(k, to_host(v)) for k, v in value.items()]
        return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(to_host(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    return value


def capture(model: nn.Module, optimizer: Any = None, scheduler: Any = None) -> dict[str, Any]:
    """A CPU copy of the model's, optimizer's and scheduler's state (what `restore` puts back), with the LoRA
    adapters' placement, which the state dict's keys depend on."""
    placement = current_placement(model)
    return {
        "lora": {"rank": placement.rank, "targets": list(placement.targets)},
        "model": to_host(model.state_dict()),
        "optimizer": None if optimizer is None else to_host(optimizer.state_dict()),
        "scheduler": None if scheduler is None else to_host(scheduler.state_dict()),
    }


def restore(copy: dict[str, Any], model: nn.Module, optimizer: Any = None, scheduler: Any = None) -> None:
    """Load a `capture` back in place: parameters keep their identity (the optimizer still holds them). A copy
    taken under another LoRA placement (a race between ranks) first gets its adapters back, re-made, so that its
    keys and the optimizer's parameters match; their values then come from the copy."""
    lora = copy.get("lora") or {}
    if place_adapters(model, LoraPlacement(int(lora.get("rank", 0)), tuple(lora.get("targets", ())))) \
            and optimizer is not None:
        sync_adapters(optimizer, model)
    with torch.no_grad():
        model.load_state_dict(copy["model"])
    if optimizer is not None and copy["optimizer"] is not None:
        optimizer.load_state_dict(copy["optimizer"])  # moves the state to each parameter's device and dtype
    if scheduler is not None and copy["scheduler"] is not None:
        scheduler.load_state_dict(copy["scheduler"])


__all__ = ["capture", "restore"]
