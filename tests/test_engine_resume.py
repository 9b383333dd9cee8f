"""A run SIGKILLed after a checkpoint and resumed continues the same decisions and ends with the same weights."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import TrainerCallback
from transformers.trainer_callback import TrainerState

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from dist_resume_run import SAVE_EVERY, STEPS, make_trainer  # noqa: E402
from mpopt_hf.callback import (  # noqa: E402
    SNAPSHOT_FILE,
    STATE_FILE,
    EngineStateError,
    EngineStateWarning,
)
from mpopt_hf.callback.engine_state import atomic_write  # noqa: E402


def _engine_entry(checkpoint):
    return json.load(open(os.path.join(checkpoint, "trainer_state.json")))["stateful_callbacks"]["MPOptCallback"]


def _decisions(path):
    return [{k: v for k, v in d.items() if k != "wall_time"} for d in json.load(open(os.path.join(path, "decisions.json")))]


def _run(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    return subprocess.run([sys.executable, os.path.join(HERE, "dist_resume_run.py"), *argv], env=env, timeout=240,
                          capture_output=True, text=True)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
    reference = make_trainer(ref_dir)
    reference.train()
    ref_weights = {k: v.clone() for k, v in reference.model.state_dict().items()}

    killed = _run(cut_dir, "--kill-at-step", str(SAVE_EVERY + 2))
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoint = os.path.join(cut_dir, f"checkpoint-{SAVE_EVERY}")
    # the engine's state is part of Trainer's own state file; no separate JSON file any more
    entry = _engine_entry(checkpoint)
    assert entry["engine"]["decisions"] and not os.path.exists(os.path.join(checkpoint, STATE_FILE))
    # saved mid-race: the race's start and best-trial copies are part of the checkpoint, named by the entry
    saved = torch.load(os.path.join(checkpoint, SNAPSHOT_FILE), weights_only=True)
    assert saved["id"] == entry["snapshot"]["id"] and set(saved["copies"]) == {"start", "best"}
    assert not os.path.exists(os.path.join(cut_dir, "decisions.json"))

    resumed = _run(cut_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = torch.load(os.path.join(cut_dir, "final.pt"))
    assert got.keys() == ref_weights.keys()
    assert max((got[k].float() - ref_weights[k].float()).abs().max().item() for k in got) < 1e-6
    ref_decisions, cut_decisions = _decisions(ref_dir), _decisions(cut_dir)
    assert cut_decisions == ref_decisions
    assert any(d["step"] > SAVE_EVERY for d in ref_decisions)  # decisions were made after the resume point
    assert len({json.dumps(d["config"]) for d in ref_decisions}) >= 2
    assert STEPS == 8


def test_resume_restores_hf_weights_saved_under_legacy_names(tmp_path):
    """transformers 5.23 saves ViT under legacy key names; Trainer's resume alone would keep random blocks."""
    from mpopt_hf import MemoryConfig, MPOptTrainer
    from mpopt_hf.testing.tiny_models import build_tiny, example_batch
    from trainer_utils import ListDataset, training_args

    model = build_tiny("vit", num_layers=2, dropout=0.0)
    data = ListDataset(example_batch(model, 8))
    args = training_args(tmp_path, 8, steps=1, save_strategy="steps", save_steps=1)
    MPOptTrainer(model=model, args=args, train_dataset=data, memory_config=MemoryConfig(4)).train()
    fresh = build_tiny("vit", num_layers=2, seed=1, dropout=0.0)
    resumed = MPOptTrainer(model=fresh, args=args, train_dataset=data, memory_config=MemoryConfig(4))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    trained = model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())


# ---------------------------------------------------------------------------- engine state that cannot vanish

CHECKPOINT = f"checkpoint-{SAVE_EVERY}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its final weights, its decisions, and its checkpoint saved mid-race."""
    out = str(tmp_path_factory.mktemp("reference"))
    trainer = make_trainer(out)
    trainer.train()
    return {"dir": out, "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "decisions": _decisions(out)}


def _copy_checkpoint(reference, tmp_path):
    """A fresh output folder holding only the reference's mid-race checkpoint (what a run killed after it leaves)."""
    out = str(tmp_path / "run")
    shutil.copytree(os.path.join(reference["dir"], CHECKPOINT), os.path.join(out, CHECKPOINT))
    return out, os.path.join(out, CHECKPOINT)


def _write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def _strip_engine_entry(checkpoint):
    """A checkpoint saved without the engine's state (a run without it, or the old layout killed before on_save)."""
    path = os.path.join(checkpoint, "trainer_state.json")
    with open(path) as f:
        state = json.load(f)
    entry = state["stateful_callbacks"].pop("MPOptCallback")
    _write_json(path, state)
    return entry


def _truncate(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _resume(out, strict=False):
    trainer = make_trainer(out)
    trainer.mpopt_callback.mpopt_args.strict_resume = strict
    trainer.train(resume_from_checkpoint=True)
    return trainer


def _assert_matches(trainer, out, reference):
    got = trainer.model.state_dict()
    assert max((got[k].float() - v.float()).abs().max().item() for k, v in reference["weights"].items()) < 1e-6
    assert _decisions(out) == reference["decisions"]


def test_engine_state_is_saved_with_trainers_own_state(reference, tmp_path, monkeypatch):
    """Killed after Trainer's save but before the callbacks' on_save: the checkpoint already holds the whole engine
    state (it is in trainer_state.json, and the race snapshot is written before it), so the resume is exact."""
    out = str(tmp_path / "run")
    snapshot_first = []
    save_to_json = TrainerState.save_to_json

    def spy(self, json_path):
        snapshot_first.append(os.path.isfile(os.path.join(os.path.dirname(json_path), SNAPSHOT_FILE)))
        save_to_json(self, json_path)

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt  # dies before MPOptCallback.on_save runs

    trainer = make_trainer(out)
    handler = trainer.callback_handler
    handler.callbacks.insert(handler.callbacks.index(trainer.mpopt_callback), Crash())
    monkeypatch.setattr(TrainerState, "save_to_json", spy)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.undo()
    assert snapshot_first == [True]  # the race's copies were on disk before Trainer's state named them
    assert sorted(os.listdir(out)) == [CHECKPOINT]
    assert not [f for f in os.listdir(os.path.join(out, CHECKPOINT)) if f.endswith(".tmp")]

    loads = []
    torch_load = torch.load

    def load_spy(f, *args, **kwargs):
        if str(f).endswith(SNAPSHOT_FILE):
            loads.append(kwargs.get("weights_only"))
        return torch_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load_spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineStateWarning)
        resumed = _resume(out)
    assert loads == [True]  # the snapshot is read with weights_only=True
    _assert_matches(resumed, out, reference)


def test_checkpoint_without_engine_state_warns_and_restarts_the_search(reference, tmp_path):
    out, checkpoint = _copy_checkpoint(reference, tmp_path)
    _strip_engine_entry(checkpoint)
    with pytest.warns(EngineStateWarning, match=re.escape(checkpoint) + r".*search restarts from scratch"):
        _resume(out)
    decisions = _decisions(out)
    assert decisions and min(d["step"] for d in decisions) == SAVE_EVERY  # a new search, from the resume point


def test_strict_resume_refuses_a_checkpoint_without_engine_state(reference, tmp_path):
    out, checkpoint = _copy_checkpoint(reference, tmp_path)
    _strip_engine_entry(checkpoint)
    with pytest.raises(EngineStateError, match=re.escape(checkpoint) + r".*strict_resume=True"):
        _resume(out, strict=True)
    assert not os.path.exists(os.path.join(out, "decisions.json"))


def _damage_snapshot(checkpoint, damage):
    path = os.path.join(checkpoint, SNAPSHOT_FILE)
    if damage == "missing":
        os.remove(path)
    else:  # the copies of another save
        torch.save({**torch.load(path, weights_only=True), "id": "another save"}, path)
    return path


@pytest.mark.parametrize("damage", ["missing", "stale"])
def test_a_missing_or_stale_race_snapshot_is_never_used(reference, tmp_path, damage):
    out, checkpoint = _copy_checkpoint(reference, tmp_path / "lenient")
    path = _damage_snapshot(checkpoint, damage)
    with pytest.warns(EngineStateWarning, match=re.escape(path)):
        _resume(out)
    assert _decisions(out)[0]["step"] == SAVE_EVERY  # restarted, not resumed with the wrong copies
    out, checkpoint = _copy_checkpoint(reference, tmp_path / "strict")
    path = _damage_snapshot(checkpoint, damage)
    with pytest.raises(EngineStateError, match=re.escape(path)):
        _resume(out, strict=True)


@pytest.mark.parametrize("name", ["trainer_state.json", SNAPSHOT_FILE, STATE_FILE])
def test_a_truncated_state_file_is_named_in_the_error(reference, tmp_path, name):
    out, checkpoint = _copy_checkpoint(reference, tmp_path)
    path = os.path.join(checkpoint, name)
    if name == STATE_FILE:  # the layout before the state moved into trainer_state.json
        entry = _strip_engine_entry(checkpoint)
        _write_json(path, entry)
    _truncate(path)
    with pytest.raises(EngineStateError, match=re.escape(path) + r" is truncated or corrupt.*earlier checkpoint"):
        _resume(out)


def test_a_checkpoint_whose_save_was_cut_before_trainer_state_is_named(reference, tmp_path):
    out, checkpoint = _copy_checkpoint(reference, tmp_path)
    path = os.path.join(checkpoint, "trainer_state.json")
    os.remove(path)
    with pytest.raises(EngineStateError, match=re.escape(path) + r" is missing.*earlier checkpoint"):
        _resume(out)


def test_a_checkpoint_in_the_old_layout_still_resumes(reference, tmp_path):
    out, checkpoint = _copy_checkpoint(reference, tmp_path)
    entry = _strip_engine_entry(checkpoint)
    _write_json(os.path.join(checkpoint, STATE_FILE),
                {k: entry[k] for k in ("engine", "metric", "eval_chunk", "needs_baseline")})
    path = os.path.join(checkpoint, SNAPSHOT_FILE)
    torch.save(torch.load(path, weights_only=True)["copies"], path)  # the copies alone, as they were saved
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineStateWarning)
        resumed = _resume(out)
    _assert_matches(resumed, out, reference)


def test_atomic_write_never_leaves_a_truncated_file(tmp_path):
    path = str(tmp_path / SNAPSHOT_FILE)
    atomic_write(path, lambda f: torch.save({"v": torch.ones(3)}, f))

    def dies_half_way(f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies_half_way)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))
    assert os.listdir(tmp_path) == [SNAPSHOT_FILE]


def test_trainer_rebuilding_the_callback_from_its_state_is_refused(tmp_path):
    from mpopt_hf import MPOptArguments, MPOptTrainer
    from mpopt_hf.testing.tiny_models import build_tiny, example_batch
    from trainer_utils import ListDataset, training_args

    model = build_tiny("vit", num_layers=2, dropout=0.0)
    args = training_args(tmp_path, 8, restore_callback_states_from_checkpoint=True)
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        MPOptTrainer(model=model, args=args, train_dataset=ListDataset(example_batch(model, 8)),
                     mpopt_args=MPOptArguments())


def test_a_plain_trainer_saves_and_restores_the_engine_state(tmp_path, monkeypatch):
    """MPOptCallback on a plain Trainer: the same layout (state in trainer_state.json, the snapshot before it)."""
    from transformers import Trainer

    import small_cnn
    from dist_fakes import FakeCost, StepClock
    from mpopt_hf import MPOptArguments, MPOptCallback
    from mpopt_hf.testing.tiny_models import example_batch
    from trainer_utils import ListDataset, training_args

    def run(out, resume):
        torch.manual_seed(0)
        model = small_cnn.build("resnet18", **small_cnn.tiny_overrides("resnet18"))
        mpopt = MPOptArguments(freeze_rates=[0.0, 0.5], checkpoint_segments=[0], trial_steps=3, search_share=None,
                               strict_resume=True)
        callback = MPOptCallback(mpopt, cost_model=FakeCost(), clock=StepClock(),
                                 eval_dataset=ListDataset(example_batch(model, 8, seed=1)))
        args = training_args(out, 8, steps=STEPS, save_strategy="steps", save_steps=SAVE_EVERY, learning_rate=5e-2)
        trainer = Trainer(model=model, args=args, train_dataset=ListDataset(example_batch(model, 40)),
                          callbacks=[callback])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="MPOptCallback on a plain Trainer")
            trainer.train(resume_from_checkpoint=True if resume else None)
        return trainer

    snapshot_first = []
    save_to_json = TrainerState.save_to_json

    def spy(self, json_path):
        snapshot_first.append(os.path.isfile(os.path.join(os.path.dirname(json_path), SNAPSHOT_FILE)))
        save_to_json(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", spy)
    reference = run(str(tmp_path / "ref"), resume=False)
    monkeypatch.undo()
    assert snapshot_first[0]  # mid-race at the first save: its copies were written before trainer_state.json
    out = str(tmp_path / "cut")
    shutil.copytree(os.path.join(tmp_path, "ref", CHECKPOINT), os.path.join(out, CHECKPOINT))
    resumed = run(out, resume=True)  # strict_resume: any missing piece would raise
    got, want = resumed.model.state_dict(), reference.model.state_dict()
    assert max((got[k].float() - want[k].float()).abs().max().item() for k in want) < 1e-6
    assert _decisions(out) == _decisions(str(tmp_path / "ref"))
