"""Step time of gradient caching vs the whole batch and vs naive micro-batching, on a small CLIP.

    python bench/grad_cache_step_time.py                         # batch 32, micro-batch 8, 15 repeats
    python bench/grad_cache_step_time.py --repeats 9 --threads 2 --checkpoint-segments 2

One training step (forward + backward, no optimizer) of a CLIP with 4 layers of width 128 per
tower on 64 px images, three ways, in the same process and interleaved (the order is shuffled in
each repeat, so machine load falls on all three alike):

* ``whole``: the effective batch in one forward/backward (the reference);
* ``naive``: micro-batches with accumulated gradients (cheap, but the wrong objective);
* ``grad_cache``: `mpopt_hf.training.grad_cache.grad_cache_backward` (exact; one extra no-graph forward).

Ratios are taken within each repeat and summarised by their median and range. Expected:
``grad_cache / naive`` ~ 4/3 (a backward costs about two forwards, plus the extra forward).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
import transformers as tf

from mpopt_hf.config import MemoryConfig
from mpopt_hf.training.coupled_loss import find_coupled_loss
from mpopt_hf.training.grad_cache import grad_cache_backward
from mpopt_hf.model.knobs import apply_memory_config
from mpopt_hf.training.microbatch import micro_batch_shares, split_batch


def build_clip(width: int, layers: int, image_size: int, seq_len: int) -> tf.CLIPModel:
    torch.manual_seed(0)
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=4)
    cfg = tf.CLIPConfig(
        text_config=dict(**tower, vocab_size=1000, max_position_embeddings=seq_len, bos_token_id=0, eos_token_id=1,
                         pad_token_id=2),
        vision_config=dict(**tower, image_size=image_size, patch_size=8),
        projection_dim=width,
    )
    return tf.CLIPModel(cfg).train()


def make_batch(batch_size: int, image_size: int, seq_len: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (batch_size, seq_len), generator=g)
    ids[:, -1] = 1
    return {"pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g), "input_ids": ids,
            "return_loss": True}


def steps(model: tf.CLIPModel, batch: dict, micro: int) -> dict[str, Callable[[], None]]:
    adapter = find_coupled_loss(model, batch)
    parts = split_batch(batch, micro)
    shares = micro_batch_shares(parts)

    def whole() -> None:
        model(**batch).loss.backward()

    def naive() -> None:
        for part, share in zip(parts, shares):
            (model(**part).loss * share).backward()

    def grad_cache() -> None:
        grad_cache_backward(model, parts, adapter)

    return {"whole": whole, "naive": naive, "grad_cache": grad_cache}


def timed(model: torch.nn.Module, step: Callable[[], None]) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    step()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-segments", type=int, default=0)
    parser.add_argument("--freeze-rate", type=float, default=0.0)
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be >= 5 for the ratios to mean something")
    torch.set_num_threads(args.threads)

    model = build_clip(args.width, args.layers, args.image_size, args.seq_len)
    apply_memory_config(model, MemoryConfig(micro_batch_size=args.micro_batch_size, freeze_rate=args.freeze_rate,
                                            checkpoint_segments=args.checkpoint_segments))
    batch = make_batch(args.batch_size, args.image_size, args.seq_len)
    runs = steps(model, batch, args.micro_batch_size)
    for step in runs.values():  # warm-up: allocator, kernels, autograd caches
        timed(model, step)

    rng = random.Random(0)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        order = list(runs)
        rng.shuffle(order)
        for name in order:
            seconds[name].append(timed(model, runs[name]))

    n_params = sum(p.numel() for p in model.parameters())
    print(f"CLIP {args.layers}x{args.width} per tower ({n_params / 1e6:.2f} M params), {args.image_size} px, "
          f"batch {args.batch_size}, micro-batch {args.micro_batch_size}, checkpoint_segments "
          f"{args.checkpoint_segments}, freeze_rate {args.freeze_rate}, {args.threads} thread(s), "
          f"{args.repeats} interleaved repeats")
    for name, values in seconds.items():
        print(f"  {name:>10}: median {statistics.median(values) * 1e3:7.1f} ms  "
              f"(min {min(values) * 1e3:.1f}, max {max(values) * 1e3:.1f})")
    for num, den in (("grad_cache", "whole"), ("grad_cache", "naive"), ("naive", "whole")):
        ratios = [a / b for a, b in zip(seconds[num], seconds[den])]
        print(f"  {num} / {den}: median {statistics.median(ratios):.3f}  "
              f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    print("  expected grad_cache / naive ~ 1.33 (one extra forward; a backward ~ two forwards)")


if __name__ == "__main__":
    main()
