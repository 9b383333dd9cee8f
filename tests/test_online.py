"""OnlineRetrainer, the shipped metrics and the report files, on a tiny CLIP and a 2-task digit stream."""

from __future__ import annotations

import json

import pytest
import torch

import clip_online
from clip_online.run import DIGIT_NAMES
from mpopt_hf.config import MemoryConfig
from mpopt_hf.metrics import load_metric, metric_path
from mpopt_hf.online import OnlineRetrainer
from mpopt_hf.report import atomic_write_bytes, format_table, plot_png, write_results
from vision.streams import digits_stream

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _training_args(tmp_path, steps=2, batch=16):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)


@pytest.fixture(scope="module")
def stream():
    return digits_stream(["fog", "contrast"], severity=5, max_samples_per_task=40)


def test_metrics_load_by_path_and_compute():
    assert metric_path("accuracy").endswith("mpopt_hf/metrics/accuracy/accuracy.py")
    assert load_metric("accuracy").compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2])["accuracy"] == 0.75
    mce = load_metric("mce").compute(predictions=[0.2, 0.4, 0.3], references=[0.4, 0.4, 0.3],
                                     corruptions=["fog", "fog", "snow"])
    assert mce["ce"] == pytest.approx({"fog": 0.75, "snow": 1.0}) and mce["mce"] == pytest.approx(0.875)
    with pytest.raises(ValueError, match="corruptions"):
        load_metric("mce").compute(predictions=[0.2], references=[0.4])
    with pytest.raises(ValueError, match="Unknown metric"):
        metric_path("f1")


def test_report_files_are_valid_and_atomic(tmp_path):
    import matplotlib.image

    tasks = [
        {"task": "fog-5", "accuracy_before": 0.4, "accuracy_after": 0.7, "configs": [MemoryConfig(8).to_dict()],
         "measured_peak_mib": 3.0, "predicted_peak_mib": 3.1, "budget_mib": 4.0, "seconds": 1.0},
        {"task": "snow-5", "accuracy_before": 0.5, "accuracy_after": 0.6, "configs": [], "measured_peak_mib": None,
         "predicted_peak_mib": None, "budget_mib": 4.0, "seconds": 0.0},
    ]
    paths = write_results({"tasks": tasks, "summary": {"baseline": "fixed"}}, tmp_path)
    png = open(paths["png"], "rb").read()
    assert png.startswith(PNG_MAGIC)
    image = matplotlib.image.imread(paths["png"])
    assert image.ndim == 3 and image.shape[0] > 100
    assert json.load(open(paths["json"]))["tasks"][0]["task"] == "fog-5"
    assert "mb8/f0.00/ckpt0/fp32" in open(paths["csv"]).read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json", "results.png"]  # no temp left
    assert "fog-5" in format_table(tasks)
    assert plot_png(tasks[1:]).startswith(PNG_MAGIC)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = atomic_write_bytes(tmp_path / "results.json", b"old")
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.parametrize("baseline", ["none", "fixed", "full_checkpointing", "auto_find_batch_size"])
def test_online_retrainer_records_every_task(tmp_path, stream, baseline):
    targets = stream[1:]  # after the clean task
    torch.manual_seed(0)
    model = clip_online.build_classifier(clip_online.TINY, list(DIGIT_NAMES))
    config = MemoryConfig(micro_batch_size=8, freeze_rate=0.25, checkpoint_segments=1)
    retrainer = OnlineRetrainer(model, _training_args(tmp_path), baseline=baseline, memory_config=config,
                                budget_mib=64.0, show_progress=False)
    result = retrainer.run(targets, output_dir=tmp_path / "out")
    data = json.load(open(tmp_path / "out" / "results.json"))
    assert [t["task"] for t in data["tasks"]] == ["fog-5", "contrast-5"]
    assert data["summary"]["complete"] and data["summary"]["tasks_done"] == 2
    for task in data["tasks"]:
        assert 0 <= task["accuracy_before"] <= 1 and 0 <= task["accuracy_after"] <= 1
        expected = {"fixed": config, "full_checkpointing": MemoryConfig(16, checkpoint_segments=4),
                    "auto_find_batch_size": MemoryConfig(16)}.get(baseline)  # the budget fits the whole batch
        if baseline == "none":
            assert task["configs"] == [] and task["accuracy_after"] == task["accuracy_before"]
        else:
            assert [MemoryConfig.from_dict(c) for c in task["configs"]] == [expected]
            assert task["steps"] == 2 and task["measured_peak_source"] == "memtracker+profiler"
            assert 0 < task["measured_peak_mib"] <= 64.0
            assert task["predicted_peak_mib"] == pytest.approx(task["measured_peak_mib"], rel=0.25)
    assert (tmp_path / "out" / "results.png").read_bytes().startswith(PNG_MAGIC)
    assert result.summary["mce"] is None or result.summary["mce"] > 0


def test_baselines_under_a_tight_budget_shrink_as_a_device_of_that_size_would(tmp_path, stream):
    from mpopt_hf.cost import FakeTensorCostModel

    torch.manual_seed(0)
    model = clip_online.build_classifier(clip_online.TINY, list(DIGIT_NAMES))
    train = stream[1].train
    batch = {k: v for k, v in train.with_format("torch")[:16].items()}
    costs = FakeTensorCostModel(model, batch)
    whole, half = costs.peak_mib(MemoryConfig(16)), costs.peak_mib(MemoryConfig(8))
    budget = (whole + half) / 2 / 0.95  # usable (after the 5% margin) lies between the two peaks
    picked = {}
    for baseline in ("auto_find_batch_size", "full_checkpointing"):
        retrainer = OnlineRetrainer(model, _training_args(tmp_path, steps=1), baseline=baseline, budget_mib=budget,
                                    show_progress=False, measure_peak=False)
        record = retrainer.run_task(stream[1])
        picked[baseline] = [MemoryConfig.from_dict(c) for c in record.configs]
    assert picked["auto_find_batch_size"] == [MemoryConfig(8)]  # transformers halves the batch itself
    ckpt = MemoryConfig(16, checkpoint_segments=4)
    expected = ckpt if costs.peak_mib(ckpt) <= budget * 0.95 else ckpt.replace(micro_batch_size=8)
    assert picked["full_checkpointing"] == [expected]


def test_seconds_per_task_stops_each_task_on_time(tmp_path, stream):
    torch.manual_seed(0)
    model = clip_online.build_classifier(clip_online.TINY, list(DIGIT_NAMES))
    retrainer = OnlineRetrainer(model, _training_args(tmp_path, steps=50), baseline="fixed", show_progress=False,
                                measure_peak=False, predict_peak=False, seconds_per_task=1e-9)
    result = retrainer.run(stream[1:])
    assert [t.steps for t in result.tasks] == [1, 1]  # the limit is checked at each step end: one step, not 50
    with pytest.raises(ValueError, match=r"OnlineRetrainer.seconds_per_task must be a finite number of seconds > 0 or None, got 0"):
        OnlineRetrainer(model, _training_args(tmp_path), baseline="fixed", seconds_per_task=0)


def test_a_task_too_short_to_pay_for_a_race_runs_the_least_frozen_candidate(tmp_path, stream):
    from mpopt_hf import MPOptArguments

    torch.manual_seed(0)
    model = clip_online.build_classifier(clip_online.TINY, list(DIGIT_NAMES))
    mpopt = MPOptArguments(memory_budget_mib=64.0, micro_batch_sizes=[16, 8], freeze_rates=[0.5, 0.0],
                           checkpoint_segments=[0], precisions=["fp32"], cost_predictor="fake")
    retrainer = OnlineRetrainer(model, _training_args(tmp_path, steps=3), baseline="mpopt", mpopt_args=mpopt,
                                show_progress=False, measure_peak=False, predict_peak=False, seconds_per_task=0.05)
    retrainer.run(stream[1:])
    decisions = retrainer._callback.engine.decisions
    # one decision per task, each without a race: it would cost over search_share of the task's time
    assert [(d.kind, d.outcome) for d in decisions] == [("start", "no_race_cost"), ("task", "no_race_cost")]
    assert [MemoryConfig.from_dict(d.config) for d in decisions] == [MemoryConfig(16)] * 2
    engine = retrainer._callback.engine
    assert engine.discarded_seconds == 0
    assert engine.search_seconds == engine.last_eval_s  # one evaluation (the first task's); none for a race not run


def test_online_retrainer_rejects_bad_input(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="baseline must be one of"):
        OnlineRetrainer(model, _training_args(tmp_path), baseline="magic")
    with pytest.raises(ValueError, match="needs mpopt_args"):
        OnlineRetrainer(model, _training_args(tmp_path), baseline="mpopt")
    retrainer = OnlineRetrainer(model, _training_args(tmp_path), baseline="none", show_progress=False)
    with pytest.raises(ValueError, match="no tasks"):
        retrainer.run([])


# ---------------------------------------------------------------------------- the metric hook


class _FakeMetric:
    """An evaluate_fn whose values are known: it hands out ``values`` in order and records the data it was given."""

    def __init__(self, values):
        self.values, self.seen = list(values), []

    def __call__(self, model, dataset):
        assert isinstance(model, torch.nn.Module)
        self.seen.append(dataset)
        return self.values.pop(0)


def test_evaluate_fn_scores_every_task_and_the_summary_respects_its_direction(tmp_path, stream):
    import numpy as np

    targets = stream[1:]
    torch.manual_seed(0)
    model = clip_online.build_classifier(clip_online.TINY, list(DIGIT_NAMES))
    # before/after of fog, then of contrast: perplexity falls on both (retraining helped)
    fake = _FakeMetric([40.0, np.float32(20.0), 30, torch.tensor(25.0)])
    retrainer = OnlineRetrainer(model, _training_args(tmp_path, steps=1), baseline="fixed", show_progress=False,
                                measure_peak=False, predict_peak=False, evaluate_fn=fake, metric_name="perplexity",
                                higher_is_better=False)
    result = retrainer.run(targets, output_dir=tmp_path / "out")
    assert [d is t.test for d, t in zip(fake.seen, [targets[0]] * 2 + [targets[1]] * 2)] == [True] * 4
    data = json.load(open(tmp_path / "out" / "results.json"))
    assert [(t["metric"], t["higher_is_better"], t["metric_before"], t["metric_after"]) for t in data["tasks"]] == [
        ("perplexity", False, 40.0, 20.0), ("perplexity", False, 30.0, 25.0)]
    assert all(t["accuracy_before"] is None and t["accuracy_after"] is None for t in data["tasks"])
    assert all(t["steps"] == 1 for t in data["tasks"])  # it retrained; only the scoring changed
    summary = result.summary
    assert (summary["metric"], summary["higher_is_better"]) == ("perplexity", False)
    assert (summary["mean_metric_before"], summary["mean_metric_after"]) == (35.0, 22.5)
    assert summary["mean_gain"] == 12.5  # lower is better: before - after
    assert summary["mean_accuracy_before"] is None and summary["mce"] is None and "perplexity" in summary["mce_reference"]
    table = format_table(data["tasks"])
    assert table.splitlines()[0].split()[:5] == ["task", "perplexity", "before", "perplexity", "after"]
    assert "40.0" in table and "(perplexity: lower is better)" in table and "acc before" not in table
    assert (tmp_path / "out" / "results.png").read_bytes().startswith(PNG_MAGIC)


def test_direction_decides_the_sign_of_the_gain_and_one_stream_has_one_metric():
    from mpopt_hf.online import TaskRecord, summarise

    def records(higher):
        return [TaskRecord("a", metric="loss", higher_is_better=higher, metric_before=2.0, metric_after=1.5),
                TaskRecord("b", metric="loss", higher_is_better=higher, metric_before=3.0, metric_after=2.5)]

    assert summarise(records(False), "fixed", None, 2, 1.0)["mean_gain"] == 0.5
    assert summarise(records(True), "fixed", None, 2, 1.0)["mean_gain"] == -0.5
    mixed = [records(False)[0], TaskRecord("c", 0.5, 0.6)]
    with pytest.raises(ValueError, match=r"share one metric and direction, got \[\('accuracy', True\), \('loss', False\)\]"):
        summarise(mixed, "fixed", None, 2, 1.0)
    with pytest.raises(ValueError, match=r"metric 'loss' keeps its values in metric_before"):
        TaskRecord("d", 0.5, 0.6, metric="loss")


def test_classification_records_are_unchanged_by_the_metric_hook():
    from dataclasses import asdict

    from mpopt_hf.online import TaskRecord, summarise

    old = [TaskRecord("fog-5", 0.25, 0.5, seconds=1.0), TaskRecord("snow-5", 0.4, 0.7)]  # made the old way
    row = asdict(old[0])
    assert (row["accuracy_before"], row["accuracy_after"]) == (0.25, 0.5)
    assert (row["metric"], row["higher_is_better"], row["metric_before"], row["metric_after"]) == ("accuracy", True,
                                                                                                   0.25, 0.5)
    summary = summarise(old, "fixed", None, 2, 1.0)
    assert summary["mean_accuracy_before"] == pytest.approx(0.325) and summary["mean_accuracy_after"] == 0.6
    assert summary["mean_gain"] == pytest.approx(0.275) and summary["mce"] == pytest.approx((0.5 / 0.75 + 0.3 / 0.6) / 2)
    # a results.json row written before the hook (no metric keys) reads as accuracy
    legacy = {"task": "fog-5", "accuracy_before": 0.25, "accuracy_after": 0.5, "configs": [], "seconds": 1.0}
    assert format_table([legacy]) == format_table([asdict(old[0])])
    assert format_table([legacy]).splitlines()[0].startswith("task   acc before  acc after")


def test_evaluate_fn_falls_back_to_val_and_bad_metric_arguments_are_refused_by_name(tmp_path, stream):
    from types import SimpleNamespace

    model = torch.nn.Linear(2, 2)
    task = SimpleNamespace(name="no-test", train=stream[1].train, val=stream[1].val)
    fake = _FakeMetric([7.0])
    record = OnlineRetrainer(model, _training_args(tmp_path), baseline="none", evaluate_fn=fake, metric_name="loss",
                             higher_is_better=False, show_progress=False).run_task(task)
    assert fake.seen == [task.val] and (record.metric_before, record.metric_after) == (7.0, 7.0)
    args = _training_args(tmp_path)
    bad = [
        (dict(evaluate_fn="perplexity"), r"OnlineRetrainer\.evaluate_fn must be a callable .* or None, got str"),
        (dict(evaluate_fn=fake, metric_name=""), r"OnlineRetrainer\.metric_name must be the name of the metric"),
        (dict(evaluate_fn=fake, higher_is_better="no"), r"OnlineRetrainer\.higher_is_better must be True or False"),
        (dict(metric_name="perplexity"), r"OnlineRetrainer\.metric_name 'perplexity' .*without evaluate_fn"),
        (dict(higher_is_better=False), r"higher_is_better False: without evaluate_fn a task is scored by accuracy"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            OnlineRetrainer(model, args, baseline="none", **kwargs)
    for value in (float("nan"), "12", True):
        retrainer = OnlineRetrainer(model, args, baseline="none", evaluate_fn=lambda m, d, v=value: v,
                                    metric_name="loss", show_progress=False)
        with pytest.raises(ValueError, match=r"evaluate_fn returned .* for 'loss' on task 'no-test'; it must return"):
            retrainer.run_task(task)
