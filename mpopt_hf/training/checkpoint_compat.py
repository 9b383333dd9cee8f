"""Reload weights that a transformers checkpoint saved under legacy key names (a Trainer resume gap)."""

from __future__ import annotations

import logging
import os

from torch import nn

logger = logging.getLogger(__name__)


def reload_renamed_weights(model: nn.Module, checkpoint_dir: str) -> None:
    """Reload weights that transformers saved under legacy key names its Trainer resume does not map back.

    transformers 5.23 writes e.g. ViT and GPT-Neo checkpoints with their legacy key names, while
    ``Trainer._load_from_checkpoint`` loads the file as-is with ``strict=False``: the renamed blocks keep their
    current (e.g. random) weights and only a warning says so. ``from_pretrained`` applies the conversion.
    """
    from safetensors import safe_open
    from transformers import PreTrainedModel

    path = os.path.join(checkpoint_dir, "model.safetensors")
    if not isinstance(model, PreTrainedModel) or not os.path.isfile(path):
        return
    with safe_open(path, framework="pt") as f:
        saved = set(f.keys())
    if saved <= set(model.state_dict()):
        return
    reloaded = type(model).from_pretrained(checkpoint_dir, config=model.config)
    missing, unexpected = model.load_state_dict(reloaded.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"Could not restore the weights of {checkpoint_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    logger.info("reloaded %s through from_pretrained (its keys use legacy names)", checkpoint_dir)
