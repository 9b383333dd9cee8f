"""Online CLIP retraining over the default corruption stream: mpopt against the baselines, at equal time.

Every run starts from the same source model and retrains each task of the stream for the same wall-clock
seconds (``--seconds-per-task``, the engine's evaluations included) under the same memory budget; rows are
interleaved per seed so that a change of machine load hits every row alike. The fixed rows are the
configurations the engine's own pruning keeps (one per trainable set: the fastest that fits), so the best
of them is the best fixed configuration in hindsight. transformers' ``auto_find_batch_size`` trains at the
batch it halved to (more optimizer steps per second, another learning setting), while mpopt keeps the
effective batch by design; so mpopt also runs at that halved batch (row ``mpopt @ batch N``), to tell the
batch's share of the gap from the engine's.

mpopt keeps its profile (the fitted memory model) in a profile store, as a device that retrains again and
again does: one warm-up run fills it before the measured rows (the profile is keyed by model, per-sample
input shape, optimizer and device, so the halved batch's row reuses it too), and the fit it saves is
reported (``--cold-profile`` measures mpopt paying the fit in its first task instead).

    python bench/online_baselines.py [--seconds-per-task 8] [--seeds 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from report import mean_interval, write_report  # noqa: E402

from clip_online.run import default_budget_mib, load_stream, main as run_recipe, parse, source_model  # noqa: E402
from mpopt_hf.model.blocks import find_blocks  # noqa: E402
from mpopt_hf.config import MemoryConfig  # noqa: E402
from mpopt_hf.cost import FakeTensorCostModel  # noqa: E402
from mpopt_hf.engine import Candidate, enumerate_configs, prune  # noqa: E402


def pruned_configs(argv: list[str]) -> list[MemoryConfig]:
    """The configurations the engine keeps for the recipe's model, space and budget (its own rules)."""
    model_args, data_args, run_args, mpopt_args, training_args = parse(argv)
    names, source, targets = load_stream(data_args)
    model = source_model(model_args, names, source, training_args)
    budget, _ = default_budget_mib(model, targets[0].train, training_args, run_args.budget_fraction)
    rows = targets[0].train.with_format("torch")[: training_args.per_device_train_batch_size]
    cost = FakeTensorCostModel(model, dict(rows), lr=training_args.learning_rate)
    n_blocks = find_blocks(model).n_blocks
    space = enumerate_configs(mpopt_args.micro_batch_sizes, mpopt_args.freeze_rates, mpopt_args.checkpoint_segments,
                              ["fp32"], n_blocks)
    cands = [Candidate(c, *cost.predict(c)) for c in space]
    return [c.config for c in prune(cands, budget * 2**20, mpopt_args.safety_margin)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds-per-task", type=float, default=8.0)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--cold-profile", action="store_true", help="no warm-up: mpopt fits its profile in every run")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ns = parser.parse_args()
    work = tempfile.mkdtemp()
    # a fixed budget: the default stream's budget trace places its points by steps, which a time slot does not have
    common = ["--seconds_per_task", str(ns.seconds_per_task), "--max_steps", "1000000", "--measure_peak", "true",
              "--budget_trace", "none"]
    fixed = pruned_configs(["--output_dir", work])
    store = [] if ns.cold_profile else ["--profile_store", os.path.join(work, "profiles.sqlite")]
    plan = {"mpopt": ["--baseline", "mpopt", *store], "none": ["--baseline", "none"]}
    plan.update({f"fixed/{c.short()}": ["--baseline", "fixed", "--fixed_config", c.short()] for c in fixed})
    plan.update({"auto_find_batch_size": ["--baseline", "auto_find_batch_size"],
                 "full_checkpointing": ["--baseline", "full_checkpointing"]})
    runs: dict[str, list[dict]] = {name: [] for name in plan}

    def run_row(name, flags, seed):
        out = os.path.join(work, f"{name.replace('/', '_').replace(' ', '')}-{seed}")
        result = run_recipe(common + flags + ["--output_dir", out, "--seed", str(seed)])
        s, tasks = result["summary"], result["tasks"]
        runs.setdefault(name, []).append({
            "mean_accuracy_before": s["mean_accuracy_before"], "mean_accuracy_after": s["mean_accuracy_after"],
            "train_seconds": s["train_seconds"], "search_seconds": s["search_seconds"],
            "steps": sum(t["steps"] for t in tasks), "max_measured_peak_mib": s["max_measured_peak_mib"],
            "budget_mib": s["budget_mib"], "within_budget": s["within_budget"],
            "configs": sorted({MemoryConfig.from_dict(c).short() for t in tasks for c in t["configs"]}),
        })
        return s, tasks

    fit_seconds = None
    if store:  # one untimed task fits the profile and stores it
        warm = run_recipe(common + plan["mpopt"] + ["--output_dir", os.path.join(work, "warm-up"), "--corruptions", "fog"])
        fit_seconds = warm["tasks"][0]["search_seconds"]
    for seed in range(ns.seeds):
        for name, flags in plan.items():
            summary, tasks = run_row(name, flags, seed)
            if name == "auto_find_batch_size":  # mpopt at the batch halving ended at, under the same budget
                halved = MemoryConfig.from_dict(tasks[0]["configs"][0]).micro_batch_size
                run_row(f"mpopt @ batch {halved}", ["--baseline", "mpopt", "--per_device_train_batch_size", str(halved),
                                                   "--memory_budget_mib", str(summary["budget_mib"]), *store], seed)

    def mean(name, field):
        return statistics.fmean(r[field] for r in runs[name])

    def accuracy(name):
        return mean_interval([r["mean_accuracy_after"] for r in runs[name]])

    budget = runs["mpopt"][0]["budget_mib"]
    lines = [
        "# Online CLIP retraining: mpopt vs baselines at equal time",
        "",
        f"Command: `python bench/online_baselines.py {' '.join(sys.argv[1:])}` (torch {torch.__version__}, CPU, "
        f"{torch.get_num_threads()} threads). The recipe's offline default (its small CLIP, digits, 5 corruptions "
        f"at severity 5) at a fixed budget of {budget:.2f} MiB (no budget trace: it places its points by steps), "
        f"{ns.seconds_per_task:g} s of retraining per task, {ns.seeds} seed(s) per row, interleaved (mean ± 95 % "
        "interval over seeds of the mean accuracy over the 5 tasks).",
        "",
        "| run | configurations used | steps (5 tasks) | mean accuracy after | max measured peak MiB | search s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name in runs:
        peak = max((r["max_measured_peak_mib"] or 0.0) for r in runs[name])
        configs = sorted({c for r in runs[name] for c in r["configs"]})
        lines.append(f"| {name} | {', '.join(configs) or '-'} | {mean(name, 'steps'):.0f} | {accuracy(name)} | "
                     f"{peak:.2f} | {mean(name, 'search_seconds'):.1f} |")
    baselines = [n for n in runs if n != "none" and not n.startswith("mpopt")]
    best = max(baselines, key=lambda n: mean(n, "mean_accuracy_after"))
    gap = mean("mpopt", "mean_accuracy_after") - mean(best, "mean_accuracy_after")
    lines += [
        "",
        f"Before retraining: {runs['none'][0]['mean_accuracy_before']:.3f}. mpopt - best baseline ({best}) = "
        f"{100 * gap:+.1f} points (target >= -1).",
    ]
    if fit_seconds is not None:
        lines.append(f"mpopt ran with a warm profile store; fitting it cost {fit_seconds:.1f} s of search in the "
                     "warm-up run's task (once per model, input shape, optimizer and device).")
    for name in [n for n in runs if n.startswith("mpopt @ batch")]:
        same_batch = mean(name, "mean_accuracy_after") - mean("auto_find_batch_size", "mean_accuracy_after")
        lines.append(f"At auto_find_batch_size's own batch, {name} - auto_find_batch_size = {100 * same_batch:+.1f} points.")
    write_report(lines, runs, ns.out, "online_baselines.md")


if __name__ == "__main__":
    main()
