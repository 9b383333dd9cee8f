"""CIFAR-size CNN zoo as `transformers` models: ResNet-18/50/101, ResNeXt-29, MobileNetV2, MobileViT-XXS.

Every model is a `PreTrainedModel` made of `stem`, `blocks` (an `nn.ModuleList`
of `GradientCheckpointingLayer`s) and `head`, registered with `AutoConfig` and
`AutoModelForImageClassification` on import::

    import small_cnn
    model = small_cnn.build("resnet50", num_labels=10)
    tiny = small_cnn.build("resnet50", **small_cnn.tiny_overrides("resnet50"))  # for tests
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig

from . import _mpopt  # noqa: F401  registers the zoo's block adapter with mpopt_hf
from ._base import SmallCNNPreTrainedModel
from .mobilenet_v2 import SmallMobileNetV2Config, SmallMobileNetV2ForImageClassification
from .mobilevit import SmallMobileViTConfig, SmallMobileViTForImageClassification
from .resnet import SmallResNetConfig, SmallResNetForImageClassification
from .resnext import SmallResNeXtConfig, SmallResNeXtForImageClassification

_MODEL_FOR_CONFIG: dict[type[PretrainedConfig], type[SmallCNNPreTrainedModel]] = {
    SmallResNetConfig: SmallResNetForImageClassification,
    SmallResNeXtConfig: SmallResNeXtForImageClassification,
    SmallMobileNetV2Config: SmallMobileNetV2ForImageClassification,
    SmallMobileViTConfig: SmallMobileViTForImageClassification,
}

for _config_cls, _model_cls in _MODEL_FOR_CONFIG.items():
    # exist_ok: re-importing (e.g. importlib.reload in a notebook) must not fail.
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForImageClassification.register(_config_cls, _model_cls, exist_ok=True)

# name -> (config class, the fields that make it that model on top of the config's defaults)
_PRESETS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "resnet18": (SmallResNetConfig, {"block_type": "basic", "depths": (2, 2, 2, 2)}),
    "resnet50": (SmallResNetConfig, {"block_type": "bottleneck", "depths": (3, 4, 6, 3)}),
    "resnet101": (SmallResNetConfig, {"block_type": "bottleneck", "depths": (3, 4, 23, 3)}),
    "resnext29": (SmallResNeXtConfig, {}),
    "mobilenetv2": (SmallMobileNetV2Config, {}),
    "mobilevit_xxs": (SmallMobileViTConfig, {}),
}

# Same depth (so the same number of blocks) but a handful of channels: forward +
# backward on a 4x3x32x32 batch in milliseconds, for tests.
_TINY_RESNET = {"stem_width": 8, "widths": (4, 4, 8, 8)}
_TINY: dict[str, dict[str, Any]] = {
    "resnet18": _TINY_RESNET,
    "resnet50": _TINY_RESNET,
    "resnet101": _TINY_RESNET,
    "resnext29": {"stem_width": 8, "cardinality": 2, "bottleneck_width": 2},
    "mobilenetv2": {
        "stem_width": 8,
        "widths": (8, 8, 8, 16, 16, 16, 16),
        "expand_ratios": (1, 2, 2, 2, 2, 2, 2),
        "head_width": 32,
    },
    "mobilevit_xxs": {
        "stem_width": 8,
        "widths": (8, 8, 16, 16, 16),
        "transformer_dims": (0, 0, 16, 16, 16),
        "transformer_depths": (0, 0, 1, 1, 1),
        "num_attention_heads": 2,
        "head_width": 32,
    },
}

MODEL_NAMES: list[str] = list(_PRESETS)


def _preset(name: str) -> tuple[type[PretrainedConfig], dict[str, Any]]:
    """Look a name up, or fail with the list of names that would have worked."""
    if name not in _PRESETS:
        raise ValueError(f"unknown small_cnn model {name!r}; accepted names: {', '.join(MODEL_NAMES)}")
    return _PRESETS[name]


def get_config(name: str, num_labels: int = 10, **config_overrides: Any) -> PretrainedConfig:
    """The config of model `name` with `num_labels` classes; overrides must be fields of that config."""
    config_cls, preset = _preset(name)
    allowed = {f.name for f in dataclasses.fields(config_cls)} | {"num_labels"}
    unknown = sorted(set(config_overrides) - allowed)
    if unknown:
        raise ValueError(
            f"{config_cls.__name__} (model {name!r}) has no field(s) {unknown}; "
            f"model fields: {', '.join(sorted(allowed - {f.name for f in dataclasses.fields(PretrainedConfig)}))}"
        )
    return config_cls(**{**preset, **config_overrides, "num_labels": num_labels})


def tiny_overrides(name: str) -> dict[str, Any]:
    """Config overrides that keep `name`'s block structure with only a few channels (for tests)."""
    _preset(name)
    return dict(_TINY[name])


def tiny_config(name: str, num_labels: int = 10, **config_overrides: Any) -> PretrainedConfig:
    """A very small variant of `name`: same number of blocks, a few channels per layer."""
    return get_config(name, num_labels=num_labels, **{**tiny_overrides(name), **config_overrides})


def build(name: str, num_labels: int = 10, **config_overrides: Any) -> SmallCNNPreTrainedModel:
    """Build model `name` (one of `MODEL_NAMES`) with fresh weights."""
    config = get_config(name, num_labels=num_labels, **config_overrides)
    return _MODEL_FOR_CONFIG[type(config)](config)


__all__ = [
    "MODEL_NAMES",
    "SmallCNNPreTrainedModel",
    "SmallMobileNetV2Config",
    "SmallMobileNetV2ForImageClassification",
    "SmallMobileViTConfig",
    "SmallMobileViTForImageClassification",
    "SmallResNeXtConfig",
    "SmallResNeXtForImageClassification",
    "SmallResNetConfig",
    "SmallResNetForImageClassification",
    "build",
    "get_config",
    "tiny_config",
    "tiny_overrides",
]
