"""The whole knob space of a model and the search for its smallest peak.

The search ranks every configuration with the fake-tensor memory model (`mpopt_hf.profiler.build_memory_model`:
traced once on fake tensors, then microseconds per configuration), then re-predicts the few smallest with an exact
fake-tensor step (`mpopt_hf.profiler.predict_step`) and keeps the smallest of those: the ranking is cheap enough for
thousands of configurations, the exact step removes what the span model approximates.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpopt_hf import MemoryConfig
from mpopt_hf.model.plan import n_frozen_blocks

MiB = 2**20


def divisors(n: int) -> list[int]:
    """Every micro-batch size that splits a batch of ``n`` into equal micro-batches, largest first."""
    if n < 1:
        raise ValueError(f"a batch needs at least one sample, got {n}")
    return [d for d in range(n, 0, -1) if n % d == 0]


def freeze_rates(n_blocks: int, min_trainable_blocks: int = 0) -> list[float]:
    """One rate per number of frozen blocks, 0 .. ``n_blocks - min_trainable_blocks`` (rate k/n freezes k blocks)."""
    rates = [k / n_blocks for k in range(0, n_blocks - min_trainable_blocks + 1)]
    assert [n_frozen_blocks(r, n_blocks) for r in rates] == list(range(len(rates)))
    return rates


def knob_space(batch_size: int, n_blocks: int, precisions: Sequence[str] = ("fp32", "bf16"),
               min_trainable_blocks: int = 0) -> list[MemoryConfig]:
    """Every configuration: micro-batch sizes dividing the batch, every freeze count, every checkpoint-segment count
    the trainable blocks allow (0 .. trainable), every precision."""
    space = []
    for precision in precisions:
        for rate in freeze_rates(n_blocks, min_trainable_blocks):
            trainable = n_blocks - n_frozen_blocks(rate, n_blocks)
            for segments in range(trainable + 1):
                space.extend(MemoryConfig(m, rate, segments, precision) for m in divisors(batch_size))
    return space


class PeakPredictor:
    """Peaks of one model on one batch: the memory model for ranking, an exact fake step for the final word."""

    def __init__(self, model: nn.Module, batch: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                 precisions: Sequence[str] = ("fp32", "bf16")) -> None:
        from mpopt_hf.training.microbatch import batch_size_of
        from mpopt_hf.profiler import fake_setup

        self.model, self.batch, self.optimizer = model, dict(batch), optimizer
        self.precisions = tuple(precisions)
        self.batch_size = batch_size_of(self.batch)
        self.setup = fake_setup(model, optimizer, self.batch)
        self.trace_s = 0.0
        self._memory_model: Any = None
        self._exact: dict[MemoryConfig, Any] = {}

    @property
    def memory_model(self):
        """Traced on first use (seconds to a minute: a few fake steps per precision, span by span)."""
        from mpopt_hf.profiler import build_memory_model

        if self._memory_model is None:
            start = time.perf_counter()
            self._memory_model = build_memory_model(self.model, self.batch, self.optimizer, self.precisions)
            self.trace_s = time.perf_counter() - start
        return self._memory_model

    def ranked_mib(self, config: MemoryConfig) -> float:
        """The memory model's peak (microseconds once traced; what the search ranks by)."""
        return self.memory_model.predict(config, self.batch_size).peak_bytes / MiB

    def exact(self, config: MemoryConfig):
        """The exact fake-tensor step's `Measurement` (seconds; cached)."""
        from mpopt_hf.profiler import predict_step

        if config not in self._exact:
            self._exact[config] = predict_step(self.model, self.batch, config, self.optimizer, setup=self.setup)
        return self._exact[config]

    def exact_mib(self, config: MemoryConfig) -> float:
        return self.exact(config).peak_bytes / MiB


@dataclass
class SearchResult:
    """The smallest predicted peak of a space, and how it was found."""

    config: MemoryConfig
    peak_mib: float  # the exact fake step's
    n_configs: int
    shortlist: list[dict[str, Any]] = field(default_factory=list)  # {config, ranked_mib, exact_mib}
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "peak_mib": self.peak_mib, "n_configs": self.n_configs,
                "shortlist": self.shortlist, "seconds": self.seconds}


def _cheaper(config: MemoryConfig) -> tuple:
    """Ties go to fewer micro-batches, fewer recomputed blocks, more blocks training, then fp32 (no casts)."""
    return (-config.micro_batch_size, config.checkpoint_segments, config.freeze_rate, config.precision != "fp32")


def minimum_peak(predictor: PeakPredictor, space: Sequence[MemoryConfig], shortlist: int = 6) -> SearchResult:
    """The configuration of ``space`` with the smallest exact predicted peak among the ``shortlist`` the memory model
    ranks lowest; of peaks equal to 1 KiB, the cheapest to run (`_cheaper`)."""
    if not space:
        raise ValueError("the configuration space is empty")
    start = time.perf_counter()
    ranked = sorted(range(len(space)), key=lambda i: (predictor.ranked_mib(space[i]), i))[:max(1, shortlist)]
    rows = [{"config": space[i].to_dict(), "ranked_mib": predictor.ranked_mib(space[i]),
             "exact_mib": predictor.exact_mib(space[i])} for i in ranked]
    best = min(range(len(ranked)), key=lambda j: (round(rows[j]["exact_mib"], 3), _cheaper(space[ranked[j]])))
    return SearchResult(space[ranked[best]], rows[best]["exact_mib"], len(space), rows, time.perf_counter() - start)
