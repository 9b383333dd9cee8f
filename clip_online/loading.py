"""Get a CLIP (a hub id or a local folder, or the tiny offline one) and its tokenizer.

Nothing is downloaded unless the caller says so (``local_files_only=False``):
a missing model fails with the id, where we looked and how to get it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import CLIPConfig, CLIPModel

from .modeling import DEFAULT_TEMPLATES, CLIPClassifier
from .tokenizer import EOS_ID, PAD_ID, BOS_ID, WordTokenizer

TINY = "tiny"
SMALL = "small"
# CLIPs built offline from a config, sized for a 2-core CPU: "tiny" (61,825 parameters in its CLIPModel, for tests)
# and "small" (890,753: its knobs matter, a step of 64 images at 32 px takes a fraction of a second)
OFFLINE_PRESETS = {
    TINY: dict(text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2),
               vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, patch_size=8), projection_dim=32),
    SMALL: dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
                vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, patch_size=4),
                projection_dim=64),
}


class ModelNotAvailableError(OSError):
    """A CLIP model id or folder that cannot be loaded without a download (or at all)."""


def build_tiny_clip(tokenizer: WordTokenizer, image_size: int = 32, seed: int = 0, preset: str = TINY) -> CLIPModel:
    """A random CLIP of one of `OFFLINE_PRESETS` whose text tower fits ``tokenizer``."""
    if preset not in OFFLINE_PRESETS:
        raise ValueError(f"Unknown offline CLIP preset {preset!r}; known: {sorted(OFFLINE_PRESETS)}.")
    sizes = OFFLINE_PRESETS[preset]
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            **sizes["text"],
            num_attention_heads=4,
            vocab_size=tokenizer.vocab_size,
            max_position_embeddings=32,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        ),
        vision_config=dict(**sizes["vision"], num_attention_heads=4, image_size=image_size),
        projection_dim=sizes["projection_dim"],
    )
    return CLIPModel(config)


def load_clip(name_or_path: str, class_names: Sequence[str] = (), templates: Sequence[str] = DEFAULT_TEMPLATES,
              local_files_only: bool = True, seed: int = 0):
    """``(CLIPModel, tokenizer)`` for ``name_or_path``; ``"tiny"`` builds the offline one over the prompts."""
    if name_or_path in OFFLINE_PRESETS:
        tokenizer = WordTokenizer.from_texts([t.format(c) for t in templates for c in class_names])
        return build_tiny_clip(tokenizer, seed=seed, preset=name_or_path), tokenizer
    from transformers import AutoTokenizer

    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(
            f"The CLIP folder {name_or_path!r} does not exist. Pass a folder with config.json, model weights and "
            f"tokenizer files of a CLIPModel, a hub id already in the local cache (hub ids need the hub), or the "
            f"offline default {TINY!r}."
        )
    try:
        model = CLIPModel.from_pretrained(name_or_path, local_files_only=local_files_only)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        where = "the folder" if os.path.isdir(name_or_path) else "the local Hugging Face cache"
        raise ModelNotAvailableError(
            f"CLIP model {name_or_path!r} could not be loaded from {where} (local_files_only={local_files_only}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
            f"  expected: a hub id already in the cache or a folder with config.json, model weights and tokenizer "
            f"files of a CLIPModel (e.g. openai/clip-vit-base-patch32).\n"
            f"  how to get it: on a machine with the hub, `huggingface-cli download {name_or_path}` (or "
            f"`CLIPModel.from_pretrained('{name_or_path}').save_pretrained(DIR)` and pass DIR); "
            f"or use the offline default --model {TINY}."
        ) from error
    return model, tokenizer


def build_classifier(name_or_path: str, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                     local_files_only: bool = True, seed: int = 0, **config_kwargs) -> CLIPClassifier:
    """The zero-shot `CLIPClassifier` of a CLIP (see `load_clip`)."""
    if not class_names:
        raise ValueError("build_classifier needs the class names (they make the zero-shot head).")
    clip, tokenizer = load_clip(name_or_path, class_names, templates, local_files_only=local_files_only, seed=seed)
    return CLIPClassifier.from_clip(clip, tokenizer, class_names, templates, **config_kwargs)
