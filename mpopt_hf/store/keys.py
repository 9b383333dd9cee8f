"""Profile keys: what identifies a model, a device and a run's inputs, so that a profile is found again.

A `ProfileKey` holds everything that changes the cost of a step (the model's signature, the input shape, the
dtype, the device, the torch version, the optimizer); its `digest` is the storage key of both backends.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


def _stable_hash(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_signature(model: torch.nn.Module) -> str:
    """``Class:config-hash:parameter-count``: what identifies a model architecture, not its weights.

    A ``PreTrainedModel`` is hashed by its config (minus fields that do not change the graph's
    memory, such as the transformers version); a plain module by its printed structure.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        data = {k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
    else:
        data = repr(model)
    n_params = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}:{_stable_hash(data)}:{n_params}"


def device_name(device: torch.device | str) -> str:
    """A device's model name (``NVIDIA H100 80GB HBM3``), or ``cpu``: profiles do not move between them."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def machine_signature(device: torch.device | str = "cpu") -> str:
    """What decides the bytes a machine adds to a step's tensors (kernel workspaces, allocator rounding):
    on CPU the instruction set oneDNN may use and the thread count, on CUDA the CUDA and cuDNN versions.
    Calibrations are kept per signature, never carried to another machine's kernels."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda{torch.version.cuda}/cudnn{torch.backends.cudnn.version()}"
    isa = torch.backends.cpu.get_cpu_capability()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return f"{isa}{f'/onednn<={cap}' if cap else ''}/threads{torch.get_num_threads()}"


@dataclass(frozen=True)
class ProfileKey:
    """Everything that changes what a configuration costs."""

    model_signature: str
    input_shape: tuple[int, ...]
    dtype: str
    device: str
    torch_version: str = field(default_factory=lambda: torch.__version__)
    optimizer: str = ""
    inputs: str = ""  # every batched input as name:shape:dtype, for models with several
    machine: str = ""  # machine_signature(): kernels and threads, which change what the machine adds

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProfileKey":
        return cls(**{**data, "input_shape": tuple(data["input_shape"])})

    def digest(self) -> str:
        """A short, stable id used as the storage key."""
        return _stable_hash(self.to_dict())


def make_key(
    model: torch.nn.Module,
    input_shape: tuple[int, ...],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> ProfileKey:
    """The key of ``model`` on ``device`` for per-sample inputs of ``input_shape``."""
    if dtype is None:
        first = next(model.parameters(), None)
        dtype = first.dtype if first is not None else torch.float32
    opt = "" if optimizer is None else f"{type(optimizer).__name__}:{_stable_hash(_optimizer_defaults(optimizer))}"
    return ProfileKey(
        model_signature=model_signature(model),
        input_shape=tuple(input_shape),
        dtype=str(dtype).replace("torch.", ""),
        device=device_name(device),
        optimizer=opt,
        machine=machine_signature(device),
    )


def _optimizer_defaults(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {k: v for k, v in optimizer.defaults.items() if isinstance(v, (bool, int, float, str, type(None), tuple))}
