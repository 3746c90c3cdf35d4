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
between the two periods would misjudge it). Taking over a lapsed lease is claimed with another
conditional create, named by the lapsed lease's bytes (`<lease>.<hash>.takeover`, removed when
the run ends): of runs taking it over together, only the claimant replaces it. A retry of the same
run (same run id: a Prefect retry in the same process, or on another host) takes its own lease
over; another process of this host with the same run id is refused like any other run.

On a store without conditional writes (a plain fsspec filesystem), the create degrades to
"write if absent, then read back": the run whose lease is not there when it reads back steps back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from pipelines.errors import OutputBusy
from pipelines.processes import ProcessIdentity, identify, is_running
from pipelines.storage.errors import client_error
from pipelines.storage.layout import OutputLayout

log = logging.getLogger(__name__)

RENEW_S = 30.0
TTL_S = 180.0
ACQUIRE_TRIES = 40  # looks at a lease being written or released meanwhile, 50 ms apart
# the run ids whose lease this process holds now: one of its leases left behind (a removal the
# store refused when the run ended) does not hold the output against its next run
_HELD: set[str] = set()


def read_lease(fs, path: str) -> dict[str, Any] | None:
    """The lease at `path`, or None: absent, or half written (not a live holder)."""
    try:
        return _parsed(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _parsed(raw: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and "run_id" in doc else None


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
    return doc.get("pid_start") is not None and not is_running(
        ProcessIdentity(int(doc["pid"]), float(doc["pid_start"])))


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
        self._claims: list[str] = []  # takeover claims of lapsed leases, removed on release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _doc(self) -> bytes:
        return json.dumps({"run_id": self.run_id, **_process(), "started": self.started,
                           "renewed": time.time()}).encode()

    def _write(self) -> None:
        self.fs.pipe_file(self.path, self._doc())

    def acquire(self) -> None:
        """Raises OutputBusy (naming the holder) when another run holds the output."""
        _HELD.add(self.run_id)  # before it is written: this process's other runs see it held
        try:
            self._acquire()
        except BaseException:
            _HELD.discard(self.run_id)
            raise
        self._thread = threading.Thread(target=self._renew, name="output-lease", daemon=True)
        self._thread.start()

    def _acquire(self) -> None:
        for _ in range(ACQUIRE_TRIES):
            if create_exclusive(self.fs, self.path, self._doc()):
                break
            try:
                raw = self.fs.cat_file(self.path)
            except FileNotFoundError:  # its holder released it just now: try again
                continue
            holder = _parsed(raw)
            if holder is None:  # being written by the run that created it: look again
                time.sleep(0.05)
                continue
            if takes_over(holder, self.run_id):
                self._write()
                break
            if live(holder, self.ttl_s):
                raise OutputBusy(busy_message(self.output, holder, self.ttl_s))
            if self._take_over(raw, holder):
                break
        else:
            raise OutputBusy(f"output {self.output}: could not take its lease ({self.path}): "
                             "other runs keep taking it")
        self._check_held()

    def _take_over(self, raw: bytes, holder: dict[str, Any]) -> bool:
        """Replace the lapsed lease `raw` (its holder is gone): only the run that claims its
        takeover (a conditional create named by the lapsed lease's bytes) may; False for the
        others, which look again and find the new holder."""
        claim = f"{self.path}.{hashlib.sha256(raw).hexdigest()[:16]}.takeover"
        if not create_exclusive(self.fs, claim, self.run_id.encode()):
            time.sleep(0.05)
            return False
        log.info("taking over the lapsed lease of run %s", holder["run_id"])
        self._claims.append(claim)
        self._write()
        return True

    def _check_held(self) -> None:
        """The lease read back is ours (on a store without conditional writes, the run whose
        lease is not there steps back)."""
        first = read_lease(self.fs, self.path)
        if first is None:
            raise OutputBusy(f"output {self.output}: its lease ({self.path}) vanished as it "
                             "was taken (another run?): try again")
        if first["run_id"] != self.run_id:
            self._remove_claims()
            raise OutputBusy(busy_message(self.output, first, self.ttl_s))

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
            self._remove_claims()
        except Exception as exc:  # noqa: BLE001 - it lapses after ttl_s anyway
            log.warning("could not remove the lease %s: %s", self.path, exc)

    def _remove_claims(self) -> None:
        for claim in self._claims:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(claim)
        self._claims.clear()
