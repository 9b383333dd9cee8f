"""Whether a `MemoryConfig` can run under these `TrainingArguments`: the checks that need the run, not the model.

Kept apart from the trainer so that each refusal names the field, the value and the way out in one place.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import MemoryConfig


def check_config_for_run(config: MemoryConfig, args: Any, low_bit_ready: bool) -> None:
    """Raise ValueError if ``config`` cannot run under ``args`` (``low_bit_ready``: the optimizer can hold 8-bit
    moments)."""
    loader_batch = args.per_device_train_batch_size
    if config.batch_size is not None and (loader_batch % config.batch_size or args.gradient_accumulation_steps > 1):
        raise ValueError(
            f"MemoryConfig.batch_size={config.batch_size} must divide per_device_train_batch_size={loader_batch} "
            f"(the loader's batch, split into equal updates) with gradient_accumulation_steps=1 (got "
            f"{args.gradient_accumulation_steps}).")
    device_type = args.device.type
    for flag, precision in (("fp16", "fp16"), ("bf16", "bf16")):
        if getattr(args, flag) and config.precision != precision:
            raise ValueError(
                f"MemoryConfig.precision={config.precision!r} while TrainingArguments.{flag}=True: accelerate "
                f"runs the whole run in {precision} then (autocast{' and its loss scaler' if flag == 'fp16' else ''}), "
                f"so every configuration must use precision={precision!r}; or set {flag}=False and let the "
                "precision knob choose."
            )
    if config.precision == "fp16" and not args.fp16:
        raise ValueError(
            f"MemoryConfig.precision='fp16' needs TrainingArguments(fp16=True) on a CUDA device (device: "
            f"{device_type!r}), which gives the loss scaler; use 'bf16' or 'fp32' otherwise."
        )
    if config.optimizer_state == "8bit" and not low_bit_ready:
        raise ValueError(
            "MemoryConfig.optimizer_state='8bit' needs the optimizer built for it: give MPOptTrainer a memory_config "
            "with it, or MPOptArguments(optimizer_states=[..., '8bit']), when the trainer is created.")
    if config.precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("MemoryConfig.precision='bf16' is not supported by this GPU; use 'fp16' or 'fp32'.")
