"""Steps per second of one fixed configuration through `MPOptTrainer`: to compare two versions of the code side by side.

Run it from each checkout in turn, interleaved, and compare the ratios (this machine's absolute speed swings):

    for i in 1 2 3 4 5; do
      (cd OLD && PYTHONPATH=OLD python bench/step_speed.py); (cd NEW && PYTHONPATH=NEW python bench/step_speed.py)
    done

A tiny small_cnn ResNet-18, loader batch 64 split into micro-batches of 16, on random 32x32 images.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import small_cnn  # noqa: E402
from mpopt_hf import MemoryConfig, MPOptTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro-batch", type=int, default=16)
    ns = parser.parse_args()
    torch.manual_seed(0)
    model = small_cnn.build("resnet18", **small_cnn.tiny_overrides("resnet18"))
    n = 64 * 8
    data = Dataset.from_dict({"pixel_values": torch.randn(n, 3, 32, 32).tolist(),
                              "labels": torch.randint(0, 10, (n,)).tolist()}).with_format("torch")
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(tmp, per_device_train_batch_size=64, max_steps=ns.steps, report_to=[],
                                 save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True)
        trainer = MPOptTrainer(model=model, args=args, train_dataset=data, memory_config=MemoryConfig(ns.micro_batch))
        start = time.perf_counter()
        trainer.train()
        print(f"{ns.steps / (time.perf_counter() - start):.3f} steps/s")


if __name__ == "__main__":
    main()
