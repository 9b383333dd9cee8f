"""The optimizer MPOptTrainer builds and reloads: one over every parameter the user made trainable (a knob's
freezing must not drop a block from it for good), bitsandbytes' AdamW when 8-bit state may be chosen, and a
checkpoint's state translated when it was saved with the other optimizer. A mixin of `MPOptTrainer`."""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer

from ..model.knobs import knob_state
from .optimizer_state import adapt_loaded_state, switchable_adamw


class OptimizerSetup(Trainer):
    """Trainer's optimizer creation and loading, with the knobs' needs; ``low_bit_optimizer`` is the trainer's."""

    low_bit_optimizer: bool

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer over every parameter the user made trainable; bitsandbytes' AdamW (32-bit until a
        configuration asks for 8) when 8-bit optimizer state may be chosen."""
        built_here = self.optimizer is None
        optimizer = self._optimizer_over_every_parameter(model)
        if self.low_bit_optimizer and built_here:
            self.optimizer = optimizer = switchable_adamw(optimizer)
        return optimizer

    def _optimizer_over_every_parameter(self, model: nn.Module | None) -> torch.optim.Optimizer:
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

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.optimizer is not None:
            adapt_loaded_state(self.optimizer)  # saved by a run with the other optimizer (8-bit state listed or not)
