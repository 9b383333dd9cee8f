"""Gradient caching for batch-coupled losses: exact gradients, dropout replay, knobs, wrappers, the check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

from mpopt_hf.config import MemoryConfig
from mpopt_hf.training.coupled_loss import (
    CLIP_CONTRASTIVE,
    SIGLIP_SIGMOID,
    CoupledLossAdapter,
    clip_loss,
    dual_encoder_embed,
    embedding_width,
    find_coupled_loss,
    register_coupled_loss,
    unregister_coupled_loss,
)
from mpopt_hf.training.coupling_check import CoupledLossError, check_batch_coupling, resolve_coupled_loss
from mpopt_hf.training.grad_cache import RngState, grad_cache_backward
from mpopt_hf.model.knobs import apply_memory_config
from mpopt_hf.training.microbatch import micro_batch_shares, split_batch
from mpopt_hf.testing.tiny_models import build_tiny, example_batch

SPLITS = {"4": 4, "2": 2, "1": 1, "3+3+2": 3}
KNOBS = {
    "plain": MemoryConfig(micro_batch_size=2),
    "checkpointed": MemoryConfig(micro_batch_size=2, checkpoint_segments=2),
    "frozen": MemoryConfig(micro_batch_size=2, freeze_rate=0.5),
    "frozen+checkpointed": MemoryConfig(micro_batch_size=2, freeze_rate=0.5, checkpoint_segments=2),
}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _grads(model: nn.Module) -> torch.Tensor:
    """Every parameter's gradient, flat (zeros where none), then cleared."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return flat


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


def _clip(dropout: float = 0.0, config: MemoryConfig | None = None) -> nn.Module:
    model = build_tiny("clip", dropout=dropout)
    if config is not None:
        apply_memory_config(model, config)
    return model.train()


def _naive(model: nn.Module, batch: dict, size: int) -> torch.Tensor:
    parts = split_batch(batch, size)
    for part, share in zip(parts, micro_batch_shares(parts)):
        (model(**part).loss * share).backward()
    return _grads(model)


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("knobs", list(KNOBS))
def test_grad_cache_equals_the_whole_batch(knobs):
    model = _clip(config=KNOBS[knobs])
    batch = example_batch(model, 8)
    model(**batch).loss.backward()
    scale_ref = model.logit_scale.grad.clone()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert bool(frozen) == ("frozen" in knobs)
    ref = _grads(model)
    adapter = find_coupled_loss(model, batch)
    assert adapter is CLIP_CONTRASTIVE
    for name, size in SPLITS.items():
        parts = split_batch(batch, size)
        loss = grad_cache_backward(model, parts, adapter)
        torch.testing.assert_close(model.logit_scale.grad, scale_ref, rtol=1e-5, atol=0)  # once, not per micro-batch
        assert all(p.grad is None for p in frozen), "a frozen parameter got a gradient"
        assert _rel(_grads(model), ref) < 1e-5, f"split {name}"
        assert not loss.requires_grad and loss.item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


def test_naive_micro_batching_changes_the_gradient():
    """The premise, and proof that the exactness test can fail."""
    model = _clip()
    batch = example_batch(model, 8)
    model(**batch).loss.backward()
    ref = _grads(model)
    assert _rel(_naive(model, batch, 4), ref) > 0.1


def test_bf16_autocast_matches_the_whole_batch_under_autocast():
    model = _clip(config=KNOBS["checkpointed"])
    batch = example_batch(model, 8)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    with autocast():
        loss = model(**batch).loss
    loss.backward()
    ref = _grads(model)
    grad_cache_backward(model, split_batch(batch, 2), CLIP_CONTRASTIVE, autocast=autocast)
    cached = _rel(_grads(model), ref)
    with autocast():
        naive = _rel(_naive(model, batch, 2), ref)
    assert cached < 0.01 and naive > 0.1, (cached, naive)


def test_backward_hook_sees_every_param_gradient_once():
    """A loss scaler (accelerator.backward under fp16) must scale every gradient, logit_scale's too."""
    model = _clip()
    batch = example_batch(model, 8)
    model(**batch).loss.backward()
    ref = _grads(model)
    calls = []

    def scaled_backward(t):
        calls.append(t.detach())
        (t * 1024.0).backward()

    grad_cache_backward(model, split_batch(batch, 3), CLIP_CONTRASTIVE, backward=scaled_backward)
    assert len(calls) == 3
    assert _rel(_grads(model) / 1024.0, ref) < 1e-5


# ---------------------------------------------------------------------------- dropout replay


def _graph_reference(model: nn.Module, parts: list[dict]) -> torch.Tensor:
    """The same micro-batch forwards, with a graph, one after the other; the coupled loss backpropagated once."""
    embeds = [dual_encoder_embed(model, part) for part in parts]
    joined = {key: torch.cat([e[key] for e in embeds]) for key in embeds[0]}
    clip_loss(model, joined).backward()
    return _grads(model)


@pytest.mark.parametrize("knobs", ["plain", "checkpointed"])
def test_dropout_masks_are_replayed(knobs, monkeypatch):
    model = _clip(dropout=0.1, config=KNOBS[knobs])
    batch = example_batch(model, 8)
    parts = split_batch(batch, 3)
    torch.manual_seed(7)
    ref = _graph_reference(model, parts)
    rng_after_ref = torch.get_rng_state()
    torch.manual_seed(7)
    grad_cache_backward(model, parts, CLIP_CONTRASTIVE)
    assert torch.equal(torch.get_rng_state(), rng_after_ref)  # as if each micro-batch ran forward once
    assert _rel(_grads(model), ref) < 1e-5
    torch.manual_seed(8)
    assert _rel(_graph_reference(model, parts), ref) > 1e-3  # dropout is really on
    monkeypatch.setattr(RngState, "restore", lambda self: None)
    torch.manual_seed(7)
    grad_cache_backward(model, parts, CLIP_CONTRASTIVE)
    assert _rel(_grads(model), ref) > 1e-3  # without the replay the re-run draws other masks


# ---------------------------------------------------------------------------- other families and wrappers


def _tiny_siglip() -> nn.Module:
    torch.manual_seed(0)
    cfg = tf.SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=128, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
    )
    return tf.SiglipModel(cfg).train()


@pytest.mark.skipif(not hasattr(tf, "SiglipModel"), reason="this transformers has no SiglipModel")
def test_siglip_sigmoid_loss_is_exact():
    model = _tiny_siglip()
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(8, 3, 32, 32, generator=g),
             "input_ids": torch.randint(3, 128, (8, 16), generator=g), "return_loss": True}
    assert find_coupled_loss(model, batch) is SIGLIP_SIGMOID
    model(**batch).loss.backward()
    bias_ref = model.logit_bias.grad.clone()
    ref = _grads(model)
    assert _rel(_naive(model, batch, 2), ref) > 0.01
    grad_cache_backward(model, split_batch(batch, 3), SIGLIP_SIGMOID)
    torch.testing.assert_close(model.logit_bias.grad, bias_ref, rtol=1e-5, atol=0)
    assert _rel(_grads(model), ref) < 1e-5
    assert embedding_width(SIGLIP_SIGMOID, model) == 64


def test_peft_wrapper_is_seen_through_and_run_as_given():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_clip(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = example_batch(model.get_base_model(), 8)
    assert find_coupled_loss(model, batch) is CLIP_CONTRASTIVE
    model(**batch).loss.backward()
    ref = _grads(model)
    assert ref.abs().sum() > 0
    grad_cache_backward(model, split_batch(batch, 2), CLIP_CONTRASTIVE)
    assert _rel(_grads(model), ref) < 1e-5


def test_ddp_no_sync_and_the_synchronised_last_backward():
    """Under DDP every parameter (logit_scale too) must get its gradient in the synchronised backward."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        inner = _clip()
        ddp = DistributedDataParallel(inner)
        batch = example_batch(inner, 8)
        inner(**batch).loss.backward()
        ref = _grads(inner)
        entered = []

        def no_sync():
            entered.append(1)
            return ddp.no_sync()

        for _ in range(2):  # a parameter left out of the reduction would fail the second step's forward
            grad_cache_backward(ddp, split_batch(batch, 3), CLIP_CONTRASTIVE, no_sync=no_sync)
            assert _rel(_grads(inner), ref) < 1e-5
        assert len(entered) == 4
    finally:
        dist.destroy_process_group()


def test_the_clip_matcher_claims_only_the_contrastive_loss():
    import clip_online

    model = _clip()
    batch = example_batch(model, 4)
    assert find_coupled_loss(model, batch) is CLIP_CONTRASTIVE
    assert find_coupled_loss(model, {**batch, "return_loss": False}) is None
    cfg = clip_online.CLIPClassifierConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16, num_labels=4)
    classifier = clip_online.CLIPClassifier(cfg).train()
    images = {"pixel_values": torch.rand(4, 3, 32, 32), "labels": torch.tensor([0, 1, 2, 3])}
    assert find_coupled_loss(classifier, images) is None  # a per-sample cross-entropy over class embeddings
    assert check_batch_coupling(classifier, images).micro_difference < 1e-5
    assert find_coupled_loss(build_tiny("vit"), example_batch(build_tiny("vit"), 4)) is None


def test_clip_without_its_adapter_is_refused_and_with_it_validated():
    model = _clip(dropout=0.1)
    batch = example_batch(model, 8)
    with pytest.raises(CoupledLossError, match="couples the batch"):
        check_batch_coupling(model, batch)  # what the trainer would see had CLIP declared nothing
    assert resolve_coupled_loss(model, batch) is CLIP_CONTRASTIVE
    report = check_batch_coupling(model, batch, adapter=CLIP_CONTRASTIVE)
    assert report.adapter_difference < 1e-5 and report.micro_difference > 0.1 and report.n_samples == 4
    assert model.training and all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------- the coupling check


class InBatchSoftmax(nn.Module):
    """Each sample's embedding is scored against every other's: the loss couples the batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Linear(8, 8))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(x), dim=-1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b = self.embed(x), self.embed(y)
        logits = 10 * a @ b.t()
        return {"loss": F.cross_entropy(logits, torch.arange(len(x)))}


def _in_batch_batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(n, 6, generator=g), "y": torch.randn(n, 6, generator=g)}


def test_check_refuses_a_coupled_loss_and_leaves_the_model_as_it_was():
    model = InBatchSoftmax().train()
    batch = _in_batch_batch()
    model(**batch)["loss"].backward()
    before = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    with pytest.raises(CoupledLossError, match="couples the batch") as info:
        check_batch_coupling(model, batch)
    assert "register_coupled_loss" in str(info.value) and isinstance(info.value, ValueError)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_declared_adapter_lifts_the_refusal_and_is_validated():
    model = InBatchSoftmax().train()
    batch = _in_batch_batch()

    def embed(m, mb):
        return {"a": m.embed(mb["x"]), "b": m.embed(mb["y"])}

    def loss(m, e, mbs):
        return F.cross_entropy(10 * e["a"] @ e["b"].t(), torch.arange(len(e["a"])))

    adapter = CoupledLossAdapter("in_batch", lambda m, inputs: isinstance(m, InBatchSoftmax), embed, loss)
    register_coupled_loss("in_batch", adapter)
    try:
        assert resolve_coupled_loss(model, batch) is adapter
        report = check_batch_coupling(model, batch, adapter=adapter)
        assert report.adapter_difference < 1e-5 and report.micro_difference > 1e-2
        wrong = CoupledLossAdapter("wrong", adapter.matches, embed, lambda m, e, mbs: loss(m, e, mbs) * 2)
        with pytest.raises(CoupledLossError, match="does not reproduce"):
            check_batch_coupling(model, batch, adapter=wrong)
    finally:
        unregister_coupled_loss("in_batch")
    assert find_coupled_loss(model, batch) is None


def test_check_passes_per_sample_means_and_batchnorm():
    vit = build_tiny("vit").train()
    assert check_batch_coupling(vit, example_batch(vit, 8)).micro_difference < 1e-5
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = cnn

        def forward(self, pixel_values, labels):
            return {"loss": F.cross_entropy(self.net(pixel_values), labels)}

    model = Classifier().train()
    bn = cnn[1]
    stats = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    batch = {"pixel_values": torch.randn(6, 3, 8, 8), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    check_batch_coupling(model, batch)  # BatchNorm's coupling is micro_batch_size's known trade, not refused
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[1])
    assert bn.training


# ---------------------------------------------------------------------------- memory and cost


class _LiveSavedBytes:
    """Saved-tensor hooks: the peak bytes of activations kept for backward (parameters not counted)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.now = self.peak = 0

    def pack(self, t: torch.Tensor):
        n = 0 if t.untyped_storage().data_ptr() in self.params else t.untyped_storage().nbytes()
        self.now += n
        self.peak = max(self.peak, self.now)
        return _Held(self, t, n)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda held: held.t)


class _Held:
    def __init__(self, owner: _LiveSavedBytes, t: torch.Tensor, n: int) -> None:
        self.owner, self.t, self.n = owner, t, n

    def __del__(self) -> None:
        self.owner.now -= self.n


def test_activation_bytes_follow_the_micro_batch():
    model = _clip()
    batch = example_batch(model, 8)
    whole = _LiveSavedBytes(model)
    with whole.hooks():
        model(**batch).loss.backward()
    cached = _LiveSavedBytes(model)
    with cached.hooks():
        grad_cache_backward(model, split_batch(batch, 2), CLIP_CONTRASTIVE)
    assert cached.peak < 0.4 * whole.peak, (cached.peak, whole.peak)
    held = 2 * 8 * embedding_width(CLIP_CONTRASTIVE, model) * 4  # what the cost model adds: embeddings + grads
    assert held == 2048 and held < 0.01 * whole.peak


def test_cost_terms():
    from mpopt_hf.memory_model.grad_cache_cost import cached_bytes, extra_forward_work, forward_fraction, grad_cache_overhead
    from mpopt_hf.memory_model import (Affine, MemoryModel, ModelStructure, OptimizerCost, ParamGroup, Span,
                                       SpanCost)

    assert cached_bytes(32, 2 * 512) == (2 * 32 * 1024 * 4, 4 * 32 * 32 * 4)

    def cost(flops_per_sample):
        return SpanCost(Affine(0), Affine(0), (Affine(0),), ops=10, flops=Affine(0, flops_per_sample))

    fwd = {"T": cost(1.0), "C": cost(1.0), "F": cost(1.0)}
    spans = [Span("fwd", 0, fwd), Span("fwd", 1, fwd), Span("fwd", 2, {"T": cost(1.0)}),
             Span("bwd", 2, {"T": cost(2.0)}), Span("bwd", 1, {"T": cost(2.0), "C": cost(3.0)}),
             Span("bwd", 0, {"T": cost(2.0)})]
    group = ParamGroup(grad_bytes=1)
    structure = ModelStructure(1, ("stem", "block", "head"), (-1, 0, -1), 3, 0, 0, 0, group, (group,), group,
                               OptimizerCost())
    model = MemoryModel(structure, {"fp32/plain": spans, "fp32/ckpt": spans, "fp32/frozen": spans})
    config = MemoryConfig(micro_batch_size=3)
    assert extra_forward_work(model, config, 8) == (3 * 3 * 10, 3 * 8)  # 3 micro-batches (3, 3, 2), 3 units
    assert forward_fraction(model, config, 8) == pytest.approx(3 / 9)  # backward = 2 forwards: 4/3 the time
    overhead = grad_cache_overhead(model, config, 8, embed_width=32)
    assert overhead.embedding_bytes == 2048 and overhead.extra_flops == 24
