"""The online ViT classification run behind ``recipes/vit_cls_online.py``.

Offline default (no arguments): a ~0.3 M-parameter ViT (4 layers, width 96, patch 4, 16 px images), pre-trained
for seconds on clean digits (cached), then a stream of five corrupted-digit tasks (24 steps of 64 images each)
retrained under a memory budget that the unconstrained configuration exceeds (half its predicted peak), the engine
choosing the memory knobs. The real job:
``--model google/vit-base-patch16-224 --dataset cifar10-c --data_dir DIR`` (the checkpoint's head re-sized to the
data set's classes). ``--random_init true`` builds a checkpoint's architecture without its weights, so memory and
step-time tables can be regenerated offline; its accuracies mean nothing and the card says so.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpopt_hf.config import check_bool, check_str
from online_recipe import check_model_path, QUIET_TRAINER_FLAGS, SMALL_SPACE_FLAGS, cached_model, parse_args
from online_recipe import resolve_budget, run_and_report, supervised_pretrain
from online_recipe.arguments import HubModelArguments, recipe_classes

from .data import DataArguments, load_stream
from .modeling import PUBLIC_CONFIGS, TINY, ViTOnlineForImageClassification, build_random, build_tiny, load_cached
from .modeling import apply_overrides, load_pretrained

TINY_PRETRAIN_STEPS = 300
DEFAULT_TRAINING_FLAGS = [
    "--output_dir", "outputs/vit_cls_online",
    "--per_device_train_batch_size", "64",
    "--max_steps", "24",
    "--learning_rate", "1e-3",
    *QUIET_TRAINER_FLAGS,
    *SMALL_SPACE_FLAGS,
    "--trial_steps", "3",
]
# reproduce/vit_cls_online.py --quick: a 2-layer ViT over 2 short tasks, small enough for CI (about 15 s of one core)
QUICK_FLAGS = [
    "--output_dir", "outputs/vit_cls_online_quick",
    "--config_overrides", "num_hidden_layers=2,hidden_size=32,intermediate_size=64,num_attention_heads=2",
    "--corruptions", "fog", "contrast",
    "--train_per_task", "64", "--test_per_task", "64", "--pretrain_steps", "30",
    "--per_device_train_batch_size", "32", "--max_steps", "4",
    "--micro_batch_sizes", "32", "16", "--freeze_rates", "0", "--trial_steps", "1",
]


@dataclass
class ModelArguments(HubModelArguments):
    model: str = field(default=TINY, metadata={"help": f"A ViT hub id or folder (e.g. google/vit-base-patch16-224), "
                                               f"or '{TINY}' (built offline)."})
    random_init: bool = field(
        default=False,
        metadata={"help": "Build --model's architecture from its config, without weights (published ones: "
                  f"{sorted(PUBLIC_CONFIGS)} need no download): memory and step times are the real model's, "
                  "accuracies are not measured."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": f"'{TINY}' or --random_init: ViTConfig fields to change, e.g. "
                  "'num_hidden_layers=2,hidden_size=32' (as transformers' run_clm)."},
    )
    pretrain_steps: int | None = field(
        default=None, metadata={"help": f"Supervised steps on the clean source domain. None: {TINY_PRETRAIN_STEPS} "
                                f"for '{TINY}', 0 else."}
    )
    pretrain_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the source pre-training."})
    pretrain_batch_size: int = field(default=64, metadata={"help": "Batch of the source pre-training."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where pre-trained source models are cached. None: ~/.cache/mpopt_hf/vit_online."},
    )

    def __post_init__(self) -> None:
        where = "ModelArguments."
        self.check_model("model (--model)", f"a ViT hub id (org/name), a local folder or {TINY!r}")
        check_bool(where + "random_init (--random_init)", self.random_init)
        check_str(where + "config_overrides (--config_overrides)", self.config_overrides,
                  "'key=value,...' with ViTConfig keys, or None", optional=True)
        self.check_pretraining(TINY_PRETRAIN_STEPS if self.model == TINY else 0, steps_flag=True)
        if self.random_init and self.model == TINY:
            raise ValueError(f"ModelArguments.random_init True with --model {TINY}: the tiny ViT is always built "
                             "from its config; --random_init is for a checkpoint's architecture (e.g. --model "
                             "google/vit-base-patch16-224 --random_init true).")
        if self.random_init and self.pretrain_steps > 0:
            raise ValueError(f"ModelArguments.pretrain_steps {self.pretrain_steps} with --random_init true: random "
                             "weights are for memory and step-time tables, whose accuracies are not measured; "
                             "use --pretrain_steps 0.")
        if self.config_overrides and not (self.model == TINY or self.random_init):
            raise ValueError(f"ModelArguments.config_overrides {self.config_overrides!r} with the weights of "
                             f"{self.model!r}: changing the architecture would leave weights unloaded; use it with "
                             f"--model {TINY} or --random_init true.")
        if self.config_overrides:
            from transformers import ViTConfig

            apply_overrides(ViTConfig(), self.config_overrides)  # a key ViTConfig lacks fails here, by name
        if self.model != TINY and not (self.random_init and self.model in PUBLIC_CONFIGS):
            self._check_model_path()

    def _check_model_path(self) -> None:
        """A local path must exist (a folder with config.json); only a well-formed hub id goes on."""
        expected = (f"a folder with config.json and weights of a ViT, a hub id such as google/vit-base-patch16-224 "
                    f"(it needs the hub, or a copy already in the local Hugging Face cache; --local_files_only false "
                    f"lets it download), or {TINY!r} (built offline)")
        check_model_path(self.model, expected, "ModelArguments.model")


def parse(argv: list[str] | None = None):
    """(model, data, run, mpopt, training) arguments (a `ParsedArgs`: its ``provenance`` goes to run_and_report);
    the recipe's defaults go first so any flag overrides them."""
    return parse_args(recipe_classes(ModelArguments, DataArguments), DEFAULT_TRAINING_FLAGS, argv)


# ---------------------------------------------------------------------------- the source model


def build_model(model_args: ModelArguments, class_names: list[str], image_size: int,
                seed: int) -> ViTOnlineForImageClassification:
    """The model before any pre-training: the tiny ViT, a checkpoint's architecture (random) or its weights."""
    if model_args.model == TINY:
        return build_tiny(class_names, image_size, model_args.config_overrides, seed=seed)
    if model_args.random_init:
        return build_random(model_args.model, class_names, model_args.local_files_only,
                            model_args.config_overrides, seed=seed)
    return load_pretrained(model_args.model, class_names, model_args.local_files_only, seed=seed)


def source_model(model_args: ModelArguments, data_args: DataArguments, class_names: list[str], source,
                 training_args) -> ViTOnlineForImageClassification:
    """The model, pre-trained on the clean source domain for ``pretrain_steps`` (cached by everything it depends on)."""
    steps, seed = model_args.pretrain_steps, training_args.seed
    if steps == 0:
        return build_model(model_args, class_names, data_args.image_size, seed)
    key = {"model": model_args.model, "config_overrides": model_args.config_overrides, "classes": class_names,
           "dataset": data_args.dataset,
           "data_dir": None if data_args.root is None else str(Path(data_args.root).resolve()),
           "image_size": data_args.image_size, "stream_seed": data_args.stream_seed, "steps": steps,
           "lr": model_args.pretrain_lr, "batch": model_args.pretrain_batch_size, "seed": seed,
           "source_size": len(source.train), "v": 1}
    cache_root = model_args.source_cache("vit_online")

    def make() -> ViTOnlineForImageClassification:
        model = build_model(model_args, class_names, data_args.image_size, seed)
        supervised_pretrain(model, source.train, steps, model_args.pretrain_lr, model_args.pretrain_batch_size,
                            training_args)
        return model

    return cached_model(key, cache_root, make, load_cached).eval()


def _source_accuracy(model, source) -> float | None:
    from mpopt_hf.metrics import load_metric
    from mpopt_hf.online import accuracy_on

    return None if source is None else accuracy_on(model, source.test, load_metric("accuracy"))


# ---------------------------------------------------------------------------- main


def limitations(model: str, random_weights: bool) -> str:
    """The card's limitations: the image recipes' (`online_recipe.model_card.LIMITATIONS`), what the tiny ViT is,
    and with random weights that the accuracies mean nothing."""
    from online_recipe.model_card import LIMITATIONS

    text = LIMITATIONS
    if model == TINY:
        text = (f"The offline default `{TINY}` is a ~0.3 M-parameter ViT (4 layers, width 96, patch 4) trained from "
                "scratch for seconds on 16x16 digits; its accuracies say how the memory knobs trade against "
                "adaptation, not what a pre-trained ViT reaches. " + text)
    if random_weights:
        text = ("Random weights (`--random_init`): the model has the named checkpoint's architecture and none of "
                "its weights, so the memory and step-time columns are the real model's and the accuracy columns "
                "are not measured (random weights): they are those of an untrained network. " + text)
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, build (pre-train or load) the model, run the stream, print the table; returns the results dict
    (also in results.json)."""
    parsed = parse(argv)
    model_args, data_args, run_args, mpopt_args, training_args = parsed
    started = time.perf_counter()
    torch.manual_seed(training_args.seed)
    class_names, source, targets = load_stream(data_args, with_source=model_args.pretrain_steps > 0)
    model = source_model(model_args, data_args, class_names, source, training_args).to(training_args.device)
    source_accuracy = _source_accuracy(model, source)
    budget, unconstrained = resolve_budget(model, targets[0].train, run_args, mpopt_args, training_args)
    config = model.config
    patches = (config.image_size // config.patch_size) ** 2
    print(
        f"vit_cls_online: model={model_args.model}" + (" (random weights)" if model_args.random_init else "")
        + f", {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {config.num_hidden_layers} layers "
        f"x {config.hidden_size} wide, {config.image_size} px input in {patches} patches of {config.patch_size} | "
        f"dataset={data_args.dataset} ({data_args.image_size} px), {len(targets)} tasks: "
        f"{', '.join(t.name for t in targets)} | baseline={run_args.baseline} | effective batch "
        f"{training_args.per_device_train_batch_size} x {training_args.max_steps} steps/task, lr "
        f"{training_args.learning_rate:g} | budget {budget:.2f} MiB"
        + (f" (unconstrained step predicted at {unconstrained:.2f} MiB)" if unconstrained else "")
    )
    if source is not None:
        print(f"source {source.name}: {model_args.pretrain_steps} pre-training steps, test accuracy "
              f"{source_accuracy:.3f}")
    if model_args.random_init:
        print("random weights: the memory and step-time columns are the architecture's; accuracies mean nothing")
    arguments = {"model": asdict(model_args), "data": asdict(data_args), "run": asdict(run_args)}
    return run_and_report(model, targets, run_args, mpopt_args, training_args, budget=budget,
                          unconstrained=unconstrained, started=started, arguments=arguments,
                          provenance=parsed.provenance,
                          limitations=limitations(model_args.model, model_args.random_init),
                          extra_summary={"source_accuracy": source_accuracy,
                                         "random_weights": model_args.random_init})
