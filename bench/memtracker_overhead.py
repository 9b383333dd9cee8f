"""What the CPU per-step peak costs: MPOptTrainer's step with MemTracker on every step, every ``rate``-th, and off.

On a CPU the trainer measures a step's tensor bytes with MemTracker (`mpopt_hf.training.step_peak.StepPeakMeter`) on the
first step of each configuration and every ``peak_every_steps`` (10) after it. MemTracker intercepts every op, so a
tracked step is slower; how much depends on how many ops a step runs per second of arithmetic, which is why a tiny
model (Python and dispatch overhead dominate) is measured beside real-size ones.

One `MPOptTrainer` run per model, its configuration fixed (the whole batch), steps in blocks of one mode each:
``every`` (every step tracked), ``off`` (none), ``rate`` (``rate`` consecutive steps of the trainer's own sampling,
one tracked). Each repetition runs one block of each, in an order rotated between repetitions, so that machine
load falls on all modes alike; a warm-up block of one step per mode comes first and is not counted (an untracked
meter's first step is tracked, as in training). A step's seconds are the meter's own: from `begin_step` to
`end_step` (forward, backward and the optimizer step; not the data loader).

Reported per model, over the repetitions (mean and 95 % interval, `report.mean_interval`): each mode's mean step
seconds, the ratio tracked / untracked (``every`` / ``off``), and the amortised overhead at the sampling rate,
measured (``rate`` / ``off`` - 1) and as the ratio predicts it (``(every / off - 1) / rate``).

    python bench/memtracker_overhead.py                                         # the three default models
    python bench/memtracker_overhead.py --models tiny-vit-b16:8 --reps 3 --block 2 --rate 4   # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from report import mean_interval, write_report  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from mpopt_hf import MemoryConfig, MPOptTrainer  # noqa: E402
from mpopt_hf.training.step_peak import StepPeakMeter  # noqa: E402

MODES = ("every", "off", "rate")
DEFAULT_MODELS = "resnet50-cifar:64,vit-b16:8,tiny-vit-b16:8"
NEVER = 10**9  # a sampling period no run reaches: after its first step, the meter tracks nothing


@dataclass(frozen=True)
class Setup:
    """What one model's measurement runs: ``block`` steps per ``every``/``off`` block, ``rate`` per ``rate`` block."""

    name: str
    batch: int
    reps: int = 5
    block: int = 2
    rate: int = 10
    modes: tuple[str, ...] = MODES  # without "rate": the overhead at the rate is only predicted (fewer steps)

    def schedule(self) -> list[tuple[int, str]]:
        """(repetition, mode) of every step; repetition -1 is the warm-up."""
        steps = [(-1, mode) for mode in self.modes]
        for rep in range(self.reps):
            turn = rep % len(self.modes)
            for mode in self.modes[turn:] + self.modes[:turn]:
                steps += [(rep, mode)] * (self.rate if mode == "rate" else self.block)
        return steps


@dataclass
class StepLog(TrainerCallback):
    """Puts each step's meter in place before it runs and records its seconds and whether it was tracked."""

    meters: dict[str, StepPeakMeter]
    schedule: list[tuple[int, str]]
    trainer: Any = None
    rows: list[tuple[int, str, bool, float]] = field(default_factory=list)
    _before: float = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        _, mode = self.schedule[state.global_step]
        self.trainer.peak_meter = meter = self.meters[mode]
        self._before = meter.overhead.tracked_s + meter.overhead.plain_s

    def on_step_end(self, args, state, control, **kwargs):
        rep, mode = self.schedule[state.global_step - 1]
        meter = self.meters[mode]
        seconds = meter.overhead.tracked_s + meter.overhead.plain_s - self._before
        self.rows.append((rep, mode, meter.slowed, seconds))


def build(name: str):
    """``(model, make_batch)``: a `memory_cards.architectures` name, or ``tiny-<name>`` for its tiny variant."""
    from memory_cards.architectures import build as build_arch

    tiny = name.startswith("tiny-")
    return build_arch(name.removeprefix("tiny-"), tiny=tiny)


def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks tensors; keeps a flag (CLIP's ``return_loss``) a Python value."""
    return {k: torch.stack([r[k] for r in rows]) if torch.is_tensor(v) else v for k, v in rows[0].items()}


def measure_model(setup: Setup) -> dict[str, Any]:
    """One model's interleaved run: per repetition, each mode's mean step seconds and tracked-step count."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from trainer_utils import ListDataset

    torch.manual_seed(0)
    model, make = build(setup.name)
    schedule = setup.schedule()
    device = torch.device("cpu")
    meters = {"every": StepPeakMeter(device, every=1), "off": StepPeakMeter(device, every=NEVER),
              "rate": StepPeakMeter(device, every=setup.rate)}
    log = StepLog(meters, schedule)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=setup.batch,
                             max_steps=len(schedule), learning_rate=1e-5, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    trainer = MPOptTrainer(model=model, args=args, train_dataset=ListDataset(make(setup.batch * 4)),
                           data_collator=collate, memory_config=MemoryConfig(setup.batch), callbacks=[log])
    log.trainer = trainer
    trainer.train()
    per_rep: dict[int, dict[str, list[float]]] = {}
    tracked: dict[str, list[int]] = {mode: [] for mode in MODES}
    for rep, mode, slowed, seconds in log.rows:
        if rep >= 0:
            per_rep.setdefault(rep, {m: [] for m in setup.modes})[mode].append(seconds)
    for rep in range(setup.reps):
        for mode in setup.modes:
            tracked[mode].append(sum(s for r, m, s, _ in log.rows if r == rep and m == mode))
    expected = {"every": setup.block, "off": 0, "rate": 1}
    if any(count != expected[mode] for mode in setup.modes for count in tracked[mode]):
        raise RuntimeError(f"{setup.name}: tracked steps per block {tracked}, expected {expected}")
    means = [{mode: statistics.fmean(times[mode]) for mode in setup.modes} for times in per_rep.values()]
    return {"model": setup.name, "batch": setup.batch, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "reps": setup.reps, "block": setup.block, "rate": setup.rate, "step_s": means,
            "every_over_off": [m["every"] / m["off"] for m in means],
            "rate_over_off": [m["rate"] / m["off"] for m in means] if "rate" in setup.modes else None,
            # what a training run reports (`trainer.peak_meter.overhead`), here from the "rate" blocks' meter
            "rate_meter_ratio": meters["rate"].overhead.ratio()}


def table(results: list[dict[str, Any]]) -> list[str]:
    rate = "/".join(str(r) for r in sorted({r["rate"] for r in results}))
    head = ("| model | params (M) | batch | untracked step (ms) | tracked step (ms) | tracked / untracked "
            f"| overhead with 1 step in {rate} tracked: measured | predicted from the ratio |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        ms = {mode: [1000 * m[mode] for m in r["step_s"]] for mode in ("every", "off")}
        measured = "-" if r["rate_over_off"] is None else mean_interval([v - 1 for v in r["rate_over_off"]])
        predicted = [(v - 1) / r["rate"] for v in r["every_over_off"]]
        lines.append(f"| {r['model']} | {r['params_m']:.3g} | {r['batch']} | {mean_interval(ms['off'])} | "
                     f"{mean_interval(ms['every'])} | {mean_interval(r['every_over_off'])} | "
                     f"{measured} | {mean_interval(predicted)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="NAME:BATCH,... (tiny-NAME: the tiny variant)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--block", type=int, default=2, help="steps per 'every' and 'off' block")
    parser.add_argument("--rate", type=int, default=10, help="the sampling period measured (the trainer's default)")
    parser.add_argument("--skip-rate", action="store_true",
                        help="no 'rate' blocks: the overhead at the rate is predicted from the ratio only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.reps < 2 or args.block < 1 or args.rate < 2:
        parser.error("--reps >= 2 (an interval), --block >= 1 and --rate >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for item in args.models.split(","):
        name, _, batch = item.partition(":")
        if not batch.isdigit():
            parser.error(f"--models takes NAME:BATCH, got {item!r}")
        modes = tuple(m for m in MODES if m != "rate") if args.skip_rate else MODES
        results.append(measure_model(Setup(name, int(batch), args.reps, args.block, args.rate, modes)))
        print(table(results)[-1], flush=True)
    command = "python bench/memtracker_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    environment = f"(torch {torch.__version__}, {torch.get_num_threads()} threads)"
    reading = ("Step times: the meter's own (forward, backward, optimizer step), mean of each block, mean ± 95 % "
               "interval over the repetitions; ratios are taken within each repetition. Overheads are shares of an "
               "untracked step (0.05: 5 % slower on average).")
    lines = ["# MemTracker's cost: the CPU per-step peak", "", f"Command: `{command.strip()}` {environment}", "",
             *table(results), "", reading]
    smoke = all(r["model"].startswith("tiny-") for r in results)  # a smoke test's report stays out of bench/results
    name = "memtracker_overhead_smoke.md" if smoke else "memtracker_overhead.md"
    write_report(lines, results, tempfile.mkdtemp() if smoke else args.out, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
