"""Recognise out-of-memory errors and free memory after one, for training and evaluation alike."""

from __future__ import annotations

import gc

import torch

# Messages of allocation failures that are not raised as torch.OutOfMemoryError (older paths, CPU, cuBLAS/cuDNN).
_OOM_MESSAGES = (
    "CUDA out of memory.",
    "CUDA error: out of memory",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
    "MPS backend out of memory",
    "XPU out of memory.",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for `torch.OutOfMemoryError` and RuntimeErrors whose message is a known allocator failure."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return any(message in exc.args[0] for message in _OOM_MESSAGES)
    return False


def free_memory() -> None:
    """Collect the failed step's garbage and return cached blocks to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
