"""The knob-ablation card: what each memory knob saves, added one by one (Betty-style) and each alone.

Per model, on one effective batch: the baseline (whole batch, no knob), then cumulatively + micro-batching
(gradient accumulation over batch/4), + bf16 autocast, + checkpointing (every trainable block), + freezing (half the
blocks) = all together; then each knob alone (micro-batching alone is the "+ micro-batching" row), with selective
checkpointing, 8-bit optimizer state and LoRA adapters (where the blocks have Linear layers), and all together with
8-bit optimizer state and with LoRA. On CUDA also fp16
(with a loss scaler) alone and all together with fp16. Each configuration's peak is measured
(`mpopt_hf.profiler.measure`) beside the fake-tensor memory model's prediction; step times are given as ratios to
the baseline, measured side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mpopt_hf import MemoryConfig
from mpopt_hf.model.blocks import find_blocks
from mpopt_hf.model.lora import lora_targets
from mpopt_hf.model.plan import n_frozen_blocks
from mpopt_hf.training.optimizer_state import switchable_adamw

from . import measuring
from .architectures import build_named
from .card import Column, TableSpec, build_card, environment_lines, mib, peak_eval, ratio, render_table, seconds
from .space import PeakPredictor

CHAIN = ("micro-batching", "bf16", "checkpointing", "freezing")  # the cumulative order
SELECTIVE = "selective checkpointing"  # alone only: the policy that keeps matmul outputs
LOW_BIT = "8-bit optimizer state"  # alone, and added to all together: bitsandbytes' blockwise AdamW moments
LORA = "LoRA"  # alone, and added to all together: peft adapters on the trainable blocks' Linear layers
QUICK_MODELS = ("resnet50", "vit")


def _default_models() -> tuple[str, ...]:
    import small_cnn
    from mpopt_hf.testing.tiny_models import TINY_FAMILIES

    return (*small_cnn.MODEL_NAMES, *TINY_FAMILIES)


@dataclass(frozen=True)
class AblationSettings:
    """The run: which models, the effective batch, each knob's value when it is on, how many steps are timed."""

    models: tuple[str, ...] = field(default_factory=_default_models)
    batch_size: int = 32
    micro_batch_divisor: int = 4  # micro-batching: batch // this samples per micro-batch
    freeze_rate: float = 0.5  # freezing: the first round(rate x blocks) blocks (and the stem)
    lora_rank: int = 8  # LoRA: adapters of this rank
    steps: int = 2  # timed steps per configuration (median), after `warmup`
    warmup: int = 1
    tiny: bool = False  # the zoo's few-channel variants (--quick)

    @property
    def micro_batch_size(self) -> int:
        return max(1, self.batch_size // self.micro_batch_divisor)


@dataclass(frozen=True)
class AblationRow:
    label: str
    kind: str  # "cumulative" or "alone"
    knobs: tuple[str, ...]  # the knobs on in this row
    config: MemoryConfig


def config_with(knobs: tuple[str, ...], n_blocks: int, settings: AblationSettings) -> MemoryConfig:
    """The configuration with ``knobs`` on at the settings' values; checkpointing covers every trainable block."""
    precision = next((p for p in ("bf16", "fp16") if p in knobs), "fp32")
    rate = settings.freeze_rate if "freezing" in knobs else 0.0
    trainable = n_blocks - n_frozen_blocks(rate, n_blocks)
    checkpointing = "checkpointing" in knobs or SELECTIVE in knobs
    return MemoryConfig(settings.micro_batch_size if "micro-batching" in knobs else settings.batch_size, rate,
                        trainable if checkpointing else 0, precision,
                        checkpoint_policy="selective" if SELECTIVE in knobs else "block",
                        optimizer_state="8bit" if LOW_BIT in knobs else "fp32",
                        lora_rank=settings.lora_rank if LORA in knobs else 0)


def ablation_rows(n_blocks: int, settings: AblationSettings, device_type: str = "cpu",
                  lora: bool = False) -> list[AblationRow]:
    """The cumulative chain, then each knob alone; fp16 rows only on CUDA, LoRA rows only with ``lora`` (a model
    whose blocks have Linear layers)."""
    rows = [AblationRow("baseline", "cumulative", (), config_with((), n_blocks, settings))]
    for i, knob in enumerate(CHAIN):
        label = "+ freezing = all together" if i == len(CHAIN) - 1 else f"+ {knob}"
        rows.append(AblationRow(label, "cumulative", CHAIN[:i + 1], config_with(CHAIN[:i + 1], n_blocks, settings)))
    alone = [*CHAIN[1:3], SELECTIVE, *CHAIN[3:], LOW_BIT] + (["fp16"] if device_type == "cuda" else []) \
        + ([LORA] if lora else [])
    rows += [AblationRow(f"{k} alone", "alone", (k,), config_with((k,), n_blocks, settings)) for k in alone]
    for extra in [LOW_BIT] + ([LORA] if lora else []):
        rows.append(AblationRow(f"all together + {extra}", "cumulative", (*CHAIN, extra),
                                config_with((*CHAIN, extra), n_blocks, settings)))
    if device_type == "cuda":
        knobs = tuple("fp16" if k == "bf16" else k for k in CHAIN)
        rows.append(AblationRow("all together, fp16", "cumulative", knobs, config_with(knobs, n_blocks, settings)))
    return rows


def run_model(name: str, settings: AblationSettings, where: torch.device) -> dict[str, Any]:
    """Every row of one model: predicted and measured peak, categories, step time and the ratios to the baseline."""
    model, make_batch, what = build_named(name, tiny=settings.tiny)
    model, batch = measuring.to_device(model, make_batch(settings.batch_size), where)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # the 8-bit rows run bitsandbytes' AdamW (measure converts its moments); the others torch's, as a user's would
    low_bit = switchable_adamw(torch.optim.AdamW(model.parameters(), lr=1e-4))
    blocks = find_blocks(model)
    n_blocks = blocks.n_blocks
    rows = ablation_rows(n_blocks, settings, where.type, lora=bool(lora_targets(model, blocks, 0)))
    predictors = {False: PeakPredictor(model, batch, optimizer), True: PeakPredictor(model, batch, low_bit)}
    cache: dict[MemoryConfig, dict[str, Any]] = {}
    out = []
    for row in rows:
        eight = row.config.optimizer_state == "8bit"
        if row.config not in cache:
            cache[row.config] = measuring.measured(model, batch, row.config, low_bit if eight else optimizer,
                                                   settings.steps, settings.warmup)
            print(f"  {row.label} ({row.config.short()}): {cache[row.config]['peak_mib']:.1f} MiB, "
                  f"{cache[row.config]['step_s']:.3g} s a step", flush=True)
        out.append({"row": row.label, "kind": row.kind, "knobs": list(row.knobs), "config": row.config.to_dict(),
                    "predicted_mib": predictors[eight].exact_mib(row.config), **cache[row.config]})
    base = out[0]
    for r in out:
        r["x_memory"] = r["peak_mib"] / base["peak_mib"]
        r["x_time"] = r["step_s"] / base["step_s"] if base["step_s"] else None
    return {"model": name, "input": what, "parameters": measuring.parameter_count(model), "n_blocks": n_blocks,
            "rows": out}


def run(settings: AblationSettings) -> dict[str, Any]:
    return measuring.run_models("knob_ablation", settings, run_model, settings.models)


# ---------------------------------------------------------------------------- the card


def records(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"model": m["model"], **r} for m in results["models"] for r in m["rows"]]


SPEC = TableSpec(columns=(
    Column("model", lambda r: r["model"], numeric=False),
    Column("row", lambda r: r["row"], numeric=False),
    Column("configuration", lambda r: MemoryConfig.from_dict(r["config"]).short(), numeric=False),
    Column("predicted peak MiB", lambda r: mib(r["predicted_mib"]), "mib"),
    Column("measured peak MiB", lambda r: mib(r["peak_mib"]), "mib"),
    Column("tensor peak MiB", lambda r: mib(r["tensor_peak_mib"]), "mib"),
    Column("activations MiB", lambda r: mib(r["categories_mib"]["activations"]), "mib"),
    Column("x baseline memory", lambda r: ratio(r["x_memory"]), "ratio"),
    Column("step s", lambda r: seconds(r["step_s"]), "none"),
    Column("x baseline time", lambda r: ratio(r["x_time"]), "none"),
), key=("model", "row"))

TAGS = ("mpopt_hf", "memory-budget", "benchmark", "gradient-accumulation", "mixed-precision",
        "activation-checkpointing", "selective-activation-checkpointing", "layer-freezing", "lora")


def _setup_table(results: dict[str, Any]) -> str:
    s, env = results["settings"], results.get("environment") or {}
    micro = max(1, s["batch_size"] // s["micro_batch_divisor"])
    rows = [
        ("models", "; ".join(f"`{m['model']}` ({m['parameters'] / 1e6:.2f} M parameters, {m['n_blocks']} blocks, "
                             f"{m['input']})" for m in results["models"])),
        ("effective batch", f"{s['batch_size']} random samples (weights random too: memory depends on shapes only)"),
        ("micro-batching", f"{micro} samples per micro-batch, gradients accumulated (the same gradient)"),
        ("bf16 / fp16", "autocast; fp16 with a loss scaler, on CUDA only"),
        ("checkpointing", "every trainable block (non-reentrant; HF's own where the model has it)"),
        ("selective checkpointing", "every trainable block, keeping its matmul, convolution and attention outputs "
                                    "(`checkpoint_policy='selective'`, PyTorch's selective checkpoint contexts)"),
        ("freezing", f"freeze rate {s['freeze_rate']:g}: the stem and the first round(rate x blocks) blocks"),
        ("8-bit optimizer state", "bitsandbytes' AdamW with blockwise 8-bit moments (tensors of 4096 elements or "
                                  "more; smaller ones stay 32-bit), created at the warm-up step"),
        ("LoRA", f"peft's adapters of rank {s.get('lora_rank', 8)} (alpha = 2 x rank) on every Linear layer of the "
                 "trainable blocks, whose own weights freeze (models whose blocks have Linear layers only)"),
        ("optimizer", "torch's AdamW (two fp32 state tensors per trainable parameter); bitsandbytes' on 8-bit rows"),
        ("steps", f"{max(1, s['warmup'])} warm-up + {s['steps']} timed (median) + 1 tracked step per configuration"),
        ("device, backend", f"`{env.get('device')}`: " + ("CUDA caching allocator's peak (max_memory_allocated)"
                            if env.get("gpu") else "the larger of the profiler's allocation-event peak and "
                            "MemTracker's live-tensor peak")),
    ]
    return "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])


NOTES = """- **Measured**: peak memory of one training step per configuration (`mpopt_hf.profiler.measure`, after the
  warm-up, so AdamW's state exists), its split by category (MemTracker), and step time. "predicted" is the
  fake-tensor memory model (`mpopt_hf.profiler.build_memory_model`, uncalibrated: tensor bytes only, no kernel
  workspace), to be read beside the tensor peak; the measured peak on CPU also sees kernel workspaces.
- **Not measured**: accuracy (micro-batching and precision keep the gradient up to rounding, freezing changes what
  learns); BatchNorm statistics under micro-batching (they are the micro-batch's); gradient caching, which the
  trainer runs for CLIP's contrastive loss when it splits a batch (measure splits plainly: the cached embeddings add
  a few KiB at these sizes); a GPU, unless the environment below names one.
- Times are ratios to the baseline measured in the same run; on a shared CPU they swing, and `--check` ignores them."""


def card(results: dict[str, Any]):
    env, command = results.get("environment"), results.get("command")
    dataset = f"random inputs, batch {results['settings']['batch_size']}"
    evals = [peak_eval(r["model"], f"{r['row']} ({MemoryConfig.from_dict(r['config']).short()})", r["peak_mib"], dataset)
             for r in records(results)]
    check = ("python reproduce/knob_ablation.py --from_results results.json --check README.md")
    sections = [
        "Peak training memory and step time of mpopt_hf's memory knobs on each model: added one by one "
        "(baseline, + micro-batching, + bf16, + checkpointing, + freezing = all together) and each alone.",
        "## What was run", _setup_table(results),
        f"The command that produced it:\n\n```bash\n{command or 'not recorded'}\n```\n\n"
        f"Check this card's table against its results (run time {results.get('run_seconds', 0):.0f} s): `{check}`.",
        "## Results", render_table(SPEC, records(results)),
        "## What was and was not measured", NOTES,
        "## Environment", environment_lines(env),
    ]
    return build_card(name="mpopt_hf-knob-ablation", tags=TAGS, evals=evals, sections=sections)


# ---------------------------------------------------------------------------- the script


def add_arguments(parser) -> None:
    parser.add_argument("--models", nargs="+", default=None, help="default: the zoo at full width (32 px) and the "
                        "tiny HF families; also accepts memory_cards.architectures names (real-size)")
    parser.add_argument("--batch_size", type=int, default=None, help="effective batch (default 32; --quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 2; --quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def settings_from(args) -> AblationSettings:
    quick = {"models": QUICK_MODELS, "batch_size": 4, "steps": 1, "warmup": 0, "tiny": True} if args.quick else {}
    given = {k: v for k, v in (("models", tuple(args.models) if args.models else None),
                               ("batch_size", args.batch_size), ("steps", args.steps)) if v is not None}
    return AblationSettings(**{**quick, **given})


def _run(args) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(settings_from(args))


def script():
    from .cli import CardScript

    return CardScript(script="reproduce/knob_ablation.py", description=__doc__, default_output_dir="model_cards/knob_ablation",
                      spec=SPEC, add_arguments=add_arguments, run=_run, records=records, card=card)
