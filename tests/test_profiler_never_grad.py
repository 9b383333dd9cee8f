"""Parameters that never receive a gradient carry no gradient and no optimizer state in the prediction.

Found from the traced backward, not from ``requires_grad``: a decoder-only load of Whisper keeps its
cross-attention weights (``requires_grad=True``) but never calls them, so AdamW gives them no state.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from mpopt_hf.config import MemoryConfig
from mpopt_hf.memory_model import Calibration, MemoryModel
from mpopt_hf.profiler import build_memory_model, measure, model_structure

BATCH = 4


def _decoder_only_whisper() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    config = tf.WhisperConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                              max_source_positions=8, max_target_positions=16, pad_token_id=1, bos_token_id=0,
                              eos_token_id=2, decoder_start_token_id=3, dropout=0.0)
    model = tf.WhisperForCausalLM(config).train()
    ids = torch.randint(4, 64, (BATCH, 10), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "labels": ids.clone()}


def _cross_attention_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".encoder_attn" in name)


def test_unused_parameters_get_no_state_in_the_prediction():
    model, batch = _decoder_only_whisper()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    unused = _cross_attention_bytes(model)
    assert unused > 0 and all(p.requires_grad for p in model.parameters())
    memory_model = build_memory_model(model, batch, optimizer, ("fp32",))
    names = [name for name, _ in model.named_parameters()]
    flagged = {names[i] for i in memory_model.structure.never_grad}
    assert flagged == {name for name in names if ".encoder_attn" in name}

    bare = MemoryModel(memory_model.structure, memory_model.spans, Calibration())
    config = MemoryConfig(BATCH)
    measured = measure(model, batch, config, optimizer, steps=1, warmup=1)
    predicted = bare.predict(config, BATCH)
    # AdamW's state (exp_avg, exp_avg_sq: 2 x the parameter, plus a step scalar per tensor) only for used ones
    assert predicted.optimizer_state == measured.optimizer_state
    # the requires_grad view would have counted the unused weights twice over (two moments)
    naive = model_structure(model, batch, optimizer)
    naive_state = MemoryModel(naive, memory_model.spans, Calibration()).predict(config, BATCH).optimizer_state
    assert naive_state - predicted.optimizer_state == pytest.approx(2 * unused, abs=64 * len(flagged))
    assert sum(g.grad_bytes for g in (naive.stem, *naive.blocks, naive.rest)) - unused == sum(
        g.grad_bytes for g in (memory_model.structure.stem, *memory_model.structure.blocks, memory_model.structure.rest))


def test_never_grad_survives_the_store_round_trip():
    model, batch = _decoder_only_whisper()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    memory_model = build_memory_model(model, batch, optimizer, ("fp32",))
    again = MemoryModel.from_dict(memory_model.to_dict())
    assert again.structure == memory_model.structure and again.structure.never_grad
