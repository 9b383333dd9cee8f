"""The recipe end to end on a 2-task stream, and its answers to bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clip_online.run import main
from mpopt_hf.config import MemoryConfig

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASK_FIELDS = {"task", "accuracy_before", "accuracy_after", "configs", "measured_peak_mib", "predicted_peak_mib",
               "budget_mib", "seconds", "search_seconds"}


def _small(tmp_path, *extra):
    return ["--model", "tiny", "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--corruptions", "fog",
            "contrast", "--train_per_task", "32", "--test_per_task", "48", "--pretrain_steps", "3",
            "--per_device_train_batch_size", "16", "--max_steps", "3", "--micro_batch_sizes", "16", "8",
            "--freeze_rates", "0", "--checkpoint_segments", "0", "2", "--trial_steps", "1", "--budget_fraction", "0.8",
            "--budget_trace", "none", *extra]


@pytest.mark.parametrize("baseline", ["mpopt", "fixed"])
def test_recipe_end_to_end_on_two_tasks(tmp_path, capsys, baseline):
    import matplotlib.image

    results = main(_small(tmp_path, "--baseline", baseline))
    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text())
    assert data["tasks"] == results["tasks"] and len(data["tasks"]) == 2
    summary = data["summary"]
    assert summary["complete"] and summary["baseline"] == baseline
    budget = summary["budget_mib"]
    assert budget > 0 and summary["unconstrained_predicted_peak_mib"] > budget  # the budget binds
    for task in data["tasks"]:
        assert TASK_FIELDS <= set(task)
        configs = [MemoryConfig.from_dict(c) for c in task["configs"]]
        assert configs and task["budget_mib"] == budget
        assert task["measured_peak_mib"] is not None and task["predicted_peak_mib"] is not None
        if baseline == "mpopt":  # the engine keeps the budget; the fixed whole-batch run is the one that breaks it
            assert task["measured_peak_mib"] <= budget, (task["task"], task["configs"])
    assert summary["within_budget"] is (baseline == "mpopt")
    png = (out / "results.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and matplotlib.image.imread(out / "results.png").shape[0] > 100
    assert (out / "results.csv").read_text().startswith("task,")
    printed = capsys.readouterr().out
    assert "fog-5" in printed and "results.json" in printed and "results.png" in printed


def test_recipe_unsupervised_adaptation_runs_without_labels(tmp_path):
    data = main(_small(tmp_path, "--adaptation", "unsupervised", "--confidence_margin", "1.0"))
    assert data["summary"]["complete"] and data["summary"]["within_budget"] is True
    assert data["summary"]["arguments"]["model"]["adaptation"] == "unsupervised"
    assert all(t["steps"] == 3 and t["configs"] for t in data["tasks"])


def test_recipe_none_baseline_reuses_the_cached_source(tmp_path):
    main(_small(tmp_path, "--baseline", "none"))
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").exists()
    data = main(_small(tmp_path, "--baseline", "none"))
    assert all(t["configs"] == [] and t["accuracy_after"] == t["accuracy_before"] for t in data["tasks"])
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_unknown_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data set 'imagenet-x'.*digits"):
        main(_small(tmp_path, "--dataset", "imagenet-x"))


def test_unknown_baseline_is_refused(tmp_path):
    with pytest.raises(ValueError, match="baseline must be one of"):
        main(_small(tmp_path, "--baseline", "best"))


def test_unknown_model_without_hub_names_it(tmp_path):
    from clip_online import ModelNotAvailableError

    with pytest.raises(ModelNotAvailableError, match=r"'no-such-org/clip'(.|\n)*huggingface-cli download"):
        main(_small(tmp_path, "--model", "no-such-org/clip", "--pretrain_steps", "0"))


def test_data_folder_in_the_wrong_layout(tmp_path):
    from vision.errors import DataLayoutError

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "fog.png").write_bytes(b"")
    with pytest.raises(DataLayoutError, match=r"(?s)cifar10-c.*labels\.npy.*looked in"):
        main(_small(tmp_path, "--dataset", "cifar10-c", "--data_dir", str(tmp_path / "data"), "--pretrain_steps", "0"))


def test_recipe_script_help_runs():
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "clip_cls_online.py"), "--help"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and "--baseline" in out.stdout and "--memory_budget_mib" in out.stdout


def test_the_cached_source_model_does_not_depend_on_the_retraining_batch(tmp_path):
    import torch

    from clip_online.run import load_stream, parse, source_model

    def source(*extra):
        model_args, data_args, _, _, training_args = parse(_small(tmp_path, *extra))
        names, clean, _ = load_stream(data_args)
        return source_model(model_args, names, clean, training_args).state_dict()

    first = source("--per_device_train_batch_size", "16")
    second = source("--per_device_train_batch_size", "32")  # another retraining batch: the same deployed model
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert all(torch.equal(first[k], second[k]) for k in first)
    source("--pretrain_batch_size", "8")  # another past: another cached model
    assert len(list((tmp_path / "cache").iterdir())) == 2
    with pytest.raises(ValueError, match="pretrain_batch_size must be >= 1"):
        parse(_small(tmp_path, "--pretrain_batch_size", "0"))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_budget_trace_is_followed_step_by_step(tmp_path):
    """The main job's co-located process, small: from half the stream on, 80 % of the budget. The engine switches
    at that step boundary (a budget decision), every measured step stays inside the budget that held at it, and the
    timeline (one row per stream step) and its plot are written."""
    argv = _small(tmp_path, "--max_steps", "4")
    argv[argv.index("--budget_trace") + 1] = "0:1,0.5:0.8"
    data = main(argv)
    summary, tasks, timeline = data["summary"], data["tasks"], data["timeline"]
    budget = summary["budget_mib"]
    assert [r["stream_step"] for r in timeline] == list(range(1, 9))
    assert [r["budget_mib"] for r in timeline] == pytest.approx([budget] * 4 + [0.8 * budget] * 4)
    kinds = [d["kind"] for t in tasks for d in t["decisions"]]
    assert "budget" in kinds
    budget_decision = next(d for t in tasks for d in t["decisions"] if d["kind"] == "budget")
    assert budget_decision["budget_mib"] == pytest.approx(0.8 * budget)
    after = [r for r in timeline if r["stream_step"] > 4]
    assert all(r["predicted_peak_mib"] <= 0.8 * budget for r in after)  # re-planned before the first lower step
    assert summary["steps_over_budget"] == [] and summary["within_budget"] is True
    assert tasks[1]["budget_min_mib"] == pytest.approx(0.8 * budget)
    assert (tmp_path / "out" / "timeline.png").read_bytes().startswith(PNG_MAGIC)
