"""One run at a time per output (`pipelines.storage.lease`): on a local output folder and on
SeaweedFS, with real processes and real races."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import fsspec
import pytest

from pipelines.errors import OutputBusy
from pipelines.processes import identify
from pipelines.storage import OutputLayout, resolve
from pipelines.storage.lease import OutputLease, create_exclusive, live_holder
from tests import goldens
from tests.s3_fixtures import s3_prefix, seaweed  # noqa: F401


def write_lease(root, run_id: str, **fields) -> None:
    """Another run's lease, as its process wrote it."""
    now = time.time()
    doc = {"run_id": run_id, "host": "other-host", "pid": 1, "pid_start": None,
           "started": now - 60, "renewed": now, **fields}
    root.mkdir(parents=True, exist_ok=True)
    (root / "_lease.json").write_text(json.dumps(doc))


def held(root) -> dict:
    return json.loads((root / "_lease.json").read_text())


def lease(root, run_id: str, **kwargs) -> OutputLease:
    return OutputLease(fsspec.filesystem("file"), str(root), str(root), run_id, **kwargs)


def test_a_second_run_is_refused_until_the_first_releases(tmp_path):
    first = lease(tmp_path, "run-a")
    first.acquire()
    assert OutputLayout(str(tmp_path)).lease == str(tmp_path / "_lease.json")
    assert held(tmp_path)["host"] == socket.gethostname()
    assert held(tmp_path)["pid_start"] is not None
    with pytest.raises(OutputBusy, match=f"output {tmp_path} is being written by run run-a "
                                         f"\\(on {socket.gethostname()}, pid "):
        lease(tmp_path, "run-b").acquire()
    retry = lease(tmp_path, "run-a")  # a retry of the same run takes its own lease over
    retry.acquire()
    retry.release()
    first.release()
    assert not (tmp_path / "_lease.json").exists()
    second = lease(tmp_path, "run-b")
    second.acquire()
    second.release()


def test_the_lease_is_renewed_while_the_run_holds_it(tmp_path):
    holding = lease(tmp_path, "run-a", renew_s=0.05)
    holding.acquire()
    before = held(tmp_path)["renewed"]
    time.sleep(0.4)
    assert held(tmp_path)["renewed"] > before
    holding.release()


def test_a_lease_of_a_dead_process_or_a_lapsed_one_does_not_hold_the_output(tmp_path):
    fs = fsspec.filesystem("file")
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    start = identify(gone.pid).start
    gone.wait()
    write_lease(tmp_path, "died-here", host=socket.gethostname(), pid=gone.pid, pid_start=start)
    assert live_holder(fs, str(tmp_path), None) is None
    write_lease(tmp_path, "lapsed", renewed=time.time() - 1000)
    assert live_holder(fs, str(tmp_path), None) is None
    taken = lease(tmp_path, "run-a")  # a dead holder's lease is taken over
    taken.acquire()
    assert held(tmp_path)["run_id"] == "run-a"
    taken.release()
    write_lease(tmp_path, "elsewhere")  # another host, renewed just now: it holds the output
    assert live_holder(fs, str(tmp_path), None)["run_id"] == "elsewhere"
    with pytest.raises(OutputBusy, match="run elsewhere \\(on other-host, pid 1, .* lease "
                                         "renewed 0 s ago\\).*lapses 180 s after"):
        lease(tmp_path, "run-a").acquire()


def race(acquire_one, runs: int) -> tuple[list[str], list[str]]:
    """`acquire_one(run_id)` from `runs` threads released at the same instant: (run ids that
    took the lease, run ids refused)."""
    barrier = threading.Barrier(runs)
    took, refused = [], []

    def one(run_id: str) -> None:
        barrier.wait()
        try:
            acquire_one(run_id)
            took.append(run_id)
        except OutputBusy:
            refused.append(run_id)

    threads = [threading.Thread(target=one, args=(f"run-{i}",)) for i in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return took, refused


def test_of_runs_starting_at_the_same_instant_exactly_one_holds_the_output(tmp_path):
    """The lease is a conditional create: however the runs interleave, one creates it and the
    others find it taken; also when they all take over the same lapsed lease at once."""
    leases = {}

    def acquire(run_id: str) -> None:
        leases[run_id] = lease(tmp_path, run_id)
        leases[run_id].acquire()

    for attempt in range(5):
        if attempt % 2:
            write_lease(tmp_path, "lapsed", renewed=time.time() - 1000)
        took, refused = race(acquire, 6)
        assert len(took) == 1 and len(refused) == 5, (attempt, took, refused)
        assert held(tmp_path)["run_id"] == took[0]
        leases[took[0]].release()


def test_the_conditional_create_against_seaweedfs(seaweed, s3_prefix):  # noqa: F811
    """SeaweedFS answers `If-None-Match: *` (s3fs's mode "xb"): a second create of the lease
    is refused, and of runs racing on one S3 output exactly one holds it."""
    fs, root = resolve(f"{s3_prefix}/out", seaweed.storage_options)
    path = OutputLayout(root).lease
    assert create_exclusive(fs, path, b'{"run_id": "first"}')
    assert not create_exclusive(fs, path, b'{"run_id": "second"}')
    assert fs.cat_file(path) == b'{"run_id": "first"}'
    fs.rm(path)
    leases = {}

    def acquire(run_id: str) -> None:
        leases[run_id] = OutputLease(fs, root, f"{s3_prefix}/out", run_id)
        leases[run_id].acquire()

    took, refused = race(acquire, 4)
    assert len(took) == 1 and len(refused) == 3, (took, refused)
    assert json.loads(fs.cat_file(path))["run_id"] == took[0]
    leases[took[0]].release()
    assert not fs.exists(path)


def test_the_job_refuses_an_output_another_run_holds_before_planning(tmp_path):
    from pipelines.job import JobError, JobSpec, check_job

    (tmp_path / "in").mkdir()
    shutil.copy(goldens.INPUTS / "a01_tone_0p5s_16k.wav", tmp_path / "in")
    write_lease(tmp_path / "out", "nightly-1")
    spec = JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                   model=str(goldens.CHECKPOINT))
    with pytest.raises(JobError, match="is being written by run nightly-1"):
        check_job(spec)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_lease.json"]


def test_the_same_run_id_from_a_second_command_here_is_refused_from_elsewhere_taken_over(
        tmp_path):
    """A retry of a run (same run id) takes its lease over: in the same process, or on another
    host after its first process died. A second live command of this host with that run id is
    another run."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lease(tmp_path, "run-a", host=socket.gethostname(), pid=other.pid,
                    pid_start=identify(other.pid).start)
        with pytest.raises(OutputBusy, match=f"run run-a \\(on {socket.gethostname()}, "
                                             f"pid {other.pid},"):
            lease(tmp_path, "run-a").acquire()
    finally:
        other.kill()
        other.wait()
    write_lease(tmp_path, "run-a", host="other-host")
    retried = lease(tmp_path, "run-a")
    retried.acquire()
    assert held(tmp_path)["host"] == socket.gethostname()
    retried.release()


def test_a_lease_left_behind_by_an_ended_run_of_this_process_does_not_hold_the_output(
        tmp_path, monkeypatch):
    """The store refused the lease's removal when the run ended (it was down): the file stays,
    but the next run of this process is not refused by it."""
    ended = lease(tmp_path, "run-a")
    ended.acquire()
    monkeypatch.setattr(ended.fs, "rm", lambda path: (_ for _ in ()).throw(OSError("down")))
    ended.release()  # logged, not raised
    monkeypatch.undo()
    assert held(tmp_path)["run_id"] == "run-a"
    after = lease(tmp_path, "run-b")
    after.acquire()
    after.release()


def test_a_container_sharing_the_host_name_is_another_machine(tmp_path):
    """A lease written in another pid namespace (a container with this host name) whose pid
    number is free here is not judged dead by that pid: it lapses by time, as another host's
    does; one of this namespace with that dead pid is over at once."""
    from pipelines.storage.lease import _pid_space

    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    start = identify(gone.pid).start
    gone.wait()
    here = _pid_space()
    assert set(here) == {"boot_id", "pid_ns"}
    fs = fsspec.filesystem("file")
    write_lease(tmp_path, "in-a-container", host=socket.gethostname(), pid=gone.pid,
                pid_start=start, boot_id=here["boot_id"], pid_ns=here["pid_ns"] + 1)
    assert live_holder(fs, str(tmp_path), None)["run_id"] == "in-a-container"
    write_lease(tmp_path, "in-a-container", host=socket.gethostname(), pid=gone.pid,
                pid_start=start, **here)
    assert live_holder(fs, str(tmp_path), None) is None
