"""Detached service processes: spawning them, finding every member of a service, stopping them.

Contract:
  * A service is spawned with ``start_new_session=True`` and the marker
    ``KIMI_LABEL_STACK=<stack id>/<service>`` in its environment. Its members are the processes
    of that session or carrying that marker (Ray's daemons and workers inherit both), so a stop
    reaches exactly them, by PID, including workers started after the service came up. PIDs are
    kept with their start time (`pipelines.processes`), so a recycled PID is never taken for
    one of ours. ``ray stop`` is never used (it kills every Ray process of the user).
  * Stopping is SIGTERM to a group, a wait, then SIGKILL to what is left of it, group after
    group (so Ray's raylet goes before its GCS); a process that survives SIGKILL is an error.
  * Children spawned by this process are kept until they exit, so they are reaped (no zombies,
    no ResourceWarning) when the stop runs in the same process as the start; a CLI caller simply
    exits and leaves them to init.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import psutil

from pipelines.errors import StackError
from pipelines.processes import ProcessIdentity, identify, is_running, running_process

MARKER_ENV = "KIMI_LABEL_STACK"
# Variables of the caller that would point a service at another Ray or Prefect than its own.
_FOREIGN_ENV_PREFIXES = ("RAY_", "PREFECT_")
STOP_TIMEOUT_S = 10.0  # from SIGTERM to SIGKILL
_POLL_S = 0.05
_AFTER_SIGKILL_S = 5.0

_CHILDREN: dict[int, subprocess.Popen] = {}


# ---- spawning ------------------------------------------------------------------------------
def find_executable(name: str) -> str:
    """A console script of this environment (next to the interpreter) or, failing that, PATH."""
    for candidate in (Path(sysconfig.get_path("scripts")) / name,
                      Path(sys.executable).parent / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"no '{name}' executable next to {sys.executable} or on PATH")
    return found


def service_env(marker: str, extra: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment without its Ray/Prefect settings, plus `extra` and the marker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV_PREFIXES)}
    env.update(extra)
    env[MARKER_ENV] = marker
    return env


def spawn_detached(cmd: Sequence[str], env: Mapping[str, str], log: Path,
                   cwd: Path) -> subprocess.Popen:
    """Start `cmd` in a session of its own (a Ctrl-C to the caller does not reach it), its
    output appended to `log`; it outlives the caller."""
    with open(log, "ab") as out:
        child = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, env=dict(env), cwd=cwd,
                                 start_new_session=True)
    _CHILDREN[child.pid] = child
    return child


def log_tail(path: Path, lines: int = 20, hide: Iterable[str] = ()) -> str:
    """The last `lines` of a service's log, each of `hide` (secrets) replaced by ***."""
    try:
        tail = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
    for secret in hide:
        tail = tail.replace(secret, "***")
    return tail


# ---- finding -------------------------------------------------------------------------------
def reap(pid: int) -> None:
    """Forget our child `pid` once it has exited, reaping it (no zombie is left)."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)


def is_alive(process: ProcessIdentity) -> bool:
    """Running (not a zombie) and still the same process; reaps it when it is our child."""
    reap(process.pid)
    return is_running(process)


def process_name(pid: int) -> str:
    """The process's name ("raylet", "gcs_server", ...), or "" when it is gone."""
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return ""


def environment_value(process: psutil.Process, name: str) -> str | None:
    """One variable of a process's environment; None when unset, gone or not ours to read."""
    try:
        return process.environ().get(name)
    except psutil.Error:
        return None


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def find_processes(belongs: Callable[[psutil.Process], bool]) -> list[ProcessIdentity]:
    """Every running process but this one for which `belongs` holds, in PID order."""
    found = []
    for pid in psutil.pids():
        process = None if pid == os.getpid() else running_process(pid)
        if process is None:
            continue
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            if belongs(process):
                found.append(ProcessIdentity(pid, process.create_time()))
    return found


def members(marker: str, session: ProcessIdentity | None,
            known: Iterable[ProcessIdentity] = (),
            marker_env: str = MARKER_ENV) -> list[ProcessIdentity]:
    """Live processes of a service: those of `session` (the process spawned with a new session;
    its PID is the session id of all its descendants), those carrying ``marker_env=marker`` and
    those of `known` that still run."""
    found = {p.pid: p for p in known if is_alive(p)}
    in_session = _session_test(session)

    def belongs(process: psutil.Process) -> bool:
        if process.pid in found:
            return False
        return in_session(process) or environment_value(process, marker_env) == marker

    found.update((p.pid, p) for p in find_processes(belongs))
    return sorted(found.values())


def _session_test(session: ProcessIdentity | None) -> Callable[[psutil.Process], bool]:
    """Whether a process belongs to `session`. A dead session leader's PID can be reused only by
    a process outside our session, unless it called setsid() itself: then it leads a new
    session, with another start time, and nothing counts as ours by session any more."""
    if session is None:
        return lambda process: False
    leader = identify(session.pid)
    if leader is not None and leader.start != session.start:
        return lambda process: False
    return lambda process: (_session(process.pid) == session.pid
                            and process.create_time() >= session.start)


# ---- stopping ------------------------------------------------------------------------------
def _wait_gone(processes: Sequence[ProcessIdentity], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(is_alive(p) for p in processes):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _signal(processes: Sequence[ProcessIdentity], signum: int) -> None:
    for process in processes:
        if is_alive(process):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)


def stop_processes(groups: Sequence[Sequence[ProcessIdentity]], timeout_s: float) -> None:
    """SIGTERM each group in turn, wait up to `timeout_s` for it, SIGKILL what is left of it.
    Raises StackError naming the processes that survived SIGKILL."""
    for group in groups:
        live = [p for p in group if is_alive(p)]
        _signal(live, signal.SIGTERM)
        if _wait_gone(live, timeout_s):
            continue
        _signal(live, signal.SIGKILL)
        if not _wait_gone(live, _AFTER_SIGKILL_S):
            raise StackError(f"processes {[p.pid for p in live if is_alive(p)]} survived SIGKILL")


def one_group(processes: list[ProcessIdentity]) -> list[list[ProcessIdentity]]:
    """The stop order of a service whose processes may stop in any order: all at once."""
    return [processes]


def stop_members(find: Callable[[], list[ProcessIdentity]], timeout_s: float,
                 order: Callable[[list[ProcessIdentity]], list[list[ProcessIdentity]]] = one_group
                 ) -> bool:
    """Stop every member `find` returns, in the groups `order` makes of them, then whatever
    `find` still returns (a worker forked meanwhile). True when something was running."""
    processes = find()
    stop_processes(order(processes), timeout_s)
    late = find()
    if late:
        stop_processes([late], timeout_s)
    return bool(processes)


def stop_child(child: subprocess.Popen, timeout_s: float) -> None:
    """Stop exactly this child (SIGTERM, then SIGKILL) and reap it; a no-op once it exited."""
    if child.poll() is None:
        me = identify(child.pid)  # not reaped yet, so its PID cannot name another process
        if me is not None:
            stop_processes([[me]], timeout_s)
    child.wait(timeout=timeout_s)
    _CHILDREN.pop(child.pid, None)
