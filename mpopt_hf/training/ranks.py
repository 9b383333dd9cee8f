"""Agreement between processes: every rank's engine must see the same numbers, so that all make the same
decisions (and none deadlocks in the gradient all-reduce). Without torch.distributed (or with one rank) these
return their input."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_value(value: float, op: str, device: Callable[[], torch.device]) -> float:
    """``value`` reduced over all ranks by ``op`` ('max', 'min' or 'sum'), on ``device()``."""
    if not distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(tensor, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}[op])
    return float(tensor.item())


def reduce_sums(sums: torch.Tensor, device: Callable[[], torch.device]) -> list[float]:
    """``sums`` added up over all ranks, on ``device()``."""
    if distributed():
        sums = sums.to(device())
        dist.all_reduce(sums)
    return [float(v) for v in sums.cpu()]


__all__ = ["distributed", "reduce_sums", "reduce_value"]
