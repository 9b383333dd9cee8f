"""The rule engine against fixed memory configurations, at equal wall-clock time, under a memory budget.

A tiny small_cnn ResNet-18 is trained on clean digits, then retrained on a shifted domain (the same digits
under a corruption). The budget is set below the default configuration's peak (whole batch, nothing frozen,
no checkpointing), so the default cannot run. Every run gets the same wall-clock seconds, evaluation and
search included. Peaks are predicted by the profiler on fake tensors (CPU has no allocator to run out of):

* mpopt:            MPOptTrainer(mpopt_args=...) choosing online among the pruned candidates;
* fixed/<config>:   every configuration the engine's pruning keeps, fixed for the whole run; the best of
                    them is the best fixed configuration in hindsight;
* auto_find_batch:  HF ``auto_find_batch_size``: halve the batch until it fits (here: predicted peak <= budget);
                    as in transformers, the halved batch *is* the batch: no accumulation, more optimizer steps;
* full_ckpt:        every trainable block checkpointed, the largest micro-batch that fits;
* head_only:        freeze_rate=1.0 (only the classifier trains), the largest micro-batch that fits.

With ``--batches 64 16 8`` the batch is a knob too (``MPOptArguments.effective_batch_sizes``, learning rate
scaled by ``--lr-scaling``): the engine chooses among them, and the fixed rows cover the grid including the
batch (each smaller batch run through the same knob: the loader yields 64, split into equal updates).

A row whose configuration another row already runs is not run twice: it names that row. Every run stops
at the first step end after ``--seconds`` (`mpopt_hf.WallClockLimit`); the engine plans its search for
that slot (a race that would cost more than its search share of the time left is not run).

    python bench/engine_vs_baselines.py [--seconds 20] [--corruption fog] [--severity 5] [--batches 64 16 8]
                                        [--seeds 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from report import mean_interval, write_report  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import small_cnn  # noqa: E402
import vision  # noqa: E402
from mpopt_hf import MemoryConfig, MPOptArguments, MPOptTrainer, WallClockLimit  # noqa: E402
from mpopt_hf.model.blocks import find_blocks  # noqa: E402
from mpopt_hf.engine import MIB, Candidate, enumerate_configs, prune  # noqa: E402
from mpopt_hf.profiler import predict_step  # noqa: E402

BATCH = 64


class FakePeakCostModel:
    """Peak bytes predicted by the profiler on fake tensors; no step-time prediction. Its time is kept."""

    def __init__(self, model, batch, optimizer):
        self.model, self.batch, self.optimizer, self.cache, self.seconds = model, batch, optimizer, {}, 0.0

    def predict(self, config):
        if config not in self.cache:
            start = time.perf_counter()
            self.cache[config] = predict_step(self.model, self.batch, config, self.optimizer).peak_bytes
            self.seconds += time.perf_counter() - start
        return float(self.cache[config]), None


class UpdateCounter(TrainerCallback):
    """Optimizer updates made: a Trainer step under a smaller batch per update holds several."""

    def __init__(self):
        self.trainer, self.updates = None, 0

    def on_step_end(self, args, state, control, **kwargs):
        config = self.trainer.memory_config
        self.updates += args.per_device_train_batch_size // (config.batch_size or args.per_device_train_batch_size)


def _args(out, steps, seed=0, batch=BATCH, **kw):
    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, per_device_eval_batch_size=256, max_steps=steps,
        learning_rate=3e-3, weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        seed=seed, dataloader_num_workers=0, disable_tqdm=True, **kw,
    )


class TensorRows(torch.utils.data.Dataset):
    """``pixel_values``/``labels`` tensors as rows (fast; the corrupted copy need not go through Arrow)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}

    def select(self, indices):
        indices = list(indices)
        return TensorRows(self.x[indices], self.y[indices])


def load_digits(split: str) -> TensorRows:
    data = vision.load("digits", split=split).with_format("torch")[:]
    return TensorRows(data["pixel_values"].float(), data["labels"].long())


def accuracy(model, data: TensorRows) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(pixel_values=data.x).logits.argmax(-1) == data.y).float().mean())


def shifted(data: TensorRows, corruption: str, severity: int) -> TensorRows:
    return TensorRows(torch.as_tensor(vision.corrupt(data.x, corruption, severity=severity, seed=0)).float(), data.y)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--pretrain-steps", type=int, default=60)
    parser.add_argument("--corruption", default="fog")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--budget-share", type=float, default=0.6, help="budget as a share of the default config's peak")
    parser.add_argument("--probe", type=int, default=128, help="shifted training images held out as the engine's probe")
    parser.add_argument("--seeds", type=int, default=3, help="runs per row (different data order), interleaved")
    parser.add_argument("--trial-steps", type=int, default=4)
    parser.add_argument("--search-share", type=float, default=0.1, help="the issue's search-cost target")
    parser.add_argument("--batches", type=int, nargs="+", default=[BATCH],
                        help="batches per update the engine may choose (the loader's is 64); default: only 64")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="freeze rates searched")
    parser.add_argument("--gain", default="val_accuracy", choices=["val_accuracy", "train_loss"],
                        help="the engine's gain signal: accuracy on the probe, or the training loss (no evaluation)")
    parser.add_argument("--lr-scaling", default="sqrt", choices=["none", "linear", "sqrt"])
    parser.add_argument("--gain-per", default="second", choices=["second", "step"],
                        help="what the engine divides a trial's gain by (MPOptArguments.gain_per)")
    parser.add_argument("--only-mpopt", action="store_true",
                        help="run only the engine's row (e.g. to compare two versions of the code side by side)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ns = parser.parse_args()
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()

    train, test = load_digits("train"), load_digits("test")
    model = small_cnn.build("resnet18", **small_cnn.tiny_overrides("resnet18"))
    Trainer(model=model, args=_args(tmp, ns.pretrain_steps), train_dataset=train).train()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    clean_acc = accuracy(model, test)

    s_all = shifted(train, ns.corruption, ns.severity)
    s_test = shifted(test, ns.corruption, ns.severity)
    s_val = s_all.select(range(ns.probe))  # the engine's labelled probe, held out of every run's training data
    s_train = s_all.select(range(ns.probe, len(s_all)))
    shifted_acc = accuracy(model, s_test)

    n_blocks = find_blocks(model).n_blocks
    batch = {"pixel_values": s_train.x[:BATCH], "labels": s_train.y[:BATCH]}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cost = FakePeakCostModel(model, batch, optimizer)
    default = MemoryConfig(BATCH)
    budget_mib = ns.budget_share * cost.predict(default)[0] / MIB
    micro = [64, 32, 16, 8]
    rates = ns.rates
    segments = sorted({0, n_blocks // 2, n_blocks})
    update_batches = [None] + sorted({b for b in ns.batches if b != BATCH}, reverse=True)
    space = enumerate_configs(micro, rates, segments, ["fp32"], n_blocks, batch_sizes=update_batches)
    cands = [Candidate(c, *cost.predict(c.without_batch())) for c in space]
    survivors = prune(cands, budget_mib * MIB, 0.05, has_batchnorm=True, bn_min_micro_batch=8, effective_batch=BATCH)
    usable = budget_mib * MIB * 0.95

    def fits(c):
        return cost.predict(c.without_batch())[0] <= usable

    auto = default
    while not fits(auto) and auto.micro_batch_size > 1:
        auto = auto.replace(micro_batch_size=auto.micro_batch_size // 2)
    full = next(MemoryConfig(m, checkpoint_segments=n_blocks) for m in micro if fits(MemoryConfig(m, checkpoint_segments=n_blocks)))
    head = next(MemoryConfig(m, freeze_rate=1.0) for m in micro if fits(MemoryConfig(m, freeze_rate=1.0)))

    # (configuration, batch): auto_find_batch trains at its halved batch; every other row keeps BATCH
    plan = {f"fixed/{c.config.short()}": (c.config, BATCH) for c in survivors}
    plan.update({"auto_find_batch": (auto, auto.micro_batch_size), "full_ckpt": (full, BATCH), "head_only": (head, BATCH)})
    same_as = {}  # a row whose configuration and batch an earlier row runs: reported, not run twice
    for name, setting in plan.items():
        first = next(n for n, s in plan.items() if s == setting)
        if first != name:
            same_as[name] = first
    runs: dict[str, list[dict]] = {name: [] for name in ["mpopt", *plan]}

    def run_fixed(name, config, batch, seed):
        model.load_state_dict(pretrained)
        limit = WallClockLimit(ns.seconds)
        trainer = MPOptTrainer(model=model, args=_args(tmp, 10**6, seed=seed, batch=batch), train_dataset=s_train,
                               memory_config=config, callbacks=[limit], lr_scaling=ns.lr_scaling)
        t0 = time.perf_counter()
        limit.start()  # the slot counts what runs before the first step too (the engine's setup)
        trainer.train()
        updates = trainer.state.global_step * (batch // (config.batch_size or batch))
        runs[name].append({"config": config.short(), "batch": config.batch_size or batch, "steps": updates,
                           "wall_s": time.perf_counter() - t0, "accuracy": accuracy(model, s_test),
                           "predicted_peak_mib": cost.predict(config.without_batch())[0] / MIB})

    def run_mpopt(seed):
        model.load_state_dict(pretrained)
        limit = WallClockLimit(ns.seconds)
        mpopt = MPOptArguments(memory_budget_mib=budget_mib, micro_batch_sizes=micro, freeze_rates=rates,
                               checkpoint_segments=segments, precisions=["fp32"], trial_steps=ns.trial_steps,
                               effective_batch_sizes=ns.batches if len(ns.batches) > 1 else None,
                               lr_scaling=ns.lr_scaling if len(ns.batches) > 1 else None,
                               trial_max_s=ns.seconds / 15, search_share=ns.search_share, gain_metric=ns.gain,
                               gain_per=ns.gain_per)
        counter = UpdateCounter()
        trainer = MPOptTrainer(model=model, args=_args(tmp, 10**6, seed=seed), train_dataset=s_train,
                               eval_dataset=s_val, mpopt_args=mpopt, cost_model=cost,
                               callbacks=[limit, counter])
        counter.trainer = trainer
        t0 = time.perf_counter()
        limit.start()  # the slot counts what runs before the first step too (the engine's setup)
        trainer.train()
        wall = time.perf_counter() - t0
        engine = trainer.mpopt_callback.engine
        ran = [MemoryConfig.from_dict(d.config) for d in engine.decisions]
        updates = counter.updates
        runs["mpopt"].append({
            "config": "online", "batch": "chosen" if len(ns.batches) > 1 else BATCH,
            "steps": updates or trainer.state.global_step, "wall_s": wall, "accuracy": accuracy(model, s_test),
            "search_share": (engine.search_seconds + engine.discarded_seconds) / wall,
            "eval_share": engine.search_seconds / wall, "discarded_share": engine.discarded_seconds / wall,
            "decisions": len(ran), "final": engine.current.short(),
            "max_predicted_peak_mib": max(cost.predict(c.without_batch())[0] for c in ran) / MIB,
            "sequence": [f"{d.step}:{MemoryConfig.from_dict(d.config).short()}:{d.reason}" for d in engine.decisions],
            # the last race's trials: gain, metric at the end, seconds, standard error, metric projected ahead
            "last_race": {c.short(): vars(t) for c, t in engine.race_trials.items()},
        })

    # rows interleaved per seed, so that a change of machine load hits every row alike
    for seed in range(ns.seeds):
        run_mpopt(seed)
        for name, (config, batch) in plan.items():
            if name not in same_as and not ns.only_mpopt:
                run_fixed(name, config, batch, seed)
    if ns.only_mpopt:
        accs = [r["accuracy"] for r in runs["mpopt"]]
        lines = [f"mpopt only: shifted test accuracy {mean_interval(accs)} over {ns.seeds} seed(s): "
                 + ", ".join(f"{a:.3f}" for a in accs), "finals: " + ", ".join(r["final"] for r in runs["mpopt"])]
        write_report(lines, {"runs": runs["mpopt"]}, ns.out, "engine_mpopt_only.md")
        return
    for name, first in same_as.items():
        runs[name] = runs[first]

    def mean(name, field):
        return statistics.fmean(r[field] for r in runs[name])

    def spread(name):
        return mean_interval([r["accuracy"] for r in runs[name]])

    best_fixed = max((k for k in runs if k.startswith("fixed/")), key=lambda k: mean(k, "accuracy"))
    summary = {
        "seconds": ns.seconds, "seeds": ns.seeds, "corruption": f"{ns.corruption}/{ns.severity}", "budget_mib": budget_mib,
        "default_peak_mib": cost.predict(default)[0] / MIB, "clean_acc_before": clean_acc, "batches": ns.batches,
        "lr_scaling": ns.lr_scaling, "gain_per": ns.gain_per,
        "shifted_acc_before": shifted_acc, "best_fixed": best_fixed, "prediction_s": cost.seconds,
        "n_configs_predicted": len(space), "same_as": same_as, "runs": runs, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    m = runs["mpopt"]
    share = statistics.fmean(r["search_share"] for r in m)
    lines = [
        "# Rule engine vs fixed configurations (equal wall-clock, memory budget)",
        "",
        f"Command: `python bench/engine_vs_baselines.py {' '.join(sys.argv[1:])}` (torch {torch.__version__}, CPU, "
        f"{torch.get_num_threads()} threads).",
        "",
        f"budget {budget_mib:.2f} MiB (default mb{BATCH}/f0/ckpt0 needs {summary['default_peak_mib']:.2f} MiB, predicted on "
        f"fake tensors); {ns.seconds:.0f} s wall-clock per run, {ns.seeds} seed(s) per row (mean ± 95 % interval); shift "
        f"{ns.corruption}/{ns.severity}; source model pre-trained {ns.pretrain_steps} steps; the engine's probe: "
        f"{ns.probe} shifted images held out of training; accuracy before retraining: clean {clean_acc:.3f}, "
        f"shifted {shifted_acc:.3f}",
        "",
        "| run | configuration | batch | optimizer updates (mean) | shifted test accuracy | predicted peak MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, rows in runs.items():
        peak = max(r.get("predicted_peak_mib", r.get("max_predicted_peak_mib")) for r in rows)
        label = name + (" (best fixed)" if name == best_fixed else "") + (f" (= {same_as[name]})" if name in same_as else "")
        lines.append(f"| {label} | {rows[0]['config']} | {rows[0]['batch']} | "
                     f"{mean(name, 'steps'):.0f} | {spread(name)} | {peak:.2f} |")
    gap_best = mean("mpopt", "accuracy") - mean(best_fixed, "accuracy")
    gap_auto = mean("mpopt", "accuracy") - mean("auto_find_batch", "accuracy")
    lines += [
        "",
        f"mpopt - best fixed = {100 * gap_best:+.1f} points (target >= -1); mpopt - auto_find_batch = "
        f"{100 * gap_auto:+.1f} points (target >= +3).",
        f"mpopt search cost: {share:.1%} of its wall-clock (target <= 10%): gain-metric evaluations "
        f"{statistics.fmean(r['eval_share'] for r in m):.1%}, race trials whose weights were discarded "
        f"{statistics.fmean(r['discarded_share'] for r in m):.1%}; predicting the "
        f"{len(space)} configurations' peaks took {cost.seconds:.1f} s before the runs "
        f"({cost.seconds / ns.seconds:.1%} of one run). Final configurations: "
        f"{', '.join(r['final'] for r in m)}; decisions per run: {', '.join(str(r['decisions']) for r in m)}.",
    ]
    write_report(lines, summary, ns.out, "engine_vs_baselines.md")


if __name__ == "__main__":
    main()
