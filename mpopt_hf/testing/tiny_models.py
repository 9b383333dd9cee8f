"""Tiny, randomly initialised members of each supported HF family, built from configs.

They let tests, the CLI and benchmarks run every code path offline in seconds:
same classes and block structure as the hub checkpoints, a few thousand
parameters. ``example_batch`` makes a matching batch with labels, so that
``model(**batch).loss`` is defined for every family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers as tf
from transformers.modeling_outputs import ModelOutput

IMAGE_SIZE = 32
VOCAB = 128
SEQ_LEN = 16


@dataclass
class SamMaskOutput(ModelOutput):
    loss: torch.Tensor | None = None
    pred_masks: torch.Tensor | None = None
    iou_scores: torch.Tensor | None = None


class SamForMaskTraining(tf.SamModel):
    """`SamModel` with a mask loss, so the Trainer can fine-tune it: BCE of the best mask vs ``labels``."""

    def forward(self, pixel_values=None, input_points=None, labels=None, **kwargs):  # type: ignore[override]
        out = super().forward(pixel_values=pixel_values, input_points=input_points, multimask_output=False, **kwargs)
        masks = out.pred_masks[:, 0, 0]  # (batch, h, w) low-resolution logits
        loss = None
        if labels is not None:
            target = F.interpolate(labels[:, None].float(), size=masks.shape[-2:], mode="nearest")[:, 0]
            loss = F.binary_cross_entropy_with_logits(masks, target)
        return SamMaskOutput(loss=loss, pred_masks=out.pred_masks, iou_scores=out.iou_scores)


def _tiny_clip(layers: int) -> tf.PreTrainedModel:
    cfg = tf.CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=SEQ_LEN,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=8,
        ),
        projection_dim=16,
    )
    return tf.CLIPModel(cfg)


def _tiny_vit(layers: int) -> tf.PreTrainedModel:
    cfg = tf.ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_labels=10,
    )
    return tf.ViTForImageClassification(cfg)


def _tiny_gpt_neo(layers: int) -> tf.PreTrainedModel:
    cfg = tf.GPTNeoConfig(
        hidden_size=32,
        num_layers=layers,
        num_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attention_types=[[["global", "local"], max(1, layers // 2)]],
        window_size=8,
        bos_token_id=0,
        eos_token_id=1,
    )
    if layers % 2:
        cfg.attention_layers = (["global", "local"] * layers)[:layers]
    return tf.GPTNeoForCausalLM(cfg)


def _tiny_mobilevit(layers: int) -> tf.PreTrainedModel:
    cfg = tf.MobileViTConfig(
        image_size=IMAGE_SIZE,
        num_labels=10,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 64],
    )
    return tf.MobileViTForImageClassification(cfg)


def _tiny_sam(layers: int) -> tf.PreTrainedModel:
    cfg = tf.SamConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            output_channels=16,
            global_attn_indexes=list(range(1, layers, 2)),
            window_size=4,
            mlp_dim=64,
            num_pos_feats=8,  # the prompt encoder's width is 2 x this and must match the decoder's
        ),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8, image_embedding_size=8),
        mask_decoder_config=dict(
            hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=16
        ),
    )
    return SamForMaskTraining(cfg)


TINY_BUILDERS: dict[str, Callable[[int], tf.PreTrainedModel]] = {
    "clip": _tiny_clip,
    "vit": _tiny_vit,
    "sam": _tiny_sam,
    "gpt_neo": _tiny_gpt_neo,
    "mobilevit": _tiny_mobilevit,
}
TINY_FAMILIES = tuple(TINY_BUILDERS)


def build_tiny(family: str, num_layers: int = 4, seed: int = 0, dropout: float | None = None) -> tf.PreTrainedModel:
    """A tiny randomly initialised model of ``family`` (one of `TINY_FAMILIES`).

    ``dropout=0.0`` switches off every dropout, for tests that compare gradients exactly.
    """
    if family not in TINY_BUILDERS:
        raise ValueError(f"Unknown tiny family {family!r}; accepted: {list(TINY_FAMILIES)}.")
    torch.manual_seed(seed)
    model = TINY_BUILDERS[family](num_layers)
    if dropout is not None:
        set_dropout(model, dropout)
    return model


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Set every dropout probability (modules and the attention-dropout floats configs keep)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        for attr in ("dropout", "attention_dropout", "attn_dropout", "dropout_prob"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, p)


def example_batch(model: torch.nn.Module, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random batch with labels that ``model`` (a tiny family model) turns into a loss."""
    g = torch.Generator().manual_seed(seed)
    name = type(model).__name__
    if name.startswith("CLIP"):
        size = model.config.vision_config.image_size
        ids = torch.randint(3, VOCAB, (batch_size, SEQ_LEN), generator=g)
        ids[:, -1] = 1  # eos
        return {
            "pixel_values": torch.randn(batch_size, 3, size, size, generator=g),
            "input_ids": ids,
            "return_loss": True,
        }
    if name.startswith("GPTNeo"):
        ids = torch.randint(0, VOCAB, (batch_size, SEQ_LEN), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}
    if name.startswith("Sam") or isinstance(model, tf.SamModel):
        size = model.config.vision_config.image_size
        return {
            "pixel_values": torch.randn(batch_size, 3, size, size, generator=g),
            "input_points": torch.rand(batch_size, 1, 1, 2, generator=g) * size,
            "labels": (torch.rand(batch_size, size, size, generator=g) > 0.5).long(),
        }
    size = getattr(model.config, "image_size", IMAGE_SIZE)
    channels = getattr(model.config, "num_channels", 3)
    num_labels = getattr(model.config, "num_labels", 10)
    return {
        "pixel_values": torch.randn(batch_size, channels, size, size, generator=g),
        "labels": torch.randint(0, num_labels, (batch_size,), generator=g),
    }
