"""Checkpoints of a run whose model carries the LoRA knob's adapters (`MemoryConfig.lora_rank`): a mixin of
`MPOptTrainer`.

A checkpoint holds the *plain* model, each adapter merged into its weight out of place, and the optimizer state
without the adapters' moments, so it loads into the model as the user built it, with or without LoRA, whatever
rank the run resumes at (the engine state then injects fresh adapters). Nothing is changed in the running model or
optimizer: saving does not alter the run.

When training ends (and before ``load_best_model_at_end`` loads a plain checkpoint) the adapters are merged into
their weights, so the model the user holds afterwards is the plain model, with what the adapters learned; a later
``train()`` injects fresh ones at the configuration's rank.
"""

from __future__ import annotations

from transformers import Trainer

from typing import Any

from ..model.blocks import unwrap_model
from ..model.knobs import place_adapters
from ..model.lora import LoraPlacement, adapter_parameters, plain_state_dict
from .adapter_optimizer import holds_adapters, sync_adapters, without_adapters
from .checkpoint_compat import reload_renamed_weights


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

    def train(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().train(*args, **kwargs)
        finally:  # also when training stops on an error: the model left behind is the plain one
            self.merge_adapters()

    def _load_best_model(self) -> None:
        self.merge_adapters()  # the best checkpoint holds the plain model: load it into the plain model
        super()._load_best_model()
        best = self.state.best_model_checkpoint
        if best:  # Trainer loads the file as-is, so blocks saved under legacy key names would keep their weights
            reload_renamed_weights(unwrap_model(self.model), best)

    def merge_adapters(self) -> bool:
        """Merge the LoRA knob's adapters into their weights and leave the plain model (its function unchanged);
        the configuration in effect is applied again, with fresh adapters, at the next step. False if there were
        none."""
        model = unwrap_model(self.model)
        if not adapter_parameters(model) or not place_adapters(model, LoraPlacement()):
            return False
        if self.optimizer is not None:
            sync_adapters(self.optimizer, model)
        config = getattr(self, "_memory_config", None)
        if config is not None and getattr(self, "_pending_config", None) is None:
            self._pending_config = config
        return True
