"""Checkpoints of a run whose model carries the LoRA knob's adapters (`MemoryConfig.lora_rank`): a mixin of
`MPOptTrainer`.

A checkpoint holds the *plain* model, each adapter merged into its weight out of place, and the optimizer state
without the adapters' moments, so it loads into the model as the user built it, with or without LoRA, whatever
rank the run resumes at (the engine state then injects fresh adapters). Nothing is changed in the running model or
optimizer: saving does not alter the run.
"""

from __future__ import annotations

from transformers import Trainer

from ..model.blocks import unwrap_model
from ..model.lora import adapter_parameters, plain_state_dict
from .adapter_optimizer import holds_adapters, without_adapters


class AdapterCheckpoints(Trainer):
    """Trainer's saving with the knob's adapters merged out of place."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = unwrap_model(self.model)
        if adapter_parameters(model):
            state_dict = plain_state_dict(model, state_dict)
        super()._save(output_dir, state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.optimizer is None or not holds_adapters(self.optimizer):
            return super()._save_optimizer_and_scheduler(output_dir)
        with without_adapters(self.optimizer):
            super()._save_optimizer_and_scheduler(output_dir)
