"""Model cards: metadata that huggingface_hub parses back, one table row per task, reproduce --check, and the card a
recipe run writes next to results.json."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData

from mpopt_hf.online import OnlineResult, TaskRecord, summarise
from online_recipe.model_card import build_card, check_card, parse_table, render_table, table_rows
from online_recipe.reproduce import reproduce_main

ROOT = Path(__file__).resolve().parents[1]
MB16 = {"micro_batch_size": 16, "freeze_rate": 0.0, "checkpoint_segments": 0, "precision": "fp32"}
MB8 = {"micro_batch_size": 8, "freeze_rate": 0.5, "checkpoint_segments": 2, "precision": "fp32"}
ENV = {"python": "3.11.0", "torch": "2.5.0", "transformers": "5.0.0", "device": "cpu", "cpu": "Test CPU", "gpu": None,
       "torch_threads": 2, "platform": "Linux-test"}
ARGUMENTS = {"model": {"model": "resnet18", "width_multiplier": 0.25}, "data": {"dataset": "digits"},
             "training": {"per_device_train_batch_size": 64, "max_steps": -1, "num_train_epochs": 2.0,
                          "learning_rate": 1e-3, "seed": 42}}
COMMAND = "python recipes/cnn_retrain.py --task 3"


def _result() -> OnlineResult:
    """Three tasks by hand: one over budget, one never retrained (no configuration), one switching configurations."""
    tasks = [
        TaskRecord("mnist-m", 0.25, 0.5, configs=[MB16], measured_peak_mib=3.2, predicted_peak_mib=3.19,
                   budget_mib=4.0, seconds=1.23),
        TaskRecord("svhn", 0.1, 1 / 3, configs=[], measured_peak_mib=5.0, budget_mib=4.0, seconds=2.0),
        TaskRecord("usps", 0.4, 0.7123, configs=[MB16, MB8], measured_peak_mib=2.5, predicted_peak_mib=2.61,
                   budget_mib=4.0, seconds=0.5),
    ]
    summary = summarise(tasks, "mpopt", 4.0, 3, 3.7)
    summary.update(recipe="recipes/cnn_retrain.py", command=COMMAND, environment=ENV, arguments=ARGUMENTS,
                   run_seconds=12.0, unconstrained_predicted_peak_mib=5.1)
    return OnlineResult(tasks, summary)


def _write_run(tmp_path) -> tuple[Path, Path]:
    """results.json and the card README.md of the hand-made result, as a recipe leaves them."""
    result = _result()
    results = tmp_path / "results.json"
    results.write_text(json.dumps(result.to_dict()))
    card = tmp_path / "README.md"
    card.write_text(str(build_card(result)))
    return results, card


def test_card_metadata_parses_back_with_huggingface_hub():
    result = _result()
    card = ModelCard(str(build_card(result)))  # the text a recipe writes, parsed as the hub parses a README.md
    data = ModelCardData(**card.data.to_dict())  # and the metadata round-trips through its dict (model-index)
    for meta in (card.data, data):
        assert meta.library_name == "transformers" and meta.datasets == ["digits"]
        assert {"mpopt_hf", "online-learning", "domain-shift", "baseline-mpopt"} <= set(meta.tags)
        assert meta.model_name == "cnn_retrain-resnet18-digits-mpopt"
        values = {e.metric_name: e.metric_value for e in meta.eval_results}
        assert values == {"mean accuracy before retraining": result.summary["mean_accuracy_before"],
                          "mean accuracy after retraining": result.summary["mean_accuracy_after"]}
        assert {(e.metric_type, e.dataset_type, e.dataset_name) for e in meta.eval_results} == {
            ("accuracy", "digits", "digits: mnist-m, svhn, usps")}


def test_table_has_one_row_per_task_with_the_records_numbers():
    result = _result()
    text = ModelCard(str(build_card(result))).text
    assert render_table(result.to_dict()["tasks"]) in text  # the card's table is the one the reproduce scripts print
    rows = parse_table(text)
    assert rows == table_rows(result.to_dict()["tasks"]) and [r["task"] for r in rows] == ["mnist-m", "svhn", "usps"]
    assert [(r["accuracy before"], r["accuracy after"]) for r in rows] == [("0.250", "0.500"), ("0.100", "0.333"),
                                                                            ("0.400", "0.712")]
    assert [r["configurations"] for r in rows] == ["mb16/f0.00/ckpt0/fp32", "-",
                                                   "mb16/f0.00/ckpt0/fp32 -> mb8/f0.50/ckpt2/fp32"]
    assert [(r["measured peak MiB"], r["budget MiB"], r["within budget"]) for r in rows] == [
        ("3.20", "4.00", "yes"), ("5.00", "4.00", "no"), ("2.50", "4.00", "yes")]
    assert [r["predicted peak MiB"] for r in rows] == ["3.19", "-", "2.61"]
    assert [r["seconds"] for r in rows] == ["1.2", "2.0", "0.5"]


def test_card_body_says_what_was_run_where_and_its_limits():
    text = ModelCard(str(build_card(_result()))).text
    assert f"```bash\n{COMMAND}\n```" in text
    assert "| model | `resnet18` (width x0.25) |" in text
    assert "| data set, stream | `digits`: mnist-m, svhn, usps" in text
    assert "4.00 MiB (the whole batch with no knob is predicted at 5.10 MiB)" in text and "within budget: no" in text
    assert "| baseline | `mpopt`:" in text and "effective batch 64, 2 epochs per task, learning rate 0.001" in text
    assert "torch 2.5.0" in text and "device `cpu`: CPU Test CPU, 2 torch threads" in text
    assert "## Limitations" in text and "not comparable to published numbers" in text
    assert "reproduce/cnn_retrain_digits.py --from_results results.json --check README.md" in text
    with pytest.raises(ValueError, match="No per-task table found"):
        parse_table("# a card\n\nno table here\n")


def test_check_passes_on_its_own_card_and_names_the_altered_row(tmp_path, capsys):
    results, card = _write_run(tmp_path)
    assert check_card(json.loads(results.read_text()), card) == []
    assert reproduce_main("cnn_online.run", ["--from_results", str(results), "--check", str(card)]) == 0
    assert "agrees with the run" in capsys.readouterr().out
    text = card.read_text()
    card.write_text(text.replace("| 2.0 |", "| 99.9 |"))  # seconds are not compared
    assert reproduce_main("cnn_online.run", ["--from_results", str(results), "--check", str(card)]) == 0
    card.write_text(text.replace("| svhn | 0.100 | 0.333 |", "| svhn | 0.100 | 0.334 |"))
    assert reproduce_main("cnn_online.run", ["--from_results", str(results), "--check", str(card)]) == 1
    out = capsys.readouterr().out
    assert "task 'svhn': accuracy after is 0.334 in the card, 0.333 in the run" in out
    assert "mnist-m'" not in out and "usps'" not in out  # only the altered row is named
    card.write_text(text.replace("| 0.712 | mb16/f0.00/ckpt0/fp32 -> mb8", "| 0.712 | mb8"))
    assert check_card(json.loads(results.read_text()), card) == [
        "task 'usps': configurations is mb8/f0.50/ckpt2/fp32 in the card, mb16/f0.00/ckpt0/fp32 -> "
        "mb8/f0.50/ckpt2/fp32 in the run"]
    card.write_text("\n".join(line for line in text.splitlines() if not line.startswith("| usps |")))
    assert check_card(json.loads(results.read_text()), card) == ["task 'usps': in the run, missing from the card"]


def test_from_results_regenerates_the_card_next_to_the_results(tmp_path, capsys):
    results, card = _write_run(tmp_path)
    expected = card.read_text()
    card.unlink()
    assert reproduce_main("cnn_online.run", ["--from_results", str(results)]) == 0
    assert card.read_text() == expected  # the same card, byte for byte
    out = capsys.readouterr().out
    assert render_table(_result().to_dict()["tasks"]) in out and f"card: {card}" in out
    with pytest.raises(SystemExit):
        reproduce_main("cnn_online.run", ["--from_results", str(results), "--baseline", "none"])  # no recipe flags
    assert "have no effect" in capsys.readouterr().err


def test_reproduce_script_exits_non_zero_naming_the_task(tmp_path):
    results, card = _write_run(tmp_path)
    card.write_text(card.read_text().replace("| mnist-m | 0.250 |", "| mnist-m | 0.260 |"))
    out = subprocess.run([sys.executable, str(ROOT / "reproduce" / "cnn_retrain_digits.py"), "--from_results",
                          str(results), "--check", str(card)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1, out.stderr
    assert "task 'mnist-m': accuracy before is 0.260 in the card, 0.250 in the run" in out.stdout


@pytest.mark.usefixtures("one_torch_thread")
def test_recipe_run_writes_its_card_next_to_results(tmp_path, capsys):
    from test_recipe_cnn_retrain import _tiny

    from cnn_online.run import main

    argv = _tiny(tmp_path, "--task", "1", "--epoch", "1", "--budget_mib", "64")
    results = main(argv)
    out = tmp_path / "out"
    card_path = out / "README.md"
    assert card_path.is_file() and f"card:    {card_path}" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    summary = results["summary"]
    assert summary["command"] == shlex.join(["python", "recipes/cnn_retrain.py", *argv])
    assert summary["environment"]["device"] == "cpu" and summary["arguments"]["training"]["learning_rate"] == 1e-3
    card = ModelCard(card_path.read_text())
    assert [e.metric_value for e in card.data.eval_results] == [summary["mean_accuracy_before"],
                                                                summary["mean_accuracy_after"]]
    assert [r["task"] for r in parse_table(card.text)] == ["mnist-m"] and summary["command"] in card.text
    assert reproduce_main("cnn_online.run", ["--from_results", str(out / "results.json"), "--check",
                                             str(card_path)]) == 0


def _perplexity_result() -> OnlineResult:
    tasks = [TaskRecord("python-docs", metric="perplexity", higher_is_better=False, metric_before=48.25,
                        metric_after=30.5, configs=[MB16], measured_peak_mib=3.0, budget_mib=4.0, seconds=1.0),
             TaskRecord("package-docs", metric="perplexity", higher_is_better=False, metric_before=120.0,
                        metric_after=90.125, configs=[MB8], measured_peak_mib=2.0, budget_mib=4.0, seconds=1.0)]
    summary = summarise(tasks, "fixed", 4.0, 2, 2.0)
    summary.update(recipe="recipes/gpt_neo_lm_online.py", command="python recipes/gpt_neo_lm_online.py",
                   environment=ENV, pipeline_tag="text-generation", limitations="Tiny text model.",
                   source_perplexity=12.5,
                   arguments={"model": {"model": "tiny-gpt-neo"},
                              "data": {"dataset": ["python-code", "python-docs", "package-docs"]}})
    return OnlineResult(tasks, summary)


def test_a_card_names_its_metric_and_direction(tmp_path):
    result = _perplexity_result()
    card = ModelCard(str(build_card(result)))
    assert card.data.pipeline_tag == "text-generation" and card.data.metrics == ["perplexity"]
    assert "text-generation" in card.data.tags and "image-classification" not in card.data.tags
    assert card.data.datasets == ["python-code", "python-docs", "package-docs"]
    assert {(e.metric_type, e.metric_name, e.metric_value) for e in card.data.eval_results} == {
        ("perplexity", "mean perplexity before retraining", 84.125),
        ("perplexity", "mean perplexity after retraining", 60.3125)}
    rows = parse_table(card.text)
    assert list(rows[0])[:3] == ["task", "perplexity before", "perplexity after"]
    assert [(r["perplexity before"], r["perplexity after"]) for r in rows] == [("48.250", "30.500"),
                                                                              ("120.000", "90.125")]
    assert ("Mean perplexity over the stream: 84.125 before retraining, 60.312 after (-23.812; lower is better)."
            in card.text)
    assert "(source perplexity 12.500)" in card.text and "## Limitations\n\nTiny text model." in card.text
    assert "reproduce/gpt_neo_lm_online.py --from_results results.json --check README.md" in card.text
    results = tmp_path / "results.json"
    results.write_text(json.dumps(result.to_dict()))
    path = tmp_path / "README.md"
    path.write_text(str(card))
    assert check_card(json.loads(results.read_text()), path) == []
    path.write_text(str(card).replace("| 120.000 | 90.125 |", "| 120.000 | 90.126 |"))
    assert check_card(json.loads(results.read_text()), path) == [
        "task 'package-docs': perplexity after is 90.126 in the card, 90.125 in the run"]
    with pytest.raises(ValueError, match="No per-task table found"):  # an accuracy table is not a perplexity one
        parse_table(str(build_card(_result())), metric="perplexity")


def test_results_written_before_the_metric_hook_make_the_same_card():
    current = _result().to_dict()
    legacy = json.loads(json.dumps(current))
    for task in legacy["tasks"]:
        for key in ("metric", "higher_is_better", "metric_before", "metric_after"):
            del task[key]
    for key in ("metric", "higher_is_better", "mean_metric_before", "mean_metric_after"):
        del legacy["summary"][key]
    assert str(build_card(legacy)) == str(build_card(current))
    assert table_rows(legacy["tasks"]) == table_rows(current["tasks"])


def test_provenance_travels_with_the_parsed_arguments_not_a_module_global(tmp_path):
    from cnn_online.run import parse

    from online_recipe import Provenance

    first = parse(["--output_dir", str(tmp_path / "a"), "--task", "2"])
    second = parse(["--output_dir", str(tmp_path / "b")])  # a later parse leaves the first run's provenance alone
    assert first.provenance == Provenance("cnn_online.run", ("--output_dir", str(tmp_path / "a"), "--task", "2"))
    assert first.provenance.record() == {
        "recipe": "recipes/cnn_retrain.py",
        "command": shlex.join(["python", "recipes/cnn_retrain.py", "--output_dir", str(tmp_path / "a"), "--task", "2"])}
    assert second.provenance.argv == ("--output_dir", str(tmp_path / "b"))
    model, data, seed, run, mpopt, training = first  # still unpacks as the dataclasses
    assert data.task == 2 and training.output_dir == str(tmp_path / "a")
