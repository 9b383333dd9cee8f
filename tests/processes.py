"""For tests that start other processes: a free local port, and the command of two gloo CPU processes."""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two(script, *args) -> list[str]:
    """``script args`` under `torch.distributed.run`, two processes on this machine, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), str(script), *map(str, args)]
