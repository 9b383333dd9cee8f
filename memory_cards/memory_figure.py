"""The seed's memory figure, reproduced: how far the knobs together bring a model's peak below its default.

The seed (MPOptimizer's README) reports the combined knobs at x0.04 of the baseline peak for ResNet-50, x0.05 for
MobileNetV2 and x0.04 for CLIP. Here, per model: the default configuration (whole batch, fp32, nothing frozen, no
checkpointing) and the minimum predicted peak over the whole knob space (`space.knob_space`: every micro-batch
size dividing the batch, every freeze count including all blocks, every checkpoint-segment count, fp32/bf16), and
the minimum with at least one block still training; each then measured once (`mpopt_hf.profiler.measure`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mpopt_hf import MemoryConfig
from mpopt_hf.model.blocks import find_blocks

from . import measuring
from .architectures import ARCHITECTURES, ARCHITECTURES_INFO, build_named
from .card import Column, TableSpec, build_card, environment_lines, mib, peak_eval, ratio, render_table, seconds
from .space import PeakPredictor, knob_space, minimum_peak

SEED = {"resnet50-cifar": 0.04, "mobilenetv2-cifar": 0.05, "clip-b32": 0.04}  # the seed's minimum / baseline
OTHER = ("temporaries", "inputs")
ROWS = ("default", "minimum", "minimum, a block trains")


@dataclass(frozen=True)
class FigureSettings:
    """Which models, at which batch (default: `architectures.ARCHITECTURES`', the seed's), how wide the exact check."""

    models: tuple[str, ...] = tuple(SEED)
    batch_sizes: dict[str, int] = field(default_factory=dict)  # overrides, name -> batch
    shortlist: int = 6  # configurations the memory model ranks lowest that get an exact fake step
    tiny: bool = False  # the tiny variants (--quick)
    tiny_batch: int = 4

    def batch_of(self, name: str) -> int:
        return self.batch_sizes.get(name) or (self.tiny_batch if self.tiny else ARCHITECTURES.get(name, 32))


def _dominant(categories: dict[str, float]) -> str:
    merged = {k: v for k, v in categories.items() if k not in OTHER}
    merged["temporaries + inputs"] = sum(categories[k] for k in OTHER)
    return max(merged, key=merged.get)


def run_model(name: str, settings: FigureSettings, where: torch.device) -> dict[str, Any]:
    """Default, searched minima, each predicted and measured once."""
    batch_size = settings.batch_of(name)
    model, make_batch, what = build_named(name, tiny=settings.tiny)
    model, batch = measuring.to_device(model, make_batch(batch_size), where)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n_blocks = find_blocks(model).n_blocks
    predictor = PeakPredictor(model, batch, optimizer, ("fp32", "bf16"))
    searches = {"minimum": minimum_peak(predictor, knob_space(batch_size, n_blocks), settings.shortlist),
                "minimum, a block trains": minimum_peak(
                    predictor, knob_space(batch_size, n_blocks, min_trainable_blocks=1), settings.shortlist)}
    configs = {"default": MemoryConfig(batch_size), **{k: s.config for k, s in searches.items()}}
    rows = []
    for label, config in configs.items():
        start = time.perf_counter()
        m = measuring.measured(model, batch, config, optimizer, steps=1, warmup=0)
        print(f"  {label} ({config.short()}): {m['peak_mib']:.1f} MiB measured, {time.perf_counter() - start:.0f} s",
              flush=True)
        rows.append({"row": label, "config": config.to_dict(), "predicted_mib": predictor.ranked_mib(config),
                     "exact_mib": predictor.exact_mib(config), **m, "measure_s": time.perf_counter() - start,
                     "dominant": _dominant(m["categories_mib"]), "search": searches[label].to_dict()
                     if label in searches else None})
    base = rows[0]
    for r in rows:
        r["x_default"] = r["peak_mib"] / base["peak_mib"]
        r["x_default_predicted"] = r["predicted_mib"] / base["predicted_mib"]
        r["seed"] = SEED.get(name) if r["row"] != "default" else None
    return {"model": name, "input": what, "batch_size": batch_size, "parameters": measuring.parameter_count(model),
            "n_blocks": n_blocks, "trace_s": predictor.trace_s, "rows": rows}


def run(settings: FigureSettings) -> dict[str, Any]:
    return measuring.run_models("seed_memory_figure", settings, run_model, settings.models)


# ---------------------------------------------------------------------------- the card


def records(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"model": m["model"], "batch_size": m["batch_size"], **r} for m in results["models"] for r in m["rows"]]


def _category(name: str):
    return lambda r: mib(sum(r["categories_mib"][k] for k in OTHER) if name == "other" else r["categories_mib"][name])


SPEC = TableSpec(columns=(
    Column("model", lambda r: r["model"], numeric=False),
    Column("row", lambda r: r["row"], numeric=False),
    Column("batch", lambda r: str(r["batch_size"])),
    Column("configuration", lambda r: MemoryConfig.from_dict(r["config"]).short(), numeric=False),
    Column("predicted peak MiB", lambda r: mib(r["predicted_mib"]), "mib"),
    Column("measured peak MiB", lambda r: mib(r["peak_mib"]), "mib"),
    Column("weights", _category("weights"), "mib"),
    Column("gradients", _category("gradients"), "mib"),
    Column("optimizer state", _category("optimizer_state"), "mib"),
    Column("activations", _category("activations"), "mib"),
    Column("temporaries + inputs", _category("other"), "mib"),
    Column("largest", lambda r: r["dominant"], numeric=False),
    Column("x default", lambda r: ratio(r["x_default"], 3), "ratio"),
    Column("seed's figure", lambda r: "-" if r["seed"] is None else f"x{r['seed']:.2f}"),
    Column("step s", lambda r: seconds(r["step_s"]), "none"),
), key=("model", "row"))

TAGS = ("mpopt_hf", "memory-budget", "benchmark", "reproduction")


def _summary(m: dict[str, Any]) -> str:
    by = {r["row"]: r for r in m["rows"]}
    lines = []
    for label in ROWS[1:]:
        r = by[label]
        share = max(r["categories_mib"].values()) / max(r["tensor_peak_mib"], 1e-9)
        seed = f" (the seed: x{SEED[m['model']]:.2f})" if m["model"] in SEED else ""
        lines.append(f"{label} x{r['x_default']:.3f} measured, x{r['x_default_predicted']:.3f} predicted{seed}, at "
                     f"`{MemoryConfig.from_dict(r['config']).short()}`; {r['dominant']} are {share:.0%} of its tensor peak")
    search, default = by["minimum"]["search"], by["default"]
    floor = default["categories_mib"]["weights"] / default["peak_mib"]
    return (f"- **{m['model']}** (batch {m['batch_size']}, {m['input']}; {m['parameters'] / 1e6:.2f} M parameters, "
            f"{m['n_blocks']} blocks; {search['n_configs']} configurations searched): " + "; ".join(lines)
            + f". The weights alone, which every configuration keeps, are x{floor:.3f} of the default peak.")


NOTES = """- Weights are random (built from the public configs; memory depends on shapes, not values) and so are the
  inputs. The optimizer is AdamW; its state exists when the peak is measured (after a warm-up step), as in training.
- "minimum" freezes as much as the space allows, and the space allows freezing every block (only the head then
  trains): that is the floor of the knobs, not a recommendation. "minimum, a block trains" keeps at least one block
  trainable. The seed does not say which configuration gave its figure.
- Predicted: the fake-tensor memory model (`mpopt_hf.profiler.build_memory_model`, uncalibrated: tensor bytes only);
  the minimum is the smallest exact fake-tensor step (`predict_step`) among the configurations it ranks lowest.
  Measured: `mpopt_hf.profiler.measure`, one step of each configuration: on CPU the larger of the profiler's
  allocation-event peak and MemTracker's live tensors (categories: MemTracker's at the peak); on CUDA the
  allocator's peak. The seed's figures were not measured here; they are quoted.
- Not measured: accuracy; gradient caching, which the trainer runs for CLIP's contrastive loss when it splits the
  batch (measure splits plainly; the cached embeddings add batch x 1024 x 8 bytes); BatchNorm statistics at
  micro-batch 1 (the engine's default refuses micro-batches below 8 on BatchNorm models); step-time claims (one step,
  a shared machine)."""


def card(results: dict[str, Any]):
    env, command = results.get("environment"), results.get("command")
    evals = [peak_eval(r["model"], f"{r['row']} ({MemoryConfig.from_dict(r['config']).short()}), batch {r['batch_size']}",
                       r["peak_mib"], "random inputs") for r in records(results)]
    check = "python reproduce/seed_memory_figure.py --from_results results.json --check README.md"
    sections = [
        "The seed (MPOptimizer) reports that its knobs together bring the training peak to x0.04 of the baseline for "
        "ResNet-50, x0.05 for MobileNetV2 and x0.04 for CLIP. This card measures the same ratio with mpopt_hf's knobs: "
        "the smallest peak of the whole knob space against the default configuration's.",
        "## Summary", "\n".join(_summary(m) for m in results["models"]),
        "## Results", render_table(SPEC, records(results)),
        "Memory columns after the configuration are MemTracker's categories at the peak (they add up to the tensor "
        "peak; the measured peak can be higher: kernel workspaces).",
        "## What was run",
        f"```bash\n{command or 'not recorded'}\n```\n\nRun time {results.get('run_seconds', 0):.0f} s. Check this "
        f"card's table against its results: `{check}`.",
        "## What was and was not measured", NOTES,
        "## Environment", environment_lines(env),
    ]
    return build_card(name="mpopt_hf-seed-memory-figure", tags=TAGS, evals=evals, sections=sections)


# ---------------------------------------------------------------------------- the script


def add_arguments(parser) -> None:
    parser.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(SEED)} "
                        f"(any of {', '.join(ARCHITECTURES_INFO)})")
    parser.add_argument("--batch_size", type=int, default=None, help="one batch for every model (default: each "
                        "model's, memory_cards.architectures.ARCHITECTURES: 128, 128, 32; --quick 4)")
    parser.add_argument("--shortlist", type=int, default=6, help="exact fake steps after the ranking")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def settings_from(args) -> FigureSettings:
    models = tuple(args.models) if args.models else tuple(SEED)
    sizes = {name: args.batch_size for name in models} if args.batch_size else {}
    return FigureSettings(models=models, batch_sizes=sizes, shortlist=args.shortlist, tiny=bool(args.quick))


def _run(args) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(settings_from(args))


def script():
    from .cli import CardScript

    return CardScript(script="reproduce/seed_memory_figure.py", description=__doc__,
                      default_output_dir="model_cards/seed_memory_figure", spec=SPEC, add_arguments=add_arguments,
                      run=_run, records=records, card=card)
