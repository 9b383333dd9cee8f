"""Block discovery on the shapes the field uses: staged backbones, encoder-decoders, single stacks.

Every family of `tests/families.py` must read as ``stem -> blocks -> head`` with each parameter in
exactly one part, and freezing must be a forward-order prefix: with the stem and the first k blocks
frozen, no frozen block's output needs a gradient (so none keeps activations for backward), one SGD
step leaves them bitwise unchanged, and the head still trains.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

import small_cnn
from families import ENCODER_DECODER, FAMILIES, STAGED, build_tied_bart
from mpopt_hf.model.blocks import BLOCK_ADAPTERS, ModelBlocks, find_blocks
from mpopt_hf.config import MemoryConfig
from mpopt_hf.model.knobs import apply_memory_config, count_trainable_parameters
from mpopt_hf.model.plan import n_frozen_blocks

N = 4
NAMES = sorted(FAMILIES)

# family -> (adapter family, the model's own block lists in forward order)
SINGLE_STACKS = {
    "bert": ("generic", lambda m: m.bert.encoder.layer),
    "gpt2": ("generic", lambda m: m.transformer.h),
    "llama": ("generic", lambda m: m.model.layers),
    "deit": ("generic", lambda m: m.deit.layers),
    "beit": ("generic", lambda m: m.beit.layers),
    "dinov2": ("generic", lambda m: m.dinov2.encoder.layer),
    "vit": ("vit", lambda m: m.vit.layers),
    "gpt_neo": ("gpt_neo", lambda m: m.transformer.h),
    "sam": ("sam", lambda m: m.vision_encoder.layers),
    "mobilevit": ("mobilevit", lambda m: m.mobilevit.encoder.layer),
    "resnet18": ("small_cnn", lambda m: m.blocks),
}


def _build(name: str) -> nn.Module:
    return FAMILIES[name].build()


def _tensors(value: object) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _record_calls(modules: list[nn.Module]) -> tuple[list[nn.Module], list]:
    """Forward hooks appending each module (once per call) to the returned list, in call order."""
    order: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, args, out: order.append(mod)) for m in modules]
    return order, handles


def _state(modules: list[nn.Module], params: list[nn.Parameter]) -> list[torch.Tensor]:
    tensors = [*params, *(b for m in modules for b in m.buffers())]
    return [t.detach().clone() for t in tensors]


# ---------------------------------------------------------------------------- the families themselves


@pytest.mark.parametrize("name", NAMES)
def test_families_build_and_batch_deterministically(name):
    spec = FAMILIES[name]
    a, b = spec.build().state_dict(), spec.build().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, y = spec.batch(N), spec.batch(N)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
    assert not any(isinstance(m, nn.Dropout) and m.p for m in spec.build().modules())


@pytest.mark.parametrize("name", [n for n in NAMES if FAMILIES[n].paddable])
def test_padded_batches_end_in_i_mod_4_padding(name):
    spec = FAMILIES[name]
    batch = spec.batch(8, padded=True)
    pads = [i % 4 for i in range(8)]
    if spec.token_labels:
        ignored = (batch["labels"] == -100).sum(1).tolist()
        assert ignored == pads and all((row[len(row) - k:] == -100).all() for row, k in zip(batch["labels"], pads))
    if "attention_mask" in batch:
        assert (batch["attention_mask"] == 0).sum(1).tolist() == pads
    assert torch.isfinite(spec.build()(**batch).loss)


def test_unpadded_family_refuses_a_padded_batch():
    with pytest.raises(ValueError, match="padded"):
        FAMILIES["swin"].batch(2, padded=True)


# ---------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("name", STAGED)
def test_staged_backbones_yield_every_stage_in_forward_order(name):
    model = _build(name)
    found = find_blocks(model)
    block_type = type(found.blocks[0])
    every = [m for m in model.modules() if type(m) is block_type]
    order, handles = _record_calls(every)
    with torch.no_grad():
        model(**FAMILIES[name].batch(2))
    for h in handles:
        h.remove()
    assert found.blocks == order and len(found.blocks) == sum(model.config.depths) == len(every)
    # each stage's downsampling goes with the block that runs right before it
    backbone = model.resnet if name == "hf_resnet" else getattr(model, name)
    stages = backbone.encoder.layers if name == "swin" else backbone.encoder.stages
    ends = [sum(model.config.depths[: s + 1]) - 1 for s in range(len(stages))]
    if name == "swin":  # after its own stage's blocks
        expected = {ends[s]: [st.downsample] for s, st in enumerate(stages) if st.downsample is not None}
    elif name == "convnext":  # before the next stage's blocks: the previous stage's last block
        expected = {ends[s - 1]: [stages[s].downsampling_layer] for s in range(1, len(stages))}
    else:  # a ResNet stage downsamples in its first bottleneck: nothing between blocks
        expected = {}
    assert found.attached == expected
    assert found.stem == [backbone.embedder if name == "hf_resnet" else backbone.embeddings]


@pytest.mark.parametrize("name", ENCODER_DECODER)
def test_encoder_decoders_yield_encoder_then_decoder_blocks(name):
    model = _build(name)
    found = find_blocks(model)
    encoder, decoder = model.get_encoder(), model.get_decoder()
    enc = list(encoder.block if name == "t5" else encoder.layers)
    dec = list(decoder.block if name == "t5" else decoder.layers)
    assert found.family == "encoder_decoder" and found.blocks == enc + dec and len(enc) >= 2 and len(dec) >= 2
    order, handles = _record_calls(found.blocks)
    with torch.no_grad():
        model(**FAMILIES[name].batch(2))
    for h in handles:
        h.remove()
    assert order == found.blocks
    # the encoder's final norm feeds every cross-attention: it freezes with the last encoder block
    final = {"t5": "final_layer_norm", "whisper": "layer_norm"}.get(name)
    assert found.attached == ({len(enc) - 1: [getattr(encoder, final)]} if final else {})
    # the embeddings of both sides are the stem
    embeddings = {id(p) for side in (encoder, decoder) for p in side.get_input_embeddings().parameters()}
    assert embeddings <= {id(p) for p in found.stem_params()}
    if name == "whisper":
        assert encoder.conv1 in found.stem and encoder.conv2 in found.stem


@pytest.mark.parametrize("name", sorted(SINGLE_STACKS))
def test_single_stacks_get_all_their_layers(name):
    model = _build(name)
    family, layers = SINGLE_STACKS[name]
    found = find_blocks(model)
    assert found.family == family and found.blocks == list(layers(model))


@pytest.mark.parametrize("name", NAMES)
def test_stem_blocks_and_head_hold_every_parameter_once(name):
    model = _build(name)
    found = find_blocks(model)
    assert found.stem and found.n_blocks >= 2
    parts = [found.stem_params(), *(found.block_params(i) for i in range(found.n_blocks)), found.head_params()]
    ids = [id(p) for part in parts for p in part]
    assert len(ids) == len(set(ids)), "a parameter is in two parts"
    assert set(ids) == {id(p) for p in model.parameters()}  # model.parameters() counts a tied one once
    inner = {id(sub) for part in [*found.stem, *found.blocks] for sub in part.modules()}
    assert not any(id(m) in inner for h in found.head for m in h.modules()), "a head module holds stem or blocks"


def test_tied_output_embeddings_belong_to_the_stem():
    """T5, GPT-2 and Whisper tie their LM head to a token embedding: freezing the stem freezes it."""
    for name, head in (("t5", "lm_head"), ("gpt2", "lm_head"), ("whisper", "proj_out")):
        model = _build(name)
        weight = getattr(model, head).weight
        found = find_blocks(model)
        assert any(weight is p for p in found.stem_params()) and not any(weight is p for p in found.head_params())
        assert getattr(model, head) in found.head  # listed as head (it runs last), its weight counted in the stem
        apply_memory_config(model, MemoryConfig(N, freeze_rate=1.0))
        assert not weight.requires_grad


def test_tied_bart_has_nothing_left_to_train_when_fully_frozen():
    """BART has no final norm: with lm_head tied to the stem's embedding, freeze_rate=1 freezes everything."""
    model = build_tied_bart()
    found = find_blocks(model)
    assert found.head_params() == []
    apply_memory_config(model, MemoryConfig(N, freeze_rate=1.0))
    assert count_trainable_parameters(model) == 0
    apply_memory_config(model, MemoryConfig(N, freeze_rate=0.5))  # the decoder trains, lm_head frozen
    assert not model.lm_head.weight.requires_grad
    assert all(p.requires_grad for p in model.model.decoder.layers.parameters())


# ---------------------------------------------------------------------------- freezing is a prefix


@pytest.mark.parametrize("rate", [0.5, 1.0])
@pytest.mark.parametrize("name", NAMES)
def test_frozen_prefix_keeps_no_graph_and_does_not_move(name, rate, one_torch_thread):
    spec = FAMILIES[name]
    model = spec.build()
    found = find_blocks(model)
    apply_memory_config(model, MemoryConfig(N, freeze_rate=rate))
    k = n_frozen_blocks(rate, found.n_blocks)
    frozen_modules = [*found.stem, *(m for i in range(k) for m in found.block_modules(i))]
    frozen_params = [*found.stem_params(), *(p for i in range(k) for p in found.block_params(i))]
    before = _state(frozen_modules, frozen_params)
    head_before = [p.detach().clone() for p in found.head_params()]

    needs_grad: dict[int, bool] = {}
    units = [(i, m) for i in range(found.n_blocks) for m in found.block_modules(i)]
    handles = [
        m.register_forward_hook(
            lambda mod, args, out, i=i: needs_grad.__setitem__(i, needs_grad.get(i, False)
                                                               or any(t.requires_grad for t in _tensors(out)))
        )
        for i, m in units
    ]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(**spec.batch(N)).loss
    for h in handles:
        h.remove()
    loss.backward()
    optimizer.step()

    # no frozen block (nor what is attached to it) records a graph; every trainable one does
    assert needs_grad == {i: i >= k for i in range(found.n_blocks)}
    after = _state(frozen_modules, frozen_params)
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a frozen parameter or buffer moved"
    assert any(not torch.equal(a, p) for a, p in zip(head_before, found.head_params())), "the head did not train"


@pytest.mark.parametrize("name", NAMES)
def test_checkpointing_two_blocks_keeps_the_gradient(name, one_torch_thread):
    spec = FAMILIES[name]
    grads = []
    for segments in (0, 2):
        model = spec.build()
        apply_memory_config(model, MemoryConfig(N, checkpoint_segments=segments))
        model(**spec.batch(N)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=lambda m, n=n: f"{n}: {m}")


# ---------------------------------------------------------------------------- the generic rule


class _Layer(GradientCheckpointingLayer):
    def __init__(self, width: int, experts: int = 0):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(x)
        return x + sum((e(x) for e in self.experts), torch.zeros_like(x))


class _Stage(nn.Module):
    def __init__(self, width: int, depth: int, downsample: bool):
        super().__init__()
        self.down = nn.Linear(width, width) if downsample else None  # runs before this stage's blocks
        self.blocks = nn.ModuleList(_Layer(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down is not None:
            x = self.down(x)
        for block in self.blocks:
            x = block(x)
        return x


class _StagedNet(nn.Module):
    """No adapter knows it: a stem, stages of blocks, a loose class token, a registered-late embedding norm."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 8))
        self.scale = nn.Parameter(torch.ones(()))
        self.embed = nn.Linear(4, 8)
        self.stages = nn.ModuleList(_Stage(8, depth, s > 0) for s, depth in enumerate((2, 1, 3)))
        self.layernorm_embedding = nn.LayerNorm(8)  # registered after, runs before the blocks
        self.norm = nn.LayerNorm(8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layernorm_embedding(self.embed(x) + self.cls_token)
        for stage in self.stages:
            h = stage(h)
        return self.classifier(self.norm(h)) * self.scale


def test_generic_rule_reads_an_unknown_staged_model():
    model = _StagedNet()
    found = find_blocks(model)
    s = model.stages
    assert found.family == "generic"
    assert found.blocks == [*s[0].blocks, *s[1].blocks, *s[2].blocks]
    assert found.attached == {1: [s[1].down], 2: [s[2].down]}
    assert found.stem == [model.embed, model.layernorm_embedding] and found.stem_parameters == [model.cls_token]
    assert found.head == [model.norm, model.classifier] and found.head_parameters == [model.scale]


def test_generic_rule_prefers_checkpointing_layers_over_longer_lists():
    """An MoE layer's experts outnumber the layers; the library's own block class says which are blocks."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(*(_Layer(8, experts=5) for _ in range(2))), nn.Linear(8, 2))
    found = find_blocks(model)
    assert found.blocks == list(model[1]) and found.stem == [model[0]] and found.head == [model[2]]


class _EmbedOutNet(nn.Module):
    """GPT-NeoX style: the LM head is called ``embed_out`` and registered after the layers."""

    def __init__(self):
        super().__init__()
        self.embed_in = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.embed_out = nn.Linear(8, 10)

    def get_output_embeddings(self) -> nn.Module:
        return self.embed_out


def test_output_embeddings_are_never_stem():
    model = _EmbedOutNet()
    found = find_blocks(model)
    assert found.stem == [model.embed_in] and found.head == [model.embed_out]


def test_no_repeated_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Cannot find repeated blocks in Sequential.*register_block_adapter"):
        find_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_an_adapters_head_is_completed():
    """A user adapter names stem and blocks only; whatever is left is head."""
    model = _StagedNet()
    blocks = ModelBlocks(family="user", blocks=[b for st in model.stages for b in st.blocks], stem=[model.embed])
    from mpopt_hf.model.blocks import complete_head

    complete_head(model, blocks)
    assert model.classifier in blocks.head and model.cls_token in blocks.head_parameters


# ---------------------------------------------------------------------------- small_cnn's own adapter


def test_small_cnn_registers_its_adapter():
    assert "small_cnn" in BLOCK_ADAPTERS
    model = small_cnn.build("resnet18", **small_cnn.tiny_overrides("resnet18"))
    found = find_blocks(model)
    assert found.family == "small_cnn" and found.blocks == list(model.blocks)
    assert found.stem == [model.stem] and found.head == [model.head]


def test_mpopt_hf_does_not_import_small_cnn_and_any_zoo_import_registers():
    code = (
        "import sys\n"
        "import mpopt_hf.model.blocks, mpopt_hf.model.knobs\n"
        "assert 'small_cnn' not in sys.modules, 'mpopt_hf imported small_cnn'\n"
        "assert 'small_cnn' not in mpopt_hf.model.blocks.BLOCK_ADAPTERS\n"
        "from small_cnn.resnet import SmallResNetConfig, SmallResNetForImageClassification\n"
        "model = SmallResNetForImageClassification(SmallResNetConfig(stem_width=8, widths=(4, 4, 8, 8)))\n"
        "assert mpopt_hf.model.blocks.find_blocks(model).family == 'small_cnn'\n"
        "import importlib, small_cnn._mpopt; importlib.reload(small_cnn._mpopt)  # re-import must not fail\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
