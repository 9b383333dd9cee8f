"""The engine's default cost model: each configuration's peak predicted on fake tensors.

The rule engine must know a configuration's peak before it runs it. Without a
fitted memory model at hand, the exact answer for the tensors a step creates is a
step run under ``FakeTensorMode`` (`mpopt_hf.profiler.predict_step`): no compute,
no memory, so it works for a model that does not fit the device. Predictions are
cached per configuration, and the time they took is kept as search cost.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import MemoryConfig

MiB = 2**20


def plain_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (fake copies need the real class)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class FakeTensorCostModel:
    """`CostModel` whose peaks come from fake-tensor steps; step time is left unknown (None)."""

    def __init__(self, model: nn.Module, batch: Mapping[str, Any], optimizer: Any = None, lr: float = 1e-3) -> None:
        from .profiler import fake_setup

        if optimizer is None:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.model, self.batch, self.optimizer = model, dict(batch), plain_optimizer(optimizer)
        self.setup = fake_setup(self.model, self.optimizer, self.batch)  # one fake copy serves every prediction
        self.peaks_mib: dict[MemoryConfig, float] = {}
        self.seconds = 0.0

    def peak_mib(self, config: MemoryConfig) -> float:
        if config not in self.peaks_mib:
            from .profiler import predict_step

            start = time.perf_counter()
            prediction = predict_step(self.model, self.batch, config, self.optimizer, setup=self.setup)
            self.peaks_mib[config] = prediction.peak_mib
            self.seconds += time.perf_counter() - start
        return self.peaks_mib[config]

    def predict(self, config: MemoryConfig) -> tuple[float | None, float | None]:
        return self.peak_mib(config) * MiB, None


def first_batch(dataloader: Any, size: int) -> dict[str, Any]:
    """The first ``size`` rows of a data loader's dataset, collated as the loader would (its sampler untouched)."""
    dataset = dataloader.dataset
    rows = [dataset[i] for i in range(min(size, len(dataset)))]
    return dataloader.collate_fn(rows)
