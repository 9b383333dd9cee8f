"""CIFAR-size MobileViT (Mehta & Rastegari 2022), plain torch.

A MobileViT block mixes local information with a 3x3 conv, then global
information with a transformer that, for each pixel position inside a
`patch_size` x `patch_size` patch, attends across all patches; the result is
folded back to a feature map, projected and fused with the block's input.

For 32x32 inputs the stem and the second stage keep stride 1, so the three
MobileViT blocks see 16x16, 8x8 and 4x4 maps (the ImageNet net sees 32/16/8
from 256x256).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from ._base import ClassifierHead, SmallCNNPreTrainedModel, check_lengths, check_positive, conv_bn
from .mobilenet_v2 import InvertedResidual


class SmallMobileViTConfig(PretrainedConfig):
    """Configuration of a CIFAR-size MobileViT; defaults give MobileViT-XXS.

    Stage `i` has `depths[i]` MV2 blocks of output width `widths[i]` (the first
    with stride `strides[i]`), followed by one MobileViT block of inner width
    `transformer_dims[i]` and `transformer_depths[i]` transformer layers when
    `transformer_depths[i] > 0`.
    """

    model_type = "small_cnn_mobilevit"

    num_channels: int = 3
    stem_width: int = 16
    stem_stride: int = 1
    expand_ratio: int = 2
    widths: list[int] | tuple[int, ...] = (16, 24, 48, 64, 80)
    depths: list[int] | tuple[int, ...] = (1, 3, 1, 1, 1)
    strides: list[int] | tuple[int, ...] = (1, 1, 2, 2, 2)
    transformer_dims: list[int] | tuple[int, ...] = (0, 0, 64, 80, 96)
    transformer_depths: list[int] | tuple[int, ...] = (0, 0, 2, 4, 3)
    num_attention_heads: int = 4
    mlp_ratio: float = 2.0
    patch_size: int = 2
    head_width: int = 320
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    classifier_dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self, **kwargs):
        per_stage = ("widths", "depths", "strides", "transformer_dims", "transformer_depths")
        for name in per_stage:
            setattr(self, name, list(getattr(self, name)))
        check_lengths(self, per_stage)
        check_positive(
            self,
            ("num_channels", "stem_width", "stem_stride", "expand_ratio", "widths", "depths", "strides")
            + ("num_attention_heads", "patch_size", "head_width"),
        )
        for dim, depth in zip(self.transformer_dims, self.transformer_depths):
            if depth > 0 and (dim < 1 or dim % self.num_attention_heads):
                raise ValueError(
                    f"SmallMobileViTConfig.transformer_dims={self.transformer_dims}: every dim of a stage with "
                    f"transformer layers must be a positive multiple of num_attention_heads={self.num_attention_heads}"
                )
        super().__post_init__(**kwargs)


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer (self-attention + SiLU MLP) over (N, tokens, dim)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn_dropout: float, dropout: float, eps: float):
        super().__init__()
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        x = x + self.dropout(self.proj(attn.transpose(1, 2).reshape(n, tokens, dim)))
        return x + self.mlp(self.norm2(x))


class MobileViTBlock(GradientCheckpointingLayer):
    """Local conv -> unfold -> transformer -> fold -> 1x1 projection -> fusion with the input."""

    def __init__(self, channels: int, dim: int, depth: int, config: SmallMobileViTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.local = nn.Sequential(
            conv_bn(channels, channels, 3, act=nn.SiLU), nn.Conv2d(channels, dim, 1, bias=False)
        )
        self.transformer = nn.ModuleList(
            TransformerLayer(
                dim,
                config.num_attention_heads,
                config.mlp_ratio,
                config.attention_dropout,
                config.hidden_dropout,
                config.layer_norm_eps,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.project = conv_bn(dim, channels, 1, act=nn.SiLU)
        self.fusion = conv_bn(2 * channels, channels, 3, act=nn.SiLU)

    def unfold(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """(B, C, H, W) -> (B * p * p, patches, C); a map not divisible by p is resized up first."""
        b, c, h, w = x.shape
        p = self.patch_size
        nh, nw = math.ceil(h / p), math.ceil(w / p)
        if (nh * p, nw * p) != (h, w):
            x = F.interpolate(x, size=(nh * p, nw * p), mode="bilinear", align_corners=False)
        x = x.reshape(b, c, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1).reshape(b * p * p, nh * nw, c)
        return x, (h, w, nh, nw)

    def fold(self, x: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """Inverse of `unfold`: (B * p * p, patches, C) -> (B, C, H, W)."""
        h, w, nh, nw = shape
        p = self.patch_size
        c = x.shape[-1]
        x = x.reshape(-1, p, p, nh, nw, c).permute(0, 5, 3, 1, 4, 2).reshape(-1, c, nh * p, nw * p)
        if (nh * p, nw * p) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, shape = self.unfold(self.local(x))
        for layer in self.transformer:
            tokens = layer(tokens)
        y = self.project(self.fold(self.norm(tokens), shape))
        return self.fusion(torch.cat([x, y], dim=1))


class SmallMobileViTForImageClassification(SmallCNNPreTrainedModel):
    """CIFAR-size MobileViT classifier following the zoo's stem/blocks/head contract."""

    config: SmallMobileViTConfig
    config_class = SmallMobileViTConfig
    _no_split_modules = ["InvertedResidual", "MobileViTBlock"]

    def __init__(self, config: SmallMobileViTConfig):
        super().__init__(config)
        channels = config.stem_width
        self.stem = conv_bn(config.num_channels, channels, 3, config.stem_stride, act=nn.SiLU)
        blocks: list[nn.Module] = []
        stages = zip(config.widths, config.depths, config.strides, config.transformer_dims, config.transformer_depths)
        for width, depth, stride, dim, layers in stages:
            for index in range(depth):
                blocks.append(
                    InvertedResidual(channels, width, stride if index == 0 else 1, config.expand_ratio, nn.SiLU)
                )
                channels = width
            if layers > 0:
                blocks.append(MobileViTBlock(channels, dim, layers, config))
        self.blocks = nn.ModuleList(blocks)
        self.head = ClassifierHead(
            config.head_width,
            config.num_labels,
            pre_pool=conv_bn(channels, config.head_width, 1, act=nn.SiLU),
            dropout=config.classifier_dropout,
        )
        self.post_init()
