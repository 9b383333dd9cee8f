"""The pieces every online-retraining recipe runs the same way (moved here from ``clip_online.run``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mpopt_hf.config import InvalidTypeError, check_bool, check_choice, check_number

# Trainer flags of every recipe: a constant learning rate, no weight decay, no checkpoints, logs or progress bars
# of its own (the online loop prints a table per stream), data loaded in the main process
QUIET_TRAINER_FLAGS = [
    "--lr_scheduler_type", "constant",
    "--weight_decay", "0.0",
    "--report_to", "none",
    "--save_strategy", "no",
    "--logging_strategy", "no",
    "--disable_tqdm", "true",
    "--dataloader_num_workers", "0",
]
# the engine's search space, kept small so an offline default predicts it in seconds
SMALL_SPACE_FLAGS = [
    "--micro_batch_sizes", "64", "32", "16",
    "--freeze_rates", "0", "0.5",
    "--checkpoint_segments", "0", "2",
]


@dataclass
class RunArguments:
    baseline: str = field(
        default="mpopt",
        metadata={"help": "mpopt, none (source model, no adaptation), fixed, auto_find_batch_size, full_checkpointing."},
    )
    budget_fraction: float = field(
        default=0.5,
        metadata={"help": "Without --memory_budget_mib: the budget is this share of the unconstrained step's predicted peak."},
    )
    measure_peak: bool = field(
        default=True, metadata={"help": "On CPU, measure each configuration's peak (MemTracker and profiler events)."}
    )
    fixed_config: str | None = field(
        default=None,
        metadata={"help": "The 'fixed' baseline's configuration, e.g. mb32/f0.5/ckpt0/fp32. None: the whole batch, no knobs."},
    )
    seconds_per_task: float | None = field(
        default=None,
        metadata={"help": "Wall-clock seconds of retraining per task (evaluations and search included); with a large "
                  "--max_steps it makes every baseline train for equal time. None: --max_steps steps per task."},
    )
    budget_trace: str | None = field(
        default=None,
        metadata={"help": "A budget that moves while the stream runs, as a co-located process would make it: points "
                  "'where:share' separated by commas, where = the share of the stream's steps (0..1) from which the "
                  "budget is share x the budget, e.g. '0:1,0.4:0.5,0.7:1' (half the memory from 40 %% of the stream "
                  "to 70 %%). 'none' or None: a fixed budget. Needs --max_steps (steps per task)."},
    )

    def __post_init__(self) -> None:
        from mpopt_hf.config import MemoryConfig
        from mpopt_hf.online import BASELINES

        where = "RunArguments."
        check_choice(where + "baseline", self.baseline, BASELINES)
        self.budget_fraction = check_number(where + "budget_fraction", self.budget_fraction, lambda v: 0 < v <= 1,
                                            "in (0, 1]")
        check_bool(where + "measure_peak", self.measure_peak)
        if self.fixed_config is not None:
            if not isinstance(self.fixed_config, str):
                raise InvalidTypeError(f"RunArguments.fixed_config must be a str such as 'mb32/f0.5/ckpt0/fp32' or "
                                       f"None, got {self.fixed_config!r} ({type(self.fixed_config).__name__}).")
            try:
                MemoryConfig.parse(self.fixed_config)  # a malformed flag fails here, naming what is expected
            except ValueError as err:
                raise type(err)(f"RunArguments.fixed_config: {err}") from None
            if self.baseline != "fixed":
                raise ValueError(f"RunArguments.fixed_config {self.fixed_config!r} is only used by --baseline fixed, "
                                 f"got --baseline {self.baseline!r}; drop fixed_config or use --baseline fixed.")
        self.seconds_per_task = check_number(where + "seconds_per_task", self.seconds_per_task, lambda v: v > 0,
                                             "> 0 (a finite number of seconds) or None", optional=True)
        if self.budget_trace is not None and self.budget_trace.strip().lower() == "none":
            self.budget_trace = None
        if self.budget_trace is not None:
            trace_shares(self.budget_trace)  # a malformed trace fails here, naming the field


# ---------------------------------------------------------------------------- the model flag

# a Hugging Face hub id: ``name`` or ``org/name`` (letters, digits, '-', '_', '.'; no leading '.' or '-', no '..')
HUB_ID = re.compile(r"(?!.*\.\.)(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)?[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_model_path(model: str, expected: str, where: str = "ModelArguments.model") -> None:
    """A local path must be a folder with config.json; anything else must at least look like a hub id (which then
    goes to the cache or the hub). ``expected`` says, in the error, what a valid value is."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{where} {model!r} is a folder without config.json; expected {expected}.")
    elif os.path.exists(path):
        raise ValueError(f"{where} {model!r} is a file, not a folder; expected {expected}.")
    elif not HUB_ID.fullmatch(model):
        raise ValueError(f"{where} {model!r}: the local path {os.path.abspath(path)} does not exist (and it is no hub "
                         f"id). Expected {expected}.")


# ---------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Provenance:
    """What a run was launched as: the recipe module that parsed (``ModelArguments``' module) and the argv it
    parsed. The model card's command that reproduces the run is made from it."""

    module: str | None
    argv: tuple[str, ...]

    def record(self) -> dict[str, str | None]:
        """``{"recipe", "command"}`` for the run's summary (`online_recipe.model_card.provenance`)."""
        from .model_card import provenance

        return provenance(self.module, list(self.argv))


class ParsedArgs(tuple):
    """The parsed dataclasses, in the order of the classes (unpack it as a tuple), and the run's ``provenance``,
    which the recipe hands to :func:`run_and_report`."""

    provenance: Provenance

    def __new__(cls, parsed: Sequence[Any], provenance: Provenance) -> ParsedArgs:  # noqa: PYI034
        self = super().__new__(cls, parsed)
        self.provenance = provenance
        return self


def parse_args(classes: Sequence[type], default_flags: Sequence[str], argv: list[str] | None = None,
               module: str | None = None) -> ParsedArgs:
    """``classes`` (dataclasses, e.g. ... MPOptArguments, TrainingArguments) parsed from ``argv``, with the run's
    `Provenance`: the recipe ``module`` (default: that of ``classes[0]``) and ``argv``.

    The recipe's ``default_flags`` go first so any flag overrides them (plus ``--use_cpu true`` without CUDA);
    a single ``*.json`` argument is read as a JSON file of the flags instead."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    provenance = Provenance(module or (classes[0].__module__ if classes else None), tuple(argv))
    if len(argv) == 1 and argv[0].endswith(".json"):
        if not os.path.isfile(argv[0]):
            raise ValueError(f"The arguments file {argv[0]!r} does not exist (a single *.json argument is read as "
                             "a JSON file of the recipe's flags).")
        return ParsedArgs(HfArgumentParser(tuple(classes)).parse_json_file(argv[0]), provenance)
    flags = list(default_flags) + ([] if torch.cuda.is_available() else ["--use_cpu", "true"])
    return ParsedArgs(HfArgumentParser(tuple(classes)).parse_args_into_dataclasses(args=flags + argv), provenance)


def given_flags(argv: list[str] | None = None) -> set[str]:
    """The field names a user set: ``--name`` / ``--name=value`` flags of ``argv``, or the keys of its JSON file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json") and os.path.isfile(argv[0]):
        with open(argv[0], encoding="utf-8") as handle:
            return set(json.load(handle))
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2}


# ---------------------------------------------------------------------------- data and budget


def at_most(dataset, n: int, seed: int):
    """``dataset`` cut to a random ``n`` rows (order kept) when it has more."""
    if len(dataset) <= n:
        return dataset
    return dataset.select(np.sort(np.random.default_rng(seed).choice(len(dataset), n, replace=False)))


def default_budget_mib(model, train, training_args, fraction: float) -> tuple[float, float]:
    """(budget, unconstrained peak): ``fraction`` of the predicted peak of the whole batch with no knob."""
    from mpopt_hf.config import MemoryConfig
    from mpopt_hf.profiler import predict_step

    data = train.with_format("torch")[: training_args.per_device_train_batch_size]
    batch = {k: v.to(training_args.device) for k, v in data.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=training_args.learning_rate)
    full = predict_step(model, batch, MemoryConfig(micro_batch_size=len(batch["labels"])), optimizer).peak_mib
    return round(full * fraction, 2), full


def resolve_budget(model, train, run_args: RunArguments, mpopt_args, training_args) -> tuple[float, float | None]:
    """(budget, unconstrained peak or None): ``--memory_budget_mib``, else the default share of the predicted peak;
    the budget is written back into ``mpopt_args``."""
    budget, unconstrained = mpopt_args.memory_budget_mib, None
    if budget is None:
        budget, unconstrained = default_budget_mib(model, train, training_args, run_args.budget_fraction)
    mpopt_args.memory_budget_mib = budget
    return budget, unconstrained


# ---------------------------------------------------------------------------- the source model


def supervised_pretrain(model, train, steps: int, lr: float, batch: int, training_args) -> None:
    """Supervised training on the source domain with a plain loop: random batches, AdamW, no schedule. Every
    column of ``train`` (e.g. ``pixel_values`` and ``labels``, or ``input_ids``, ``attention_mask`` and ``labels``)
    goes to the model, whose ``loss`` output is minimised."""
    device = training_args.device
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(training_args.seed)
    columns = {k: v.to(device) for k, v in train.with_format("torch")[:].items()}
    for _ in range(steps):
        pick = torch.randint(len(train), (batch,), generator=generator).to(device)
        loss = model(**{k: v[pick] for k, v in columns.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def cached_model(key: dict[str, Any], cache_root: str | Path, make: Callable[[], Any], load: Callable[[Path], Any]):
    """The model cached under ``key`` (a JSON-able dict of everything it depends on), else ``make()``'s, then cached.

    Written to a temporary folder and renamed: a crash never leaves a half-written checkpoint under the key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cache_root = Path(cache_root)
    path = cache_root / f"source-{digest}"
    if (path / "config.json").exists():
        return load(path)
    model = make()
    tmp = cache_root / f".tmp-{digest}-{os.getpid()}"
    model.save_pretrained(tmp)
    if path.exists():  # another run cached the same source meanwhile
        shutil.rmtree(tmp)
    else:
        tmp.replace(path)
    return model


# ---------------------------------------------------------------------------- the run


def trace_shares(text: str) -> list[tuple[float, float]]:
    """``'0:1,0.4:0.5,0.7:1'`` as (share of the stream's steps, share of the budget) points."""
    from mpopt_hf.budget import BudgetTrace

    try:
        trace = BudgetTrace.parse(text)
    except ValueError as err:
        raise ValueError(f"RunArguments.budget_trace: {err}") from None
    bad = [f"{p.at:g}:{p.mib:g}" for p in trace.points if p.at > 1]
    if bad:
        raise ValueError(f"RunArguments.budget_trace {text!r}: {bad} lie past the stream's end; 'where' is a share of "
                         "the stream's steps in [0, 1].")
    return [(p.at, p.mib) for p in trace.points]


def stream_budget_trace(text: str | None, budget_mib: float, n_tasks: int, training_args):
    """The `BudgetTrace` over the stream's steps that ``--budget_trace`` describes (None without one)."""
    if text is None:
        return None
    from mpopt_hf.budget import BudgetPoint, BudgetTrace

    steps = training_args.max_steps
    if steps is None or steps <= 0 or steps >= 10**5:
        raise ValueError(f"RunArguments.budget_trace needs --max_steps steps per task to place its points (got "
                         f"max_steps={steps}); drop --seconds_per_task or --budget_trace.")
    total = steps * n_tasks
    return BudgetTrace([BudgetPoint(round(at * total), share * budget_mib) for at, share in trace_shares(text)])


def run_and_report(model, targets: Sequence, run_args: RunArguments, mpopt_args, training_args, *, budget: float,
                   unconstrained: float | None, started: float, arguments: dict[str, Any],
                   provenance: Provenance, train_with_labels: bool = True,
                   extra_summary: dict[str, Any] | None = None, evaluate_fn: Callable[[Any, Any], float] | None = None,
                   metric_name: str = "accuracy", higher_is_better: bool = True,
                   pipeline_tag: str = "image-classification", limitations: str | None = None,
                   data_collator: Any = None) -> dict[str, Any]:
    """Retrain ``model`` over ``targets`` with `OnlineRetrainer`, write results.json/.csv/.png and the model card
    (README.md), print the table.

    ``provenance`` is what `parse_args` returned with the arguments (``parsed.provenance``): the card's command.
    ``evaluate_fn``/``metric_name``/``higher_is_better`` score the tasks (default: accuracy); ``pipeline_tag`` and
    ``limitations`` are the card's (default: the image recipes'). Returns the results dict; its summary adds
    ``run_seconds`` (since ``started``), the unconstrained predicted peak, the recipe's ``arguments`` (with the
    retraining figures under ``"training"``), ``extra_summary``, and for the card the recipe script, the command
    line that reproduces the run, the environment, the pipeline tag and the limitations."""
    from mpopt_hf.config import MemoryConfig
    from mpopt_hf.online import OnlineRetrainer
    from mpopt_hf.report import format_table, summary_scores, write_results

    from . import model_card

    if not isinstance(provenance, Provenance):
        raise InvalidTypeError(f"run_and_report: provenance must be the Provenance that parse_args returned "
                               f"(parsed.provenance), got {type(provenance).__name__}.")
    retrainer = OnlineRetrainer(
        model, training_args, baseline=run_args.baseline, mpopt_args=mpopt_args, budget_mib=budget,
        measure_peak=run_args.measure_peak, train_with_labels=train_with_labels,
        memory_config=None if run_args.fixed_config is None else MemoryConfig.parse(run_args.fixed_config),
        seconds_per_task=run_args.seconds_per_task, evaluate_fn=evaluate_fn, metric_name=metric_name,
        higher_is_better=higher_is_better, data_collator=data_collator,
        budget_trace=stream_budget_trace(run_args.budget_trace, budget, len(targets), training_args),
    )
    result = retrainer.run(targets, output_dir=training_args.output_dir)
    summary = result.summary
    summary["run_seconds"] = time.perf_counter() - started
    summary["unconstrained_predicted_peak_mib"] = unconstrained
    summary["arguments"] = {**arguments, "training": model_card.training_facts(training_args)}
    summary.update(extra_summary or {})
    summary.update(provenance.record())
    summary["environment"] = model_card.environment(training_args.device)
    if pipeline_tag != model_card.DEFAULT_PIPELINE_TAG:
        summary["pipeline_tag"] = pipeline_tag
    if limitations is not None:
        summary["limitations"] = limitations
    paths = write_results(result.to_dict(), training_args.output_dir)
    paths["card"] = str(model_card.write_card(result, Path(training_args.output_dir) / model_card.CARD_NAME))
    print(format_table([asdict(t) for t in result.tasks]))
    scores = summary_scores(summary)
    direction = "" if scores.metric == "accuracy" else f" ({scores.direction})"
    print(
        f"mean {scores.metric} {scores.before:.3f} -> {scores.after:.3f}{direction}; "
        f"within budget: {summary['within_budget']}; {summary['run_seconds']:.0f} s\n"
        f"results: {paths['json']}\nplot:    {paths['png']}\ncard:    {paths['card']}"
    )
    return result.to_dict()
