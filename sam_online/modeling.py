"""SAM with a mask loss, so `MPOptTrainer` can retrain it: transformers' `SamModel` computes none.

`SamForBoxSegmentation` is a `SamModel` (same modules and weight names, so ``facebook/sam-vit-base`` loads into it
and `mpopt_hf.model.blocks.find_blocks` reads it as SAM: the vision encoder's layers are the blocks, the neck, prompt
encoder and mask decoder the head, which stays trainable at every freeze rate) whose ``forward(pixel_values,
input_boxes, labels)`` takes images in [0, 1] (it normalises them as SamProcessor does), one box prompt per image,
and returns the single best-mask logits and, with ``labels``, dice + BCE against the mask.

The loss is a mean over samples (each sample's BCE averaged over its pixels, plus its dice loss), so micro-batches
weighted by their share of the samples sum to the whole batch's gradient exactly: what `MPOptTrainer` does for
float labels (`mpopt_hf.training.loss_items.count_loss_items`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import SamConfig, SamModel
from transformers.modeling_outputs import ModelOutput

TINY = "tiny"
SAM_VIT_B = "facebook/sam-vit-base"
# SamProcessor's normalisation (ImageNet mean and std of [0, 1] pixels)
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
DICE_SMOOTH = 1.0  # keeps the dice loss of an empty mask and an empty prediction at 0, not 0/0


class ModelNotAvailableError(OSError):
    """A SAM id or folder that cannot be loaded without a download (or at all)."""


@dataclass
class SamSegmentationOutput(ModelOutput):
    """``logits``: (batch, h, w) mask logits at the mask decoder's resolution (4x the image embedding's side)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    iou_scores: torch.Tensor | None = None


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(batch, h, w) logits bilinearly resized to ``size`` (unchanged when already that size)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def mask_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over samples of (BCE averaged over the pixels + dice loss); logits upsampled to the labels' size."""
    logits = resize_logits(logits.float(), tuple(labels.shape[-2:]))
    target = labels.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    prob, target = logits.sigmoid().flatten(1), target.flatten(1)
    dice = 1 - (2 * (prob * target).sum(1) + DICE_SMOOTH) / (prob.sum(1) + target.sum(1) + DICE_SMOOTH)
    return (bce + dice).mean()


class SamForBoxSegmentation(SamModel):
    """A box-prompted `SamModel` that returns a loss (see the module's docstring)."""

    def forward(self, pixel_values: torch.Tensor | None = None,  # type: ignore[override]
                input_boxes: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs) -> SamSegmentationOutput:
        """``pixel_values`` (batch, 3, S, S) in [0, 1]; ``input_boxes`` (batch, 1, 4) pixel ``[x0, y0, x1, y1]``;
        ``labels`` (batch, H, W) 0/1 masks (any H, W: the logits are resized to them for the loss)."""
        if pixel_values is not None:
            mean = pixel_values.new_tensor(PIXEL_MEAN).view(1, 3, 1, 1)
            std = pixel_values.new_tensor(PIXEL_STD).view(1, 3, 1, 1)
            pixel_values = (pixel_values - mean) / std
        out = super().forward(pixel_values=pixel_values, input_boxes=input_boxes, multimask_output=False, **kwargs)
        logits = out.pred_masks[:, 0, 0]
        loss = None if labels is None else mask_loss(logits, labels)
        return SamSegmentationOutput(loss=loss, logits=logits, iou_scores=out.iou_scores[:, 0, 0])


# ---------------------------------------------------------------------------- configurations


def trainable_init(config: SamConfig) -> SamConfig:
    """``config`` set to initialise weights a trainer can learn from: SamVisionConfig's ``initializer_range``
    defaults to 1e-10 (fine under a checkpoint's weights, a dead vision encoder without them) and the random
    Fourier features of the prompts' coordinates get std ``hidden_size / 2`` (32 for a 64-wide encoder: a hash of
    the position); SAM's own ``PositionEmbeddingRandom`` draws them with std 1. Only the initial values change."""
    config.vision_config.initializer_range = config.initializer_range
    config.vision_config.scale = 1.0
    return config



def tiny_config(image_size: int = 64, layers: int = 2) -> SamConfig:
    """A SAM of a few hundred thousand parameters: 8x8 patches, width 64, a 32-wide prompt encoder and decoder."""
    width = 32  # vision output channels = prompt encoder = mask decoder width = 2 x num_pos_feats
    return trainable_init(SamConfig(
        vision_config=dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=2, image_size=image_size,
                           patch_size=8, output_channels=width, mlp_dim=256, window_size=4,
                           global_attn_indexes=list(range(layers - 1, layers)), num_pos_feats=width // 2),
        prompt_encoder_config=dict(hidden_size=width, image_size=image_size, patch_size=8),
        mask_decoder_config=dict(hidden_size=width, mlp_dim=128, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=width),
    ))


def vit_b_config() -> SamConfig:
    """facebook/sam-vit-base's architecture from its public config values: ViT-B/16 at 1024x1024, windowed attention
    (14x14) with global attention at layers 2, 5, 8, 11, a 256-channel neck; SamConfig's prompt encoder and mask
    decoder defaults (256 wide, 2 two-way layers, 3 multimask outputs) are SAM's."""
    return SamConfig(vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
                                        image_size=1024, global_attn_indexes=[2, 5, 8, 11], window_size=14,
                                        output_channels=256, mlp_dim=3072, num_pos_feats=128))


# hub id -> its architecture, for --random_init (real-size memory and step times without the weights)
RANDOM_INIT_CONFIGS = {SAM_VIT_B: vit_b_config}


def build_model(name: str, *, random_init: bool = False, local_files_only: bool = True, image_size: int = 64,
                seed: int = 0) -> SamForBoxSegmentation:
    """``"tiny"`` (built offline), a hub id's architecture with random weights, or a SAM checkpoint (id or folder)."""
    torch.manual_seed(seed)
    if name == TINY:
        return SamForBoxSegmentation(tiny_config(image_size))
    if random_init:
        if name not in RANDOM_INIT_CONFIGS:
            raise ValueError(f"random_init builds the architectures {list(RANDOM_INIT_CONFIGS)} from their configs, "
                             f"not {name!r}.")
        return SamForBoxSegmentation(trainable_init(RANDOM_INIT_CONFIGS[name]()))
    try:
        return SamForBoxSegmentation.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        where = "the folder" if os.path.isdir(os.path.expanduser(name)) else "the local Hugging Face cache"
        raise ModelNotAvailableError(
            f"SAM model {name!r} could not be loaded from {where} (local_files_only={local_files_only}): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
            f"  expected: a hub id already in the cache or a folder with config.json and weights of a SamModel "
            f"(e.g. {SAM_VIT_B}).\n"
            f"  how to get it: on a machine with the hub, `huggingface-cli download {name}` (or "
            f"`SamModel.from_pretrained('{name}').save_pretrained(DIR)` and pass DIR); --random_init true builds "
            f"{SAM_VIT_B}'s architecture offline; or use the offline default --model {TINY}."
        ) from error


def load_cached(path) -> SamForBoxSegmentation:
    """A cached source model (what `online_recipe.cached_model` saved)."""
    return SamForBoxSegmentation.from_pretrained(path)
