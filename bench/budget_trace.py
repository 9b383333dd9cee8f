"""A budget that halves for the middle third of a retraining: the engine, transformers' halving and fixed
configurations side by side (issue 14's budget-trace benchmark).

The setting of `engine_vs_baselines.py` (a tiny ResNet-18 pre-trained on clean digits, retrained on a corruption of
them), trained for the same number of epochs by every row. A co-located process takes half of the memory for the
middle third of the run (measured in training samples processed, a clock that a restart does not reset) and gives it
back. A CPU has no allocator to run out of, so a simulated device raises `torch.OutOfMemoryError` in the model's
forward whenever the configuration running there is predicted (on fake tensors) to need more than the budget now.
The error reads like PyTorch's own CPU allocator error, so accelerate's `find_executable_batch_size` (behind
transformers' ``auto_find_batch_size``) recognises it.

* mpopt:           MPOptTrainer, the budget a callable re-read every step (`memory_budget_mib`, `budget_every_steps=1`);
* mpopt_no_drop:   the same with the budget that never drops (what it would reach with all the time it wanted);
* mpopt/exact:     the same with freezing off (``freeze_rates=[0]``): only knobs that keep the maths, so every row
                   but the batch knob's learns what a plain Trainer at the whole batch learns, where it runs;
* mpopt/per_step:  the same with the gain counted per Trainer step (``gain_per="step"``), as fits a run of fixed
                   epochs: freezing is searched but has to learn more per step, not per second;
* mpopt/batch:     the same with the batch as a knob too (``effective_batch_sizes=[64, 16, 8]``, sqrt lr scaling):
                   what halving gains from more updates, chosen under the budget instead of after an error;
* mpopt/batch_exact: the batch knob with freezing off and the learning rate unscaled (``lr_scaling="none"``), as
                   halving runs its smaller batches;
* auto_find_batch: plain `Trainer(auto_find_batch_size=True)`: at each OOM it restarts its training loop from step 0
                   at 0.9 x the batch (accelerate's `find_executable_batch_size`; the weights keep what they
                   learned, the steps before are done again) and never grows back;
* fixed/default:   plain `Trainer` at the whole batch: crashes when the budget drops;
* fixed/safe:      the fastest configuration predicted to fit the lower budget, fixed for the whole run.

    python bench/budget_trace.py [--epochs 3] [--seeds 5] [--drop 0.5] [--out bench/results]
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
from torch._subclasses.fake_tensor import FakeTensor  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402
from engine_vs_baselines import BATCH, FakePeakCostModel, _args, accuracy, load_digits, shifted  # noqa: E402
from report import mean_interval, write_report  # noqa: E402
from transformers import Trainer  # noqa: E402

import small_cnn  # noqa: E402
from mpopt_hf import MemoryConfig, MPOptArguments, MPOptTrainer  # noqa: E402
from mpopt_hf.model.blocks import find_blocks  # noqa: E402
from mpopt_hf.engine import MIB  # noqa: E402
from mpopt_hf.engine.candidates import DecisionKind  # noqa: E402


class SimulatedDevice:
    """A device whose free memory follows a trace over the training samples processed, enforced in the forward.

    ``config_of()`` says which configuration is running (a plain Trainer: its whole batch; a short last batch
    counts as a whole one);
    the forward raises an out-of-memory error when that configuration's predicted peak exceeds the budget now.
    """

    def __init__(self, cost, full_bytes: float, drop: float, total_samples: int):
        self.cost, self.full, self.drop, self.total = cost, full_bytes, drop, total_samples
        self.samples, self.ooms, self.config_of = 0, 0, None

    def budget_bytes(self) -> float:
        position = self.samples / self.total
        return self.full * (self.drop if 1 / 3 <= position < 2 / 3 else 1.0)

    def attach(self, model: torch.nn.Module):
        return model.register_forward_pre_hook(self._check, with_kwargs=True)

    def _check(self, module, args, kwargs):
        pixels = kwargs["pixel_values"]
        if not module.training or isinstance(pixels, FakeTensor):
            return None  # the engine's probe evaluation, or the profiler's fake copy of the model (it has the hook)
        n = pixels.shape[0]
        config = self.config_of()
        if self.cost.predict(config.without_batch())[0] > self.budget_bytes():
            self.ooms += 1
            raise torch.OutOfMemoryError(
                f"DefaultCPUAllocator: can't allocate memory: simulated ({config.short()} needs more than "
                f"{self.budget_bytes() / MIB:.2f} MiB)")
        self.samples += n
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--corruption", default="fog")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--budget-share", type=float, default=1.1, help="the full budget, x the default's peak")
    parser.add_argument("--drop", type=float, default=0.5, help="the budget's share left in the middle third")
    parser.add_argument("--probe", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trial-steps", type=int, default=4)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ns = parser.parse_args()
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()

    train, test = load_digits("train"), load_digits("test")
    model = small_cnn.build("resnet18", **small_cnn.tiny_overrides("resnet18"))
    Trainer(model=model, args=_args(tmp, ns.pretrain_steps), train_dataset=train).train()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    s_all, s_test = shifted(train, ns.corruption, ns.severity), shifted(test, ns.corruption, ns.severity)
    s_val, s_train = s_all.select(range(ns.probe)), s_all.select(range(ns.probe, len(s_all)))
    shifted_acc = accuracy(model, s_test)

    n_blocks = find_blocks(model).n_blocks
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cost = FakePeakCostModel(model, {"pixel_values": s_train.x[:BATCH], "labels": s_train.y[:BATCH]}, optimizer)
    default = MemoryConfig(BATCH)
    b = BATCH
    while b >= 1:  # accelerate's find_executable_batch_size tries int(0.9 * b) next: predict them before any run
        cost.predict(MemoryConfig(b))
        b = int(b * 0.9)
    full_bytes = ns.budget_share * cost.predict(default)[0]
    micro, rates, segments = [64, 32, 16, 8], [0.0, 0.5], sorted({0, n_blocks // 2, n_blocks})
    usable_low = full_bytes * ns.drop * 0.95
    safe = next(MemoryConfig(m) for m in micro if cost.predict(MemoryConfig(m))[0] <= usable_low)
    total = int(ns.epochs * len(s_train))
    runs: dict[str, list[dict]] = {k: [] for k in ["mpopt", "mpopt_no_drop", "mpopt/exact", "mpopt/per_step", "mpopt/batch",
                                                   "mpopt/batch_exact",
                                                   "auto_find_batch", "fixed/default", f"fixed/safe ({safe.short()})"]}

    updates = [0]  # real optimizer updates of the run in progress (a batch split into several counts each)

    def count_update(optimizer, *_):
        first = optimizer.param_groups[0]["params"][0]
        if not isinstance(first, FakeTensor):  # the profiler's fake step creates optimizer state: not an update
            updates[0] += 1

    register_optimizer_step_post_hook(count_update)

    def finish(name, trainer, device, t0, crashed=None, **extra):
        runs[name].append({"accuracy": accuracy(model, s_test), "wall_s": time.perf_counter() - t0,
                           "ooms": device.ooms, "samples": device.samples, "crashed": crashed,
                           "steps": trainer.state.global_step, "updates": updates[0], **extra})
        updates[0] = 0

    def run_mpopt(name, seed, drop, freeze_rates=rates, batches=None, lr_scaling=None, gain_per="second"):
        model.load_state_dict(pretrained)
        device = SimulatedDevice(cost, full_bytes, drop, total)
        mpopt = MPOptArguments(memory_budget_mib=device.budget_bytes, budget_every_steps=1, micro_batch_sizes=micro,
                               freeze_rates=freeze_rates, checkpoint_segments=segments, precisions=["fp32"],
                               trial_steps=ns.trial_steps, effective_batch_sizes=batches,
                               lr_scaling=lr_scaling, gain_per=gain_per)
        trainer = MPOptTrainer(model=model, args=_args(tmp, -1, seed=seed, num_train_epochs=ns.epochs),
                               train_dataset=s_train, eval_dataset=s_val, mpopt_args=mpopt, cost_model=cost)
        device.config_of = lambda: trainer.memory_config
        hook, t0 = device.attach(model), time.perf_counter()
        try:
            trainer.train()
        finally:
            hook.remove()
        engine = trainer.mpopt_callback.engine
        finish(name, trainer, device, t0, sequence=[f"{d.step}:{MemoryConfig.from_dict(d.config).short()}:"
                                    f"{DecisionKind(d.kind).value}" for d in engine.decisions])

    def run_plain(name, seed, batch, config=None, auto=False):
        model.load_state_dict(pretrained)
        device = SimulatedDevice(cost, full_bytes, ns.drop, total)
        kw = {"auto_find_batch_size": True} if auto else {}
        trainer_cls, extra = (MPOptTrainer, {"memory_config": config}) if config is not None else (Trainer, {})
        trainer = trainer_cls(model=model, args=_args(tmp, -1, seed=seed, batch=batch, num_train_epochs=ns.epochs,
                                                      **kw), train_dataset=s_train, **extra)
        device.config_of = (lambda: config) if config is not None else (lambda: MemoryConfig(trainer._train_batch_size))
        hook, t0, crashed = device.attach(model), time.perf_counter(), None
        try:
            trainer.train()
        except torch.OutOfMemoryError:
            crashed = device.samples
        finally:
            hook.remove()
        finish(name, trainer, device, t0, crashed=crashed, final_batch=trainer._train_batch_size)

    for seed in range(ns.seeds):  # rows interleaved per seed: a change of machine load hits every row alike
        run_mpopt("mpopt", seed, ns.drop)
        run_mpopt("mpopt_no_drop", seed, 1.0)
        run_mpopt("mpopt/exact", seed, ns.drop, freeze_rates=[0.0])
        run_mpopt("mpopt/per_step", seed, ns.drop, gain_per="step")
        run_mpopt("mpopt/batch", seed, ns.drop, batches=[BATCH, 16, 8])
        run_mpopt("mpopt/batch_exact", seed, ns.drop, freeze_rates=[0.0], batches=[BATCH, 16, 8], lr_scaling="none")
        run_plain("auto_find_batch", seed, BATCH, auto=True)
        run_plain("fixed/default", seed, BATCH)
        run_plain(f"fixed/safe ({safe.short()})", seed, BATCH, config=safe)

    def mean(name, field):
        return statistics.fmean(float(r[field] or 0) for r in runs[name])

    lines = [
        "# A budget that halves for the middle third: mpopt, transformers' halving and fixed configurations",
        "",
        f"Command: `python bench/budget_trace.py {' '.join(sys.argv[1:])}` (torch {torch.__version__}, CPU, "
        f"{torch.get_num_threads()} threads; {ns.seeds} seeds per row, interleaved; mean ± 95 % interval).",
        "",
        f"Budget {full_bytes / MIB:.2f} MiB ({ns.budget_share} x the whole batch's predicted "
        f"{cost.predict(default)[0] / MIB:.2f} MiB), {ns.drop:.0%} of it from 1/3 to 2/3 of the {total} training "
        f"samples ({ns.epochs:g} epochs of {len(s_train)}); shift {ns.corruption}/{ns.severity}, accuracy before "
        f"retraining {shifted_acc:.3f}. Out-of-memory errors are simulated from fake-tensor predictions.",
        "",
        "| run | shifted test accuracy | OOM errors | crashed (runs) | samples trained | optimizer updates "
        "| final batch | wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rows in runs.items():
        crashed = sum(r["crashed"] is not None for r in rows)
        final = ", ".join(sorted({str(r.get("final_batch", "engine")) for r in rows}))
        lines.append(f"| {name} | {mean_interval([r['accuracy'] for r in rows])} | {mean(name, 'ooms'):.1f} | "
                     f"{crashed}/{len(rows)} | {mean(name, 'samples'):.0f} | {mean(name, 'updates'):.0f} | {final} | {mean(name, 'wall_s'):.1f} |")
    gap = mean("mpopt", "accuracy") - mean("mpopt_no_drop", "accuracy")
    lines += ["", f"mpopt - mpopt_no_drop = {100 * gap:+.1f} points; mpopt - auto_find_batch = "
              f"{100 * (mean('mpopt', 'accuracy') - mean('auto_find_batch', 'accuracy')):+.1f} points.",
              "", "mpopt's decisions (step:configuration:kind), first seed: " + ", ".join(runs["mpopt"][0]["sequence"])]
    summary = {"budget_mib": full_bytes / MIB, "drop": ns.drop, "total_samples": total, "safe": safe.short(),
               "shifted_acc_before": shifted_acc, "runs": runs, "torch": torch.__version__}
    write_report(lines, summary, ns.out, "budget_trace.md")


if __name__ == "__main__":
    main()
