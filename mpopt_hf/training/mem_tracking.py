"""Live tensor bytes by category with ``torch.distributed._tools.mem_tracker.MemTracker``, for one step.

Shared by the profiler's measurements and the trainer's sampled per-step peak on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

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


def tracker_peak(tracker: MemTracker) -> dict[str, int]:
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

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        # A step's micro-batches call the root module again. MemTracker refuses that ("multiple iterative
        # calls") to keep its per-module statistics apart; only the global peak is kept here, so the module
        # statistics start afresh at each new root call (what ``reset_mod_stats`` does between iterations).
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            name = self._mod_tracker.get_known_fqn(module)
            if set(self._mod_tracker.parents) - {name} == {"Global"}:
                self.reset_mod_stats()
        super()._pre_fw_hook(module, inputs)


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
