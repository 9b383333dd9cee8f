"""The parts of MPOptTrainer's step that make it safe to run again: out-of-memory anywhere, non-finite steps.

An out-of-memory error in the forward, the backward, gradient clipping or the optimizer step drops the
partial step (undoing what a failed optimizer step created), switches to the next configuration and runs
the whole step again; in a multi-process run every rank learns of any rank's error and all switch
together. A step whose loss or gradient norm is not finite is skipped. A mixin: it relies on
`MPOptTrainer`'s ``_gradients`` (the step's gradient), ``memory_config`` and ``set_memory_config``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import MemoryConfig
from .batch_updates import scaled_learning_rate
from .oom import free_memory, is_out_of_memory
from .step_guard import OptimizerRollback

logger = logging.getLogger("mpopt_hf.training.trainer")


class StepRecovery:
    """Retry-on-out-of-memory, the guarded optimizer step and the non-finite skip of `MPOptTrainer`."""

    def _after_gradients(self, model: nn.Module, action: Callable[[], Any], reclip: bool) -> Any:
        """Run a part of the step that needs its gradients (clipping, the optimizer step); on out-of-memory,
        drop the step, recompute its gradients under the next configuration (clipped again if ``reclip``) and
        run ``action`` again."""
        while True:
            ok, result, error = self._attempt(action)
            if ok:
                return result
            self._recover(model, error)
            if not torch.isfinite(self._gradients(model)):
                self._flag_nonfinite("loss")
            if reclip:
                self._clip_grad_norm(model)

    def _attempt(self, action: Callable[[], Any]) -> tuple[bool, Any, str]:
        """(ok, result, error) of ``action``; not ok on every rank when any rank ran out of memory."""
        result, error = None, ""
        try:
            result = action()
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(exc):
                raise
            error = f"{type(exc).__name__}: {exc}"  # not the exception: its frames hold tensors
        failed = bool(error)
        if self._distributed:
            failed = self._any_rank(failed)
        return not failed, None if failed else result, error

    def _recover(self, model: nn.Module, error: str) -> None:
        """Undo the failed attempt (gradients, a begun optimizer step) and switch to the next configuration."""
        model.zero_grad(set_to_none=True)
        rollback, self._rollback = self._rollback, None
        stuck = rollback is not None and rollback.changed() > 0
        if self._distributed:  # a rank whose optimizer step succeeded cannot undo it: then every rank stops
            stuck = self._any_rank(stuck)
        if rollback is not None:
            rollback.undo(refuse=stuck)
        self._reset_loss_scaler()
        free_memory()
        step, config = self.state.global_step, self.memory_config
        self.oom_events.append((step, config))
        loader_batch = self.args.per_device_train_batch_size
        if config.micro_batch_size > loader_batch:  # halving starts from what really ran
            config = config.replace(micro_batch_size=loader_batch)
        try:
            following = (self.oom_handler or halve_micro_batch)(config, step)
        except Exception as exc:
            raise RuntimeError(
                f"Out of memory at step {step} with {config.short()} ({error or 'on another rank'}) and no "
                f"smaller configuration is left: {exc}"
            ) from exc
        logger.warning("out of memory at step %d with %s: running the step again with %s", step, config.short(), following.short())
        self.set_memory_config(following)

    def _reset_loss_scaler(self) -> None:
        """fp16: the failed attempt may have unscaled the gradients (clipping does); the retry starts afresh."""
        scaler = getattr(self.optimizer, "scaler", None)
        if scaler is not None and getattr(scaler, "_per_optimizer_states", None) is not None:
            from torch.amp.grad_scaler import _refresh_per_optimizer_state

            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            scaler._per_optimizer_states[id(inner)] = _refresh_per_optimizer_state()

    @property
    def _distributed(self) -> bool:
        return self.args.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _any_rank(self, flag: bool) -> bool:
        """All-reduce an out-of-memory flag so that every rank retries the same step together."""
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.args.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item() > 0)

    def _all_reduce_gradients(self, model: nn.Module) -> None:
        """Average the accumulated gradients over ranks (what DDP's reducer does on a synchronised backward),
        and broadcast rank 0's buffers (BatchNorm statistics) as DDP does before the next forward.

        A parameter no rank used keeps no gradient, as under DDP (so the optimizer leaves it alone); one that
        some rank used gets zeros from the others.
        """
        params = [p for p in model.parameters() if p.requires_grad]
        if params:
            used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.args.device)
            dist.all_reduce(used, op=dist.ReduceOp.MAX)
            params = [p for p, flag in zip(params, used.tolist()) if flag > 0]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])  # one all-reduce for all, as DDP's buckets do
            dist.all_reduce(flat)
            flat /= self.args.world_size
            for grad, synced in zip(grads, flat.split([g.numel() for g in grads])):
                grad.copy_(synced.view_as(grad))
        if getattr(model, "broadcast_buffers", False):  # every backward ran under no_sync: DDP skipped it
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    # ------------------------------------------------------------------ clipping, the optimizer step, non-finite steps

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        if not self.knobs_active or self._step_model is None:
            return super()._clip_grad_norm(model)
        clip = super()._clip_grad_norm
        return self._after_gradients(model, lambda: clip(model), reclip=False)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        # under a loss scaler an overflow is the scaler's to skip
        if self.knobs_active and norm is not None and getattr(self.optimizer, "scaler", None) is None:
            if not math.isfinite(float(norm)):
                self._flag_nonfinite("gradient norm")
        return norm

    def _flag_nonfinite(self, what: str) -> None:
        if self._skip_reason is not None or getattr(self.optimizer, "scaler", None) is not None:
            return  # fp16's loss scaler skips non-finite steps itself and backs its scale off
        self._skip_reason = what
        step = self.state.global_step
        logger.warning("step %d: the %s is not finite; the step is skipped (no update, scheduler not advanced)", step, what)
        self.log({"mpopt/nonfinite_steps_skipped": float(len(self.nonfinite.skipped) + 1)})
        self.nonfinite.note(step, what)

    def _guard_optimizer(self) -> None:
        """Route Trainer's ``optimizer.step()`` through `_optimizer_step` (once per optimizer object)."""
        optimizer = self.optimizer
        if optimizer is None or getattr(optimizer, "_mpopt_guarded", False):
            return
        original = optimizer.step
        guarded = functools.partial(self._optimizer_step, original)
        if hasattr(original, "_wrapped_by_lr_sched"):  # the scheduler's step tracking still sees every step
            guarded._wrapped_by_lr_sched = True
        optimizer.step = guarded
        optimizer._mpopt_guarded = True

    def _optimizer_step(self, original: Callable[..., Any], closure: Any = None) -> Any:
        """Skip a non-finite step (Trainer then leaves the scheduler alone); run any other so that an
        out-of-memory error in it undoes what it began and runs the whole step again."""
        optimizer, model = self.optimizer, self._step_model
        if not self.knobs_active or model is None:
            return original(closure)
        if self._skip_reason is not None:
            model.zero_grad(set_to_none=True)
            optimizer._is_overflow = True  # accelerate's "step was skipped", which Trainer reads
            self._step_batches = []
            self._step_peak_bytes = self.peak_meter.end_step()
            return None
        if getattr(optimizer, "scaler", None) is None and hasattr(optimizer, "_is_overflow"):
            optimizer._is_overflow = False
        self.nonfinite.applied()

        def step_once() -> Any:
            self._rollback = OptimizerRollback(optimizer)
            with self.peak_meter.window(model, optimizer), scaled_learning_rate(optimizer, self.learning_rate_scale()):
                return original(closure)

        try:
            return self._after_gradients(model, step_once, reclip=self.args.max_grad_norm > 0)
        finally:
            self._rollback = None
            self._step_batches = []  # the step is done: its inputs need not outlive it
            self._step_peak_bytes = self.peak_meter.end_step()


def halve_micro_batch(config: MemoryConfig, step: int) -> MemoryConfig:
    """Without an engine: the same knobs with half the micro-batch."""
    if config.micro_batch_size <= 1:
        raise RuntimeError(f"{config.short()} ran out of memory with a micro-batch of 1.")
    return config.replace(micro_batch_size=config.micro_batch_size // 2)
