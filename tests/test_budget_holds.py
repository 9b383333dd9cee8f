"""The budget holds for everything the process does (issue 19): the profiler measures only what is predicted to
fit, and every measured training step stays inside it, the race's host copies counted."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from dist_fakes import StepClock
from mpopt_hf import MemoryConfig, MPOptArguments, MPOptTrainer
from mpopt_hf.engine import Outcome
from mpopt_hf.profiler import fitting, measure
from mpopt_hf.testing.tiny_models import build_tiny, example_batch
from trainer_utils import ListDataset, training_args

MIB = 2**20
BATCH = 16


class StepPeaks(TrainerCallback):
    def __init__(self):
        self.trainer, self.peaks = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.peaks.append((state.global_step, self.trainer._step_peak_bytes, self.trainer.memory_config))


def _whole_batch_peak() -> float:
    model = build_tiny("vit", dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return measure(model, example_batch(model, BATCH), MemoryConfig(BATCH), optimizer, steps=1).peak_bytes


def test_no_configuration_over_the_budget_runs_fit_included(tmp_path, monkeypatch):
    budget = 0.6 * _whole_batch_peak()
    ran = []  # what the profiler measured, as its own log of what it ran
    real_measure = fitting.measure

    def logged(model, batch, config, optimizer, **kwargs):
        result = real_measure(model, batch, config, optimizer, **kwargs)
        ran.append((config, result.peak_bytes, kwargs.get("spill_dir")))
        return result

    monkeypatch.setattr(fitting, "measure", logged)
    model = build_tiny("vit", dropout=0.0)
    data = ListDataset(example_batch(model, BATCH * 6))
    space = dict(micro_batch_sizes=[16, 8, 4, 2], freeze_rates=[0.0, 0.5], checkpoint_segments=[0, 1],
                 trial_steps=1, search_share=None)
    peaks = StepPeaks()
    trainer = MPOptTrainer(
        model=model, args=training_args(tmp_path, BATCH, steps=6), train_dataset=data,
        eval_dataset=ListDataset(example_batch(model, 8)), callbacks=[peaks], peak_every_steps=1,
        mpopt_args=MPOptArguments(memory_budget_mib=budget / MIB, **space), clock=StepClock(),
    )
    peaks.trainer = trainer
    trainer.train()
    assert ran, "the fit measured nothing"
    assert MemoryConfig(BATCH) not in {config for config, _, _ in ran}
    for config, peak, spill_dir in ran:  # the isolation copy went to disk: nothing beside the step
        assert peak <= budget and spill_dir is not None, (config.short(), peak / MIB, budget / MIB)
    measured = [(step, peak, config) for step, peak, config in peaks.peaks if peak is not None]
    assert len(measured) == len(peaks.peaks) == 6
    for step, peak, config in measured:
        assert peak <= budget, (step, config.short(), peak / MIB, budget / MIB)
    engine = trainer.mpopt_callback.engine
    assert engine.copy_bytes > 0
    outcomes = [d.outcome for d in engine.decisions]
    assert Outcome.RACE_ROOM in outcomes or Outcome.NO_RACE_ROOM in outcomes, outcomes  # the copies shaped it
    for d in engine.decisions:  # a race runs only at configurations that leave room for its two host copies
        if d.outcome in (Outcome.RACE_TRIAL, Outcome.RACE_ROOM):
            assert d.predicted_peak_bytes + 2 * engine.copy_bytes <= budget * (1 - engine.margin), d


def test_a_measurement_spilled_to_disk_puts_everything_back(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    batch = example_batch(model, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    measure(model, batch, MemoryConfig(8), optimizer, steps=1)  # optimizer state exists
    model.classifier.weight.grad = torch.ones_like(model.classifier.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}
    rng = torch.get_rng_state()
    measure(model, batch, MemoryConfig(4, 0.5, 1), optimizer, steps=1, spill_dir=str(tmp_path))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(state[i][k], after[i][k]) for i in state for k in state[i])
    assert torch.equal(model.classifier.weight.grad, torch.ones_like(model.classifier.weight))
    assert torch.equal(torch.get_rng_state(), rng)
    assert list(tmp_path.iterdir()) == []  # the file is gone
