"""Recognise out-of-memory errors and free memory after one, for training and evaluation alike."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

# Allocation failures raised as RuntimeErrors, beside what accelerate's `should_reduce_batch_size` recognises: every
# one is listed, because older accelerate releases (this package allows >= 1.0) know only the CUDA, cuDNN and CPU
# ones; the CUDA runtime's own wording, cuBLAS's and the CPU allocator's other message no release knows.
_MORE_OOM_MESSAGES = (
    "CUDA out of memory.",
    "CUDA error: out of memory",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
    "HIP out of memory.",
    "MPS backend out of memory",
    "XPU out of memory.",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for `torch.OutOfMemoryError`, what accelerate's `should_reduce_batch_size` recognises, and a few more
    allocator failures raised as RuntimeErrors."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not (isinstance(exc, RuntimeError) and len(exc.args) == 1 and isinstance(exc.args[0], str)):
        return False  # (accelerate's check would fail on a RuntimeError whose one argument is not a string)
    return should_reduce_batch_size(exc) or any(message in exc.args[0] for message in _MORE_OOM_MESSAGES)


def free_memory() -> None:
    """Collect the failed step's garbage and return cached blocks to the device (accelerate's `clear_device_cache`)."""
    clear_device_cache(garbage_collection=True)


def halve_until(fits: Callable[[int], bool], n: int) -> int:
    """The largest of ``n``, ``n // 2``, ``n // 4``, ... (at least 1) that ``fits``: accelerate's
    `find_executable_batch_size` without the failed attempts, for callers that can ask a cost model first."""
    if n < 1:
        raise ValueError(f"halve_until needs n >= 1, got {n}.")
    while n > 1 and not fits(n):
        n //= 2
    return n
