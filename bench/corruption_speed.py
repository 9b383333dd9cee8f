"""Cost of each CIFAR-10-C corruption on CPU, and how much each one hurts a model.

    python bench/corruption_speed.py                       # 15 corruptions x 5 severities, 1000 32x32 images
    python bench/corruption_speed.py --all --batch-size 256 --threads 1
    python bench/corruption_speed.py --shift --out bench/results/corruption_speed.md

Timing: one untimed warm-up call per corruption builds the one-off tables
(frost texture bank, zoom matrices) and is reported apart; then each
(corruption, severity) is timed ``--repeats`` times on the same batch and the
best run is kept. Shift (``--shift``): a ~8k-parameter CNN is trained on clean
``digits`` and evaluated on the digits test split, clean and under every
corruption and severity.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import vision
from vision.arrow import to_arrays
from vision.sources.digits import digits_arrays
from vision.sources.sample_images import CLASSES as PATCH_CLASSES
from vision.sources.sample_images import PatchConfig, cut_patches


@dataclass
class SpeedResult:
    """Seconds per batch, by corruption and severity; plus the one-off setup time."""

    batch_size: int
    size: int
    seconds: dict[str, dict[int, float]]
    setup_seconds: dict[str, float]

    @property
    def total(self) -> float:
        return sum(sum(row.values()) for row in self.seconds.values())

    @property
    def benchmark_total(self) -> float:
        """Seconds for the 15 benchmark corruptions only (the extras excluded)."""
        return sum(sum(row.values()) for name, row in self.seconds.items() if name in vision.CORRUPTIONS)


def make_batch(source: str, batch_size: int, size: int, seed: int) -> torch.Tensor:
    """``batch_size`` real images (photo patches or digits) at ``size`` x ``size``, or uniform noise."""
    if source == "random":
        return torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))
    if source == "digits":
        images, _ = digits_arrays(size)
    else:
        per_image = -(-batch_size // len(PATCH_CLASSES))
        images, _ = cut_patches(PatchConfig(patches_per_image=per_image, patch_size=size, scale_to=3 * size, seed=seed))
    idx = np.resize(np.arange(len(images)), batch_size)
    return torch.from_numpy(np.ascontiguousarray(images[idx]))


def measure(images: torch.Tensor, names: list[str], severities: list[int], repeats: int) -> SpeedResult:
    seconds: dict[str, dict[int, float]] = {}
    setup: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        vision.corrupt(images[:2], name, severities[0], seed=0)
        setup[name] = time.perf_counter() - t0
        seconds[name] = {}
        for sev in severities:
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                vision.corrupt(images, name, sev, seed=0)
                best = min(best, time.perf_counter() - t0)
            seconds[name][sev] = best
        row = " ".join(f"{1e6 * s / images.shape[0]:8.0f}" for s in seconds[name].values())
        print(f"{name:18s} {row}  us/image", flush=True)
    return SpeedResult(images.shape[0], images.shape[-1], seconds, setup)


def tiny_cnn() -> nn.Module:
    """Three conv-BN-ReLU-pool stages (8/16/32 channels) and a linear head, for 32x32 inputs."""
    stages = []
    for c_in, c_out in ((3, 8), (8, 16), (16, 32)):
        stages += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*stages, nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def shift_check(names: list[str], epochs: int, seed: int) -> tuple[float, dict[str, dict[int, float]]]:
    """Accuracy of a CNN trained on clean digits: (clean, {corruption: {severity: accuracy}})."""
    torch.manual_seed(seed)
    x, y = map(torch.from_numpy, to_arrays(vision.load("digits", split="train", seed=seed)))
    xt, yt = map(torch.from_numpy, to_arrays(vision.load("digits", split="test", seed=seed)))
    net = tiny_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        for b in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    net.eval()

    def accuracy(images: torch.Tensor) -> float:
        with torch.no_grad():
            return (net(images).argmax(1) == yt).float().mean().item()

    table = {n: {s: accuracy(vision.corrupt(xt, n, s, seed=seed)) for s in range(1, 6)} for n in names}
    return accuracy(xt), table


def speed_markdown(res: SpeedResult, severities: list[int]) -> str:
    cols = " | ".join(f"sev {s} (us/img)" for s in severities)
    head = f"| corruption | {cols} | all {len(severities)} (s) | one-off setup (s) |"
    lines = [head, "|" + " --- |" * (len(severities) + 3)]
    for name, row in res.seconds.items():
        cells = " | ".join(f"{1e6 * row[s] / res.batch_size:.0f}" for s in severities)
        lines.append(f"| {name} | {cells} | {sum(row.values()):.2f} | {res.setup_seconds[name]:.2f} |")
    blanks = " |" * len(severities)
    lines.append(f"| **total** |{blanks} **{res.total:.1f}** | {sum(res.setup_seconds.values()):.1f} |")
    return "\n".join(lines)


def shift_markdown(clean: float, table: dict[str, dict[int, float]]) -> str:
    lines = [
        f"Clean test accuracy: **{100 * clean:.1f}%** (digits test split, 359 images).",
        "",
        "| corruption | sev 1 | sev 2 | sev 3 | sev 4 | sev 5 | drop at sev 5 (points) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in table.items():
        cells = " | ".join(f"{100 * row[s]:.1f}" for s in range(1, 6))
        lines.append(f"| {name} | {cells} | {100 * (clean - row[5]):.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=1000, help="images per corrupt() call (default 1000)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--source", choices=("patches", "digits", "random"), default="patches", help="what the images are")
    p.add_argument("--all", action="store_true", help="also the 4 extra corruptions")
    p.add_argument("--corruptions", nargs="+", default=None, help="only these corruptions")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell; the best is kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", action="store_true", help="also train a tiny CNN on clean digits and test it corrupted")
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the shift check")
    p.add_argument("--skip-speed", action="store_true", help="only the shift check")
    p.add_argument("--out", default=None, help="write a markdown report here")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.size < 8 or args.repeats < 1:
        p.error("--batch-size and --repeats must be >= 1 and --size >= 8")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = args.corruptions or list(vision.ALL_CORRUPTIONS if args.all else vision.CORRUPTIONS)
    for n in names:
        vision.corruptions.check_corruption(n, 1)
    severities = [1, 2, 3, 4, 5]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    env = (
        f"torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), 1-min load average at start {load:.1f}"
    )
    print(env)
    sections = [
        "# Corruption speed and shift",
        "",
        "Command (from the repository root):",
        "",
        "```",
        "python bench/corruption_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "```",
        "",
        f"Environment: {env}.",
    ]
    if not args.skip_speed:
        images = make_batch(args.source, args.batch_size, args.size, args.seed)
        print(f"batch: {tuple(images.shape)} {args.source}; times are per image")
        t0 = time.perf_counter()
        res = measure(images, names, severities, args.repeats)
        wall = time.perf_counter() - t0
        print(
            f"all {len(names)} x {len(severities)}: {res.total:.1f} s timed "
            f"(15 benchmark corruptions: {res.benchmark_total:.1f} s), {wall:.1f} s wall including setup"
        )
        sections += [
            "",
            f"## Cost per image ({args.batch_size} images of {args.size}x{args.size}, {args.source}, "
            f"best of {args.repeats})",
            "",
            speed_markdown(res, severities),
            "",
            f"All {len(names)} corruptions x 5 severities: {res.total:.1f} s timed "
            f"(the 15 benchmark corruptions: {res.benchmark_total:.1f} s); {wall:.1f} s wall clock including "
            "the one-off setup.",
        ]
    if args.shift:
        t0 = time.perf_counter()
        clean, table = shift_check(names, args.epochs, args.seed)
        print(shift_markdown(clean, table))
        sections += [
            "",
            f"## Shift check: tiny CNN (~8k parameters) trained {args.epochs} epochs on clean digits",
            "",
            shift_markdown(clean, table),
            "",
            f"(training + evaluation: {time.perf_counter() - t0:.1f} s)",
        ]
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(sections) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
