"""The models and batches ``mpopt`` profiles: ``--model`` resolved to a model, and a random labelled batch for it.

``--model`` is a small_cnn name (``tiny-<name>``: a few-channel variant), a tiny Hugging Face config built offline
(`TINY_FAMILIES`), a local directory with config.json, or a hub id (``org/name``: the hub, or a copy already in the
local cache). Nothing here reads the flags; a name or shape that does not fit raises `UsageError` naming it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import Any

from .arguments import UsageError

TINY_FAMILIES = {"tiny-vit": "vit", "tiny-gpt-neo": "gpt_neo", "tiny-clip": "clip", "tiny-sam": "sam",
                 "tiny-mobilevit": "mobilevit"}


def _zoo() -> Any | None:
    """The CNN zoo, imported only here and only if installed (mpopt_hf itself does not depend on it)."""
    try:
        return importlib.import_module("small_cnn")
    except ImportError:
        return None


def accepted_models() -> str:
    zoo = _zoo()
    names = list(zoo.MODEL_NAMES) if zoo else []
    return (f"a small_cnn name {names} (prefix tiny- for a few-channel variant), a tiny HF config "
            f"{sorted(TINY_FAMILIES)}, a local directory with config.json, or a hub id such as org/name")


def load_model(name: str, num_labels: int = 10) -> Any:
    """Resolve ``--model``: zoo name, tiny config, local path or hub id."""
    zoo = _zoo()
    if name in TINY_FAMILIES:
        from ..testing.tiny_models import build_tiny

        return build_tiny(TINY_FAMILIES[name])
    base = name[len("tiny-"):] if name.startswith("tiny-") else name
    if zoo is not None and base in zoo.MODEL_NAMES:
        overrides = zoo.tiny_overrides(base) if name.startswith("tiny-") else {}
        return zoo.build(base, num_labels=num_labels, **overrides)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise UsageError(f"--model {name!r} is a directory without config.json; accepted: {accepted_models()}.")
        return _load_pretrained(path)
    if os.path.exists(path):
        raise UsageError(f"--model {name!r} is a file, not a directory with config.json; "
                         f"accepted: {accepted_models()}.")
    if _looks_like_path(name):
        raise UsageError(f"--model {name!r}: the local path {os.path.abspath(path)} does not exist. A local model "
                         f"is a directory with config.json; a hub id (org/name) needs the hub or a copy already in the "
                         f"local Hugging Face cache. Accepted: {accepted_models()}.")
    if name.count("/") == 1:
        return _load_pretrained(name)
    raise UsageError(f"Unknown --model {name!r}; accepted: {accepted_models()}.")


def _looks_like_path(name: str) -> bool:
    """Not a hub id (``name`` or ``org/name``): absolute, relative (``./``, ``../``), home (``~``) or nested paths."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/") or "\\" in name


def _load_pretrained(name: str) -> Any:
    import transformers as tf

    try:
        config = tf.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        where = "" if os.path.isdir(name) else " (a hub id needs the hub, or a copy already in the local cache)"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"Cannot load --model {name!r}{where}: {first}; accepted: {accepted_models()}.") from err
    for auto in (tf.AutoModelForImageClassification, tf.AutoModelForCausalLM, tf.AutoModel):
        try:
            return auto.from_pretrained(name)
        except (ValueError, KeyError):
            continue
    raise UsageError(f"No model class for {name!r} (model_type {config.model_type!r}).")


def synthetic_batch(model: Any, batch_size: int, input_shape: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """A random labelled batch of ``batch_size`` samples of ``input_shape`` that ``model`` turns into a loss."""
    import torch

    input_shape = tuple(input_shape)

    g = torch.Generator().manual_seed(seed)
    config = model.config
    name = type(model).__name__
    vision = getattr(config, "vision_config", None)
    text = getattr(config, "text_config", None)

    def image(expected_size: int | None = None, channels: int = 3) -> Any:
        if len(input_shape) != 3:
            raise UsageError(f"--input-shape for {name} must be C,H,W (e.g. {channels},32,32); got "
                             f"{','.join(map(str, input_shape))}.")
        if input_shape[0] != channels:
            raise UsageError(f"--input-shape for {name} must have {channels} channels; got {input_shape[0]}.")
        if expected_size is not None and input_shape[1:] != (expected_size, expected_size):
            raise UsageError(f"--input-shape for {name} must be {channels},{expected_size},{expected_size} "
                             f"(its config's image size); got {','.join(map(str, input_shape))}.")
        return torch.randn(batch_size, *input_shape, generator=g)

    if name.startswith("CLIP") and vision is not None and text is not None:
        length = min(text.max_position_embeddings, 16)
        ids = torch.randint(3, text.vocab_size, (batch_size, length), generator=g)
        ids[:, -1] = getattr(text, "eos_token_id", 1) or 1
        return {"pixel_values": image(vision.image_size), "input_ids": ids, "return_loss": True}
    if name.startswith("Sam") and vision is not None:
        size = vision.image_size
        return {"pixel_values": image(size), "input_points": torch.rand(batch_size, 1, 1, 2, generator=g) * size,
                "labels": (torch.rand(batch_size, size, size, generator=g) > 0.5).long()}
    if hasattr(config, "vocab_size") and not hasattr(config, "image_size"):
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if len(input_shape) != 1 or (limit and input_shape[0] > limit):
            raise UsageError(f"--input-shape for the text model {name} must be one sequence length"
                             f"{f' up to {limit}' if limit else ''} (e.g. 64); got {','.join(map(str, input_shape))}.")
        ids = torch.randint(0, config.vocab_size, (batch_size, input_shape[0]), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}
    return {"pixel_values": image(None, getattr(config, "num_channels", 3)),
            "labels": torch.randint(0, getattr(config, "num_labels", 10), (batch_size,), generator=g)}
