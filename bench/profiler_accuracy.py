"""How well the memory model predicts configurations it never measured.

For each model: fit the memory model (fake-tensor traces + at most 3 measured configurations),
then, on a grid of other configurations, compare the predicted peak with an independent
measurement: on CPU the torch profiler's memory timeline (``profile_memory=True``,
``export_memory_timeline``), on CUDA ``torch.cuda.max_memory_allocated``. Step time is compared
with the median of timed steps. Prints a markdown table and writes it (with the command) to
``bench/results/profiler_accuracy.md``.

    python bench/profiler_accuracy.py                      # every model, CPU
    python bench/profiler_accuracy.py --models tiny-vit --grid 24 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpopt_hf.model.blocks import find_blocks  # noqa: E402
from mpopt_hf.cli import load_model, synthetic_batch  # noqa: E402
from mpopt_hf.model.knobs import apply_memory_config  # noqa: E402
from mpopt_hf.memory_model import config_space  # noqa: E402
from mpopt_hf.store.keys import machine_signature  # noqa: E402
from mpopt_hf.profiler import (  # noqa: E402
    build_memory_model,
    choose_fit_configs,
    measure,
    restored_after,
    train_step,
)

ZOO = ["resnet18", "resnet50", "resnet101", "resnext29", "mobilenetv2", "mobilevit_xxs"]
TINY_HF = ["tiny-vit", "tiny-gpt-neo", "tiny-clip", "tiny-sam", "tiny-mobilevit"]
# The zoo at full depth (same blocks) but a quarter of the channels, so that a CPU run of the whole
# grid takes minutes; "tiny-<name>" is the 4-8 channel test variant.
QUARTER = {
    "resnet18": {"stem_width": 16, "widths": (16, 32, 64, 128)},
    "resnet50": {"stem_width": 16, "widths": (16, 32, 64, 128)},
    "resnet101": {"stem_width": 16, "widths": (16, 32, 64, 128)},
    "resnext29": {"stem_width": 16, "cardinality": 4, "bottleneck_width": 8},
    "mobilenetv2": {"stem_width": 8, "widths": (8, 8, 16, 16, 24, 40, 80), "head_width": 320},
    "mobilevit_xxs": {"stem_width": 8, "widths": (8, 12, 24, 32, 40), "transformer_dims": (0, 0, 32, 48, 64),
                      "head_width": 160},
}


FAMILY_PREFIX = "family-"  # a tiny member of a family from tests/families.py (BERT, T5, Swin, ConvNeXt, ...)
FAMILIES = ["family-convnext", "family-swin", "family-bert", "family-t5", "family-hf_resnet", "family-whisper"]


def _families():
    sys.path.insert(0, str(ROOT / "tests"))
    import families

    return families.FAMILIES


# Families outside the zoo at a size where a step's tensors (not oneDNN's fixed buffers) dominate: a few
# hundred thousand parameters, images of 64 pixels, sequences of 64 tokens; random weights from their configs.
SMALL = ["small-convnext", "small-swin", "small-bert", "small-t5"]


def _small(name: str):
    import transformers as tf

    if name == "convnext":
        return tf.ConvNextForImageClassification(tf.ConvNextConfig(
            num_stages=3, hidden_sizes=[32, 64, 128], depths=[2, 2, 2], image_size=64, num_labels=10))
    if name == "swin":
        return tf.SwinForImageClassification(tf.SwinConfig(
            image_size=64, patch_size=4, embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 4], window_size=4,
            num_labels=10))
    if name == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
            max_position_embeddings=128, num_labels=4))
    if name == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=1000, d_model=128, d_ff=512, d_kv=32, num_layers=4, num_heads=4, decoder_start_token_id=0))
    raise ValueError(f"no small variant {name!r}; known: {SMALL}")


def _small_batch(name: str, n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    if name in ("convnext", "swin"):
        return {"pixel_values": torch.randn(n, 3, 64, 64, generator=g), "labels": torch.randint(0, 10, (n,), generator=g)}
    ids = torch.randint(2, 1000, (n, 64), generator=g)
    if name == "bert":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 4, (n,), generator=g)}
    return {"input_ids": ids, "labels": torch.randint(2, 1000, (n, 32), generator=g)}


def build(name: str):
    if name.startswith("small-"):
        return _small(name[len("small-"):])
    if name.startswith(FAMILY_PREFIX):
        return _families()[name[len(FAMILY_PREFIX):]].build()
    if name.startswith("quarter-"):
        import small_cnn

        base = name[len("quarter-"):]
        return small_cnn.build(base, num_labels=10, **QUARTER[base])
    return load_model(name)


def input_shape(model) -> tuple[int, ...]:
    config = model.config
    if type(model).__name__.startswith("GPTNeo"):
        return (16,)
    vision = getattr(config, "vision_config", None)
    size = getattr(vision, "image_size", None) or getattr(config, "image_size", 32)
    return (3, size, size)


def independent_peak(model, batch, config, optimizer) -> int:
    """Peak of one step from the profiler's memory timeline (CPU), or the CUDA allocator's counter."""
    device = next(model.parameters()).device
    with restored_after(model, optimizer):
        apply_memory_config(model, config)
        model.train()
        train_step(model, batch, config, optimizer)  # warm-up: optimizer state exists
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            train_step(model, batch, config, optimizer)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            train_step(model, batch, config, optimizer)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = os.path.join(tmp, "timeline.raw.json")
            prof.export_memory_timeline(path, device="cpu")
            _, sizes = json.loads(Path(path).read_text())
    return max(sum(row) for row in sizes)


def grid(space, exclude, n):
    """``n`` configurations spread over the space (sorted by knobs), none of those the fit measured."""
    pool = [c for c in space if c not in exclude]
    if len(pool) <= n:
        return pool
    step = len(pool) / n
    return [pool[int(i * step)] for i in range(n)]


def run_model(name: str, args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build(name).to(device)
    if name.startswith(FAMILY_PREFIX):
        source = _families()[name[len(FAMILY_PREFIX):]].batch(args.batch_size)
    elif name.startswith("small-"):
        source = _small_batch(name[len("small-"):], args.batch_size)
    else:
        source = synthetic_batch(model, args.batch_size, input_shape(model))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in source.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n_blocks = find_blocks(model).n_blocks
    precisions = ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16")
    sizes = [s for s in (2, 4, 8, 16, 32) if s <= args.batch_size]
    space = config_space(args.batch_size, n_blocks, precisions, sizes, (0.0, 0.25, 0.5, 0.75, 1.0), (0, 1, 2, 4))
    start = time.perf_counter()
    memory_model = build_memory_model(model, batch, optimizer, precisions)
    trace_s = time.perf_counter() - start
    fit_configs = choose_fit_configs(memory_model, space, args.batch_size, 3)
    measured = [measure(model, batch, c, optimizer, steps=args.steps) for c in fit_configs]
    memory_model.calibrate([(m.config, m.batch_size, m.peak_bytes, m.step_s) for m in measured])
    fit_s = time.perf_counter() - start

    start = time.perf_counter()
    for config in space:
        memory_model.predict(config, args.batch_size)
    predict_ms = (time.perf_counter() - start) / len(space) * 1e3

    rows = []
    for config in grid(space, set(fit_configs), args.grid):
        prediction = memory_model.predict(config, args.batch_size)
        truth = independent_peak(model, batch, config, optimizer)
        timed = measure(model, batch, config, optimizer, steps=args.steps) if args.time else None
        rows.append({"config": config.short(), "predicted_mib": prediction.peak_mib, "measured_mib": truth / 2**20,
                     "error": prediction.peak_bytes / truth - 1,
                     "predicted_s": prediction.step_s, "measured_s": timed.step_s if timed else None})
        if args.verbose:
            r = rows[-1]
            print(f"  {name:14s} {r['config']:22s} pred {r['predicted_mib']:9.3f} MiB  meas {r['measured_mib']:9.3f} "
                  f"MiB  err {r['error']:+.2%}  time pred {r['predicted_s']:.4f} s meas "
                  f"{r['measured_s'] if r['measured_s'] is not None else float('nan'):.4f} s", flush=True)
    errors = [abs(r["error"]) for r in rows]
    uncertainty = memory_model.calibration.uncertainty
    margin = max(args.margin, uncertainty)  # what the engine applies (callback.setup.engine_margin)
    under = max([0.0] + [-r["error"] / (1 + r["error"]) for r in rows])  # share of the measured peak missed
    t_errors = [abs(r["predicted_s"] / r["measured_s"] - 1) for r in rows if r["measured_s"]]
    return {
        "model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "blocks": n_blocks,
        "grid": len(rows), "space": len(space), "fit_points": len(measured),
        "median_error": statistics.median(errors), "max_error": max(errors),
        "uncertainty": uncertainty, "margin": margin, "max_under": under,
        "predict_ms": predict_ms, "trace_s": trace_s, "fit_s": fit_s,
        "time_median_error": statistics.median(t_errors) if t_errors else None,
        "device": device.type, "rows": rows,
    }


def table(results: list[dict]) -> str:
    head = ("| model | params (M) | blocks | grid | median error | max error | largest under-prediction "
            "| fit uncertainty (LOO) | engine margin | covered | predict (ms/config) | fit (s) "
            "| step-time median error | CUDA median / max |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cuda_cell = f"{r['median_error']:.2%} / {r['max_error']:.2%}" if r["device"] == "cuda" else "n/a"
        cpu_med = "n/a" if r["device"] == "cuda" else f"{r['median_error']:.2%}"
        cpu_max = "n/a" if r["device"] == "cuda" else f"{r['max_error']:.2%}"
        t_err = f"{r['time_median_error']:.1%}" if r["time_median_error"] is not None else "-"
        covered = "yes" if r["max_under"] < r["margin"] else "**no**"
        lines.append(f"| {r['model']} | {r['params_m']:.3f} | {r['blocks']} | {r['grid']} | {cpu_med} | {cpu_max} "
                     f"| {r['max_under']:.2%} | {r['uncertainty']:.2%} | {r['margin']:.2%} | {covered} "
                     f"| {r['predict_ms']:.3f} | {r['fit_s']:.1f} | {t_err} | {cuda_cell} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(TINY_HF + [f"quarter-{m}" for m in ZOO]))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grid", type=int, default=24, help="unmeasured configurations per model")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--margin", type=float, default=0.05, help="MPOptArguments.safety_margin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spinning on a shared machine)")
    parser.add_argument("--no-time", dest="time", action="store_false", help="skip the step-time comparison")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "profiler_accuracy.md"))
    parser.add_argument("--json", default=None, help="also write every row as JSON here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results = []
    for name in args.models.split(","):
        result = run_model(name.strip(), args)
        results.append(result)
        print(f"{name}: median {result['median_error']:.2%} max {result['max_error']:.2%} "
              f"({result['grid']} configurations, fit {result['fit_s']:.1f} s)", flush=True)
    text = table(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.out:
        command = "python bench/profiler_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            "# Profiler accuracy\n\n"
            f"Command: `{command.strip()}` (torch {torch.__version__}, {args.device}, {args.threads} threads, "
            f"effective batch {args.batch_size}; machine {machine_signature(args.device)}).\n\n"
            "Error = predicted / measured - 1 of the step's peak memory, on configurations the fit did not "
            "measure (the fit: fake-tensor traces + at most 3 measured configurations). CPU truth: the torch "
            "profiler's memory timeline (`profile_memory=True`, `export_memory_timeline`); CUDA truth: "
            "`max_memory_allocated`. Step-time error: against the median of timed steps.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
