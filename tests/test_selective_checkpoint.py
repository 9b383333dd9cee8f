"""The selective checkpoint policy (``MemoryConfig.checkpoint_policy='selective'``): what it keeps, what it costs
in bytes (measured against the memory model's prediction), that it changes no gradient and no training state when
switched mid-run, and that the engine searches it only when the user lists it.

The gradient on every model family (encoder-only, decoder-only, encoder-decoder, hierarchical vision, convolutional,
speech, padded labels) is checked against a plain Trainer step in `test_trainer_families.py`.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mpopt_hf import MemoryConfig, MPOptArguments
from mpopt_hf.space import enumerate_configs
from mpopt_hf.model.knobs import apply_memory_config, remove_knobs
from mpopt_hf.memory_model import config_space
from mpopt_hf.profiler import build_memory_model, measure, predict_step
from mpopt_hf.model.selective_checkpoint import costly_ops
from mpopt_hf.testing.tiny_models import build_tiny, example_batch

BATCH = 8
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _CountCostly(TorchDispatchMode):
    """Counts the costly ops (matmuls, convolutions, attention) a step runs, by phase."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += func in costly_ops()
        return func(*args, **(kwargs or {}))


def _costly_ops_in_a_step(model, batch, config: MemoryConfig) -> tuple[int, int]:
    """(costly ops in forward, costly ops in backward) of one training step under ``config``."""
    apply_memory_config(model, config)
    model.train()
    with _CountCostly() as forward:
        loss = model(**batch).loss
    with _CountCostly() as backward:
        loss.backward()
    model.zero_grad(set_to_none=True)
    remove_knobs(model)
    return forward.count, backward.count


@pytest.mark.parametrize("family", ["vit", "gpt_neo", "mobilevit"])
def test_selective_blocks_recompute_no_costly_op(family):
    """Whole-block checkpointing runs every block's matmuls twice; the selective policy runs them once, as without
    checkpointing: the backward's costly ops are the same count as a plain step's."""
    model = build_tiny(family, num_layers=4)
    batch = example_batch(model, 4)
    n = 4
    plain = _costly_ops_in_a_step(model, batch, MemoryConfig(4))
    block = _costly_ops_in_a_step(model, batch, MemoryConfig(4, checkpoint_segments=n))
    selective = _costly_ops_in_a_step(model, batch, MemoryConfig(4, checkpoint_segments=n,
                                                                 checkpoint_policy="selective"))
    assert plain[0] == block[0] == selective[0]
    assert block[1] > plain[1]  # the recomputed forwards
    assert selective[1] == plain[1]


@pytest.fixture(scope="module", params=["vit", "gpt_neo"])  # mobilevit: in the counting test above (its trace is slow)
def traced(request):
    torch.set_num_threads(1)
    model = build_tiny(request.param, num_layers=4)
    batch = example_batch(model, BATCH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    memory_model = build_memory_model(model, batch, optimizer, ("fp32", "bf16"), selective=True)
    return model, batch, optimizer, memory_model


def test_the_policy_saves_what_the_memory_model_predicts(traced):
    """Measured tensor bytes (MemTracker on the real step) against the uncalibrated memory model: the selective
    peak lies between no checkpointing and whole-block checkpointing, and the saving is the one predicted."""
    model, batch, optimizer, memory_model = traced
    plain, block, selective = (MemoryConfig(BATCH), MemoryConfig(BATCH, checkpoint_segments=4),
                               MemoryConfig(BATCH, checkpoint_segments=4, checkpoint_policy="selective"))
    measured = {c: measure(model, batch, c, optimizer, steps=1).tracked_peak_bytes for c in (plain, block, selective)}
    assert measured[block] < measured[selective] < measured[plain]
    for config, real in measured.items():
        assert predict_step(model, batch, config, optimizer).peak_bytes == pytest.approx(real, rel=0.005)
        assert memory_model.predict(config, BATCH).peak_bytes == pytest.approx(real, rel=0.005), config.short()
    saved = measured[plain] - measured[selective]
    predicted = memory_model.predict(plain, BATCH).peak_bytes - memory_model.predict(selective, BATCH).peak_bytes
    assert predicted == pytest.approx(saved, rel=0.02)


def test_selective_blocks_mixed_with_frozen_ones_are_predicted(traced):
    """Configurations the traces never ran (some blocks frozen, some selective, some plain, bf16) combine from the
    per-block spans within 2 % of the exact fake step."""
    model, batch, optimizer, memory_model = traced
    for config in (MemoryConfig(4, 0.5, 1, checkpoint_policy="selective"),
                   MemoryConfig(8, 0.25, 2, memory_model.precisions[-1], checkpoint_policy="selective")):
        exact = predict_step(model, batch, config, optimizer).peak_bytes
        assert memory_model.predict(config, BATCH).peak_bytes == pytest.approx(exact, rel=0.02), config.short()


def test_a_memory_model_traced_without_it_refuses_it():
    model = build_tiny("vit", num_layers=2)
    batch = example_batch(model, 4)
    memory_model = build_memory_model(model, batch, torch.optim.SGD(model.parameters(), lr=0.1), ("fp32",))
    assert not memory_model.selective
    memory_model.predict(MemoryConfig(4, checkpoint_segments=2), 4)
    memory_model.predict(MemoryConfig(4, checkpoint_policy="selective"), 4)  # nothing checkpointed: moot
    with pytest.raises(ValueError, match=r"without selective checkpointing.*ckpt2s.*checkpoint_policy='selective'"):
        memory_model.predict(MemoryConfig(4, checkpoint_segments=2, checkpoint_policy="selective"), 4)


def test_switching_the_policy_mid_run_keeps_the_training_state():
    """Four AdamW steps switching block -> selective -> none -> selective end on the weights (and moments) of four
    plain steps: the policy changes what backward keeps, not what it computes."""
    def train(configs):
        model = build_tiny("gpt_neo", num_layers=4, dropout=0.1)
        batch = example_batch(model, 4)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(1)
        losses = []
        for config in configs:
            if config is not None:
                apply_memory_config(model, config)
            model.train()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return model, optimizer, losses

    sel = MemoryConfig(4, checkpoint_segments=2, checkpoint_policy="selective")
    ref_model, ref_opt, ref_losses = train([None] * 4)
    model, opt, losses = train([MemoryConfig(4, checkpoint_segments=4), sel, MemoryConfig(4), sel])
    assert losses == pytest.approx(ref_losses, rel=1e-5) and losses[-1] < losses[0]
    for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(opt.state[b]["exp_avg_sq"], ref_opt.state[a]["exp_avg_sq"], rtol=1e-4, atol=1e-9)


def test_the_label_round_trips_and_the_policy_is_validated():
    config = MemoryConfig.parse("mb8/f0.5/ckpt2s/bf16")
    assert config == MemoryConfig(8, 0.5, 2, "bf16", checkpoint_policy="selective") and config.selective
    assert config.short() == "mb8/f0.50/ckpt2s/bf16" and MemoryConfig.parse(config.short()) == config
    assert not MemoryConfig(8, checkpoint_policy="selective").selective  # nothing checkpointed
    with pytest.raises(ValueError, match=r"MemoryConfig\.checkpoint_policy must be one of \['block', 'selective'\]"):
        MemoryConfig(8, checkpoint_policy="matmuls")
    with pytest.raises(ValueError, match=r"MPOptArguments\.checkpoint_policies holds \['sac'\]"):
        MPOptArguments(checkpoint_policies=["block", "sac"])


def test_the_engine_searches_it_only_when_listed():
    default = enumerate_configs([8, 4], [0.0], [0, 2], ["fp32"], 4)
    assert not any(c.checkpoint_policy == "selective" for c in default)
    both = enumerate_configs([8, 4], [0.0], [0, 2], ["fp32"], 4,
                             checkpoint_policies=MPOptArguments(checkpoint_policies=["block", "selective"])
                             .checkpoint_policies)
    assert len(both) == len(default) + 2  # ckpt2s at each micro-batch; ckpt0 once (the policy is moot there)
    assert {c.short() for c in both} - {c.short() for c in default} == {"mb8/f0.00/ckpt2s/fp32", "mb4/f0.00/ckpt2s/fp32"}
    grid = config_space(8, 4, ("fp32",), (8,), (0.0,), (0, 2), ("block", "selective"))
    assert [c.short() for c in grid] == ["mb8/f0.00/ckpt0/fp32", "mb8/f0.00/ckpt2/fp32", "mb8/f0.00/ckpt2s/fp32"]


def test_an_oom_rules_out_only_what_keeps_at_least_as_much():
    """Without predicted peaks, a configuration that ran out of memory rules out those that keep at least as much:
    a selective block keeps more than a whole-block one, fewer checkpointed blocks keep more."""
    from mpopt_hf.engine.candidates import Candidate
    from mpopt_hf.engine.rules import at_least_as_large

    def c(segments, policy="block", micro=4):
        return Candidate(MemoryConfig(micro, checkpoint_segments=segments, checkpoint_policy=policy))

    failed_block, failed_selective = c(2), c(2, "selective")
    assert at_least_as_large(c(2, "selective"), failed_block) and at_least_as_large(c(1, "selective"), failed_block)
    assert at_least_as_large(c(0), failed_selective) and at_least_as_large(c(1, "selective", 8), failed_selective)
    assert not at_least_as_large(c(2), failed_selective)  # whole blocks keep less than selective ones
    assert not at_least_as_large(c(1), failed_selective)  # fewer blocks, but whole: not comparable
    assert not at_least_as_large(c(4, "selective"), failed_block) and not at_least_as_large(c(2, micro=2), failed_block)
