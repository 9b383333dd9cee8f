"""recipes/cnn_retrain.py: a short run end to end, the seed's flags mapped onto TrainingArguments /
MPOptArguments, and bad flags refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnn_online.data import DataArguments, load_stream
from cnn_online.run import main, parse
from mpopt_hf.config import MemoryConfig

ROOT = Path(__file__).resolve().parents[1]


def _tiny(tmp_path, *extra):
    """A narrow resnet18 on 8x8 images, 2 pre-training steps, 32 training images and 1 epoch (2 steps) per task."""
    return ["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--width_multiplier",
            "0.125", "--image_size", "8", "--pretrain_steps", "2", "--train_per_task", "32", "--test_per_task", "24",
            "--per_device_train_batch_size", "16", "--micro_batch_sizes", "16", "8", "--freeze_rates", "0",
            "--checkpoint_segments", "0", "2", "--trial_steps", "1", *extra]


@pytest.fixture
def no_data_dir_env(monkeypatch):
    monkeypatch.delenv("MPOPT_DATA_DIR", raising=False)


@pytest.mark.usefixtures("one_torch_thread")
def test_short_run_records_every_task(tmp_path, capsys):
    results = main(_tiny(tmp_path, "--task", "2", "--epoch", "1", "--budget_mib", "64"))
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["tasks"] == results["tasks"]
    assert [t["task"] for t in data["tasks"]] == ["mnist-m", "svhn"]  # one record per task, in stream order
    for task in data["tasks"]:
        assert 0.0 <= task["accuracy_before"] <= 1.0 and 0.0 <= task["accuracy_after"] <= 1.0
        assert task["steps"] == 2 and task["budget_mib"] == 64.0
        assert [MemoryConfig.from_dict(c) for c in task["configs"]]  # the engine ran at least one configuration
    summary = data["summary"]
    assert summary["complete"] and summary["baseline"] == "mpopt" and summary["tasks_planned"] == 2
    assert 0.0 <= summary["source_accuracy"] <= 1.0
    assert summary["arguments"]["seed"]["hyperparameters"] == "auto"
    assert (tmp_path / "out" / "results.png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "acc before" in printed and "acc after" in printed and "configs" in printed and "svhn" in printed


@pytest.mark.usefixtures("one_torch_thread")
def test_fixed_hyperparameters_run_that_configuration(tmp_path):
    data = main(_tiny(tmp_path, "--task", "1", "--epoch", "1", "--hyperparameters", "mb8/f0.5/ckpt2/fp32"))
    assert data["summary"]["baseline"] == "fixed"
    assert data["tasks"][0]["configs"] == [MemoryConfig.parse("mb8/f0.5/ckpt2/fp32").to_dict()]


def test_seed_flags_land_on_training_and_mpopt_arguments(tmp_path):
    model, data, seed, run, mpopt, training = parse(_tiny(tmp_path, "--epoch", "3", "--lr", "0.02", "--budget_mib",
                                                          "100", "--task", "5", "--seed", "7"))
    assert training.num_train_epochs == 3 and training.max_steps == -1  # epochs count, no step cap
    assert training.learning_rate == 0.02 and training.seed == 7
    assert mpopt.memory_budget_mib == 100
    assert data.task == 5 and run.baseline == "mpopt" and run.fixed_config is None
    assert training.output_dir == str(tmp_path / "out")
    _, _, _, run, _, _ = parse(_tiny(tmp_path, "--hyperparameters", "mb16/f0.5/ckpt2/fp32"))
    assert (run.baseline, run.fixed_config) == ("fixed", "mb16/f0.50/ckpt2/fp32")
    model, data, seed, run, mpopt, training = parse(["--output_dir", str(tmp_path)])  # the offline default
    assert (model.model, data.dataset, data.image_size, seed.hyperparameters) == ("resnet18", "digits", 16, "auto")
    assert training.num_train_epochs == 2 and training.learning_rate == 1e-3 and mpopt.memory_budget_mib is None
    assert model.width_for(data.dataset) == 0.25 and [d for d, _ in data.plan()] == ["mnist-m", "svhn", "usps"]


def test_seed_flags_from_a_json_file(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "epoch": 4, "lr": 0.5, "hyperparameters": "mb8"}))
    _, _, _, run, _, training = parse([str(path)])
    assert training.num_train_epochs == 4 and training.learning_rate == 0.5 and run.fixed_config == "mb8/f0.00/ckpt0/fp32"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "lr": 0.5, "learning_rate": 0.1}))
    with pytest.raises(ValueError, match=r"--lr and --learning_rate both set TrainingArguments\.learning_rate"):
        parse([str(path)])


@pytest.mark.usefixtures("no_data_dir_env")
@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--model", "vgg16"], r"ModelArguments\.model \(--model\) must be one of \['resnet18', .*'mobilevit_xxs'\], "
                               r"got 'vgg16'"),
        (["--hyperparameters", "batch16"], r"--hyperparameters\) must be 'auto' or a memory configuration: .*'batch16'"),
        (["--hyperparameters", "mb16/f1.5"], r"--hyperparameters.*freeze_rate must be in \[0, 1\], got 1\.5"),
        (["--dataset", "cifar10-c"], r"--dataset cifar10-c needs --data_dir DIR.*CIFAR-10-C"),
        (["--dataset", "office31"], r"--dataset office31 needs --data_dir DIR.*amazon"),
        (["--dataset", "mnist"], r"DataArguments\.dataset \(--dataset\) must be one of \['digits', 'cifar10-c', "
                                 r"'office31'\], got 'mnist'"),
        (["--dataset", "cifar10-c", "--data_dir", "/nonexistent"], r"--data_dir\) '/nonexistent' is not a folder"),
        (["--data_dir", "/tmp"], r"data_dir '/tmp' is given but the data set 'digits' is built in"),
        (["--task", "0"], r"DataArguments\.task \(--task\) must be an int >= 1 or None, got 0"),
        (["--epoch", "0"], r"SeedArguments\.epoch \(--epoch\) must be a finite number > 0 or None, got 0"),
        (["--lr", "nan"], r"SeedArguments\.lr \(--lr\) must be a finite number > 0"),
        (["--model", "resnext29", "--width_multiplier", "0.5"], r"resnext29 has no width multiplier"),
        (["--lr", "0.1", "--learning_rate", "0.2"], r"--lr and --learning_rate both set TrainingArguments"),
        (["--epoch", "1", "--num_train_epochs", "2"], r"--epoch and --num_train_epochs both set"),
        (["--budget_mib", "9", "--memory_budget_mib", "8"], r"--budget_mib and --memory_budget_mib both set "
                                                           r"MPOptArguments\.memory_budget_mib"),
        (["--epoch", "1", "--max_steps", "3"], r"--epoch 1 and --max_steps both bound"),
        (["--hyperparameters", "mb8", "--baseline", "auto_find_batch_size"],
         r"--hyperparameters mb8 fixes the memory configuration, but --baseline auto_find_batch_size"),
        (["--hyperparameters", "mb8", "--baseline", "fixed", "--fixed_config", "mb4"], r"both fix the configuration"),
        (["--hyperparameters", "mb128"], r"micro-batch 128 exceeds the effective batch --per_device_train_batch_size 64"),
        (["--image_size", "16", "--dataset", "cifar10-c", "--data_dir", "/tmp"], r"cifar10-c images are 32x32"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(tmp_path, flags, match):
    with pytest.raises(ValueError, match=match):
        parse(["--output_dir", str(tmp_path), *flags])


def test_stream_cycles_through_the_domains_with_fresh_renderings():
    data = DataArguments(task=4, image_size=8, train_per_task=8, test_per_task=8)
    assert data.plan() == [("mnist-m", 0), ("svhn", 0), ("usps", 0), ("mnist-m", 1)]
    classes, source, targets = load_stream(data, with_source=False)
    assert classes == [str(d) for d in range(10)] and source is None
    assert [t.name for t in targets] == ["mnist-m", "svhn", "usps", "mnist-m#2"]
    first, again = targets[0].test[:], targets[3].test[:]
    assert first["labels"].tolist() == again["labels"].tolist()  # the same digits ...
    assert not first["pixel_values"].equal(again["pixel_values"])  # ... on new photo patches
    assert all(t.sizes == {"train": 8, "val": 8, "test": 8} for t in targets)


def test_cifar10c_and_office31_streams_from_their_folders(tmp_path):
    from test_vision_loaders import _write_image_folder, write_cifar10c

    from vision.sources.office31 import OFFICE31_CLASSES

    from vision.errors import DataLayoutError

    write_cifar10c(tmp_path, corruptions=("gaussian_noise", "shot_noise"))
    cifar = dict(dataset="cifar10-c", data_dir=str(tmp_path), train_per_task=8, test_per_task=4)
    _, source, targets = load_stream(DataArguments(task=2, **cifar), with_source=False)
    assert source is None and [t.name for t in targets] == ["gaussian_noise-5", "shot_noise-5"]
    assert [t.sizes for t in targets] == [{"train": 8, "val": 4, "test": 4}] * 2
    with pytest.raises(DataLayoutError, match=r"missing: \['impulse_noise\.npy'\]"):  # the third corruption
        load_stream(DataArguments(task=3, **cifar), with_source=False)
    office = tmp_path / "office"
    for domain in ("amazon", "dslr", "webcam"):
        _write_image_folder(office / domain, OFFICE31_CLASSES, 4)
    classes, source, targets = load_stream(DataArguments(dataset="office31", data_dir=str(office), image_size=8,
                                                         task=3, test_per_task=16))
    assert len(classes) == 31 and source.name == "amazon" and [t.name for t in targets] == ["dslr", "webcam", "dslr#2"]
    assert source.train[:]["pixel_values"].shape[1:] == (3, 8, 8)  # decoded once, in memory, at --image_size
    assert len(targets[0].test) <= 16


def test_recipe_script_help_runs():
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "cnn_retrain.py"), "--help"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    for flag in ("--dataset", "--model", "--hyperparameters", "--task", "--epoch", "--lr", "--budget_mib",
                 "--baseline", "--output_dir", "--seed"):
        assert flag in out.stdout
