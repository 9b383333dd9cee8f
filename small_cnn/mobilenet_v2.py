"""CIFAR MobileNetV2 (Sandler et al. 2018): inverted residuals, linear bottlenecks.

For 32x32 inputs the stem and the second stage keep stride 1 (the ImageNet
net downsamples 32x before the head, which would leave a 1x1 map after stage 4).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from ._base import ClassifierHead, SmallCNNPreTrainedModel, check_lengths, check_positive, conv_bn, scale_width


class SmallMobileNetV2Config(PretrainedConfig):
    """Configuration of a CIFAR MobileNetV2; defaults give the 1.0x net with 17 blocks.

    Stage `i` has `depths[i]` inverted residuals of output width `widths[i]`,
    expansion `expand_ratios[i]`; its first block has stride `strides[i]`.
    `width_multiplier` scales the stem and stage widths (rounded to
    `channel_divisor`) and the head width only when it is above 1, as in the paper.
    """

    model_type = "small_cnn_mobilenet_v2"

    num_channels: int = 3
    stem_width: int = 32
    stem_stride: int = 1
    expand_ratios: list[int] | tuple[int, ...] = (1, 6, 6, 6, 6, 6, 6)
    widths: list[int] | tuple[int, ...] = (16, 24, 32, 64, 96, 160, 320)
    depths: list[int] | tuple[int, ...] = (1, 2, 3, 4, 3, 3, 1)
    strides: list[int] | tuple[int, ...] = (1, 1, 2, 2, 1, 2, 1)
    head_width: int = 1280
    width_multiplier: float = 1.0
    channel_divisor: int = 8
    classifier_dropout: float = 0.0

    def __post_init__(self, **kwargs):
        for name in ("expand_ratios", "widths", "depths", "strides"):
            setattr(self, name, list(getattr(self, name)))
        check_lengths(self, ("expand_ratios", "widths", "depths", "strides"))
        check_positive(
            self,
            ("num_channels", "stem_width", "stem_stride", "expand_ratios", "widths", "depths", "strides")
            + ("head_width", "channel_divisor"),
        )
        if self.width_multiplier <= 0:
            raise ValueError(f"SmallMobileNetV2Config.width_multiplier must be > 0, got {self.width_multiplier}")
        super().__post_init__(**kwargs)


class InvertedResidual(GradientCheckpointingLayer):
    """1x1 expand, 3x3 depthwise (strided), linear 1x1 project; residual when shapes allow.

    Also the MV2 block of MobileViT, which only swaps ReLU6 for SiLU.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, act: type[nn.Module] = nn.ReLU6
    ):
        super().__init__()
        hidden = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn(in_channels, hidden, 1, act=act))
        layers.append(conv_bn(hidden, hidden, 3, stride, groups=hidden, act=act))
        layers.append(conv_bn(hidden, out_channels, 1, act=None))
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class SmallMobileNetV2ForImageClassification(SmallCNNPreTrainedModel):
    """CIFAR MobileNetV2 classifier following the zoo's stem/blocks/head contract."""

    config: SmallMobileNetV2Config
    config_class = SmallMobileNetV2Config
    _no_split_modules = ["InvertedResidual"]

    def __init__(self, config: SmallMobileNetV2Config):
        super().__init__(config)
        mult, div = config.width_multiplier, config.channel_divisor
        channels = scale_width(config.stem_width, mult, div)
        self.stem = conv_bn(config.num_channels, channels, 3, config.stem_stride, act=nn.ReLU6)
        blocks: list[nn.Module] = []
        for ratio, width, depth, stride in zip(config.expand_ratios, config.widths, config.depths, config.strides):
            width = scale_width(width, mult, div)
            for index in range(depth):
                blocks.append(InvertedResidual(channels, width, stride if index == 0 else 1, ratio))
                channels = width
        self.blocks = nn.ModuleList(blocks)
        head_width = scale_width(config.head_width, mult, div) if mult > 1.0 else config.head_width
        self.head = ClassifierHead(
            head_width,
            config.num_labels,
            pre_pool=conv_bn(channels, head_width, 1, act=nn.ReLU6),
            dropout=config.classifier_dropout,
        )
        self.post_init()
