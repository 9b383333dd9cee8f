"""Cost models for the rule engine: what a configuration costs before it runs.

* `ProfileCostModel` (the default): the profiler's fitted memory model
  (`mpopt_hf.profiler.fit_profile`): traced once on fake tensors, calibrated on at most 3
  measured steps, then every configuration's peak *and step time* in microseconds; with a
  profile store, the next run on the same model and device reuses the fit and measures nothing.
* `FakeTensorCostModel`: one fake-tensor step per configuration
  (`mpopt_hf.profiler.predict_step`): the exact tensor bytes, no compute and no memory, but
  no step time, no kernel workspace, and about a second per configuration on a small model.

Both keep the seconds they spent as search cost.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import MIB, MemoryConfig
from .training.microbatch import batch_size_of


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
        self._structure: Any = None  # the exact terms, for 8-bit optimizer steps (built at the first one)

    def peak_mib(self, config: MemoryConfig) -> float:
        if config not in self.peaks_mib:
            from .profiler import predict_step

            start = time.perf_counter()
            prediction = predict_step(self.model, self.batch, config, self.optimizer, setup=self.setup)
            self.peaks_mib[config] = max(prediction.peak_mib, self._low_bit_step_mib(config))
            self.seconds += time.perf_counter() - start
        return self.peaks_mib[config]

    def predict(self, config: MemoryConfig) -> tuple[float | None, float | None]:
        return self.peak_mib(config) * MIB, None

    def _low_bit_step_mib(self, config: MemoryConfig) -> float:
        """An 8-bit optimizer step with its kernel's hidden fp32 copies, which fake tensors cannot see: weights,
        moments, inputs and every gradient, plus those copies for the largest 8-bit tensor (exact terms)."""
        if config.optimizer_state != "8bit":
            return 0.0
        if self._structure is None:
            from .profiler import model_structure

            self._structure = model_structure(self.model, self.batch, self.optimizer)
        s = self._structure
        return s.optimizer_step_bytes(config, batch_size_of(self.batch), s.low_bit_transient(config)) / MIB


class ProfileCostModel:
    """`CostModel` from a fitted `MemoryModel`: peak bytes and step seconds (None when no step was timed).

    The memory model does not trace LoRA adapters: a configuration with ``lora_rank > 0`` is priced by one
    fake-tensor step (``adapters``, exact tensor bytes) plus the calibration's workspace for its precision and
    micro-batch, as the memory model adds it; its step time is its twin's without adapters (an upper bound: the
    frozen weights need no gradient), which the engine's online step-time correction then replaces."""

    def __init__(self, profile: Any, batch_size: int, seconds: float = 0.0,
                 adapters: FakeTensorCostModel | None = None) -> None:
        self.profile, self.batch_size, self.seconds = profile, int(batch_size), seconds
        self.adapters = adapters
        # (embedding width, batch x batch tensors) of a batch-coupled loss: a split batch is gradient-cached
        self.grad_cache: tuple[int, int] | None = None

    def price_grad_caching(self, model: nn.Module, batch: Mapping[str, Any]) -> None:
        """Price the extra forward and cached embeddings of gradient caching when ``model``'s loss on ``batch``
        couples the batch (`mpopt_hf.training.coupled_loss`); the trainer gradient-caches every split batch then."""
        from .training.coupled_loss import embedding_width, find_coupled_loss

        adapter = find_coupled_loss(model, batch)
        if adapter is not None and adapter.embed_dims is not None:
            self.grad_cache = (embedding_width(adapter, model), adapter.pairwise_tensors)

    @classmethod
    def fit(cls, model: nn.Module, batch: Mapping[str, Any], optimizer: Any, space: list[MemoryConfig],
            store: Any = None, n_measure: int = 3, budget_bytes: float | None = None,
            margin: float = 0.05) -> "ProfileCostModel":
        """Fit (or reuse from ``store``) the memory model of ``model`` on ``batch`` for ``space``, measuring only
        configurations predicted to fit ``budget_bytes`` (with ``margin``)."""
        from .profiler import fit_profile
        from .training.microbatch import batch_size_of

        start = time.perf_counter()
        plain = [c for c in space if not c.lora_rank]
        adapters = FakeTensorCostModel(model, batch, optimizer) if len(plain) < len(space) else None
        profile = fit_profile(model, batch, plain_optimizer(optimizer), plain or [c.replace(lora_rank=0) for c in space],
                              store, n_measure=n_measure, budget_bytes=budget_bytes, margin=margin)
        return cls(profile, batch_size_of(batch), time.perf_counter() - start, adapters)

    @property
    def reused(self) -> bool:
        return bool(self.profile.reused)

    def predict(self, config: MemoryConfig) -> tuple[float | None, float | None]:
        if config.lora_rank:
            return self._predict_adapters(config)
        memory_model = self.profile.model
        prediction = memory_model.predict(config, self.batch_size)
        timed = memory_model.calibration.n_time_points > 0
        peak, step_s = float(prediction.peak_bytes), (memory_model.predict_time(config, self.batch_size) if timed else None)
        if self.grad_cache is not None and config.micro_batch_size < self.batch_size:
            from .memory_model.grad_cache_cost import grad_cache_overhead

            overhead = grad_cache_overhead(memory_model, config, self.batch_size, *self.grad_cache)
            peak = overhead.apply(prediction)[0]
            step_s = None if step_s is None else step_s + overhead.extra_s
        return peak, step_s

    def _predict_adapters(self, config: MemoryConfig) -> tuple[float, float | None]:
        if self.adapters is None:
            raise ValueError(f"{config.short()} has LoRA adapters, which this cost model was not fitted for: list the "
                             "rank in MPOptArguments.lora_ranks (the fit then prices adapters by fake-tensor steps).")
        memory_model, twin = self.profile.model, config.replace(lora_rank=0)
        twin_peak, twin_s = self.predict(twin)
        # what gradient caching adds to the twin (cached embeddings; 0 when the batch is not split) adds here too
        grad_cache_bytes = twin_peak - memory_model.predict(twin, self.batch_size).peak_bytes
        workspace = memory_model.calibration.workspace(config.precision, min(config.micro_batch_size, self.batch_size))
        return self.adapters.peak_mib(config) * MIB + workspace + grad_cache_bytes, twin_s

    def peak_mib(self, config: MemoryConfig) -> float:
        return self.predict(config)[0] / MIB

    @property
    def uncertainty(self) -> float:
        """The fit's leave-one-out under-prediction, as a share of the peak (the engine's margin covers it)."""
        return self.profile.model.calibration.uncertainty


def first_batch(dataloader: Any, size: int) -> dict[str, Any]:
    """The first ``size`` rows of a data loader's dataset, collated as the loader would (its sampler untouched)."""
    dataset = dataloader.dataset
    rows = [dataset[i] for i in range(min(size, len(dataset)))]
    return dataloader.collate_fn(rows)
