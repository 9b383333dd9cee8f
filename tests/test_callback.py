"""MPOptCallback: metrics, the plain-Trainer path, task boundaries, the time budget."""

import json
import os

import pytest
import torch
from transformers import Trainer, TrainerCallback

from dist_fakes import FakeCost, StepClock
from mpopt_hf import MemoryConfig, MPOptArguments, MPOptCallback, MPOptTrainer
from mpopt_hf.model.blocks import find_blocks
from mpopt_hf.callback.gain import metric_from_logits, resolve_metric
from mpopt_hf.engine import Outcome
from mpopt_hf.testing.tiny_models import build_tiny, example_batch
from trainer_utils import ListDataset, training_args


def test_metrics_from_logits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    assert metric_from_logits(logits, torch.tensor([0, 1, 1]), "val_accuracy") == (2.0, 3)
    uniform = torch.zeros(4, 2)
    s, n = metric_from_logits(uniform, None, "entropy")
    assert n == 4 and s == pytest.approx(-4 * torch.log(torch.tensor(2.0)).item())
    assert metric_from_logits(uniform, None, "confidence") == (pytest.approx(2.0), 4)
    lm = torch.zeros(1, 3, 5)
    lm[0, 0, 2] = lm[0, 1, 4] = 9.0  # position t predicts token t+1
    assert metric_from_logits(lm, torch.tensor([[7, 2, 4]]), "val_accuracy") == (2.0, 2)
    with pytest.raises(ValueError, match="needs labels"):
        metric_from_logits(logits, None, "val_accuracy")
    assert resolve_metric("auto", {"pixel_values": 0, "labels": 1}) == "val_accuracy"
    assert resolve_metric("auto", {"pixel_values": 0}) == "entropy"


def _data(model, n=32, labels=True):
    batch = example_batch(model, n)
    if not labels:
        batch.pop("labels")
    return ListDataset(batch)


def test_plain_trainer_gets_freezing_only_and_a_warning(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    callback = MPOptCallback(
        MPOptArguments(freeze_rates=[0.5], checkpoint_segments=[1], trial_steps=1), eval_dataset=_data(model, 8)
    )
    trainer = Trainer(model=model, args=training_args(tmp_path, 8, steps=2), train_dataset=_data(model), callbacks=[callback])
    with pytest.warns(UserWarning, match=r"plain Trainer applies only freezing and checkpointing"):
        trainer.train()
    blocks = find_blocks(model)
    assert not any(p.requires_grad for p in blocks.block_params(0)) and all(p.requires_grad for p in blocks.block_params(3))
    decisions = json.load(open(os.path.join(tmp_path, "decisions.json")))
    assert {MemoryConfig.from_dict(d["config"]) for d in decisions} == {MemoryConfig(8, freeze_rate=0.5, checkpoint_segments=1)}


@pytest.mark.parametrize("strategy", ["race", "ucb"])
def test_unlabelled_data_use_entropy_and_a_task_boundary_reopens_the_search(tmp_path, strategy):
    model = build_tiny("vit", dropout=0.0)
    mpopt = MPOptArguments(micro_batch_sizes=[8], freeze_rates=[0.0, 0.5], checkpoint_segments=[0], trial_steps=1,
                           search_share=None, strategy=strategy)
    trainer = MPOptTrainer(
        model=model, args=training_args(tmp_path, 8, steps=6), train_dataset=_data(model),
        eval_dataset=_data(model, 8, labels=False), mpopt_args=mpopt, cost_model=FakeCost(), clock=StepClock(),
    )

    class Boundary(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                trainer.mpopt_callback.task_boundary()

    trainer.add_callback(Boundary())
    trainer.train()
    callback = trainer.mpopt_callback
    assert callback.metric == "entropy"
    decisions = [(d.step, d.kind, d.outcome) for d in callback.engine.decisions]
    trial = {"race": Outcome.RACE_TRIAL, "ucb": Outcome.MEASURE}[strategy]
    assert (4, "task", trial) in decisions, decisions
    after = [(kind, outcome) for s, kind, outcome in decisions if s > 4]
    assert after and after[0] == ("trial", trial)  # the second survivor is re-trialled too
    if strategy == "race":
        assert len(callback.engine.race_trials) == 2


def test_race_trials_start_from_the_same_weights_and_the_winner_is_kept(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    mpopt = MPOptArguments(micro_batch_sizes=[8], freeze_rates=[0.0, 0.5], checkpoint_segments=[0], trial_steps=1,
                           search_share=None, strategy="race")
    trainer = MPOptTrainer(
        model=model, args=training_args(tmp_path, 8, steps=4), train_dataset=_data(model),
        eval_dataset=_data(model, 8), mpopt_args=mpopt, cost_model=FakeCost(), clock=StepClock(),
    )
    begins, ends = {}, {}

    def weights():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    class Record(TrainerCallback):  # runs after MPOptCallback, so it sees the weights the step will use
        def on_step_begin(self, args, state, control, **kwargs):
            begins[state.global_step] = weights()

        def on_step_end(self, args, state, control, **kwargs):
            ends[state.global_step] = weights()

    trainer.add_callback(Record())
    trainer.train()
    engine = trainer.mpopt_callback.engine
    decisions = [(d.step, d.kind, d.outcome) for d in engine.decisions]
    assert decisions[:3] == [(0, "start", Outcome.RACE_TRIAL), (1, "trial", Outcome.RACE_TRIAL),
                             (2, "trial", Outcome.RACE_WON)]

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(begins[1], begins[0])  # trial 2 was restored to where trial 1 began
    assert not same(ends[1], begins[0])  # ... although trial 1 had moved the weights
    winner_end = ends[1] if engine.decisions[2].config == engine.decisions[0].config else ends[2]
    assert same(begins[2], winner_end)  # training goes on from the winner's end state
    assert trainer.mpopt_callback._copies == {}  # the copies are dropped once the race is over


def test_time_budget_stops_training(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    mpopt = MPOptArguments(micro_batch_sizes=[8], freeze_rates=[0.0], checkpoint_segments=[0], time_budget_s=2.0)
    trainer = MPOptTrainer(
        model=model, args=training_args(tmp_path, 8, steps=20), train_dataset=_data(model),
        eval_dataset=_data(model, 8), mpopt_args=mpopt, clock=StepClock(tick=0.5),
    )
    trainer.train()
    assert trainer.state.global_step == 4  # 0.5 s per step (fake clock): the 2 s budget lasts 4 steps
    engine = trainer.mpopt_callback.engine
    # the one evaluation (before training) took one tick: trials need 0.5 x 0.95 / 0.05 = 9.5 s, so no trial ended
    assert engine.search_seconds == 0.5 and engine.min_trial_seconds == pytest.approx(9.5)
    assert len(engine.decisions) == 1


@pytest.mark.parametrize("predictor", ["profile", "fake"])
def test_a_budget_without_a_cost_model_predicts_peaks(tmp_path, predictor):
    from mpopt_hf.cost import FakeTensorCostModel, ProfileCostModel

    model = build_tiny("vit", dropout=0.0)
    space = dict(micro_batch_sizes=[16, 4], freeze_rates=[0.0], checkpoint_segments=[0], trial_steps=1,
                 search_share=None, cost_predictor=predictor)
    probe = MPOptTrainer(
        model=model, args=training_args(tmp_path, 16, steps=1), train_dataset=_data(model),
        eval_dataset=_data(model, 8), mpopt_args=MPOptArguments(memory_budget_mib=1e6, **space), clock=StepClock(),
    )
    probe.train()
    costs = probe.mpopt_callback.cost_model
    assert isinstance(costs, {"profile": ProfileCostModel, "fake": FakeTensorCostModel}[predictor])
    whole, micro = costs.peak_mib(MemoryConfig(16)), costs.peak_mib(MemoryConfig(4))
    assert micro < whole
    step_s = [c.step_s for c in probe.mpopt_callback.engine.candidates]
    assert all(t is not None and t > 0 for t in step_s) if predictor == "profile" else step_s == [None, None]
    # a budget between the two peaks (margin included) leaves only the micro-batched configuration
    budget = (whole + micro) / 2 / (1 - 0.05)
    trainer = MPOptTrainer(
        model=build_tiny("vit", dropout=0.0), args=training_args(tmp_path, 16, steps=3), train_dataset=_data(model),
        eval_dataset=_data(model, 8), mpopt_args=MPOptArguments(memory_budget_mib=budget, **space), clock=StepClock(),
    )
    trainer.train()
    used = {MemoryConfig.from_dict(d.config) for d in trainer.mpopt_callback.engine.decisions}
    assert used == {MemoryConfig(4)}


def test_the_profile_store_makes_a_second_run_reuse_the_fit(tmp_path):
    from mpopt_hf.store import SQLiteStore

    path = tmp_path / "profiles.sqlite"
    space = dict(micro_batch_sizes=[16, 4], freeze_rates=[0.0, 0.5], checkpoint_segments=[0], trial_steps=1,
                 search_share=None, memory_budget_mib=1e6, profile_store=str(path))
    runs = []
    for _ in range(2):
        model = build_tiny("vit", dropout=0.0)
        trainer = MPOptTrainer(
            model=model, args=training_args(tmp_path, 16, steps=1), train_dataset=_data(model),
            eval_dataset=_data(model, 8), mpopt_args=MPOptArguments(**space), clock=StepClock(),
        )
        trainer.train()
        callback = trainer.mpopt_callback
        store = SQLiteStore(path)
        runs.append((callback.cost_model.reused, len(store.measurements(callback.store_key))))
        store.close()
    assert runs[0][0] is False and runs[0][1] >= 1  # fitted: measured configurations went to the store
    assert runs[1] == (True, runs[0][1])  # reused: nothing measured again


def test_training_that_stops_mid_race_keeps_the_best_ended_trial_and_can_go_on(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    mpopt = MPOptArguments(micro_batch_sizes=[8], freeze_rates=[0.0, 0.5], checkpoint_segments=[0], trial_steps=2,
                           search_share=None, late_gain=False)
    trainer = MPOptTrainer(
        model=model, args=training_args(tmp_path, 8, steps=3), train_dataset=_data(model),
        eval_dataset=_data(model, 8), mpopt_args=mpopt, cost_model=FakeCost(), clock=StepClock(),
    )
    ends = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    trainer.add_callback(Record())
    trainer.train()  # trial 1 ends at step 2, trial 2 is cut after one step
    engine = trainer.mpopt_callback.engine
    assert (engine.decisions[-1].kind, engine.decisions[-1].outcome) == ("stop", Outcome.KEEP_BEST)
    first_run = list(engine.decisions)
    assert not engine.racing and engine.current == MemoryConfig.from_dict(engine.decisions[0].config)
    assert all(torch.equal(v, ends[2][k]) for k, v in model.state_dict().items())  # trial 1's end state
    trainer.args.max_steps = 8
    trainer.train()  # a later run on the same callback races again from there, its copies taken afresh
    later = [(d.kind, d.outcome) for d in engine.decisions][len(first_run):]
    assert later[0] == ("trial", Outcome.RACE_TRIAL) and later[-1] == ("trial", Outcome.RACE_WON), later


def test_without_eval_data_the_gain_is_the_training_loss(tmp_path):
    """The one-line path: MPOptTrainer(..., mpopt_args=MPOptArguments()) with only a train_dataset trains on the
    training loss the steps compute anyway: no evaluation runs (no search time), each race trial is scored by its
    later steps' losses, and the race's start by its first step's loss."""
    model = build_tiny("vit", dropout=0.0)
    forwards = []
    model.register_forward_pre_hook(lambda m, a: forwards.append(m.training))
    trainer = MPOptTrainer(model=model, args=training_args(tmp_path, 8, steps=6), train_dataset=_data(model, 48),
                           mpopt_args=MPOptArguments(micro_batch_sizes=[8], freeze_rates=[0.0, 0.5],
                                                     checkpoint_segments=[0], trial_steps=2, search_share=None),
                           clock=StepClock())
    trainer.train()
    callback, engine = trainer.mpopt_callback, trainer.mpopt_callback.engine
    assert callback.metric == "train_loss" and engine.search_seconds == 0.0
    assert all(forwards), "an evaluation forward ran"
    losses = list(callback._gain.train_loss.losses)
    assert len(losses) == 6 and all(v > 0 for v in losses)
    # the race: trial 1 = steps 1-2, trial 2 = steps 3-4 from the same weights, each scored by its later half (one
    # step); the race starts from step 1's loss, computed on the start weights
    assert sorted(t.metric for t in engine.race_trials.values()) == sorted([-losses[1], -losses[3]])
    assert engine.race_state.start_metric == -losses[0]
    assert [d.kind for d in engine.decisions][:3] == ["start", "trial", "trial"]


def test_gain_metric_train_loss_needs_mpopt_trainer(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    callback = MPOptCallback(MPOptArguments(freeze_rates=[0.5], checkpoint_segments=[1], trial_steps=1,
                                            gain_metric="train_loss"))
    trainer = Trainer(model=model, args=training_args(tmp_path, 8, steps=1), train_dataset=_data(model), callbacks=[callback])
    with pytest.raises(ValueError, match="gain_metric='train_loss' reads the loss of each training step"):
        trainer.train()

def test_8_bit_optimizer_state_needs_mpopt_trainer(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    callback = MPOptCallback(MPOptArguments(freeze_rates=[0.0], checkpoint_segments=[0], trial_steps=1,
                                            optimizer_states=["fp32", "8bit"]), eval_dataset=_data(model, 8))
    trainer = Trainer(model=model, args=training_args(tmp_path, 8, steps=1), train_dataset=_data(model), callbacks=[callback])
    with pytest.raises(ValueError, match=r"optimizer_states=\['fp32', '8bit'\] needs MPOptTrainer"):
        trainer.train()
