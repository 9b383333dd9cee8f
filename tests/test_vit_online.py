"""vit_online's units: the flags mapped onto TrainingArguments / MPOptArguments, bad flags refused by name,
``--random_init`` building the published architecture, a local checkpoint loaded, the model resizing and
normalising its inputs, and the CIFAR-10-C stream from its folder. The recipe end to end:
tests/test_recipe_vit_cls_online.py."""

from __future__ import annotations

import json

import pytest
import torch

from test_recipe_vit_cls_online import TWO_LAYERS, _small  # the recipe's small run: its flags
from vit_online import PUBLIC_CONFIGS, ModelNotAvailableError, ViTOnlineForImageClassification
from vit_online.run import build_model, parse

VIT_B16 = "google/vit-base-patch16-224"
DIGITS = [str(d) for d in range(10)]


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
