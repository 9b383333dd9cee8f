"""MPOptTrainer is a drop-in Trainer: side by side with identical arguments on a model with no repeated blocks.

With no knobs it must be Trainer exactly (bitwise); with micro-batching (an uneven 3/3/2 split) the same run
to float rounding. The contract checked is the one transformers' own tests/trainer/ hold Trainer to: training,
evaluation, prediction, log history, checkpoint rotation, resume, early stopping, gradient accumulation, bf16.
"""

import logging
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import EarlyStoppingCallback, PretrainedConfig, PreTrainedModel, Trainer

from mpopt_hf import MemoryConfig, MPOptTrainer
from trainer_utils import training_args

KNOBS = [None, MemoryConfig(3)]
IDS = ["no-knobs", "mb3"]


class RegressionConfig(PretrainedConfig):
    model_type = "mpopt-test-regression"

    def __init__(self, hidden: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden


class RegressionModel(PreTrainedModel):
    """A two-layer regressor: no container of repeated blocks, explicit forward signature."""

    config_class = RegressionConfig

    def __init__(self, config: RegressionConfig):
        super().__init__(config)
        self.fc_in = nn.Linear(4, config.hidden)
        self.fc_out = nn.Linear(config.hidden, 1)
        self.post_init()

    def _init_weights(self, module):
        pass  # the seed decides, in the test

    def forward(self, input_x, labels=None):
        y = self.fc_out(torch.tanh(self.fc_in(input_x))).squeeze(-1)
        return (y,) if labels is None else (F.mse_loss(y, labels), y)


class RegressionData(torch.utils.data.Dataset):
    def __init__(self, n: int = 48, seed: int = 0, nan_rows: tuple[int, ...] = ()):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)
        self.x[list(nan_rows)] = float("nan")

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_x": self.x[i], "labels": self.y[i]}


def _model(seed: int = 0) -> RegressionModel:
    torch.manual_seed(seed)
    return RegressionModel(RegressionConfig())


def _args(tmp_path, name, **overrides):
    values = dict(steps=6, learning_rate=0.05, weight_decay=0.0, logging_strategy="steps", logging_steps=1,
                  train_sampling_strategy="sequential")
    values.update(overrides)
    return training_args(tmp_path / name, 8, **values)


def _trainer(cls, model, args, knobs, **kwargs):
    extra = {} if cls is Trainer or knobs is None else {"memory_config": knobs}
    return cls(model=model, args=args, train_dataset=RegressionData(), eval_dataset=RegressionData(16, seed=1),
               **extra, **kwargs)


def _assert_same_weights(a: nn.Module, b: nn.Module, exact: bool) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def _losses(trainer) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("knobs", KNOBS, ids=IDS)
def test_train_evaluate_predict_side_by_side(tmp_path, knobs, accumulation):
    exact = knobs is None
    runs = []
    for cls in (Trainer, MPOptTrainer):
        args = _args(tmp_path, cls.__name__, gradient_accumulation_steps=accumulation)
        trainer = _trainer(cls, _model(), args, knobs)
        output = trainer.train()
        runs.append((trainer, output, trainer.evaluate(), trainer.predict(RegressionData(10, seed=2))))
    (ref, ref_out, ref_eval, ref_pred), (got, got_out, got_eval, got_pred) = runs
    _assert_same_weights(got.model, ref.model, exact)
    assert got.state.global_step == ref.state.global_step == 6
    assert [s for s, _ in _losses(got)] == [s for s, _ in _losses(ref)]
    torch.testing.assert_close([v for _, v in _losses(got)], [v for _, v in _losses(ref)],
                               rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
    assert set(got_eval) == set(ref_eval)
    assert got_eval["eval_loss"] == pytest.approx(ref_eval["eval_loss"], rel=0 if exact else 1e-5)
    torch.testing.assert_close(torch.as_tensor(got_pred.predictions), torch.as_tensor(ref_pred.predictions),
                               rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)
    assert got_out.training_loss == pytest.approx(ref_out.training_loss, rel=0 if exact else 1e-5)
    if exact:  # every log entry but the timings
        strip = lambda log: [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k} for e in log]
        assert strip(got.state.log_history) == strip(ref.state.log_history)


@pytest.mark.parametrize("knobs", KNOBS, ids=IDS)
def test_checkpoint_rotation_and_resume(tmp_path, knobs):
    exact = knobs is None
    finals = {}
    for cls in (Trainer, MPOptTrainer):
        args = _args(tmp_path, cls.__name__, steps=6, save_strategy="steps", save_steps=2, save_total_limit=2)
        whole = _trainer(cls, _model(), args, knobs)
        whole.train()
        folders = sorted(os.listdir(args.output_dir))
        assert folders == ["checkpoint-4", "checkpoint-6"], cls.__name__
        # a fresh trainer on a fresh model resumed from step 4 ends where the uninterrupted run ended
        resumed = _trainer(cls, _model(seed=5), args, knobs)
        resumed.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-4"))
        assert resumed.state.global_step == 6
        _assert_same_weights(resumed.model, whole.model, exact=True)
        finals[cls] = whole.model
    _assert_same_weights(finals[MPOptTrainer], finals[Trainer], exact)


@pytest.mark.parametrize("knobs", KNOBS, ids=IDS)
def test_early_stopping_stops_at_the_same_step(tmp_path, knobs):
    stopped = []
    for cls in (Trainer, MPOptTrainer):
        args = _args(tmp_path, cls.__name__, steps=40, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                     save_steps=1, save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="eval_loss")
        trainer = _trainer(cls, _model(), args, knobs,
                           callbacks=[EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=0.05)])
        trainer.train()
        stopped.append((trainer.state.global_step, trainer.state.best_global_step))
    assert stopped[0] == stopped[1] and stopped[0][0] < 40


@pytest.mark.parametrize("knobs", [None, MemoryConfig(3, precision="bf16")], ids=["no-knobs", "mb3-bf16"])
def test_bf16_on_cpu_side_by_side(tmp_path, knobs):
    runs = []
    for cls in (Trainer, MPOptTrainer):
        trainer = _trainer(cls, _model(), _args(tmp_path, cls.__name__, bf16=True), knobs)
        trainer.train()
        runs.append(trainer)
    exact = knobs is None
    _assert_same_weights(runs[1].model, runs[0].model, exact) if exact else None
    ref, got = [v for _, v in _losses(runs[0])], [v for _, v in _losses(runs[1])]
    torch.testing.assert_close(got, ref, rtol=0 if exact else 2e-2, atol=0 if exact else 1e-2)


def test_bf16_default_config_follows_the_training_arguments(tmp_path):
    trainer = MPOptTrainer(model=_model(), args=_args(tmp_path, "m", bf16=True), train_dataset=RegressionData())
    assert trainer.memory_config.precision == "bf16"


def test_a_knob_that_needs_blocks_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="register_block_adapter"):
        _trainer(MPOptTrainer, _model(), _args(tmp_path, "m"), MemoryConfig(4, freeze_rate=0.5))
    trainer = _trainer(MPOptTrainer, _model(), _args(tmp_path, "n"), MemoryConfig(2))  # no block needed
    assert trainer.train().global_step == 6


def test_auto_find_batch_size_says_what_happens(tmp_path, caplog):
    trainer = _trainer(MPOptTrainer, _model(), _args(tmp_path, "m", auto_find_batch_size=True), MemoryConfig(4))
    with caplog.at_level(logging.WARNING, logger="mpopt_hf.training.trainer"):
        trainer.train()
    assert any("auto_find_batch_size=True" in r.message and "effective batch (8 per device) is kept" in r.message
               for r in caplog.records)


# ---------------------------------------------------------------------------- non-finite steps


def test_a_nan_step_is_skipped_and_logged(tmp_path):
    nan_step = 7  # 0-based step whose batch holds a NaN (batches are sequential, 8 rows each)
    data = RegressionData(160, nan_rows=(nan_step * 8 + 3,))
    trainer = MPOptTrainer(model=_model(), args=_args(tmp_path, "nan", steps=20, lr_scheduler_type="constant",
                                                      optim="adamw_torch", weight_decay=0.1),
                           train_dataset=data, memory_config=MemoryConfig(4))
    trainer.train()
    # the reference skips that batch's rows: 19 steps on the other batches, in the same order
    keep = [i for i in range(160) if i // 8 != nan_step]
    clean = RegressionData(160)
    clean.x, clean.y = clean.x[keep], clean.y[keep]
    reference = MPOptTrainer(model=_model(), args=_args(tmp_path, "ref", steps=19, lr_scheduler_type="constant",
                                                        optim="adamw_torch", weight_decay=0.1),
                             train_dataset=clean, memory_config=MemoryConfig(4))
    reference.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    _assert_same_weights(trainer.model, reference.model, exact=False)
    assert trainer.nonfinite.skipped == [nan_step]
    assert any(e.get("mpopt/nonfinite_steps_skipped") == 1.0 and e["step"] == nan_step
               for e in trainer.state.log_history)


def test_nan_steps_in_a_row_stop_with_the_steps_named(tmp_path):
    data = RegressionData(160, nan_rows=(5 * 8, 6 * 8 + 1, 7 * 8 + 2))
    trainer = MPOptTrainer(model=_model(), args=_args(tmp_path, "nan", steps=20), train_dataset=data,
                           memory_config=MemoryConfig(8))
    with pytest.raises(RuntimeError, match=r"not finite at steps \[5, 6, 7\] \(3 in a row.*weights are those before step 5"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ---------------------------------------------------------------------------- out of memory in the optimizer step


class _FailingAdamW(torch.optim.AdamW):
    """Runs out of memory in its first step, after creating part of its state (as AdamW's lazy init would)."""

    def __init__(self, params, fail_after_update: bool = False, fail_at: int = 1, **kwargs):
        super().__init__(params, **kwargs)
        self.calls, self.fail_after_update, self.fail_at = 0, fail_after_update, fail_at

    @torch.no_grad()
    def step(self, closure=None):
        self.calls += 1
        if self.calls == self.fail_at:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            for p in params[: len(params) // 2]:
                self.state[p].update(step=torch.tensor(3.0), exp_avg=torch.full_like(p, 7.0), exp_avg_sq=torch.ones_like(p))
            if self.fail_after_update:
                params[0].add_(1.0)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB (fake, from a test)")
        return super().step(closure)


def _optimizer_run(tmp_path, name, optimizer_cls, **opt_kwargs):
    model = _model()
    args = _args(tmp_path, name, steps=5, lr_scheduler_type="linear", max_grad_norm=1.0)
    optimizer = optimizer_cls(model.parameters(), lr=args.learning_rate, **opt_kwargs)
    trainer = MPOptTrainer(model=model, args=args, train_dataset=RegressionData(), memory_config=MemoryConfig(8),
                           optimizers=(optimizer, None))
    trainer.train()
    return trainer


def test_oom_in_the_optimizer_step_reruns_the_whole_step(tmp_path):
    trainer = _optimizer_run(tmp_path, "oom", _FailingAdamW)
    reference = _optimizer_run(tmp_path, "ref", torch.optim.AdamW)
    assert trainer.state.global_step == reference.state.global_step == 5
    assert trainer.oom_events == [(0, MemoryConfig(8))] and trainer.memory_config == MemoryConfig(4)
    _assert_same_weights(trainer.model, reference.model, exact=False)
    assert trainer.lr_scheduler.get_last_lr() == reference.lr_scheduler.get_last_lr()


def test_oom_after_the_optimizer_began_updating_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="cannot be undone"):
        _optimizer_run(tmp_path, "oom", _FailingAdamW, fail_after_update=True, fail_at=2)


@pytest.mark.parametrize("metric, worst", [("val_accuracy", 0.0), ("confidence", 0.25), ("entropy", -1.3862944)])
def test_the_gain_metric_scores_a_non_finite_output_as_the_worst(metric, worst):
    from mpopt_hf.callback.gain import item_scores

    logits = torch.tensor([[9.0, 0.0, 0.0, 0.0], [float("nan"), 9.0, 0.0, 0.0], [0.0, float("inf"), 0.0, 0.0]])
    scores = item_scores(logits, torch.tensor([0, 1, 1]), metric)
    assert torch.isfinite(scores).all()
    assert scores[1:].tolist() == pytest.approx([worst, worst])
    assert scores[0] > worst
