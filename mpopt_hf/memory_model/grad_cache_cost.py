"""What gradient caching adds to a configuration's cost, for the cost model.

Two terms, both exact in structure and cheap to evaluate (no torch here, like `memory_model`):

* **memory**: from the first micro-batch's no-graph forward to the last backward, the step holds
  the cached embeddings of the whole batch and their gradients, ``2 x batch x width x bytes``
  (CLIP: width = 2 x projection_dim); at the last backward the loss on them is recomputed and
  keeps ``pairwise_tensors`` batch x batch float32 tensors for its backward. This adds to the
  micro-batch moments of the peak, not to the optimizer step's (they are freed by then).
* **time**: one more forward per micro-batch, without a graph. The memory model's forward spans
  traced with the unit *frozen* are exactly a forward that records no graph, so the extra work
  is their ops and flops, priced by the same calibration as the rest of the step. Without
  checkpointing and freezing a backward costs about two forwards, so the step is ~4/3 of plain
  micro-batching; with checkpointing (one more forward already) ~5/4; with freezing, less
  saved, since the frozen prefix runs in the extra forward too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import MemoryConfig
from . import MemoryModel, Prediction


@dataclass(frozen=True)
class GradCacheOverhead:
    """The extra bytes held by a step with gradient caching, and its extra forward's work and time."""

    embedding_bytes: float  # cached embeddings + their gradients, held through the step
    loss_bytes: float  # the recomputed loss's batch x batch tensors, at the last backward
    extra_ops: float = 0.0
    extra_flops: float = 0.0
    extra_s: float = 0.0

    @property
    def held_bytes(self) -> float:
        """An upper bound of what the micro-batch moments of the peak gain."""
        return self.embedding_bytes + self.loss_bytes

    def apply(self, prediction: Prediction) -> tuple[float, float]:
        """(peak bytes, step seconds) of ``prediction``'s configuration with gradient caching.

        The optimizer step's moment does not grow; when it is the predicted peak the result is
        an upper bound, because a prediction keeps only its highest moment.
        """
        peak = prediction.peak_bytes + (0.0 if prediction.phase == "optimizer step" else self.held_bytes)
        return peak, prediction.step_s + self.extra_s


def cached_bytes(batch_size: int, embed_width: int, pairwise_tensors: int = 4,
                 bytes_per_element: int = 4) -> tuple[float, float]:
    """(embeddings + their gradients, the loss's batch x batch tensors) in bytes.

    ``embed_width``: the sum of the embeddings' widths (CLIP: image + text = 2 x projection_dim).
    """
    if batch_size < 1 or embed_width < 1:
        raise ValueError(f"batch_size and embed_width must be >= 1, got {batch_size} and {embed_width}.")
    embeddings = 2.0 * batch_size * embed_width * bytes_per_element
    return embeddings, float(pairwise_tensors) * batch_size * batch_size * 4


def micro_batch_sizes(config: MemoryConfig, batch_size: int) -> list[int]:
    m = min(config.micro_batch_size, batch_size)
    return [m] * (batch_size // m) + ([batch_size % m] if batch_size % m else [])


def extra_forward_work(model: MemoryModel, config: MemoryConfig, batch_size: int) -> tuple[float, float]:
    """(ops, flops) of one no-graph forward of every micro-batch: the forward spans as traced frozen.

    Units without a frozen trace (the head, which never freezes) count with their trainable
    forward, a slight over-estimate (it also saves tensors for backward; the work is the same).
    """
    ops = flops = 0.0
    sizes = micro_batch_sizes(config, batch_size)
    for span in model.spans_for(config):
        if span.phase != "fwd":
            continue
        cost = span.costs.get("F") or span.costs.get("T") or next(iter(span.costs.values()), None)
        if cost is None:
            continue
        ops += cost.ops * len(sizes)
        flops += sum(cost.flops(size) for size in sizes)
    return ops, flops


def grad_cache_overhead(
    model: MemoryModel | None, config: MemoryConfig, batch_size: int, embed_width: int, pairwise_tensors: int = 4,
    bytes_per_element: int = 4,
) -> GradCacheOverhead:
    """The overhead of ``config`` on a batch of ``batch_size``; ``model`` None: bytes only."""
    embeddings, loss = cached_bytes(batch_size, embed_width, pairwise_tensors, bytes_per_element)
    if model is None:
        return GradCacheOverhead(embeddings, loss)
    ops, flops = extra_forward_work(model, config, batch_size)
    cal = model.calibration
    flop_s = cal.flop_s.get(config.precision, cal.flop_s.get("fp32", 0.0))
    return GradCacheOverhead(embeddings, loss, ops, flops, cal.op_s * ops + flop_s * flops)


def forward_fraction(model: MemoryModel, config: MemoryConfig, batch_size: int) -> float:
    """The extra forward's share of the step's work, by flops (ops when no flops were traced): the
    expected step-time factor is ``1 + this``."""
    ops, flops = extra_forward_work(model, config, batch_size)
    step_ops, step_flops, _ = model.work(config, batch_size)
    if step_flops > 0:
        return flops / step_flops
    return ops / step_ops if step_ops > 0 else math.nan
