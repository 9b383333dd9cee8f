"""`ViTOnlineForImageClassification`: a `transformers.ViTForImageClassification` taking images in [0, 1], any size.

The online streams hold float images in [0, 1] at the data set's own size (digits 16-32 px, CIFAR-10-C 32 px);
a checkpoint such as ``google/vit-base-patch16-224`` wants 224 px normalised with its image processor's mean/std.
Resizing the data would multiply a stream's memory by (224/32)^2 = 49, and every shared piece (budget prediction,
evaluation, the engine) reads the data with ``with_format("torch")``, which drops a lazy transform. So the model
does it: ``forward`` resizes to ``config.image_size`` and normalises with ``config.image_mean``/``image_std``
(extra keys of the `ViTConfig`, saved with it). Everything else is ViT's own: the same modules, weights and keys,
so ``from_pretrained`` loads any ViT checkpoint and `mpopt_hf.model.blocks` sees family ``vit`` (the encoder layers as
blocks, the embeddings as stem, the final norm and the classifier as head).

Three ways to get one (`build_tiny`, `build_random`, `load_pretrained`); ``PUBLIC_CONFIGS`` holds the published
architectures, so ``--random_init`` builds them without a download.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

TINY = "tiny"
# ViTImageProcessor's defaults (IMAGENET_STANDARD_MEAN/STD), those of google/vit-*'s preprocessor_config.json
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
# the offline default: ~0.3 M parameters; image_size is set to the stream's (patch 4: 16 px -> 16 patches)
TINY_CONFIG = dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=192, patch_size=4,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# published architectures (their config.json on the hub), so --random_init needs neither weights nor the hub
_VIT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
_VIT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
PUBLIC_CONFIGS: dict[str, dict] = {
    "google/vit-base-patch16-224": dict(**_VIT_BASE, patch_size=16, image_size=224),
    "google/vit-base-patch32-224-in21k": dict(**_VIT_BASE, patch_size=32, image_size=224),
    "google/vit-base-patch16-384": dict(**_VIT_BASE, patch_size=16, image_size=384),
    "google/vit-large-patch16-224": dict(**_VIT_LARGE, patch_size=16, image_size=224),
}


class ModelNotAvailableError(OSError):
    """A ViT model id or folder that cannot be loaded without a download (or at all)."""


class ViTOnlineForImageClassification(ViTForImageClassification):
    """ViT for image classification on images in [0, 1] of any size: resized and normalised in ``forward``."""

    def forward(self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                interpolate_pos_encoding: bool | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        if pixel_values is not None:
            pixel_values = self.prepare_pixels(pixel_values)
        return super().forward(pixel_values=pixel_values, labels=labels,
                               interpolate_pos_encoding=interpolate_pos_encoding, attention_mask=attention_mask,
                               **kwargs)

    def prepare_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> ``config.image_size`` square, normalised as the checkpoint was trained."""
        size = self.config.image_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if tuple(pixel_values.shape[-2:]) != size:
            pixel_values = F.interpolate(pixel_values, size=size, mode="bilinear", align_corners=False)
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.config.image_mean, dtype=pixel_values.dtype, device=pixel_values.device).view(shape)
        std = torch.tensor(self.config.image_std, dtype=pixel_values.dtype, device=pixel_values.device).view(shape)
        return (pixel_values - mean) / std


def _labels(config: ViTConfig, class_names: Sequence[str]) -> ViTConfig:
    config.num_labels = len(class_names)
    config.id2label = dict(enumerate(class_names))
    config.label2id = {name: i for i, name in enumerate(class_names)}
    return config


def _normalisation(config: ViTConfig, mean: Sequence[float] = DEFAULT_MEAN,
                   std: Sequence[float] = DEFAULT_STD) -> ViTConfig:
    config.image_mean, config.image_std = [float(m) for m in mean], [float(s) for s in std]
    return config


def apply_overrides(config: ViTConfig, overrides: str | None) -> ViTConfig:
    """``"num_hidden_layers=2,hidden_size=32"`` written into ``config`` (``PretrainedConfig.update_from_string``,
    as transformers' run_clm ``--config_overrides``); a key the config lacks or a bad value raises ValueError."""
    if overrides:
        try:
            config.update_from_string(overrides)
        except ValueError as err:
            raise ValueError(f"ModelArguments.config_overrides {overrides!r}: {err} (expected 'key=value,...' with "
                             "keys of ViTConfig, e.g. 'num_hidden_layers=2,hidden_size=32').") from None
    return config


def tiny_config(class_names: Sequence[str], image_size: int, overrides: str | None = None) -> ViTConfig:
    """The offline default's config for ``image_size`` px images (``TINY_CONFIG``, then ``overrides``)."""
    config = apply_overrides(ViTConfig(**TINY_CONFIG, image_size=image_size), overrides)
    return _normalisation(_labels(config, class_names))


def public_config(name_or_path: str, class_names: Sequence[str], local_files_only: bool = True,
                  overrides: str | None = None) -> ViTConfig:
    """The architecture of a checkpoint without its weights: ``PUBLIC_CONFIGS`` for the published ones, else the
    config.json of a local folder or of the local Hugging Face cache (never downloaded unless asked)."""
    if name_or_path in PUBLIC_CONFIGS:
        config = ViTConfig(**PUBLIC_CONFIGS[name_or_path])
    else:
        try:
            config = ViTConfig.from_pretrained(name_or_path, local_files_only=local_files_only)
        except (OSError, ValueError) as error:
            raise ModelNotAvailableError(
                f"No ViT config for {name_or_path!r} (local_files_only={local_files_only}): {type(error).__name__}. "
                f"--random_init builds {sorted(PUBLIC_CONFIGS)} from the config written in vit_online.modeling; "
                "any other needs a folder with config.json or a hub id already in the local cache."
            ) from error
    config = apply_overrides(config, overrides)
    return _normalisation(_labels(config, class_names), *_processor_stats(name_or_path, local_files_only))


def build_tiny(class_names: Sequence[str], image_size: int, overrides: str | None = None,
               seed: int = 0) -> ViTOnlineForImageClassification:
    torch.manual_seed(seed)
    return ViTOnlineForImageClassification(tiny_config(class_names, image_size, overrides))


def build_random(name_or_path: str, class_names: Sequence[str], local_files_only: bool = True,
                 overrides: str | None = None, seed: int = 0) -> ViTOnlineForImageClassification:
    """``name_or_path``'s architecture with random weights: memory and step times are the real model's, its
    accuracies mean nothing."""
    torch.manual_seed(seed)
    return ViTOnlineForImageClassification(public_config(name_or_path, class_names, local_files_only, overrides))


def load_pretrained(name_or_path: str, class_names: Sequence[str], local_files_only: bool = True,
                    seed: int = 0) -> ViTOnlineForImageClassification:
    """A ViT checkpoint (hub id or folder) with its head re-sized to ``class_names`` (``ignore_mismatched_sizes``;
    the new head is initialised with ``seed``)."""
    torch.manual_seed(seed)
    config = _labels(ViTConfig(), class_names)
    try:
        model = ViTOnlineForImageClassification.from_pretrained(
            name_or_path, num_labels=config.num_labels, id2label=config.id2label, label2id=config.label2id,
            ignore_mismatched_sizes=True, local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        where = "the folder" if os.path.isdir(os.path.expanduser(name_or_path)) else "the local Hugging Face cache"
        raise ModelNotAvailableError(
            f"ViT model {name_or_path!r} could not be loaded from {where} (local_files_only={local_files_only}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
            "  expected: a hub id already in the cache or a folder with config.json and model weights of a ViT "
            "(e.g. google/vit-base-patch16-224).\n"
            f"  how to get it: on a machine with the hub, `huggingface-cli download {name_or_path}`; or "
            f"--random_init true for its architecture without weights; or the offline default --model {TINY}."
        ) from error
    _normalisation(model.config, *_processor_stats(name_or_path, local_files_only))
    return model


def load_cached(path) -> ViTOnlineForImageClassification:
    """A model this package saved (`online_recipe.cached_model`'s loader)."""
    return ViTOnlineForImageClassification.from_pretrained(path)


def _processor_stats(name_or_path: str, local_files_only: bool) -> tuple[Sequence[float], Sequence[float]]:
    """(image_mean, image_std) of the checkpoint's preprocessor_config.json (JSON, never pickle) if it is at hand,
    else ViTImageProcessor's defaults."""
    from transformers.utils import cached_file

    try:
        path = cached_file(name_or_path, "preprocessor_config.json", local_files_only=local_files_only,
                           _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        path = None
    if path is None:
        return DEFAULT_MEAN, DEFAULT_STD
    with open(path, encoding="utf-8") as handle:
        processor = json.load(handle)
    return processor.get("image_mean", DEFAULT_MEAN), processor.get("image_std", DEFAULT_STD)
