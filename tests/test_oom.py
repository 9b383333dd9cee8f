"""Out-of-memory back-off inside MPOptTrainer.training_step, on CPU with a fake allocator failure."""

import copy
import json
import os

import pytest
import torch

from dist_fakes import MIB, FakeCost, FakeOOM, StepClock
from mpopt_hf import MemoryConfig, MPOptArguments, MPOptTrainer
from mpopt_hf.training.oom import is_out_of_memory
from mpopt_hf.testing.tiny_models import build_tiny, example_batch
from trainer_utils import ListDataset, run_steps, training_args


def test_is_out_of_memory_recognises_allocator_failures_only():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: can't allocate memory"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if ..."))
    assert not is_out_of_memory(RuntimeError("shape mismatch: out of memory order"))
    assert not is_out_of_memory(ValueError("CUDA out of memory."))
    assert not is_out_of_memory(KeyboardInterrupt())
    # accelerate's own list (HIP, XPU) and the messages it lacks, but nothing with a non-string argument
    assert is_out_of_memory(RuntimeError("HIP out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be reported later"))
    assert is_out_of_memory(RuntimeError("[enforce fail] DefaultCPUAllocator: not enough memory: you tried 9 GB"))
    assert not is_out_of_memory(RuntimeError(2))


def test_without_engine_the_step_is_rerun_with_half_the_micro_batch(tmp_path):
    base = build_tiny("vit", dropout=0.0)
    data = ListDataset(example_batch(base, 16))
    model = copy.deepcopy(base)
    oom = FakeOOM(model, train_limit=2)
    trainer, capture = run_steps(MPOptTrainer, model, data, training_args(tmp_path, 8, steps=2), memory_config=MemoryConfig(8))
    # exact sequence tried; the first split step first checks, in eval mode on 4 samples whole and in halves,
    # that the loss does not couple the batch
    assert oom.sizes == ["train8!", "eval4", "eval2", "eval2", "train4!"] + ["train2"] * 4 + ["train2"] * 4
    assert trainer.state.global_step == 2 and len(capture.grads) == 2  # no optimizer step doubled or lost
    assert trainer.oom_events == [(0, MemoryConfig(8)), (0, MemoryConfig(4))]
    assert trainer.memory_config == MemoryConfig(2)
    # the gradients are those of an undisturbed run at micro-batch 2: nothing skipped, nothing left over
    _, ref = run_steps(MPOptTrainer, copy.deepcopy(base), data, training_args(tmp_path, 8, steps=2), memory_config=MemoryConfig(2))
    for got, want in zip(capture.grads, ref.grads):
        assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want if want[n] is not None)


def test_partial_gradients_of_the_failed_step_are_dropped(tmp_path):
    """The error strikes the second micro-batch, after the first one's backward already accumulated."""
    base = build_tiny("vit", dropout=0.0)
    data = ListDataset(example_batch(base, 8))
    model = copy.deepcopy(base)
    calls = []

    def second_micro_batch_fails(module, args, kwargs):
        if not module.training:
            return  # the coupling check before the first split step runs in eval mode
        calls.append(kwargs["pixel_values"].shape[0])
        if calls == [4, 4]:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")

    model.register_forward_pre_hook(second_micro_batch_fails, with_kwargs=True)
    trainer, capture = run_steps(MPOptTrainer, model, data, training_args(tmp_path, 8), memory_config=MemoryConfig(4))
    assert calls == [4, 4, 2, 2, 2, 2]
    _, ref = run_steps(MPOptTrainer, copy.deepcopy(base), data, training_args(tmp_path, 8), memory_config=MemoryConfig(8))
    errors = [(capture.grads[0][n] - g).abs().max().item() for n, g in ref.grads[0].items() if g is not None]
    assert max(errors) < 1e-6


def _engine_trainer(tmp_path, model, steps=4, budget=None, eval_batch=8, **mpopt):
    data = ListDataset(example_batch(model, 32))
    evals = ListDataset(example_batch(model, 8, seed=1))
    args = training_args(tmp_path, 8, steps=steps, per_device_eval_batch_size=eval_batch)
    mpopt = dict(dict(micro_batch_sizes=[8, 4, 2, 1], freeze_rates=[0.0], checkpoint_segments=[0], trial_steps=2), **mpopt)
    return MPOptTrainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=evals,
        mpopt_args=MPOptArguments(memory_budget_mib=budget, search_share=None, **mpopt),
        cost_model=FakeCost(),
        clock=StepClock(),
    )


def test_engine_backs_off_and_records_the_decisions(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    oom = FakeOOM(model, train_limit=2)
    trainer = _engine_trainer(tmp_path, model)
    trainer.train()
    train_sizes = [s for s in oom.sizes if s.startswith("train")]
    assert train_sizes[:6] == ["train8!", "train4!", "train2", "train2", "train2", "train2"]
    assert trainer.state.global_step == 4
    assert all(s == "train2" for s in train_sizes[2:]) and len(train_sizes) == 2 + 4 * 4  # 8 samples every step
    decisions = json.load(open(os.path.join(tmp_path, "decisions.json")))
    assert [(d["step"], d["config"]["micro_batch_size"], d["kind"], d["outcome"]) for d in decisions[:3]] == [
        (0, 8, "start", "only_candidate"), (0, 4, "oom", "only_candidate"), (0, 2, "oom", "only_candidate"),
    ]
    assert decisions[1]["reason"].startswith("out of memory with mb8/f0.00/ckpt0/fp32")  # the log says which
    assert decisions[1]["predicted_peak_bytes"] == FakeCost().peak(MemoryConfig(4))
    infeasible = trainer.mpopt_callback.engine.infeasible
    assert set(infeasible) == {MemoryConfig(8), MemoryConfig(4)}
    logged = [e for e in trainer.state.log_history if "mpopt/micro_batch_size" in e]
    assert [e["mpopt/micro_batch_size"] for e in logged[:3]] == [8, 4, 2]


def test_evaluation_oom_does_not_shrink_the_training_config(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    oom = FakeOOM(model, eval_limit=2)
    trainer = _engine_trainer(tmp_path, model, micro_batch_sizes=[8])
    trainer.train()
    assert trainer.memory_config == MemoryConfig(8)
    assert trainer.oom_events == [] and not trainer.mpopt_callback.engine.infeasible
    assert trainer.mpopt_callback.eval_chunk == 2  # the gain metric halved its own batch
    assert "eval8!" in oom.sizes and "train8" in oom.sizes
    metrics = trainer.evaluate()  # Trainer.evaluate splits its batches too
    assert "eval_loss" in metrics and trainer.memory_config == MemoryConfig(8)


def test_budget_no_configuration_over_budget_runs(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    cost = FakeCost()
    # usable 44.65 MiB: mb8 (74) is out; mb8/f0.5/ckpt0 and mb4/f0 (42) fit with the race's two host copies (~1 MiB)
    budget_mib = 47.0
    trainer = _engine_trainer(
        tmp_path, model, steps=6, budget=budget_mib, micro_batch_sizes=[8, 4, 2], freeze_rates=[0.0, 0.5],
        checkpoint_segments=[0, 1],
    )
    ran = []

    from transformers import TrainerCallback

    class RanConfigs(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ran.append(trainer.memory_config)

    trainer.add_callback(RanConfigs())
    trainer.train()
    assert len(ran) == 6 and len(set(ran)) >= 2  # the engine did switch between candidates
    assert all(cost.peak(c) <= budget_mib * MIB for c in ran), [c.short() for c in ran]


def test_budget_below_the_minimum_fails_at_the_first_step(tmp_path):
    model = build_tiny("vit", dropout=0.0)
    trainer = _engine_trainer(tmp_path, model, budget=5.0)
    with pytest.raises(ValueError, match=r"below the minimum feasible peak 18\.0 MiB, reached by mb1/f0\.00/ckpt0/fp32"):
        trainer.train()


def test_oom_marks_reach_the_profile_store_and_the_next_run_skips_them(tmp_path):
    from mpopt_hf.store import SQLiteStore, make_key

    model = build_tiny("vit", num_layers=2, dropout=0.0)
    store = SQLiteStore(tmp_path / "profiles.db")
    key = make_key(model, (3, 16, 16))
    FakeOOM(model, train_limit=2)
    mpopt = MPOptArguments(micro_batch_sizes=[8, 4, 2], freeze_rates=[0.0], checkpoint_segments=[0], trial_steps=1,
                           search_share=None)
    data = ListDataset(example_batch(model, 16))
    trainer = MPOptTrainer(
        model=model, args=training_args(tmp_path / "a", 8, steps=1), train_dataset=data, eval_dataset=data,
        mpopt_args=mpopt, cost_model=FakeCost(), store=store, store_key=key,
    )
    trainer.train()
    assert set(store.infeasible(key)) == {MemoryConfig(8), MemoryConfig(4)}
    fresh = build_tiny("vit", num_layers=2, dropout=0.0)
    second = MPOptTrainer(
        model=fresh, args=training_args(tmp_path / "b", 8, steps=1), train_dataset=data, eval_dataset=data,
        mpopt_args=mpopt, cost_model=FakeCost(), store=store, store_key=key,
    )
    second.train()
    assert second.oom_events == [] and second.memory_config == MemoryConfig(2)
    store.close()


@pytest.mark.parametrize("strategy", ["halving", "fixed", "race"])
def test_the_baselines_run_as_engine_strategies_without_evaluating(tmp_path, strategy):
    """'halving' backs off through the engine (no restart, no step lost) and 'fixed' ends the run at its OOM, neither
    evaluating the gain metric on the 8 evaluation samples, which 'race' does."""
    model = build_tiny("vit", dropout=0.0)
    oom = FakeOOM(model, train_limit=2)
    trainer = _engine_trainer(tmp_path, model, strategy=strategy)
    if strategy == "fixed":
        with pytest.raises(RuntimeError, match="strategy='fixed' cannot leave mb8/f0.00/ckpt0/fp32"):
            trainer.train()
        assert oom.sizes == ["train8!"] and trainer.mpopt_callback.engine.search_seconds == 0.0
        return
    trainer.train()
    assert ("eval8" in oom.sizes) is (strategy == "race")  # the gain metric, at the evaluation batch of 8
    if strategy == "race":
        return
    # the only forwards in eval mode are the coupling check's, on 4 samples whole and in halves (first split step)
    assert oom.sizes == ["train8!", "eval4", "eval2", "eval2", "train4!"] + ["train2"] * 16
    assert trainer.state.global_step == 4
    decisions = trainer.mpopt_callback.engine.decisions
    assert [(d.kind, d.config["micro_batch_size"]) for d in decisions] == [("start", 8), ("oom", 4), ("oom", 2)]
    assert trainer.mpopt_callback.engine.search_seconds == 0.0


def test_halve_until_returns_the_largest_halving_that_fits():
    from mpopt_hf.training.oom import halve_until

    asked = []

    def fits(n):
        asked.append(n)
        return n <= 10

    assert halve_until(fits, 64) == 8 and asked == [64, 32, 16, 8]
    assert halve_until(lambda n: False, 64) == 1  # nothing fits: the smallest is the caller's to refuse
    assert halve_until(lambda n: True, 7) == 7
    with pytest.raises(ValueError, match="n >= 1"):
        halve_until(fits, 0)
