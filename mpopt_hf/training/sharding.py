"""Which distributed engines the knobs run under: DDP yes; FSDP and DeepSpeed are refused at setup, with why.

The knobs run every micro-batch's backward unsynchronised and average the gradients over ranks after the last one
(`step_recovery.StepRecovery._all_reduce_gradients`), so that one rank's out-of-memory error can be retried by every
rank together instead of hanging a collective. FSDP shards the gradients in its own reduce-scatter and gathers the
weights in every forward, and DeepSpeed's engine owns accumulation and the optimizer step: neither leaves the full
gradient where that average expects it. Until the knobs are built for them (issue 16), failing before the first step
with the way out beats a run whose gradients are silently not the whole batch's.
"""

from __future__ import annotations

from typing import Any


def sharded_engine(trainer: Any) -> str | None:
    """'fsdp', 'deepspeed' or None: the sharding engine the Trainer's arguments or accelerator turned on."""
    args = trainer.args
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(args, "deepspeed", None):
        return "deepspeed"
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(args, "fsdp", None):
        return "fsdp"
    return None


def refuse_sharded_engines(trainer: Any) -> None:
    """Raise a ValueError naming the field when the knobs are asked for under FSDP or DeepSpeed."""
    engine = sharded_engine(trainer)
    if engine is None:
        return
    value = getattr(trainer.args, engine, None)
    field = (f"TrainingArguments.{engine}={value!r}" if value else
             f"{'FSDP' if engine == 'fsdp' else 'DeepSpeed'} (turned on by the accelerate config)")
    why = {"fsdp": "FSDP shards the gradients in its own reduce-scatter, so there is no whole gradient to average "
                   "after the micro-batches",
           "deepspeed": "DeepSpeed's engine owns gradient accumulation and the optimizer step that the knobs run"}[engine]
    raise ValueError(
        f"MPOptTrainer's memory knobs (memory_config=, mpopt_args= or an MPOptCallback) do not run under {field} yet: {why}. Train "
        "with DDP instead (`torchrun` or `accelerate launch` without an FSDP or DeepSpeed config; micro-batching, "
        "freezing, checkpointing, precision and the engine all work there), or pass no memory_config, mpopt_args "
        "or MPOptCallback to train under this engine as a plain Trainer.")
