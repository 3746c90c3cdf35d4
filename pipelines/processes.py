"""Processes and ports as the services we start see them, on every system psutil covers.

A process is identified by its PID and its start time (psutil's ``create_time``, seconds since
the epoch), which PID reuse cannot fake: a PID handed to another process comes with another
start time. Two readings of one process's start time are the same float (psutil derives it the
same way each time), so a recorded identity, also one written to JSON and read back, compares
equal exactly as long as that process runs. On Linux the start time is the boot time plus the
process's clock ticks after boot, so a step of the system clock between recording and checking
(NTP setting the time, not slewing it) makes a live process look like another one.

A port is free when a listener could bind it now, as the services bind (SO_REUSEADDR, so
connections of a stopped server lingering in TIME_WAIT do not block a restart on its port).
"""

from __future__ import annotations

import socket
from typing import NamedTuple

import psutil

_NOT_RUNNING = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


class ProcessIdentity(NamedTuple):
    """One process: its PID and its start time (``create_time``), immune to PID reuse."""

    pid: int
    start: float


def identify(pid: int) -> ProcessIdentity | None:
    """The identity of the process `pid` now, or None when there is no such process."""
    try:
        return ProcessIdentity(pid, psutil.Process(pid).create_time())
    except psutil.Error:  # gone, or a system process we may not read
        return None


def running_process(pid: int) -> psutil.Process | None:
    """The process `pid` while it runs (not a zombie), else None."""
    try:
        process = psutil.Process(pid)
        return None if process.status() in _NOT_RUNNING else process
    except psutil.Error:  # gone (a zombie included), or a system process we may not read
        return None


def is_running(process: ProcessIdentity) -> bool:
    """Whether the process still runs (not a zombie) and is still the same process."""
    current = running_process(process.pid)
    try:
        return current is not None and current.create_time() == process.start
    except psutil.Error:  # gone meanwhile
        return False


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind `host:port` now (as weed, uvicorn and gRPC bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
