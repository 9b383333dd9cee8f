"""The exact terms of the memory model, read off the model, the batch and the optimizer without a step:
weights, gradients per freezable group, optimizer state (its class probed on tiny tensors) and inputs.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode

from ..memory_model import (
    ModelStructure,
    OptimizerCost,
    ParamGroup,
    nonneg_least_squares,
)
from ..model.blocks import ModelBlocks, find_blocks
from ..model.knobs import knob_state
from ..training.microbatch import batch_size_of
from ..training.optimizer_state import is_switchable, low_bit_min_size, mark_switchable
from .measure import tracker_peak

CUDA_BLOCK = 512  # the caching allocator rounds every allocation up to this


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (allocator-rounded on CUDA)."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device) if t.device.type != "meta" and not _is_fake(t) else id(storage)
        if key not in seen:
            seen.add(key)
            nbytes = storage.nbytes()
            total += -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK if t.device.type == "cuda" else nbytes
    return total


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, FakeTensor)


def units_of(blocks: ModelBlocks) -> tuple[list[nn.Module], list[str], list[int]]:
    """The modules the dynamic path is cut at (stem, blocks, head), their kinds and block indices."""
    units = list(blocks.stem) + list(blocks.blocks) + list(blocks.head)
    kinds = ["stem"] * len(blocks.stem) + ["block"] * blocks.n_blocks + ["head"] * len(blocks.head)
    indices = [-1] * len(blocks.stem) + list(range(blocks.n_blocks)) + [-1] * len(blocks.head)
    return units, kinds, indices


def _alloc_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor of this size takes from its device's allocator (rounded up to 512 on CUDA)."""
    nbytes = t.numel() * t.element_size()
    return -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK if t.device.type == "cuda" else nbytes


def _param_group(params: list[nn.Parameter], trainable: dict[int, bool], optimizer: torch.optim.Optimizer,
                 held: set[int]) -> ParamGroup:
    params = [p for p in params if trainable.get(id(p), p.requires_grad)]
    fresh = [p for p in params if id(p) in held and not optimizer.state.get(p)]
    sizes = sorted(_alloc_bytes(p) for p in params)
    return ParamGroup(
        grad_bytes=sum(sizes),
        tensors=len(params),
        max_tensor_bytes=sizes[-1] if sizes else 0,
        fresh_tensors=len(fresh),
        fresh_bytes=sum(_alloc_bytes(p) for p in fresh),
    )


def model_structure(
    model: nn.Module, batch: Mapping[str, Any], optimizer: torch.optim.Optimizer, blocks: ModelBlocks | None = None,
    never_grad: Sequence[int] = (),
) -> ModelStructure:
    """The exact terms: weights, gradients per freezable group, optimizer state, inputs.

    ``never_grad``: indices (in ``model.parameters()`` order) of parameters the traced backward left without a
    gradient (e.g. a decoder-only load's unused cross-attention); they count as frozen whatever their
    ``requires_grad``, as the optimizer gives them no state.
    """
    blocks = blocks or find_blocks(model)
    state = knob_state(model)
    trainable = dict(state.baseline_requires_grad) if state is not None else {id(p): p.requires_grad for p in model.parameters()}
    params = list(model.parameters())
    for index in never_grad:
        trainable[id(params[index])] = False
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    stem_params = blocks.stem_params()
    block_params = [blocks.block_params(i) for i in range(blocks.n_blocks)]
    grouped = {id(p) for p in stem_params} | {id(p) for ps in block_params for p in ps}
    rest = [p for p in model.parameters() if id(p) not in grouped]
    total = batch_size_of(batch)
    per_sample = const = 0.0
    for value in batch.values():
        if torch.is_tensor(value):
            nbytes = _alloc_bytes(value)
            if value.dim() > 0 and value.shape[0] == total:
                per_sample += nbytes / total
            else:
                const += nbytes
    group_of = {id(p): -1 for p in stem_params}
    group_of.update({id(p): i for i, ps in enumerate(block_params) for p in ps})
    order = tuple((group_of.get(id(p), -2), _alloc_bytes(p)) for g in optimizer.param_groups for p in g["params"]
                  if trainable.get(id(p), p.requires_grad))
    entries = tuple((group_of.get(id(p), -2), p.numel(), bool(optimizer.state.get(p)))
                    for g in optimizer.param_groups for p in g["params"]
                    if trainable.get(id(p), p.requires_grad) or optimizer.state.get(p)) if is_switchable(optimizer) else ()
    _, kinds, indices = units_of(blocks)
    state_tensors = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    device = next(model.parameters()).device
    return ModelStructure(
        n_blocks=blocks.n_blocks,
        unit_kinds=tuple(kinds),
        unit_blocks=tuple(indices),
        weights_bytes=_nbytes(list(model.parameters()) + list(model.buffers())),
        input_bytes_per_sample=per_sample,
        input_bytes_const=const,
        existing_state_bytes=_nbytes(state_tensors),
        stem=_param_group(stem_params, trainable, optimizer, held),
        blocks=tuple(_param_group(ps, trainable, optimizer, held) for ps in block_params),
        rest=_param_group(rest, trainable, optimizer, held),
        optimizer=optimizer_cost(optimizer, device, next(model.parameters()).dtype),
        device_type=device.type,
        optimizer_order=order,
        never_grad=tuple(never_grad),
        state_entries=entries,
        low_bit_min_size=low_bit_min_size(optimizer),
    )


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        return func(*args, **(kwargs or {}))


def optimizer_cost(optimizer: torch.optim.Optimizer, device: torch.device, dtype: torch.dtype) -> OptimizerCost:
    """Probe the optimizer's class on a few tiny tensors: state bytes per tensor and the step's transient."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    elem = torch.empty((), dtype=dtype).element_size()

    def probe(sizes: list[int]) -> tuple[int, int, int]:
        params = [torch.zeros(n, device=device, dtype=dtype, requires_grad=True) for n in sizes]
        opt = type(optimizer)(params, **defaults)
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
        state = _nbytes([v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)])
        tracker = MemTracker()
        tracker.track_external(opt, *params, *[p.grad for p in params])
        with tracker, _OpCounter() as counter:
            start = tracker.get_tracker_snapshot("current")
            opt.step()
        base = sum(d.get("Total", 0) for d in start.values())
        return state, tracker_peak(tracker)["total"] - base, counter.ops

    try:
        one, _, _ = probe([1])
        many, _, _ = probe([1024])
        shapes = ([4096], [1024, 4096], [4096, 4096], [1024, 1024, 4096])
        runs = [probe(sizes) for sizes in shapes]
    except Exception as err:  # noqa: BLE001 - an optimizer we cannot rebuild: assume Adam-like
        warnings.warn(f"Could not probe {type(optimizer).__name__} ({err}); assuming Adam-like state (2 x params).",
                      stacklevel=2)
        return OptimizerCost(0.0, 2.0, 2.0, 1.0, 0.0, 10.0)
    b = (many - one) / (1023 * elem)
    # transient = f * largest + s * second largest (single-tensor loops keep the previous tensor's
    # temporaries alive) + k * all (foreach/fused implementations work on every tensor at once)
    rows = [[max(sz) * elem, (sorted(sz)[-2] if len(sz) > 1 else 0) * elem, sum(sz) * elem] for sz in shapes]
    f, s2, k = nonneg_least_squares(rows, [float(t) for _, t, _ in runs])
    ops_per_tensor = max((runs[3][2] - runs[0][2]) / 2, 1.0)
    low_bit = low_bit_step_bytes_per_element(optimizer, device, dtype) if is_switchable(optimizer) else 0.0
    return OptimizerCost(one - b * elem, b, f, s2, k, ops_per_tensor, low_bit)


def low_bit_step_bytes_per_element(optimizer: torch.optim.Optimizer, device: torch.device, dtype: torch.dtype,
                                   n: int = 1 << 16) -> float:
    """Allocator bytes an 8-bit step of bitsandbytes' AdamW holds beyond its tensors, per element, probed on one
    tensor of ``n`` elements: its CPU kernel dequantizes the moments to fp32 inside one op, where MemTracker sees
    nothing (allocation events and CUDA's counters do)."""
    from .measure import _max_allocated

    inner = getattr(optimizer, "optimizer", optimizer)
    p = torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
    probe = mark_switchable(type(inner)([p], optim_bits=8, min_8bit_size=min(n, inner.args.min_8bit_size)))
    p.grad = torch.full_like(p, 1e-3)
    probe.step()  # the state exists from here: the next step is the steady one
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        probe.step()
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - base
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            probe.step()
        extra = _max_allocated(prof)
    return max(extra, 0) / n
