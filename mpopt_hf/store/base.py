"""What both store backends share: errors and warnings, the records and the `ProfileStore` protocol, decoding
a stored record, and who writes (`process_rank`: only rank 0 of a distributed run)."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import MemoryConfig
from .keys import ProfileKey

# one logger for the whole store package, under the name the single-module store had
logger = logging.getLogger("mpopt_hf.store")


class StoreError(RuntimeError):
    """The profile store cannot be used as it is."""


class StoreCorruptError(StoreError):
    """The store's file or keys hold something that is not a valid profile."""


class StoreReadOnlyWarning(UserWarning):
    """The profile store could only be opened read-only: nothing measured in this run is saved to it."""


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class StoredMeasurement:
    """One measured configuration as it sits in the store."""

    config: MemoryConfig
    data: dict[str, Any]
    created: float = 0.0


class ProfileStore(Protocol):
    """What every backend offers. Writes are appends or whole-value replaces, so none is lost."""

    location: str

    def add_measurement(self, key: ProfileKey, config: MemoryConfig, data: dict[str, Any]) -> None: ...
    def measurements(self, key: ProfileKey) -> list[StoredMeasurement]: ...
    def save_fit(self, key: ProfileKey, fit: dict[str, Any]) -> None: ...
    def load_fit(self, key: ProfileKey) -> dict[str, Any] | None: ...
    def mark_infeasible(self, key: ProfileKey, config: MemoryConfig, reason: str = "") -> None: ...
    def infeasible(self, key: ProfileKey) -> dict[MemoryConfig, str]: ...
    def close(self) -> None: ...


def _decode(text: str | bytes, where: str, fix: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreCorruptError(f"The profile store holds an unreadable record at {where} ({err}). {fix}") from err


def _decode_config(data: Any, where: str, fix: str) -> MemoryConfig:
    try:
        return MemoryConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise StoreCorruptError(f"The profile store holds an invalid configuration at {where} ({err}). {fix}") from err


# ----------------------------------------------------------------------------- who writes


def process_rank() -> int:
    """This process's rank among the processes of one training run; 0 when it runs alone.

    torch.distributed's rank once its process group is up; else accelerate's ``PartialState`` when one was set
    up (only looked at when accelerate is already imported: it is never created here); else the ``RANK``
    variable that torchrun, ``accelerate launch`` and deepspeed set; else 0.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    accelerate_state = sys.modules.get("accelerate.state")
    partial = getattr(accelerate_state, "PartialState", None)
    shared = getattr(partial, "_shared_state", None)
    if isinstance(shared, dict) and shared.get("process_index") is not None:
        return int(shared["process_index"])
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _resolve_read_only(read_only: bool | None) -> tuple[bool, str]:
    """``read_only=None``: read-only on every process but rank 0 (see `process_rank`)."""
    if read_only is None:
        rank = process_rank()
        if rank == 0:
            return False, ""
        return True, f"this process is rank {rank} of a distributed run and only rank 0 writes"
    return (True, "it was opened with read_only=True") if read_only else (False, "")
