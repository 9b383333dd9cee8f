"""Does the budget hold for the whole process on real-size architectures? (issue 19)

Each architecture is built by `memory_cards.architectures.build` from its public config (random weights, nothing
downloads) and trained by `MPOptTrainer` twice: cold (empty profile store: the fit measures) and warm (the fit comes
from the store). Each run is its own process, so its peak resident set is its own.

Two budgets:

* default: half-way between the smallest configuration's predicted peak (with a 15 % margin) and the whole batch's,
  so the whole batch never fits and the fit must not measure it;
* ``--race``: `RACE_HEADROOM` x (the whole batch's predicted peak + the race's two host copies), over four freeze
  rates, so that the engine races one configuration per freeze rate from the same weights with its copies held
  (they count in the CPU step peak). Several configurations then train, so each one's step time can be predicted
  from the *other* configurations' measured steps, as the engine does for configurations it has not run.

Per run: setup seconds (the cost model's fit), what the fit measured and the largest measured peak among those,
the largest per-step measured peak of training (MemTracker on CPU: the first step of each configuration, with the
race's copies when it holds them), the most bytes of race copies held at a step, the process's peak RSS, and the
median step-time error of the configurations that trained: the fit's prediction against the mean of their plain
(untracked) steps ("before"), and each configuration's estimate from the engine's `StepTimeLearner` with its own
steps left out ("after": the prediction times the median measured / predicted ratio of the others).

    python bench/budget_real_size.py                                # every architecture, cold then warm
    python bench/budget_real_size.py --archs clip-b32,sam-vit-b
    python bench/budget_real_size.py --race --archs resnet50-cifar   # the "after" column (gpt-neo-125m too)
    python bench/budget_real_size.py --race --archs resnet50-cifar --tiny    # smoke test (about a minute)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from mpopt_hf import MemoryConfig
    from mpopt_hf.cost import FakeTensorCostModel
    from mpopt_hf.engine.step_times import StepTimeLearner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (batch, image side or None for the architecture's own). This benchmark's batches, smaller than the model
# cards' defaults (`memory_cards.architectures.ARCHITECTURES`) so that a CPU step stays within about a minute:
# SAM ViT-B at 256 px (not its native 1024: about 16x the encoder's work) and batch 4 (micro-batches 2 and 1).
BENCH: dict[str, tuple[int, int | None]] = {
    "vit-b16": (8, None),
    "clip-b32": (8, None),
    "gpt-neo-125m": (4, None),
    "resnet50-cifar": (64, None),
    "sam-vit-b": (4, 256),
}
RACE_FREEZE_RATES = [0.0, 0.25, 0.5, 0.75]  # one race candidate each: the fastest fitting of each trainable set
RACE_HEADROOM = 1.3  # covers an engine margin up to 23 % (the fit's uncertainty) beside the two copies
RACE_TRIAL_STEPS = 3  # a configuration's first step is tracked: 3 leave it 2 plain steps, the learner's minimum
MIB = 2**20


@dataclass(frozen=True)
class RunSpec:
    """One run: what to build, where the profile store is, how long and under which budget."""

    arch: str
    store: str
    steps: int
    race: bool = False
    tiny: bool = False


def search_space(batch: int, race: bool) -> dict[str, Any]:
    """`MPOptArguments` fields of the search: the race varies the trainable set, the default the memory knobs."""
    micro = sorted({max(1, batch // k) for k in (2, 4, 8)} | ({batch} if race else set()), reverse=True)
    if race:
        return {"micro_batch_sizes": micro, "freeze_rates": RACE_FREEZE_RATES, "checkpoint_segments": [0],
                "trial_steps": RACE_TRIAL_STEPS, "search_share": None}
    return {"micro_batch_sizes": micro, "freeze_rates": [0.0, 0.5], "checkpoint_segments": [0, 2], "trial_steps": 2,
            "search_share": None}


def choose_budget(model: nn.Module, fake: FakeTensorCostModel, batch: int, space: dict[str, Any],
                  race: bool) -> dict[str, float]:
    """The run's budget (MiB) from the fake-tensor peaks, with what it was derived from."""
    from mpopt_hf import MemoryConfig
    from mpopt_hf.callback.setup import host_copy_bytes

    whole = fake.peak_mib(MemoryConfig(batch))
    smallest = min(fake.peak_mib(MemoryConfig(m, f, k)) for m in space["micro_batch_sizes"]
                   for f in space["freeze_rates"] for k in space["checkpoint_segments"])
    copy = host_copy_bytes(model, None, batch) / MIB  # Adam-like: weights + two moments (the fit refines it)
    budget = RACE_HEADROOM * (whole + 2 * copy) if race else (smallest / 0.85 + whole) / 2
    return {"budget_mib": budget, "whole_batch_predicted_mib": whole, "smallest_predicted_mib": smallest,
            "copy_estimate_mib": copy}


def held_out_estimate(learner: StepTimeLearner, config: MemoryConfig) -> float | None:
    """``config``'s step seconds as the engine would price it had it never run: its prediction times the median
    measured / predicted ratio of the *other* configurations (None when no other was seen enough)."""
    from mpopt_hf.engine.step_times import StepTimeLearner

    others = {c: s for c, s in learner.samples.items() if c != config}
    rest = StepTimeLearner(learner.predicted, learner.min_samples, others)
    return None if rest.ratio() is None else rest.corrected(config)


def step_time_errors(learner: StepTimeLearner) -> dict[str, Any]:
    """Per configuration that trained (plain steps only): predicted, measured mean, held-out estimate, and the
    median absolute errors before (the fit's prediction) and after (the held-out estimate)."""
    rows = []
    for config, seen in learner.samples.items():
        predicted = learner.predicted.get(config)
        if not predicted or seen.n < 1:
            continue
        after = held_out_estimate(learner, config)
        rows.append({"config": config.short(), "n": seen.n, "measured_s": seen.mean, "predicted_s": predicted,
                     "held_out_s": after, "before": abs(predicted / seen.mean - 1),
                     "after": None if after is None else abs(after / seen.mean - 1)})
    before = [r["before"] for r in rows]
    after = [r["after"] for r in rows if r["after"] is not None]
    return {"per_config": rows, "before": statistics.median(before) if before else None,
            "after": statistics.median(after) if after else None}


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks the tensors and keeps a flag (CLIP's ``return_loss``) a Python value: the default collator would make
    it a tensor of bools, which CLIP's ``if return_loss`` refuses."""
    import torch

    return {k: torch.stack([r[k] for r in rows]) if torch.is_tensor(v) else v for k, v in rows[0].items()}


def one_run(spec: RunSpec) -> dict[str, Any]:
    """One training run in this process (the parent runs each in its own)."""
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from memory_cards.architectures import build
    from mpopt_hf import MPOptArguments, MPOptTrainer
    from mpopt_hf.cost import FakeTensorCostModel
    from mpopt_hf.training.step_peak import process_peak_rss_bytes

    sys.path.insert(0, str(ROOT / "tests"))
    from trainer_utils import ListDataset

    torch.manual_seed(0)
    batch, size = BENCH[spec.arch]
    model, make = build(spec.arch, image_size=None if spec.tiny else size, tiny=spec.tiny)
    space = search_space(batch, spec.race)
    chosen = choose_budget(model, FakeTensorCostModel(model, make(batch)), batch, space, spec.race)
    rows: list[dict[str, Any]] = []

    class Log(TrainerCallback):  # what each step measured, and the race copies held while it ran
        raced = False

        def on_step_end(self, args, state, control, **kwargs):
            rows.append({"config": trainer.memory_config.short(), "peak": trainer.step_peak_bytes,
                         "held": sum(held() for held in trainer.peak_meter.held_bytes)})
            engine = trainer.mpopt_callback.engine
            self.raced = self.raced or engine.racing
            if spec.race and self.raced and not engine.racing:  # every trial has run: the race's figures are in
                control.should_training_stop = True

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=spec.steps,
                             learning_rate=1e-4, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    # peak_every_steps=steps: only each configuration's first step is tracked, the others are plain step times
    trainer = MPOptTrainer(model=model, args=args, train_dataset=ListDataset(make(batch * spec.steps)),
                           eval_dataset=ListDataset(make(batch)), data_collator=collate, callbacks=[Log()],
                           peak_every_steps=spec.steps,
                           mpopt_args=MPOptArguments(memory_budget_mib=chosen["budget_mib"], profile_store=spec.store,
                                                     **space))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    callback = trainer.mpopt_callback
    cost, engine = callback.cost_model, callback.engine
    fit = cost.profile.measurements
    errors = step_time_errors(engine.step_times)
    measured = [r for r in rows if r["peak"] is not None]
    return {
        "arch": spec.arch + (" (tiny)" if spec.tiny else ""), "race_mode": spec.race, "image_size": size,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch, **chosen,
        "engine_margin": engine.margin, "copy_mib": engine.copy_bytes / MIB,
        "setup_s": cost.seconds, "reused": cost.reused,
        "fit_measured": [m.config.short() for m in fit],
        "fit_max_peak_mib": max((m.peak_bytes for m in fit), default=0) / MIB,
        "step_peak_max_mib": max((r["peak"] for r in measured), default=0) / MIB,
        "held_max_mib": max((r["held"] for r in rows), default=0) / MIB,
        "held_at_tracked_max_mib": max((r["held"] for r in measured), default=0) / MIB,
        "over_budget_steps": sum(r["peak"] > chosen["budget_mib"] * MIB for r in measured),
        "rss_peak_mib": process_peak_rss_bytes() / MIB, "wall_s": wall, "steps": len(rows),
        "configs_run": sorted({r["config"] for r in rows}),
        "step_time_error_before": errors["before"], "step_time_error_after": errors["after"],
        "step_times": errors["per_config"],
        "decisions": [d.reason for d in engine.decisions],
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def table(results: list[dict[str, Any]]) -> str:
    head = ("| architecture | params (M) | batch | budget (MiB) | run | setup (s) | fit measured | fit max peak (MiB) "
            "| configs run | race copies held (MiB) | training max step peak (MiB) | measured steps over budget "
            "| peak RSS (MiB) "
            "| step-time error before / after |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(
            f"| {r['arch']} | {r['params_m']:.3g} | {r['batch']} | {r['budget_mib']:.0f} | "
            f"{'warm' if r['reused'] else 'cold'} | {r['setup_s']:.1f} | {len(r['fit_measured'])} | "
            f"{r['fit_max_peak_mib']:.0f} | {len(r['configs_run'])} | {r['held_max_mib']:.0f} | "
            f"{r['step_peak_max_mib']:.0f} | {r['over_budget_steps']} | {r['rss_peak_mib']:.0f} | "
            f"{_pct(r['step_time_error_before'])} / {_pct(r['step_time_error_after'])} |")
    return "\n".join(lines)


def notes(results: list[dict[str, Any]]) -> list[str]:
    """Per run: what ran and why, and each configuration's step times (what the errors are computed from)."""
    out = []
    for r in results:
        run = "warm" if r["reused"] else "cold"
        out.append(f"* {r['arch']} ({run}): ran {', '.join(r['configs_run'])} in {r['steps']} steps, "
                   f"{r['over_budget_steps']} measured steps over the budget; engine margin {r['engine_margin']:.1%}, "
                   f"one host copy {r['copy_mib']:.1f} MiB; first decision: {r['decisions'][0]}")
        for t in r["step_times"]:
            held = "-" if t["held_out_s"] is None else f"{t['held_out_s']:.2f} s"
            out.append(f"  * {t['config']}: measured {t['measured_s']:.2f} s (mean of {t['n']} plain steps), "
                       f"predicted {t['predicted_s']:.2f} s, from the others {held}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(BENCH))
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per run (default 6; --race: at most 40, the run stops when the race ends)")
    parser.add_argument("--race", action="store_true", help="a budget that lets the engine race with its copies")
    parser.add_argument("--tiny", action="store_true", help="the architectures' tiny variants (smoke tests)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None,
                        help="default bench/results/budget_real_size[_race].md (with --tiny: a temporary folder)")
    args = parser.parse_args(argv)
    steps = args.steps or (40 if args.race else 6)
    unknown = [a for a in (args.one or args.archs).split(",") if a not in BENCH]
    if unknown:
        parser.error(f"unknown architecture(s) {unknown}; known: {', '.join(BENCH)}")
    if args.one:
        print(json.dumps(one_run(RunSpec(args.one, args.store, steps, args.race, args.tiny))))
        return 0
    results = []
    flags = (["--race"] if args.race else []) + (["--tiny"] if args.tiny else [])
    for name in args.archs.split(","):
        store = str(Path(tempfile.mkdtemp()) / "profiles.sqlite")
        for run in ("cold", "warm"):
            out = subprocess.run([sys.executable, __file__, "--one", name, "--store", store, "--steps", str(steps),
                                  *flags], check=False, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{name} ({run}) failed:\n{out.stderr[-4000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            brief = {k: v for k, v in results[-1].items() if k not in ("decisions", "step_times")}
            print(json.dumps(brief), flush=True)
    text = table(results)
    print(text)
    command = "python bench/budget_real_size.py " + " ".join(argv if argv is not None else sys.argv[1:])
    name = "budget_real_size_race.md" if args.race else "budget_real_size.md"
    results_dir = Path(tempfile.mkdtemp()) if args.tiny else ROOT / "bench" / "results"  # a smoke test's stays out
    path = Path(args.out or results_dir / name)
    path.parent.mkdir(parents=True, exist_ok=True)
    title = "Step times after online correction (a race)" if args.race else "The budget on real-size architectures"
    path.write_text(f"# {title}\n\nCommand: `{command.strip()}`\n\n{text}\n\n" + "\n".join(notes(results)) + "\n\n"
                    "Raw figures:\n\n```json\n" + json.dumps(results, indent=1) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
