"""Leave a model as a measurement found it: weights, buffers, gradients, optimizer state, loss scaler, RNG state,
train/eval mode and knob configuration.

The copy lives in host memory, or, with ``spill_dir``, in a safetensors file in that folder, read back one
tensor at a time. On a CPU the host *is* the device whose memory is budgeted, and a host copy of a ViT-B's
weights and AdamW state (about 1 GiB) would not fit beside the step it isolates; on disk it costs nothing there.
Only this module writes and reads the file, which is removed when the copy is restored.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils._pytree import tree_map, tree_map_only

from ..model.knobs import apply_memory_config, knob_state, remove_knobs
from ..training.adapter_optimizer import sync_adapters
from ..training.optimizer_state import set_state_bits, state_bits
from ..training.snapshot import to_host


class _Key(str):
    """A tensor's name in the copy (a plain string in the optimizer's state stays a string)."""


def _separate(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory or are not contiguous: copy those (rare; tied weights
    are one parameter already)."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else id(t)
        out[key] = t.clone() if ptr in seen or not t.is_contiguous() else t
        seen.add(ptr)
    return out


class StateCopy:
    """A copy of what a measurement may change; `restore` puts it back exactly."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any = None,
                 spill_dir: str | None = None) -> None:
        state = knob_state(model)
        self.config = None if state is None else state.config
        self.training = model.training
        self.state_bits = state_bits(optimizer)
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.scaler = None if scaler is None else to_host(scaler.state_dict())
        tensors: dict[str, torch.Tensor] = {}

        def name(key: str, t: torch.Tensor) -> _Key:
            tensors[key] = t.detach()
            return _Key(key)

        params = list(model.parameters())
        self.params = [name(f"p{i}", p) for i, p in enumerate(params)]
        self.buffers = [name(f"b{i}", b) for i, b in enumerate(model.buffers())]
        self.grads = [None if p.grad is None else name(f"g{i}", p.grad) for i, p in enumerate(params)]
        saved, count = optimizer.state_dict(), itertools.count()
        # every tensor at any depth (bitsandbytes nests its 8-bit moments in a dict of the state) becomes a name
        state = tree_map(lambda v: name(f"o{next(count)}", v) if torch.is_tensor(v) else copy.deepcopy(v),
                         saved["state"])
        self.optimizer = {"param_groups": copy.deepcopy(saved["param_groups"]), "state": state}
        self.file: str | None = None
        self.held: dict[str, torch.Tensor] = {}
        if spill_dir is None:
            self.held = {k: v.to("cpu", copy=True) for k, v in tensors.items()}
        else:
            fd, self.file = tempfile.mkstemp(prefix="mpopt_measure_", suffix=".safetensors", dir=spill_dir)
            os.close(fd)
            save_file(_separate(tensors), self.file)

    @contextlib.contextmanager
    def _reader(self) -> Iterator[Callable[[str], torch.Tensor]]:
        if self.file is None:
            yield self.held.__getitem__
            return
        with safe_open(self.file, framework="pt") as f:
            yield f.get_tensor

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any = None) -> None:
        if self.config is None:
            remove_knobs(model)
        else:
            apply_memory_config(model, self.config)
        sync_adapters(optimizer, model)  # the adapters the copy was taken with (re-made, if a config replaced them)
        optimizer.state.clear()  # the measured steps' state goes before the copy's comes back
        with self._reader() as get, torch.no_grad():
            for p, key, grad in zip(model.parameters(), self.params, self.grads):
                p.copy_(get(key))
                p.grad = None if grad is None else get(grad).to(p.device)
            for b, key in zip(model.buffers(), self.buffers):
                b.copy_(get(key))
            state = tree_map_only(_Key, get, self.optimizer["state"])
            optimizer.load_state_dict({"state": state, "param_groups": copy.deepcopy(self.optimizer["param_groups"])})
        set_state_bits(optimizer, self.state_bits)  # the loaded state has its old form; new states take it again
        if scaler is not None and self.scaler is not None:
            scaler.load_state_dict(self.scaler)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        model.train(self.training)
        self.discard()

    def discard(self) -> None:
        self.held = {}
        if self.file is not None and os.path.exists(self.file):
            os.remove(self.file)
        self.file = None


@contextlib.contextmanager
def restored_after(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any = None,
                   spill_dir: str | None = None) -> Iterator[None]:
    """Run a block that trains ``model`` and leave model, optimizer and RNG exactly as they were; ``spill_dir``:
    keep the copy in a file there instead of host memory."""
    saved = StateCopy(model, optimizer, scaler, spill_dir)
    optimizer.zero_grad(set_to_none=True)
    try:
        yield
    finally:
        try:
            saved.restore(model, optimizer, scaler)
        finally:
            saved.discard()
