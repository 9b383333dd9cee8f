"""Issue 19 on CPU, what tests/test_budget_holds.py leaves open: a race's host copies are inside the per-step measured
peak that is logged and held to the budget, and a budget without room for the copies makes the engine say it does
not race (and hold no copy)."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from dist_fakes import FakeCost, StepClock
from mpopt_hf import MemoryConfig, MPOptArguments, MPOptTrainer
from mpopt_hf.engine import Candidate, Outcome, RuleEngine, enumerate_configs
from mpopt_hf.callback.setup import host_copy_bytes
from mpopt_hf.profiler import measure
from mpopt_hf.testing.tiny_models import build_tiny, example_batch
from trainer_utils import ListDataset, training_args

MIB = 2**20
BATCH = 16
SCALARS = 64 * 1024  # a step's loss sums and item counts: a few scalars, never a tensor of the model's size


class Steps(TrainerCallback):
    """Per step: the configuration, the measured peak and the bytes of race copies held while it ran."""

    def __init__(self):
        self.trainer, self.rows = None, []

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        self.rows.append((state.global_step, t.memory_config, t.step_peak_bytes,
                          sum(held() for held in t.peak_meter.held_bytes)))


def _trainer(tmp_path, budget_bytes, space, steps, **kwargs):
    torch.manual_seed(0)
    model = build_tiny("vit", dropout=0.0)
    log = Steps()
    trainer = MPOptTrainer(
        model=model, args=training_args(tmp_path, BATCH, steps=steps, logging_strategy="steps", logging_steps=1),
        train_dataset=ListDataset(example_batch(model, BATCH * steps)),
        eval_dataset=ListDataset(example_batch(model, 8)),
        callbacks=[log], peak_every_steps=1, log_memory_config=True, clock=StepClock(),
        mpopt_args=MPOptArguments(memory_budget_mib=budget_bytes / MIB, **space), **kwargs)
    log.trainer = trainer
    return trainer, log


def test_a_cpu_race_counts_its_copies_in_the_logged_step_peak_and_stays_in_the_budget(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    whole = measure(model, example_batch(model, BATCH), MemoryConfig(BATCH), optimizer, steps=1).peak_bytes
    budget = 1.3 * (whole + 2 * host_copy_bytes(model, None, BATCH))  # room for the race and its two copies
    space = {"micro_batch_sizes": [BATCH], "freeze_rates": [0.0, 0.5], "checkpoint_segments": [0], "trial_steps": 2,
             "search_share": None}
    trainer, log = _trainer(tmp_path, budget, space, steps=7)
    trainer.train()
    engine = trainer.mpopt_callback.engine
    outcomes = [(d.kind, d.outcome) for d in engine.decisions]
    assert outcomes[0] == ("start", Outcome.RACE_TRIAL) and ("trial", Outcome.RACE_WON) in outcomes, outcomes
    # every step measured (peak_every_steps=1), inside the budget, and logged as measured, copies included
    assert all(peak is not None and peak <= budget for _, _, peak, _ in log.rows), (log.rows, budget)
    # each step's peak is in its own training log row, decision steps included (a decision's log call must not take
    # the step's logging turn)
    logged = {row["step"]: row["peak_memory_mib"] for row in trainer.state.log_history if "peak_memory_mib" in row}
    assert {d.step for d in engine.decisions if d.step > 0} <= set(logged), (logged, engine.decisions)
    for step, _, peak, _ in log.rows:
        assert logged.get(step) == round(peak / MIB, 1), (step, logged)
    raced = [(s, c, p, h) for s, c, p, h in log.rows if h > 0]
    after = [(s, c, p) for s, c, p, h in log.rows if h == 0 and s > raced[-1][0]]
    assert {c for _, c, _, _ in raced} == {MemoryConfig(BATCH), MemoryConfig(BATCH, freeze_rate=0.5)}
    assert after, "the race's winner did not train on after the race"
    # what is held never exceeds the two copies the engine priced against the budget
    assert max(h for *_, h in raced) <= 2 * engine.copy_bytes
    # the copies are inside the measured peak: the winner's step in its trial (its optimizer state made by the
    # trial's first step) less the copies held then is the same configuration's step without copies after the race
    winner = after[0][1]
    trial = [(p, h) for s, c, p, h in raced if c == winner][1:]
    assert trial, "the winner's trial had no step with its optimizer state"
    plain = after[-1][2]
    for peak, held in trial:
        assert abs((peak - held) - plain) <= SCALARS, (peak / MIB, held / MIB, plain / MIB)
        assert peak - plain >= held - SCALARS  # the copies were counted, not only carried


def test_a_budget_without_room_for_the_copies_says_no_race_and_holds_no_copy(tmp_path):
    """The whole batch fits, frozen or not, but not beside the race's two copies, and no smaller sibling exists:
    no race, the decision says why, no copy is taken; every measured step is inside the budget."""
    model = build_tiny("vit", dropout=0.0)
    cost = FakeCost()
    copy = host_copy_bytes(model, cost, BATCH)
    margin = 0.05
    budget = (cost.peak(MemoryConfig(BATCH)) + copy) / (1 - margin)  # usable: the whole batch and one copy
    space = {"micro_batch_sizes": [BATCH], "freeze_rates": [0.0, 0.5], "checkpoint_segments": [0], "trial_steps": 1,
             "search_share": None, "safety_margin": margin}
    trainer, log = _trainer(tmp_path, budget, space, steps=3, cost_model=cost)
    trainer.train()
    engine = trainer.mpopt_callback.engine
    assert engine.copy_bytes == copy and not engine.racing
    first = engine.decisions[0]
    assert (first.kind, first.outcome) == ("start", Outcome.NO_RACE_ROOM), first
    assert MemoryConfig.from_dict(first.config) == MemoryConfig(BATCH)
    assert [h for *_, h in log.rows] == [0, 0, 0]  # no copy was ever held
    assert all(peak is not None and peak <= budget for _, _, peak, _ in log.rows)


def test_the_engine_races_or_not_by_the_room_its_copies_take():
    """Engine level, the same predictions: copies that fit race both sets, copies that do not fit beside the
    frozen set's smaller sibling either make no race and take no snapshot."""
    cost = FakeCost()
    configs = enumerate_configs([8], [0.0, 0.5], [0], ["fp32"], n_blocks=4)
    candidates = [Candidate(c, *cost.predict(c)) for c in configs]  # mb8/f0: 74 MiB, mb8/f0.5: 42 MiB
    for copy_mib, races in ((1.0, True), (10.0, False)):
        engine = RuleEngine(candidates, budget_bytes=85 * MIB, margin=0.0, strategy="race", trial_steps=1,
                            late_gain=False, search_share=None, copy_bytes=copy_mib * MIB)
        engine.start(0, 0.0)
        assert engine.racing is races, (copy_mib, engine.decisions[-1])
        assert ("snapshot" in engine.take_ops()) is races  # no race, no copy
        assert engine.decisions[-1].outcome == (Outcome.RACE_TRIAL if races else Outcome.NO_RACE_ROOM)


def test_the_coupling_check_runs_outside_the_step_and_within_its_micro_batch(tmp_path):
    """The check that weighted micro-batches give the whole batch's gradient runs once, before the first split
    step's measured window, on no more samples than the micro-batch (two at micro-batch 1): the first step's peak is
    the configuration's, as the later steps' (which also hold the optimizer state made by the first)."""
    from mpopt_hf.training.microbatch import batch_size_of

    from memory_cards.architectures import build

    model, make_batch = build("sam-vit-b", tiny=True)  # its activations outweigh its parameters, as at real size
    log, batch, steps = Steps(), 4, 3
    checked = []
    trainer = MPOptTrainer(
        model=model, args=training_args(tmp_path, batch, steps=steps), callbacks=[log],
        train_dataset=ListDataset(make_batch(batch * steps)), memory_config=MemoryConfig(1),
        peak_every_steps=1)
    log.trainer = trainer
    import mpopt_hf.training.trainer as trainer_module

    resolve = trainer_module.resolve_coupled_loss

    def spy(module, sample, **kwargs):
        checked.append((batch_size_of(sample), kwargs.get("n_samples")))
        return resolve(module, sample, **kwargs)

    trainer_module.resolve_coupled_loss = spy
    try:
        trainer.train()
    finally:
        trainer_module.resolve_coupled_loss = resolve
    assert [n for _, n in checked] == [2], checked  # once, on two samples of the batch of four
    first, *later = [peak for _, _, peak, _ in log.rows]
    state = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    assert first <= min(later) + SCALARS, (first / MIB, [p / MIB for p in later])
    assert abs((min(later) - first) - state) <= SCALARS  # the later steps hold the optimizer state besides

