"""Processes and ports as the services we start see them: read from /proc, bound on loopback.

A process is identified by (pid, start time in clock ticks after boot), which PID reuse cannot
fake; a port is free when a listener could bind it now, as the services bind (SO_REUSEADDR, so
connections of a stopped server lingering in TIME_WAIT do not block a restart on its port).
"""

from __future__ import annotations

import socket
from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name, from the state on (the name may contain spaces
    and ')'), or None when the process does not exist: index 0 state, 3 session id, 11 and 12
    user and system CPU ticks, 19 start time."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return raw[raw.rindex(")") + 2:].split()


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, session id, start time) of a process, or None when it does not exist."""
    rest = stat_fields(pid)
    return None if rest is None else (rest[0], int(rest[3]), int(rest[19]))


def alive(pid: int, start: int) -> bool:
    """Running (not a zombie) and still the same process."""
    st = proc_stat(pid)
    return st is not None and st[0] not in "ZXx" and st[2] == start


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind `host:port` now (as weed, uvicorn and gRPC bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
