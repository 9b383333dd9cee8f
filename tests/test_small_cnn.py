"""Tests of the CIFAR-size CNN zoo: shapes, sizes, the stem/blocks/head contract, HF integration.

Behaviour is checked on the tiny variants (same blocks, a few channels); the
full-size models are only built on the meta device, to count parameters and blocks.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification
from transformers.modeling_layers import GradientCheckpointingLayer

import small_cnn
from small_cnn.mobilevit import MobileViTBlock

NAMES = small_cnn.MODEL_NAMES
EXPECTED_BLOCKS = {
    "resnet18": 8,
    "resnet50": 16,
    "resnet101": 33,
    "resnext29": 9,
    "mobilenetv2": 17,
    "mobilevit_xxs": 10,
}
# Reference sizes: the usual CIFAR ResNets/ResNeXt (10 classes) and, for the
# mobile nets, the ImageNet-head (1000 classes) figures of their papers.
REFERENCE_PARAMS = {
    ("resnet18", 10): 11.17e6,
    ("resnet50", 10): 23.52e6,
    ("resnet101", 10): 42.51e6,
    ("resnext29", 10): 4.78e6,
    ("mobilenetv2", 1000): 3.50e6,
    ("mobilevit_xxs", 1000): 1.3e6,
}


def tiny(name: str, **overrides) -> small_cnn.SmallCNNPreTrainedModel:
    torch.manual_seed(0)
    return small_cnn.build(name, **{**small_cnn.tiny_overrides(name), **overrides})


def on_meta(name: str, **kwargs) -> small_cnn.SmallCNNPreTrainedModel:
    """A full-size model without allocating or initialising its weights."""
    with torch.device("meta"):
        return small_cnn.build(name, **kwargs)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during one forward."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_loss_and_backward(name, batch):
    x, y = batch
    model = tiny(name).train()
    out = model(x, labels=y)
    assert out.logits.shape == (4, 10)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, y))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model(x).loss is None


@pytest.mark.parametrize("name", NAMES)
def test_num_labels_and_non_cifar_size(name):
    model = tiny(name, num_labels=7).eval()
    assert model.config.num_labels == 7
    assert model(torch.randn(2, 3, 28, 28)).logits.shape == (2, 7)


@pytest.mark.parametrize("name", NAMES)
def test_structural_contract(name, batch):
    model = tiny(name).eval()
    assert isinstance(model.blocks, nn.ModuleList)
    assert isinstance(model.stem, nn.Module) and isinstance(model.head, nn.Module)
    assert all(isinstance(b, GradientCheckpointingLayer) for b in model.blocks)
    # Only the blocks are checkpointing layers, so every_n_layers counts blocks.
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers == list(model.blocks)
    assert model.main_input_name == "pixel_values" and model.supports_gradient_checkpointing
    x = batch[0]
    with torch.no_grad():
        h = model.stem(x)
        for block in model.blocks:
            h = block(h)
        torch.testing.assert_close(model.head(h), model(x).logits)


@pytest.mark.parametrize("name", NAMES)
def test_block_counts_full_and_tiny(name):
    assert len(on_meta(name).blocks) == EXPECTED_BLOCKS[name]
    assert len(tiny(name).blocks) == EXPECTED_BLOCKS[name]


@pytest.mark.parametrize(("name", "num_labels"), list(REFERENCE_PARAMS))
def test_full_size_parameter_counts(name, num_labels):
    count = n_params(on_meta(name, num_labels=num_labels))
    assert count == pytest.approx(REFERENCE_PARAMS[name, num_labels], rel=0.03)


def test_pinned_parameter_counts():
    """Exact figures of the standard CIFAR ResNets (10 classes): guards against silent architecture drift."""
    assert n_params(on_meta("resnet18")) == 11_173_962
    assert n_params(on_meta("resnet50")) == 23_520_842


def test_width_multiplier_shrinks():
    for name in ("resnet18", "mobilenetv2"):
        assert n_params(on_meta(name, width_multiplier=0.5)) < 0.5 * n_params(on_meta(name))


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, batch, tmp_path):
    x, y = batch
    model = tiny(name).train()
    model(x, labels=y)  # move BatchNorm running stats off their init values
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    saved, loaded = model.config.to_dict(), reloaded.config.to_dict()
    saved.pop("_name_or_path"), loaded.pop("_name_or_path")
    assert loaded == saved
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_auto_classes(name):
    config = small_cnn.tiny_config(name, num_labels=3)
    assert type(AutoConfig.for_model(config.model_type)) is type(config)
    model = AutoModelForImageClassification.from_config(config)
    assert type(model) is type(small_cnn.build(name, **small_cnn.tiny_overrides(name)))
    assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 3)


def test_model_types_are_unique():
    types = {small_cnn.get_config(name).model_type for name in NAMES}
    assert types == {"small_cnn_resnet", "small_cnn_resnext", "small_cnn_mobilenet_v2", "small_cnn_mobilevit"}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("every_n_layers", [1, 2])
def test_activation_checkpointing_same_gradients(name, every_n_layers, batch):
    x, y = batch
    plain = tiny(name).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable(every_n_layers=every_n_layers)
    flags = [b.gradient_checkpointing for b in checkpointed.blocks]
    assert flags == [i % every_n_layers == 0 for i in range(len(flags))]

    loss_plain = plain(x, labels=y).loss
    loss_plain.backward()
    loss_ckpt = checkpointed(x, labels=y).loss
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-6)
    # BatchNorm running stats are updated again by the recompute (known torch behaviour): not compared.
    for (param_name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=param_name)

    checkpointed.activation_checkpointing_disable()
    assert not any(b.gradient_checkpointing for b in checkpointed.blocks)


@pytest.mark.parametrize("name", NAMES)
def test_checkpointed_blocks_store_less(name, batch):
    x = batch[0]
    model = tiny(name).train()
    plain = saved_bytes(model, x)
    model.activation_checkpointing_enable()
    assert saved_bytes(model, x) < 0.5 * plain
    model.activation_checkpointing_disable()
    assert saved_bytes(model, x) == plain


def test_unknown_name_lists_accepted_ones():
    for factory in (small_cnn.build, small_cnn.tiny_config, small_cnn.get_config):
        with pytest.raises(ValueError, match=r"unknown small_cnn model 'resnet34'.*resnet18.*mobilevit_xxs"):
            factory("resnet34")


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match=r"no field\(s\) \['widht_multiplier'\]"):
        small_cnn.build("resnet18", widht_multiplier=0.5)


def test_config_validation():
    with pytest.raises(ValueError, match="block_type='wide'"):
        small_cnn.SmallResNetConfig(block_type="wide")
    with pytest.raises(ValueError, match="same length"):
        small_cnn.SmallResNetConfig(depths=(2, 2, 2))
    with pytest.raises(ValueError, match="num_attention_heads=3"):
        small_cnn.SmallMobileViTConfig(num_attention_heads=3)
    with pytest.raises(ValueError, match="width_multiplier"):
        small_cnn.SmallMobileNetV2Config(width_multiplier=0.0)


@pytest.mark.parametrize("size", [(8, 8), (7, 5)])
def test_mobilevit_unfold_fold_is_identity(size):
    block = tiny("mobilevit_xxs").blocks[-1]
    assert isinstance(block, MobileViTBlock)
    x = torch.randn(2, 16, *size)
    tokens, shape = block.unfold(x)
    assert tokens.shape[0] == 2 * block.patch_size**2
    folded = block.fold(tokens, shape)
    assert folded.shape == x.shape
    if size[0] % block.patch_size == 0 and size[1] % block.patch_size == 0:
        torch.testing.assert_close(folded, x, rtol=0, atol=0)


def test_no_torchvision_or_timm():
    assert "torchvision" not in sys.modules and "timm" not in sys.modules
