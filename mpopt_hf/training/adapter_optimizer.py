"""LoRA adapters in and out of the optimizer (`MemoryConfig.lora_rank`).

Adapters are new parameters each time they are injected, so the one optimizer of the run must learn of them: the
new ones join the parameter group with weight decay (they are weight matrices; an existing group, so the learning
rate scheduler and accelerate's wrapper go on unchanged), and those merged away leave, with their moments. Every
other parameter and its state is untouched. Parameters are marked when they join, and only marked ones ever leave.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model.lora import adapter_parameters

_MARK = "_mpopt_adapter"


def sync_adapters(optimizer: Any, model: nn.Module) -> tuple[int, int]:
    """Add the model's adapters the optimizer lacks and drop the adapters the model no longer has; returns
    (added, dropped).

    The live adapters always end up last in the weight-decay group, in the model's order (also those an optimizer
    built over a model that had them already holds elsewhere): the optimizer's state dict, which numbers
    parameters by position, is then the same for the same placement however the adapters came in, so a copy of
    it loads back onto re-made adapters (race copies, the profiler's isolation)."""
    inner: torch.optim.Optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    adapters = adapter_parameters(model)
    for p in adapters:
        setattr(p, _MARK, True)
    live = {id(p) for p in model.parameters()}
    held, dropped = set(), 0
    for group in inner.param_groups:
        for p in group["params"]:
            if getattr(p, _MARK, False):
                held.add(id(p))
                if id(p) not in live:
                    inner.state.pop(p, None)
                    dropped += 1
        group["params"] = [p for p in group["params"] if not getattr(p, _MARK, False)]
    max(inner.param_groups, key=lambda g: g.get("weight_decay", 0.0))["params"].extend(adapters)
    return sum(id(p) not in held for p in adapters), dropped


def without_adapters(optimizer: Any) -> _AdaptersSetAside:
    """A context in which the optimizer holds no adapter (and none of their moments), restored exactly after:
    a checkpoint's optimizer state then matches the plain model's parameters."""
    return _AdaptersSetAside(getattr(optimizer, "optimizer", optimizer))


class _AdaptersSetAside:
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.saved: list[tuple[list[Any], dict[Any, Any]]] = []

    def __enter__(self) -> torch.optim.Optimizer:
        for group in self.optimizer.param_groups:
            params = group["params"]
            moments = {p: self.optimizer.state.pop(p) for p in params if getattr(p, _MARK, False)
                       and p in self.optimizer.state}
            self.saved.append((params, moments))
            group["params"] = [p for p in params if not getattr(p, _MARK, False)]
        return self.optimizer

    def __exit__(self, *exc: object) -> None:
        for group, (params, moments) in zip(self.optimizer.param_groups, self.saved):
            group["params"] = params
            self.optimizer.state.update(moments)
        self.saved = []


def holds_adapters(optimizer: Any) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)
    return any(getattr(p, _MARK, False) for group in inner.param_groups for p in group["params"])
