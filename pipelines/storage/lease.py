"""One run at a time per output: a lease object that the running job holds and renews.

Two runs on one output never lost or doubled a row (shard names are content hashes), but each
wasted the other's work: the second run's planner removed the first run's to-do list as stale,
and the first then failed with its own plan "not found". So a running job holds
`<output>/_lease.json`, renewing it every `renew_s`.

Taking it is a conditional create (`If-None-Match: *` on S3, which s3fs sends for mode "xb";
`O_EXCL` locally): of two runs starting at the same instant, exactly one creates it, and the
other finds it taken. A run that finds the lease held by another run, renewed less than `ttl_s`
ago by a process that may still run, is refused, naming that run. A lease whose holder died is
taken over: on the same host as soon as its process is gone (pid and start time, which PID reuse
cannot fake; "the same host" is the same host name, boot and pid namespace, so a container that
shares the host name counts as another host), from another host `ttl_s` after its last renewal
(the time in the file is the holder's clock: hosts whose clocks differ by more than the margin
between the two periods would misjudge it). Taking over removes the lapsed lease and creates
anew, conditionally, so two runs taking over together still leave one holder. A retry of the same
run (same run id: a Prefect retry in the same process, or on another host) takes its own lease
over; another process of this host with the same run id is refused like any other run.

On a store without conditional writes (a plain fsspec filesystem), the create degrades to
"write if absent, then read back": the run whose lease is not there when it reads back steps back.
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

from pipelines.errors import OutputBusy
from pipelines.procfs import alive, proc_stat
from pipelines.storage.errors import client_error
from pipelines.storage.layout import OutputLayout

log = logging.getLogger(__name__)

RENEW_S = 30.0
TTL_S = 180.0
# the run ids whose lease this process holds now: one of its leases left behind (a removal the
# store refused when the run ended) does not hold the output against its next run
_HELD: set[str] = set()


def read_lease(fs, path: str) -> dict[str, Any] | None:
    """The lease at `path`, or None: absent, or half written (not a live holder)."""
    try:
        doc = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "run_id" in doc else None


def _pid_space() -> dict[str, Any]:
    """What makes a pid mean one process: the kernel's boot and the pid namespace. Containers
    may share a host name (and their pid numbers overlap), never both of these."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return {}
    return {"boot_id": boot, "pid_ns": namespace}


def _process() -> dict[str, Any]:
    stat = proc_stat(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": stat[2] if stat else None, **_pid_space()}


def _here(doc: dict[str, Any]) -> bool:
    """Whether the lease's pid is one of this machine's (same host name, and the same boot and
    pid namespace where the lease records them)."""
    if doc.get("host") != socket.gethostname():
        return False
    return all(doc.get(key) in (None, value) for key, value in _pid_space().items())


def _holder_gone(doc: dict[str, Any]) -> bool:
    """A lease of a process of this host that no longer runs, or of this process for a run
    that has ended."""
    if not _here(doc):
        return False
    if doc.get("pid") == os.getpid():
        return doc["run_id"] not in _HELD
    return doc.get("pid_start") is not None and not alive(int(doc["pid"]),
                                                          int(doc["pid_start"]))


def takes_over(doc: dict[str, Any], run_id: str | None) -> bool:
    """A lease of `run_id` this process may take over: its own, or one from another host (a
    retry of the run elsewhere, after its first process died)."""
    return doc["run_id"] == run_id and (not _here(doc) or doc.get("pid") == os.getpid())


def live(doc: dict[str, Any], ttl_s: float = TTL_S, now: float | None = None) -> bool:
    """Whether the lease still holds: renewed less than `ttl_s` ago by a process that may run."""
    now = time.time() if now is None else now
    return now - float(doc.get("renewed", 0)) < ttl_s and not _holder_gone(doc)


def live_holder(fs, root: str, run_id: str | None, ttl_s: float = TTL_S) -> dict | None:
    """The lease of another run that holds the output now, or None."""
    doc = read_lease(fs, OutputLayout(root).lease)
    if doc is None or takes_over(doc, run_id) or not live(doc, ttl_s):
        return None
    return doc


def describe(holder: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder["started"])))
    return (f"run {holder['run_id']} (on {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {started}, lease renewed {now - float(holder['renewed']):.0f} s ago)")


def busy_message(output: str, holder: dict[str, Any], ttl_s: float = TTL_S) -> str:
    return (f"output {output} is being written by {describe(holder)}: wait for it to finish, or "
            "label into another output (the lease of a run that died ends with its process on "
            f"its host; from elsewhere it lapses {ttl_s:g} s after its last renewal)")


def create_exclusive(fs, path: str, body: bytes) -> bool:
    """Write `body` to `path` unless an object is there already; False when one is. A
    conditional create where the store has one, else write-if-absent."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    try:
        with fs.open(path, "xb") as handle:
            handle.write(body)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        detail = client_error(exc)
        if detail is not None and (detail[0] == "PreconditionFailed" or detail[2] == 412):
            return False
        raise
    except (ValueError, NotImplementedError):  # no exclusive mode on this filesystem
        if fs.exists(path):
            return False
        fs.pipe_file(path, body)
        return True


class OutputLease:
    """`acquire()` before planning, `release()` when the run ends. Renewal runs in a daemon
    thread; a renewal the store refuses is logged and tried again at the next period."""

    def __init__(self, fs, root: str, output: str, run_id: str, renew_s: float = RENEW_S,
                 ttl_s: float = TTL_S):
        self.fs, self.output, self.run_id = fs, output, run_id
        self.renew_s, self.ttl_s = renew_s, ttl_s
        self.path = OutputLayout(root).lease
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> bytes:
        return json.dumps({"run_id": self.run_id, **_process(), "started": self.started,
                           "renewed": time.time()}).encode()

    def _write(self) -> None:
        self.fs.pipe_file(self.path, self._doc())

    def acquire(self) -> None:
        """Raises OutputBusy (naming the holder) when another run holds the output."""
        for _ in range(3):  # a lapsed lease removed by a rival in between: look again
            if create_exclusive(self.fs, self.path, self._doc()):
                break
            holder = read_lease(self.fs, self.path)
            if holder is not None and takes_over(holder, self.run_id):
                self._write()
                break
            if holder is not None and live(holder, self.ttl_s):
                raise OutputBusy(busy_message(self.output, holder, self.ttl_s))
            if holder is not None:  # lapsed, or its process is gone: take it over
                log.info("taking over the lapsed lease of run %s", holder["run_id"])
                self.fs.rm(self.path)
        else:
            raise OutputBusy(f"output {self.output}: could not take its lease ({self.path}), "
                             "other runs keep taking it")
        first = read_lease(self.fs, self.path)  # (a store without conditional writes)
        if first is None:
            raise OutputBusy(f"output {self.output}: its lease ({self.path}) vanished as it "
                             "was taken (another run?): try again")
        if first["run_id"] != self.run_id:
            raise OutputBusy(busy_message(self.output, first, self.ttl_s))
        _HELD.add(self.run_id)
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
            held = read_lease(self.fs, self.path)
            if held is not None and held["run_id"] == self.run_id:
                self.fs.rm(self.path)
        except Exception as exc:  # noqa: BLE001 - it lapses after ttl_s anyway
            log.warning("could not remove the lease %s: %s", self.path, exc)
