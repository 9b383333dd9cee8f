"""``mpopt profile``: the predicted (and, where measured, the measured) memory and time of every configuration.

``mpopt profile --model resnet18 --input-shape 3,32,32 --batch-size 32 --budget-mib 512 [--measure N] [--json]``
prints, for every configuration of the knob space, the predicted peak memory by category and step time, whether it
fits the budget and, where measured, the measured values and the error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import MIB
from ..space import fits as budget_fits
from .arguments import (
    DEFAULT_CHECKPOINT_SEGMENTS,
    DEFAULT_FREEZE_RATES,
    EXIT_BUDGET_TOO_SMALL,
    FLAG_TYPES,
    ProfileArguments,
    UsageError,
)
from .models import load_model, synthetic_batch
from .parsing import add_dataclass_command, dataclass_from


@dataclass
class Row:
    """One configuration's line of the table / JSON list."""

    config: Any
    prediction: Any
    fits: bool | None
    measured: Any = None
    fit_point: bool = False

    def to_dict(self) -> dict[str, Any]:
        p = self.prediction
        out: dict[str, Any] = {**self.config.to_dict(), "predicted_peak_mib": round(p.peak_mib, 4),
                               **{f"predicted_{k}_mib": round(v, 4) for k, v in p.categories_mib().items()},
                               "predicted_step_s": round(p.step_s, 6), "peak_phase": p.phase, "fits": self.fits,
                               "measured": self.measured is not None}
        if self.measured is not None:
            out["measured_peak_mib"] = round(self.measured.peak_mib, 4)
            out["measured_step_s"] = round(self.measured.step_s, 6) if self.measured.step_s is not None else None
            out["peak_error"] = round(p.peak_bytes / self.measured.peak_bytes - 1, 5)
            out["used_for_fit"] = self.fit_point
        return out


def knob_space(args: ProfileArguments, n_blocks: int, model_name: str = "the model") -> list[Any]:
    """Every configuration the flags span for a model of ``n_blocks`` blocks; refuses flags out of its range."""
    from ..memory_model import config_space
    from ..model.plan import n_frozen_blocks

    precisions = args.precisions or (["fp32", "bf16", "fp16"] if args.device_type == "cuda" else ["fp32", "bf16"])
    freeze = args.freeze_rates if args.freeze_rates is not None else DEFAULT_FREEZE_RATES
    segments = args.checkpoint_segments
    if segments is not None:
        bad = [s for s in segments if s > n_blocks]
        if bad:
            raise UsageError(f"--checkpoint-segments {bad} exceed the {n_blocks} blocks of {model_name}; allowed for "
                             f"this model: 0..{n_blocks} (0 = off; at most the blocks left trainable by the freeze "
                             f"rate), got {segments}.")
    else:
        segments = DEFAULT_CHECKPOINT_SEGMENTS
    space = config_space(args.batch_size, n_blocks, precisions, args.micro_batch_sizes, freeze, segments,
                         args.checkpoint_policies or ("block",), args.optimizer_states or ("fp32",),
                         args.lora_ranks or (0,))
    if not space:
        trainable = sorted({n_blocks - n_frozen_blocks(r, n_blocks) for r in freeze})
        raise UsageError(f"No configuration is valid for {model_name} ({n_blocks} blocks): --checkpoint-segments "
                         f"{list(segments)} all exceed the trainable blocks {trainable} that --freeze-rates "
                         f"{list(freeze)} leave; lower --checkpoint-segments or the freeze rates.")
    return space


def print_table(rows: list[Row], out: Any) -> None:
    head = ["config", "peak MiB", "weights", "grads", "optim", "activ", "temp", "inputs", "step s", "fits",
            "measured", "meas MiB", "meas s", "error"]
    lines = []
    for row in rows:
        p, cats = row.prediction, row.prediction.categories_mib()
        m = row.measured
        lines.append([
            row.config.short(), f"{p.peak_mib:.2f}", f"{cats['weights']:.2f}", f"{cats['gradients']:.2f}",
            f"{cats['optimizer_state']:.2f}", f"{cats['activations']:.2f}", f"{cats['temporaries']:.2f}",
            f"{cats['inputs']:.2f}", f"{p.step_s:.4f}", "-" if row.fits is None else ("yes" if row.fits else "no"),
            ("fit" if row.fit_point else "yes") if m else "no",
            f"{m.peak_mib:.2f}" if m else "", f"{m.step_s:.4f}" if m and m.step_s else "",
            f"{p.peak_bytes / m.peak_bytes - 1:+.2%}" if m else "",
        ])
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(head)]
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths))), file=out)
    for r in lines:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))), file=out)


def _spread(configs: Sequence[Any], n: int) -> list[Any]:
    if n >= len(configs):
        return list(configs)
    return [configs[round(i * (len(configs) - 1) / max(n - 1, 1))] for i in range(n)]


def _device(args: ProfileArguments) -> Any:
    """The torch device of ``--device``, refused if torch does not see it."""
    import torch

    device = torch.device(args.device)  # ProfileArguments let only cpu, cuda and cuda:N through
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} was given but torch sees no CUDA device; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UsageError(f"--device {args.device}: torch sees {n} CUDA device(s); allowed: cpu, cuda, "
                         f"cuda:0..cuda:{n - 1}.")
    return device


def _pricer(memory_model: Any, model: Any, batch: Any, optimizer: Any, batch_size: int) -> Any:
    """``config -> Prediction``: the memory model's, and for LoRA adapters (which it does not trace) one fake-tensor
    step's bytes by category, plus the calibrated workspace, with the step time of the twin without adapters (an
    upper bound), as the trainer's profiled cost model prices them."""
    from dataclasses import replace

    from ..profiler import fake_setup, predict_step

    setup = None

    def predict(config: Any) -> Any:
        nonlocal setup
        if not config.lora_rank:
            return memory_model.predict(config, batch_size)
        setup = setup or fake_setup(model, optimizer, batch)
        fake = predict_step(model, batch, config, optimizer, setup=setup)
        workspace = memory_model.calibration.workspace(config.precision, min(config.micro_batch_size, batch_size))
        twin = memory_model.predict(config.replace(lora_rank=0), batch_size)
        return replace(twin, config=config, peak_bytes=fake.peak_bytes + workspace, weights=fake.weights,
                       gradients=fake.gradients, optimizer_state=fake.optimizer_state, activations=fake.activations,
                       temporaries=fake.temporaries + workspace, inputs=fake.inputs, phase="fake step (LoRA)")

    return predict


def run_profile(args: ProfileArguments) -> int:
    """Fit (or reuse) the memory model, measure where asked, print the rows; the exit status."""
    import torch

    from ..memory_model import BudgetTooSmallError
    from ..model.blocks import find_blocks
    from ..profiler import fit_profile, measure
    from ..store import open_store

    device = _device(args)
    model = load_model(args.model).to(device)
    batch = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in synthetic_batch(model, args.batch_size, args.input_shape).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    space = knob_space(args, find_blocks(model).n_blocks, f"{args.model} ({type(model).__name__})")
    if any(c.optimizer_state == "8bit" for c in space):  # as MPOptTrainer builds it when 8-bit state is listed
        from ..training.optimizer_state import switchable_adamw

        optimizer = switchable_adamw(optimizer)
    store = None if args.no_store else open_store(args.store)
    try:
        # with a budget, the fit measures only what is predicted to fit it (a device that small cannot run more)
        budget = None if args.budget_mib is None else args.budget_mib * MIB
        plain = [c for c in space if not c.lora_rank] or [c.replace(lora_rank=0) for c in space]
        fitted = fit_profile(model, batch, optimizer, plain, store, n_measure=args.fit_measurements,
                             steps=args.steps, warmup=1, budget_bytes=budget)
    finally:
        if store is not None:
            store.close()
    memory_model = fitted.model
    predict = _pricer(memory_model, model, batch, optimizer, args.batch_size)
    predictions = {config: predict(config) for config in space}
    fit_configs = {m.config: m for m in fitted.measurements}
    extra = [c for c in sorted(space, key=lambda c: predictions[c].peak_bytes) if c not in fit_configs]
    measured = dict(fit_configs)
    for config in _spread(extra, args.measure) if args.measure else []:
        measured[config] = measure(model, batch, config, optimizer, steps=args.steps)
    rows = []
    for config in space:
        prediction = predictions[config]
        fits = None if args.budget_mib is None else budget_fits(prediction.peak_bytes, args.budget_mib * MIB,
                                                                 args.safety_margin)
        rows.append(Row(config, prediction, fits, measured.get(config), config in fit_configs))
    n_params = sum(p.numel() for p in model.parameters())
    summary = (f"model {args.model} ({type(model).__name__}, {n_params / 1e6:.3f} M parameters), effective batch "
               f"{args.batch_size}, input {','.join(map(str, args.input_shape))}, device {device.type}; "
               + ("fit reused from the store" if fitted.reused else
                  f"fitted from {len(fitted.measurements)} measured configuration(s)")
               + f"; {len(space)} configurations")
    if args.json:
        print(json.dumps([row.to_dict() for row in rows], indent=1))
    else:
        print(summary)
        print_table(rows, sys.stdout)
        errors = [abs(r.prediction.peak_bytes / r.measured.peak_bytes - 1) for r in rows
                  if r.measured is not None and not r.fit_point]
        if errors:
            print(f"prediction error on {len(errors)} measured, unfitted configuration(s): "
                  f"median {sorted(errors)[len(errors) // 2]:.2%}, max {max(errors):.2%}")
    if args.budget_mib is not None:
        best = min(predictions.values(), key=lambda p: p.peak_bytes)
        if not budget_fits(best.peak_bytes, args.budget_mib * MIB, args.safety_margin):
            err = BudgetTooSmallError(args.budget_mib, best.peak_mib, best.config, args.safety_margin)
            print(f"mpopt profile: {err}", file=sys.stderr)
            return EXIT_BUDGET_TOO_SMALL
        if not args.json:
            n_fit = sum(1 for r in rows if r.fits)
            print(f"{n_fit} of {len(rows)} configurations fit {args.budget_mib:g} MiB less a margin of "
                  f"{args.safety_margin:g}; smallest peak "
                  f"{best.peak_mib:.2f} MiB ({best.config.short()})")
    return 0


def cmd_profile(namespace: argparse.Namespace) -> int:
    return run_profile(dataclass_from(ProfileArguments, namespace))


def add_profile_parser(subparsers: Any) -> None:
    add_dataclass_command(
        subparsers, "profile", ProfileArguments, cmd_profile, FLAG_TYPES,
        help="predict (and measure) the memory and time of every configuration",
        description="For every configuration of the knob space: the predicted peak memory by category and step "
        "time, whether it fits --budget-mib and, for the configurations measured (--measure), the measured values "
        "and the error. A list flag takes comma- or space-separated values (--micro-batch-sizes 4,8 or "
        "--micro-batch-sizes 4 8). Each flag is also spelled with underscores (--batch_size).")
