"""One measured configuration as a plain dict, and the device facts the cards record.

`mpopt_hf.profiler.measure` is the measurement: on CUDA the caching allocator's peak, on CPU the larger of the
profiler's allocation-event peak and MemTracker's live-tensor peak; MemTracker splits the peak by category on both.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from mpopt_hf import MemoryConfig
from mpopt_hf.training.mem_tracking import CATEGORIES
from mpopt_hf.profiler import measure

MiB = 2**20


def run_models(card: str, settings: Any, run_model: Callable[[str, Any, torch.device], dict[str, Any]],
               models: Sequence[str]) -> dict[str, Any]:
    """A card's results: ``run_model(name, settings, device)`` for each model, timed, with the settings and the
    environment they ran in."""
    where = device()
    rows = []
    for name in models:
        print(f"[{card.replace('_', ' ')}] {name} ...", flush=True)
        start = time.perf_counter()
        rows.append({**run_model(name, settings, where), "seconds": time.perf_counter() - start})
    return {"card": card, "settings": asdict(settings), "environment": environment(where), "models": rows}


def device() -> torch.device:
    """CUDA when there is one (the allocator's counters), else the CPU (MemTracker)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precisions_for(device_type: str) -> tuple[str, ...]:
    """The autocast precisions a device runs: fp16 needs CUDA's loss scaler."""
    return ("fp32", "bf16", "fp16") if device_type == "cuda" else ("fp32", "bf16")


def to_device(model: nn.Module, batch: Mapping[str, Any], where: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    return model.to(where), {k: v.to(where) if torch.is_tensor(v) else v for k, v in batch.items()}


def measured(model: nn.Module, batch: Mapping[str, Any], config: MemoryConfig, optimizer: torch.optim.Optimizer,
             steps: int = 1, warmup: int = 0) -> dict[str, Any]:
    """``measure`` of ``config`` in MiB: the peak, MemTracker's tensor peak, its categories, the median step time.

    fp16 gets a ``GradScaler``, as the trainer gives it.
    """
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    m = measure(model, batch, config, optimizer, steps=steps, warmup=warmup, scaler=scaler)
    return {"peak_mib": m.peak_bytes / MiB, "tensor_peak_mib": m.tracked_peak_bytes / MiB,
            "categories_mib": {name: getattr(m, name) / MiB for name in CATEGORIES},
            "step_s": m.step_s, "backend": m.backend, "device": m.device}


def environment(where: torch.device) -> dict[str, Any]:
    """What the numbers depend on: versions, device, CPU name and ISA (oneDNN's kernels) or GPU, threads."""
    from online_recipe.model_card import environment as recipe_environment

    env = recipe_environment(where)
    env["cpu_isa"] = torch.backends.cpu.get_cpu_capability()
    env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    env["machine"] = platform.machine()
    return env


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
