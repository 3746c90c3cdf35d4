"""Processes for tests that start services and must stop exactly them.

A process is (pid, start time), which PID reuse cannot fake (`pipelines.processes`); finding
and stopping them is the local stack's own (`pipelines.local_stack.supervision`).
"""

from __future__ import annotations

from pipelines.local_stack.supervision import (
    environment_value,
    find_processes,
    process_name,
    stop_processes,
)
from pipelines.processes import ProcessIdentity, identify, is_running

__all__ = ["alive", "comm", "identify", "marked", "stop"]


def alive(pid: int, start: float) -> bool:
    """Running (not a zombie) and still the same process."""
    return is_running(ProcessIdentity(pid, start))


def comm(pid: int) -> str:
    return process_name(pid)


def marked(env_name: str, prefix: str) -> list[tuple[int, float]]:
    """Live processes (not this one) whose environment holds ``env_name=<prefix>...``."""
    def carries(process) -> bool:
        value = environment_value(process, env_name)
        return value is not None and value.startswith(prefix)

    return find_processes(carries)


def stop(procs: list[tuple[int, float]], timeout_s: float = 10.0) -> None:
    """SIGTERM, wait, SIGKILL what is left: exactly these processes."""
    stop_processes([[ProcessIdentity(*p) for p in procs]], timeout_s)
