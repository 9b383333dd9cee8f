"""Retraining over a stream of tasks: evaluate, retrain under a memory configuration, evaluate, record.

`OnlineRetrainer` knows nothing about data sets or models beyond ``nn.Module`` and
``datasets.Dataset``: a task is anything with ``name``, ``train`` and ``test``
(optionally ``val``, ``corruption``, ``severity``). The baselines share one loop,
so their records are comparable field for field:

* ``none``: the source model, never adapted (metric_after == metric_before);
* ``fixed``: one given `MemoryConfig` for the whole stream;
* ``full_checkpointing``: every block checkpointed, the whole batch at once, or under a budget the largest
  micro-batch (with accumulation) whose predicted peak fits;
* ``auto_find_batch_size``: transformers' own reaction to out-of-memory errors (halve the batch and retry;
  the effective batch shrinks with it). On a CPU, which never runs out of memory, a budget is enforced as a
  device of that size would: the batch is halved until its predicted peak fits;
* ``mpopt``: the rule engine (`MPOptCallback`) chooses online, one engine for the whole stream with its
  ``task_boundary()`` called between tasks; its cost model is the one ``MPOptArguments.cost_predictor``
  names (the profiler's fitted memory model by default). The baselines' budget checks predict peaks on
  fake tensors (`mpopt_hf.profiler.predict_step`).

A task is scored by classification accuracy unless ``evaluate_fn`` gives another metric (perplexity for a
language model: ``metric_name="perplexity", higher_is_better=False``). Every record names its metric and its
direction; ``metric_before``/``metric_after`` hold the values, and for accuracy ``accuracy_before``/
``accuracy_after`` hold them too (None for another metric), so results written before the hook read as they did.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import numbers
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..budget import BudgetTrace, is_dynamic
from ..config import (
    DEFAULT_SAFETY_MARGIN,
    MIB,
    InvalidTypeError,
    MemoryConfig,
    check_bool,
    check_int,
    check_number,
    check_str,
)
from ..cost import FakeTensorCostModel, plain_optimizer
from ..metrics import load_metric
from ..model.blocks import find_blocks
from ..space import fits
from ..training.oom import halve_until
from ..training.wall_clock import WallClockLimit
from .evaluation import accuracy_on
from .records import ACCURACY, OnlineResult, TaskRecord, summarise
from .timeline import StepLog, StreamSteps, task_decisions

logger = logging.getLogger(__name__)

BASELINES = ("mpopt", "none", "fixed", "auto_find_batch_size", "full_checkpointing")


# ---------------------------------------------------------------------------- the loop


class OnlineRetrainer:
    """Evaluate -> retrain -> evaluate over a stream of tasks, recording the metric, memory and time per task.

    ``args`` are the `TrainingArguments` of each task's retraining (``max_steps`` per task; its
    ``per_device_train_batch_size`` is the effective batch). ``budget_mib`` is what the peak is held to.
    ``evaluate_fn(model, dataset) -> float`` scores a task (on its test split, else val) instead of accuracy; then
    ``metric_name`` and ``higher_is_better`` say what it measures (e.g. ``"perplexity"``, False).
    """

    def __init__(
        self,
        model: nn.Module,
        args,
        *,
        baseline: str = "fixed",
        memory_config: MemoryConfig | None = None,
        mpopt_args: Any = None,
        budget_mib: float | None = None,
        measure_peak: bool = True,
        predict_peak: bool = True,
        train_with_labels: bool = True,
        label_column: str = "labels",
        eval_batch_size: int = 256,
        data_collator: Any = None,
        show_progress: bool = True,
        cost_model: Any = None,
        engine_eval_size: int = 128,
        show_trainer_logs: bool = False,
        seconds_per_task: float | None = None,
        evaluate_fn: Callable[[nn.Module, Any], float] | None = None,
        metric_name: str = ACCURACY,
        higher_is_better: bool = True,
        budget_trace: Any = None,
    ) -> None:
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {list(BASELINES)}, got {baseline!r}.")
        if baseline == "fixed" and memory_config is None:
            memory_config = MemoryConfig(micro_batch_size=args.per_device_train_batch_size)
        self.stream_steps = StreamSteps()
        self.timeline: list[dict[str, Any]] = []
        self.budget_trace = budget_trace
        if budget_trace is not None:  # replayed over the stream's steps: the same steps on every machine
            if not isinstance(budget_trace, BudgetTrace):
                raise InvalidTypeError(f"OnlineRetrainer.budget_trace must be a mpopt_hf.BudgetTrace (points in the "
                                       f"stream's steps) or None, got {type(budget_trace).__name__}.")
            budget_trace = self.budget_trace = budget_trace.replayed_on(self.stream_steps)
            budget_mib = budget_trace.points[0].mib if budget_mib is None else budget_mib
            if mpopt_args is not None:  # a copy: the caller's arguments are left as they were
                mpopt_args = dataclasses.replace(mpopt_args, memory_budget_mib=budget_trace, budget_every_steps=1)
        if budget_mib is None and mpopt_args is not None and not is_dynamic(mpopt_args.memory_budget_mib):
            budget_mib = getattr(mpopt_args, "memory_budget_mib", None)
        where = "OnlineRetrainer."
        positive = lambda v: v > 0  # noqa: E731
        budget_mib = check_number(where + "budget_mib", budget_mib, positive, "a number of MiB > 0 or None", optional=True)
        seconds_per_task = check_number(where + "seconds_per_task", seconds_per_task, positive,
                                        "a finite number of seconds > 0 or None", optional=True)
        eval_batch_size = check_int(where + "eval_batch_size", eval_batch_size, positive, "an int >= 1")
        engine_eval_size = check_int(where + "engine_eval_size", engine_eval_size, positive, "an int >= 1")
        label_column = check_str(where + "label_column", label_column, "a column name")
        for name, flag in (("measure_peak", measure_peak), ("predict_peak", predict_peak),
                           ("train_with_labels", train_with_labels), ("show_progress", show_progress),
                           ("show_trainer_logs", show_trainer_logs)):
            check_bool(where + name, flag)
        if evaluate_fn is not None and not callable(evaluate_fn):
            raise InvalidTypeError(f"{where}evaluate_fn must be a callable (model, dataset) -> float or None, got "
                                   f"{type(evaluate_fn).__name__}.")
        metric_name = check_str(where + "metric_name", metric_name, "the name of the metric, e.g. 'perplexity'")
        check_bool(where + "higher_is_better", higher_is_better)
        if evaluate_fn is None and (metric_name != ACCURACY or not higher_is_better):
            raise ValueError(f"{where}metric_name {metric_name!r} / higher_is_better {higher_is_better!r}: without "
                             f"evaluate_fn a task is scored by accuracy (higher is better); pass "
                             f"evaluate_fn=(model, dataset) -> float to score it by {metric_name!r}.")
        if memory_config is not None and not isinstance(memory_config, MemoryConfig):
            raise InvalidTypeError(f"{where}memory_config must be a MemoryConfig or None, got {type(memory_config).__name__}.")
        if baseline == "mpopt" and mpopt_args is None:
            raise ValueError("baseline='mpopt' needs mpopt_args=MPOptArguments(...) (the rule engine); use "
                             "baseline='fixed' with a memory_config otherwise.")
        self.model, self.args, self.baseline = model, args, baseline
        self.memory_config, self.mpopt_args, self.budget_mib = memory_config, mpopt_args, budget_mib
        self.measure_peak, self.predict_peak = measure_peak, predict_peak
        self.train_with_labels, self.label_column = train_with_labels, label_column
        self.eval_batch_size, self.data_collator, self.show_progress = eval_batch_size, data_collator, show_progress
        self.evaluate_fn, self.metric_name, self.higher_is_better = evaluate_fn, metric_name, higher_is_better
        self.accuracy_metric = load_metric("accuracy") if evaluate_fn is None else None
        self.uses_engine = baseline == "mpopt"
        self._callback = None
        self._measured: dict[MemoryConfig, Any] = {}
        self._fake_costs: FakeTensorCostModel | None = None
        self.cost_model = cost_model
        self.engine_eval_size = engine_eval_size
        self.show_trainer_logs = show_trainer_logs
        self.seconds_per_task = seconds_per_task
        self.margin = getattr(mpopt_args, "safety_margin", DEFAULT_SAFETY_MARGIN)

    # ------------------------------------------------------------------ public

    def run(self, tasks: Iterable, output_dir: str | Path | None = None, reference_errors: dict[str, float] | None = None
            ) -> OnlineResult:
        """Run the stream; with ``output_dir`` write results.json/.csv (after every task) and the plot (at the end)."""
        from ..report import write_results

        records: list[TaskRecord] = []
        tasks = list(tasks)
        if not tasks:
            raise ValueError("The stream has no tasks.")
        started = time.perf_counter()
        result = OnlineResult(tasks=records, summary={})
        bar = tqdm(tasks, desc=f"online [{self.baseline}]", unit="task", disable=not self.show_progress)
        for index, task in enumerate(bar):
            records.append(self.run_task(task))
            bar.set_postfix(task=records[-1].task, **{self.metric_name: f"{records[-1].metric_after:.3f}"})
            result.summary = summarise(records, self.baseline, self.budget_mib, len(tasks), time.perf_counter() - started,
                                       reference_errors)
            result.timeline = self.timeline
            if self.budget_trace is not None:  # each step against the budget that held at it
                result.summary.update(budget_trace=repr(self.budget_trace), **steps_within_budget(self.timeline))
            if output_dir is not None:
                result.paths = write_results(result.to_dict(), output_dir, plot=index == len(tasks) - 1)
        return result

    def run_task(self, task) -> TaskRecord:
        name = name_of(task)
        evaluation = getattr(task, "test", None) or getattr(task, "val", None)
        if evaluation is None:
            raise ValueError(f"Task {name!r} has neither a test nor a val split to evaluate on.")
        before = self.evaluate(evaluation, name)
        record = TaskRecord(task=name, budget_mib=self.budget_mib, corruption=getattr(task, "corruption", None),
                            severity=getattr(task, "severity", None), metric=self.metric_name,
                            higher_is_better=self.higher_is_better)
        record.set_scores(before=before, after=before)
        if self.baseline != "none":
            self._retrain(task, record)
            record.set_scores(after=self.evaluate(evaluation, name))
        return record

    def evaluate(self, dataset, task: str = "?") -> float:
        """The metric of the model on ``dataset``: ``evaluate_fn``'s, else accuracy."""
        if self.evaluate_fn is None:
            return accuracy_on(self.model, dataset, self.accuracy_metric, self.eval_batch_size, self.label_column)
        value = self.evaluate_fn(self.model, dataset)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise ValueError(f"OnlineRetrainer.evaluate_fn returned {value!r} ({type(value).__name__}) for "
                             f"{self.metric_name!r} on task {task!r}; it must return a number (not NaN).")
        return float(value)

    # ------------------------------------------------------------------ retraining

    def _train_set(self, task):
        train = task.train
        if not self.train_with_labels and self.label_column in train.column_names:
            train = train.remove_columns(self.label_column)  # unsupervised adaptation: labels never reach the model
        return train

    def _args(self, train):
        if self.baseline != "auto_find_batch_size":
            return self.args
        args = copy.copy(self.args)  # TrainingArguments has non-init fields: dataclasses.replace would refuse
        args.auto_find_batch_size = True
        if self.budget_mib is not None and args.device.type != "cuda":
            # no out-of-memory error on a CPU: halve as transformers would on a device with this budget
            args.per_device_train_batch_size = halve_until(
                lambda b: self._fits(train, MemoryConfig(micro_batch_size=b)), args.per_device_train_batch_size)
        return args

    def _fits(self, train, config: MemoryConfig) -> bool:
        """Predicted peak <= budget x (1 - safety margin), the engine's own feasibility rule.

        A batch of b samples costs what a micro-batch of b does (the same activations, weights, gradients
        and optimizer state; only the loaded batch tensor differs), so one cost model serves both."""
        return fits(self._default_cost_model(train).peak_mib(config) * MIB, self.budget_mib * MIB, self.margin)

    def _retrain(self, task, record: TaskRecord) -> None:
        from ..training.trainer import MPOptTrainer

        train = self._train_set(task)
        # the slot starts now: choosing a configuration (halving's predictions, the engine's cost-model fit and
        # first evaluation) is part of every method's time
        limit = WallClockLimit(self.seconds_per_task).start() if self.seconds_per_task is not None else None
        start = time.perf_counter()
        args = self._args(train)
        search = time.perf_counter() - start
        kwargs: dict[str, Any] = dict(model=self.model, args=args, train_dataset=train, data_collator=self.data_collator)
        if self.uses_engine:
            # The engine's gain metric needs evaluation data: the task's val split, else a slice of its train split.
            val = getattr(task, "val", None)
            if val is not None and not self.train_with_labels and self.label_column in val.column_names:
                val = val.remove_columns(self.label_column)
            kwargs["eval_dataset"] = val if val is not None else train.select(range(min(self.engine_eval_size, len(train))))
            if self._callback is None:
                kwargs["mpopt_args"] = self.mpopt_args  # the callback fits its cost model at the first step
                if self.cost_model is not None:
                    kwargs["cost_model"] = self.cost_model
            else:
                kwargs["callbacks"] = [self._callback]  # one engine for the whole stream: it keeps what it learned
        else:
            start = time.perf_counter()
            kwargs["memory_config"] = self._config_for(train, args)
            search += time.perf_counter() - start
        trainer = MPOptTrainer(**kwargs)
        if limit is not None:  # before the task boundary: the engine plans its search for the slot
            trainer.add_callback(limit)
        decided = len(self._callback.engine.decisions) if self.uses_engine and self._callback and self._callback.engine else 0
        if self.uses_engine:
            if self._callback is None:
                self._callback = trainer.mpopt_callback
            else:
                self._callback.task_boundary()  # bound to the new trainer by now: re-open the search on the new data
        if not self.show_trainer_logs:
            from transformers import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # the per-task table says it; keep the progress bar readable
        engine = (lambda: self._callback.engine) if self.uses_engine else None
        configs = StepLog(name_of(task), self.stream_steps, self.budget_trace or self.budget_mib, engine)
        trainer.add_callback(configs.callback(trainer))
        on_cuda = args.device.type == "cuda"
        if on_cuda:
            torch.cuda.synchronize(args.device)
            torch.cuda.reset_peak_memory_stats(args.device)
        predicted_before, evaluated_before = self._cost_seconds, self._engine_search_seconds
        start = time.perf_counter()
        output = trainer.train()
        record.seconds = time.perf_counter() - start
        record.steps = int(output.global_step)
        record.train_samples = len(train)
        record.configs = [c.to_dict() for c in configs.used]
        self.timeline.extend(configs.rows)
        budgets = [r["budget_mib"] for r in configs.rows if r["budget_mib"] is not None]
        record.budget_min_mib = min(budgets) if budgets else None
        if self.uses_engine:
            record.decisions = task_decisions(self._callback.engine.decisions[decided:])
        # search cost: choosing configurations (peak predictions) and, for the engine, its gain-metric evaluations
        record.search_seconds = (search + self._cost_seconds - predicted_before
                                 + self._engine_search_seconds - evaluated_before)
        if on_cuda:
            record.measured_peak_mib = torch.cuda.max_memory_allocated(args.device) / MIB
            record.measured_peak_source = "cuda_max_memory_allocated"
        elif self.measure_peak and configs.used:
            batch = self._first_batch(trainer)
            measured = [self._measure(trainer, batch, c) for c in configs.used]
            top = max(measured, key=lambda m: m.peak_bytes)
            record.measured_peak_mib, record.measured_peak_source = top.peak_mib, top.backend
        if self.predict_peak and configs.used:
            batch = self._first_batch(trainer)
            record.predicted_peak_mib = max(self._predict(trainer, batch, c) for c in configs.used)

    def _default_cost_model(self, train) -> FakeTensorCostModel:
        """Peak of each configuration predicted by a fake-tensor step (no compute), cached; its time is search cost."""
        if self._fake_costs is None:
            batch = self._collate(train, self.args.per_device_train_batch_size)
            self._fake_costs = FakeTensorCostModel(self.model, batch, lr=self.args.learning_rate)
        return self._fake_costs

    def _config_for(self, train, args) -> MemoryConfig:
        effective = args.per_device_train_batch_size
        if self.baseline == "fixed":
            return self.memory_config or MemoryConfig(micro_batch_size=effective)
        if self.baseline == "auto_find_batch_size":
            return MemoryConfig(micro_batch_size=effective)
        if self.baseline == "full_checkpointing":
            config = MemoryConfig(micro_batch_size=effective, checkpoint_segments=find_blocks(self.model).n_blocks)
            if self.budget_mib is None:
                return config
            return config.replace(micro_batch_size=halve_until(
                lambda b: self._fits(train, config.replace(micro_batch_size=b)), effective))
        raise RuntimeError(f"baseline {self.baseline!r} chooses its configurations through the engine.")

    def _collate(self, dataset, size: int) -> dict[str, Any]:
        from transformers import default_data_collator

        collator = self.data_collator or default_data_collator
        rows = dataset.with_format("torch").select(range(min(size, len(dataset))))
        device = next(self.model.parameters()).device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(list(rows)).items()}

    def _first_batch(self, trainer) -> dict[str, Any]:
        return self._collate(trainer.train_dataset, trainer.args.per_device_train_batch_size)

    def _measure(self, trainer, batch, config: MemoryConfig):
        """CPU: the peak of one real step, from torch's MemTracker and the profiler's allocation events
        (`mpopt_hf.profiler.measure`); a `Measurement`, cached per configuration."""
        if config not in self._measured:
            from ..profiler import measure

            self._measured[config] = measure(self.model, batch, config, plain_optimizer(trainer.optimizer), steps=1,
                                             warmup=0)
        return self._measured[config]

    def _predict(self, trainer, batch, config: MemoryConfig) -> float:
        engine_costs = self._engine_cost_model
        if engine_costs is not None:  # what the engine decided with
            return float(engine_costs.predict(config)[0]) / MIB
        if self._fake_costs is None:
            self._fake_costs = FakeTensorCostModel(self.model, batch, plain_optimizer(trainer.optimizer))
        return self._fake_costs.peak_mib(config)

    @property
    def _engine_search_seconds(self) -> float:
        engine = None if self._callback is None else self._callback.engine
        return 0.0 if engine is None else engine.search_seconds

    @property
    def _engine_cost_model(self) -> Any:
        return None if self._callback is None else self._callback.cost_model

    @property
    def _cost_seconds(self) -> float:
        """Seconds spent predicting costs so far: the baselines' fake-tensor steps and the engine's cost model."""
        total = 0.0 if self._fake_costs is None else self._fake_costs.seconds
        engine_costs = self._engine_cost_model
        if engine_costs is not None and engine_costs is not self._fake_costs:
            total += getattr(engine_costs, "seconds", 0.0)
        return total


def name_of(task: Any) -> str:
    return str(getattr(task, "name", task))


def steps_within_budget(timeline: list[dict[str, Any]]) -> dict[str, Any]:
    """Of the measured steps, how many exceeded the budget that held at them."""
    measured = [r for r in timeline if r["measured_peak_mib"] is not None and r["budget_mib"] is not None]
    over = [r["stream_step"] for r in measured if r["measured_peak_mib"] > r["budget_mib"]]
    return {"measured_steps": len(measured), "steps_over_budget": over,
            "within_budget": not over if measured else None}
