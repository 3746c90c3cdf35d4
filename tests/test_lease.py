"""One run at a time per output (`pipelines.lease`): on a local output folder, real processes."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import fsspec
import pytest

from pipelines.lease import LEASE_FILE, OutputBusy, OutputLease, live_holders
from pipelines.processes import identify
from tests import goldens


def write_lease(root, run_id: str, **fields) -> None:
    folder = root / "_runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    doc = {"run_id": run_id, "host": "other-host", "pid": 1, "pid_start": None,
           "started": now - 60, "renewed": now, **fields}
    (folder / LEASE_FILE).write_text(json.dumps(doc))


def lease(root, run_id: str, **kwargs) -> OutputLease:
    return OutputLease(fsspec.filesystem("file"), str(root), str(root), run_id, **kwargs)


def test_a_second_run_is_refused_until_the_first_releases(tmp_path):
    first = lease(tmp_path, "run-a")
    first.acquire()
    held = json.loads((tmp_path / "_runs" / "run-a" / LEASE_FILE).read_text())
    assert held["host"] == socket.gethostname() and held["pid_start"] is not None
    with pytest.raises(OutputBusy, match=f"output {tmp_path} is being written by run run-a "
                                         f"\\(on {socket.gethostname()}, pid "):
        lease(tmp_path, "run-b").acquire()
    retry = lease(tmp_path, "run-a")  # a retry of the same run takes its own lease over
    retry.acquire()
    retry.release()
    first.release()
    assert not (tmp_path / "_runs" / "run-a" / LEASE_FILE).exists()
    second = lease(tmp_path, "run-b")
    second.acquire()
    second.release()


def test_the_lease_is_renewed_while_the_run_holds_it(tmp_path):
    held = lease(tmp_path, "run-a", renew_s=0.05)
    held.acquire()
    path = tmp_path / "_runs" / "run-a" / LEASE_FILE
    before = json.loads(path.read_text())["renewed"]
    time.sleep(0.4)
    assert json.loads(path.read_text())["renewed"] > before
    held.release()


def test_a_lease_of_a_dead_process_or_a_lapsed_one_does_not_hold_the_output(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    start = identify(gone.pid).start
    gone.wait()
    write_lease(tmp_path, "died-here", host=socket.gethostname(), pid=gone.pid, pid_start=start)
    write_lease(tmp_path, "lapsed", renewed=time.time() - 1000)
    fs = fsspec.filesystem("file")
    assert live_holders(fs, str(tmp_path), None) == []
    write_lease(tmp_path, "elsewhere")  # another host, renewed just now: it holds the output
    assert [h["run_id"] for h in live_holders(fs, str(tmp_path), None)] == ["elsewhere"]
    with pytest.raises(OutputBusy, match="run elsewhere \\(on other-host, pid 1, .* lease "
                                         "renewed 0 s ago\\).*lapses 180 s after"):
        lease(tmp_path, "run-a").acquire()


def test_of_two_runs_starting_together_the_later_steps_back(tmp_path, monkeypatch):
    """Both write their lease before either sees the other's: the later one (by start time)
    removes its own and is refused."""
    mine = lease(tmp_path, "run-b")
    write = OutputLease._write

    def racing_write(self):
        write(self)
        write_lease(tmp_path, "run-a", started=self.started - 1)  # came in just before

    monkeypatch.setattr(OutputLease, "_write", racing_write)
    with pytest.raises(OutputBusy, match="run run-a"):
        mine.acquire()
    assert not (tmp_path / "_runs" / "run-b" / LEASE_FILE).exists()


def test_the_job_refuses_an_output_another_run_holds_before_planning(tmp_path):
    from pipelines.job import JobError, JobSpec, validate

    (tmp_path / "in").mkdir()
    shutil.copy(goldens.INPUTS / "a01_tone_0p5s_16k.wav", tmp_path / "in")
    write_lease(tmp_path / "out", "nightly-1")
    spec = JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                   model=str(goldens.CHECKPOINT))
    with pytest.raises(JobError, match="is being written by run nightly-1"):
        validate(spec)
    assert sorted(p.name for p in (tmp_path / "out" / "_runs").iterdir()) == ["nightly-1"]


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
    assert (tmp_path / "_runs" / "run-a" / LEASE_FILE).exists()
    after = lease(tmp_path, "run-b")
    after.acquire()
    after.release()


def test_a_container_sharing_the_host_name_is_another_machine(tmp_path):
    """A lease written in another pid namespace (a container with this host name) whose pid
    number is free here is not judged dead by that pid: it lapses by time, as another host's
    does; one of this namespace with that dead pid is over at once."""
    from pipelines.lease import _pid_space

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    start = identify(gone.pid).start
    gone.wait()
    here = _pid_space()
    assert set(here) == {"boot_id", "pid_ns"}
    write_lease(tmp_path, "in-a-container", host=socket.gethostname(), pid=gone.pid,
                pid_start=start, boot_id=here["boot_id"], pid_ns=here["pid_ns"] + 1)
    fs = fsspec.filesystem("file")
    assert [h["run_id"] for h in live_holders(fs, str(tmp_path), None)] == ["in-a-container"]
    write_lease(tmp_path, "in-a-container", host=socket.gethostname(), pid=gone.pid,
                pid_start=start, **here)
    assert live_holders(fs, str(tmp_path), None) == []
