"""Does the budget hold for the whole process on real-size architectures? (issue 19)

Each architecture is built from its public config (random weights, nothing downloads) and trained by
`MPOptTrainer` under a budget half-way between its smallest configuration's predicted peak (with a 15 % margin) and its
whole-batch configuration's, twice: cold (empty
profile store: the fit measures) and warm (the fit comes from the store). Each run is its own process, so its
peak resident set is its own. Per run: setup seconds (the cost model's fit), what the fit measured and the
largest measured peak among those (against the budget), the largest per-step measured peak of training (MemTracker
on CPU, every step here), the process's peak RSS, and the step-time prediction error of the configurations that
trained: the fit's prediction against the mean of their untracked steps (before), and the learned estimate of
each configuration from the *other* configurations' steps (after: the machine's measured / predicted ratio).

    python bench/budget_real_size.py                       # every architecture, cold then warm
    python bench/budget_real_size.py --archs vit-b16 --steps 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS = {  # name: (batch, what the input is)
    "vit-b16": 8,
    "clip-b32": 8,
    "gpt-neo-125m": 4,
    "resnet50-cifar": 64,
}


def build(name: str):
    import torch
    import transformers as tf

    g = torch.Generator().manual_seed(0)
    if name == "vit-b16":  # ViTConfig's defaults are ViT-B/16 at 224 px
        model = tf.ViTForImageClassification(tf.ViTConfig(num_labels=10))
        make = lambda n: {"pixel_values": torch.randn(n, 3, 224, 224, generator=g),  # noqa: E731
                          "labels": torch.randint(0, 10, (n,), generator=g)}
    elif name == "clip-b32":  # CLIPConfig's defaults are ViT-B/32 with its 12-layer text tower
        model = tf.CLIPModel(tf.CLIPConfig())
        make = lambda n: {"pixel_values": torch.randn(n, 3, 224, 224, generator=g),  # noqa: E731
                          "input_ids": torch.randint(3, 49000, (n, 16), generator=g), "return_loss": True}
    elif name == "gpt-neo-125m":  # EleutherAI/gpt-neo-125m's config
        model = tf.GPTNeoForCausalLM(tf.GPTNeoConfig(hidden_size=768, num_layers=12, num_heads=12,
                                                       attention_types=[[["global", "local"], 6]], max_position_embeddings=2048))
        def make(n):
            ids = torch.randint(0, 50257, (n, 128), generator=g)
            return {"input_ids": ids, "labels": ids.clone()}
    elif name == "resnet50-cifar":
        import small_cnn

        model = small_cnn.build("resnet50", num_labels=10)
        make = lambda n: {"pixel_values": torch.randn(n, 3, 32, 32, generator=g),  # noqa: E731
                          "labels": torch.randint(0, 10, (n,), generator=g)}
    else:
        raise SystemExit(f"unknown architecture {name!r}; known: {sorted(ARCHS)}")
    return model, make


def one_run(name: str, store: str, steps: int) -> dict:
    """One training run in this process (the parent runs each in its own)."""
    import torch
    from transformers import TrainerCallback, TrainingArguments

    from mpopt_hf import MemoryConfig, MPOptArguments, MPOptTrainer
    from mpopt_hf.cost import FakeTensorCostModel
    from mpopt_hf.step_peak import process_peak_rss_bytes

    sys.path.insert(0, str(ROOT / "tests"))
    from trainer_utils import ListDataset

    torch.manual_seed(0)
    batch = ARCHS[name]
    model, make = build(name)
    space = dict(micro_batch_sizes=sorted({max(1, batch // k) for k in (2, 4, 8)}, reverse=True), freeze_rates=[0.0, 0.5],
                 checkpoint_segments=[0, 2], trial_steps=2, search_share=None)
    fake = FakeTensorCostModel(model, make(batch))
    whole = fake.peak_mib(MemoryConfig(batch))
    smallest = min(fake.peak_mib(MemoryConfig(m, f, k)) for m in space["micro_batch_sizes"]
                   for f in space["freeze_rates"] for k in space["checkpoint_segments"])
    budget = (smallest / 0.85 + whole) / 2  # under the whole batch, above what the smallest needs with a margin
    rows = []

    class Log(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            rows.append({"config": trainer.memory_config, "peak": trainer._step_peak_bytes,
                         "tracked": trainer.peak_meter.slowed, "step_s": time.perf_counter() - self.start})

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=1e-4, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    trainer = MPOptTrainer(model=model, args=args, train_dataset=ListDataset(make(batch * steps)),
                           eval_dataset=ListDataset(make(batch)), callbacks=[Log()], peak_every_steps=steps,
                           mpopt_args=MPOptArguments(memory_budget_mib=budget, profile_store=store, **space))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    cost = trainer.mpopt_callback.cost_model
    measured = {}
    for r in rows:
        if not r["tracked"]:
            measured.setdefault(r["config"], []).append(r["step_s"])
    means = {c: statistics.mean(t) for c, t in measured.items()}
    predicted = {c: cost.predict(c)[1] for c in means}
    before = [abs(predicted[c] / means[c] - 1) for c in means if predicted[c]]
    after = []
    for c in means:  # from the other configurations' steps only
        ratios = [means[o] / predicted[o] for o in means if o != c and predicted[o]]
        if ratios and predicted[c]:
            after.append(abs(predicted[c] * statistics.median(ratios) / means[c] - 1))
    fit = cost.profile.measurements
    return {
        "arch": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch,
        "budget_mib": budget, "whole_batch_predicted_mib": whole, "smallest_predicted_mib": smallest, "setup_s": cost.seconds, "reused": cost.reused,
        "fit_measured": [m.config.short() for m in fit],
        "fit_max_peak_mib": max((m.peak_bytes for m in fit), default=0) / 2**20,
        "step_peak_max_mib": max((r["peak"] for r in rows if r["peak"] is not None), default=0) / 2**20,
        "rss_peak_mib": process_peak_rss_bytes() / 2**20, "wall_s": wall,
        "configs_run": sorted({r["config"].short() for r in rows}),
        "step_time_error_before": statistics.median(before) if before else None,
        "step_time_error_after": statistics.median(after) if after else None,
        "decisions": [d.reason for d in trainer.mpopt_callback.engine.decisions],
    }


def table(results: list[dict]) -> str:
    head = ("| architecture | params (M) | batch | budget (MiB) | run | setup (s) | fit measured | fit max peak (MiB) "
            "| training max step peak (MiB) | peak RSS (MiB) | step-time error before / after |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        err = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
        lines.append(
            f"| {r['arch']} | {r['params_m']:.1f} | {r['batch']} | {r['budget_mib']:.0f} | "
            f"{'warm' if r['reused'] else 'cold'} | {r['setup_s']:.1f} | {len(r['fit_measured'])} | "
            f"{r['fit_max_peak_mib']:.0f} | {r['step_peak_max_mib']:.0f} | {r['rss_peak_mib']:.0f} | "
            f"{err(r['step_time_error_before'])} / {err(r['step_time_error_after'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "budget_real_size.md"))
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_run(args.one, args.store, args.steps)))
        return 0
    results = []
    for name in args.archs.split(","):
        store = str(Path(tempfile.mkdtemp()) / "profiles.sqlite")
        for _ in ("cold", "warm"):
            out = subprocess.run([sys.executable, __file__, "--one", name, "--store", store, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "decisions"}), flush=True)
    text = table(results)
    print(text)
    command = "python bench/budget_real_size.py " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(f"# The budget on real-size architectures\n\nCommand: `{command.strip()}`\n\n{text}\n\n"
                              + "\n".join(f"* {r['arch']} ({'warm' if r['reused'] else 'cold'}): ran "
                                          f"{', '.join(r['configs_run'])}; first decision: {r['decisions'][0]}"
                                          for r in results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
