"""The knobs on every model of the CIFAR zoo (tiny widths, full depth)."""

import pytest
import torch

import small_cnn
from mpopt_hf import MemoryConfig
from mpopt_hf.model.blocks import find_blocks
from mpopt_hf.model.knobs import apply_memory_config, count_trainable_parameters
from trainer_utils import saved_activation_bytes, train_for


def _tiny(name):
    torch.manual_seed(0)
    model = small_cnn.build(name, **small_cnn.tiny_overrides(name))
    model.train()
    return model


def _batch(n=8):
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g), "labels": torch.randint(0, 10, (n,), generator=g)}


@pytest.mark.parametrize("name", small_cnn.MODEL_NAMES)
def test_zoo_blocks_are_the_models_blocks(name):
    model = _tiny(name)
    found = find_blocks(model)
    assert found.family == "small_cnn" and found.blocks == list(model.blocks)


@pytest.mark.parametrize("name", small_cnn.MODEL_NAMES)
def test_zoo_checkpointing_lowers_saved_activations_by_30_percent(name):
    model = _tiny(name)
    batch = _batch()
    plain = saved_activation_bytes(model, batch)
    apply_memory_config(model, MemoryConfig(8, checkpoint_segments=find_blocks(model).n_blocks))
    checkpointed = saved_activation_bytes(model, batch)
    assert checkpointed <= 0.7 * plain, (name, plain, checkpointed)


@pytest.mark.parametrize("name", small_cnn.MODEL_NAMES)
def test_zoo_trains_three_steps_with_each_knob(name):
    model = _tiny(name)
    n_blocks = find_blocks(model).n_blocks
    total = count_trainable_parameters(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = _batch()
    for cfg in (
        MemoryConfig(8, freeze_rate=0.5),
        MemoryConfig(8, checkpoint_segments=max(1, n_blocks // 2)),
        MemoryConfig(8, precision="bf16"),
    ):
        train_for(model, batch, cfg, opt, steps=3)
        if cfg.freeze_rate:
            assert count_trainable_parameters(model) < total
