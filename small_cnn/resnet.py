"""CIFAR-size ResNet (He et al. 2016): 3x3 stem, no max-pool, four stages.

ResNet-18/34 use the basic block, ResNet-50/101 the bottleneck; the stage
widths are the widths of the bottleneck's inner 3x3 conv, the block output is
`expansion` times wider.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from ._base import (
    ClassifierHead,
    SmallCNNPreTrainedModel,
    check_lengths,
    check_positive,
    conv_bn,
    projection_shortcut,
    scale_width,
)


class SmallResNetConfig(PretrainedConfig):
    """Configuration of a CIFAR-size ResNet; defaults give ResNet-18."""

    model_type = "small_cnn_resnet"
    block_types: ClassVar[dict[str, int]] = {"basic": 1, "bottleneck": 4}

    num_channels: int = 3
    block_type: str = "basic"
    stem_width: int = 64
    widths: list[int] | tuple[int, ...] = (64, 128, 256, 512)
    depths: list[int] | tuple[int, ...] = (2, 2, 2, 2)
    strides: list[int] | tuple[int, ...] = (1, 2, 2, 2)
    width_multiplier: float = 1.0
    classifier_dropout: float = 0.0

    def __post_init__(self, **kwargs):
        self.widths, self.depths, self.strides = list(self.widths), list(self.depths), list(self.strides)
        if self.block_type not in self.block_types:
            raise ValueError(
                f"SmallResNetConfig.block_type={self.block_type!r} is not one of {sorted(self.block_types)}"
            )
        check_lengths(self, ("widths", "depths", "strides"))
        check_positive(self, ("num_channels", "stem_width", "widths", "depths", "strides"))
        if self.width_multiplier <= 0:
            raise ValueError(f"SmallResNetConfig.width_multiplier must be > 0, got {self.width_multiplier}")
        super().__post_init__(**kwargs)

    @property
    def expansion(self) -> int:
        """How much wider a block's output is than its stage width."""
        return self.block_types[self.block_type]


class ResNetBasicBlock(GradientCheckpointingLayer):
    """Two 3x3 convs and a shortcut; the unit of ResNet-18/34."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(in_channels, width, 3, stride)
        self.conv2 = conv_bn(width, width, 3, act=None)
        self.shortcut = projection_shortcut(in_channels, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetBottleneck(GradientCheckpointingLayer):
    """1x1 reduce, 3x3 (strided), 1x1 expand; the unit of ResNet-50/101."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv_bn(in_channels, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride)
        self.conv3 = conv_bn(width, out_channels, 1, act=None)
        self.shortcut = projection_shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class SmallResNetForImageClassification(SmallCNNPreTrainedModel):
    """CIFAR-size ResNet classifier following the zoo's stem/blocks/head contract."""

    config: SmallResNetConfig
    config_class = SmallResNetConfig
    _no_split_modules = ["ResNetBasicBlock", "ResNetBottleneck"]

    def __init__(self, config: SmallResNetConfig):
        super().__init__(config)
        block_cls = ResNetBasicBlock if config.block_type == "basic" else ResNetBottleneck
        channels = scale_width(config.stem_width, config.width_multiplier)
        self.stem = conv_bn(config.num_channels, channels, 3)
        blocks: list[nn.Module] = []
        for width, depth, stride in zip(config.widths, config.depths, config.strides):
            width = scale_width(width, config.width_multiplier)
            for index in range(depth):
                blocks.append(block_cls(channels, width, stride if index == 0 else 1))
                channels = width * block_cls.expansion
        self.blocks = nn.ModuleList(blocks)
        self.head = ClassifierHead(channels, config.num_labels, dropout=config.classifier_dropout)
        self.post_init()
