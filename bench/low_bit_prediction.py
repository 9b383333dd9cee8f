"""Predicted vs measured peak of 8-bit optimizer-state configurations, where the CPU kernel's hidden fp32 copies
matter: the uncalibrated memory model (fake-tensor traces + the probed bytes per element) beside one measured step.

    python bench/low_bit_prediction.py resnet18:32:mb8/f0.5/ckpt4/bf16/opt8 gpt-neo-125m:4:mb4/opt8

Each argument is ``architecture:batch:config`` (a `memory_cards.architectures` name or a zoo name). Memory only:
bytes are deterministic, so one run is enough; no time is reported.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled


def main(argv: list[str]) -> int:
    import torch

    from memory_cards.architectures import build_named
    from mpopt_hf import MemoryConfig
    from mpopt_hf.training.optimizer_state import switchable_adamw
    from mpopt_hf.profiler import build_memory_model, measure

    print("| model | batch | configuration | predicted MiB (phase) | measured MiB | live tensors MiB |")
    print("| --- | ---: | --- | --- | ---: | ---: |")
    for spec in argv or ["resnet18:32:mb8/f0.5/ckpt4/bf16/opt8", "gpt-neo-125m:4:mb4/opt8",
                         "gpt-neo-125m:4:mb1/f0.5/ckpt6/bf16/opt8"]:
        name, batch_size, text = spec.split(":", 2)
        config = MemoryConfig.parse(text)
        model, make_batch, _ = build_named(name)
        batch = make_batch(int(batch_size))
        optimizer = switchable_adamw(torch.optim.AdamW(model.parameters(), lr=1e-4))
        start = time.perf_counter()
        memory_model = build_memory_model(model, batch, optimizer, sorted({"fp32", config.precision}))
        traced = time.perf_counter() - start
        predicted = memory_model.predict(config, int(batch_size))
        real = measure(model, batch, config, optimizer, steps=1)
        print(f"| {name} | {batch_size} | {config.short()} | {predicted.peak_mib:.1f} ({predicted.phase}; traced in "
              f"{traced:.0f} s) | {real.peak_bytes / 2**20:.1f} | {real.tracked_peak_bytes / 2**20:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
