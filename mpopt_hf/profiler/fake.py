"""Fake copies of a model, its optimizer and a batch (``FakeTensorMode``: no compute, no memory), and
the prediction of a step's peak on them, so that a model that does not fit the device can still be costed.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import MemoryConfig
from ..model.knobs import apply_memory_config, knob_state, remove_knobs
from ..model.lora import adapter_parameters, merge_lora
from ..training.adapter_optimizer import sync_adapters
from ..training.microbatch import batch_size_of
from ..training.optimizer_state import (
    is_switchable,
    low_bit_min_size,
    mark_switchable,
    set_state_bits,
)
from .measure import CATEGORIES, Measurement, _device_label, _tracked_step


@dataclass
class FakeSetup:
    """Fake copies of a model, its optimizer and a batch, sharing one ``FakeTensorMode``."""

    mode: FakeTensorMode
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: dict[str, Any]
    initial_state: dict[Any, dict[str, Any]] = field(default_factory=dict)  # the optimizer state copied in
    # indices (in ``model.parameters()`` order) of parameters that require a gradient but got none in a traced
    # backward with nothing frozen: the optimizer skips them, so they carry no gradient and no state
    never_grad: tuple[int, ...] | None = None

    def reset_optimizer(self) -> None:
        """Back to the copied-in optimizer state, so that predictions do not depend on their order."""
        self.optimizer.state.clear()
        for p, state in self.initial_state.items():
            self.optimizer.state[p] = dict(state)


def _fake_param(mode: FakeTensorMode, p: torch.Tensor) -> torch.Tensor:
    fake = mode.from_tensor(p)
    return nn.Parameter(fake, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else fake


def fake_setup(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any]) -> FakeSetup:
    """Fake copies that cost no memory: the module tree is copied, every tensor replaced by a fake one.

    The copy is taken with the knobs removed (then re-applied to ``model``), so that the fake model
    starts from the user's own ``requires_grad`` and no checkpoint wrapper points at the real blocks. LoRA
    adapters stay on the real model (their values are training state) and are merged on the copy, which is
    then the plain model.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    state = knob_state(model)
    previous = None if state is None else state.config
    adapters = {id(p) for p in adapter_parameters(model)}
    remove_knobs(model, keep_lora=True)
    try:
        memo: dict[int, Any] = {}
        for tensor in list(model.parameters()) + list(model.buffers()):
            memo[id(tensor)] = _fake_param(mode, tensor)
        fake_model = copy.deepcopy(model, memo)
    finally:
        if previous is not None:
            apply_memory_config(model, previous)
    merge_lora(fake_model)
    fake_optimizer = _fake_optimizer(optimizer, memo, mode, skip=adapters)
    fake_batch = {k: mode.from_tensor(v) if torch.is_tensor(v) else v for k, v in batch.items()}
    initial = {p: dict(state) for p, state in fake_optimizer.state.items()}
    return FakeSetup(mode, fake_model, fake_optimizer, fake_batch, initial)


def _fake_optimizer(optimizer: torch.optim.Optimizer, memo: dict[int, Any], mode: FakeTensorMode,
                    skip: set[int] = frozenset()) -> torch.optim.Optimizer:
    """A fake copy of ``optimizer`` over the fake parameters; the parameters in ``skip`` (adapters merged on the
    fake model) are left out."""
    groups = []
    for group in optimizer.param_groups:
        group = {**group, "params": [p for p in group["params"] if id(p) not in skip]}
        missing = [p for p in group["params"] if id(p) not in memo]
        if missing:
            raise ValueError(
                f"The optimizer holds {len(missing)} tensor(s) that are not parameters of the model; "
                "the profiler needs an optimizer over the model's own parameters."
            )
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [memo[id(p)] for p in group["params"]]})
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    try:
        fake = type(optimizer)(groups, **defaults)
    except TypeError as err:
        raise ValueError(
            f"Cannot rebuild {type(optimizer).__name__} from its defaults for a fake run ({err}); the profiler "
            "supports optimizers whose constructor takes (params, **optimizer.defaults), such as the torch.optim ones."
        ) from err
    if is_switchable(optimizer):  # its 8-bit code books are computed from data: fill them now, fake, outside the mode
        mark_switchable(fake).args.min_8bit_size = low_bit_min_size(optimizer)
        fake.fill_qmap()
        fake.name2qmap = {name: mode.from_tensor(code) for name, code in fake.name2qmap.items()}
    for p, state in optimizer.state.items():
        if id(p) in memo and id(p) not in skip:
            fake.state[memo[id(p)]] = {
                k: mode.from_tensor(v) if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()
            }
    return fake


def fake_new_parameters(setup: FakeSetup) -> None:
    """Parameters the knobs created on the fake model (LoRA adapters, made outside the mode) become fake too."""
    for module in setup.model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and not setup.mode.is_our_fake(p):
                module._parameters[name] = _fake_param(setup.mode, p)


def init_optimizer_state(setup: FakeSetup) -> None:
    """Give every trainable parameter the optimizer state one real warm-up step would have created."""
    params = [p for g in setup.optimizer.param_groups for p in g["params"] if p.requires_grad]
    fresh = [p for p in params if not setup.optimizer.state.get(p)]
    if not fresh:
        return
    with setup.mode:
        for p in fresh:
            p.grad = torch.zeros_like(p)
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)


def predict_step(
    model: nn.Module,
    batch: Mapping[str, Any],
    config: MemoryConfig,
    optimizer: torch.optim.Optimizer,
    setup: FakeSetup | None = None,
) -> Measurement:
    """Predict ``config``'s peak by running its step on fake tensors (no compute, no memory).

    Exact for the tensors the step creates; it cannot see allocator rounding or kernel workspaces
    (the memory model calibrates those from measurements). Pass ``setup`` to reuse fake copies.
    """
    setup = setup or fake_setup(model, optimizer, batch)
    apply_memory_config(setup.model, config)
    fake_new_parameters(setup)
    sync_adapters(setup.optimizer, setup.model)
    setup.model.train()
    setup.reset_optimizer()
    init_optimizer_state(setup)
    with setup.mode:
        set_state_bits(setup.optimizer, config.optimizer_state)
        tracked = _tracked_step(setup.model, setup.batch, config, setup.optimizer, None, max_micro_batches=2)
    device = next(model.parameters()).device
    return Measurement(
        config=config,
        device=_device_label(device),
        backend="fake",
        batch_size=batch_size_of(batch),
        peak_bytes=tracked["total"],
        tracked_peak_bytes=tracked["total"],
        **{name: tracked[name] for name in CATEGORIES},
    )


def fake_batch(setup: FakeSetup, batch: Mapping[str, Any], size: int) -> dict[str, Any]:
    """A fake batch of ``size`` samples shaped like ``batch``."""
    total = batch_size_of(batch)
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            if value.dim() > 0 and value.shape[0] == total:
                with setup.mode:
                    value = torch.zeros((size, *value.shape[1:]), dtype=value.dtype, device=value.device)
            else:
                value = setup.mode.from_tensor(value)
        out[key] = value
    return out
