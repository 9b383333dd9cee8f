"""Predict a step without running it: the same step on ``FakeTensorMode`` copies of the model,
optimizer and batch (no compute, no memory, so it works for a model that does not fit the device),
and the per-unit span traces from which `build_memory_model` derives the exact memory terms.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed._tools.mod_tracker import ModTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..blocks import ModelBlocks, find_blocks
from ..config import MemoryConfig
from ..knobs import apply_memory_config, autocast_context, knob_state, remove_knobs
from ..memory_model import (
    FORWARD_END,
    MemoryModel,
    ModelStructure,
    OptimizerCost,
    ParamGroup,
    Span,
    body_bytes_of,
    combine_traces,
    nonneg_least_squares,
    split_spans,
)
from ..microbatch import batch_size_of
from .measure import (
    CATEGORIES,
    Measurement,
    _device_label,
    _tracked_step,
    _tracked_tensors,
    tracker_peak,
    device_type_of,
    loss_of,
    new_tracker,
)

# ---------------------------------------------------------------------------- fake execution


@dataclass
class FakeSetup:
    """Fake copies of a model, its optimizer and a batch, sharing one ``FakeTensorMode``."""

    mode: FakeTensorMode
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: dict[str, Any]
    initial_state: dict[Any, dict[str, Any]] = field(default_factory=dict)  # the optimizer state copied in
    # indices (in ``model.parameters()`` order) of parameters that require a gradient but got none in a traced
    # backward with nothing frozen: the optimizer skips them, so they carry no gradient and no state
    never_grad: tuple[int, ...] | None = None

    def reset_optimizer(self) -> None:
        """Back to the copied-in optimizer state, so that predictions do not depend on their order."""
        self.optimizer.state.clear()
        for p, state in self.initial_state.items():
            self.optimizer.state[p] = dict(state)


def _fake_param(mode: FakeTensorMode, p: torch.Tensor) -> torch.Tensor:
    fake = mode.from_tensor(p)
    return nn.Parameter(fake, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else fake


def fake_setup(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any]) -> FakeSetup:
    """Fake copies that cost no memory: the module tree is copied, every tensor replaced by a fake one.

    The copy is taken with the knobs removed (then re-applied to ``model``), so that the fake model
    starts from the user's own ``requires_grad`` and no checkpoint wrapper points at the real blocks.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    state = knob_state(model)
    previous = None if state is None else state.config
    remove_knobs(model)
    try:
        memo: dict[int, Any] = {}
        for tensor in list(model.parameters()) + list(model.buffers()):
            memo[id(tensor)] = _fake_param(mode, tensor)
        fake_model = copy.deepcopy(model, memo)
    finally:
        if previous is not None:
            apply_memory_config(model, previous)
    fake_optimizer = _fake_optimizer(optimizer, memo, mode)
    fake_batch = {k: mode.from_tensor(v) if torch.is_tensor(v) else v for k, v in batch.items()}
    initial = {p: dict(state) for p, state in fake_optimizer.state.items()}
    return FakeSetup(mode, fake_model, fake_optimizer, fake_batch, initial)


def _fake_optimizer(optimizer: torch.optim.Optimizer, memo: dict[int, Any], mode: FakeTensorMode) -> torch.optim.Optimizer:
    groups = []
    for group in optimizer.param_groups:
        missing = [p for p in group["params"] if id(p) not in memo]
        if missing:
            raise ValueError(
                f"The optimizer holds {len(missing)} tensor(s) that are not parameters of the model; "
                "the profiler needs an optimizer over the model's own parameters."
            )
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [memo[id(p)] for p in group["params"]]})
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    try:
        fake = type(optimizer)(groups, **defaults)
    except TypeError as err:
        raise ValueError(
            f"Cannot rebuild {type(optimizer).__name__} from its defaults for a fake run ({err}); the profiler "
            "supports optimizers whose constructor takes (params, **optimizer.defaults), such as the torch.optim ones."
        ) from err
    for p, state in optimizer.state.items():
        if id(p) in memo:
            fake.state[memo[id(p)]] = {
                k: mode.from_tensor(v) if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()
            }
    return fake


def init_optimizer_state(setup: FakeSetup) -> None:
    """Give every trainable parameter the optimizer state one real warm-up step would have created."""
    params = [p for g in setup.optimizer.param_groups for p in g["params"] if p.requires_grad]
    fresh = [p for p in params if not setup.optimizer.state.get(p)]
    if not fresh:
        return
    with setup.mode:
        for p in fresh:
            p.grad = torch.zeros_like(p)
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)


def predict_step(
    model: nn.Module,
    batch: Mapping[str, Any],
    config: MemoryConfig,
    optimizer: torch.optim.Optimizer,
    setup: FakeSetup | None = None,
) -> Measurement:
    """Predict ``config``'s peak by running its step on fake tensors (no compute, no memory).

    Exact for the tensors the step creates; it cannot see allocator rounding or kernel workspaces
    (the memory model calibrates those from measurements). Pass ``setup`` to reuse fake copies.
    """
    setup = setup or fake_setup(model, optimizer, batch)
    apply_memory_config(setup.model, config)
    setup.model.train()
    setup.reset_optimizer()
    init_optimizer_state(setup)
    with setup.mode:
        tracked = _tracked_step(setup.model, setup.batch, config, setup.optimizer, None, max_micro_batches=2)
    device = next(model.parameters()).device
    return Measurement(
        config=config,
        device=_device_label(device),
        backend="fake",
        batch_size=batch_size_of(batch),
        peak_bytes=tracked["total"],
        tracked_peak_bytes=tracked["total"],
        **{name: tracked[name] for name in CATEGORIES},
    )


# ---------------------------------------------------------------------------- span traces


class _SpanProbe(TorchDispatchMode):
    """Records, for every op of a fake step, which unit runs it and the dynamic memory around it.

    Entered inside a ``MemTracker`` so that it reads the tracker's totals after the op's outputs
    were counted. "Dynamic" is activations + temporaries + gradients: what a step adds on top of
    weights, optimizer state and inputs.
    """

    def __init__(self, tracker: MemTracker, mod_tracker: ModTracker, units: list[nn.Module]) -> None:
        super().__init__()
        self.tracker, self.mod_tracker = tracker, mod_tracker
        self.units = units
        self.records: list[tuple[str, int, int, int, int, int, float]] = []  # see memory_model.Record
        self._fqn_to_unit: dict[str, int] = {}
        self._active: set[int] = set()
        self._entered: dict[int, int] = {}
        self._tick = 0

    def _current(self) -> tuple[int, int]:
        dyn = grads = 0
        for dev_snap in self.tracker._curr_mem_snap.values():  # read-only; get_tracker_snapshot deep-copies
            for ref, nbytes in dev_snap.items():
                name = getattr(ref, "value", ref)
                if name in ("Activation", "Temp"):
                    dyn += nbytes
                elif name == "Gradient":
                    grads += nbytes
        return dyn + grads, grads

    def _owner(self) -> int:
        if len(self._fqn_to_unit) < len(self.units):
            for index, unit in enumerate(self.units):
                fqn = self.mod_tracker.get_known_fqn(unit)
                if fqn is not None:
                    self._fqn_to_unit[fqn] = index
        active = {self._fqn_to_unit[f] for f in self.mod_tracker.parents if f in self._fqn_to_unit}
        for unit in active - self._active:
            self._entered[unit] = self._tick
            self._tick += 1
        self._active = active
        return max(active, key=self._entered.__getitem__) if active else -1

    def mark(self, owner: int) -> None:
        """A zero-op record that starts a span owned by ``owner`` (a pseudo-unit)."""
        x, grads = self._current()
        self.records.append(("fwd", owner, x, x, grads, grads, 0.0))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        before, grads_before = self._current()
        out = func(*args, **(kwargs or {}))
        after, grads_after = self._current()
        phase = "bwd" if self.mod_tracker.is_bw else "fwd"
        self.records.append((phase, self._owner(), before, after, grads_before, grads_after, _flops(func, args, kwargs, out)))
        return out


def trace_step(
    setup: FakeSetup, config: MemoryConfig, units: list[nn.Module], uncheckpoint: Iterable[nn.Module] = ()
) -> list[tuple[str, int, int, int, int, int, float]]:
    """Per-op records of one fake forward/backward of ``setup.batch`` as a single micro-batch under ``config``.

    ``uncheckpoint``: blocks whose own checkpointing flag is cleared after the knobs are applied, so
    that they run plainly while the model stays in its checkpointing context.
    """
    apply_memory_config(setup.model, config)
    for block in uncheckpoint:
        block.gradient_checkpointing = False
    setup.model.train()
    tracker = new_tracker(setup.model)
    tracker.track_external(setup.model, setup.optimizer, *_tracked_tensors(setup.batch))
    device_type = device_type_of(setup.model)
    with setup.mode, tracker, ModTracker() as mod_tracker, _SpanProbe(tracker, mod_tracker, units) as probe:
        with autocast_context(config, device_type):
            output = setup.model(**setup.batch)
            probe.mark(FORWARD_END)
        loss = loss_of(output)
        del output
        loss.backward()
        del loss
    if config.freeze_rate == 0 and setup.never_grad is None:
        setup.never_grad = tuple(i for i, p in enumerate(setup.model.parameters()) if p.requires_grad and p.grad is None)
    setup.optimizer.zero_grad(set_to_none=True)
    return probe.records


# ---------------------------------------------------------------------------- building the memory model


def _flops(func: Any, args: Any, kwargs: Any, out: Any) -> float:
    counter = flop_registry.get(getattr(func, "_overloadpacket", None))
    if counter is None:
        return 0.0
    try:
        return float(counter(*args, **(kwargs or {}), out_val=out))
    except Exception:  # noqa: BLE001 - a counting formula that does not fit the call costs only accuracy of time
        return 0.0


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


CUDA_BLOCK = 512  # the caching allocator rounds every allocation up to this


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
    return OptimizerCost(one - b * elem, b, f, s2, k, ops_per_tensor)


def fake_batch(setup: FakeSetup, batch: Mapping[str, Any], size: int) -> dict[str, Any]:
    """A fake batch of ``size`` samples shaped like ``batch``."""
    total = batch_size_of(batch)
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            if value.dim() > 0 and value.shape[0] == total:
                with setup.mode:
                    value = torch.zeros((size, *value.shape[1:]), dtype=value.dtype, device=value.device)
            else:
                value = setup.mode.from_tensor(value)
        out[key] = value
    return out


def _mode_statuses(kinds: list[str], n: int, stem: str, blocks: Sequence[str]) -> list[str]:
    out, block = [], 0
    for kind in kinds:
        if kind == "stem":
            out.append(stem)
        elif kind == "block":
            out.append(blocks[block])
            block += 1
        else:
            out.append("T")
    return out + [stem]


def build_memory_model(
    model: nn.Module,
    batch: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    precisions: Iterable[str] = ("fp32", "bf16"),
    sizes: tuple[int, int] = (2, 4),
) -> MemoryModel:
    """Trace the model on fake tensors and derive the exact terms; uncalibrated.

    Per precision, at two micro-batch sizes: every block trainable (T) and all frozen (F); then,
    in the checkpointing context (HF models change globally once any layer checkpoints), every
    block checkpointed (C) and, when the context changes anything, T and F again.
    """
    blocks = find_blocks(model)
    setup = fake_setup(model, optimizer, batch)
    fake_blocks = find_blocks(setup.model)
    units, kinds, _ = units_of(fake_blocks)
    n = fake_blocks.n_blocks
    batches = {size: fake_batch(setup, batch, size) for size in sizes}
    structure: ModelStructure | None = None  # after the first all-trainable trace: it finds `setup.never_grad`

    def trace(precision: str, rate: float, segments: int, plain: Iterable[nn.Module] = (),
              only: Sequence[int] = sizes) -> list[list]:
        out = []
        for size in only:
            setup.batch = batches[size]
            out.append(split_spans(trace_step(setup, MemoryConfig(size, rate, segments, precision), units, plain)))
        return out

    spans: dict[str, list[Span]] = {}
    all_t, all_f, all_c = ["T"] * n, ["F"] * n, ["C"] * n

    def mode(stem: str, statuses: Sequence[str]) -> tuple[list[str], dict[str, float]]:
        full = _mode_statuses(kinds, n, stem, statuses)
        return full, body_bytes_of(full, structure.unit_kinds, structure.unit_blocks, structure.stem, structure.blocks)

    for precision in precisions:
        t = trace(precision, 0.0, 0)
        if structure is None:  # which parameters a backward reaches is known now
            structure = model_structure(model, batch, optimizer, blocks, setup.never_grad or ())
        f = trace(precision, 1.0, 0)
        c = trace(precision, 0.0, n)
        # the library's own checkpointing switches the whole model into a context (e.g. no KV cache);
        # our wrapper (blocks the library cannot reach) does not, and its blocks have no flag to clear
        state = knob_state(setup.model)
        flagged = [b for b in fake_blocks.blocks if hasattr(b, "gradient_checkpointing")] \
            if state is not None and state.hf_checkpointing else []
        spans[f"{precision}/plain"] = combine_traces(
            [(*t, *mode("T", all_t)), (*f, *mode("F", all_f))], sizes)
        spans[f"{precision}/frozen"] = combine_traces([(*f, *mode("F", all_f))], sizes)
        ckpt_traces = [(*c, *mode("T", all_c))]
        # T and F inside the checkpointing context: all blocks flagged, then the flags cleared
        t_ctx = trace(precision, 0.0, n, flagged, only=sizes[:1]) if flagged else [t[0]]
        if t_ctx[0] != t[0]:
            t_ctx += trace(precision, 0.0, n, flagged, only=sizes[1:])
            ckpt_traces.append((*t_ctx, *mode("T", all_t)))
            if n > 1:
                f_ctx = trace(precision, (n - 1) / n, 1, flagged)
                ckpt_traces.append((*f_ctx, *mode("F", ["F"] * (n - 1) + ["T"])))
            fallback = [(*t, mode("T", all_t)[0], None), (*f, mode("F", all_f)[0], None)]
        else:
            fallback = [(*t, *mode("T", all_t)), (*f, *mode("F", all_f))]
        ckpt_traces += fallback
        spans[f"{precision}/ckpt"] = combine_traces(ckpt_traces, sizes)
    remove_knobs(setup.model)
    return MemoryModel(structure or model_structure(model, batch, optimizer, blocks), spans)
