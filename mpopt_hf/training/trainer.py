"""`MPOptTrainer`: a `transformers.Trainer` whose training step runs under a `MemoryConfig`.

Without a memory configuration or engine it *is* a `Trainer`: every method defers to it. With one, the
step is the effective batch (Trainer's ``gradient_accumulation_steps`` loader batches), split into
micro-batches, each weighted by its share of the items the loss averages over, so the gradient equals
the whole batch's while only one micro-batch's activations are held. The step is computed at its last
loader batch, whole, so that an out-of-memory error anywhere in it (forward, backward, clipping, the
optimizer step) is answered by running it again under the next configuration, and a non-finite loss or
gradient skips it. The knobs switch only at step boundaries.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Trainer

from ..config import LR_SCALINGS, MIB, MemoryConfig, MPOptArguments, check_choice, check_int
from ..model.blocks import ModelBlocks, find_blocks, unwrap_model
from ..model.knobs import (
    apply_memory_config,
    autocast_context,
    check_precision,
    knob_state,
    plan_knobs,
)
from .adapter_checkpoints import AdapterCheckpoints
from .adapter_optimizer import sync_adapters
from .batch_updates import BatchUpdates
from .checkpoint_compat import reload_renamed_weights
from .config_checks import check_config_for_run
from .coupled_loss import CoupledLossAdapter
from .coupling_check import resolve_coupled_loss
from .eval_halving import HalvingEvaluation
from .grad_cache import RngState, device_anchors, grad_cache_backward
from .loss_items import IGNORE_INDEX, LossItemCounter, count_loss_items
from .microbatch import batch_size_of, split_batch
from .optimizer_setup import OptimizerSetup
from .optimizer_state import is_switchable, set_state_bits, wants_low_bit
from .sharding import refuse_sharded_engines
from .step_guard import NonFiniteSteps, OptimizerRollback
from .step_peak import StepPeakMeter, process_peak_rss_bytes
from .step_recovery import StepRecovery

if TYPE_CHECKING:  # pragma: no cover
    from ..callback.callback import MPOptCallback

# Answers the next configuration after ``config`` ran out of memory at ``step``; raises when none is left.
OOMHandler = Callable[[MemoryConfig, int], MemoryConfig]

logger = logging.getLogger(__name__)


class MPOptTrainer(BatchUpdates, HalvingEvaluation, StepRecovery, OptimizerSetup, AdapterCheckpoints, Trainer):
    """A Trainer that trains under a `MemoryConfig` (micro-batching, freezing, checkpointing, precision).

    ``memory_config`` is the configuration to start with; ``mpopt_args`` attaches an `MPOptCallback` that lets
    the rule engine choose (``cost_model``, ``clock``, ``store``/``store_key`` go to it). With neither, this is
    `Trainer` until `set_memory_config` is called. ``loss_items`` counts the items a micro-batch's loss
    averages over when that is neither labelled tokens nor samples (see `mpopt_hf.training.loss_items`).
    ``max_nonfinite_steps`` steps in a row with a non-finite loss or gradient norm stop training (each is
    skipped). ``log_memory_config`` adds the active knobs (and, on CUDA, the step's peak) to the loss logs.

    A step that runs out of memory is run again, whole, under the next configuration: the engine's answer
    when one is attached, else half the micro-batch. Its partial gradients are dropped and a half-done
    optimizer step is undone first, so no sample is skipped and nothing is applied twice. In a multi-process
    run every rank learns of any rank's error (an all-reduced flag) and all switch together.
    """

    def __init__(
        self,
        *args: Any,
        memory_config: MemoryConfig | None = None,
        mpopt_args: MPOptArguments | None = None,
        cost_model: Any = None,
        clock: Callable[[], float] | None = None,
        store: Any = None,
        store_key: Any = None,
        loss_items: LossItemCounter | None = None,
        max_nonfinite_steps: int = 3,
        log_memory_config: bool = False,
        peak_every_steps: int = 10,
        lr_scaling: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.oom_handler: OOMHandler | None = None
        self.oom_events: list[tuple[int, MemoryConfig]] = []
        self.mpopt_callback: MPOptCallback | None = None
        self.nonfinite = NonFiniteSteps(max_nonfinite_steps)
        self.last_step_loss: float | None = None  # the last optimizer step's training loss
        self.loss_items = loss_items
        self.log_memory_config = log_memory_config
        # 8-bit optimizer state wanted at some point: the optimizer this trainer builds is bitsandbytes' AdamW
        self.low_bit_optimizer = wants_low_bit(memory_config, mpopt_args, kwargs.get("callbacks") or [])
        # how the learning rate follows a MemoryConfig.batch_size smaller than the loader's (`batch_updates`)
        self.lr_scaling = check_choice("MPOptTrainer.lr_scaling", lr_scaling or getattr(mpopt_args, "lr_scaling", None)
                                       or "sqrt", LR_SCALINGS)
        if mpopt_args is not None:
            from ..callback.callback import MPOptCallback

            extra = {"clock": clock} if clock else {}
            callback = MPOptCallback(mpopt_args, cost_model=cost_model, store=store, store_key=store_key, **extra)
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), callback]
        super().__init__(*args, **kwargs)
        self._blocks: ModelBlocks | None = None
        self._memory_config: MemoryConfig | None = None
        self._pending_config: MemoryConfig | None = None
        self._loader_batches: list[dict[str, Any]] = []  # the current step's loader batches so far
        self._step_batches: list[dict[str, Any]] = []
        self._step_model: nn.Module | None = None
        self._step_random: RngState | None = None
        self._rollback: OptimizerRollback | None = None
        self._skip_reason: str | None = None
        self._micro_weight: float | None = None
        self._coupling: tuple[CoupledLossAdapter | None] | None = None  # resolved at the first split step
        self._step_peak_bytes: int | None = None
        # the step's measured peak: every step on CUDA; on CPU the first step of each configuration and every
        # ``peak_every_steps``-th after it (MemTracker's cost is paid on those steps only)
        self.peak_meter = StepPeakMeter(self.args.device, every=check_int(
            "MPOptTrainer.peak_every_steps", peak_every_steps, lambda v: v >= 1, "an integer >= 1"))
        engines = [c for c in self.callback_handler.callbacks if _steers(c)]  # mpopt_args= adds one
        if memory_config is not None or engines:  # the knobs, by a configuration or by an MPOptCallback
            refuse_sharded_engines(self)
        if memory_config is not None or mpopt_args is not None:
            self.set_memory_config(memory_config or self.default_memory_config())
        for callback in engines:
            self._connect(callback)

    # ------------------------------------------------------------------ the public knob API

    def default_memory_config(self) -> MemoryConfig:
        """The whole loader batch at once, in the precision TrainingArguments ask for: what Trainer runs."""
        precision = "fp16" if self.args.fp16 else ("bf16" if self.args.bf16 else "fp32")
        return MemoryConfig(micro_batch_size=self.args.per_device_train_batch_size, precision=precision)

    @property
    def memory_config(self) -> MemoryConfig:
        """The configuration in effect (or, before the first step, the one that will be)."""
        return self._memory_config or self._pending_config or self.default_memory_config()

    @property
    def step_peak_bytes(self) -> int | None:
        """The last step's measured peak (every step on CUDA; sampled steps on CPU, else None)."""
        return self._step_peak_bytes

    @property
    def knobs_active(self) -> bool:
        """False until a configuration or an engine is given: until then every step is Trainer's own."""
        return self._memory_config is not None or self._pending_config is not None or self.oom_handler is not None

    def set_memory_config(self, config: MemoryConfig) -> None:
        """Switch to ``config`` at the next step boundary (nothing to do if it is in effect and no other is
        pending). Validated now, so a bad config fails here."""
        if config == self._memory_config and self._pending_config is None:
            return
        self._validate(config)
        self._pending_config = config

    def _model_blocks(self) -> ModelBlocks:
        """Looked for only when a knob needs blocks, so a model without repeated blocks trains as in Trainer."""
        if self._blocks is None:
            self._blocks = find_blocks(self.model)
        return self._blocks

    def _validate(self, config: MemoryConfig) -> None:
        if not isinstance(config, MemoryConfig):
            raise ValueError(f"memory_config must be a MemoryConfig, got {type(config).__name__}.")
        if _uses_blocks(config):
            plan_knobs(config, self._model_blocks().n_blocks)
        check_config_for_run(config, self.args, low_bit_ready=self.low_bit_optimizer or is_switchable(self.optimizer))

    def _switch_if_pending(self, model: nn.Module) -> None:
        config = self._pending_config
        if config is None:
            return
        self._pending_config = None
        previous = self._memory_config
        if _uses_blocks(config) or knob_state(model) is not None:
            # new LoRA adapters draw from a seed of their own: the run's random stream is not touched
            apply_memory_config(model, config, blocks=self._model_blocks(), device_type=self.args.device.type,
                                lora_seed=self.args.seed + self.state.global_step)
        else:
            check_precision(config.precision, self.args.device.type)
        if self.optimizer is not None:
            set_state_bits(self.optimizer, config.optimizer_state)
            sync_adapters(self.optimizer, model)
        self._memory_config = config
        loader_batch = self.args.per_device_train_batch_size
        update = (config.batch_size or loader_batch) * self.args.gradient_accumulation_steps
        micro_steps = -(-update // config.step_micro_batch)
        updates = "" if config.batch_size is None else (
            f", {loader_batch // config.batch_size} updates per step at learning rate x{self.learning_rate_scale(config):.3g}"
            f" ({self.lr_scaling})")
        message = (
            f"memory config {config.short()}: effective batch {update * self.args.world_size}"
            f" = micro-batch {min(config.step_micro_batch, loader_batch)} x {micro_steps} micro-steps x "
            f"{self.args.world_size} processes{updates}"
        )
        logger.info(message if previous is None else f"switched {previous.short()} -> {message}")

    def add_callback(self, callback: Any) -> None:
        """As Trainer's, and an `MPOptCallback` added later is connected to this trainer too."""
        super().add_callback(callback)
        self.low_bit_optimizer = self.low_bit_optimizer or wants_low_bit(None, None, [callback])
        if not hasattr(self, "peak_meter"):  # Trainer's own __init__ adding its callbacks: ours connects them after
            return
        for cb in self.callback_handler.callbacks:
            if _steers(cb) and getattr(cb, "trainer", None) is None:
                self._connect(cb)

    def _connect(self, callback: MPOptCallback) -> None:
        """``callback``'s engine steers this trainer: it answers out-of-memory errors, and on a CPU its race copies
        (host memory) count in the step's peak against the budget."""
        callback.bind_trainer(self)
        self.mpopt_callback = callback
        self.oom_handler = callback.on_out_of_memory
        if not self.peak_meter.on_cuda:
            self.peak_meter.held_bytes.append(callback.held_bytes)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._loader_batches = []  # a run stopped inside a step leaves no loader batch behind
        if self.knobs_active and self.args.auto_find_batch_size:
            logger.warning(
                "auto_find_batch_size=True with MPOptTrainer: the effective batch (%d per device) is kept and the "
                "micro-batch shrinks on out-of-memory instead of the batch being halved.",
                self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps,
            )
        return super().train(*args, **kwargs)

    # ------------------------------------------------------------------ the step

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        if not self.knobs_active:
            return super().training_step(model, inputs, num_items_in_batch)
        self._guard_optimizer()
        self._loader_batches.append(inputs)
        if not self.accelerator.gradient_state.sync_gradients:
            # One of Trainer's accumulation batches: the step is computed at its last one, whole, so that an
            # out-of-memory retry can redo all of it and the shares count the items of all its batches.
            return torch.zeros((), device=self.args.device)
        self._step_batches, self._loader_batches = self._loader_batches, []
        random = RngState.capture(device_anchors(model.parameters()))
        self._step_model, self._step_random, self._skip_reason = model, random, None
        loss = self._step_gradients(model)
        if not torch.isfinite(loss):
            self._flag_nonfinite("loss")
        self.last_step_loss = float(loss.detach())  # read by the engine's 'train_loss' gain (no probe set)
        return loss

    def _gradients(self, model: nn.Module) -> torch.Tensor:
        """The step's gradient, accumulated over its micro-batches; retried whole until a configuration fits."""
        while True:
            self._step_random.restore()  # a retry draws the same dropout masks
            self._switch_if_pending(model)
            self.peak_meter.begin_step(self.memory_config)
            ok, loss, error = self._attempt(lambda: self._measured_accumulate(model))
            if ok:
                if self._distributed:
                    self._all_reduce_gradients(model)
                return loss
            self._recover(model, error)

    def _measured_accumulate(self, model: nn.Module) -> torch.Tensor:
        inputs = [v for batch in self._step_batches for v in batch.values()]
        if any(batch_size_of(batch) > self.memory_config.micro_batch_size for batch in self._step_batches):
            self._coupled_loss(model)  # once, outside the step's window: its peak is not this configuration's
        with self.peak_meter.window(model, self.optimizer, inputs):
            return self._accumulate(model, self.memory_config)

    def _accumulate(self, model: nn.Module, config: MemoryConfig) -> torch.Tensor:
        """Forward/backward every micro-batch of the step; the gradient equals the whole batch's."""
        micro_batches = [mb for batch in self._step_batches for mb in split_batch(batch, config.micro_batch_size)]
        adapter = self._coupled_loss(model) if len(micro_batches) > 1 else None
        if adapter is not None:
            return self._grad_cached(model, micro_batches, adapter)
        counts = [self._count_items(mb) for mb in micro_batches]
        scale = (self.args.world_size if self._distributed else 1) / max(self._global_items(sum(counts)), 1)
        last = max((i for i, count in enumerate(counts) if count), default=-1)
        total = torch.zeros((), device=self.args.device)
        scaled_for_ga = self.loss_is_scaled_for_ga
        self.loss_is_scaled_for_ga = True  # the weights below make the micro-batches' sum the whole batch's mean
        try:
            for index, (micro_batch, count) in enumerate(zip(micro_batches, counts)):
                if count == 0:
                    continue  # no labelled item: it adds nothing to a mean over items (and 0/0 would be NaN)
                self._micro_weight = count * scale / self._trainer_loss_scale()
                # Several processes: no rank may enter the gradient all-reduce before all know that no rank ran out
                # of memory, so every micro-batch runs unsynchronised and `_all_reduce_gradients` follows.
                sync = contextlib.nullcontext() if index == last and not self._distributed else self.accelerator.no_sync(model)
                with sync:
                    # the micro-batch's own item count: a model that divides by it gets its mean, as one that ignores it
                    items = torch.tensor(count, device=self.args.device)
                    total = total + super().training_step(model, micro_batch, items)
        finally:
            self._micro_weight = None
            self.loss_is_scaled_for_ga = scaled_for_ga
        return total

    def _coupled_loss(self, model: nn.Module) -> CoupledLossAdapter | None:
        """The model's coupled-loss adapter, or None once a check on a few samples has shown that weighted
        micro-batches give the whole batch's gradient; a coupled loss without adapter is refused (once)."""
        if self._coupling is None:
            sample = self._prepare_inputs(dict(self._step_batches[0]))

            def weighted_loss(m: nn.Module, micro_batch: dict[str, Any], share: float) -> torch.Tensor:
                items = torch.tensor(self._count_items(micro_batch), device=self.args.device)
                return self.compute_loss(m, micro_batch, num_items_in_batch=items) * share / self._trainer_loss_scale()

            # half precision rounds a whole batch and its halves differently; a coupled loss differs by tens of %
            rtol = 3e-2 if (self.args.bf16 or self.args.fp16) else 1e-3
            # on the bare module: a DDP wrapper's collectives must not depend on this rank's check
            # at most one micro-batch of samples (two at micro-batch 1, the fewest a split can be checked on), so
            # the check's peak stays within what this configuration's step holds
            n_samples = max(2, min(4, self.memory_config.micro_batch_size))
            self._coupling = (resolve_coupled_loss(unwrap_model(model), sample, loss_fn=weighted_loss,
                                                   count_items=self._count_items, rtol=rtol, n_samples=n_samples),)
        return self._coupling[0]

    def _grad_cached(self, model: nn.Module, micro_batches: list[dict[str, Any]], adapter: CoupledLossAdapter) -> torch.Tensor:
        """A loss that couples the batch: gradient caching, exact at the cost of one more forward."""
        model.train()
        inputs = [self._prepare_inputs(mb) for mb in micro_batches]
        # several processes: all unsynchronised, `_all_reduce_gradients` follows (see `_accumulate`)
        no_sync = None if self._distributed else (lambda: self.accelerator.no_sync(model))
        outer = self.accelerator.no_sync(model) if self._distributed else contextlib.nullcontext()
        with outer:
            loss = grad_cache_backward(model, inputs, adapter, autocast=self.compute_loss_context_manager,
                                       backward=self.accelerator.backward, no_sync=no_sync)
        return loss

    def _count_items(self, micro_batch: dict[str, Any]) -> int:
        if self.loss_items is not None:
            return int(self.loss_items(micro_batch))
        label = self.label_names[0] if self.label_names else "labels"
        labels = micro_batch.get(label)
        # semantic segmentation losses ignore their own index (255 by default), not -100
        config = getattr(unwrap_model(self.model), "config", None)
        ignore = getattr(config, "semantic_loss_ignore_index", None)
        if ignore is None or not torch.is_tensor(labels) or labels.dim() < 3:
            ignore = IGNORE_INDEX
        return count_loss_items(micro_batch, shifts_labels=getattr(self, "_loss_shifts_labels", False), label_name=label,
                                ignore_index=ignore)

    def _global_items(self, local: int) -> int:
        if not self._distributed:
            return local
        return int(self.accelerator.reduce(torch.tensor(local, device=self.args.device), reduction="sum").item())

    def _trainer_loss_scale(self) -> float:
        """The factor Trainer.compute_loss multiplies a loss by when it averages tokens across devices."""
        if self.args.average_tokens_across_devices and (self.model_accepts_loss_kwargs or self.compute_loss_func):
            return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._micro_weight is None:
            return result
        if return_outputs:
            loss, outputs = result
            return loss * self._micro_weight, outputs
        return result * self._micro_weight

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> contextlib.AbstractContextManager:
        """Autocast for the active configuration; fp16 is left to accelerate (it owns the loss scaler)."""
        config = self.memory_config
        if not self.knobs_active or config.precision == "fp16":
            return super().autocast_smart_context_manager(cache_enabled)
        return autocast_context(config, self.args.device.type)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        reload_renamed_weights(unwrap_model(model if model is not None else self.model), resume_from_checkpoint)
        if self.mpopt_callback is not None:
            self.mpopt_callback.resume_from(resume_from_checkpoint)

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.log_memory_config and "loss" in logs and self._memory_config is not None:
            logs["micro_batch_size"] = self._memory_config.micro_batch_size
            logs["freeze_rate"] = self._memory_config.freeze_rate
            logs["checkpoint_segments"] = self._memory_config.checkpoint_segments
            logs["optimizer_state_bits"] = 8 if self._memory_config.optimizer_state == "8bit" else 32
            logs["lora_rank"] = self._memory_config.lora_rank
            if self._memory_config.batch_size is not None:
                logs["update_batch_size"] = self._memory_config.batch_size
                logs["learning_rate_scale"] = self.learning_rate_scale()
            if self._step_peak_bytes is not None:
                logs["peak_memory_mib"] = round(self._step_peak_bytes / MIB, 1)
            logs["peak_rss_mib"] = round(process_peak_rss_bytes() / MIB, 1)
        super().log(logs, start_time)


def _steers(callback: Any) -> bool:
    """An engine's callback (an `MPOptCallback`, or one that speaks its protocol): the trainer connects to it."""
    return all(hasattr(callback, name) for name in ("bind_trainer", "on_out_of_memory", "held_bytes"))


def _uses_blocks(config: MemoryConfig) -> bool:
    return config.freeze_rate > 0 or config.checkpoint_segments > 0 or config.lora_rank > 0
