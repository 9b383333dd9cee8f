"""WallClockLimit stops a Trainer after a wall-clock budget, counted from the first step's start."""

from __future__ import annotations

import pytest
from transformers import Trainer

from dist_fakes import StepClock
from mpopt_hf import WallClockLimit
from mpopt_hf.testing.tiny_models import build_tiny
from trainer_utils import ListDataset, training_args


def _data(model, n=64):
    from mpopt_hf.testing.tiny_models import example_batch

    return ListDataset(example_batch(model, n))


def test_stops_after_the_budget_and_rearms_for_the_next_train(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    limit = WallClockLimit(3.0, clock=StepClock(tick=1.0))  # one tick per clock read
    trainer = Trainer(model=model, args=training_args(tmp_path, 8, steps=20), train_dataset=_data(model),
                      callbacks=[limit])
    trainer.train()
    # reads: start (t=1), then one per step end at t=2, 3, 4: 3 s have passed at the third step's end
    assert trainer.state.global_step == 3 and limit.stopped_early
    trainer.args.max_steps = 2
    trainer.train()
    assert trainer.state.global_step == 2 and not limit.stopped_early  # max_steps came first this time


def test_rejects_a_non_positive_budget():
    with pytest.raises(ValueError, match="seconds > 0"):
        WallClockLimit(0)


def test_a_clock_started_before_training_counts_the_time_before_the_first_step(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    clock = StepClock(tick=1.0)
    limit = WallClockLimit(3.0, clock=clock).start()  # t=1: e.g. the task began, a configuration is chosen
    clock()  # t=2: time spent before the trainer's first step
    trainer = Trainer(model=model, args=training_args(tmp_path, 8, steps=20), train_dataset=_data(model),
                      callbacks=[limit])
    trainer.train()
    # step ends read t=3, 4: 3 s since t=1 at the second (counted from the first step, it would be the third)
    assert trainer.state.global_step == 2 and limit.stopped_early
    trainer.train()  # the next train() is counted from its own first step again: 3 steps
    assert trainer.state.global_step == 3 and limit.stopped_early
