import copy

import pytest
import torch
from torch import nn

from mpopt_hf import MemoryConfig
from mpopt_hf.model.blocks import ModelBlocks, find_blocks, register_block_adapter
from mpopt_hf.model.knobs import apply_memory_config, autocast_context, count_trainable_parameters, plan_knobs, remove_knobs
from mpopt_hf.testing.tiny_models import TINY_FAMILIES, build_tiny, example_batch
from trainer_utils import saved_activation_bytes, train_for


def test_plan_freezes_prefix_and_spreads_checkpoints():
    plan = plan_knobs(MemoryConfig(4, freeze_rate=0.5, checkpoint_segments=2), n_blocks=8)
    assert (plan.n_frozen, plan.checkpointed) == (4, (4, 6))
    assert plan_knobs(MemoryConfig(4, checkpoint_segments=3), 8).checkpointed == (0, 2, 5)
    assert plan_knobs(MemoryConfig(4, freeze_rate=0.25), 6).n_frozen == 2  # 1.5 rounds up, not to even
    assert plan_knobs(MemoryConfig(4, freeze_rate=1.0), 6).n_trainable == 0


def test_segments_above_trainable_blocks_is_refused():
    with pytest.raises(ValueError, match=r"checkpoint_segments=3 exceeds the 2 trainable blocks.*allowed: 0\.\.2"):
        plan_knobs(MemoryConfig(4, freeze_rate=0.5, checkpoint_segments=3), n_blocks=4)
    with pytest.raises(ValueError, match=r"checkpoint_segments=5 exceeds the 4"):
        apply_memory_config(build_tiny("vit"), MemoryConfig(4, checkpoint_segments=5))


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ValueError, match=r"precision='fp16' needs a CUDA device"):
        apply_memory_config(build_tiny("vit"), MemoryConfig(4, precision="fp16"))
    with pytest.raises(ValueError, match="fp16"):
        autocast_context("fp16", "cpu")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_blocks_found_for_every_family(family):
    blocks = find_blocks(build_tiny(family))
    assert blocks.family == family
    assert blocks.n_blocks >= 4 and blocks.stem and blocks.head


def test_clip_blocks_interleave_both_towers():
    model = build_tiny("clip")
    blocks = find_blocks(model).blocks
    vision, text = list(model.vision_model.encoder.layers), list(model.text_model.encoder.layers)
    assert blocks[:2] == [vision[0], text[0]] and blocks[-2:] == [vision[-1], text[-1]]


def test_generic_fallback_and_clear_error():
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)]))
    found = find_blocks(seq)
    assert found.family == "generic" and found.n_blocks == 3
    with pytest.raises(ValueError, match="Cannot find repeated blocks in Linear.*register_block_adapter"):
        find_blocks(nn.Linear(3, 3))


def test_duplicate_adapter_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_block_adapter("vit", lambda m: None)


def test_freezing_counts_and_head_never_frozen():
    model = build_tiny("vit")
    blocks = find_blocks(model)
    total = count_trainable_parameters(model)
    apply_memory_config(model, MemoryConfig(4, freeze_rate=0.5))
    frozen = sum(p.numel() for p in blocks.stem_params()) + sum(
        p.numel() for i in range(2) for p in blocks.block_params(i)
    )
    assert count_trainable_parameters(model) == total - frozen
    assert all(p.requires_grad for p in model.classifier.parameters())
    apply_memory_config(model, MemoryConfig(4, freeze_rate=1.0))
    assert count_trainable_parameters(model) == sum(p.numel() for m in blocks.head for p in m.parameters())
    apply_memory_config(model, MemoryConfig(4, freeze_rate=0.25))  # a lower rate unfreezes
    assert all(p.requires_grad for p in blocks.block_params(1))
    assert not any(p.requires_grad for p in blocks.block_params(0))


def test_user_frozen_parameters_stay_frozen():
    model = build_tiny("vit")
    model.vit.layers[3].requires_grad_(False)
    apply_memory_config(model, MemoryConfig(4, freeze_rate=0.5))
    apply_memory_config(model, MemoryConfig(4, freeze_rate=0.0))
    assert not any(p.requires_grad for p in model.vit.layers[3].parameters())
    assert all(p.requires_grad for p in model.vit.layers[0].parameters())
    remove_knobs(model)
    assert not any(p.requires_grad for p in model.vit.layers[3].parameters())


class _BNBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class _BNNet(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList(_BNBlock() for _ in range(n))
        self.head = nn.Linear(4, 3)

    def forward(self, pixel_values, labels):
        x = self.stem(pixel_values)
        for block in self.blocks:
            x = block(x)
        logits = self.head(x.mean((2, 3)))
        return type("Out", (), {"loss": nn.functional.cross_entropy(logits, labels)})()


def _bn_blocks(model):
    return ModelBlocks(family="test", blocks=list(model.blocks), stem=[model.stem], head=[model.head])


def test_frozen_batchnorm_stays_in_eval_mode_through_train():
    model = _BNNet()
    apply_memory_config(model, MemoryConfig(2, freeze_rate=0.5), blocks=_bn_blocks(model))
    model.train()
    before = model.blocks[0].bn.running_mean.clone()
    model(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    assert torch.equal(model.blocks[0].bn.running_mean, before)
    assert not model.blocks[0].bn.training and model.blocks[3].bn.training
    apply_memory_config(model, MemoryConfig(2, freeze_rate=0.0))
    assert model.blocks[0].bn.training


def test_checkpoint_recompute_does_not_update_batchnorm_twice():
    torch.manual_seed(0)
    plain = _BNNet()
    ckpt = copy.deepcopy(plain)
    apply_memory_config(ckpt, MemoryConfig(4, checkpoint_segments=4), blocks=_bn_blocks(ckpt))
    batch = dict(pixel_values=torch.randn(4, 3, 8, 8), labels=torch.tensor([0, 1, 2, 0]))
    for model in (plain, ckpt):
        model.train()
        model(**batch).loss.backward()
    for a, b in zip(plain.modules(), ckpt.modules()):
        if isinstance(a, nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean) and torch.equal(
                a.num_batches_tracked, b.num_batches_tracked
            )
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_checkpointing_lowers_saved_activations_by_30_percent(family):
    model = build_tiny(family, dropout=0.0)
    model.train()
    blocks = find_blocks(model)
    batch = example_batch(model, 4)
    plain = saved_activation_bytes(model, batch)
    apply_memory_config(model, MemoryConfig(4, checkpoint_segments=blocks.n_blocks))
    checkpointed = saved_activation_bytes(model, batch)
    assert checkpointed <= 0.7 * plain, (family, plain, checkpointed)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_frozen_prefix_keeps_no_activations(family):
    model = build_tiny(family, dropout=0.0)
    model.train()
    batch = example_batch(model, 4)
    apply_memory_config(model, MemoryConfig(4))
    full = saved_activation_bytes(model, batch)
    apply_memory_config(model, MemoryConfig(4, freeze_rate=0.5))
    half = saved_activation_bytes(model, batch)
    assert half < 0.8 * full, (family, full, half)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_trains_with_each_knob(family):
    model = build_tiny(family)
    model.train()
    batch = example_batch(model, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n = find_blocks(model).n_blocks
    for cfg in (
        MemoryConfig(2),
        MemoryConfig(4, freeze_rate=0.5),
        MemoryConfig(4, checkpoint_segments=n // 2),
        MemoryConfig(4, precision="bf16"),
    ):
        train_for(model, batch, cfg, opt, steps=3)


def test_knobs_compose_with_a_peft_lora_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny("vit", dropout=0.0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    lora_before = {n for n, p in model.named_parameters() if p.requires_grad}
    assert find_blocks(model).family == "vit"
    apply_memory_config(model, MemoryConfig(4, freeze_rate=0.5, checkpoint_segments=2))
    batch = example_batch(model.get_base_model(), 4)
    model(**batch).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= lora_before  # base weights stay frozen: PEFT froze them, not us
    assert not any(".layers.0." in n or ".layers.1." in n for n in with_grad)
    assert any(".layers.3." in n and "lora_A" in n for n in with_grad)
    apply_memory_config(model, MemoryConfig(4))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_before
