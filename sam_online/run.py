"""The online SAM segmentation run behind ``recipes/sam_seg_online.py``.

Offline default (no arguments): a tiny SAM (2 vision layers, width 64, 64 px input, about 0.18 M parameters),
pre-trained for seconds on clean generated shapes (``sam_online.shapes``; cached), then retrained over a stream of
corrupted versions of them under a memory budget the unconstrained configuration exceeds, the engine choosing the
memory knobs by the gain of the model's own loss on the task's val split. Every task is scored by mIoU of the
box-prompted masks (``sam_online.metrics``). The real job: ``--model facebook/sam-vit-base --data_dir DIR`` (a folder
of images and masks, ``sam_online.folder``); ``--random_init true`` builds SAM ViT-B's architecture without its
weights, for memory and step-time tables (its mIoU means nothing; the card says so).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mpopt_hf.config import check_bool, check_int
from online_recipe import check_model_path, QUIET_TRAINER_FLAGS, cached_model, parse_args, resolve_budget, run_and_report
from online_recipe.arguments import HubModelArguments, recipe_classes

from .data import DataArguments, load_stream
from .metrics import evaluate_fn, miou_on
from .modeling import RANDOM_INIT_CONFIGS, SAM_VIT_B, TINY, SamForBoxSegmentation, build_model, load_cached

TINY_IMAGE_SIZE = 64
TINY_PRETRAIN_STEPS = 400
PRETRAIN_WARMUP_STEPS = 50  # a SAM trained from scratch without warm-up sits at "no mask anywhere" for long
METRIC = "mIoU"
PIPELINE_TAG = "mask-generation"  # the hub's task for SAM
# gain metrics that score classification logits: SAM's are mask logits, so only its own loss measures a gain
LOGIT_GAIN_METRICS = ("val_accuracy", "entropy", "confidence")
DEFAULT_TRAINING_FLAGS = [
    "--output_dir", "outputs/sam_seg_online",
    "--per_device_train_batch_size", "32",
    "--per_device_eval_batch_size", "64",
    "--max_steps", "60",
    "--learning_rate", "1e-3",
    *QUIET_TRAINER_FLAGS,
    # the engine's space, small so that the offline default predicts it in seconds (2 layers: 0 or 2 checkpointed)
    "--micro_batch_sizes", "32", "16", "8",
    "--freeze_rates", "0", "0.5",
    "--checkpoint_segments", "0", "2",
    "--trial_steps", "2",
    "--gain_metric", "loss",
    # 0.9 of the whole batch's predicted peak: binding, and with room for a race's two host copies of weights and
    # optimizer state (2 MiB each, a large share of a tiny model's peak: at 0.6-0.8 the engine cannot race)
    "--budget_fraction", "0.9",
]
# reproduce/sam_seg_online.py --quick: the tiny SAM at 32 px over 2 short tasks, small enough for CI (about 20 s of one
# core; 20 pre-training steps are all warm-up: its mIoU is near 0)
QUICK_FLAGS = [
    "--output_dir", "outputs/sam_seg_online_quick",
    "--image_size", "32", "--corruptions", "fog", "contrast",
    "--train_per_task", "32", "--test_per_task", "16", "--source_size", "32", "--pretrain_steps", "20",
    "--per_device_train_batch_size", "16", "--max_steps", "4",
    "--micro_batch_sizes", "16", "8", "--freeze_rates", "0", "0.5", "--checkpoint_segments", "0", "--trial_steps", "1",
]
LIMITATIONS = (
    "The offline default (a tiny randomly initialised SAM pre-trained for seconds on shapes drawn over scikit-image's "
    "sample photographs, then corrupted) exists so that the recipe runs anywhere without a download; its mIoU is not "
    "comparable to published SAM numbers. With --random_init the weights are random: the memory and step-time "
    "columns are SAM ViT-B's, the mIoU means nothing. mIoU is the mean over objects of the IoU of the box-prompted "
    "mask (logits > 0 at the label's resolution). Seconds depend on the machine, and so may the configurations the "
    "engine chooses, since it weighs gain per second; peaks measured on a CPU come from mpopt_hf's tracker, not from "
    "a device allocator. `--check` compares every column but the seconds."
)


@dataclass
class ModelArguments(HubModelArguments):
    model: str = field(default=TINY, metadata={"help": f"A SAM hub id or folder (e.g. {SAM_VIT_B}), or '{TINY}' "
                                               "(built offline)."})
    random_init: bool = field(
        default=False,
        metadata={"help": f"Build --model's architecture from its public config values, without weights "
                  f"({sorted(RANDOM_INIT_CONFIGS)}; no download): memory and step times are the real model's, the "
                  "mIoU means nothing."},
    )
    image_size: int | None = field(
        default=None, metadata={"help": f"'{TINY}' only: its input side in pixels (>= 16, a multiple of 8), that of "
                                f"the data too. None: {TINY_IMAGE_SIZE}. A checkpoint brings its own (1024)."}
    )
    pretrain_steps: int | None = field(
        default=None, metadata={"help": f"Steps on the clean source domain. None: {TINY_PRETRAIN_STEPS} for '{TINY}', "
                                "0 else."}
    )
    pretrain_lr: float = field(default=5e-3, metadata={"help": "Learning rate of the source pre-training."})
    pretrain_batch_size: int = field(default=32, metadata={"help": "Batch of the source pre-training."})
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where pre-trained source models are cached. None: ~/.cache/mpopt_hf/sam_online."},
    )

    def __post_init__(self) -> None:
        where = "ModelArguments."
        self.check_model("model (--model)", f"a SAM hub id (org/name), a local folder or {TINY!r}")
        check_bool(where + "random_init (--random_init)", self.random_init)
        self.image_size = check_int(where + "image_size (--image_size)", self.image_size,
                                    lambda v: v >= 16 and v % 8 == 0, "an int >= 16, a multiple of 8 (the tiny "
                                    "SAM's patch), or None", optional=True)
        if self.image_size is not None and self.model != TINY:
            raise ValueError(f"ModelArguments.image_size {self.image_size} with --model {self.model}: a checkpoint's "
                             f"input side is its config's (1024 for {SAM_VIT_B}); --image_size is for --model {TINY}.")
        self.check_pretraining(TINY_PRETRAIN_STEPS if self.model == TINY else 0, steps_flag=True)
        if self.random_init:
            if self.model == TINY:
                raise ValueError(f"ModelArguments.random_init True with --model {TINY}: the tiny SAM is always built "
                                 f"from its config; --random_init is for a checkpoint's architecture (--model "
                                 f"{SAM_VIT_B} --random_init true).")
            if self.model not in RANDOM_INIT_CONFIGS:
                raise ValueError(f"ModelArguments.random_init True with --model {self.model!r}: the architectures "
                                 f"written in the code are {sorted(RANDOM_INIT_CONFIGS)}.")
            if self.pretrain_steps > 0:
                raise ValueError(f"ModelArguments.pretrain_steps {self.pretrain_steps} with --random_init true: "
                                 "random weights are for memory and step-time tables, whose mIoU is not measured; "
                                 "use --pretrain_steps 0.")
        elif self.model != TINY:
            self._check_model_path()

    def _check_model_path(self) -> None:
        """A local path must exist (a folder with config.json); only a well-formed hub id goes on."""
        expected = (f"a folder with config.json and weights of a SamModel, a hub id such as {SAM_VIT_B} (it needs "
                    f"the hub, or a copy already in the local Hugging Face cache; --local_files_only false lets it "
                    f"download), or {TINY!r} (built offline)")
        check_model_path(self.model, expected, "ModelArguments.model")

    @property
    def tiny_image_size(self) -> int:
        return TINY_IMAGE_SIZE if self.image_size is None else self.image_size


def parse(argv: list[str] | None = None):
    """(model, data, run, mpopt, training) arguments (a `ParsedArgs`: its ``provenance`` goes to run_and_report);
    the recipe's defaults go first so any flag overrides them."""
    parsed = parse_args(recipe_classes(ModelArguments, DataArguments), DEFAULT_TRAINING_FLAGS, argv)
    mpopt_args = parsed[3]
    if mpopt_args.gain_metric in LOGIT_GAIN_METRICS:
        raise ValueError(f"MPOptArguments.gain_metric (--gain_metric) {mpopt_args.gain_metric!r} scores "
                         "classification logits, but SAM's are mask logits; use 'loss' (the negative of its own mask "
                         "loss on the task's val split, the default) or 'auto' (which means 'loss' here).")
    return parsed


# ---------------------------------------------------------------------------- the source model


def source_model(model_args: ModelArguments, data_args: DataArguments, source, training_args) -> SamForBoxSegmentation:
    """The SAM before retraining, pre-trained on the clean source for ``pretrain_steps`` (cached by what it
    depends on)."""
    steps, seed = model_args.pretrain_steps, training_args.seed

    def build() -> SamForBoxSegmentation:
        return build_model(model_args.model, random_init=model_args.random_init,
                           local_files_only=model_args.local_files_only, image_size=model_args.tiny_image_size,
                           seed=seed)

    if steps == 0:
        return build()
    key = {"model": model_args.model, "image_size": model_args.tiny_image_size if model_args.model == TINY else None,
           "data_dir": None if data_args.data_dir is None else str(Path(data_args.data_dir).expanduser().resolve()),
           "max_objects": data_args.max_objects, "stream_seed": data_args.stream_seed, "steps": steps,
           "lr": model_args.pretrain_lr, "batch": model_args.pretrain_batch_size, "seed": seed,
           "source_size": len(source.train), "warmup": PRETRAIN_WARMUP_STEPS, "v": 1}
    cache_root = model_args.source_cache("sam_online")

    def make() -> SamForBoxSegmentation:
        model = build()
        pretrain(model, source.train, steps, model_args.pretrain_lr, model_args.pretrain_batch_size, training_args)
        return model

    return cached_model(key, cache_root, make, load_cached).eval()


def pretrain(model: SamForBoxSegmentation, train, steps: int, lr: float, batch: int, training_args) -> None:
    """Source pre-training with a plain loop: random batches, AdamW, a linear warm-up over the first
    `PRETRAIN_WARMUP_STEPS` steps and gradients clipped to norm 1 (``online_recipe.supervised_pretrain`` has
    neither, and from scratch SAM needs both: without them 300 steps reach mIoU 0.47 at lr 3e-3 and stay at 0 at
    lr 1e-2, with them 0.55 at lr 5e-3)."""
    device = training_args.device
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / PRETRAIN_WARMUP_STEPS))
    generator = torch.Generator().manual_seed(training_args.seed)
    columns = {k: v.to(device) for k, v in train.with_format("torch")[:].items()}
    for _ in range(steps):
        pick = torch.randint(len(train), (batch,), generator=generator).to(device)
        model(**{k: v[pick] for k, v in columns.items()}).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def input_size(model_args: ModelArguments, model_name: str) -> int:
    """The images' side: the tiny SAM's flag, else the checkpoint's config (read without its weights)."""
    if model_name == TINY:
        return model_args.tiny_image_size
    if model_args.random_init:
        return RANDOM_INIT_CONFIGS[model_name]().vision_config.image_size
    from transformers import SamConfig

    try:
        config = SamConfig.from_pretrained(model_name, local_files_only=model_args.local_files_only)
        return config.vision_config.image_size
    except (OSError, ValueError):
        build_model(model_name, local_files_only=model_args.local_files_only)  # raises, saying how to get the model
        raise


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, build (pre-train or load) the SAM, run the stream, print the table; returns the results dict
    (also in results.json)."""
    parsed = parse(argv)
    model_args, data_args, run_args, mpopt_args, training_args = parsed
    started = time.perf_counter()
    torch.manual_seed(training_args.seed)
    side = input_size(model_args, model_args.model)
    source, targets = load_stream(data_args, side, with_source=model_args.pretrain_steps > 0)
    model = source_model(model_args, data_args, source, training_args).to(training_args.device)
    score = evaluate_fn(training_args.per_device_eval_batch_size)
    source_miou = None if source is None else miou_on(model, source.test, training_args.per_device_eval_batch_size)
    budget, unconstrained = resolve_budget(model, targets[0].train, run_args, mpopt_args, training_args)
    vision = model.config.vision_config
    print(
        f"sam_seg_online: model={model_args.model}" + (" (random weights)" if model_args.random_init else "")
        + f", {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, vision encoder "
        f"{vision.num_hidden_layers} layers x {vision.hidden_size} wide, {side} px input | data={data_args.name}, "
        f"{len(targets)} tasks: {', '.join(t.name for t in targets)} | baseline={run_args.baseline} | effective batch "
        f"{training_args.per_device_train_batch_size} x {training_args.max_steps} steps/task, lr "
        f"{training_args.learning_rate:g} | budget {budget:.2f} MiB"
        + (f" (unconstrained step predicted at {unconstrained:.2f} MiB)" if unconstrained else "")
    )
    if source is not None:
        print(f"source {source.name}: {model_args.pretrain_steps} pre-training steps, test {METRIC} {source_miou:.3f}")
    if model_args.random_init:
        print(f"random weights: the memory and step-time columns are the architecture's; the {METRIC} means nothing")
    arguments = {"model": asdict(model_args), "data": {**asdict(data_args), "dataset": data_args.name},
                 "run": asdict(run_args)}
    return run_and_report(model, targets, run_args, mpopt_args, training_args, budget=budget,
                          unconstrained=unconstrained, started=started, arguments=arguments,
                          provenance=parsed.provenance, evaluate_fn=score, metric_name=METRIC, higher_is_better=True,
                          pipeline_tag=PIPELINE_TAG, limitations=LIMITATIONS,
                          extra_summary={"source_miou": source_miou, "random_weights": model_args.random_init})
