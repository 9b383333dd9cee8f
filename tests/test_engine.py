"""The rule engine on numbers alone: pruning rules, bandit on synthetic gain curves, drift, OOM, persistence."""

import json
import random

import pytest

from mpopt_hf.config import MemoryConfig, MPOptArguments
from mpopt_hf.engine import (
    MIB,
    Candidate,
    DecisionKind,
    Outcome,
    RuleEngine,
    batchnorm_filter,
    dominance_prune,
    enumerate_configs,
    feasible,
    prune,
)


def _peak(c: MemoryConfig) -> float:
    """A fake cost: activations ~ micro-batch x trainable share / (1 + segments)."""
    return (10 + 8 * c.micro_batch_size * (1 - c.freeze_rate) / (1 + c.checkpoint_segments)) * MIB


def _cands(configs):
    return [
        Candidate(c, _peak(c), (1.0 / c.micro_batch_size + 0.1 * c.checkpoint_segments) * (1 - 0.5 * c.freeze_rate))
        for c in configs
    ]


SPACE = enumerate_configs([8, 4, 2, 1], [0.0, 0.5], [0, 1, 2], ["fp32"], n_blocks=4)


def test_feasibility_and_dominance_keep_the_fastest_fitting_per_group():
    budget = 60 * MIB
    kept = feasible(_cands(SPACE), budget, 0.05)
    assert all(c.peak_bytes <= budget * 0.95 for c in kept)
    survivors = dominance_prune(kept)
    # one per freeze rate. f0.5: mb8 without checkpointing fits (42 MiB). f0: mb8 needs 74 MiB; mb8/ckpt1
    # (42 MiB, 0.225 s) is predicted faster than mb4/ckpt0 (42 MiB, 0.25 s), so it wins the group.
    assert [c.config.short() for c in survivors] == ["mb8/f0.50/ckpt0/fp32", "mb8/f0.00/ckpt1/fp32"]


def test_batchnorm_excludes_tiny_micro_batches_but_not_the_whole_batch():
    cands = _cands(enumerate_configs([8, 4, 2], [0.0], [0], ["fp32"], 4))
    assert [c.config.micro_batch_size for c in batchnorm_filter(cands, 4, effective_batch=8)] == [8, 4]
    assert [c.config.micro_batch_size for c in batchnorm_filter(cands, 16, effective_batch=8)] == [8]


def test_budget_below_minimum_names_the_minimum_and_its_config():
    with pytest.raises(ValueError, match=r"memory_budget_mib=10\.0.*minimum feasible peak 11\.3 MiB, reached by mb1/f0\.50/ckpt2/fp32"):
        prune(_cands(SPACE), 10 * MIB, 0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(micro_batch_sizes=[]), r"micro_batch_sizes is empty"),
        (dict(freeze_rates=[1.5]), r"freeze_rates holds \[1\.5\]; allowed: numbers in \[0, 1\]"),
        (dict(precisions=["fp8"]), r"precisions holds \['fp8'\]; allowed: values from \['fp32', 'bf16', 'fp16'\]"),
        (dict(safety_margin=0.5), r"safety_margin must be in \[0, 0\.5\), got 0\.5"),
        (dict(safety_margin=-0.1), r"safety_margin must be in \[0, 0\.5\)"),
        (dict(gain_metric="f1"), r"gain_metric must be one of \['auto', 'val_accuracy', 'entropy', 'confidence', 'loss', 'train_loss'\], got 'f1'"),
        (dict(trial_steps=0), r"trial_steps must be an int >= 1"),
        (dict(search_share=1.0), r"search_share must be in \(0, 1\) or None, got 1\.0"),
        (dict(memory_budget_mib=0), r"memory_budget_mib must be > 0"),
    ],
)
def test_invalid_arguments_name_field_and_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MPOptArguments(**kwargs)


def test_arguments_parse_from_the_command_line():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(MPOptArguments).parse_args_into_dataclasses(
        ["--memory_budget_mib", "512", "--micro_batch_sizes", "8", "4", "--gain_metric", "entropy"]
    )
    assert args.memory_budget_mib == 512 and args.micro_batch_sizes == [8, 4] and args.gain_metric == "entropy"


# ---------------------------------------------------------------------------- synthetic gain curves


def _simulate(engine, true_gain, step_s, trials, rng, noise=0.1, drift_at=None, drift_gain=None, metric=0.0):
    """Run ``trials`` trials: the metric grows by true_gain[config] x seconds (+ relative noise)."""
    config = engine.start(0, metric)
    chosen, step = [config], 0
    for trial in range(trials):
        if drift_at is not None and trial == drift_at:
            true_gain = drift_gain
            config = engine.task_boundary(step)
            engine.set_baseline(metric)
            chosen.append(config)
        seconds = 0.0
        while True:
            step += 1
            seconds += step_s[config]
            if engine.observe_step(step, step_s[config]):
                break
        metric += true_gain[config] * seconds * (1 + noise * rng.uniform(-1, 1))
        config = engine.observe_metric(step, metric)
        chosen.append(config)
    return chosen


def _arms():
    a, b, c = MemoryConfig(8), MemoryConfig(8, freeze_rate=0.5), MemoryConfig(8, freeze_rate=0.75)
    return a, b, c, [Candidate(a, 30 * MIB, 1.0), Candidate(b, 20 * MIB, 0.6), Candidate(c, 15 * MIB, 0.4)]


def test_settles_on_the_best_gain_per_second_within_12_trials():
    a, b, c, cands = _arms()
    # per step: a gains most per step, but b gains most per *second*
    true_gain = {a: 0.010, b: 0.014, c: 0.006}
    step_s = {a: 1.0, b: 0.6, c: 0.4}
    engine = RuleEngine(cands, strategy="ucb", trial_steps=3, exploration=0.3)
    chosen = _simulate(engine, true_gain, step_s, trials=24, rng=random.Random(0))
    assert chosen[:3] == [b, a, c] or set(chosen[:3]) == {a, b, c}  # each candidate is measured once first
    assert engine.best == b
    assert chosen[12:].count(b) >= 9  # exploits b after 12 trials, re-measuring challengers now and then
    outcomes = [d.outcome for d in engine.decisions]
    assert Outcome.EXPLOIT in outcomes and Outcome.CHALLENGER in outcomes, outcomes
    assert outcomes[:3] == [Outcome.MEASURE] * 3 and all(d.kind in ("start", "trial") for d in engine.decisions)


def test_trials_lengthen_so_that_evaluation_stays_within_search_share():
    a, b, c, cands = _arms()
    engine = RuleEngine(cands, strategy="ucb", trial_steps=2, search_share=0.2)
    engine.start(0, 0.0)
    engine.add_search_time(1.0)  # one evaluation takes 1 s: a trial must train 1 x 0.8 / 0.2 = 4 s
    steps = 0
    while not engine.observe_step(steps + 1, 0.5):
        steps += 1
    assert steps + 1 == 8  # 2 steps would be 1 s of training for 1 s of evaluation; 8 steps are 4 s
    assert engine.min_trial_seconds == pytest.approx(4.0) and engine.search_seconds == pytest.approx(1.0)
    capped = RuleEngine(cands, strategy="ucb", trial_steps=2, search_share=0.2, trial_max_s=1.5)
    capped.start(0, 0.0)
    capped.add_search_time(1.0)
    assert [capped.observe_step(i, 0.5) for i in (1, 2, 3)] == [False, False, True]  # trial_max_s still ends it
    restored = RuleEngine(cands, strategy="ucb", trial_steps=2, search_share=0.2)
    restored.load_state_dict(engine.state_dict())
    assert restored.search_seconds == 1.0 and restored.min_trial_seconds == pytest.approx(4.0)


def test_redecides_after_a_drift_event():
    a, b, c, cands = _arms()
    step_s = {a: 1.0, b: 0.6, c: 0.4}
    before = {a: 0.010, b: 0.014, c: 0.006}
    after = {a: 0.004, b: 0.002, c: 0.012}  # the new domain needs the head-heavy, fast configuration
    engine = RuleEngine(cands, strategy="ucb", trial_steps=3, exploration=0.3, discount=0.1)
    chosen = _simulate(engine, before, step_s, 40, random.Random(1), drift_at=16, drift_gain=after)
    assert sum(d.kind == DecisionKind.TASK for d in engine.decisions) == 1
    assert engine.best == c
    assert chosen[-10:].count(c) >= 7


def test_proxy_jump_reopens_the_search():
    a, b, c, cands = _arms()
    engine = RuleEngine(cands, strategy="ucb", trial_steps=1, drift_threshold=0.5)
    engine.start(0, -2.0)
    for step in range(1, 4):
        engine.observe_step(step, 1.0)
        engine.observe_metric(step, -2.0 + 0.01 * step, proxy=True)
    assert not engine.queue
    engine.observe_step(4, 1.0)
    engine.observe_metric(4, -0.5, proxy=True)  # entropy fell from 1.97 to 0.5: another domain
    assert (engine.decisions[-1].kind, engine.decisions[-1].outcome) == ("drift", Outcome.MEASURE)
    assert len(engine.queue) == 2  # every survivor is trialled again (the first is running)


def test_oom_marks_larger_configs_and_prefers_the_same_trainable_set():
    configs = enumerate_configs([8, 4, 2], [0.0, 0.5], [0], ["fp32"], 4)
    marked = []
    engine = RuleEngine(_cands(configs), strategy="ucb", on_infeasible=lambda c, r: marked.append(c.short()))
    first = engine.start(0, 0.0)
    assert first.short() == "mb8/f0.50/ckpt0/fp32"  # fastest survivor first
    nxt = engine.on_oom(0, first)
    # everything predicted >= mb8/f0.5's 42 MiB is gone, the same trainable set continues with mb4
    assert nxt.short() == "mb4/f0.50/ckpt0/fp32"
    assert marked == ["mb8/f0.50/ckpt0/fp32", "mb8/f0.00/ckpt0/fp32", "mb4/f0.00/ckpt0/fp32"]
    last = engine.decisions[-1]
    assert (last.kind, last.outcome, MemoryConfig.from_dict(last.config)) == ("oom", Outcome.SAME_GROUP, nxt)


def test_oom_with_nothing_left_raises():
    engine = RuleEngine([Candidate(MemoryConfig(2), None, None)], strategy="ucb")
    engine.start(0, 0.0)
    with pytest.raises(RuntimeError, match="No feasible configuration is left after out of memory"):
        engine.on_oom(0, MemoryConfig(2))


def test_state_round_trips_through_json():
    a, b, c, cands = _arms()
    engine = RuleEngine(cands, strategy="ucb", trial_steps=2)
    _simulate(engine, {a: 0.01, b: 0.02, c: 0.0}, {a: 1.0, b: 0.5, c: 0.5}, 5, random.Random(2))
    engine.on_oom(11, b)
    state = json.loads(json.dumps(engine.state_dict()))
    restored = RuleEngine(cands, strategy="ucb", trial_steps=2)
    restored.load_state_dict(state)
    assert restored.state_dict() == engine.state_dict()
    assert restored.current == engine.current and restored.best == engine.best


def test_a_measured_peak_over_budget_switches_at_the_next_step():
    configs = enumerate_configs([8, 4], [0.0], [0], ["fp32"], 4)
    engine = RuleEngine(_cands(configs), strategy="ucb", budget_bytes=100 * MIB, margin=0.1)
    first = engine.start(0, 0.0)
    assert first == MemoryConfig(8)
    assert engine.observe_step(1, 1.0, peak_bytes=95 * MIB) is False  # 95 > 90 usable: the prediction was wrong
    assert engine.current == MemoryConfig(4) and MemoryConfig(8) in engine.infeasible
    last = engine.decisions[-1]
    assert (last.kind, last.outcome, last.measured_peak_bytes) == ("over_budget", Outcome.SAME_GROUP, 95 * MIB)


def test_periodic_retune_requeues_every_survivor():
    a, b, c, cands = _arms()
    engine = RuleEngine(cands, strategy="ucb", trial_steps=1, retune_every_steps=5)
    engine.start(0, 0.0)
    for step in range(1, 5):
        engine.observe_step(step, 1.0)
        engine.observe_metric(step, 0.01 * step)
    assert not engine.queue and sum(s.weight for s in engine.arms.values()) == 4.0
    engine.observe_step(5, 1.0)
    assert len(engine.queue) == 3  # every survivor gets a fresh trial ...
    assert sum(s.weight for s in engine.arms.values()) == 4.0 * 0.25  # ... and older estimates weigh a quarter


def test_a_slow_candidates_trial_is_capped_in_seconds():
    a, b, c, cands = _arms()
    engine = RuleEngine(cands, strategy="ucb", trial_steps=10, trial_max_s=2.5)
    engine.start(0, 0.0)
    assert [engine.observe_step(s, 1.0) for s in (1, 2, 3)] == [False, False, True]  # 3 s >= 2.5 s before 10 steps


def test_the_rules_are_ordered_filters_and_marked_configurations_go_first():
    from mpopt_hf.engine.rules import RULES, PruneContext

    assert [r.__name__ for r in RULES] == ["known_infeasible_rule", "batchnorm_rule", "feasibility_rule",
                                           "dominance_rule"]
    configs = enumerate_configs([8, 4], [0.0], [0], ["fp32"], 4)
    cands = _cands(configs)  # mb8 predicted 74 MiB, mb4 42 MiB
    assert [c.config for c in prune(cands, 100 * MIB, 0.0)] == [MemoryConfig(8)]  # dominance keeps the fastest
    # a marked mb8 is out before dominance, so its slower sibling survives
    assert [c.config for c in prune(cands, 100 * MIB, 0.0, infeasible={MemoryConfig(8)})] == [MemoryConfig(4)]
    with pytest.raises(ValueError, match="Every configuration \\(2\\) is marked infeasible"):
        prune(cands, None, 0.0, infeasible=set(configs))
    ctx = PruneContext(budget_bytes=50 * MIB, margin=0.0)
    out = cands
    for rule in RULES:  # each rule alone is a filter on numbers
        out = rule(out, ctx)
    assert [c.config for c in out] == [MemoryConfig(4)]
