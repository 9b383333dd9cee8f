"""recipes/sam_seg_online.py end to end: the recipe on a 32 px SAM (every task scored by mIoU, the card), the cached
source reused, a model not on disk, and the script's --help. The units it is built of: tests/test_sam_online.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpopt_hf import MemoryConfig
from sam_online.run import main

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- the recipe


def _small(tmp_path, *extra):
    """A 32 px SAM, 2 pre-training steps, 2 tasks of 16 training and 8 test samples, 2 steps each."""
    return ["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--image_size", "32",
            "--corruptions", "fog", "contrast", "--train_per_task", "16", "--test_per_task", "8", "--source_size", "16",
            "--pretrain_steps", "2", "--per_device_train_batch_size", "8", "--max_steps", "2",
            "--micro_batch_sizes", "8", "4", "--freeze_rates", "0", "0.5", "--checkpoint_segments", "0",
            "--trial_steps", "1", "--budget_fraction", "0.9", *extra]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("baseline", ["mpopt", "fixed"])
def test_recipe_end_to_end_scores_every_task_by_miou(tmp_path, capsys, baseline):
    results = main(_small(tmp_path, "--baseline", baseline))
    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text())
    assert data["tasks"] == results["tasks"] and [t["task"] for t in data["tasks"]] == ["fog-5", "contrast-5"]
    summary = data["summary"]
    assert summary["complete"] and summary["baseline"] == baseline and summary["unconstrained_predicted_peak_mib"] > \
        summary["budget_mib"]  # the budget binds
    for task in data["tasks"]:
        assert task["metric"] == "mIoU" and task["higher_is_better"] is True
        assert 0.0 <= task["metric_before"] <= 1.0 and 0.0 <= task["metric_after"] <= 1.0 and task["steps"] == 2
        assert [MemoryConfig.from_dict(c) for c in task["configs"]]
    assert summary["within_budget"] is (baseline == "mpopt")  # the whole batch with no knob breaks it
    assert 0.0 <= summary["source_miou"] <= 1.0
    card = (out / "README.md").read_text()
    assert "mask-generation" in card and "| mIoU before | mIoU after |" in card
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "contrast-5" in printed and "results.json" in printed


@pytest.mark.usefixtures("one_torch_thread")
def test_the_none_baseline_reuses_the_cached_source(tmp_path):
    main(_small(tmp_path, "--baseline", "none"))
    data = main(_small(tmp_path, "--baseline", "none"))
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert all(t["configs"] == [] and t["metric_after"] == t["metric_before"] for t in data["tasks"])


def test_a_model_not_on_disk_says_how_to_get_it(tmp_path):
    from sam_online import ModelNotAvailableError

    with pytest.raises(ModelNotAvailableError, match=r"'no-such-org/sam'(.|\n)*huggingface-cli download"):
        main(["--output_dir", str(tmp_path / "out"), "--model", "no-such-org/sam"])


def test_recipe_script_help_runs():
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "sam_seg_online.py"), "--help"], capture_output=True,
                         check=False, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--random_init", "--data_dir", "--corruptions", "--baseline", "--memory_budget_mib"):
        assert flag in out.stdout
