"""A run SIGKILLed after a checkpoint and resumed continues the same decisions and ends with the same weights."""

import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from dist_resume_run import SAVE_EVERY, STEPS, make_trainer  # noqa: E402


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
    assert os.path.isfile(os.path.join(cut_dir, f"checkpoint-{SAVE_EVERY}", "mpopt_engine.json"))
    # saved mid-race: the race's start and best-trial copies are part of the checkpoint
    assert os.path.isfile(os.path.join(cut_dir, f"checkpoint-{SAVE_EVERY}", "mpopt_race_snapshots.pt"))
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
    from mpopt_hf.tiny_models import build_tiny, example_batch
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
