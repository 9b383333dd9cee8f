"""`MPOptCallback`: connects the rule engine to a Trainer.

It builds the candidates at the first step (search space x cost model), measures each step's time (and
peak memory on CUDA), evaluates the gain metric when a trial ends, and applies the engine's answer at the
next step boundary. It only observes and signals; the step itself (micro-batching, out-of-memory retry)
belongs to `MPOptTrainer`.

Its state is saved with each checkpoint and restored on resume. The engine's state (JSON) is an `ExportableState`
entry of Trainer's own ``trainer_state.json``: Trainer writes that file last, after the weights and optimizer, so a
checkpoint that Trainer can resume from always holds the engine's state of the same step. Mid-race, the race's
host copies (tensors) go to ``mpopt_race_snapshots.pt`` in the checkpoint folder, written (atomically: temporary
file, then ``os.replace``) while Trainer saves, before ``trainer_state.json``; the entry records the snapshot's id,
so a snapshot that is missing or from another save is detected on resume, never used. A checkpoint without the
engine's state resumes with an `EngineStateWarning` and a fresh search, or raises `EngineStateError` under
``MPOptArguments(strict_resume=True)``; unreadable state files raise `EngineStateError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .blocks import find_blocks
from .config import MemoryConfig, MPOptArguments
from .cost import FakeTensorCostModel, ProfileCostModel, first_batch, plain_optimizer
from .engine import (
    MIB,
    Candidate,
    CostModel,
    RuleEngine,
    default_checkpoint_segments,
    default_freeze_rates,
    default_micro_batch_sizes,
    enumerate_configs,
)
from . import snapshot
from .knobs import apply_memory_config
from .microbatch import batch_size_of, split_batch
from .oom import free_memory, is_out_of_memory
from .wall_clock import WallClockLimit

logger = logging.getLogger(__name__)

STATE_FILE = "mpopt_engine.json"  # the engine's state before it moved into trainer_state.json: still read on resume
DECISIONS_FILE = "decisions.json"
SNAPSHOT_FILE = "mpopt_race_snapshots.pt"
TRAINER_STATE_FILE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME
STATE_FORMAT = 1


class EngineStateWarning(UserWarning):
    """A checkpoint was resumed without the engine's state: the memory-configuration search restarts."""


class EngineStateError(RuntimeError):
    """The engine's state in a checkpoint is unreadable, or missing under ``MPOptArguments(strict_resume=True)``."""


# ---------------------------------------------------------------------------- metrics (plain functions)


def item_scores(logits: torch.Tensor, labels: torch.Tensor | None, metric: str) -> torch.Tensor:
    """The gain metric of every item (higher is better). Causal-LM logits are shifted by one."""
    logits = logits.detach().float()
    if logits.dim() == 3:  # [batch, tokens, vocab]: next-token prediction
        logits = logits[:, :-1]
        labels = None if labels is None else labels[:, 1:]
    flat = logits.reshape(-1, logits.shape[-1])
    # a non-finite output knows nothing: it scores as a uniform prediction (and is never right), the worst value
    broken = ~torch.isfinite(flat).all(-1)
    flat = torch.where(broken[:, None], torch.zeros_like(flat), flat)
    if metric == "val_accuracy":
        if labels is None:
            raise ValueError("gain_metric='val_accuracy' needs labels in the evaluation data; use 'entropy' or 'confidence'.")
        target = labels.reshape(-1)
        keep = target != -100
        return ((flat.argmax(-1) == target) & ~broken)[keep].double()
    probs = flat.softmax(-1)
    if metric == "entropy":  # lower entropy is better: its negative
        return (probs * probs.clamp_min(1e-12).log()).sum(-1).double()
    if metric == "confidence":
        return probs.max(-1).values.double()
    raise ValueError(f"Unknown gain metric {metric!r}; allowed: 'val_accuracy', 'entropy', 'confidence'.")


# the best value of each gain metric's item score: the engine caps its projections there
METRIC_CEILING = {"val_accuracy": 1.0, "confidence": 1.0, "entropy": 0.0}


def metric_from_logits(logits: torch.Tensor, labels: torch.Tensor | None, metric: str) -> tuple[float, int]:
    """(sum of the per-item score, item count); higher is better."""
    scores = item_scores(logits, labels, metric)
    return float(scores.sum()), int(scores.numel())


def resolve_metric(metric: str, example: dict[str, Any] | None) -> str:
    if metric != "auto":
        return metric
    return "val_accuracy" if example is not None and ("labels" in example or "label" in example) else "entropy"


# ---------------------------------------------------------------------------- the callback


class MPOptCallback(TrainerCallback, ExportableState):
    """Lets the rule engine choose the memory configuration online.

    ``cost_model`` predicts ``(peak_bytes, step_s)`` of a configuration (the profiler's memory model, or a
    fake in tests); it is required when a memory budget is set. ``clock`` times the steps (inject one for
    deterministic tests). ``eval_dataset`` is used for the gain metric when the trainer has none. With a
    profile ``store`` and its ``store_key``, configurations it knows as infeasible are never tried, and new
    out-of-memory marks are written to it; ``on_infeasible`` is called for each new mark as well.

    Its state is saved in ``trainer_state.json`` (see the module's docstring); it restores itself from there, so
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
        self.metric = mpopt_args.gain_metric
        self.eval_chunk: int | None = None
        self._resume_dir: str | None = None
        self._needs_baseline = False
        self._step_start: float | None = None
        self._logged = 0
        self._warned = False
        self._applied: MemoryConfig | None = None
        self._copies: dict[str, Any] = {}  # race snapshots: "start" and "best", on the CPU
        self._copies_id: str | None = None  # changes with the copies: names them in the checkpoint's state
        self._copies_saved: tuple[str, str] | None = None  # (file, id) last written
        self._refs: tuple[Any, Any, Any] | None = None  # plain Trainer: the (args, state, control) last seen

    # -------------------------------------------------------------- wiring

    def bind_trainer(self, trainer: Any) -> None:
        """Called by MPOptTrainer: the engine may now change micro-batches and precision, and answer OOM."""
        self.trainer = trainer
        trainer.mpopt_callback = self
        trainer.oom_handler = self._on_oom

    def resume_from(self, checkpoint_dir: str) -> None:
        """Called by MPOptTrainer before Trainer reads the checkpoint's state: a missing or truncated
        ``trainer_state.json`` (the engine's state is in it) fails here, naming the file and what to do, rather
        than as Trainer's bare error."""
        self._resume_dir = checkpoint_dir
        path = os.path.join(checkpoint_dir, TRAINER_STATE_FILE)
        remedy = (f"resume from an earlier checkpoint, or delete the folder {checkpoint_dir} (resume_from_checkpoint="
                  "True then picks the one before it).")
        if not os.path.isfile(path):
            raise EngineStateError(f"{path} is missing: the save of {checkpoint_dir} was interrupted before Trainer "
                                   f"wrote its state (which holds the memory engine's too); {remedy}")
        _read_json(path, "It holds Trainer's and the memory engine's state: " + remedy)

    def task_boundary(self) -> None:
        """The online loop moved to a new task: re-open the search, re-measure the baseline on the new data."""
        if self.engine is None:
            return
        step = self._step()
        self._apply(self.engine.task_boundary(step, horizon_s=self._wall_clock_left()))
        # the new data's metric starts the trials; a task too short for a race spends no evaluation on it
        self._needs_baseline = self.engine.racing or self.engine.strategy != "race"
        self._flush_decisions()

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
            state.stateful_callbacks.setdefault(type(self).__name__, {"format": STATE_FORMAT, "engine": None})
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
        elif self._needs_baseline:
            self.engine.set_baseline(*self._measure_metric(model))
            self._needs_baseline = False
        self._run_state_ops(self.engine.take_ops())
        self._step_start = self.clock()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.engine is None or self._step_start is None:
            return control
        step_s = self._reduce(self.clock() - self._step_start, "max")
        peak = getattr(self.trainer, "_step_peak_bytes", None) if self.trainer is not None else None
        if peak is not None:
            peak = self._reduce(float(peak), "max")
        if self.engine.observe_step(state.global_step, step_s, peak):
            metric, se = self._measure_metric(model)
            proxy = self.metric != "val_accuracy"
            self._apply(self.engine.observe_metric(state.global_step, metric, proxy=proxy, se=se))
        elif self.engine.current != self._applied:
            self._apply(self.engine.current)  # over budget: the engine already chose another
        self._flush_decisions()
        if self.engine.out_of_time:
            control.should_training_stop = True
        return control

    # -------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, Any]:
        """`ExportableState`: the engine's state, which Trainer saves in ``trainer_state.json`` (called while it
        saves a checkpoint, after the weights and before that file, and whenever it builds a `TrainerState`).

        Mid-race, the race's copies are written to the checkpoint folder now, before ``trainer_state.json``;
        their id is recorded here, so that resume can tell them from a stale or missing file."""
        if self.engine is None:
            return {"format": STATE_FORMAT, "engine": None}
        payload = {"format": STATE_FORMAT, "engine": self.engine.state_dict(), "metric": self.metric,
                   "eval_chunk": self.eval_chunk, "needs_baseline": self._needs_baseline, "snapshot": None}
        if self._copies:  # a race is under way: its start and best trial's end are part of the state
            if self._copies_id is None:
                self._copies_id = uuid.uuid4().hex
            payload["snapshot"] = {"file": SNAPSHOT_FILE, "id": self._copies_id}
            folder = self._folder_being_saved()
            if folder is not None:
                self._save_copies(folder)
        return payload

    def on_save(self, args, state, control, **kwargs):
        # The copies are normally written by `state` already; this catches a save whose folder it could not tell.
        if self.engine is None or not self._copies or not args.should_save:
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            self._save_copies(folder)
        return control

    def _folder_being_saved(self) -> str | None:
        """The checkpoint folder Trainer is writing, when `state` is called from its save (which runs while
        ``control.should_save`` holds, after the weights went to the folder), else None."""
        if self.trainer is not None:
            args, state, control = self.trainer.args, self.trainer.state, self.trainer.control
        elif self._refs is not None:
            args, state, control = self._refs
        else:
            return None
        if not (control.should_save and args.should_save):
            return None
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        return folder if os.path.isdir(folder) else None

    def _save_copies(self, folder: str) -> None:
        path = os.path.join(folder, SNAPSHOT_FILE)
        if self._copies_saved == (path, self._copies_id) and os.path.isfile(path):
            return
        payload = {"format": STATE_FORMAT, "id": self._copies_id, "copies": self._copies}
        _atomic_write(path, lambda f: torch.save(payload, f))
        self._copies_saved = (path, self._copies_id)

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is not None:
            # stopped during a race: the weights of the best trial that ended are the run's result, and a
            # later train() goes on from them with a new race
            if self.engine.racing:
                self._apply(self.engine.stop_race(state.global_step))
            self._run_state_ops(self.engine.take_ops())
            self._flush_decisions()
        if self.engine is not None and state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, DECISIONS_FILE), "w") as f:
                json.dump([d.to_dict() for d in self.engine.decisions], f, indent=1)
        return control

    # -------------------------------------------------------------- setup

    def _setup(self, args, state, model: nn.Module, train_dataloader: Any = None, optimizer: Any = None) -> None:
        blocks = find_blocks(model)
        effective = args.per_device_train_batch_size
        space = self._space(args, blocks.n_blocks, effective)
        if self.cost_model is None and self._budget_bytes(args) is not None and train_dataloader is not None:
            # A budget needs predicted peaks: fit the profiler's memory model (or predict each on fake tensors).
            batch = first_batch(train_dataloader, effective)
            batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            self.cost_model = self._default_cost_model(model, batch, optimizer, space, args)
        self.engine = self._build_engine(args, model, space, effective)
        resume = self._resume_dir
        if resume is None and state.global_step > 0:  # a plain Trainer resumed: the folder follows the convention
            resume = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        saved = None if resume is None else self._saved_state(resume, state)
        if saved is not None:
            payload, source, copies = saved
            try:
                self.engine.load_state_dict(payload["engine"])
                self.metric, self.eval_chunk = payload["metric"], payload["eval_chunk"]
            except (KeyError, TypeError, ValueError) as exc:
                raise EngineStateError(
                    f"The memory engine's state in {source} does not fit this engine ({type(exc).__name__}: {exc}); "
                    f"resume from another checkpoint, or delete {_state_holder(source)} to restart the search."
                ) from exc
            self.engine.metric_ceiling = METRIC_CEILING.get(self.metric)
            self._needs_baseline = payload.get("needs_baseline", False)
            self._logged = len(self.engine.decisions)  # those were logged by the first run
            self._copies = copies
            self._apply(self.engine.current)
            return
        self.metric = resolve_metric(self.mpopt_args.gain_metric, self._first_eval_row())
        self.engine.metric_ceiling = METRIC_CEILING.get(self.metric)
        self.engine.set_horizon(self._wall_clock_left())
        self._apply(self.engine.start(state.global_step, *self._measure_metric(model)))
        self._flush_decisions()

    def _saved_state(self, folder: str, state) -> tuple[dict[str, Any], str, dict[str, Any]] | None:
        """(the engine's saved state, the file it came from, the race's copies) of the checkpoint in ``folder``;
        None, after an `EngineStateWarning`, when the checkpoint lacks them (`EngineStateError` if strict)."""
        source = os.path.join(folder, TRAINER_STATE_FILE)
        entry = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(entry, list):  # several MPOptCallbacks: Trainer keeps a list; one engine per trainer
            entry = entry[0] if entry else None
        legacy = not isinstance(entry, dict) or entry.get("engine") is None
        if legacy:  # saved before the state moved into trainer_state.json, or by a run without the engine
            source = os.path.join(folder, STATE_FILE)
            if not os.path.isfile(source):
                return self._missing_state(
                    folder, f"neither its {TRAINER_STATE_FILE} nor a {STATE_FILE} holds the memory engine's state")
            entry = _read_json(source, "Delete it to restart the memory-configuration search from this "
                                       "checkpoint, or resume from an earlier checkpoint.")
        if not isinstance(entry, dict) or not isinstance(entry.get("engine"), dict):
            raise EngineStateError(f"{source} does not hold a memory engine state (no 'engine' mapping); resume "
                                   f"from another checkpoint, or delete {_state_holder(source)} to restart the search.")
        copies: dict[str, Any] = {}
        if legacy:
            path = os.path.join(folder, SNAPSHOT_FILE)
            if os.path.isfile(path):
                copies = _load_copies(path)
            return entry, source, copies
        snap = entry.get("snapshot")
        if snap is not None:  # saved mid-race: the copies must be those this state was saved with
            if not isinstance(snap, dict) or not isinstance(snap.get("file"), str) or "id" not in snap:
                raise EngineStateError(f"{source}: the memory engine's snapshot record {snap!r} is malformed; resume "
                                       "from another checkpoint.")
            path = os.path.join(folder, os.path.basename(snap["file"]))
            if not os.path.isfile(path):
                return self._missing_state(folder, f"the race snapshot {path} that its {TRAINER_STATE_FILE} records "
                                                   "is missing (the save was interrupted, or the file was deleted)")
            saved = _load_copies(path)
            if not isinstance(saved, dict) or saved.get("id") != snap["id"]:
                return self._missing_state(folder, f"the race snapshot {path} is not the one its {TRAINER_STATE_FILE} "
                                                   "records (left by another save)")
            copies = saved["copies"]
            self._copies_id, self._copies_saved = snap["id"], None
        return entry, source, copies

    def _missing_state(self, folder: str, why: str) -> None:
        """Warn (or, with strict_resume, raise) that the checkpoint in ``folder`` lacks the engine's state."""
        message = (f"Resuming from {folder}: {why}. The memory-configuration search restarts from scratch: the "
                   "engine's earlier decisions and measurements are lost.")
        if self.mpopt_args.strict_resume:
            raise EngineStateError(message + " Refused because MPOptArguments(strict_resume=True): resume from a "
                                   "checkpoint that has the engine's state, or set strict_resume=False to restart the "
                                   "search.")
        warnings.warn(message + " (MPOptArguments(strict_resume=True) refuses instead.)", EngineStateWarning,
                      stacklevel=3)

    def _wall_clock_left(self) -> float | None:
        """Seconds left to the trainer's `WallClockLimit` (the shortest, if several), the engine's horizon; the
        smallest over ranks, so that every rank's engine decides alike whether a race pays."""
        handler = getattr(self.trainer, "callback_handler", None)
        limits = [cb for cb in getattr(handler, "callbacks", []) if isinstance(cb, WallClockLimit)]
        left = min((cb.seconds - cb.elapsed for cb in limits), default=None)
        return None if left is None else self._reduce(max(left, 1e-9), "min")

    def _default_cost_model(self, model: nn.Module, batch: dict[str, Any], optimizer: Any,
                            space: list[MemoryConfig], args) -> CostModel:
        """MPOptArguments.cost_predictor: the fitted memory model ('profile', through the profile store when one
        is set) or one fake-tensor step per configuration ('fake')."""
        a = self.mpopt_args
        if a.cost_predictor == "fake":
            return FakeTensorCostModel(model, batch, optimizer, lr=args.learning_rate)
        from .profiler import profile_key
        from .store import open_store

        if optimizer is None:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
        if self.store is None and a.profile_store is not None:
            self.store = open_store(None if a.profile_store == "default" else a.profile_store)
            self.store_key = profile_key(model, batch, plain_optimizer(optimizer))
        cost = ProfileCostModel.fit(model, batch, optimizer, space, self.store)
        cost.price_grad_caching(model, batch)
        logger.info("mpopt cost model: %s in %.1f s", "fit reused from the profile store" if cost.reused
                    else f"fitted from {len(cost.profile.measurements)} measured configuration(s)", cost.seconds)
        return cost

    def _space(self, args, n_blocks: int, effective: int) -> list[MemoryConfig]:
        a = self.mpopt_args
        if self.trainer is None:  # plain Trainer: micro-batch and precision are fixed by the Trainer
            micro, precisions = [effective], ["fp16" if args.fp16 else ("bf16" if args.bf16 else "fp32")]
        else:
            micro = a.micro_batch_sizes or default_micro_batch_sizes(effective)
            precisions = a.precisions or self._default_precisions(args)
        configs = enumerate_configs(
            [m for m in micro if m <= effective] or [effective],
            a.freeze_rates if a.freeze_rates is not None else default_freeze_rates(n_blocks),
            a.checkpoint_segments if a.checkpoint_segments is not None else default_checkpoint_segments(n_blocks),
            precisions,
            n_blocks,
        )
        if not configs:
            raise ValueError(
                f"The search space is empty for a model with {n_blocks} blocks: check MPOptArguments.checkpoint_segments "
                f"(each must be <= the trainable blocks) and freeze_rates."
            )
        return configs

    def _build_engine(self, args, model: nn.Module, configs: list[MemoryConfig], effective: int) -> RuleEngine:
        a = self.mpopt_args
        budget = self._budget_bytes(args)
        if budget is not None and self.cost_model is None:
            raise ValueError(
                f"MPOptArguments.memory_budget_mib={budget / MIB:.1f} needs a cost model to predict peaks: pass "
                "cost_model=... (e.g. the profiler's fitted memory model) or a train_dataloader to predict from, or leave memory_budget_mib=None and let "
                "out-of-memory errors steer the search."
            )
        candidates = [
            Candidate(c, *self.cost_model.predict(c)) if self.cost_model is not None else Candidate(c) for c in configs
        ]
        candidates = self._same_on_every_rank(candidates)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        return RuleEngine(
            candidates,
            budget_bytes=budget,
            margin=a.safety_margin,
            trial_steps=a.trial_steps,
            trial_max_s=a.trial_max_s,
            search_share=a.search_share,
            strategy=a.strategy,
            significance=a.significance,
            late_gain=a.late_gain,
            exploration=a.exploration,
            discount=a.discount,
            drift_threshold=a.drift_threshold,
            retune_every_steps=a.retune_every_steps,
            time_budget_s=a.time_budget_s,
            has_batchnorm=has_bn,
            bn_min_micro_batch=a.bn_min_micro_batch,
            effective_batch=effective,
            on_infeasible=self._mark_infeasible,
            known_infeasible=self.store.infeasible(self.store_key) if self.store is not None else None,
        )

    def _same_on_every_rank(self, candidates: list[Candidate]) -> list[Candidate]:
        """Rank 0's predictions for every rank: measured step times differ between processes, and engines that
        prune differently would choose differently and deadlock in the gradient all-reduce."""
        if not self._distributed():
            return candidates
        payload = [[c.to_dict() for c in candidates]]
        dist.broadcast_object_list(payload, src=0)
        return [Candidate.from_dict(c) for c in payload[0]]

    def _mark_infeasible(self, config: MemoryConfig, reason: str) -> None:
        if self.store is not None:
            self.store.mark_infeasible(self.store_key, config, reason)
        if self.on_infeasible is not None:
            self.on_infeasible(config, reason)

    def _budget_bytes(self, args) -> float | None:
        if self.mpopt_args.memory_budget_mib is not None:
            return self.mpopt_args.memory_budget_mib * MIB
        if args.device.type == "cuda":  # the device's memory; the margin is applied by the feasibility rule
            return float(torch.cuda.get_device_properties(args.device).total_memory)
        return None

    @staticmethod
    def _default_precisions(args) -> list[str]:
        if args.fp16:
            return ["fp16"]
        if args.bf16:  # accelerate autocasts every forward then: bf16 is the run's only precision
            return ["bf16"]
        if args.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return ["fp32", "bf16"]
        return ["fp32"]

    # -------------------------------------------------------------- acting

    def _apply(self, config: MemoryConfig) -> None:
        self._applied = config
        if self.trainer is not None:
            if self.trainer.memory_config != config or self.trainer._memory_config is None:
                self.trainer.set_memory_config(config)
        else:
            model = self._plain_model
            if model is not None:
                apply_memory_config(model, config)

    @property
    def _plain_model(self) -> nn.Module | None:
        return getattr(self, "_model_ref", None)

    def _on_oom(self, config: MemoryConfig, step: int) -> MemoryConfig:
        if self.engine is None:
            if config.micro_batch_size <= 1:
                raise RuntimeError(f"{config.short()} ran out of memory with a micro-batch of 1.")
            return config.replace(micro_batch_size=config.micro_batch_size // 2)
        following = self.engine.on_oom(step, config)
        self._applied = following  # the trainer switches to it itself, before re-running the step
        self._run_state_ops(self.engine.take_ops())  # e.g. a race trial's partial steps are undone
        self._flush_decisions()
        return following

    def _run_state_ops(self, ops: list[str]) -> None:
        """Carry out the engine's snapshot/restore requests on the weights, optimizer and scheduler (see
        `RuleEngine.take_ops`); copies live on the CPU."""
        model = self._plain_model
        if not ops or model is None:
            return
        optimizer, scheduler = getattr(self, "_optimizer_ref", None), getattr(self, "_scheduler_ref", None)
        for op in ops:
            if op == "snapshot":
                self._copies["start"] = snapshot.capture(model, optimizer, scheduler)
                self._copies_id = None  # new copies: a new id at the next save
            elif op == "save_best":
                self._copies["best"] = snapshot.capture(model, optimizer, scheduler)
                self._copies_id = None
            elif op in ("restore_start", "restore_best"):
                key = op.split("_")[1]
                if key not in self._copies:
                    raise RuntimeError(f"The engine asked to {op} but no {key!r} copy was taken; ops so far: {ops}.")
                snapshot.restore(self._copies[key], model, optimizer, scheduler)
            elif op == "drop":
                self._copies.clear()
                self._copies_id = None
            else:
                raise ValueError(f"Unknown engine state operation {op!r}.")

    def _flush_decisions(self) -> None:
        """Log the decisions not yet logged through the Trainer's `log`, so trackers see them."""
        if self.engine is None:
            return
        new = self.engine.decisions[self._logged :]
        self._logged = len(self.engine.decisions)
        for d in new:
            logger.info("mpopt decision at step %d: %s (%s)", d.step, MemoryConfig.from_dict(d.config).short(), d.reason)
            if self.trainer is not None:
                entry = {
                    "mpopt/micro_batch_size": d.config["micro_batch_size"],
                    "mpopt/freeze_rate": d.config["freeze_rate"],
                    "mpopt/checkpoint_segments": d.config["checkpoint_segments"],
                    "mpopt/decision": len(self.engine.decisions) - len(new) + new.index(d),
                }
                if d.predicted_peak_bytes is not None:
                    entry["mpopt/predicted_peak_mib"] = round(d.predicted_peak_bytes / MIB, 2)
                if d.gain_estimate is not None:
                    entry["mpopt/gain_per_s"] = d.gain_estimate
                self.trainer.log(entry)

    def _step(self) -> int:
        return 0 if self.trainer is None else self.trainer.state.global_step

    # -------------------------------------------------------------- the gain metric

    def _eval_data(self) -> Any:
        data = self.trainer.eval_dataset if self.trainer is not None and self.trainer.eval_dataset is not None else None
        data = data if data is not None else self.eval_dataset
        if data is None:
            raise ValueError(
                "MPOptCallback needs evaluation data for the gain metric: give the Trainer an eval_dataset (labelled "
                "for gain_metric='val_accuracy', unlabelled for 'entropy'/'confidence') or MPOptCallback(eval_dataset=...)."
            )
        return data

    def _first_eval_row(self) -> dict[str, Any] | None:
        data = self._eval_data()
        return data[0] if len(data) else None

    def _measure_metric(self, model: nn.Module) -> tuple[float, float]:
        """(mean score, its standard error) over the evaluation data and all ranks; halves its own batch on
        out-of-memory. Its time (the slowest rank's, so that every rank's engine sizes its trials alike) is search cost."""
        start = self.clock()
        if self.trainer is not None:
            loader = self.trainer.get_eval_dataloader(self._eval_data())
        else:
            loader = torch.utils.data.DataLoader(self._eval_data(), batch_size=8, collate_fn=_default_collate)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64)  # score, squared score, items
        try:
            with torch.no_grad():
                for batch in loader:
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    sums += self._score_batch(model, batch)
        finally:
            model.train(was_training)
        total, squares, count = self._reduce_sums(sums)
        seconds = self._reduce(self.clock() - start, "max")
        if self.engine is not None:
            self.engine.add_search_time(seconds)
        mean = total / max(count, 1)
        # and its standard error: the engine counts smaller leads as ties
        return mean, math.sqrt(max(squares / max(count, 1) - mean * mean, 0.0) / max(count, 1))

    def _score_batch(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """(sum of scores, sum of squared scores, items) of one evaluation batch."""
        size = batch_size_of(batch)
        chunk = min(self.eval_chunk or size, size)
        while True:
            try:
                sums = torch.zeros(3, dtype=torch.float64)
                for part in split_batch(batch, chunk):
                    labels = part.get("labels", part.get("label"))
                    inputs = {k: v for k, v in part.items() if k not in ("labels", "label")}
                    scores = item_scores(model(**inputs).logits, labels, self.metric).cpu()
                    sums += torch.stack([scores.sum(), (scores * scores).sum(), torch.tensor(float(scores.numel()))])
                return sums
            except Exception as exc:  # noqa: BLE001
                if not is_out_of_memory(exc) or chunk <= 1:
                    raise
            free_memory()
            chunk = max(1, chunk // 2)
            self.eval_chunk = chunk  # evaluation only: the training configuration is not touched

    # -------------------------------------------------------------- several processes

    @staticmethod
    def _distributed() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _reduce(self, value: float, op: str) -> float:
        """Every rank's engine must see the same numbers, so that all make the same decisions."""
        if not self._distributed():
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}[op])
        return float(tensor.item())

    def _reduce_sums(self, sums: torch.Tensor) -> list[float]:
        if self._distributed():
            sums = sums.to(self._device())
            dist.all_reduce(sums)
        return [float(v) for v in sums.cpu()]

    def _device(self) -> torch.device:
        return self.trainer.args.device if self.trainer is not None else torch.device("cpu")


def _default_collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------------------- state files


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in its folder, then `os.replace`: a process killed mid-write
    leaves the previous file (or none), never a truncated one."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power loss too (POSIX)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read_json(path: str, remedy: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineStateError(f"{path} is truncated or corrupt ({exc}). {remedy}") from exc


def _load_copies(path: str) -> Any:
    """A race snapshot: tensors and plain containers only (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, an unpickling error: all mean "unreadable"
        raise EngineStateError(
            f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}). It holds the race's start and best-trial "
            "copies: delete it to restart the memory-configuration search from this checkpoint, or resume from an "
            "earlier checkpoint."
        ) from exc


def _state_holder(source: str) -> str:
    """What to delete to drop the engine's state: the legacy file, or its entry in trainer_state.json."""
    return source if os.path.basename(source) == STATE_FILE else f"the 'MPOptCallback' entry of {source}"


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
