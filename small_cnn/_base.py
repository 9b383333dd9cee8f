"""Pieces every family of the zoo shares.

The zoo's contract with `mpopt_hf` is structural: a model is `stem`, then the
ordered `blocks` (each a `GradientCheckpointingLayer`), then `head`. Keeping the
forward pass in one place here is what guarantees every family honours it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias: BatchNorm follows) + BatchNorm + optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when shapes already match, else a strided 1x1 conv + BN (ResNet option B)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return conv_bn(in_channels, out_channels, kernel_size=1, stride=stride, act=None)


class ClassifierHead(nn.Module):
    """Optional pre-pool layers, global average pool, dropout, linear classifier."""

    def __init__(self, in_channels: int, num_labels: int, pre_pool: nn.Module | None = None, dropout: float = 0.0):
        super().__init__()
        self.pre_pool = pre_pool if pre_pool is not None else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_channels, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.pre_pool(x)).flatten(1)
        return self.classifier(self.dropout(x))


def scale_width(width: int, multiplier: float, divisor: int = 1) -> int:
    """Scale a channel count and round it to a multiple of `divisor`, never dropping more than 10%.

    The 10% guard is the usual MobileNet rule: rounding alone could shrink a
    narrow layer by almost half.
    """
    scaled = width * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def check_lengths(config: object, names: Sequence[str]) -> None:
    """Per-stage config tuples must line up; say which one does not."""
    lengths = {name: len(getattr(config, name)) for name in names}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{type(config).__name__}: per-stage fields must have the same length, got {lengths}")


def check_positive(config: object, names: Sequence[str]) -> None:
    """Every entry of the named int/tuple fields must be >= 1."""
    for name in names:
        value = getattr(config, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(v < 1 for v in values):
            raise ValueError(f"{type(config).__name__}.{name} must be >= 1 everywhere, got {value!r}")


class SmallCNNPreTrainedModel(PreTrainedModel):
    """Base of every zoo model: stem -> blocks -> head, mean cross-entropy loss.

    Subclasses build `self.stem`, `self.blocks` (an `nn.ModuleList` of
    `GradientCheckpointingLayer`s) and `self.head`, then call `self.post_init()`.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    base_model_prefix = "small_cnn"
    supports_gradient_checkpointing = True
    # The loss is a batch mean and ignores `num_items_in_batch`; tell Trainer so it
    # keeps scaling the loss for its own gradient accumulation.
    accepts_loss_kwargs = False

    stem: nn.Module
    blocks: nn.ModuleList
    head: nn.Module

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """He init for convs (ReLU-family nets), unit BN, small normal for linears."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            if module.weight is not None:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutput:
        """Classify `pixel_values` (B, C, H, W); mean cross-entropy when `labels` (B,) are given."""
        x = self.stem(pixel_values)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device))
        return ImageClassifierOutput(loss=loss, logits=logits)
