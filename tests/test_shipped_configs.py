"""Every model configuration the project ships, built on the meta device (full-size ones cost no memory and no
time): its parameter count is the published one where there is one, and its config round-trips through
``to_dict``/``from_dict`` to the same architecture with the values the project wrote.

Shipped: vit_online.modeling (PUBLIC_CONFIGS, the tiny preset), clip_online.loading.OFFLINE_PRESETS,
lm_online.modeling (GPT-Neo-125M's config values, the tiny model), sam_online.modeling (SAM ViT-B, the tiny one),
small_cnn (MODEL_NAMES and their tiny overrides) and memory_cards.architectures (the memory cards' real-size
models). No package ships a config file (pyproject's package-data would take *.json; there is none).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import small_cnn
from clip_online.loading import OFFLINE_PRESETS, build_tiny_clip
from clip_online.run import DIGIT_NAMES
from clip_online.tokenizer import WordTokenizer
from lm_online.modeling import GPT_NEO_125M, ModelArguments, gpt_neo_125m_config, tiny_config
from sam_online.modeling import RANDOM_INIT_CONFIGS, SAM_VIT_B
from sam_online.modeling import build_model as build_sam
from vit_online.modeling import PUBLIC_CONFIGS, TINY_CONFIG, build_random, build_tiny

IMAGENET = [f"class{i}" for i in range(1000)]
DIGITS = [str(i) for i in range(10)]

# ---------------------------------------------------------------------------- published counts, and why
# google/vit-base-patch16-224 (ViT-B/16, ImageNet-1k head): its hub card's 86.6 M, exactly 86,567,656
VIT_B16 = 86_567_656
# torchvision's documented num_params (its models' weight tables); our CIFAR ResNets have a 3x3 stem for torchvision's
# 7x7 (3 -> 64 channels, no bias) and no other difference in parameters
TV_RESNET = {"resnet18": 11_689_512, "resnet50": 25_557_032, "resnet101": 44_549_160}
CIFAR_STEM = 64 * 3 * (7 * 7 - 3 * 3)
TV_MOBILENET_V2 = 3_504_872  # torchvision mobilenet_v2: ours changes strides only
PUBLISHED_VIT = {  # with the 1000-class head
    "google/vit-base-patch16-224": VIT_B16,
    # 384 px: the same weights but 577 positions for 197 (timm's vit_base_patch16_384: 86.86 M)
    "google/vit-base-patch16-384": VIT_B16 + (577 - 197) * 768,
    # patch 32: a 3x32x32 -> 768 projection for 3x16x16 and 50 positions for 197 (timm's vit_base_patch32_224: 88.22 M)
    "google/vit-base-patch32-224-in21k": VIT_B16 + 3 * (32**2 - 16**2) * 768 + (50 - 197) * 768,
    # timm's vit_large_patch16_224 (the hub card's 304 M), exactly 304,326,632
    "google/vit-large-patch16-224": 304_326_632,
}
# EleutherAI/gpt-neo-125m: its card's 125 M; exactly 125,198,592 (tests/test_recipe_gpt_neo_lm_online.py derives it)
GPT_NEO_125M_COUNT = 125_198_592
# segment-anything's sam_vit_b sums to 93,735,472 (as MedSAM's training script prints it); transformers' SamModel
# also counts the prompts' 2 x 128 random Fourier matrix, a parameter there and a buffer in segment-anything
SAM_VIT_B_COUNT = 93_735_472 + 2 * 128
# openai/clip-vit-base-patch32: 151,277,313 (MTEB's and keras-hub's model metadata)
CLIP_B32 = 151_277_313


def _head_of(count_1000: int, features: int, labels: int) -> int:
    """A published 1000-class count with a ``labels``-class linear head (weight and bias) instead."""
    return count_1000 - (1000 - labels) * (features + 1)


PUBLISHED_SMALL_CNN = {  # with the 1000-class head
    **{name: count - CIFAR_STEM for name, count in TV_RESNET.items()},
    "mobilenetv2": TV_MOBILENET_V2,
}
PUBLISHED_MEMORY_CARDS = {
    "clip-b32": CLIP_B32,
    "vit-b16": _head_of(VIT_B16, 768, 10),
    "gpt-neo-125m": GPT_NEO_125M_COUNT,
    "resnet50-cifar": _head_of(TV_RESNET["resnet50"] - CIFAR_STEM, 2048, 10),
    "mobilenetv2-cifar": _head_of(TV_MOBILENET_V2, 1280, 10),
}  # sam-vit-b: built at 512 px (its position and relative-position tables shrink): no published count


# ---------------------------------------------------------------------------- helpers


def _on_meta(build, *args, **kwargs) -> nn.Module:
    with torch.device("meta"):
        model = build(*args, **kwargs)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated, nothing initialised
    return model


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _assert_round_trips(model: nn.Module, written: dict[str, Any]) -> None:
    """The config keeps the values written (nested configs as dicts) and ``from_dict(to_dict())`` builds the same
    architecture: parameter names and shapes."""
    saved = model.config.to_dict()
    for key, value in written.items():
        got = len(saved["id2label"]) if key == "num_labels" else saved[key]  # to_dict keeps the labels, not their count
        if isinstance(value, dict):
            assert {k: got[k] for k in value} == {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
        else:
            assert got == (list(value) if isinstance(value, tuple) else value), key
    again = _on_meta(type(model), type(model.config).from_dict(saved))
    assert _shapes(again) == _shapes(model)


# ---------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("name", sorted(PUBLIC_CONFIGS))
def test_vit_public_configs(name):
    model = _on_meta(build_random, name, IMAGENET)
    assert _count(model) == PUBLISHED_VIT[name]
    _assert_round_trips(model, {**PUBLIC_CONFIGS[name], "num_labels": 1000})


def test_vit_published_counts_cover_every_public_config():
    assert set(PUBLISHED_VIT) == set(PUBLIC_CONFIGS)
    assert PUBLISHED_VIT["google/vit-base-patch32-224-in21k"] == 88_224_232


def test_vit_tiny_preset():
    model = _on_meta(build_tiny, DIGITS, 16)
    assert 0.25e6 < _count(model) < 0.35e6  # README: "about 0.3 M parameters"
    _assert_round_trips(model, {**TINY_CONFIG, "image_size": 16, "num_labels": 10})


# ---------------------------------------------------------------------------- CLIP


@pytest.mark.parametrize("preset", sorted(OFFLINE_PRESETS))
def test_clip_offline_presets(preset):
    tokenizer = WordTokenizer.from_texts([f"a photo of a {c}." for c in DIGIT_NAMES])
    model = _on_meta(build_tiny_clip, tokenizer, image_size=32, preset=preset)
    sizes = OFFLINE_PRESETS[preset]
    _assert_round_trips(model, {"projection_dim": sizes["projection_dim"],
                                "text_config": {**sizes["text"], "vocab_size": tokenizer.vocab_size},
                                "vision_config": {**sizes["vision"], "image_size": 32}})


# ---------------------------------------------------------------------------- GPT-Neo


def test_gpt_neo_125m_from_its_config_values():
    from transformers import GPTNeoForCausalLM

    model = _on_meta(GPTNeoForCausalLM, gpt_neo_125m_config())
    assert _count(model) == GPT_NEO_125M_COUNT
    _assert_round_trips(model, GPT_NEO_125M)


def test_gpt_neo_tiny_model():
    from transformers import GPTNeoForCausalLM

    args = ModelArguments()  # the offline default's sizes
    model = _on_meta(GPTNeoForCausalLM, tiny_config(args, 1024, 64, 0))
    assert 0.5e6 < _count(model) < 0.6e6  # README: "a 0.55 M-parameter GPT-Neo" with the 1024-token BPE
    _assert_round_trips(model, {"num_layers": args.num_layers, "hidden_size": args.hidden_size, "vocab_size": 1024,
                                "num_heads": args.num_heads, "window_size": args.window_size,
                                "attention_types": [[["global", "local"], args.num_layers // 2]]})


# ---------------------------------------------------------------------------- SAM


def test_sam_vit_b_from_its_config_values():
    assert list(RANDOM_INIT_CONFIGS) == [SAM_VIT_B]  # a new architecture here needs its own count below
    model = _on_meta(build_sam, SAM_VIT_B, random_init=True)
    assert _count(model) == SAM_VIT_B_COUNT
    _assert_round_trips(model, {"vision_config": {"hidden_size": 768, "num_hidden_layers": 12, "patch_size": 16,
                                                  "image_size": 1024, "global_attn_indexes": [2, 5, 8, 11]}})


def test_sam_tiny_model():
    model = _on_meta(build_sam, "tiny", image_size=64)
    assert 0.15e6 < _count(model) < 0.21e6  # sam_online.run: "about 0.18 M parameters"
    _assert_round_trips(model, {"vision_config": {"hidden_size": 64, "num_hidden_layers": 2, "image_size": 64,
                                                  "patch_size": 8}})


# ---------------------------------------------------------------------------- small_cnn


@pytest.mark.parametrize("name", small_cnn.MODEL_NAMES)
def test_small_cnn_models_full_and_tiny(name):
    full = _on_meta(small_cnn.build, name, num_labels=1000)
    if name in PUBLISHED_SMALL_CNN:
        assert _count(full) == PUBLISHED_SMALL_CNN[name]
    _assert_round_trips(full, {**small_cnn._PRESETS[name][1], "num_labels": 1000})
    tiny = _on_meta(small_cnn.build, name, **small_cnn.tiny_overrides(name))
    assert _count(tiny) < _count(full) / 20
    _assert_round_trips(tiny, small_cnn.tiny_overrides(name))


# ---------------------------------------------------------------------------- memory_cards


def _memory_card_names() -> list[str]:
    from memory_cards.architectures import ARCHITECTURES

    return list(ARCHITECTURES)


@pytest.mark.parametrize("name", _memory_card_names())
def test_memory_card_architectures(name):
    from memory_cards.architectures import build

    model = _on_meta(lambda: build(name)[0])
    if name in PUBLISHED_MEMORY_CARDS:
        assert _count(model) == PUBLISHED_MEMORY_CARDS[name]
    _assert_round_trips(model, {})
