"""Span traces: every op of one fake forward/backward, which unit ran it and the dynamic memory around
it, from which `build_memory_model` derives the per-block memory terms (and the step's work, in flops).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed._tools.mod_tracker import ModTracker
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..config import MemoryConfig
from ..memory_model import FORWARD_END
from ..model.knobs import apply_memory_config, autocast_context
from .fake import FakeSetup
from .measure import _tracked_tensors, device_type_of, loss_of, new_tracker


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


def _flops(func: Any, args: Any, kwargs: Any, out: Any) -> float:
    counter = flop_registry.get(getattr(func, "_overloadpacket", None))
    if counter is None:
        return 0.0
    try:
        return float(counter(*args, **(kwargs or {}), out_val=out))
    except Exception:  # noqa: BLE001 - a counting formula that does not fit the call costs only accuracy of time
        return 0.0
