"""`MPOptTrainer`: a `transformers.Trainer` whose training step runs under a `MemoryConfig`.

The data loader yields the *effective* batch; the step splits it into
micro-batches, accumulates their gradients (synchronising only on the last one),
and so keeps the gradient of the whole batch while holding the activations of
one micro-batch at a time. The knobs switch only at step boundaries.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .blocks import find_blocks
from .config import MemoryConfig
from .knobs import apply_memory_config, autocast_context, knob_state, plan_knobs
from .microbatch import micro_batch_shares, split_batch

logger = logging.getLogger(__name__)


class MPOptTrainer(Trainer):
    """A Trainer that trains under a `MemoryConfig` (micro-batching, freezing, checkpointing, precision).

    ``memory_config`` is the configuration to start with; without one the whole batch runs at once with
    no knob, i.e. exactly like `Trainer`. Switch later with `set_memory_config`.
    """

    def __init__(self, *args: Any, memory_config: MemoryConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"TrainingArguments.gradient_accumulation_steps={self.args.gradient_accumulation_steps}: MPOptTrainer "
                "accumulates gradients itself. Set gradient_accumulation_steps=1, make per_device_train_batch_size "
                "the effective batch, and choose MemoryConfig.micro_batch_size for the memory it may use."
            )
        if self.args.bf16:
            raise ValueError(
                "TrainingArguments.bf16=True: MPOptTrainer switches precision itself. Leave bf16=False and use "
                "MemoryConfig(precision='bf16')."
            )
        self._blocks = find_blocks(self.model)
        self._memory_config: MemoryConfig | None = None
        self._pending_config = memory_config or MemoryConfig(
            micro_batch_size=self.args.per_device_train_batch_size,
            precision="fp16" if self.args.fp16 else "fp32",
        )
        self._validate(self._pending_config)
        self._micro_share: float | None = None
        self._step_peak_bytes: int | None = None

    # ------------------------------------------------------------------ the public knob API

    @property
    def memory_config(self) -> MemoryConfig:
        """The configuration in effect (or, before the first step, the one that will be)."""
        return self._memory_config or self._pending_config

    def set_memory_config(self, config: MemoryConfig) -> None:
        """Switch to ``config`` at the next step boundary. Validated now, so a bad config fails here."""
        self._validate(config)
        self._pending_config = config

    def _validate(self, config: MemoryConfig) -> None:
        if not isinstance(config, MemoryConfig):
            raise ValueError(f"memory_config must be a MemoryConfig, got {type(config).__name__}.")
        plan_knobs(config, self._blocks.n_blocks)
        device_type = self.args.device.type
        if config.precision == "fp16" and not self.args.fp16:
            raise ValueError(
                f"MemoryConfig.precision='fp16' needs TrainingArguments(fp16=True) on a CUDA device (device: "
                f"{device_type!r}), which gives the loss scaler; use 'bf16' or 'fp32' otherwise."
            )
        if self.args.fp16 and config.precision != "fp16":
            raise ValueError(
                f"MemoryConfig.precision={config.precision!r} while TrainingArguments.fp16=True: the loss scaler "
                "belongs to the whole run, so every configuration must use precision='fp16'."
            )
        if config.precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("MemoryConfig.precision='bf16' is not supported by this GPU; use 'fp16' or 'fp32'.")

    def _switch_if_pending(self, model: nn.Module) -> None:
        config = self._pending_config
        if config is None:
            return
        self._pending_config = None
        previous = self._memory_config
        apply_memory_config(model, config, blocks=self._blocks, device_type=self.args.device.type)
        self._memory_config = config
        effective = self.args.per_device_train_batch_size
        micro_steps = -(-effective // config.micro_batch_size)
        message = (
            f"memory config {config.short()}: effective batch {effective * self.args.world_size} = micro-batch "
            f"{min(config.micro_batch_size, effective)} x {micro_steps} micro-steps x {self.args.world_size} processes"
        )
        logger.info(message if previous is None else f"switched {previous.short()} -> {message}")

    # ------------------------------------------------------------------ the step

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        self._switch_if_pending(model)
        config = self.memory_config
        on_cuda = self.args.device.type == "cuda"
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(self.args.device)
        micro_batches = split_batch(inputs, config.micro_batch_size)
        shares = micro_batch_shares(micro_batches)
        normalised_by_items = self._loss_normalised_by_items(num_items_in_batch)
        total = None
        try:
            for index, (micro_batch, share) in enumerate(zip(micro_batches, shares)):
                last = index == len(micro_batches) - 1
                # A mean loss is weighted by its share; a loss already divided by the whole batch's item count is not.
                self._micro_share = None if normalised_by_items else share
                sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                with sync:
                    loss = super().training_step(model, micro_batch, num_items_in_batch)
                total = loss if total is None else total + loss
        finally:
            self._micro_share = None
        if on_cuda:
            self._step_peak_bytes = torch.cuda.max_memory_allocated(self.args.device)
        return total

    def _loss_normalised_by_items(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        """Mirror of Trainer's rule for whether the loss is already divided by the effective batch's items."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._micro_share is None:
            return result
        if return_outputs:
            loss, outputs = result
            return loss * self._micro_share, outputs
        return result * self._micro_share

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> contextlib.AbstractContextManager:
        """Autocast for the active configuration; fp16 is left to accelerate (it owns the loss scaler)."""
        config = self.memory_config
        if config.precision == "fp16":
            return contextlib.nullcontext()
        return autocast_context(config, self.args.device.type)

    # ------------------------------------------------------------------ optimizer and logging

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Give the optimizer every parameter the user made trainable, frozen by a knob or not.

        Trainer keeps only ``requires_grad`` parameters; a block frozen now and unfrozen later would then never
        train. Frozen parameters get no gradient, so the optimizer leaves them (and their weight decay) alone.
        """
        state = knob_state(self.model)
        if state is None or self.optimizer is not None:
            return super().create_optimizer(model)
        params = list(self.model.parameters())
        current = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(state.baseline_requires_grad.get(id(p), p.requires_grad))
            return super().create_optimizer(model)
        finally:
            for p, flag in zip(params, current):
                p.requires_grad_(flag)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._memory_config is not None:
            logs["micro_batch_size"] = self._memory_config.micro_batch_size
            logs["freeze_rate"] = self._memory_config.freeze_rate
            logs["checkpoint_segments"] = self._memory_config.checkpoint_segments
            if self._step_peak_bytes is not None:
                logs["peak_memory_mib"] = round(self._step_peak_bytes / 2**20, 1)
        super().log(logs, start_time)
