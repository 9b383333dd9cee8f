"""Peak memory and step time of each knob alone and all together, side by side in one run.

For each model: the baseline (whole effective batch, no knob), then micro-batching,
freezing, checkpointing and bf16 alone, then all four. Memory: CUDA's allocator peak on
a GPU, PyTorch's MemTracker on CPU (live tensor bytes). Times are medians of a few steps;
the ratios to the baseline are what to read on a shared, noisy CPU machine.

    python bench/knob_ablation.py                       # the zoo (full size) + tiny HF families
    python bench/knob_ablation.py --models resnet18 vit --batch-size 32 --steps 3
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import small_cnn
from mpopt_hf import MemoryConfig
from mpopt_hf.blocks import find_blocks
from mpopt_hf.profiler import measure
from mpopt_hf.tiny_models import TINY_FAMILIES, build_tiny, example_batch

MiB = 2**20


def build(name: str, batch_size: int, device: torch.device) -> tuple[torch.nn.Module, dict]:
    if name in small_cnn.MODEL_NAMES:
        torch.manual_seed(0)
        model = small_cnn.build(name, num_labels=10)
        g = torch.Generator().manual_seed(0)
        batch = {
            "pixel_values": torch.randn(batch_size, 3, 32, 32, generator=g),
            "labels": torch.randint(0, 10, (batch_size,), generator=g),
        }
    elif name in TINY_FAMILIES:
        model = build_tiny(name)
        batch = example_batch(model, batch_size)
    else:
        raise SystemExit(f"unknown model {name!r}; accepted: {small_cnn.MODEL_NAMES + list(TINY_FAMILIES)}")
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return model.to(device), batch


def ablation_configs(batch_size: int, n_blocks: int, precision: str) -> list[tuple[str, MemoryConfig]]:
    micro = max(1, batch_size // 4)
    half_trainable = n_blocks - int(n_blocks * 0.5 + 0.5)
    return [
        ("baseline", MemoryConfig(batch_size)),
        (f"micro-batch {micro}", MemoryConfig(micro)),
        ("freeze 0.5", MemoryConfig(batch_size, freeze_rate=0.5)),
        (f"checkpoint {n_blocks}", MemoryConfig(batch_size, checkpoint_segments=n_blocks)),
        (precision, MemoryConfig(batch_size, precision=precision)),
        (
            "all four",
            MemoryConfig(micro, freeze_rate=0.5, checkpoint_segments=half_trainable, precision=precision),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=small_cnn.MODEL_NAMES + list(TINY_FAMILIES))
    parser.add_argument("--batch-size", type=int, default=32, help="effective batch")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (median)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16"
    print(f"device={device}, effective batch={args.batch_size}, torch {torch.__version__}", flush=True)
    print("| model | configuration | peak MiB | x baseline | activations MiB | step s | x baseline |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models:
        model, batch = build(name, args.batch_size, device)
        n_blocks = find_blocks(model).n_blocks
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        base = None
        for label, cfg in ablation_configs(args.batch_size, n_blocks, precision):
            start = time.perf_counter()
            m = measure(model, batch, cfg, optimizer, steps=args.steps, warmup=1)
            base = base or m
            print(
                f"| {name} | {label} ({cfg.short()}) | {m.peak_bytes / MiB:.1f} | {m.peak_bytes / base.peak_bytes:.2f} "
                f"| {m.activations / MiB:.1f} | {m.step_s:.3f} | {m.step_s / base.step_s:.2f} |",
                flush=True,
            )
            if time.perf_counter() - start > 600:
                print(f"  ({name} is slow here; use --models / --batch-size to shorten)", file=sys.stderr)


if __name__ == "__main__":
    main()
