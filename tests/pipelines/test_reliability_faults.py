"""Faults injected into a running job: a label actor killed by PID, the object store stopped
and restarted. Real SeaweedFS, a real local Ray, the tiny checkpoint; no mocks.

The label stage is slowed (a subclass that sleeps, shipped to the workers by value) only so
that a fault reliably lands while work is left; the labelling itself is the real one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import ray.cloudpickle

from pipelines import stages
from pipelines.job import RunFailed, run_job
from pipelines.local_stack import SeaweedS3
from pipelines.storage import (
    RetryPolicy,
    StorageError,
    check_output,
    fetch,
    list_objects,
    resolve,
)
from tests import processes
from tests.s3_fixtures import s3_prefix, seaweed  # noqa: F401
from tests.pipelines.test_job import encode, read_table, spec_for, tone, upload

pytestmark = pytest.mark.slow
LABEL_PROCTITLE = b"ray::MapWorker(MapBatches(SlowLabelStage))"


class SlowLabelStage(stages.LabelStage):
    def __call__(self, batch):
        time.sleep(0.6)
        return super().__call__(batch)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def slow_labels(monkeypatch):
    monkeypatch.setattr(stages, "LabelStage", SlowLabelStage)


def clips(n: int) -> dict:
    return {f"clip{i:02d}.wav": (lambda i=i: encode(tone(1 + i % 2, 16000, freq=200 + 40 * i),
                                                    16000, "WAV", "PCM_16"))
            for i in range(n)}


def small_batches(seaweed, prefix, **overrides):
    """One plan shard, so one Ray block, per two objects: shards finish one after another."""
    return spec_for(seaweed, prefix, tasks=["asr", "emotion"], semantic_tokens=False,
                    plan_shard_rows=2, stages={"label": {"batch_size": 1, "num_cpus": 0.5},
                                               "write": {"batch_size": 2, "num_cpus": 0.25}},
                    **overrides)


class JobThread(threading.Thread):
    """run_job in the background; `.result` or `.error` when done."""

    def __init__(self, spec):
        super().__init__(daemon=True)
        self.spec, self.result, self.error = spec, None, None

    def run(self):
        try:
            self.result = run_job(self.spec)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc


def wait_for(condition, job: JobThread, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert job.is_alive(), f"the job ended before {what}: {job.error or job.result}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def files_shards(fs, root: str) -> list[str]:
    fs.invalidate_cache()
    return [p for p in fs.find(f"{root}/files") if p.endswith(".parquet")]


def label_actors(ray_dir: str) -> list[tuple[int, float, bool]]:
    """(pid, start time, busy with a batch) of this Ray's label actors: their raylet (the
    parent) runs with our temp dir, so other Rays on the machine never match."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
            if not title.startswith(LABEL_PROCTITLE):
                continue
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        actor = processes.identify(int(entry.name))
        if ray_dir.encode() in parent and actor is not None and processes.alive(*actor):
            found.append((*actor, b".submit" in title))
    return found


def assert_exactly_once(seaweed, output: str, expected_uris: set[str]) -> list[dict]:
    files = read_table(seaweed, output, "files").to_pylist()
    uris = [f["source_uri"] for f in files]
    assert sorted(uris) == sorted(expected_uris)  # every input once, none twice
    segments = read_table(seaweed, output, "segments").to_pylist()
    keys = [(s["source_uri"], s["segment_index"]) for s in segments]
    assert len(keys) == len(set(keys)) == sum(f["num_segments"] for f in files)
    return files


# -- 1. worker death -------------------------------------------------------------------------

def test_label_actor_killed_mid_run_is_restarted_and_every_input_lands_once(
        seaweed, s3_prefix, ray_local, slow_labels):
    names = clips(10)
    upload(seaweed, f"{s3_prefix}/in", names)
    fs, root = resolve(f"{s3_prefix}/out", seaweed.storage_options)
    job = JobThread(small_batches(seaweed, s3_prefix))
    job.start()

    # mid-run: some shards written, and the label actor busy with a batch of the rest
    wait_for(lambda: files_shards(fs, root), job, 180, "the first files shard")
    (victim,) = wait_for(lambda: [a[:2] for a in label_actors(ray_local) if a[2]], job, 60,
                         "a busy label actor")
    written_before = len(files_shards(fs, root))
    assert processes.alive(*victim)
    os.kill(victim[0], signal.SIGKILL)  # no graceful exit
    wait_for(lambda: not processes.alive(*victim), job, 10, "the label actor to die")
    replacement = wait_for(lambda: [a for a in label_actors(ray_local) if a[0] != victim[0]],
                           job, 120, "a restarted label actor")
    job.join(timeout=240)
    assert not job.is_alive() and job.error is None, job.error

    assert written_before < len(names) / 2  # the kill really was mid-run
    assert replacement
    report = job.result
    assert report["processed"] == len(names) and report["status"] == {"ok": len(names)}
    files = assert_exactly_once(seaweed, f"{s3_prefix}/out",
                                {f"{s3_prefix}/in/{n}" for n in names})
    assert {f["run_id"] for f in files} == {report["run_id"]}


# -- 3. object store outage ------------------------------------------------------------------

@pytest.fixture
def own_store(tmp_path):
    """A SeaweedFS this test may stop and restart (the shared one serves other tests)."""
    server = SeaweedS3(tmp_path / "weed", buckets=("audio",))
    server.start()
    yield server
    server.stop()


def test_storage_calls_ride_out_a_restart_with_backoff(own_store, caplog):
    opts = own_store.storage_options
    upload(own_store, "s3://audio/rs/in", {"a.wav": lambda: b"payload"})
    policy = RetryPolicy(attempts=40, base_delay_s=0.1, max_delay_s=1.0, budget_s=30)
    calls = {"read": lambda: fetch("s3://audio/rs/in/a.wav", opts, retry=policy),
             "list": lambda: [i.uri for i in list_objects("s3://audio/rs/in", None, opts,
                                                           retry=policy)],
             "write": lambda: check_output("s3://audio/rs/out", opts, retry=policy)}
    for name, call in calls.items():
        own_store.stop()
        restarter = threading.Timer(2.0, own_store.start)
        restarter.start()
        caplog.clear()
        started = time.monotonic()
        try:
            result = call()
        finally:
            restarter.join()
        elapsed = time.monotonic() - started
        assert elapsed >= 1.5, name  # it waited for the store instead of failing
        retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
        assert len(retries) >= 2, name
        assert all("unavailable" in r.getMessage() for r in retries)
        pauses = [float(r.getMessage().rsplit("retrying in ", 1)[1].split()[0])
                  for r in retries]
        assert max(pauses) <= policy.max_delay_s and pauses[-1] > pauses[0]  # backoff grows
        assert result in (b"payload", ["s3://audio/rs/in/a.wav"], None), name


def test_an_outage_past_the_budget_fails_fast_and_clearly(own_store):
    opts = own_store.storage_options
    own_store.stop()
    policy = RetryPolicy(attempts=50, base_delay_s=0.2, max_delay_s=1.0, budget_s=2.0)
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        fetch("s3://audio/x/a.wav", opts, retry=policy)
    elapsed = time.monotonic() - started
    assert err.value.kind == "unavailable" and 1 < err.value.attempts < 50
    assert elapsed < policy.budget_s + 1.5
    assert "s3://audio/x/a.wav" in str(err.value) and "gave up after" in str(err.value)


def job_past_its_first_shard(store, prefix: str, names: dict, policy: RetryPolicy):
    """Upload `names`, start the job in the background (slow labels, small shards) and wait
    until its first files shard is written. Returns (spec, job, files shards written so far)."""
    upload(store, f"{prefix}/in", names)
    spec = small_batches(store, prefix, storage_retry=policy)
    fs, root = resolve(f"{prefix}/out", store.storage_options)
    job = JobThread(spec)
    job.start()
    return spec, job, len(wait_for(lambda: files_shards(fs, root), job, 180,
                                   "the first files shard"))


def test_job_survives_a_ten_second_store_outage(own_store, ray_local, slow_labels):
    names = clips(8)
    prefix = "s3://audio/outage"
    _, job, written_before = job_past_its_first_shard(own_store, prefix, names, RetryPolicy(
        attempts=60, base_delay_s=0.2, max_delay_s=2.0, budget_s=60))
    own_store.stop()
    down_at = time.monotonic()
    time.sleep(10)  # the fault itself: ten seconds without a store
    assert job.is_alive()  # still waiting for the store, not failed
    own_store.start()
    job.join(timeout=240)
    assert not job.is_alive() and job.error is None, job.error
    assert time.monotonic() - down_at >= 10

    assert written_before < len(names) / 2
    report = job.result
    assert report["processed"] == len(names) and report["status"] == {"ok": len(names)}
    assert_exactly_once(own_store, f"{prefix}/out", {f"{prefix}/in/{n}" for n in names})
    retried = [line for path in Path(ray_local).rglob("worker-*.err")
               for line in path.read_text(errors="replace").splitlines()
               if "storage unavailable" in line and "retrying in" in line]
    assert retried, "the workers never retried: the outage missed the run"


def test_outage_beyond_the_budget_fails_clearly_and_a_rerun_resumes(own_store, ray_local,
                                                                     slow_labels):
    names = clips(8)
    prefix = "s3://audio/long-outage"
    spec, job, _ = job_past_its_first_shard(own_store, prefix, names, RetryPolicy(
        attempts=20, base_delay_s=0.2, max_delay_s=1.0, budget_s=3))
    own_store.stop()
    job.join(timeout=120)
    assert not job.is_alive()
    assert isinstance(job.error, RunFailed) and job.error.exit_code == 1, job.error
    message = str(job.error)
    assert message.startswith("unavailable: s3://audio/long-outage/"), message
    assert "gave up after" in message and "rerun resumes" in message
    assert own_store.admin.secret_key not in message

    own_store.start()
    partial = len(read_table(own_store, f"{prefix}/out", "files"))
    assert 0 < partial < len(names)
    report = run_job(spec)
    assert report["planned"]["already_done"] == partial
    assert report["processed"] == len(names) - partial
    assert_exactly_once(own_store, f"{prefix}/out", {f"{prefix}/in/{n}" for n in names})
