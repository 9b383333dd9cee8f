"""The measured peak memory of a training step, on every device, cheaply enough to run while training.

* CUDA: the caching allocator's own counter (``max_memory_allocated``), reset at each step's start: every
  step, at no cost.
* CPU has no allocator counter. The step's tensor bytes (weights, gradients, optimizer state, activations,
  temporaries: what the budget covers there) are measured with ``torch.distributed._tools.mem_tracker``'s
  MemTracker on sampled steps: the first step of every configuration and every ``every``-th step after it.
  MemTracker intercepts every op, so a tracked step is slower; `overhead` keeps the seconds spent in tracked
  steps beside the untracked ones so that the cost is measured, not assumed.

Bytes the project holds outside the model and optimizer (a race's host copies of the weights and optimizer
state on a CPU) are added through ``held_bytes``, so that they count against the budget as the budget says.
The sampling decision depends only on the step number and the configuration, so every rank of a distributed
run samples the same steps (their peaks are reduced together).
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import MemoryConfig


def process_peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (what the kernel's OOM killer sees), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


@dataclass
class TrackingOverhead:
    """Seconds of tracked and untracked steps, to report what sampling the CPU peak costs."""

    tracked_steps: int = 0
    tracked_s: float = 0.0
    plain_steps: int = 0
    plain_s: float = 0.0

    def ratio(self) -> float | None:
        """Mean tracked step time over mean untracked step time (None until both were seen)."""
        if not self.tracked_steps or not self.plain_steps or not self.plain_s:
            return None
        return (self.tracked_s / self.tracked_steps) / (self.plain_s / self.plain_steps)


@dataclass
class StepPeakMeter:
    """Measures a step's peak bytes: call `begin_step`, wrap each part of the step in `window`, then `end_step`."""

    device: torch.device
    every: int = 10  # CPU: track every ``every``-th step of a configuration (its first step always)
    held_bytes: list[Callable[[], int]] = field(default_factory=list)
    overhead: TrackingOverhead = field(default_factory=TrackingOverhead)
    _active: bool = False
    _peak: int = 0
    _seen: dict[str, int] = field(default_factory=dict)
    _started: float = 0.0
    slowed: bool = False  # the last step ran under MemTracker (CPU): its time is not a plain step's

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.every < 1:
            raise ValueError(f"StepPeakMeter.every must be >= 1, got {self.every!r}.")

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def begin_step(self, config: MemoryConfig | None) -> None:
        """Decide whether this step is measured (always on CUDA) and reset the counters."""
        self._peak = 0
        if self.on_cuda:
            self._active = True
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            key = "" if config is None else config.short()
            count = self._seen.get(key, 0)
            self._seen[key] = count + 1
            self._active = count % self.every == 0
        self._started = time.perf_counter()

    @contextlib.contextmanager
    def window(self, model: nn.Module, optimizer: Any, tensors: Iterable[Any] = ()) -> Iterator[None]:
        """A part of the step (its forward/backward, its optimizer step) whose peak counts for the step."""
        if not self._active or self.on_cuda:
            yield
            return
        from .mem_tracking import new_tracker, tracker_peak

        tracker = new_tracker(model)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        tracker.track_external(model, *([inner] if inner is not None else []),
                               *[t for t in tensors if torch.is_tensor(t)])
        with tracker:
            yield
        self._peak = max(self._peak, tracker_peak(tracker)["total"])

    def end_step(self) -> int | None:
        """The step's measured peak in bytes (with what the project holds outside the model), or None when
        this step was not measured."""
        elapsed = time.perf_counter() - self._started
        self.slowed = self._active and not self.on_cuda
        if not self._active:
            self.overhead.plain_steps += 1
            self.overhead.plain_s += elapsed
            return None
        self._active = False
        if self.on_cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        self.overhead.tracked_steps += 1
        self.overhead.tracked_s += elapsed
        return self._peak + sum(held() for held in self.held_bytes)
