"""One run at a time per output: a lease file that the running job renews.

Two runs on one output never lost or doubled a row (shard names are content hashes), but each
wasted the other's work: the second run's planner removed the first run's to-do list as stale,
and the first then failed with its own plan "not found". So a run holds
`<output>/_runs/<run id>/lease.json` while its job runs, renewing it every `renew_s`; a run
that finds another run's lease renewed less than `ttl_s` ago is refused, naming that run. A
run that dies leaves its lease: on the same host it is over as soon as its process is gone
(pid and start time, which PID reuse cannot fake; "the same host" is the same host name, boot
and pid namespace, so a container that shares the host name counts as another host); from
another host it lapses `ttl_s` after
its last renewal (the time in the file is the holder's clock: hosts whose clocks differ by more
than the margin between the two periods would misjudge it). A retry of the same run (same run
id: a Prefect retry in the same process, or on another host) takes its own lease over; another
process of this host with the same run id is refused like any other run.

Two runs that start within the same moment both write their lease, then look again: the one
that started later (then by run id) steps back.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from pipelines.processes import ProcessIdentity, identify, is_running

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
RENEW_S = 30.0
TTL_S = 180.0
# the run ids whose lease this process holds now: one of its leases left behind (a removal the
# store refused when the run ended) does not hold the output against its next run
_HELD: set[str] = set()


class OutputBusy(Exception):
    """Another run holds the output's lease."""


def _read(fs, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(path, "rb") as handle:
            doc = json.loads(handle.read())
    except (FileNotFoundError, ValueError):
        return None  # gone meanwhile (its run finished), or half written: not a live holder
    return doc if isinstance(doc, dict) and "run_id" in doc else None


def leases(fs, root: str) -> list[dict[str, Any]]:
    """Every run's lease under `<root>/_runs`, with its `path`."""
    found = []
    for path in sorted(fs.glob(f"{root}/_runs/*/{LEASE_FILE}")):
        doc = _read(fs, path)
        if doc is not None:
            found.append({**doc, "path": path})
    return found


def _pid_space() -> dict[str, Any]:
    """What makes a pid mean one process: the kernel's boot and the pid namespace. Containers
    may share a host name (and their pid numbers overlap), never both of these. Only Linux
    shows them ({} elsewhere: the host name alone says whose pid it is)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return {}
    return {"boot_id": boot, "pid_ns": namespace}


def _process() -> dict[str, Any]:
    me = identify(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": me.start if me else None, **_pid_space()}


def _here(doc: dict[str, Any]) -> bool:
    """Whether the lease's pid is one of this machine's (same host name, and the same boot and
    pid namespace where the lease records them: a container sharing the host name is not)."""
    if doc.get("host") != socket.gethostname():
        return False
    space = _pid_space()
    return all(doc.get(key) in (None, value) for key, value in space.items())


def _holder_gone(doc: dict[str, Any]) -> bool:
    """A lease of a process of this host that no longer runs, or of this process for a run
    that has ended."""
    if not _here(doc):
        return False
    if doc.get("pid") == os.getpid():
        return doc["run_id"] not in _HELD
    return doc.get("pid_start") is not None and not is_running(
        ProcessIdentity(int(doc["pid"]), float(doc["pid_start"])))


def _takes_over(doc: dict[str, Any], run_id: str | None) -> bool:
    """A lease of `run_id` this process may take over: its own, or one from another host (a
    retry of the run elsewhere, after its first process died). Another process of this host
    with the same run id is a second command, not a retry."""
    return doc["run_id"] == run_id and (not _here(doc) or doc.get("pid") == os.getpid())


def live_holders(fs, root: str, run_id: str | None, ttl_s: float = TTL_S,
                 now: float | None = None) -> list[dict[str, Any]]:
    """The leases of other runs renewed less than `ttl_s` ago by a process that may still run,
    oldest run first."""
    now = time.time() if now is None else now
    return sorted((d for d in leases(fs, root)
                   if not _takes_over(d, run_id) and now - float(d.get("renewed", 0)) < ttl_s
                   and not _holder_gone(d)),
                  key=lambda d: (float(d.get("started", 0)), d["run_id"]))


def describe(holder: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder["started"])))
    return (f"run {holder['run_id']} (on {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {started}, lease renewed {now - float(holder['renewed']):.0f} s ago)")


def busy_message(output: str, holder: dict[str, Any], ttl_s: float) -> str:
    return (f"output {output} is being written by {describe(holder)}: wait for it to finish, or "
            "label into another output (the lease of a run that died ends with its process on "
            f"its host; from elsewhere it lapses {ttl_s:g} s after its last renewal)")


class OutputLease:
    """`acquire()` before planning, `release()` when the run ends (its folder keeps the
    report). Renewal runs in a daemon thread; a renewal the store refuses is logged and tried
    again at the next period."""

    def __init__(self, fs, root: str, output: str, run_id: str, renew_s: float = RENEW_S,
                 ttl_s: float = TTL_S):
        self.fs, self.root, self.output, self.run_id = fs, root, output, run_id
        self.renew_s, self.ttl_s = renew_s, ttl_s
        self.path = f"{root}/_runs/{run_id}/{LEASE_FILE}"
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        doc = {"run_id": self.run_id, **_process(), "started": self.started,
               "renewed": time.time()}
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(self.path, "wb") as handle:
            handle.write(json.dumps(doc).encode())

    def acquire(self) -> None:
        """Raises OutputBusy (naming the holder) when another run holds the output."""
        holders = live_holders(self.fs, self.root, self.run_id, self.ttl_s)
        if holders:
            raise OutputBusy(busy_message(self.output, holders[0], self.ttl_s))
        self._write()
        _HELD.add(self.run_id)
        first = live_holders(self.fs, self.root, None, self.ttl_s)[0]  # ours is there now
        if first["run_id"] != self.run_id:  # another run started just before this one
            _HELD.discard(self.run_id)
            self.fs.rm(self.path)
            raise OutputBusy(busy_message(self.output, first, self.ttl_s))
        self._thread = threading.Thread(target=self._renew, name="output-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self._write()
            except Exception as exc:  # noqa: BLE001 - the next period tries again
                log.warning("could not renew the lease %s: %s", self.path, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _HELD.discard(self.run_id)
        try:
            self.fs.rm(self.path)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - it lapses after ttl_s anyway
            log.warning("could not remove the lease %s: %s", self.path, exc)
