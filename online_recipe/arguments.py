"""Bases of the recipes' argument dataclasses: the fields they share and the checks of the fields they all have.

A dataclass lists inherited fields first, and a recipe's ``--help`` (like its ``results.json``) lists the fields in
that order, so a base holds only what every recipe that uses it has at its *start*: ``model`` (which each recipe
declares again, with its own default and help: a field declared again keeps its place), then ``local_files_only``;
for the corrupted-image streams, ``dataset`` to ``severity``. The source pre-training fields (``pretrain_steps``,
``pretrain_lr``, ``pretrain_batch_size``, ``cache_dir``) come *last* in every recipe, after its own, with defaults and
help of its own, so each recipe declares them; what they share is their checks and their cache folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mpopt_hf.config import check_bool, check_int, check_number, check_str

# the image streams of the CLIP and ViT recipes: vision registry names (each has a vision.streams builder of that
# name) and the corruptions, one task each, in stream order
IMAGE_DATASETS = ("digits", "cifar10-c")
DEFAULT_CORRUPTIONS = ("fog", "contrast", "glass_blur", "frost", "motion_blur")


@dataclass
class SourceModelArguments:
    """Every recipe's ``ModelArguments``: the model, and a source model pre-trained before the stream."""

    model: str  # declared again by each recipe, with its default and help

    def check_pretraining(self, default_steps: int | None = None, *, steps_flag: bool = False, optional: bool = True,
                          batch_allowed: str = "an int >= 1") -> None:
        """Check the pre-training fields (the recipe declares them); ``pretrain_steps`` None becomes ``default_steps``
        where one is given. ``steps_flag``: its errors name the flag too; ``optional``: None is allowed."""
        where = "ModelArguments."
        label = "pretrain_steps (--pretrain_steps)" if steps_flag else "pretrain_steps"
        allowed = "an int >= 0 (0 = no pre-training)" + (" or None" if optional else "")
        self.pretrain_steps = check_int(where + label, self.pretrain_steps, lambda v: v >= 0, allowed,
                                        optional=optional)
        if self.pretrain_steps is None and default_steps is not None:
            self.pretrain_steps = default_steps
        self.pretrain_lr = check_number(where + "pretrain_lr", self.pretrain_lr, lambda v: v > 0, "a finite number > 0")
        self.pretrain_batch_size = check_int(where + "pretrain_batch_size", self.pretrain_batch_size,
                                             lambda v: v >= 1, batch_allowed)
        check_str(where + "cache_dir", self.cache_dir, "a folder path or None", optional=True)

    def source_cache(self, recipe: str) -> Path:
        """Where pre-trained source models are cached: ``--cache_dir``, else ``~/.cache/mpopt_hf/<recipe>``."""
        return Path(self.cache_dir or Path.home() / ".cache" / "mpopt_hf" / recipe)


@dataclass
class HubModelArguments(SourceModelArguments):
    """A ``ModelArguments`` whose model may be a hub id: it never downloads unless told."""

    local_files_only: bool = field(default=True, metadata={"help": "Never download; False lets a hub id download."})

    def check_model(self, model_label: str, allowed: str) -> None:
        """``model`` is a str (``allowed`` says which) and ``local_files_only`` a bool."""
        check_str("ModelArguments." + model_label, self.model, allowed)
        check_bool("ModelArguments.local_files_only", self.local_files_only)


CORRUPTION_TABLE_HELP = ("Severity table of the corruptions: published (CIFAR-10-C's rows, comparable with papers) or "
                         "monotone (every severity moves the image further; the table of runs before issue #15).")


@dataclass
class CorruptedImagesArguments:
    """A ``DataArguments`` of an image stream with one task per corruption: built-in digits or CIFAR-10-C."""

    dataset: str = field(default="digits", metadata={"help": f"One of {list(IMAGE_DATASETS)}."})
    data_dir: str | None = None  # declared again by each recipe, with its help
    corruptions: list[str] = field(default_factory=lambda: list(DEFAULT_CORRUPTIONS),
                                   metadata={"help": "The stream: one task per corruption, in this order."})
    severity: int = field(default=5, metadata={"help": "Corruption severity 1..5."})
    corruption_table: str = field(default="published", metadata={"help": CORRUPTION_TABLE_HELP})


def check_corruption_table(where: str, table: str, dataset: str | None = None) -> str:
    """``table`` if it names one of vision's severity tables; the released CIFAR-10-C was made with the published
    rows only, so another table cannot describe it."""
    from mpopt_hf.config import check_choice
    from vision.corruptions import TABLES

    check_choice(f"{where}corruption_table (--corruption_table)", table, list(TABLES))
    if dataset == "cifar10-c" and table != "published":
        raise ValueError(f"{where}corruption_table (--corruption_table) {table!r}: the released CIFAR-10-C was "
                         "rendered with the published rows; leave --corruption_table out for --dataset cifar10-c.")
    return table


def recipe_classes(*own: type) -> tuple[type, ...]:
    """A recipe's dataclasses, in the order `parse_args` returns them: its ``own`` (model, data, ...), then the
    run's, the engine's and Trainer's arguments."""
    from transformers import TrainingArguments

    from mpopt_hf.config import MPOptArguments

    from .common import RunArguments

    return (*own, RunArguments, MPOptArguments, TrainingArguments)
