"""Freezing everything but the head keeps only the head's activations (issue 11, in bytes).

At ``freeze_rate=1.0`` the stem and every block are frozen (their parameters are bitwise unchanged
by a step: `test_blocks_families.py`); this file checks the memory side. For each family of
`tests/families.py`, with a batch of 8:

* **Measured**: torch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``) follows one
  forward + backward and we read its ``Activation`` (ACT) bytes at the start of backward, once the
  model's output is dropped and only the loss lives (as ``Trainer.training_step`` and
  `mpopt_hf.profiler.train_step` run a step). ACT is every live tensor the forward produced, so at
  that moment it is exactly what autograd keeps for backward, plus the loss. That is the figure
  freezing is meant to shrink. ACT's running peak is a different figure and is not asserted on:
  it also holds the short-lived intermediates of the frozen blocks, which exist at freeze 1.0 as
  well (inference needs them too) and are freed as soon as each op has run.
* **The head's share** (the bound, computed independently of MemTracker and of the knobs): one
  forward of the *unfrozen* model under ``torch.autograd.graph.saved_tensors_hooks``, counting the
  bytes of every storage autograd saves for backward while a head module of
  ``find_blocks(model).head`` runs, or after every block has run and no stem/block module is
  running (the model's own code after the trunk: the loss, pooling, CLIP's logits). Each storage is
  counted once; parameters, buffers and the batch are left out (MemTracker files them under other
  categories). The head's input is in this count whenever the head keeps it (a Linear or a norm
  saves its input); the head's outputs are not live at the start of backward except through what is
  saved, and the loss is added as the only slack (its storage, 4 bytes in fp32).

  It is an upper bound on what the head keeps at freeze 1.0: the head trains in both runs, and
  with its input no longer needing a gradient an op saves a subset of what it saved before (a
  Linear with a frozen input keeps its input for the weight's gradient and nothing more); and a
  tensor saved for an output the loss does not use (SAM's IoU head) is counted here but freed with
  the output in the measurement.

The asserts: ACT kept at freeze 1.0 <= the head's share + the loss, and <= half of ACT kept at
freeze 0.0, so that the test fails if freezing left the blocks' activations in place. All figures
are tensor byte counts (CPU: ``numel x element size`` per storage), so they are deterministic;
no allocator-level number is used.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker

from families import FAMILIES
from mpopt_hf.model.blocks import ModelBlocks, find_blocks
from mpopt_hf.config import MemoryConfig
from mpopt_hf.model.knobs import apply_memory_config, count_trainable_parameters

N = 8
NAMES = sorted(FAMILIES)
ACT = "Activation"  # MemTracker's name for the ACT category


def _batch_tensors(batch: Mapping[str, Any]) -> list[torch.Tensor]:
    return [v for v in batch.values() if torch.is_tensor(v)]


class _NoHandle:
    def remove(self) -> None:
        pass


class _StepTracker(MemTracker):
    """MemTracker keeping the global peak only: the per-module peaks it also keeps (a walk over every
    module's statistics after each op) are not read here and cost most of the time."""

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)


def _tracker(model: nn.Module, batch: Mapping[str, Any]) -> MemTracker:
    """A MemTracker that knows the model and the batch before the step starts.

    MemTracker registers a gradient hook on every parameter of each module it first sees, which
    raises for a frozen parameter; frozen parameters get placeholder handles instead (they never
    get a gradient, so the hook would never fire). `mpopt_hf.profiler.measure.new_tracker` does
    the same. The batch is tracked as "Other": a view of an untracked input would otherwise be
    counted as a new activation the size of the whole input.
    """
    tracker = _StepTracker()
    needed = ("_param_to_grad_hook_handles", "_update_peak_stats", "_curr_mem_snap", "_peak_mem", "_peak_mem_snap")
    if not all(hasattr(tracker, attr) for attr in needed):  # pragma: no cover - guards against torch changes
        pytest.fail(f"torch {torch.__version__}: MemTracker internals changed; update _tracker().")
    for p in model.parameters():
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHandle(), _NoHandle())
    tracker.track_external(model, *_batch_tensors(batch))
    return tracker


def _kept_activation_bytes(model: nn.Module, batch: Mapping[str, Any]) -> tuple[int, int, bool]:
    """MemTracker's ACT bytes at the start of backward, the loss's bytes, and whether the head got a gradient."""
    tracker = _tracker(model, batch)
    with tracker:
        output = model(**batch)
        loss = output.loss
        del output  # only the loss lives through backward
        gc.collect()
        kept = sum(dev.get(ACT, 0) for dev in tracker.get_tracker_snapshot("current").values())
        loss_bytes = loss.untyped_storage().nbytes()
        loss.backward()
        del loss
    head_grad = any(p.grad is not None for p in find_blocks(model).head_params())
    return kept, loss_bytes, head_grad


def _head_saved_bytes(model: nn.Module, found: ModelBlocks, batch: Mapping[str, Any]) -> int:
    """Bytes autograd saves for backward in the head's part of one forward (see the module docstring)."""
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    excluded |= {t.untyped_storage().data_ptr() for t in _batch_tensors(batch)}
    trunk = [*found.stem, *(m for i in range(found.n_blocks) for m in found.block_modules(i))]
    block_ids = {id(b) for b in found.blocks}
    depth = {"trunk": 0, "head": 0}
    blocks_done: set[int] = set()
    saved: dict[int, int] = {}

    def enter(part: str):
        def pre(module: nn.Module, args: Any) -> None:
            depth[part] += 1

        return pre

    def leave(part: str):
        def post(module: nn.Module, args: Any, output: Any) -> None:
            depth[part] -= 1
            if id(module) in block_ids:
                blocks_done.add(id(module))

        return post

    handles = []
    for part, modules in (("trunk", trunk), ("head", found.head)):
        for m in modules:
            handles += [m.register_forward_pre_hook(enter(part)), m.register_forward_hook(leave(part))]

    def pack(t: torch.Tensor) -> torch.Tensor:
        after_trunk = depth["trunk"] == 0 and len(blocks_done) == len(block_ids)
        storage = t.untyped_storage()
        if (depth["head"] > 0 or after_trunk) and storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            output = model(**batch)
    finally:
        for h in handles:
            h.remove()
    output.loss.backward()  # the step completes (and the hooks saw a real training forward)
    return sum(saved.values())


# MemTracker warns when a module is gone by backward (a loss module some models build inside forward)
@pytest.mark.filterwarnings("ignore:Module is None")
@pytest.mark.parametrize("name", NAMES)
def test_full_freeze_keeps_no_more_than_the_heads_activations(name, one_torch_thread):
    spec = FAMILIES[name]
    frozen = spec.build()
    apply_memory_config(frozen, MemoryConfig(micro_batch_size=N, freeze_rate=1.0))
    if count_trainable_parameters(frozen) == 0:  # pragma: no cover - every family here keeps a trainable head
        pytest.skip(f"{name}: freeze_rate=1.0 leaves nothing trainable, so nothing runs backward")
    kept_frozen, loss_bytes, head_grad = _kept_activation_bytes(frozen, spec.batch(N))
    assert head_grad, f"{name}: the head got no gradient at freeze_rate=1.0"

    unfrozen = spec.build()
    apply_memory_config(unfrozen, MemoryConfig(micro_batch_size=N, freeze_rate=0.0))
    kept_unfrozen, _, _ = _kept_activation_bytes(unfrozen, spec.batch(N))

    model = spec.build()
    head_share = _head_saved_bytes(model, find_blocks(model), spec.batch(N))

    figures = (f"{name}: ACT kept for backward at freeze 1.0 = {kept_frozen} B, at freeze 0.0 = {kept_unfrozen} B; "
               f"head's share = {head_share} B + loss {loss_bytes} B")
    assert kept_frozen <= head_share + loss_bytes, figures
    assert kept_frozen <= kept_unfrozen // 2, figures
