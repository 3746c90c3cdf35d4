"""Processes read from /proc, for tests that start services and must stop exactly them.

A process is (pid, start time in clock ticks after boot): immune to PID reuse.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from pipelines.procfs import alive, proc_stat


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def marked(env_name: str, prefix: str) -> list[tuple[int, int]]:
    """Live processes (not this one) whose environment holds ``env_name=<prefix>...``."""
    needle = f"\0{env_name}={prefix}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        st = proc_stat(int(entry.name))
        if st is None or st[0] in "ZXx":
            continue
        try:
            if needle in b"\0" + (entry / "environ").read_bytes():
                found.append((int(entry.name), st[2]))
        except OSError:
            continue
    return sorted(found)


def stop(procs: list[tuple[int, int]], timeout_s: float = 10.0) -> None:
    """SIGTERM, wait, SIGKILL what is left: exactly these processes."""
    live = [p for p in procs if alive(*p)]
    for pid, _ in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(alive(*p) for p in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, start in live:
        if alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(alive(*p) for p in live) and time.monotonic() < deadline:
        time.sleep(0.05)
