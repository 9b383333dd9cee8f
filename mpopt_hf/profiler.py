"""Measure what one training step under a `MemoryConfig` costs: peak memory by category and time.

The step is the trainer's step: apply the knobs, split the effective batch into micro-batches,
forward under autocast, ``loss * share`` backward each, ``optimizer.step()``,
``zero_grad(set_to_none=True)``. Backends:

* CUDA: the caching allocator's own counters (``max_memory_allocated``/``max_memory_reserved``)
  give the total; one extra step under ``MemTracker`` splits it by category.
* CPU: ``torch.distributed._tools.mem_tracker.MemTracker`` (live tensor bytes by category) and,
  for the total, the profiler's allocation events (``profile_memory=True``), which also see the
  workspaces kernels allocate internally.
* fake: the same step on ``FakeTensorMode`` copies of the model, optimizer and batch, so a
  configuration's peak is *predicted* without compute or memory, even for a model that does
  not fit the device.

`measure` runs inside a live training run, so it restores the weights, buffers, gradients,
optimizer state, RNG state, train/eval mode and knob configuration it found.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed._tools.mod_tracker import ModTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import flop_registry

from .blocks import ModelBlocks, find_blocks
from .config import PRECISIONS, MemoryConfig
from .knobs import apply_memory_config, autocast_context, knob_state, remove_knobs
from .memory_model import (
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
from .microbatch import batch_size_of, micro_batch_shares, split_batch
from .store import ProfileKey, ProfileStore, make_key

MiB = 2**20

# MemTracker reference-type names (its enum values) -> our categories.
_CATEGORY_OF = {
    "Parameter": "weights",
    "Buffer": "weights",
    "Gradient": "gradients",
    "Optstate": "optimizer_state",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "inputs",
}
CATEGORIES = ("weights", "gradients", "optimizer_state", "activations", "temporaries", "inputs")


@dataclass
class Measurement:
    """Peak memory (bytes, split by category at the moment of the peak) and step time of one configuration.

    ``peak_bytes`` is what counts against a budget: the allocator-level peak (CUDA: the caching
    allocator's counter; CPU: the profiler's allocation events), which includes kernel workspaces no
    tensor accounts for; ``tracked_peak_bytes`` is the tensors' own peak (the categories add up to it).
    """

    config: MemoryConfig
    device: str
    backend: str
    batch_size: int
    peak_bytes: int
    weights: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    temporaries: int = 0
    inputs: int = 0
    tracked_peak_bytes: int = 0
    reserved_bytes: int | None = None
    step_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MiB

    def categories(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in CATEGORIES}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = self.config.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Measurement":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["config"] = MemoryConfig.from_dict(dict(data["config"]))
        return cls(**values)


# ---------------------------------------------------------------------------- the step


def loss_of(output: Any) -> torch.Tensor:
    """The scalar loss a model returned (``.loss``, a tuple's first element, or a 0-d tensor)."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output:
        loss = output[0]
    if loss is None and torch.is_tensor(output):
        loss = output
    if not torch.is_tensor(loss) or loss.dim() != 0:
        raise ValueError(
            f"The model returned no scalar loss (got {type(output).__name__}); profiling needs a batch with labels "
            "(or return_loss=True for CLIP) so that model(**batch).loss is defined."
        )
    return loss


def device_type_of(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return "cpu" if param is None else param.device.type


def train_step(
    model: nn.Module,
    batch: Mapping[str, Any],
    config: MemoryConfig,
    optimizer: torch.optim.Optimizer,
    scaler: Any = None,
    max_micro_batches: int | None = None,
    on_micro_batch: Callable[[int], None] | None = None,
) -> None:
    """One training step under ``config`` (knobs already applied), as the trainer runs it.

    ``max_micro_batches`` cuts the step short for prediction: the peak is reached within the
    first two micro-batches (the second is the first with gradients already allocated), later
    ones repeat the second.
    """
    device_type = device_type_of(model)
    micro_batches = split_batch(batch, config.micro_batch_size)
    shares = micro_batch_shares(micro_batches)
    pairs = list(zip(micro_batches, shares))[:max_micro_batches]
    for index, (micro_batch, share) in enumerate(pairs):
        if on_micro_batch is not None:
            on_micro_batch(index)
        with autocast_context(config, device_type):
            output = model(**micro_batch)
        loss = loss_of(output) * share
        del output  # as in Trainer.training_step: only the loss lives through backward
        (scaler.scale(loss) if scaler is not None else loss).backward()
        del loss
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- snapshot / restore


def _to_cpu(value: Any) -> Any:
    return tree_map_only(torch.Tensor, lambda t: t.detach().to("cpu", copy=True), value)


@dataclass
class _Snapshot:
    """What a measurement may change, copied to host memory so that it can be put back exactly."""

    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    training: bool
    config: MemoryConfig | None

    @classmethod
    def take(cls, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any) -> "_Snapshot":
        state = knob_state(model)
        return cls(
            params=[p.detach().to("cpu", copy=True) for p in model.parameters()],
            buffers=[b.detach().to("cpu", copy=True) for b in model.buffers()],
            grads=[None if p.grad is None else p.grad.detach().to("cpu", copy=True) for p in model.parameters()],
            optimizer=_to_cpu(optimizer.state_dict()),
            scaler=None if scaler is None else _to_cpu(scaler.state_dict()),
            rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            training=model.training,
            config=None if state is None else state.config,
        )

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        if self.config is None:
            remove_knobs(model)
        else:
            apply_memory_config(model, self.config)
        with torch.no_grad():
            for p, saved, grad in zip(model.parameters(), self.params, self.grads):
                p.copy_(saved)
                p.grad = None if grad is None else grad.to(p.device)
            for b, saved in zip(model.buffers(), self.buffers):
                b.copy_(saved)
        optimizer.load_state_dict(self.optimizer)
        if scaler is not None and self.scaler is not None:
            scaler.load_state_dict(self.scaler)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        model.train(self.training)


@contextlib.contextmanager
def restored_after(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any = None) -> Iterator[None]:
    """Run a block that trains ``model`` and leave model, optimizer and RNG exactly as they were."""
    snapshot = _Snapshot.take(model, optimizer, scaler)
    optimizer.zero_grad(set_to_none=True)
    try:
        yield
    finally:
        snapshot.restore(model, optimizer, scaler)


# ---------------------------------------------------------------------------- measuring


def _tracked_tensors(batch: Mapping[str, Any]) -> list[torch.Tensor]:
    return [v for v in batch.values() if torch.is_tensor(v)]


def _tracker_peak(tracker: MemTracker) -> dict[str, int]:
    """The tracker's peak snapshot (one device) in our categories, plus ``total``."""
    snap = tracker.get_tracker_snapshot("peak")
    out = dict.fromkeys(CATEGORIES, 0)
    out["total"] = 0
    for dev_snap in snap.values():
        for ref, nbytes in dev_snap.items():
            name = getattr(ref, "value", ref)
            if name in _CATEGORY_OF:
                out[_CATEGORY_OF[name]] += int(nbytes)
            elif name == "Total":
                out["total"] += int(nbytes)
    return out


class _NoHandle:
    def remove(self) -> None:
        pass


class _StepTracker(MemTracker):
    """MemTracker keeping the step's peak only.

    MemTracker also keeps a peak per module, walking every module's statistics after every op;
    the profiler needs the global peak alone, and that walk dominated its cost (about 40%).
    """

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, dev_snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                self._peak_mem[dev] = dev_snap["Total"]
                self._peak_mem_snap[dev] = dict(dev_snap)


def new_tracker(model: nn.Module) -> MemTracker:
    """A MemTracker for one step of ``model`` that accepts frozen parameters.

    MemTracker registers a gradient hook on every parameter of a module it first sees, which
    raises for ``requires_grad=False``; frozen parameters get placeholder handles instead (they
    never receive a gradient, so the hook would never fire).
    """
    needed = ("_param_to_grad_hook_handles", "_curr_mem_snap", "_peak_mem", "_peak_mem_snap")
    tracker = _StepTracker()
    if not all(hasattr(tracker, name) for name in needed):  # pragma: no cover - guards against torch changes
        raise RuntimeError(f"torch {torch.__version__}: MemTracker internals changed; mpopt_hf.profiler needs an update.")
    for p in model.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHandle(), _NoHandle())
    return tracker


def _tracked_step(
    model: nn.Module, batch: Mapping[str, Any], config: MemoryConfig, optimizer: torch.optim.Optimizer, scaler: Any,
    max_micro_batches: int | None = None, allocator: bool = False,
) -> dict[str, int]:
    """One step under MemTracker; with ``allocator`` (CPU) also the allocator-level peak from the
    profiler's allocation events, which sees kernel workspaces that no tensor accounts for."""
    tracker = new_tracker(model)
    tracker.track_external(model, optimizer, *_tracked_tensors(batch))
    use_profiler = allocator and not torch.autograd.profiler._is_profiler_enabled
    context = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
               if use_profiler else contextlib.nullcontext())
    with tracker:
        start = sum(d.get("Total", 0) for d in tracker.get_tracker_snapshot("current").values())
        with context as prof:
            # MemTracker refuses a second call of the root module in one context unless its module stats are reset.
            train_step(model, batch, config, optimizer, scaler, max_micro_batches, lambda _: tracker.reset_mod_stats())
    out = _tracker_peak(tracker)
    out["allocator"] = start + _max_allocated(prof) if use_profiler else out["total"]
    return out


def _max_allocated(prof: Any) -> int:
    """Highest running sum of the CPU allocations and frees a profile recorded (bytes above its start)."""
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def _timed_steps(
    model: nn.Module, batch: Mapping[str, Any], config: MemoryConfig, optimizer: torch.optim.Optimizer, scaler: Any,
    steps: int,
) -> list[float]:
    on_cuda = device_type_of(model) == "cuda"
    times = []
    for _ in range(steps):
        if on_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, batch, config, optimizer, scaler)
        if on_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def measure(
    model: nn.Module,
    batch: Mapping[str, Any],
    config: MemoryConfig,
    optimizer: torch.optim.Optimizer,
    steps: int = 3,
    warmup: int = 1,
    scaler: Any = None,
) -> Measurement:
    """Run ``warmup + steps`` real steps of ``config`` (plus one tracked step) and put everything back.

    The step time is the median of the ``steps`` timed steps; memory comes from a step after the
    warm-up, so optimizer state exists as it will in training.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"measure needs steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}.")
    device = next(model.parameters()).device
    with restored_after(model, optimizer, scaler):
        apply_memory_config(model, config)
        model.train()
        _timed_steps(model, batch, config, optimizer, scaler, max(warmup, 1))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = _timed_steps(model, batch, config, optimizer, scaler, steps)
        reserved = None
        if device.type == "cuda":
            allocator_peak = torch.cuda.max_memory_allocated(device)
            reserved = torch.cuda.max_memory_reserved(device)
        tracked = _tracked_step(model, batch, config, optimizer, scaler, allocator=device.type == "cpu")
    return Measurement(
        config=config,
        device=_device_label(device),
        backend="cuda" if device.type == "cuda" else "memtracker+profiler",
        batch_size=batch_size_of(batch),
        peak_bytes=allocator_peak if device.type == "cuda" else max(tracked["allocator"], tracked["total"]),
        tracked_peak_bytes=tracked["total"],
        reserved_bytes=reserved,
        step_s=statistics.median(times),
        step_times_s=times,
        **{name: tracked[name] for name in CATEGORIES},
    )


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


# ---------------------------------------------------------------------------- fake execution


@dataclass
class FakeSetup:
    """Fake copies of a model, its optimizer and a batch, sharing one ``FakeTensorMode``."""

    mode: FakeTensorMode
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: dict[str, Any]
    initial_state: dict[Any, dict[str, Any]] = field(default_factory=dict)  # the optimizer state copied in

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
    model: nn.Module, batch: Mapping[str, Any], optimizer: torch.optim.Optimizer, blocks: ModelBlocks | None = None
) -> ModelStructure:
    """The exact terms: weights, gradients per freezable group, optimizer state, inputs."""
    blocks = blocks or find_blocks(model)
    state = knob_state(model)
    trainable = dict(state.baseline_requires_grad) if state is not None else {id(p): p.requires_grad for p in model.parameters()}
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
        return state, _tracker_peak(tracker)["total"] - base, counter.ops

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
    structure = model_structure(model, batch, optimizer, blocks)
    setup = fake_setup(model, optimizer, batch)
    fake_blocks = find_blocks(setup.model)
    units, kinds, _ = units_of(fake_blocks)
    n = fake_blocks.n_blocks
    batches = {size: fake_batch(setup, batch, size) for size in sizes}

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
    return MemoryModel(structure, spans)


# ---------------------------------------------------------------------------- profile: fit once, remember


@dataclass
class Profile:
    """A fitted memory model and the measurements behind it; ``reused`` when it came from the store."""

    key: ProfileKey
    model: MemoryModel
    measurements: list[Measurement]
    reused: bool


def input_signature(batch: Mapping[str, Any]) -> tuple[tuple[int, ...], str]:
    """The main input's per-sample shape, and every batched input as ``name:shape`` for the store key."""
    total = batch_size_of(batch)
    shapes = {k: tuple(v.shape[1:]) for k, v in sorted(batch.items())
              if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == total}
    main = next((shapes[k] for k in ("pixel_values", "input_ids", "input_values") if k in shapes),
                next(iter(shapes.values()), ()))
    text = ";".join(f"{k}:{'x'.join(map(str, s)) or 'scalar'}:{batch[k].dtype}".replace("torch.", "")
                    for k, s in shapes.items())
    return main, text


def profile_key(model: nn.Module, batch: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> ProfileKey:
    main, inputs = input_signature(batch)
    key = make_key(model, main, next(model.parameters()).device, optimizer=optimizer)
    return ProfileKey(**{**key.to_dict(), "input_shape": main, "inputs": inputs})


def choose_fit_configs(model: MemoryModel, space: list[MemoryConfig], batch_size: int, k: int = 3) -> list[MemoryConfig]:
    """At most ``k`` configurations to measure, spread to pin down what the traces cannot see:
    the largest activations (workspace per sample), another precision, a small micro-batch (time per op)."""
    if k <= 0 or not space:
        return []
    ranked = sorted(space, key=lambda c: model.predict(c, batch_size).peak_bytes)
    main = "fp32" if any(c.precision == "fp32" for c in space) else ranked[-1].precision
    chosen = [max((c for c in ranked if c.precision == main), key=lambda c: model.predict(c, batch_size).peak_bytes)]
    others = [c for c in ranked if c.precision != main]
    if others and len(chosen) < k:  # its workspace per sample is best seen at the largest micro-batch
        plain = [c for c in others if c.freeze_rate == 0 and c.checkpoint_segments == 0] or others
        chosen.append(max(plain, key=lambda c: (c.micro_batch_size, -c.freeze_rate, -c.checkpoint_segments)))
    small = [c for c in ranked if c.precision == main and c not in chosen
             and c.micro_batch_size == min(max(2, batch_size // 4), batch_size) and c.checkpoint_segments > 0]
    rest = small or [c for c in ranked if c not in chosen]
    if rest and len(chosen) < k:
        chosen.append(rest[len(rest) // 2])
    return chosen[:k]


def fit_profile(
    model: nn.Module,
    batch: Mapping[str, Any],
    optimizer: torch.optim.Optimizer,
    space: list[MemoryConfig],
    store: ProfileStore | None = None,
    n_measure: int = 3,
    steps: int = 3,
    warmup: int = 1,
) -> Profile:
    """The memory model of ``model`` for ``space``: from the store when it holds one, else traced,
    calibrated on at most ``n_measure`` (<= 3) measured configurations, and stored."""
    if not 0 <= n_measure <= 3:
        raise ValueError(f"n_measure must be in 0..3 (the fit uses at most 3 measurements), got {n_measure}.")
    key = profile_key(model, batch, optimizer)
    precisions = sorted({c.precision for c in space}, key=PRECISIONS.index)
    if store is not None:
        stored = store.load_fit(key)
        if stored is not None:
            try:
                memory_model = MemoryModel.from_dict(stored)
            except (KeyError, TypeError, ValueError) as err:
                warnings.warn(f"Ignoring the stored fit in {store.location} ({err}); fitting afresh.", stacklevel=2)
            else:
                if set(precisions) <= set(memory_model.precisions):
                    # the structure is cheap and exact: take it from the live model (optimizer state may have grown)
                    memory_model.structure = model_structure(model, batch, optimizer)
                    measured = [Measurement.from_dict(m.data) for m in store.measurements(key)]
                    return Profile(key, memory_model, measured, reused=True)
    memory_model = build_memory_model(model, batch, optimizer, precisions)
    batch_size = batch_size_of(batch)
    measured = []
    for config in choose_fit_configs(memory_model, space, batch_size, n_measure):
        try:
            measured.append(measure(model, batch, config, optimizer, steps=steps, warmup=warmup))
        except torch.OutOfMemoryError as err:  # the device said no: remember it, fit on the others
            if store is not None:
                store.mark_infeasible(key, config, f"out of memory while profiling: {err}"[:500])
    memory_model.calibrate([(m.config, m.batch_size, m.peak_bytes, m.step_s) for m in measured])
    if store is not None:
        for m in measured:
            store.add_measurement(key, m.config, m.to_dict())
        store.save_fit(key, memory_model.to_dict())
    return Profile(key, memory_model, measured, reused=False)
