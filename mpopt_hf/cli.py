"""The ``mpopt`` command. Subcommands register themselves in `SUBCOMMANDS`; ``profile`` is the first.

``mpopt profile --model resnet18 --input-shape 3,32,32 --batch-size 32 --budget-mib 512 [--measure N] [--json]``
prints, for every configuration of the knob space, the predicted peak memory by category and
step time, whether it fits the budget and, where measured, the measured values and the error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MiB = 2**20
TINY_FAMILIES = {"tiny-vit": "vit", "tiny-gpt-neo": "gpt_neo", "tiny-clip": "clip", "tiny-sam": "sam",
                 "tiny-mobilevit": "mobilevit"}
EXIT_BAD_INPUT = 2
EXIT_BUDGET_TOO_SMALL = 3


class UsageError(ValueError):
    """Bad command-line input; the message names the value and what is accepted."""


# ----------------------------------------------------------------------------- parsing helpers


def parse_int_list(text: str, what: str, example: str) -> tuple[int, ...]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if not values or any(v < 0 for v in values):
        raise UsageError(f"{what} must be comma-separated non-negative integers such as {example}; got {text!r}.")
    return values


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``3,32,32`` (image C,H,W) or ``128`` (text sequence length)."""
    shape = parse_int_list(text, "--input-shape", "3,32,32 (image C,H,W) or 128 (text sequence length)")
    if any(d == 0 for d in shape) or len(shape) not in (1, 3):
        raise UsageError(f"--input-shape must be C,H,W for images (e.g. 3,32,32) or one sequence length for text "
                         f"(e.g. 128), all positive; got {text!r}.")
    return shape


def positive_float(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive number of MiB, got {text!r}") from None
        if not value > 0 or math.isinf(value):
            raise argparse.ArgumentTypeError(f"{name} must be a positive number of MiB, got {text!r}")
        return value

    return parse


def device_arg(text: str) -> str:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` (whether that device exists is checked when the command runs)."""
    value = str(text).strip().lower()
    kind, colon, index = value.partition(":")
    if value == "cpu" or (kind == "cuda" and (not colon or (index.isdigit() and index.isascii()))):
        return value
    raise argparse.ArgumentTypeError(f"--device must be one of cpu, cuda, cuda:N (N a CUDA device index), got {text!r}")


def non_empty(name: str, what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not str(text).strip():
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {text!r} (empty)")
        return text

    return parse


def positive_int(name: str, minimum: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


# ----------------------------------------------------------------------------- models and batches


def _zoo() -> Any | None:
    """The CNN zoo, imported only here and only if installed (mpopt_hf itself does not depend on it)."""
    try:
        return importlib.import_module("small_cnn")
    except ImportError:
        return None


def accepted_models() -> str:
    zoo = _zoo()
    names = list(zoo.MODEL_NAMES) if zoo else []
    return (f"a small_cnn name {names} (prefix tiny- for a few-channel variant), a tiny HF config "
            f"{sorted(TINY_FAMILIES)}, a local directory with config.json, or a hub id such as org/name")


def load_model(name: str, num_labels: int = 10) -> Any:
    """Resolve ``--model``: zoo name, tiny config, local path or hub id."""
    zoo = _zoo()
    if name in TINY_FAMILIES:
        from .tiny_models import build_tiny

        return build_tiny(TINY_FAMILIES[name])
    base = name[len("tiny-"):] if name.startswith("tiny-") else name
    if zoo is not None and base in zoo.MODEL_NAMES:
        overrides = zoo.tiny_overrides(base) if name.startswith("tiny-") else {}
        return zoo.build(base, num_labels=num_labels, **overrides)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise UsageError(f"--model {name!r} is a directory without config.json; accepted: {accepted_models()}.")
        return _load_pretrained(path)
    if os.path.exists(path):
        raise UsageError(f"--model {name!r} is a file, not a directory with config.json; "
                         f"accepted: {accepted_models()}.")
    if _looks_like_path(name):
        raise UsageError(f"--model {name!r}: the local path {os.path.abspath(path)} does not exist. A local model "
                         f"is a directory with config.json; a hub id (org/name) needs the hub or a copy already in the "
                         f"local Hugging Face cache. Accepted: {accepted_models()}.")
    if name.count("/") == 1:
        return _load_pretrained(name)
    raise UsageError(f"Unknown --model {name!r}; accepted: {accepted_models()}.")


def _looks_like_path(name: str) -> bool:
    """Not a hub id (``name`` or ``org/name``): absolute, relative (``./``, ``../``), home (``~``) or nested paths."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/") or "\\" in name


def _load_pretrained(name: str) -> Any:
    import transformers as tf

    try:
        config = tf.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        where = "" if os.path.isdir(name) else " (a hub id needs the hub, or a copy already in the local cache)"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"Cannot load --model {name!r}{where}: {first}; accepted: {accepted_models()}.") from err
    for auto in (tf.AutoModelForImageClassification, tf.AutoModelForCausalLM, tf.AutoModel):
        try:
            return auto.from_pretrained(name)
        except (ValueError, KeyError):
            continue
    raise UsageError(f"No model class for {name!r} (model_type {config.model_type!r}).")


def synthetic_batch(model: Any, batch_size: int, input_shape: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
    """A random labelled batch of ``batch_size`` samples of ``input_shape`` that ``model`` turns into a loss."""
    import torch

    g = torch.Generator().manual_seed(seed)
    config = model.config
    name = type(model).__name__
    vision = getattr(config, "vision_config", None)
    text = getattr(config, "text_config", None)

    def image(expected_size: int | None = None, channels: int = 3) -> Any:
        if len(input_shape) != 3:
            raise UsageError(f"--input-shape for {name} must be C,H,W (e.g. {channels},32,32); got "
                             f"{','.join(map(str, input_shape))}.")
        if input_shape[0] != channels:
            raise UsageError(f"--input-shape for {name} must have {channels} channels; got {input_shape[0]}.")
        if expected_size is not None and input_shape[1:] != (expected_size, expected_size):
            raise UsageError(f"--input-shape for {name} must be {channels},{expected_size},{expected_size} "
                             f"(its config's image size); got {','.join(map(str, input_shape))}.")
        return torch.randn(batch_size, *input_shape, generator=g)

    if name.startswith("CLIP") and vision is not None and text is not None:
        length = min(text.max_position_embeddings, 16)
        ids = torch.randint(3, text.vocab_size, (batch_size, length), generator=g)
        ids[:, -1] = getattr(text, "eos_token_id", 1) or 1
        return {"pixel_values": image(vision.image_size), "input_ids": ids, "return_loss": True}
    if name.startswith("Sam") and vision is not None:
        size = vision.image_size
        return {"pixel_values": image(size), "input_points": torch.rand(batch_size, 1, 1, 2, generator=g) * size,
                "labels": (torch.rand(batch_size, size, size, generator=g) > 0.5).long()}
    if hasattr(config, "vocab_size") and not hasattr(config, "image_size"):
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if len(input_shape) != 1 or (limit and input_shape[0] > limit):
            raise UsageError(f"--input-shape for the text model {name} must be one sequence length"
                             f"{f' up to {limit}' if limit else ''} (e.g. 64); got {','.join(map(str, input_shape))}.")
        ids = torch.randint(0, config.vocab_size, (batch_size, input_shape[0]), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}
    return {"pixel_values": image(None, getattr(config, "num_channels", 3)),
            "labels": torch.randint(0, getattr(config, "num_labels", 10), (batch_size,), generator=g)}


# ----------------------------------------------------------------------------- profile


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


def _space_flags(args: argparse.Namespace, device_type: str) -> dict[str, Any]:
    """The knob-space flags, read and checked before the model is built (None: the flag's default)."""
    from .config import PRECISIONS

    precisions = None
    if args.precisions is not None:
        precisions = [p.strip() for p in args.precisions.split(",")]
        bad = [p for p in precisions if p not in PRECISIONS]
        if bad:
            raise UsageError(f"--precisions {bad} unknown (in {args.precisions!r}); accepted: {list(PRECISIONS)}.")
    if "fp16" in (precisions or ()) and device_type != "cuda":
        raise UsageError("--precisions fp16 needs --device cuda; use fp32,bf16 on CPU.")
    micro = (parse_int_list(args.micro_batch_sizes, "--micro-batch-sizes", "1,2,4,8")
             if args.micro_batch_sizes is not None else None)
    outside = [m for m in micro or () if not 1 <= m <= args.batch_size]
    if outside:
        raise UsageError(f"--micro-batch-sizes {args.micro_batch_sizes!r}: each micro-batch size must be in "
                         f"1..{args.batch_size} (the --batch-size); got {outside}.")
    freeze = None
    if args.freeze_rates is not None:
        try:
            freeze = [float(x) for x in args.freeze_rates.split(",")]
        except ValueError:
            raise UsageError(f"--freeze-rates must be comma-separated numbers in [0, 1] such as 0,0.5,1; "
                             f"got {args.freeze_rates!r}.") from None
        bad = [x for x in freeze if not (math.isfinite(x) and 0.0 <= x <= 1.0)]
        if bad:
            raise UsageError(f"--freeze-rates {args.freeze_rates!r}: each freeze_rate must be in [0, 1]; got {bad}.")
    segments = (parse_int_list(args.checkpoint_segments, "--checkpoint-segments", "0,1,2,4")
                if args.checkpoint_segments is not None else None)
    return {"precisions": precisions, "micro": micro, "freeze": freeze, "segments": segments}


def _space_from_args(args: argparse.Namespace, n_blocks: int, device_type: str, model_name: str = "the model"
                     ) -> list[Any]:
    """Every configuration the flags span for a model of ``n_blocks`` blocks; refuses flags out of its range."""
    from .knobs import n_frozen_blocks
    from .memory_model import config_space

    flags = _space_flags(args, device_type)
    precisions = flags["precisions"] or (["fp32", "bf16", "fp16"] if device_type == "cuda" else ["fp32", "bf16"])
    freeze = flags["freeze"] if flags["freeze"] is not None else (0.0, 0.25, 0.5, 0.75, 1.0)
    segments = flags["segments"]
    if segments is not None:
        bad = [s for s in segments if s > n_blocks]
        if bad:
            raise UsageError(f"--checkpoint-segments {bad} exceed the {n_blocks} blocks of {model_name}; allowed for "
                             f"this model: 0..{n_blocks} (0 = off; at most the blocks left trainable by the freeze "
                             f"rate), got {args.checkpoint_segments!r}.")
    else:
        segments = (0, 1, 2, 4)  # the default: counts above the trainable blocks are skipped
    space = config_space(args.batch_size, n_blocks, precisions, flags["micro"], freeze, segments)
    if not space:
        trainable = sorted({n_blocks - n_frozen_blocks(r, n_blocks) for r in freeze})
        raise UsageError(f"No configuration is valid for {model_name} ({n_blocks} blocks): --checkpoint-segments "
                         f"{list(segments)} all exceed the trainable blocks {trainable} that --freeze-rates "
                         f"{list(freeze)} leave; lower --checkpoint-segments or the freeze rates.")
    return space


def _print_table(rows: list[Row], out: Any) -> None:
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


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from .blocks import find_blocks
    from .memory_model import BudgetTooSmallError, check_budget
    from .profiler import fit_profile, measure
    from .store import open_store

    shape = parse_input_shape(args.input_shape)
    device = torch.device(args.device)  # device_arg let only cpu, cuda and cuda:N through
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} was given but torch sees no CUDA device; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UsageError(f"--device {args.device}: torch sees {n} CUDA device(s); allowed: cpu, cuda, "
                         f"cuda:0..cuda:{n - 1}.")
    _space_flags(args, device.type)  # flag errors before the model is built
    model = load_model(args.model).to(device)
    batch = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in synthetic_batch(model, args.batch_size, shape).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    space = _space_from_args(args, find_blocks(model).n_blocks, device.type, f"{args.model} ({type(model).__name__})")
    store = None if args.no_store else open_store(args.store)
    try:
        profile = fit_profile(model, batch, optimizer, space, store, n_measure=args.fit_measurements,
                              steps=args.steps, warmup=1)
    finally:
        if store is not None:
            store.close()
    memory_model = profile.model
    fit_configs = {m.config: m for m in profile.measurements}
    extra = [c for c in sorted(space, key=lambda c: memory_model.predict(c, args.batch_size).peak_bytes)
             if c not in fit_configs]
    measured = dict(fit_configs)
    for config in _spread(extra, args.measure) if args.measure else []:
        measured[config] = measure(model, batch, config, optimizer, steps=args.steps)
    rows = []
    for config in space:
        prediction = memory_model.predict(config, args.batch_size)
        fits = None if args.budget_mib is None else prediction.peak_mib <= args.budget_mib
        rows.append(Row(config, prediction, fits, measured.get(config), config in fit_configs))
    n_params = sum(p.numel() for p in model.parameters())
    summary = (f"model {args.model} ({type(model).__name__}, {n_params / 1e6:.3f} M parameters), effective batch "
               f"{args.batch_size}, input {args.input_shape}, device {device.type}; "
               + ("fit reused from the store" if profile.reused else
                  f"fitted from {len(profile.measurements)} measured configuration(s)")
               + f"; {len(space)} configurations")
    if args.json:
        print(json.dumps([row.to_dict() for row in rows], indent=1))
    else:
        print(summary)
        _print_table(rows, sys.stdout)
        errors = [abs(r.prediction.peak_bytes / r.measured.peak_bytes - 1) for r in rows
                  if r.measured is not None and not r.fit_point]
        if errors:
            print(f"prediction error on {len(errors)} measured, unfitted configuration(s): "
                  f"median {sorted(errors)[len(errors) // 2]:.2%}, max {max(errors):.2%}")
    if args.budget_mib is not None:
        try:
            best = check_budget(memory_model, space, args.batch_size, args.budget_mib)
        except BudgetTooSmallError as err:
            print(f"mpopt profile: {err}", file=sys.stderr)
            return EXIT_BUDGET_TOO_SMALL
        if not args.json:
            n_fit = sum(1 for r in rows if r.fits)
            print(f"{n_fit} of {len(rows)} configurations fit {args.budget_mib:g} MiB; smallest peak "
                  f"{best.peak_mib:.2f} MiB ({best.config.short()})")
    return 0


def add_profile_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("profile", help="predict (and measure) the memory and time of every configuration",
                              description=cmd_profile.__doc__ or __doc__)
    p.add_argument("--model", required=True, help="small_cnn name (tiny-<name> for a small variant), "
                   "tiny-vit/tiny-gpt-neo/tiny-clip/tiny-sam/tiny-mobilevit, a local path or a hub id")
    p.add_argument("--input-shape", required=True, help="per-sample shape: C,H,W for images, L for text")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=32, help="effective batch")
    p.add_argument("--budget-mib", type=positive_float("--budget-mib"), default=None, help="memory budget in MiB")
    p.add_argument("--measure", type=positive_int("--measure", 0), default=0,
                   help="also measure N configurations (besides the <= 3 the fit uses) and print the error")
    p.add_argument("--fit-measurements", type=positive_int("--fit-measurements", 0), default=3,
                   choices=range(4), metavar="{0..3}", help="measured configurations the fit uses (0..3)")
    p.add_argument("--steps", type=positive_int("--steps"), default=3, help="timed steps per measurement")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of the table")
    stores = p.add_mutually_exclusive_group()
    stores.add_argument("--store", default=None, type=non_empty("--store", "a SQLite path or a redis:// URL"),
                        help="profile store: a SQLite path or redis://host:port/db "
                        "(default: $XDG_CACHE_HOME/mpopt_hf/profiles.sqlite)")
    stores.add_argument("--no-store", action="store_true", help="neither read nor write a profile store")
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu, cuda or cuda:N")
    p.add_argument("--precisions", default=None, help="comma list of fp32,bf16,fp16 (default: all the device has)")
    p.add_argument("--micro-batch-sizes", default=None, help="comma list (default: powers of two up to the batch)")
    p.add_argument("--freeze-rates", default=None, help="comma list in [0, 1] (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--checkpoint-segments", default=None, help="comma list (default: 0,1,2,4)")
    p.set_defaults(handler=cmd_profile)


# name -> function adding the subparser; other subcommands add themselves here
SUBCOMMANDS: dict[str, Callable[[Any], None]] = {"profile": add_profile_parser}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpopt", description="Memory-aware online retraining tools.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ValueError as err:  # UsageError, and validation errors of configurations built from the flags
        print(f"mpopt {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
