"""Real-size architectures built from their public configs, with random weights (nothing downloads).

Peak training memory depends on shapes, not on weight values, so a randomly initialised model
of the published configuration stands in for the checkpoint in every memory measurement here.

    model, make_batch = build("clip-b32")          # make_batch(n) -> a batch of n samples with a loss
    model, make_batch = build("sam-vit-b", image_size=1024)
    model, make_batch = build("clip-b32", tiny=True)   # same family, a few thousand parameters (--quick, tests)

`ARCHITECTURES` maps each name to its default training batch size here (see each entry below).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as tf

Batch = dict[str, torch.Tensor | bool]
MakeBatch = Callable[[int], Batch]


@dataclass(frozen=True)
class Architecture:
    """What one name builds: its default batch, its native input size and what that input is."""

    batch: int
    image_size: int | None  # None: a text model
    input: str


ARCHITECTURES_INFO: dict[str, Architecture] = {
    # small_cnn.build("resnet50", num_labels=10): the CIFAR ResNet-50 (3x3 stem, no max-pool), 32 px
    "resnet50-cifar": Architecture(128, 32, "32x32 RGB images, 10 classes (CIFAR-10 size)"),
    # small_cnn.build("mobilenetv2", num_labels=10): the CIFAR MobileNetV2, 32 px
    "mobilenetv2-cifar": Architecture(128, 32, "32x32 RGB images, 10 classes (CIFAR-10 size)"),
    # CLIPConfig() defaults are openai/clip-vit-base-patch32: ViT-B/32 image tower + 12-layer text tower
    "clip-b32": Architecture(32, 224, "224x224 RGB images + 16-token captions, contrastive loss (return_loss=True)"),
    # ViTConfig() defaults are google/vit-base-patch16-224 (ViT-B/16), with a 10-class head
    "vit-b16": Architecture(8, 224, "224x224 RGB images, 10 classes"),
    # EleutherAI/gpt-neo-125m's published config
    "gpt-neo-125m": Architecture(4, None, "128-token sequences, causal LM loss"),
    # SamConfig() defaults are facebook/sam-vit-base (ViT-B image encoder, native 1024 px). 1024 px costs tens of
    # seconds per sample on a CPU, so the default input here is 512 px (the encoder's position embedding is built
    # for that size); pass image_size=1024 for the native input.
    "sam-vit-b": Architecture(1, 512, "512x512 RGB images (native 1024: image_size=1024), one point prompt, mask BCE"),
}
ARCHITECTURES: dict[str, int] = {name: a.batch for name, a in ARCHITECTURES_INFO.items()}

CLIP_TEXT_LEN = 16
GPT_NEO_SEQ_LEN = 128
_TINY_ZOO = {"resnet50-cifar": "resnet50", "mobilenetv2-cifar": "mobilenetv2"}
_TINY_FAMILY = {"clip-b32": "clip", "vit-b16": "vit", "gpt-neo-125m": "gpt_neo", "sam-vit-b": "sam"}


def _check(name: str) -> Architecture:
    if name not in ARCHITECTURES_INFO:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES_INFO)}")
    return ARCHITECTURES_INFO[name]


def _images(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=g)


def _classify_batches(size: int, num_labels: int, seed: int) -> MakeBatch:
    g = torch.Generator().manual_seed(seed)
    return lambda n: {"pixel_values": _images(n, size, g), "labels": torch.randint(0, num_labels, (n,), generator=g)}


def _clip_batches(size: int, vocab: int, text_len: int, seed: int) -> MakeBatch:
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> Batch:
        ids = torch.randint(3, vocab - 1, (n, text_len), generator=g)
        ids[:, -1] = vocab - 1  # the highest id marks the end of text, where CLIP pools
        return {"pixel_values": _images(n, size, g), "input_ids": ids, "return_loss": True}

    return make


def _lm_batches(vocab: int, seq_len: int, seed: int) -> MakeBatch:
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> Batch:
        ids = torch.randint(0, vocab, (n, seq_len), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}

    return make


def _sam_batches(size: int, seed: int) -> MakeBatch:
    g = torch.Generator().manual_seed(seed)
    return lambda n: {"pixel_values": _images(n, size, g),
                      "input_points": torch.rand(n, 1, 1, 2, generator=g) * size,
                      "labels": (torch.rand(n, size, size, generator=g) > 0.5).long()}


def _sam_config(image_size: int) -> tf.SamConfig:
    """SamConfig's ViT-B defaults at ``image_size`` px (the prompt encoder follows the encoder's grid)."""
    patch = tf.SamVisionConfig().patch_size
    return tf.SamConfig(vision_config={"image_size": image_size},
                        prompt_encoder_config={"image_size": image_size, "image_embedding_size": image_size // patch})


def _build_full(name: str, size: int | None, seed: int) -> tuple[torch.nn.Module, MakeBatch]:
    if name in _TINY_ZOO:
        import small_cnn

        return small_cnn.build(_TINY_ZOO[name], num_labels=10), _classify_batches(size or 32, 10, seed)
    if name == "clip-b32":
        cfg = tf.CLIPConfig()
        cfg.vision_config.image_size = size or 224
        return tf.CLIPModel(cfg), _clip_batches(size or 224, cfg.text_config.vocab_size, CLIP_TEXT_LEN, seed)
    if name == "vit-b16":
        return (tf.ViTForImageClassification(tf.ViTConfig(num_labels=10, image_size=size or 224)),
                _classify_batches(size or 224, 10, seed))
    if name == "gpt-neo-125m":
        cfg = tf.GPTNeoConfig(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, window_size=256,
                              attention_types=[[["global", "local"], 6]], max_position_embeddings=2048)
        return tf.GPTNeoForCausalLM(cfg), _lm_batches(cfg.vocab_size, GPT_NEO_SEQ_LEN, seed)
    from mpopt_hf.testing.tiny_models import SamForMaskTraining

    return SamForMaskTraining(_sam_config(size or 512)), _sam_batches(size or 512, seed)


def _build_tiny(name: str, seed: int) -> tuple[torch.nn.Module, MakeBatch]:
    from mpopt_hf.testing import tiny_models

    if name in _TINY_ZOO:
        import small_cnn

        zoo = _TINY_ZOO[name]
        model = small_cnn.build(zoo, num_labels=10, **small_cnn.tiny_overrides(zoo))
    else:
        model = tiny_models.build_tiny(_TINY_FAMILY[name], seed=seed)
    return model, lambda n: tiny_models.example_batch(model, n, seed=seed)


def build(name: str, image_size: int | None = None, tiny: bool = False, seed: int = 0) -> tuple[torch.nn.Module, MakeBatch]:
    """``(model, make_batch)`` for architecture ``name``; ``make_batch(n)`` returns n samples the model turns into a loss.

    ``image_size`` overrides the input size of an image model (default: `ARCHITECTURES_INFO[name].image_size`);
    ``tiny=True`` builds the same family with a few channels (its own small input), for quick runs and tests.
    Weights are random (``torch.manual_seed(seed)``); build under ``torch.device("meta")`` to count parameters only.
    """
    info = _check(name)
    torch.manual_seed(seed)
    if tiny:
        return _build_tiny(name, seed)
    if image_size is not None and info.image_size is None:
        raise ValueError(f"{name} is a text model; it takes no image_size")
    return _build_full(name, image_size or info.image_size, seed)


def build_named(name: str, tiny: bool = False, image_size: int | None = None,
                seed: int = 0) -> tuple[torch.nn.Module, MakeBatch, str]:
    """``(model, make_batch, what the input is)`` for any name the cards accept.

    An `ARCHITECTURES` name; a `small_cnn.MODEL_NAMES` name (the zoo at full width, 32 px, 10 classes; ``tiny``: its
    few-channel variant); or a `mpopt_hf.testing.tiny_models.TINY_FAMILIES` name (always the tiny HF model).
    """
    import small_cnn
    from mpopt_hf.testing import tiny_models

    if name in ARCHITECTURES_INFO:
        model, make = build(name, image_size=image_size, tiny=tiny, seed=seed)
        return model, make, ("tiny variant" if tiny else ARCHITECTURES_INFO[name].input)
    if name in small_cnn.MODEL_NAMES:
        torch.manual_seed(seed)
        overrides = small_cnn.tiny_overrides(name) if tiny else {}
        model = small_cnn.build(name, num_labels=10, **overrides)
        size = image_size or 32
        width = "few-channel variant" if tiny else "full width"
        return model, _classify_batches(size, 10, seed), f"{size}x{size} RGB images, 10 classes ({width})"
    if name in tiny_models.TINY_FAMILIES:
        model = tiny_models.build_tiny(name, seed=seed)
        return model, lambda n: tiny_models.example_batch(model, n, seed=seed), "mpopt_hf.testing.tiny_models config"
    known = [*ARCHITECTURES_INFO, *small_cnn.MODEL_NAMES, *tiny_models.TINY_FAMILIES]
    raise ValueError(f"unknown model {name!r}; known: {', '.join(known)}")


__all__ = ["ARCHITECTURES", "ARCHITECTURES_INFO", "Architecture", "build", "build_named"]
