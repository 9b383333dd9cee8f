"""The online CLIP classification run behind ``recipes/clip_cls_online.py``.

Offline default (no arguments): a tiny CLIP, pre-trained for seconds on clean
digits (cached), then a stream of corrupted digits retrained under a memory
budget that the unconstrained configuration exceeds. The real job:
``--model openai/clip-vit-base-patch32 --dataset cifar10-c --data_dir DIR``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mpopt_hf.config import InvalidTypeError, check_choice, check_int, check_list, check_number, check_str
from online_recipe import check_model_path, QUIET_TRAINER_FLAGS, SMALL_SPACE_FLAGS, at_most, cached_model, parse_args
from online_recipe import resolve_budget, run_and_report, supervised_pretrain
from online_recipe import default_budget_mib  # noqa: F401  (re-exported: bench/online_baselines.py imports it)
from online_recipe import RunArguments  # noqa: F401  (re-exported: tests/test_bad_inputs.py builds it from here)
from online_recipe.arguments import CorruptedImagesArguments, HubModelArguments, check_corruption_table, recipe_classes
from online_recipe.arguments import IMAGE_DATASETS as DATASETS

from .loading import OFFLINE_PRESETS, SMALL, TINY, build_classifier
from .losses import ADAPTATIONS, UNSUPERVISED_LOSSES
from .modeling import CLIPClassifier

logger = logging.getLogger(__name__)


# CLIP prompts read better with words than with the registry's class names ("0".."9") where they differ
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_NAMES = {"digits": DIGIT_NAMES}
# The main job: 60 steps of 64 images per task (long enough for a race to pay), the gain measured on each task's
# val split, and a co-located process that takes half the budget from 40 % of the stream to 70 %.
DEFAULT_TRAINING_FLAGS = [
    "--output_dir", "outputs/clip_cls_online",
    "--per_device_train_batch_size", "64",
    "--max_steps", "60",
    "--learning_rate", "1e-3",
    *QUIET_TRAINER_FLAGS,
    *SMALL_SPACE_FLAGS,
    "--trial_steps", "4",
    "--search_share", "0.15",
    "--budget_fraction", "0.6",
    "--budget_trace", "0:1,0.4:0.5,0.7:1",
]
# reproduce/clip_cls_online.py --quick: the 40 k-parameter CLIP over 2 short tasks under a fixed budget (no trace: half
# of a budget this small fits no configuration), small enough for CI (about 15 s of one core)
QUICK_FLAGS = [
    "--output_dir", "outputs/clip_cls_online_quick",
    "--model", "tiny", "--corruptions", "fog", "contrast", "--budget_trace", "none",
    "--train_per_task", "64", "--test_per_task", "64", "--pretrain_steps", "30",
    "--per_device_train_batch_size", "32", "--max_steps", "4",
    "--micro_batch_sizes", "32", "16", "--freeze_rates", "0", "--checkpoint_segments", "0", "2", "--trial_steps", "1",
]


@dataclass
class ModelArguments(HubModelArguments):
    model: str = field(default=SMALL, metadata={"help": f"A CLIP hub id or folder, or one built offline: '{SMALL}' "
                                                f"(890,753 parameters in its CLIPModel) or '{TINY}' (61,825; for tests)."})
    adaptation: str = field(default="supervised", metadata={"help": f"Retraining loss, one of {list(ADAPTATIONS)}."})
    unsupervised_loss: str = field(default="entropy", metadata={"help": f"One of {list(UNSUPERVISED_LOSSES)}."})
    confidence_margin: float = field(
        default=0.4, metadata={"help": "Unsupervised losses use samples with entropy < margin x ln(classes); 1 = all."}
    )
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."], metadata={"help": "Prompt templates."})
    pretrain_steps: int | None = field(
        default=None, metadata={"help": "Supervised steps on the clean source domain. None: 200 for a CLIP built "
                                "offline, 0 else."}
    )
    pretrain_lr: float = field(default=3e-3, metadata={"help": "Learning rate of the source pre-training."})
    pretrain_batch_size: int = field(
        default=64, metadata={"help": "Batch of the source pre-training: the deployed model's past, whatever the "
                              "retraining batch (--per_device_train_batch_size) is."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where pre-trained source checkpoints are cached. None: ~/.cache/mpopt_hf/clip_online."}
    )

    def __post_init__(self) -> None:
        where = "ModelArguments."
        self.check_model("model", f"a CLIP hub id (org/name), a local folder, {SMALL!r} or {TINY!r}")
        check_choice(where + "adaptation", self.adaptation, ADAPTATIONS)
        check_choice(where + "unsupervised_loss", self.unsupervised_loss, UNSUPERVISED_LOSSES)
        self.confidence_margin = check_number(where + "confidence_margin", self.confidence_margin,
                                              lambda v: 0.0 < v <= 1.0, "in (0, 1] (1 = all samples)")
        self.templates = check_list(where + "templates", self.templates, lambda t: isinstance(t, str) and "{}" in t,
                                    "prompt templates (str) holding '{}' for the class name, e.g. 'a photo of a {}.'")
        self.check_pretraining(batch_allowed=">= 1 (an int)")
        if self.cache_dir is not None and os.path.exists(os.path.expanduser(self.cache_dir)) \
                and not os.path.isdir(os.path.expanduser(self.cache_dir)):
            raise ValueError(f"ModelArguments.cache_dir {self.cache_dir!r} is a file; give a folder (or None).")
        self._check_model_path()

    def _check_model_path(self) -> None:
        """A local path must exist (a folder with config.json); only a well-formed hub id goes on."""
        if self.model in OFFLINE_PRESETS:
            return
        expected = (f"a folder with config.json, model weights and tokenizer files of a CLIPModel, a hub id such "
                    f"as openai/clip-vit-base-patch32 (a hub id needs the hub, or a copy already in the local Hugging "
                    f"Face cache; --local_files_only false lets it download), or {SMALL!r} / {TINY!r} (built offline)")
        check_model_path(self.model, expected, "ModelArguments.model")


@dataclass
class DataArguments(CorruptedImagesArguments):
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder of the data set (cifar10-c: the folder holding CIFAR-10-C/, or it)."}
    )
    train_per_task: int = field(default=512, metadata={"help": "At most this many training images per task."})
    test_per_task: int = field(default=360, metadata={"help": "At most this many test (and val) images per task."})
    stream_seed: int = field(default=0, metadata={"help": "Seed of the splits and the corruption noise."})

    def __post_init__(self) -> None:
        from vision.corruptions import ALL_CORRUPTIONS

        where = "DataArguments."
        if not isinstance(self.dataset, str):
            raise InvalidTypeError(f"DataArguments.dataset must be one of {list(DATASETS)}, got {self.dataset!r} "
                                   f"({type(self.dataset).__name__}).")
        if self.dataset not in DATASETS:
            raise ValueError(f"DataArguments.dataset: unknown data set {self.dataset!r}; known: {list(DATASETS)}.")
        check_str(where + "data_dir", self.data_dir, "a folder path or None", optional=True)
        if self.data_dir is not None and self.dataset == "digits":
            raise ValueError(f"DataArguments.data_dir {self.data_dir!r} is given but the data set 'digits' is built "
                             "in and reads no folder; data_dir is for cifar10-c (or leave it out).")
        self.corruptions = check_list(where + "corruptions", self.corruptions,
                                      lambda c: isinstance(c, str) and c in ALL_CORRUPTIONS,
                                      f"corruption names from {list(ALL_CORRUPTIONS)}")
        self.severity = check_int(where + "severity", self.severity, lambda v: 1 <= v <= 5, "an int in 1..5")
        check_corruption_table(where, self.corruption_table, self.dataset)
        self.train_per_task = check_int(where + "train_per_task", self.train_per_task, lambda v: v >= 1,
                                        "an int >= 1")
        self.test_per_task = check_int(where + "test_per_task", self.test_per_task, lambda v: v >= 1, "an int >= 1")
        self.stream_seed = check_int(where + "stream_seed", self.stream_seed, lambda v: v >= 0, "an int >= 0")


def parse(argv: list[str] | None = None):
    """(model, data, run, mpopt, training) arguments; the recipe's defaults go first so any flag overrides them."""
    return parse_args(recipe_classes(ModelArguments, DataArguments), DEFAULT_TRAINING_FLAGS, argv)


# ---------------------------------------------------------------------------- data


def load_stream(data: DataArguments):
    """``(class_names, source_task, target_tasks)`` for the chosen data set, from ``vision.streams``.

    digits: clean digits (the source) then one task per corruption; cifar10-c: the released
    corruptions, no source task (CLIP starts zero-shot). vision caps every split at one
    ``max_samples_per_task``: the larger of the two flags, then train is cut to ``train_per_task``
    and val/test to ``test_per_task`` (random subsets by ``stream_seed``). The digits source trains on
    the whole clean train split.
    """
    import vision
    from vision.registry import get_info
    from vision.streams import build_stream

    cap = max(data.train_per_task, data.test_per_task)
    if data.dataset == "digits":
        tasks = build_stream("digits", corruptions=data.corruptions, severity=data.severity,
                             max_samples_per_task=cap, seed=data.stream_seed, table=data.corruption_table)
        source, targets = tasks[0], tasks[1:]
        # pre-train on the whole clean train split the stream draws from (vision caps the clean task like the others)
        source.train = vision.load("digits", split="train", seed=data.stream_seed)
    else:
        source, targets = None, build_stream(data.dataset, root_dir=data.data_dir, corruptions=data.corruptions,
                                             severity=data.severity, max_samples_per_task=cap, seed=data.stream_seed,
                                             table=data.corruption_table)
    for task in targets if source is None else [source, *targets]:
        if task is not source:
            task.train = at_most(task.train, data.train_per_task, data.stream_seed)
        task.val = at_most(task.val, data.test_per_task, data.stream_seed + 1)
        task.test = at_most(task.test, data.test_per_task, data.stream_seed + 2)
    classes = list(get_info(data.dataset).classes)
    names = list(PROMPT_NAMES.get(data.dataset, classes))
    if len(names) != len(classes):
        raise ValueError(f"PROMPT_NAMES[{data.dataset!r}] has {len(names)} names for {len(classes)} classes.")
    return names, source, targets


# ---------------------------------------------------------------------------- the source model


def source_model(model_args: ModelArguments, class_names: list[str], source, training_args) -> CLIPClassifier:
    """The zero-shot classifier, pre-trained on the clean source domain when asked (cached by its settings)."""
    steps = model_args.pretrain_steps
    if steps is None:
        steps = 200 if model_args.model in OFFLINE_PRESETS else 0
    kwargs = dict(adaptation=model_args.adaptation, unsupervised_loss=model_args.unsupervised_loss,
                  confidence_margin=model_args.confidence_margin)
    if steps > 0 and source is None:
        raise ValueError(
            f"--pretrain_steps {steps}: this data set's stream has no clean source domain to pre-train on; "
            "use --pretrain_steps 0 (CLIP starts zero-shot)."
        )
    if steps == 0:
        return build_classifier(model_args.model, class_names, model_args.templates, model_args.local_files_only,
                                seed=training_args.seed, **kwargs)
    key = {"model": model_args.model, "classes": class_names, "templates": model_args.templates, "steps": steps,
           "lr": model_args.pretrain_lr, "batch": model_args.pretrain_batch_size, "seed": training_args.seed,
           "source_size": len(source.train), "v": 2}
    cache_root = model_args.source_cache("clip_online")

    def make() -> CLIPClassifier:
        model = build_classifier(model_args.model, class_names, model_args.templates, model_args.local_files_only,
                                 seed=training_args.seed)
        pretrain(model, source.train, steps, model_args.pretrain_lr, model_args.pretrain_batch_size, training_args)
        return model

    model = cached_model(key, cache_root, make, CLIPClassifier.from_pretrained)
    for name, value in kwargs.items():
        setattr(model.config, name, value)
    return model


def pretrain(model: CLIPClassifier, train, steps: int, lr: float, batch: int, training_args) -> None:
    """Supervised training on the source domain with a plain loop (seconds for the tiny CLIP)."""
    model.set_adaptation("supervised")
    supervised_pretrain(model, train, steps, lr, batch, training_args)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, build, run the stream, print the table; returns the results dict (also in results.json)."""
    parsed = parse(argv)
    model_args, data_args, run_args, mpopt_args, training_args = parsed
    started = time.perf_counter()
    torch.manual_seed(training_args.seed)
    class_names, source, targets = load_stream(data_args)
    model = source_model(model_args, class_names, source, training_args).to(training_args.device)
    budget, unconstrained = resolve_budget(model, targets[0].train, run_args, mpopt_args, training_args)
    print(
        f"clip_cls_online: model={model_args.model} dataset={data_args.dataset} baseline={run_args.baseline} "
        f"adaptation={model_args.adaptation} | effective batch {training_args.per_device_train_batch_size} x "
        f"{training_args.max_steps} steps/task | budget {budget:.2f} MiB"
        + (f" (unconstrained step predicted at {unconstrained:.2f} MiB)" if unconstrained else "")
    )
    arguments = {"model": asdict(model_args), "data": asdict(data_args), "run": asdict(run_args)}
    return run_and_report(model, targets, run_args, mpopt_args, training_args, budget=budget,
                          unconstrained=unconstrained, started=started, arguments=arguments,
                          provenance=parsed.provenance, train_with_labels=model_args.adaptation == "supervised")
