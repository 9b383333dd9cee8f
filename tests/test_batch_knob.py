"""The batch as a knob: a loader batch split into equal updates is exactly a plain Trainer at the smaller batch
(same samples in the same order, every sample once), the learning rate scaled as asked and put back after each
step; an out-of-memory error in a later update retries that update only; the engine searches the batch only when
the user lists batches."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import Trainer

from dist_fakes import FakeCost, FakeOOM, StepClock
from mpopt_hf import MemoryConfig, MPOptArguments, MPOptTrainer
from mpopt_hf.training.batch_updates import lr_scale
from mpopt_hf.testing.tiny_models import build_tiny, example_batch
from trainer_utils import ListDataset, training_args


def _args(tmp_path, batch, steps, lr=1e-2, **extra):
    """SGD: Adam would amplify float noise in gradients that are zero in exact arithmetic (attention key biases)."""
    return training_args(tmp_path, batch, steps=steps, learning_rate=lr, weight_decay=0.0, lr_scheduler_type="constant",
                         optim="sgd", **extra)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _plain(tmp_path, data, batch, steps, lr):
    model = build_tiny("vit", dropout=0.0)
    Trainer(model=model, args=_args(tmp_path / "plain", batch, steps, lr), train_dataset=data).train()
    return _weights(model)


@pytest.mark.parametrize("scaling, factor", [("none", 1.0), ("sqrt", math.sqrt(0.5)), ("linear", 0.5)])
def test_updates_at_half_the_loader_batch_equal_a_plain_trainer_at_that_batch(tmp_path, scaling, factor):
    data = ListDataset(example_batch(build_tiny("vit"), 32))
    model = build_tiny("vit", dropout=0.0)
    trainer = MPOptTrainer(model=model, args=_args(tmp_path / "mp", 16, 2), train_dataset=data, lr_scaling=scaling,
                           memory_config=MemoryConfig(micro_batch_size=4, batch_size=8))
    trainer.train()  # 2 Trainer steps of 16 samples = 4 updates of 8, micro-batched by 4
    expected = _plain(tmp_path, data, 8, 4, 1e-2 * factor)
    for name, value in _weights(model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)  # the scheduler's value, put back
    assert trainer.state.global_step == 2  # Trainer steps count loader batches


def test_an_oom_in_the_second_update_retries_only_it(tmp_path):
    data = ListDataset(example_batch(build_tiny("vit"), 16))
    model = build_tiny("vit", dropout=0.0)
    trainer = MPOptTrainer(model=model, args=_args(tmp_path / "mp", 16, 1), train_dataset=data, lr_scaling="none",
                           memory_config=MemoryConfig(micro_batch_size=8, batch_size=8))
    oom = FakeOOM(model)

    calls = {"n": 0}
    original = trainer._inner_update

    def inner(model_, loss):
        original(model_, loss)
        calls["n"] += 1
        oom.train_limit = 4  # the second update's micro-batch of 8 runs out of memory

    trainer._inner_update = inner
    trainer.train()
    assert calls["n"] == 1 and trainer.oom_events == [(0, MemoryConfig(8, batch_size=8))]
    trained = [s for s in oom.sizes if s.startswith("train")]  # (eval forwards: the coupled-loss check of a split)
    assert trained == ["train8", "train8!", "train4", "train4"]  # the first update is not run again
    expected = _plain(tmp_path, data, 8, 2, 1e-2)
    for name, value in _weights(model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_batch_that_does_not_divide_the_loaders_is_refused_by_name(tmp_path):
    model = build_tiny("vit")
    trainer = MPOptTrainer(model=model, args=_args(tmp_path, 16, 1), train_dataset=ListDataset(example_batch(model, 16)))
    with pytest.raises(ValueError, match=r"MemoryConfig.batch_size=6 must divide per_device_train_batch_size=16"):
        trainer.set_memory_config(MemoryConfig(4, batch_size=6))
    with pytest.raises(ValueError, match=r"effective_batch_sizes holds \[6\]: each must divide"):
        MPOptTrainer(model=model, args=_args(tmp_path, 16, 1), train_dataset=ListDataset(example_batch(model, 16)),
                     mpopt_args=MPOptArguments(effective_batch_sizes=[8, 6]), cost_model=FakeCost(),
                     eval_dataset=ListDataset(example_batch(model, 8))).train()
    assert lr_scale(MemoryConfig(4, batch_size=4), 16, "sqrt") == 0.5 and lr_scale(MemoryConfig(4), 16, "linear") == 1.0


def test_the_engine_searches_the_batch_only_when_asked_and_logs_it(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    data = ListDataset(example_batch(model, 16 * 6))
    space = dict(micro_batch_sizes=[16, 8], freeze_rates=[0.0], checkpoint_segments=[0], trial_steps=1,
                 search_share=None, strategy="ucb")
    trainer = MPOptTrainer(model=model, args=_args(tmp_path, 16, 6), train_dataset=data,
                           eval_dataset=ListDataset(example_batch(model, 8)), cost_model=FakeCost(), clock=StepClock(),
                           mpopt_args=MPOptArguments(effective_batch_sizes=[16, 8, 4], **space))
    assert trainer.lr_scaling == "sqrt"  # the default once the batch is searched
    trainer.train()
    engine = trainer.mpopt_callback.engine
    batches = {c.config.batch_size for c in engine.candidates}
    assert batches == {None, 8, 4}  # 16 is the loader's own batch: None
    assert all(c.config.micro_batch_size <= (c.config.batch_size or 16) for c in engine.candidates)
    assert len({c.config.batch_size for c in engine.survivors}) == 3  # different batches learn differently: kept
    decisions = json.load(open(os.path.join(tmp_path, "decisions.json")))
    assert {d["config"]["batch_size"] for d in decisions} >= {None, 8, 4}  # each was tried
    plain = MPOptTrainer(model=build_tiny("vit"), args=_args(tmp_path / "p", 16, 1), train_dataset=data,
                         eval_dataset=ListDataset(example_batch(model, 8)), cost_model=FakeCost(), clock=StepClock(),
                         mpopt_args=MPOptArguments(**space))
    plain.train()
    assert {c.config.batch_size for c in plain.mpopt_callback.engine.candidates} == {None}
