"""recipes/vit_cls_online.py: a 2-layer ViT end to end on a 2-task stream, the flags mapped onto TrainingArguments /
MPOptArguments, bad flags refused by name, ``--random_init`` building the published architecture, and the model
resizing and normalising its inputs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpopt_hf.config import MemoryConfig
from vit_online import PUBLIC_CONFIGS, ModelNotAvailableError, ViTOnlineForImageClassification
from vit_online.run import build_model, main, parse

ROOT = Path(__file__).resolve().parents[1]
VIT_B16 = "google/vit-base-patch16-224"
DIGITS = [str(d) for d in range(10)]
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


def test_flags_land_on_training_mpopt_model_and_data_arguments(tmp_path):
    model, data, run, mpopt, training = parse(["--output_dir", str(tmp_path)])  # the offline default
    assert (model.model, model.pretrain_steps, model.random_init, model.local_files_only) == ("tiny", 300, False, True)
    assert (data.dataset, data.image_size, data.corruptions) == ("digits", 16, ["fog", "contrast", "glass_blur",
                                                                                 "frost", "motion_blur"])
    assert training.max_steps == 24 and training.learning_rate == 1e-3 and training.per_device_train_batch_size == 64
    assert mpopt.micro_batch_sizes == [64, 32, 16] and mpopt.memory_budget_mib is None and run.budget_fraction == 0.5
    model, data, run, mpopt, training = parse(_small(tmp_path, "--memory_budget_mib", "40", "--learning_rate", "0.02",
                                                     "--seed", "7", "--baseline", "fixed", "--fixed_config", "mb8"))
    assert training.max_steps == 3 and training.learning_rate == 0.02 and training.seed == 7
    assert training.output_dir == str(tmp_path / "out") and training.per_device_train_batch_size == 16
    assert mpopt.memory_budget_mib == 40 and mpopt.micro_batch_sizes == [16, 8] and mpopt.trial_steps == 1
    assert (run.baseline, run.fixed_config) == ("fixed", "mb8")
    assert (data.image_size, data.corruptions, model.config_overrides) == (16, ["fog", "contrast"], TWO_LAYERS)
    model, *_ = parse(["--output_dir", str(tmp_path), "--model", VIT_B16, "--random_init", "true"])
    assert model.random_init is True and model.pretrain_steps == 0  # a checkpoint is not pre-trained by default


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--random_init", "true"], r"random_init True with --model tiny"),
        (["--model", VIT_B16, "--random_init", "true", "--pretrain_steps", "5"],
         r"pretrain_steps 5 with --random_init true"),
        (["--model", VIT_B16, "--config_overrides", "num_hidden_layers=2"], r"config_overrides .* with the weights of"),
        (["--config_overrides", "no_such_key=3"], r"config_overrides 'no_such_key=3': .*no_such_key"),
        (["--dataset", "imagenet"], r"DataArguments\.dataset \(--dataset\) must be one of \['digits', 'cifar10-c'\]"),
        (["--dataset", "cifar10-c"], r"--dataset cifar10-c needs --data_dir DIR.*CIFAR-10-C"),
        (["--data_dir", "/tmp"], r"data_dir '/tmp' is given but the data set 'digits' is built in"),
        (["--dataset", "cifar10-c", "--data_dir", "/tmp", "--image_size", "16"], r"cifar10-c images are 32x32"),
        (["--corruptions", "fogg"],
         r"DataArguments\.corruptions \(--corruptions\) holds \['fogg'\]; allowed: corruption names"),
        (["--severity", "6"], r"DataArguments\.severity \(--severity\) must be an int in 1\.\.5, got 6"),
        (["--image_size", "4"], r"DataArguments\.image_size \(--image_size\) must be an int >= 8"),
        (["--pretrain_steps", "-1"], r"ModelArguments\.pretrain_steps \(--pretrain_steps\) must be an int >= 0"),
        (["--model", "/no/such/vit"], r"ModelArguments\.model '/no/such/vit': the local path .* does not exist"),
        (["--baseline", "best"], r"baseline must be one of"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(tmp_path, monkeypatch, flags, match):
    monkeypatch.delenv("MPOPT_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match=match):
        parse(["--output_dir", str(tmp_path), *flags])


def _vit_parameters(c, num_labels: int) -> int:
    """ViTForImageClassification's parameter count from its config (no pooler; LayerNorms with weight and bias)."""
    h, i, patches = c.hidden_size, c.intermediate_size, (c.image_size // c.patch_size) ** 2
    embeddings = c.num_channels * c.patch_size**2 * h + h + h + (patches + 1) * h  # projection + bias, CLS, positions
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # q, k, v, out; MLP in, out; two LayerNorms
    return embeddings + c.num_hidden_layers * layer + 2 * h + (h * num_labels + num_labels)


def test_random_init_builds_the_published_architecture_without_weights(tmp_path):
    model_args, data_args, *_ = parse(["--output_dir", str(tmp_path), "--model", VIT_B16, "--random_init", "true"])
    with torch.device("meta"):  # shapes only: ViT-B/16's 86 M parameters cost no memory and no time
        model = build_model(model_args, DIGITS, data_args.image_size, seed=0)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.patch_size,
            c.image_size) == (768, 12, 12, 3072, 16, 224)
    assert isinstance(model, ViTOnlineForImageClassification) and model.classifier.out_features == 10
    assert all(p.is_meta for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    assert count == _vit_parameters(c, 10) == 85_806_346  # 86_567_656 with the 1000-class ImageNet head
    assert PUBLIC_CONFIGS[VIT_B16]["image_size"] == 224
    with pytest.raises(ModelNotAvailableError, match=r"No ViT config for 'no-such-org/vit'"):
        build_model(parse(["--output_dir", str(tmp_path), "--model", "no-such-org/vit", "--random_init", "true"])[0],
                    DIGITS, 16, seed=0)


def test_a_local_checkpoint_loads_with_its_head_resized_and_its_normalisation(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    saved = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, image_size=16, patch_size=4, num_labels=3))
    saved.save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                            "image_std": [0.4, 0.5, 0.6]}))
    model_args, *_ = parse(["--output_dir", str(tmp_path), "--model", str(tmp_path / "vit")])
    model = build_model(model_args, DIGITS, 8, seed=0)
    assert model.classifier.out_features == 10 and model.config.id2label[3] == "3"  # re-sized to the data set's
    assert model.config.image_mean == [0.1, 0.2, 0.3] and model.config.image_std == [0.4, 0.5, 0.6]
    mine, theirs = model.vit.state_dict(), saved.vit.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(ModelNotAvailableError, match=r"'no-such-org/vit'(.|\n)*huggingface-cli download"):
        build_model(parse(["--output_dir", str(tmp_path), "--model", "no-such-org/vit"])[0], DIGITS, 8, seed=0)


def test_the_model_resizes_and_normalises_images_in_0_1():
    from vit_online import build_tiny

    model = build_tiny(DIGITS, image_size=16, overrides=TWO_LAYERS).eval()
    model.config.image_mean, model.config.image_std = [0.2, 0.4, 0.6], [0.5, 0.25, 0.125]
    images = torch.rand(3, 3, 8, 8)  # half the model's size
    by_hand = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1), torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)
    by_hand = (by_hand - mean) / std
    with torch.no_grad():
        ours = model(pixel_values=images).logits
        plain = super(ViTOnlineForImageClassification, model).forward(pixel_values=by_hand).logits
    torch.testing.assert_close(ours, plain)
    labels = torch.tensor([1, 2, 3])
    assert torch.isfinite(model(pixel_values=images, labels=labels).loss)  # ViT's own classification loss


def test_recipe_script_help_runs():
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "vit_cls_online.py"), "--help"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--random_init", "--config_overrides", "--dataset", "--corruptions", "--baseline",
                 "--memory_budget_mib", "--max_steps", "--output_dir"):
        assert flag in out.stdout


def test_cifar10c_stream_from_its_folder(tmp_path, monkeypatch):
    from test_vision_loaders import write_cifar10c

    from vit_online import DataArguments, load_stream

    monkeypatch.delenv("MPOPT_DATA_DIR", raising=False)
    write_cifar10c(tmp_path, corruptions=("gaussian_noise", "shot_noise"))
    data = DataArguments(dataset="cifar10-c", data_dir=str(tmp_path), corruptions=["gaussian_noise", "shot_noise"],
                         train_per_task=8, test_per_task=4)
    classes, source, targets = load_stream(data, with_source=False)  # --pretrain_steps 0: no clean CIFAR-10 read
    assert len(classes) == 10 and source is None and data.image_size == 32
    assert [t.name for t in targets] == ["gaussian_noise-5", "shot_noise-5"]
    assert [t.sizes for t in targets] == [{"train": 8, "val": 4, "test": 4}] * 2
    assert targets[0].test[:]["pixel_values"].shape[1:] == (3, 32, 32)  # kept at 32 px: the model resizes
