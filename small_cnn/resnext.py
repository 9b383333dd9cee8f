"""CIFAR ResNeXt (Xie et al. 2017, section 5.2): 3x3 stem, three stages of grouped bottlenecks.

ResNeXt-29 (32x4d) is 3 stages x 3 blocks x 3 layers + stem + classifier = 29
layers; stage `i` has `cardinality` groups of `bottleneck_width * 2**i`
channels, and its output is `expansion` times the grouped width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from ._base import ClassifierHead, SmallCNNPreTrainedModel, check_lengths, check_positive, conv_bn, projection_shortcut


class SmallResNeXtConfig(PretrainedConfig):
    """Configuration of a CIFAR ResNeXt; defaults give ResNeXt-29 (32x4d)."""

    model_type = "small_cnn_resnext"

    num_channels: int = 3
    stem_width: int = 64
    cardinality: int = 32
    bottleneck_width: int = 4
    expansion: int = 2
    depths: list[int] | tuple[int, ...] = (3, 3, 3)
    strides: list[int] | tuple[int, ...] = (1, 2, 2)
    classifier_dropout: float = 0.0

    def __post_init__(self, **kwargs):
        self.depths, self.strides = list(self.depths), list(self.strides)
        check_lengths(self, ("depths", "strides"))
        check_positive(
            self, ("num_channels", "stem_width", "cardinality", "bottleneck_width", "expansion", "depths", "strides")
        )
        super().__post_init__(**kwargs)


class ResNeXtBlock(GradientCheckpointingLayer):
    """1x1 reduce, grouped 3x3 (strided), 1x1 expand, shortcut."""

    def __init__(self, in_channels: int, cardinality: int, group_width: int, expansion: int, stride: int):
        super().__init__()
        width = cardinality * group_width
        out_channels = width * expansion
        self.conv1 = conv_bn(in_channels, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride, groups=cardinality)
        self.conv3 = conv_bn(width, out_channels, 1, act=None)
        self.shortcut = projection_shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class SmallResNeXtForImageClassification(SmallCNNPreTrainedModel):
    """CIFAR ResNeXt classifier following the zoo's stem/blocks/head contract."""

    config: SmallResNeXtConfig
    config_class = SmallResNeXtConfig
    _no_split_modules = ["ResNeXtBlock"]

    def __init__(self, config: SmallResNeXtConfig):
        super().__init__(config)
        channels = config.stem_width
        self.stem = conv_bn(config.num_channels, channels, 3)
        blocks: list[nn.Module] = []
        for stage, (depth, stride) in enumerate(zip(config.depths, config.strides)):
            group_width = config.bottleneck_width * 2**stage
            for index in range(depth):
                block = ResNeXtBlock(
                    channels, config.cardinality, group_width, config.expansion, stride if index == 0 else 1
                )
                blocks.append(block)
                channels = config.cardinality * group_width * config.expansion
        self.blocks = nn.ModuleList(blocks)
        self.head = ClassifierHead(channels, config.num_labels, dropout=config.classifier_dropout)
        self.post_init()
