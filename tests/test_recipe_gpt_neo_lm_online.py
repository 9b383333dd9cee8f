"""recipes/gpt_neo_lm_online.py end to end: a short run (perplexity per task, the engine's configurations, the card)
and the recipe and reproduce scripts. The units it is built of: tests/test_lm_online.py."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

import pytest

from lm_online.run import main
from mpopt_hf.config import MemoryConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL_TEXT = ["--vocab_size", "300", "--block_size", "32", "--max_chars_per_domain", "6000", "--test_blocks_per_task",
              "8", "--train_blocks_per_task", "16"]


def _tiny(tmp_path, out="out", *extra):
    """A 2-layer GPT-Neo of width 32, 16 training and 8 test blocks of 32 tokens per task, 2 steps per task."""
    return ["--output_dir", str(tmp_path / out), "--cache_dir", str(tmp_path / "cache"), "--num_layers", "2",
            "--hidden_size", "32", "--num_heads", "2", "--window_size", "8", *SMALL_TEXT, "--pretrain_steps", "3",
            "--per_device_train_batch_size", "8", "--max_steps", "2", "--micro_batch_sizes", "8", "4",
            "--freeze_rates", "0", "--checkpoint_segments", "0", "1", "--trial_steps", "1", *extra]


@pytest.mark.usefixtures("one_torch_thread")
def test_short_run_records_perplexity_per_task_and_writes_its_card(tmp_path, capsys):
    from huggingface_hub import ModelCard

    from online_recipe.model_card import parse_table
    from online_recipe.reproduce import reproduce_main

    argv = _tiny(tmp_path)
    results = main(argv)
    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text())
    assert data["tasks"] == json.loads(json.dumps(results["tasks"]))
    assert [t["task"] for t in data["tasks"]] == ["python-docs", "package-docs"]  # python-code was the source
    summary = data["summary"]
    budget = summary["budget_mib"]
    assert summary["complete"] and summary["baseline"] == "mpopt" and summary["unconstrained_predicted_peak_mib"] > budget
    for task in data["tasks"]:
        assert (task["metric"], task["higher_is_better"], task["accuracy_before"]) == ("perplexity", False, None)
        for value in (task["metric_before"], task["metric_after"]):
            assert 1.0 < value < 300.0 and math.isfinite(value)  # a model of the 300-token vocabulary, better than chance
        assert task["steps"] == 2 and task["train_samples"] == 16
        configs = [MemoryConfig.from_dict(c) for c in task["configs"]]  # the engine ran configurations ...
        assert configs and all(c.micro_batch_size in (8, 4) for c in configs)
        assert task["measured_peak_mib"] <= budget  # ... within the budget the whole batch exceeds
    assert (summary["metric"], summary["higher_is_better"]) == ("perplexity", False)
    assert summary["mean_gain"] == pytest.approx(summary["mean_metric_before"] - summary["mean_metric_after"])
    assert summary["source_domain"] == "python-code" and 1.0 < summary["source_perplexity"] < 300.0
    assert summary["command"] == shlex.join(["python", "recipes/gpt_neo_lm_online.py", *argv])
    card = ModelCard((out / "README.md").read_text())
    assert card.data.metrics == ["perplexity"] and card.data.pipeline_tag == "text-generation"
    assert [(e.metric_name, e.metric_value) for e in card.data.eval_results] == [
        ("mean perplexity before retraining", summary["mean_metric_before"]),
        ("mean perplexity after retraining", summary["mean_metric_after"])]
    assert list(parse_table(card.text)[0])[1:3] == ["perplexity before", "perplexity after"]
    assert "lower is better" in card.text and "## Limitations" in card.text and "standard library" in card.text
    printed = capsys.readouterr().out
    assert "perplexity before" in printed and "(lower is better)" in printed and "package-docs" in printed
    assert reproduce_main("lm_online.run", ["--from_results", str(out / "results.json"), "--check",
                                            str(out / "README.md")]) == 0
    # the fixed baseline loads the cached source model and tokenizer: the same perplexities before retraining
    fixed = main(_tiny(tmp_path, "fixed", "--baseline", "fixed", "--measure_peak", "false"))
    assert [t["metric_before"] for t in fixed["tasks"]] == [t["metric_before"] for t in data["tasks"]]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["source", "tokenizer"]


def test_recipe_and_reproduce_scripts_run_their_modules(monkeypatch, capsys):
    import runpy

    for script in ("recipes/gpt_neo_lm_online.py", "reproduce/gpt_neo_lm_online.py"):  # in-process: no second import
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        assert exit_.value.code == 0
    recipe_help, reproduce_help = capsys.readouterr().out.split("usage:")[1:]
    for flag in ("--model", "--dataset", "--random_init", "--block_size", "--baseline", "--memory_budget_mib",
                 "--max_steps", "--output_dir"):
        assert flag in recipe_help
    assert "--from_results" in reproduce_help and "--check" in reproduce_help
