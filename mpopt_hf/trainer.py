"""`MPOptTrainer`: a `transformers.Trainer` whose training step runs under a `MemoryConfig`.

The data loader yields the *effective* batch; the step splits it into
micro-batches, accumulates their gradients (synchronising only on the last one),
and so keeps the gradient of the whole batch while holding the activations of
one micro-batch at a time. The knobs switch only at step boundaries.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer

from .blocks import find_blocks, unwrap_model
from .config import MemoryConfig, MPOptArguments
from .knobs import apply_memory_config, autocast_context, knob_state, plan_knobs
from .microbatch import batch_size_of, micro_batch_shares, split_batch
from .oom import free_memory, is_out_of_memory

if TYPE_CHECKING:  # pragma: no cover
    from .callback import MPOptCallback

# Answers the next configuration after ``config`` ran out of memory at ``step``; raises when none is left.
OOMHandler = Callable[[MemoryConfig, int], MemoryConfig]

logger = logging.getLogger(__name__)


class MPOptTrainer(Trainer):
    """A Trainer that trains under a `MemoryConfig` (micro-batching, freezing, checkpointing, precision).

    ``memory_config`` is the configuration to start with; without one the whole batch runs at once with
    no knob, i.e. exactly like `Trainer`. Switch later with `set_memory_config`. ``mpopt_args`` attaches an
    `MPOptCallback` that lets the rule engine choose (``cost_model``, ``clock``, ``store``/``store_key`` go to it).

    A step that runs out of memory is run again, whole, under the next configuration: the engine's answer
    when one is attached, else half the micro-batch. Its partial gradients are dropped first, so no sample is
    skipped and no optimizer step is doubled. In a multi-process run every rank learns of any rank's error
    (an all-reduced flag per step) and all switch together.
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
        **kwargs: Any,
    ) -> None:
        self.oom_handler: OOMHandler | None = None
        self.oom_events: list[tuple[int, MemoryConfig]] = []
        self.mpopt_callback: MPOptCallback | None = None
        if mpopt_args is not None:
            from .callback import MPOptCallback

            extra = {"clock": clock} if clock else {}
            callback = MPOptCallback(mpopt_args, cost_model=cost_model, store=store, store_key=store_key, **extra)
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), callback]
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"TrainingArguments.gradient_accumulation_steps={self.args.gradient_accumulation_steps}: MPOptTrainer "
                "accumulates gradients itself. Set gradient_accumulation_steps=1, make per_device_train_batch_size "
                "the effective batch, and choose MemoryConfig.micro_batch_size for the memory it may use."
            )
        if self.args.bf16:
            raise ValueError(
                "TrainingArguments.bf16=True: MPOptTrainer switches precision itself. Leave bf16=False and use "
                "MemoryConfig(precision='bf16')."
            )
        self._blocks = find_blocks(self.model)
        self._memory_config: MemoryConfig | None = None
        self._pending_config = memory_config or MemoryConfig(
            micro_batch_size=self.args.per_device_train_batch_size,
            precision="fp16" if self.args.fp16 else "fp32",
        )
        self._validate(self._pending_config)
        self._micro_share: float | None = None
        self._step_peak_bytes: int | None = None
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "bind_trainer"):
                callback.bind_trainer(self)

    # ------------------------------------------------------------------ the public knob API

    @property
    def memory_config(self) -> MemoryConfig:
        """The configuration in effect (or, before the first step, the one that will be)."""
        return self._memory_config or self._pending_config

    def set_memory_config(self, config: MemoryConfig) -> None:
        """Switch to ``config`` at the next step boundary. Validated now, so a bad config fails here."""
        self._validate(config)
        self._pending_config = config

    def _validate(self, config: MemoryConfig) -> None:
        if not isinstance(config, MemoryConfig):
            raise ValueError(f"memory_config must be a MemoryConfig, got {type(config).__name__}.")
        plan_knobs(config, self._blocks.n_blocks)
        device_type = self.args.device.type
        if config.precision == "fp16" and not self.args.fp16:
            raise ValueError(
                f"MemoryConfig.precision='fp16' needs TrainingArguments(fp16=True) on a CUDA device (device: "
                f"{device_type!r}), which gives the loss scaler; use 'bf16' or 'fp32' otherwise."
            )
        if self.args.fp16 and config.precision != "fp16":
            raise ValueError(
                f"MemoryConfig.precision={config.precision!r} while TrainingArguments.fp16=True: the loss scaler "
                "belongs to the whole run, so every configuration must use precision='fp16'."
            )
        if config.precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("MemoryConfig.precision='bf16' is not supported by this GPU; use 'fp16' or 'fp32'.")

    def _switch_if_pending(self, model: nn.Module) -> None:
        config = self._pending_config
        if config is None:
            return
        self._pending_config = None
        previous = self._memory_config
        apply_memory_config(model, config, blocks=self._blocks, device_type=self.args.device.type)
        self._memory_config = config
        effective = self.args.per_device_train_batch_size
        micro_steps = -(-effective // config.micro_batch_size)
        message = (
            f"memory config {config.short()}: effective batch {effective * self.args.world_size} = micro-batch "
            f"{min(config.micro_batch_size, effective)} x {micro_steps} micro-steps x {self.args.world_size} processes"
        )
        logger.info(message if previous is None else f"switched {previous.short()} -> {message}")

    def add_callback(self, callback: Any) -> None:
        """As Trainer's, and an `MPOptCallback` added later is connected to this trainer too."""
        super().add_callback(callback)
        for cb in self.callback_handler.callbacks:
            if hasattr(cb, "bind_trainer") and getattr(cb, "trainer", None) is None:
                cb.bind_trainer(self)

    # ------------------------------------------------------------------ the step

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        while True:
            self._switch_if_pending(model)
            config = self.memory_config
            error = ""
            try:
                loss = self._accumulate(model, inputs, num_items_in_batch, config)
                failed = False
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
                if not is_out_of_memory(exc):
                    raise
                failed, error = True, f"{type(exc).__name__}: {exc}"  # not the exception: its frames hold tensors
            if self._distributed:
                failed = self._any_rank(failed)
                if not failed:
                    self._all_reduce_gradients(model)
            if not failed:
                return loss
            # The step's accumulation started from zero gradients (Trainer zeroes after each optimizer step).
            model.zero_grad(set_to_none=True)
            loss = None
            free_memory()
            step = self.state.global_step
            self.oom_events.append((step, config))
            try:
                following = (self.oom_handler or _halve_micro_batch)(config, step)
            except Exception as exc:
                raise RuntimeError(
                    f"Out of memory at step {step} with {config.short()} ({error or 'on another rank'}) and no "
                    f"smaller configuration is left: {exc}"
                ) from exc
            logger.warning("out of memory at step %d with %s: running the step again with %s", step, config.short(), following.short())
            self.set_memory_config(following)

    def _accumulate(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None, config: MemoryConfig
    ) -> torch.Tensor:
        """Forward/backward every micro-batch; the gradient equals the whole batch's."""
        on_cuda = self.args.device.type == "cuda"
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(self.args.device)
        micro_batches = split_batch(inputs, config.micro_batch_size)
        shares = micro_batch_shares(micro_batches)
        normalised_by_items = self._loss_normalised_by_items(num_items_in_batch)
        total = None
        try:
            for index, (micro_batch, share) in enumerate(zip(micro_batches, shares)):
                # Several processes: no rank may enter the gradient all-reduce before all know that no rank ran out
                # of memory, so every micro-batch runs unsynchronised and `_all_reduce_gradients` follows.
                last = index == len(micro_batches) - 1 and not self._distributed
                # A mean loss is weighted by its share; a loss already divided by the whole batch's item count is not.
                self._micro_share = None if normalised_by_items else share
                sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                with sync:
                    loss = super().training_step(model, micro_batch, num_items_in_batch)
                total = loss if total is None else total + loss
        finally:
            self._micro_share = None
        if on_cuda:
            self._step_peak_bytes = torch.cuda.max_memory_allocated(self.args.device)
        return total

    @property
    def _distributed(self) -> bool:
        return self.args.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _any_rank(self, flag: bool) -> bool:
        """All-reduce an out-of-memory flag so that every rank retries the same step together."""
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.args.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item() > 0)

    def _all_reduce_gradients(self, model: nn.Module) -> None:
        """Average the accumulated gradients over ranks (what DDP's reducer does on a synchronised backward)."""
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # an unused parameter on this rank: contribute zeros, keep the collective aligned
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.args.world_size
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)

    def _loss_normalised_by_items(self, num_items_in_batch: torch.Tensor | int | None) -> bool:
        """Mirror of Trainer's rule for whether the loss is already divided by the effective batch's items."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._micro_share is None:
            return result
        if return_outputs:
            loss, outputs = result
            return loss * self._micro_share, outputs
        return result * self._micro_share

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> contextlib.AbstractContextManager:
        """Autocast for the active configuration; fp16 is left to accelerate (it owns the loss scaler)."""
        config = self.memory_config
        if config.precision == "fp16":
            return contextlib.nullcontext()
        return autocast_context(config, self.args.device.type)

    # ------------------------------------------------------------------ evaluation: its own batch handling

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):  # type: ignore[override]
        """Evaluate; on out-of-memory split the batch in halves (recursively). Training's config is untouched."""
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise
            size = batch_size_of(inputs)
            if size <= 1:
                raise
        free_memory()
        halves = split_batch(inputs, -(-size // 2))
        results = [self.prediction_step(model, half, prediction_loss_only, ignore_keys) for half in halves]
        sizes = [batch_size_of(half) for half in halves]
        losses = [r[0] for r in results]
        loss = None if any(x is None for x in losses) else sum(x * n for x, n in zip(losses, sizes)) / sum(sizes)
        return loss, _concat([r[1] for r in results]), _concat([r[2] for r in results])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        _reload_renamed_weights(unwrap_model(model if model is not None else self.model), resume_from_checkpoint)
        if self.mpopt_callback is not None:
            self.mpopt_callback.resume_from(resume_from_checkpoint)

    # ------------------------------------------------------------------ optimizer and logging

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Give the optimizer every parameter the user made trainable, frozen by a knob or not.

        Trainer keeps only ``requires_grad`` parameters; a block frozen now and unfrozen later would then never
        train. Frozen parameters get no gradient, so the optimizer leaves them (and their weight decay) alone.
        """
        state = knob_state(self.model)
        if state is None or self.optimizer is not None:
            return super().create_optimizer(model)
        params = list(self.model.parameters())
        current = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(state.baseline_requires_grad.get(id(p), p.requires_grad))
            return super().create_optimizer(model)
        finally:
            for p, flag in zip(params, current):
                p.requires_grad_(flag)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._memory_config is not None:
            logs["micro_batch_size"] = self._memory_config.micro_batch_size
            logs["freeze_rate"] = self._memory_config.freeze_rate
            logs["checkpoint_segments"] = self._memory_config.checkpoint_segments
            if self._step_peak_bytes is not None:
                logs["peak_memory_mib"] = round(self._step_peak_bytes / 2**20, 1)
        super().log(logs, start_time)


def _halve_micro_batch(config: MemoryConfig, step: int) -> MemoryConfig:
    """Without an engine: the same knobs with half the micro-batch."""
    if config.micro_batch_size <= 1:
        raise RuntimeError(f"{config.short()} ran out of memory with a micro-batch of 1.")
    return config.replace(micro_batch_size=config.micro_batch_size // 2)


def _concat(parts: list[Any]) -> Any:
    """Concatenate per-half predictions (tensors, or tuples/lists of them) along the batch dimension."""
    if parts[0] is None:
        return None
    if torch.is_tensor(parts[0]):
        return torch.cat(parts, dim=0)
    return type(parts[0])(_concat(list(items)) for items in zip(*parts))


def _reload_renamed_weights(model: nn.Module, checkpoint_dir: str) -> None:
    """Reload weights that transformers saved under legacy key names its Trainer resume does not map back.

    transformers 5.23 writes e.g. ViT and GPT-Neo checkpoints with their legacy key names, while
    ``Trainer._load_from_checkpoint`` loads the file as-is with ``strict=False``: the renamed blocks keep their
    current (e.g. random) weights and only a warning says so. ``from_pretrained`` applies the conversion.
    """
    import os

    from safetensors import safe_open
    from transformers import PreTrainedModel

    path = os.path.join(checkpoint_dir, "model.safetensors")
    if not isinstance(model, PreTrainedModel) or not os.path.isfile(path):
        return
    with safe_open(path, framework="pt") as f:
        saved = set(f.keys())
    if saved <= set(model.state_dict()):
        return
    reloaded = type(model).from_pretrained(checkpoint_dir, config=model.config)
    missing, unexpected = model.load_state_dict(reloaded.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"Could not restore the weights of {checkpoint_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    logger.info("reloaded %s through from_pretrained (its keys use legacy names)", checkpoint_dir)
