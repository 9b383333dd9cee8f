"""`MPOptCallback`: connects the rule engine to a Trainer.

It builds the candidates at the first step (search space x cost model), measures each step's time (and
peak memory on CUDA), evaluates the gain metric when a trial ends, and applies the engine's answer at the
next step boundary. It only observes and signals; the step itself (micro-batching, out-of-memory retry)
belongs to `MPOptTrainer`.

Its state is saved with each checkpoint, as an `ExportableState` entry of Trainer's ``trainer_state.json``, and
restored on resume (`mpopt_hf.callback.checkpoints`, `mpopt_hf.callback.engine_state`); the gain signal is fed by
`mpopt_hf.callback.gain_signal` (measured by `mpopt_hf.callback.gain`); decisions are logged by `mpopt_hf.callback.decision_log`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..budget import BudgetReader
from ..config import MemoryConfig, MPOptArguments
from ..cost import first_batch
from ..engine import STRATEGY_TYPES, CostModel, RuleEngine
from ..engine.events import (
    Action,
    Baseline,
    BudgetChanged,
    Evaluate,
    Event,
    Metric,
    OutOfMemory,
    Run,
    Start,
    StepBegin,
    StepDone,
    Stop,
    TaskBoundary,
    TrainEnd,
)
from ..model.blocks import find_blocks
from ..model.knobs import apply_memory_config
from ..training.ranks import reduce_sums, reduce_value
from ..training.wall_clock import WallClockLimit
from .checkpoints import CheckpointedState
from .decision_log import DECISIONS_FILE, DecisionLog
from .engine_state import (
    SNAPSHOT_FILE,
    STATE_FILE,
    EngineCheckpoint,
    EngineStateError,
    EngineStateWarning,
    empty_entry,
    restore_engine,
    saved_gain,
)
from .gain import (
    PROXY_METRICS,
    GainMeter,
    item_scores,
    metric_from_logits,
    resolve_metric,
)
from .gain_signal import GainSignal
from .setup import budget_bytes, build_engine, default_cost_model, search_space

# ---------------------------------------------------------------------------- the callback


class MPOptCallback(CheckpointedState, TrainerCallback):
    """Lets the rule engine choose the memory configuration online.

    ``cost_model`` predicts ``(peak_bytes, step_s)`` of a configuration (the profiler's memory model, or a
    fake in tests); it is required when a memory budget is set. ``clock`` times the steps (inject one for
    deterministic tests). ``eval_dataset`` is used for the gain metric when the trainer has none. With a
    profile ``store`` and its ``store_key``, configurations it knows as infeasible are never tried, and new
    out-of-memory marks are written to it; ``on_infeasible`` is called for each new mark as well.

    Its state is saved in ``trainer_state.json`` (see `mpopt_hf.callback.engine_state`); it restores itself from there, so
    it refuses ``TrainingArguments(restore_callback_states_from_checkpoint=True)``, with which Trainer would
    replace it by an instance rebuilt without its arguments.
    """

    def __init__(
        self,
        mpopt_args: MPOptArguments,
        cost_model: CostModel | None = None,
        clock: Callable[[], float] = time.perf_counter,
        eval_dataset: Any = None,
        on_infeasible: Callable[[MemoryConfig, str], None] | None = None,
        store: Any = None,
        store_key: Any = None,
    ) -> None:
        if (store is None) != (store_key is None):
            raise ValueError("MPOptCallback: give both store and store_key (mpopt_hf.store.make_key), or neither.")
        self.store, self.store_key = store, store_key
        self.mpopt_args = mpopt_args
        self.cost_model = cost_model
        self.clock = clock
        self.eval_dataset = eval_dataset
        self.on_infeasible = on_infeasible
        self.trainer: Any = None
        self.engine: RuleEngine | None = None
        # the gain metric, its evaluation batch, the steps' losses ('train_loss') and whether a baseline is due
        self._gain = GainSignal(GainMeter(mpopt_args.gain_metric), self._reduce, self._reduce_sums)
        self._resume_dir: str | None = None
        self._step_start: float | None = None
        self._decision_log = DecisionLog()  # which decisions were logged already
        self._warned = False
        self._checkpoint = EngineCheckpoint()  # race snapshots: "start" and "best", on the CPU
        self._refs: tuple[Any, Any, Any] | None = None  # plain Trainer: the (args, state, control) last seen
        self._budget: BudgetReader | None = None  # re-reads a budget that may change ('auto', a callable)

    @property
    def metric(self) -> str:
        """The gain metric in use (``gain_metric`` until the first step resolves 'auto')."""
        return self._gain.meter.metric

    @metric.setter
    def metric(self, value: str) -> None:
        self._gain.meter.metric = value

    @property
    def eval_chunk(self) -> int | None:
        """The evaluation batch the gain metric fell back to after out-of-memory (None: the loader's)."""
        return self._gain.meter.eval_chunk

    @eval_chunk.setter
    def eval_chunk(self, value: int | None) -> None:
        self._gain.meter.eval_chunk = value

    # -------------------------------------------------------------- wiring

    def bind_trainer(self, trainer: Any) -> None:
        """Called by MPOptTrainer, which then routes its out-of-memory errors to `on_out_of_memory` and counts
        `held_bytes` in its step peak: the engine may now change micro-batches and precision, and answer OOM."""
        self.trainer = trainer

    def held_bytes(self) -> int:
        """Bytes of the race's host copies (on a CPU, inside the budget)."""
        return self._checkpoint.held_bytes()

    def task_boundary(self) -> None:
        """The online loop moved to a new task: re-open the search, re-measure the baseline on the new data."""
        if self.engine is None:
            return
        max_steps = getattr(getattr(self.trainer, "args", None), "max_steps", -1)  # the new task's (bound by now)
        self._tell(TaskBoundary(step=self._step(), steps_left=max_steps if max_steps > 0 else None,
                                horizon_s=self._wall_clock_left()))
        # the new data's metric starts the trials; a task too short for a race spends no evaluation on it
        self._gain.needs_baseline = self.engine.measures and (self.engine.racing or self.engine.strategy != "race")

    # -------------------------------------------------------------- Trainer events

    def on_init_end(self, args, state, control, **kwargs):
        if getattr(args, "restore_callback_states_from_checkpoint", False):
            raise ValueError(
                "MPOptCallback restores its own state from trainer_state.json; "
                "TrainingArguments(restore_callback_states_from_checkpoint=True) would make Trainer replace it on "
                "resume by an MPOptCallback rebuilt without its arguments (mpopt_args, cost model, trainer). Set it "
                "to False."
            )
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Trainer's save updates the entry of every ExportableState callback, and fails on a resumed state that
        # has none (a checkpoint saved without the engine): give it one, which `_setup` reads as "no state"
        if isinstance(state.stateful_callbacks, dict):
            state.stateful_callbacks.setdefault(type(self).__name__, empty_entry())
        if self.trainer is None and not self._warned:
            self._warned = True
            warnings.warn(
                "MPOptCallback on a plain Trainer applies only freezing and checkpointing: micro-batch size and "
                "precision stay the Trainer's, and out-of-memory errors are not retried. Use "
                "MPOptTrainer(..., mpopt_args=MPOptArguments(...)) for all knobs.",
                stacklevel=2,
            )

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._model_ref = model
        self._refs = (args, state, control)
        self._optimizer_ref, self._scheduler_ref = kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        if self.engine is None:
            self._setup(args, state, model, kwargs.get("train_dataloader"), kwargs.get("optimizer"))
        elif self._gain.needs_baseline and self.metric != "train_loss":  # the training loss comes with the step
            value, se, seconds = self._measure_metric(model)
            self._tell(Baseline(value=value, se=se, eval_s=seconds, **self._when(state)))
            self._gain.needs_baseline = False
        budget = self._budget.changed(state.global_step, lambda v: self._reduce(v, "min")) if self._budget else None
        if budget is not None:  # another process took memory or gave it back: re-plan before this step runs
            self._tell(BudgetChanged(budget_bytes=budget, **self._when(state)))
        self._tell(StepBegin(**self._when(state)))
        self._step_start = self.clock()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.engine is None or self._step_start is None:
            return control
        step_s = self._reduce(self.clock() - self._step_start, "max")
        peak = getattr(self.trainer, "step_peak_bytes", None) if self.trainer is not None else None
        if peak is not None:
            peak = self._reduce(float(peak), "max")
        meter = getattr(self.trainer, "peak_meter", None)
        timed = not (meter is not None and meter.slowed)  # the same on every rank: sampling follows steps and configs
        if self.metric == "train_loss":
            baseline = self._gain.observe_train_loss(self.trainer, self.engine)
            if baseline is not None:
                self._tell(Baseline(value=baseline, **self._when(state)))
        self._tell(StepDone(seconds=step_s, peak_bytes=peak, timed=timed, **self._when(state)), control)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is not None:
            self._tell(TrainEnd(**self._when(state)))
        if self.engine is not None and state.is_world_process_zero:
            DecisionLog.write(args.output_dir, self.engine.decisions)
        return control

    def on_out_of_memory(self, config: MemoryConfig, step: int) -> MemoryConfig:
        """MPOptTrainer's step ran out of memory with ``config``: the configuration to run the step again with (the
        trainer switches to it itself), after the partial step's race copies are dealt with."""
        if self.engine is None:
            from ..training.step_recovery import halve_micro_batch

            return halve_micro_batch(config, step)
        following = config
        steps_left = _steps_left(self.trainer.state) if self.trainer is not None else None
        for action in self.engine.step(OutOfMemory(config=config, step=step, steps_left=steps_left)):
            if isinstance(action, Run):
                following = action.config
            else:
                self._carry_out(action)  # e.g. a race trial's partial steps are undone
        self._flush_decisions()
        return following

    # -------------------------------------------------------------- setup

    def _setup(self, args, state, model: nn.Module, train_dataloader: Any = None, optimizer: Any = None) -> None:
        blocks = find_blocks(model)
        effective = args.per_device_train_batch_size
        space = search_space(self.mpopt_args, args, blocks.n_blocks, effective, plain=self.trainer is None)
        if self.cost_model is None and budget_bytes(self.mpopt_args, args) is not None and train_dataloader is not None:
            # A budget needs predicted peaks: fit the profiler's memory model (or predict each on fake tensors).
            batch = first_batch(train_dataloader, effective)
            batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            self.cost_model, self.store, self.store_key = default_cost_model(
                self.mpopt_args, model, batch, optimizer, space, args, self.store, self.store_key)
        saved = self._load_saved(args, state)
        measures = STRATEGY_TYPES[self.mpopt_args.strategy].measures  # 'fixed' and 'halving' never evaluate
        if saved is not None:  # the metric a resumed run was using (it sets the engine's ceiling)
            payload, source, copies = saved
            self._gain.restore(*saved_gain(payload, source), payload.get("needs_baseline", False))
        elif measures:
            self._gain.resolve(self.mpopt_args.gain_metric, model, self.trainer, self.eval_dataset)
        self.engine = build_engine(self.mpopt_args, args, model, space, effective, self.cost_model, self.store,
                                   self.store_key, self._mark_infeasible, metric_ceiling=self._gain.ceiling)
        self._budget = BudgetReader(self.mpopt_args.memory_budget_mib, args.device, self.mpopt_args.budget_every_steps,
                                    last_bytes=self.engine.budget_bytes, last_step=state.global_step)
        if saved is not None:
            restore_engine(self.engine, payload, source)
            self._decision_log.logged = len(self.engine.decisions)  # those were logged by the first run
            self._copies = copies
            self._apply(self.engine.current)
            return
        horizon = self._wall_clock_left()  # before the evaluation, whose time the engine counts itself (eval_s)
        value, se, seconds = self._measure_metric(model) if measures else (None, None, 0.0)
        self._tell(Start(metric=value, se=se, eval_s=seconds, horizon_s=horizon, **self._when(state)))

    def _when(self, state) -> dict[str, Any]:
        """An event's step and the Trainer steps the run has left (what a race costs under gain_per='step')."""
        return {"step": state.global_step, "steps_left": _steps_left(state)}

    def _wall_clock_left(self) -> float | None:
        """Seconds left to the trainer's `WallClockLimit` (the shortest, if several), the engine's horizon; the
        smallest over ranks, so that every rank's engine decides alike whether a race pays."""
        handler = getattr(self.trainer, "callback_handler", None)
        limits = [cb for cb in getattr(handler, "callbacks", []) if isinstance(cb, WallClockLimit)]
        left = min((cb.seconds - cb.elapsed for cb in limits), default=None)
        return None if left is None else self._reduce(max(left, 1e-9), "min")

    def _mark_infeasible(self, config: MemoryConfig, reason: str) -> None:
        if self.store is not None:
            self.store.mark_infeasible(self.store_key, config, reason)
        if self.on_infeasible is not None:
            self.on_infeasible(config, reason)

    # -------------------------------------------------------------- acting

    def _tell(self, event: Event, control: Any = None) -> None:
        """Hand ``event`` to the engine and carry out what it answers, in order; an `Evaluate` is answered with the
        `Metric` it asks for, whose answer is carried out in turn."""
        for action in self.engine.step(event):
            if isinstance(action, Run):
                self._apply(action.config)
            elif isinstance(action, Evaluate):
                value, se, seconds = self._measure_metric(self._plain_model)
                self._tell(Metric(value=value, se=se, proxy=self.metric in PROXY_METRICS, eval_s=seconds,
                                  step=event.step, steps_left=event.steps_left), control)
            elif isinstance(action, Stop):
                if control is not None:
                    control.should_training_stop = True
            else:
                self._carry_out(action)
        self._flush_decisions()

    def _apply(self, config: MemoryConfig) -> None:
        if self.trainer is not None:
            self.trainer.set_memory_config(config)
        else:
            model = self._plain_model
            if model is not None:
                apply_memory_config(model, config)

    @property
    def _plain_model(self) -> nn.Module | None:
        return getattr(self, "_model_ref", None)

    def _carry_out(self, action: Action) -> None:
        """A copy action (`Snapshot`, `Restore`, `Drop`) on the weights, optimizer and scheduler state."""
        model = self._plain_model
        if model is None:
            return
        optimizer, scheduler = getattr(self, "_optimizer_ref", None), getattr(self, "_scheduler_ref", None)
        self._checkpoint.carry_out(action, model, optimizer, scheduler)

    def _flush_decisions(self) -> None:
        """Log the decisions not yet logged, also through the Trainer's `log`, so trackers see them."""
        if self.engine is not None:
            self._decision_log.flush(self.engine.decisions, self.trainer, self.engine.gain_per)

    def _step(self) -> int:
        return 0 if self.trainer is None else self.trainer.state.global_step

    # -------------------------------------------------------------- the gain metric

    def _measure_metric(self, model: nn.Module) -> tuple[float | None, float | None, float]:
        """(mean score, its standard error, seconds) of the gain metric (`GainSignal.measure`); its time is search
        cost."""
        steps = self.engine.trial_steps_done if self.engine is not None else 0
        return self._gain.measure(model, self.trainer, self.eval_dataset, steps, self.clock)

    # -------------------------------------------------------------- several processes

    def _reduce(self, value: float, op: str) -> float:
        """Every rank's engine must see the same numbers, so that all make the same decisions."""
        return reduce_value(value, op, self._device)

    def _reduce_sums(self, sums: torch.Tensor) -> list[float]:
        return reduce_sums(sums, self._device)

    def _device(self) -> torch.device:
        return self.trainer.args.device if self.trainer is not None else torch.device("cpu")


def _steps_left(state: Any) -> int | None:
    """Trainer steps the run has left (None: its length is unknown)."""
    return state.max_steps - state.global_step if state.max_steps > 0 else None


__all__ = [
    "DECISIONS_FILE",
    "SNAPSHOT_FILE",
    "STATE_FILE",
    "EngineStateError",
    "EngineStateWarning",
    "MPOptCallback",
    "item_scores",
    "metric_from_logits",
    "resolve_metric",
]
