"""The CNN retraining run behind ``recipes/cnn_retrain.py``: the MPOptimizer seed's experiment.

A zoo CNN (``small_cnn``) is pre-trained on a source domain (cached), then retrained task after task over a
stream of target domains (``cnn_online.data``) under a memory budget, its memory knobs chosen by the engine
(``--hyperparameters auto``) or fixed (``--hyperparameters mb16/f0.5/ckpt2/fp32``).

The seed's flags (``MPOptimizer/src/test.py``) and where they land:

==================================  =================================================================
``--dataset``                       ``DataArguments.dataset``: digits, cifar10-c, office31
``--model``                         ``ModelArguments.model``: a ``small_cnn`` zoo name
``--hyperparameters``               ``auto`` -> the engine chooses (``--baseline mpopt``); a
                                    ``MemoryConfig`` string -> ``--baseline fixed --fixed_config ...``
``--task N``                        ``DataArguments.task``: N target tasks
``--epoch E``                       ``TrainingArguments.num_train_epochs`` (per task)
``--lr``                            ``TrainingArguments.learning_rate``
``--budget_mib``                    ``MPOptArguments.memory_budget_mib``
``--output_dir``, ``--seed``        ``TrainingArguments`` (as they are)
``--gpu``                           not a flag: ``CUDA_VISIBLE_DEVICES`` / ``accelerate launch``
``--store_rate``                    no counterpart (the profile store keeps whole profiles)
==================================  =================================================================
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpopt_hf.config import check_choice, check_number, check_str
from online_recipe import QUIET_TRAINER_FLAGS, SMALL_SPACE_FLAGS, RunArguments, cached_model, given_flags, parse_args
from online_recipe import resolve_budget, run_and_report, supervised_pretrain
from online_recipe.arguments import SourceModelArguments, recipe_classes

from .data import DataArguments, load_stream

DEFAULT_MODEL = "resnet18"
DIGITS_WIDTH = 0.25  # the width multiplier on digits when none is given: 8x8 digits need no full-width ResNet
DEFAULT_TRAINING_FLAGS = [
    "--output_dir", "outputs/cnn_retrain",
    "--per_device_train_batch_size", "64",
    "--num_train_epochs", "2",
    "--learning_rate", "1e-3",
    *QUIET_TRAINER_FLAGS,
    *SMALL_SPACE_FLAGS,
    # the budget: 0.8 of the whole batch's predicted peak (binding, with room to measure a configuration that fits)
    "--budget_fraction", "0.8",
    "--trial_steps", "2",
]
# reproduce/cnn_retrain_digits.py --quick: a resnet18 x0.125 on 8 px digits, 2 tasks of one epoch, small enough for CI
# (about 15 s of one core); a batch of 32: at 16 the weights and optimizer state outweigh the activations and no
# configuration fits 0.8 of the whole batch's predicted peak
QUICK_FLAGS = [
    "--output_dir", "outputs/cnn_retrain_quick",
    "--width_multiplier", "0.125", "--image_size", "8", "--task", "2", "--epoch", "1",
    "--train_per_task", "64", "--test_per_task", "32", "--pretrain_steps", "10",
    "--per_device_train_batch_size", "32",
    "--micro_batch_sizes", "32", "16", "--freeze_rates", "0", "0.5", "--checkpoint_segments", "0", "2",
    "--trial_steps", "1",
]


def _model_names() -> list[str]:
    import small_cnn

    return list(small_cnn.MODEL_NAMES)


def _has_width(name: str) -> bool:
    import dataclasses

    import small_cnn

    config_cls = type(small_cnn.get_config(name))
    return "width_multiplier" in {f.name for f in dataclasses.fields(config_cls)}


@dataclass
class ModelArguments(SourceModelArguments):
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "A small_cnn zoo model (the seed's --model): "
                                                        "resnet18, resnet50, resnet101, resnext29, mobilenetv2, "
                                                        "mobilevit_xxs."})
    width_multiplier: float | None = field(
        default=None,
        metadata={"help": f"Channel width multiplier (resnet*, mobilenetv2). None: {DIGITS_WIDTH} on digits, the "
                  "model's own width (1.0) elsewhere."},
    )
    pretrain_steps: int = field(default=150, metadata={"help": "Supervised steps on the source domain; 0: none."})
    pretrain_lr: float = field(default=3e-3, metadata={"help": "Learning rate of the source pre-training."})
    pretrain_batch_size: int = field(default=64, metadata={"help": "Batch of the source pre-training."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where pre-trained source models are cached. None: ~/.cache/mpopt_hf/cnn_online."}
    )

    def __post_init__(self) -> None:
        where = "ModelArguments."
        check_choice(where + "model (--model)", self.model, _model_names())
        self.width_multiplier = check_number(where + "width_multiplier", self.width_multiplier, lambda v: v > 0,
                                             "> 0 or None", optional=True)
        if self.width_multiplier not in (None, 1.0) and not _has_width(self.model):
            raise ValueError(f"ModelArguments.width_multiplier {self.width_multiplier}: {self.model} has no width "
                             "multiplier (resnet18/50/101 and mobilenetv2 do); leave --width_multiplier out.")
        self.check_pretraining(optional=False)

    def width_for(self, dataset: str) -> float | None:
        """The width multiplier the model is built with (None: its config has none)."""
        if not _has_width(self.model):
            return None
        if self.width_multiplier is not None:
            return self.width_multiplier
        return DIGITS_WIDTH if dataset == "digits" else 1.0


@dataclass
class SeedArguments:
    """The seed's own flags that name a field of TrainingArguments / MPOptArguments / RunArguments otherwise."""

    hyperparameters: str = field(
        default="auto",
        metadata={"help": "'auto': the engine chooses the memory configuration online; or one fixed configuration "
                  "such as mb16/f0.5/ckpt2/fp32 (micro-batch/freeze rate/checkpoint segments/precision)."},
    )
    epoch: float | None = field(default=None, metadata={"help": "Epochs per task (= --num_train_epochs)."})
    lr: float | None = field(default=None, metadata={"help": "Learning rate of the retraining (= --learning_rate)."})
    budget_mib: float | None = field(default=None, metadata={"help": "Memory budget, MiB (= --memory_budget_mib)."})

    def __post_init__(self) -> None:
        from mpopt_hf.config import MemoryConfig

        where = "SeedArguments."
        check_str(where + "hyperparameters (--hyperparameters)", self.hyperparameters,
                  "'auto' or a memory configuration such as 'mb16/f0.5/ckpt2/fp32'")
        if self.hyperparameters != "auto":
            try:
                MemoryConfig.parse(self.hyperparameters)
            except ValueError as err:
                raise type(err)(f"SeedArguments.hyperparameters (--hyperparameters) must be 'auto' or a memory "
                                f"configuration: {err}") from None
        for name in ("epoch", "lr", "budget_mib"):
            setattr(self, name, check_number(f"{where}{name} (--{name})", getattr(self, name), lambda v: v > 0,
                                             "a finite number > 0 or None", optional=True))

    def memory_config(self):
        from mpopt_hf.config import MemoryConfig

        return None if self.hyperparameters == "auto" else MemoryConfig.parse(self.hyperparameters)


# seed flag -> (which parsed dataclass, its field)
ALIASES = {"epoch": ("training", "num_train_epochs"), "lr": ("training", "learning_rate"),
           "budget_mib": ("mpopt", "memory_budget_mib")}


def apply_seed_flags(seed: SeedArguments, run: RunArguments, mpopt, training, given: set[str]) -> None:
    """Write the seed's flags into the fields that do their job; refuse a flag given together with its alias."""
    targets = {"training": training, "mpopt": mpopt}
    for flag, (owner, name) in ALIASES.items():
        value = getattr(seed, flag)
        if value is None:
            continue
        if name in given:
            raise ValueError(f"--{flag} and --{name} both set {type(targets[owner]).__name__}.{name}; give one.")
        setattr(targets[owner], name, value)
    if seed.epoch is not None and "max_steps" in given:
        raise ValueError(f"--epoch {seed.epoch:g} and --max_steps both bound a task's training (max_steps wins in "
                         "TrainingArguments); give one.")
    config = seed.memory_config()
    if config is None:
        return
    if run.fixed_config is not None:
        raise ValueError(f"--hyperparameters {seed.hyperparameters} and --fixed_config {run.fixed_config} both fix "
                         "the configuration; give one.")
    if "baseline" in given and run.baseline != "fixed":
        raise ValueError(f"--hyperparameters {seed.hyperparameters} fixes the memory configuration, but --baseline "
                         f"{run.baseline} chooses its own; use --hyperparameters auto with --baseline {run.baseline}.")
    if config.micro_batch_size > training.per_device_train_batch_size:
        raise ValueError(f"--hyperparameters {seed.hyperparameters}: micro-batch {config.micro_batch_size} exceeds "
                         f"the effective batch --per_device_train_batch_size {training.per_device_train_batch_size}.")
    run.baseline, run.fixed_config = "fixed", config.short()


def parse(argv: list[str] | None = None):
    """(model, data, seed, run, mpopt, training) arguments, the seed's flags already applied (a `ParsedArgs`: its
    ``provenance`` goes to run_and_report)."""
    parsed = parse_args(recipe_classes(ModelArguments, DataArguments, SeedArguments), DEFAULT_TRAINING_FLAGS, argv)
    _, _, seed, run, mpopt, training = parsed
    apply_seed_flags(seed, run, mpopt, training, given_flags(argv))
    return parsed


# ---------------------------------------------------------------------------- the source model


def build_model(model_args: ModelArguments, dataset: str, num_labels: int):
    import small_cnn

    width = model_args.width_for(dataset)
    overrides = {} if width is None else {"width_multiplier": width}
    return small_cnn.build(model_args.model, num_labels=num_labels, **overrides)


def source_model(model_args: ModelArguments, data_args: DataArguments, classes: list[str], source, training_args):
    """The zoo model, pre-trained on the source domain for ``pretrain_steps`` (cached by everything it depends on)."""
    from transformers import AutoModelForImageClassification

    torch.manual_seed(training_args.seed)
    steps = model_args.pretrain_steps
    if steps == 0:
        return build_model(model_args, data_args.dataset, len(classes))
    key = {"model": model_args.model, "width": model_args.width_for(data_args.dataset), "classes": classes,
           "dataset": data_args.dataset, "data_dir": None if data_args.root is None else str(Path(data_args.root).resolve()),
           "image_size": data_args.image_size, "stream_seed": data_args.stream_seed, "steps": steps,
           "lr": model_args.pretrain_lr, "batch": model_args.pretrain_batch_size, "seed": training_args.seed,
           "source_size": len(source.train), "v": 1}
    cache_root = model_args.source_cache("cnn_online")

    def make():
        model = build_model(model_args, data_args.dataset, len(classes))
        supervised_pretrain(model, source.train, steps, model_args.pretrain_lr, model_args.pretrain_batch_size,
                            training_args)
        return model

    import small_cnn  # noqa: F401  (registers the zoo with the Auto classes before a cached model loads)

    return cached_model(key, cache_root, make, AutoModelForImageClassification.from_pretrained).eval()


def _source_accuracy(model, source) -> float | None:
    from mpopt_hf.metrics import load_metric
    from mpopt_hf.online import accuracy_on

    return None if source is None else accuracy_on(model, source.test, load_metric("accuracy"))


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, pre-train (or load) the source model, run the stream, print the table; returns the results dict."""
    parsed = parse(argv)
    model_args, data_args, seed_args, run_args, mpopt_args, training_args = parsed
    started = time.perf_counter()
    classes, source, targets = load_stream(data_args, with_source=model_args.pretrain_steps > 0)
    model = source_model(model_args, data_args, classes, source, training_args).to(training_args.device)
    source_accuracy = _source_accuracy(model, source)
    budget, unconstrained = resolve_budget(model, targets[0].train, run_args, mpopt_args, training_args)
    width = model_args.width_for(data_args.dataset)
    epochs = training_args.num_train_epochs if training_args.max_steps <= 0 else None
    print(
        f"cnn_retrain: model={model_args.model}" + ("" if width in (None, 1.0) else f" (width x{width:g})")
        + f", {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters | dataset={data_args.dataset}, "
        f"{len(targets)} tasks: {', '.join(t.name for t in targets)} | hyperparameters={seed_args.hyperparameters} "
        f"baseline={run_args.baseline} | effective batch {training_args.per_device_train_batch_size} x "
        + (f"{epochs:g} epochs/task" if epochs is not None else f"{training_args.max_steps} steps/task")
        + f", lr {training_args.learning_rate:g} | budget {budget:.2f} MiB"
        + (f" (unconstrained step predicted at {unconstrained:.2f} MiB)" if unconstrained else "")
    )
    if source is not None:
        print(f"source {source.name}: {model_args.pretrain_steps} pre-training steps, test accuracy "
              f"{source_accuracy:.3f}")
    arguments = {"model": asdict(model_args), "data": asdict(data_args), "seed": asdict(seed_args),
                 "run": asdict(run_args)}
    return run_and_report(model, targets, run_args, mpopt_args, training_args, budget=budget,
                          unconstrained=unconstrained, started=started, arguments=arguments,
                          provenance=parsed.provenance, extra_summary={"source_accuracy": source_accuracy})
