"""Fit a configuration space's memory model once, from traces and at most 3 measured steps, and
remember it in the profile store, so the next run on the same model and device measures nothing.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..config import MIB, PRECISIONS, MemoryConfig
from ..space import usable_bytes
from ..memory_model import MemoryModel
from ..store import ProfileKey, ProfileStore, make_key
from ..training.microbatch import batch_size_of
from .measure import Measurement, device_type_of, measure
from .structure import model_structure
from .tracing import build_memory_model

# What the machine may add to a step's tensor bytes when nothing could be measured. A judgement, not a measured
# bound: it is four times the largest under-prediction of a calibrated fit in the prediction-safety benchmark
# (3.6 %, BENCHMARKS.md); an uncalibrated prediction's miss was not benchmarked.
UNMEASURED_UNCERTAINTY = 0.15


# ---------------------------------------------------------------------------- profile: fit once, remember


@dataclass
class Profile:
    """A fitted memory model and the measurements behind it; ``reused`` when it came from the store."""

    key: ProfileKey
    model: MemoryModel
    measurements: list[Measurement]
    reused: bool


def input_signature(batch: Mapping[str, Any]) -> tuple[tuple[int, ...], str]:
    """The main input's per-sample shape, and every batched input as ``name:shape`` for the store key."""
    total = batch_size_of(batch)
    shapes = {k: tuple(v.shape[1:]) for k, v in sorted(batch.items())
              if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == total}
    main = next((shapes[k] for k in ("pixel_values", "input_ids", "input_values") if k in shapes),
                next(iter(shapes.values()), ()))
    text = ";".join(f"{k}:{'x'.join(map(str, s)) or 'scalar'}:{batch[k].dtype}".replace("torch.", "")
                    for k, s in shapes.items())
    return main, text


def profile_key(model: nn.Module, batch: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> ProfileKey:
    main, inputs = input_signature(batch)
    key = make_key(model, main, next(model.parameters()).device, optimizer=optimizer)
    return ProfileKey(**{**key.to_dict(), "input_shape": main, "inputs": inputs})


def choose_fit_configs(model: MemoryModel, space: list[MemoryConfig], batch_size: int, k: int = 3,
                       limit_bytes: float | None = None) -> list[MemoryConfig]:
    """At most ``k`` configurations to measure, spread to pin down what the traces cannot see:
    the largest activations (workspace per sample), another precision, a small micro-batch (time per op).

    ``limit_bytes``: only configurations whose traced peak (tensor bytes, the model's calibration as it
    stands) stays at or under it are candidates, so that profiling never runs what the budget forbids."""
    if limit_bytes is not None:
        space = [c for c in space if model.predict(c, batch_size).peak_bytes <= limit_bytes]
    # the time model has no 8-bit optimizer term: calibrate on fp32 moments where the space has them
    space = [c for c in space if c.optimizer_state == "fp32"] or space
    if k <= 0 or not space:
        return []
    ranked = sorted(space, key=lambda c: model.predict(c, batch_size).peak_bytes)
    main = "fp32" if any(c.precision == "fp32" for c in space) else ranked[-1].precision
    chosen = [max((c for c in ranked if c.precision == main), key=lambda c: model.predict(c, batch_size).peak_bytes)]
    others = [c for c in ranked if c.precision != main]
    if others and len(chosen) < k:  # its workspace per sample is best seen at the largest micro-batch
        plain = [c for c in others if c.freeze_rate == 0 and c.checkpoint_segments == 0] or others
        chosen.append(max(plain, key=lambda c: (c.micro_batch_size, -c.freeze_rate, -c.checkpoint_segments)))
    small = [c for c in ranked if c.precision == main and c not in chosen
             and c.micro_batch_size == min(max(2, batch_size // 4), batch_size) and c.checkpoint_segments > 0]
    rest = small or [c for c in ranked if c not in chosen]
    if rest and len(chosen) < k:
        chosen.append(rest[len(rest) // 2])
    return chosen[:k]


def fit_profile(
    model: nn.Module,
    batch: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    space: list[MemoryConfig],
    store: ProfileStore | None = None,
    n_measure: int = 3,
    steps: int = 1,
    warmup: int = 1,
    budget_bytes: float | None = None,
    margin: float = 0.05,
) -> Profile:
    """The memory model of ``model`` for ``space``: from the store when it holds one, else traced,
    calibrated on at most ``n_measure`` (<= 3) measured configurations, and stored.

    With ``budget_bytes``, a configuration is measured only if its traced peak is at most
    ``budget_bytes * (1 - margin)``, and on a CPU the copy that puts the model and optimizer back afterwards is
    written to a file in the temporary folder (``TMPDIR``) instead of host memory; when none is, nothing is measured and the fit is the traced tensor bytes
    with `UNMEASURED_UNCERTAINTY` as its uncertainty (a warning says so). One timed step per configuration:
    memory needs one step, and the time model is refined from the steps training runs anyway.
    """
    if not 0 <= n_measure <= 3:
        raise ValueError(f"n_measure must be in 0..3 (the fit uses at most 3 measurements), got {n_measure}.")
    key = profile_key(model, batch, optimizer)
    precisions = sorted({c.precision for c in space}, key=PRECISIONS.index)
    selective = any(c.selective for c in space)
    if store is not None:
        stored = store.load_fit(key)
        if stored is not None:
            try:
                memory_model = MemoryModel.from_dict(stored)
            except (KeyError, TypeError, ValueError) as err:
                warnings.warn(f"Ignoring the stored fit in {store.location} ({err}); fitting afresh.", stacklevel=2)
            else:
                if set(precisions) <= set(memory_model.precisions) and memory_model.selective >= selective:
                    # the structure is cheap and exact: take it from the live model (optimizer state may have grown)
                    memory_model = replace(memory_model, structure=model_structure(
                        model, batch, optimizer, never_grad=memory_model.structure.never_grad))
                    measured = [Measurement.from_dict(m.data) for m in store.measurements(key)]
                    return Profile(key, memory_model, measured, reused=True)
    memory_model = build_memory_model(model, batch, optimizer, precisions, selective=selective)
    batch_size = batch_size_of(batch)
    limit = spill_dir = None
    if budget_bytes is not None:
        limit = usable_bytes(budget_bytes, margin)
        # on a CPU the host is the budgeted device: the isolation copy goes to disk, not beside the step
        spill_dir = tempfile.gettempdir() if device_type_of(model) == "cpu" else None
    chosen = choose_fit_configs(memory_model, space, batch_size, n_measure, limit)
    if limit is not None and n_measure and not chosen:
        warnings.warn(
            f"No configuration's traced peak fits the budget of {budget_bytes / MIB:.1f} MiB less its "
            f"margin: nothing is measured, and predictions are the fake-tensor bytes (no kernel workspaces) with "
            f"{UNMEASURED_UNCERTAINTY:.0%} of the budget kept free for what the machine adds.", stacklevel=2)
    measured = []
    for config in chosen:
        try:
            measured.append(measure(model, batch, config, optimizer, steps=steps, warmup=warmup, spill_dir=spill_dir))
        except torch.OutOfMemoryError as err:  # the device said no: remember it, fit on the others
            if store is not None:
                store.mark_infeasible(key, config, f"out of memory while profiling: {err}"[:500])
    memory_model.calibrate([(m.config, m.batch_size, m.peak_bytes, m.step_s) for m in measured])
    if not measured:
        memory_model = replace(memory_model, calibration=replace(memory_model.calibration,
                                                                 uncertainty=UNMEASURED_UNCERTAINTY))
    if store is not None:
        for m in measured:
            store.add_measurement(key, m.config, m.to_dict())
        store.save_fit(key, memory_model.to_dict())
    return Profile(key, memory_model, measured, reused=False)
