"""The memory model's decision maths, on hand-made numbers (no model, no tensors)."""

from __future__ import annotations

import json

import pytest

from mpopt_hf.config import MemoryConfig
from mpopt_hf.memory_model import (
    FORWARD_END,
    Affine,
    BudgetTooSmallError,
    Calibration,
    MemoryModel,
    ModelStructure,
    OptimizerCost,
    ParamGroup,
    RawSpan,
    Span,
    SpanCost,
    check_budget,
    combine_traces,
    config_space,
    envelope_max,
    fit_calibration,
    min_peak,
    split_spans,
    upper_envelope,
)

KIB = 1024


def test_affine_through_two_points():
    line = Affine.through(2, 10.0, 4, 18.0)
    assert (line.a, line.b) == (2.0, 4.0) and line(8) == 34.0


def test_upper_envelope_keeps_only_lines_that_win_somewhere():
    lines = [Affine(10, 0), Affine(0, 3), Affine(5, 1), Affine(1, 1)]
    hull = upper_envelope(lines)
    assert Affine(1, 1) not in hull and Affine(5, 1) not in hull
    for m in (1, 2, 3.3, 7, 100):
        assert envelope_max(hull, m) == max(line(m) for line in lines)


def _record(phase, owner, before, after, g0=0, g1=0, flops=0.0):
    return (phase, owner, before, after, g0, g1, flops)


def test_split_spans_by_owner_glue_stays_with_the_current_span():
    records = [
        _record("fwd", -1, 0, 10),  # glue before the first unit
        _record("fwd", 0, 10, 30),
        _record("fwd", -1, 30, 35),  # glue after unit 0 belongs to unit 0's span
        _record("fwd", 1, 35, 60),
        _record("bwd", 1, 60, 80, 0, 8),
        _record("bwd", 0, 50, 55, 8, 12),
    ]
    spans = split_spans(records)
    assert [(s.phase, s.unit) for s in spans] == [("fwd", -1), ("fwd", 0), ("fwd", 1), ("bwd", 1), ("bwd", 0)]
    unit0 = spans[1]
    assert unit0.change == 25 and unit0.peaks == (20, 25)
    assert spans[3].change == -10 and spans[3].grads == 8  # up to the start of the next span
    assert spans[4].change == 5 and spans[4].grads == 4  # the last span ends after its last op


def _structure(n_blocks=2, **kw):
    group = ParamGroup(grad_bytes=100 * KIB, tensors=2, max_tensor_bytes=80 * KIB,
                       fresh_tensors=2, fresh_bytes=100 * KIB)
    return ModelStructure(
        n_blocks=n_blocks, unit_kinds=("stem",) + ("block",) * n_blocks + ("head",),
        unit_blocks=(-1,) + tuple(range(n_blocks)) + (-1,), weights_bytes=(n_blocks + 2) * 100 * KIB,
        input_bytes_per_sample=1 * KIB, input_bytes_const=0, existing_state_bytes=0, stem=group,
        blocks=(group,) * n_blocks, rest=group,
        optimizer=OptimizerCost(state_a=4, state_b=2.0, largest=2.0, second=1.0),
        optimizer_order=tuple((g, b * KIB) for g in (-1, *range(n_blocks), -2) for b in (80, 20)), **kw)


def _span(phase, unit, **costs):
    return Span(phase, unit, {k: SpanCost(Affine(0, ch), Affine(0, gr), (Affine(0, pk),)) for k, (ch, gr, pk) in
                              costs.items()})


def _model(**kw):
    """Two blocks; each trainable block keeps 100 KiB per sample, a checkpointed one 20 KiB, frozen 0."""
    block = dict(T=(100 * KIB, 0, 120 * KIB), C=(20 * KIB, 0, 30 * KIB), F=(0, 0, 10 * KIB))
    back = dict(T=(-100 * KIB, 0, 40 * KIB), C=(-20 * KIB, 0, 140 * KIB))
    spans = [_span("fwd", 0, T=(1 * KIB, 0, 1 * KIB), F=(1 * KIB, 0, 1 * KIB)), _span("fwd", 1, **block),
             _span("fwd", 2, **block), _span("fwd", 3, T=(1 * KIB, 0, 1 * KIB)), _span("bwd", 3, T=(-1 * KIB, 0, 0)),
             _span("bwd", 2, **back), _span("bwd", 1, **back), _span("bwd", 0, T=(-1 * KIB, 0, 0))]
    return MemoryModel(_structure(), {"fp32/plain": spans, "fp32/ckpt": spans, "fp32/frozen": spans}, **kw)


def test_structural_terms_follow_the_trainable_set():
    model = _model()
    full = model.predict(MemoryConfig(8), 8)
    half = model.predict(MemoryConfig(4, freeze_rate=0.5), 8)
    assert full.optimizer_state == 4 * (2 * 4 + 2 * 100 * KIB)  # AdamW: 2 x bytes + a step count per tensor
    assert half.optimizer_state == 2 * (2 * 4 + 2 * 100 * KIB)  # stem and block 0 frozen
    assert half.gradients == 2 * 100 * KIB and half.phase == "later micro-batches"
    assert full.inputs == half.inputs == 8 * KIB


def test_optimizer_transient_follows_the_optimizer_order():
    cost = OptimizerCost(largest=2.0, second=1.0)
    assert cost.transient([10, 1, 10]) == 21  # 2 x 10 + the 1 before it, not 2 x 10 + 10
    assert cost.transient([1, 10, 10]) == 30
    assert OptimizerCost(total=1.0).transient([3, 4]) == 7  # foreach: everything at once
    structure = _structure()
    assert structure.trainable_in_optimizer_order(MemoryConfig(2, 0.5)) == [80 * KIB, 20 * KIB] * 2


def test_activations_scale_with_micro_batch_and_knobs():
    model = _model()
    peaks = {cfg: model.predict(cfg, 16).peak_bytes for cfg in
             [MemoryConfig(16), MemoryConfig(8), MemoryConfig(16, checkpoint_segments=2), MemoryConfig(16, 0.5)]}
    small_micro, ckpt, frozen = (peaks[MemoryConfig(8)], peaks[MemoryConfig(16, checkpoint_segments=2)],
                                 peaks[MemoryConfig(16, 0.5)])
    assert small_micro < peaks[MemoryConfig(16)] and ckpt < peaks[MemoryConfig(16)] and frozen < peaks[MemoryConfig(16)]


def test_forward_end_rate_per_trainable_body_byte():
    base = SpanCost(Affine(0, -1 * KIB), Affine(0), (Affine(0),))
    model = _model()
    end = Span("fwd", FORWARD_END, {"T": base}, {"T": Affine(-0.5, 0)})
    for key in model.spans:
        model.spans[key] = model.spans[key][:4] + [end] + model.spans[key][4:]
    assert model.structure.body_bytes(MemoryConfig(2, 0.5)) == {"T": 100 * KIB, "C": 0.0, "S": 0.0, "F": 200 * KIB}
    full, half = model._dynamic(MemoryConfig(2), 2), model._dynamic(MemoryConfig(2, 0.5), 2)
    assert full[0] > 0 and half[0] > 0  # the frees only lower the backward part; peaks stay defined


def test_calibration_explains_residual_per_sample():
    model = _model()
    truth = {cfg: model.predict(cfg, 16).peak_bytes + 3 * KIB * cfg.micro_batch_size
             for cfg in (MemoryConfig(16), MemoryConfig(4, 0.5))}
    calibration = fit_calibration(model, [(cfg, 16, peak, 0.1) for cfg, peak in truth.items()])
    assert calibration.per_sample_bytes["fp32"] == pytest.approx(3 * KIB)
    assert calibration.const_bytes == pytest.approx(0, abs=1e-6)
    model.calibration = calibration
    unseen = MemoryConfig(8, checkpoint_segments=1)
    assert model.predict(unseen, 16).peak_bytes == pytest.approx(
        MemoryModel(model.structure, model.spans).predict(unseen, 16).peak_bytes + 24 * KIB)


def test_round_trip_through_json():
    model = _model(calibration=Calibration(per_sample_bytes={"fp32": 5.0}, flop_s={"fp32": 1e-9}))
    again = MemoryModel.from_dict(json.loads(json.dumps(model.to_dict())))
    for cfg in config_space(8, 2, ("fp32",)):
        assert again.predict(cfg, 8) == model.predict(cfg, 8)


def test_unknown_precision_names_what_was_traced():
    with pytest.raises(ValueError, match=r"traced for precisions \['fp32'\], not 'bf16'"):
        _model().predict(MemoryConfig(2, precision="bf16"), 8)


def test_config_space_skips_invalid_segments():
    space = config_space(8, 2, ("fp32",), freeze_rates=(0.0, 1.0), checkpoint_segments=(0, 2, 4))
    assert MemoryConfig(8, 0.0, 2) in space and MemoryConfig(8, 0.0, 4) not in space
    assert all(c.checkpoint_segments == 0 for c in space if c.freeze_rate == 1.0)
    assert sorted({c.micro_batch_size for c in space}) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match=r"micro_batch_sizes \[16\] are outside 1..8"):
        config_space(8, 2, micro_batch_sizes=(2, 16))


def test_budget_below_minimum_names_minimum_and_config():
    model = _model()
    space = config_space(8, 2, ("fp32",))
    best = min_peak(model, space, 8)
    assert best.peak_bytes == min(model.predict(c, 8).peak_bytes for c in space)
    assert check_budget(model, space, 8, best.peak_mib + 1).config == best.config
    with pytest.raises(BudgetTooSmallError, match=rf"{best.peak_mib:.1f} MiB \(reached by {best.config.short()}\)"):
        check_budget(model, space, 8, best.peak_mib * 0.5)
    with pytest.raises(ValueError, match="positive number of MiB, got -1"):
        check_budget(model, space, 8, -1)
    assert issubclass(BudgetTooSmallError, ValueError)


def test_combine_traces_takes_each_status_from_its_trace():
    def raw(unit, change):
        return RawSpan("fwd", unit, 0, change, 0.0, (change,), 0.0)

    t = ([raw(0, 2), raw(1, 20)], [raw(0, 4), raw(1, 40)], ["T", "T", "T"], None)
    f = ([raw(0, 1), raw(1, 0)], [raw(0, 2), raw(1, 0)], ["F", "F", "F"], None)
    spans = combine_traces([t, f], (2.0, 4.0))
    assert spans[1].costs["T"].change == Affine(0, 10) and spans[1].costs["F"].change == Affine(0, 0)


def _two_precision_model():
    model = _model()
    for context in ("plain", "ckpt", "frozen"):
        model.spans[f"bf16/{context}"] = model.spans[f"fp32/{context}"]
    return model


def test_a_precision_measured_once_is_never_predicted_under_its_reading():
    """bf16 kernels add a larger constant than fp32's (weight reorders); one bf16 reading cannot split that
    constant from a rate, so the prediction takes the higher of the two readings and stays safe."""
    model = _two_precision_model()
    bare = MemoryModel(model.structure, model.spans)

    def truth(cfg):  # what a machine adds: fp32 1 KiB + 3 KiB/sample, bf16 40 KiB + 3 KiB/sample
        const = 40 * KIB if cfg.precision == "bf16" else 1 * KIB
        return bare.predict(cfg, 16).peak_bytes + const + 3 * KIB * cfg.micro_batch_size

    fit = [MemoryConfig(16), MemoryConfig(4, 0.5), MemoryConfig(16, precision="bf16")]
    calibration = fit_calibration(model, [(cfg, 16, truth(cfg), 0.1) for cfg in fit])
    assert set(calibration.single_point) == {"bf16"}
    model.calibration = calibration
    for m in (1, 2, 4, 8, 16):
        cfg = MemoryConfig(m, precision="bf16")
        assert model.predict(cfg, 16).peak_bytes >= truth(cfg) - 1e-6, m
    # leaving the bf16 reading out, fp32's workspace stands in and misses bf16's constant: that miss, as a share
    # of the measured peak, is the fit's uncertainty
    held_out = (truth(fit[2]) - (bare.predict(fit[2], 16).peak_bytes + 1 * KIB + 3 * KIB * 16)) / truth(fit[2])
    assert calibration.uncertainty == pytest.approx(held_out, rel=0.02)
    again = MemoryModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.calibration == model.calibration


def test_the_engine_keeps_free_what_the_fit_is_unsure_of():
    from mpopt_hf.callback.setup import engine_margin

    class Unsure:
        uncertainty = 0.12

    assert engine_margin(0.05, Unsure()) == 0.12
    assert engine_margin(0.2, Unsure()) == 0.2
    assert engine_margin(0.05, None) == 0.05
    Unsure.uncertainty = 0.9
    assert engine_margin(0.05, Unsure()) == 0.5  # capped: a fit that unsure still leaves half the budget usable
