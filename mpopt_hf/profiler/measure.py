"""Measure what one training step under a `MemoryConfig` costs: peak memory by category and time.

The step is the trainer's step: apply the knobs, split the effective batch into micro-batches,
forward under autocast, ``loss * share`` backward each, ``optimizer.step()``,
``zero_grad(set_to_none=True)``. Backends:

* CUDA: the caching allocator's own counters (``max_memory_allocated``/``max_memory_reserved``)
  give the total; one extra step under ``MemTracker`` splits it by category.
* CPU: ``torch.distributed._tools.mem_tracker.MemTracker`` (live tensor bytes by category) and,
  for the total, the profiler's allocation events (``profile_memory=True``), which also see the
  workspaces kernels allocate internally.

`measure` runs inside a live training run, so it restores the weights, buffers, gradients,
optimizer state, RNG state, train/eval mode and knob configuration it found.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..config import MIB, MemoryConfig
from ..model.knobs import apply_memory_config, autocast_context
from ..training.mem_tracking import CATEGORIES, new_tracker, tracker_peak
from ..training.microbatch import batch_size_of, micro_batch_shares, split_batch
from ..training.adapter_optimizer import sync_adapters
from ..training.optimizer_state import set_state_bits
from .isolation import restored_after


@dataclass
class Measurement:
    """Peak memory (bytes, split by category at the moment of the peak) and step time of one configuration.

    ``peak_bytes`` is what counts against a budget: the allocator-level peak (CUDA: the caching
    allocator's counter; CPU: the profiler's allocation events), which includes kernel workspaces no
    tensor accounts for; ``tracked_peak_bytes`` is the tensors' own peak (the categories add up to it).
    """

    config: MemoryConfig
    device: str
    backend: str
    batch_size: int
    peak_bytes: int
    weights: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    temporaries: int = 0
    inputs: int = 0
    tracked_peak_bytes: int = 0
    reserved_bytes: int | None = None
    step_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    def categories(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in CATEGORIES}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Measurement":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["config"] = MemoryConfig.from_dict(dict(data["config"]))
        return cls(**values)


# ---------------------------------------------------------------------------- the step


def loss_of(output: Any) -> torch.Tensor:
    """The scalar loss a model returned (``.loss``, a tuple's first element, or a 0-d tensor)."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output:
        loss = output[0]
    if loss is None and torch.is_tensor(output):
        loss = output
    if not torch.is_tensor(loss) or loss.dim() != 0:
        raise ValueError(
            f"The model returned no scalar loss (got {type(output).__name__}); profiling needs a batch with labels "
            "(or return_loss=True for CLIP) so that model(**batch).loss is defined."
        )
    return loss


def device_type_of(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return "cpu" if param is None else param.device.type


def train_step(
    model: nn.Module,
    batch: Mapping[str, Any],
    config: MemoryConfig,
    optimizer: torch.optim.Optimizer,
    scaler: Any = None,
    max_micro_batches: int | None = None,
    on_micro_batch: Callable[[int], None] | None = None,
) -> None:
    """One training step under ``config`` (knobs already applied), as the trainer runs it.

    ``max_micro_batches`` cuts the step short for prediction: the peak is reached within the
    first two micro-batches (the second is the first with gradients already allocated), later
    ones repeat the second.
    """
    device_type = device_type_of(model)
    micro_batches = split_batch(batch, config.micro_batch_size)
    shares = micro_batch_shares(micro_batches)
    pairs = list(zip(micro_batches, shares))[:max_micro_batches]
    for index, (micro_batch, share) in enumerate(pairs):
        if on_micro_batch is not None:
            on_micro_batch(index)
        with autocast_context(config, device_type):
            output = model(**micro_batch)
        loss = loss_of(output) * share
        del output  # as in Trainer.training_step: only the loss lives through backward
        (scaler.scale(loss) if scaler is not None else loss).backward()
        del loss
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- measuring


def _tracked_tensors(batch: Mapping[str, Any]) -> list[torch.Tensor]:
    return [v for v in batch.values() if torch.is_tensor(v)]


def _tracked_step(
    model: nn.Module, batch: Mapping[str, Any], config: MemoryConfig, optimizer: torch.optim.Optimizer, scaler: Any,
    max_micro_batches: int | None = None, allocator: bool = False,
) -> dict[str, int]:
    """One step under MemTracker; with ``allocator`` (CPU) also the allocator-level peak from the
    profiler's allocation events, which sees kernel workspaces that no tensor accounts for."""
    tracker = new_tracker(model)
    tracker.track_external(model, optimizer, *_tracked_tensors(batch))
    use_profiler = allocator and not torch.autograd.profiler._is_profiler_enabled
    context = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
               if use_profiler else contextlib.nullcontext())
    with tracker:
        start = sum(d.get("Total", 0) for d in tracker.get_tracker_snapshot("current").values())
        with context as prof:
            # MemTracker refuses a second call of the root module in one context unless its module stats are reset.
            train_step(model, batch, config, optimizer, scaler, max_micro_batches, lambda _: tracker.reset_mod_stats())
    out = tracker_peak(tracker)
    out["allocator"] = start + _max_allocated(prof) if use_profiler else out["total"]
    return out


def _max_allocated(prof: Any) -> int:
    """Highest running sum of the CPU allocations and frees a profile recorded (bytes above its start)."""
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def _timed_steps(
    model: nn.Module, batch: Mapping[str, Any], config: MemoryConfig, optimizer: torch.optim.Optimizer, scaler: Any,
    steps: int,
) -> list[float]:
    on_cuda = device_type_of(model) == "cuda"
    times = []
    for _ in range(steps):
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, batch, config, optimizer, scaler)
        if on_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def measure(
    model: nn.Module,
    batch: Mapping[str, Any],
    config: MemoryConfig,
    optimizer: torch.optim.Optimizer,
    steps: int = 3,
    warmup: int = 1,
    scaler: Any = None,
    spill_dir: str | None = None,
) -> Measurement:
    """Run ``warmup + steps`` real steps of ``config`` (plus one tracked step) and put everything back
    (from a copy in host memory, or in a file in ``spill_dir``: `isolation.StateCopy`).

    The step time is the median of the ``steps`` timed steps; memory comes from a step after the
    warm-up, so optimizer state exists as it will in training.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"measure needs steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}.")
    device = next(model.parameters()).device
    with restored_after(model, optimizer, scaler, spill_dir):
        apply_memory_config(model, config)
        sync_adapters(optimizer, model)
        set_state_bits(optimizer, config.optimizer_state)
        model.train()
        _timed_steps(model, batch, config, optimizer, scaler, max(warmup, 1))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = _timed_steps(model, batch, config, optimizer, scaler, steps)
        reserved = None
        if device.type == "cuda":
            allocator_peak = torch.cuda.max_memory_allocated(device)
            reserved = torch.cuda.max_memory_reserved(device)
        tracked = _tracked_step(model, batch, config, optimizer, scaler, allocator=device.type == "cpu")
    return Measurement(
        config=config,
        device=_device_label(device),
        backend="cuda" if device.type == "cuda" else "memtracker+profiler",
        batch_size=batch_size_of(batch),
        peak_bytes=allocator_peak if device.type == "cuda" else max(tracked["allocator"], tracked["total"]),
        tracked_peak_bytes=tracked["total"],
        reserved_bytes=reserved,
        step_s=statistics.median(times),
        step_times_s=times,
        **{name: tracked[name] for name in CATEGORIES},
    )


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type
