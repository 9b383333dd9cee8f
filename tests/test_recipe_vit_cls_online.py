"""recipes/vit_cls_online.py end to end: a 2-layer ViT on a 2-task stream (records, card, its reproduce check), the
cached source reused, and the script's --help. The units it is built of: tests/test_vit_online.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpopt_hf.config import MemoryConfig
from vit_online.run import main

ROOT = Path(__file__).resolve().parents[1]
TWO_LAYERS = "num_hidden_layers=2,hidden_size=32,intermediate_size=64,num_attention_heads=2"


def _small(tmp_path, *extra):
    """A 2-layer, 32-wide ViT on 16x16 images (16 patches), 3 pre-training steps, 32 training images, 3 steps a task."""
    return ["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--config_overrides",
            TWO_LAYERS, "--image_size", "16", "--corruptions", "fog", "contrast", "--train_per_task", "32",
            "--test_per_task", "24", "--pretrain_steps", "3", "--per_device_train_batch_size", "16", "--max_steps",
            "3", "--micro_batch_sizes", "16", "8", "--freeze_rates", "0", "--checkpoint_segments", "0", "2",
            "--trial_steps", "1", "--budget_fraction", "0.8", *extra]


def _reproduce_script():
    spec = importlib.util.spec_from_file_location("reproduce_vit", ROOT / "reproduce" / "vit_cls_online.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("one_torch_thread")
def test_short_run_records_every_task_and_writes_its_card(tmp_path, capsys):
    results = main(_small(tmp_path))
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    tasks, summary = results["tasks"], results["summary"]
    assert [t["task"] for t in tasks] == ["fog-5", "contrast-5"]  # one record per task, in stream order
    budget = summary["budget_mib"]
    assert budget > 0 and summary["unconstrained_predicted_peak_mib"] > budget  # the budget binds
    for task in tasks:
        assert 0.0 <= task["accuracy_before"] <= 1.0 and 0.0 <= task["accuracy_after"] <= 1.0
        assert task["steps"] == 3 and task["budget_mib"] == budget
        configs = [MemoryConfig.from_dict(c) for c in task["configs"]]
        assert configs and all(c.micro_batch_size in (16, 8) for c in configs)  # the engine ran its own space
        assert task["measured_peak_mib"] <= budget, (task["task"], task["configs"])
    assert summary["complete"] and summary["baseline"] == "mpopt" and summary["within_budget"] is True
    assert 0.0 <= summary["source_accuracy"] <= 1.0 and summary["random_weights"] is False
    assert summary["arguments"]["model"]["config_overrides"] == TWO_LAYERS
    printed = capsys.readouterr().out
    assert "2 layers x 32 wide, 16 px input in 16 patches of 4" in printed and "contrast-5" in printed
    card = (out / "README.md").read_text()
    assert "fog-5" in card and "tiny" in card and "0.3 M-parameter ViT" in card  # the recipe's own limitations
    check = ["--from_results", str(out / "results.json"), "--check", str(out / "README.md")]
    assert _reproduce_script().main(check) == 0  # the card's table is the one its results render


@pytest.mark.usefixtures("one_torch_thread")
def test_none_baseline_reuses_the_cached_source(tmp_path):
    first = main(_small(tmp_path, "--baseline", "none"))
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = main(_small(tmp_path, "--baseline", "none"))
    assert len(list((tmp_path / "cache").iterdir())) == 1  # loaded, not pre-trained again
    assert [t["accuracy_before"] for t in again["tasks"]] == [t["accuracy_before"] for t in first["tasks"]]
    assert all(t["configs"] == [] and t["accuracy_after"] == t["accuracy_before"] for t in again["tasks"])


def test_recipe_script_help_runs():
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "vit_cls_online.py"), "--help"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--random_init", "--config_overrides", "--dataset", "--corruptions", "--baseline",
                 "--memory_budget_mib", "--max_steps", "--output_dir"):
        assert flag in out.stdout
