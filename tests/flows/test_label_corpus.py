"""Prefect flows under Prefect's test harness, on a real local Ray and the tiny checkpoint."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from tests import goldens
from tests.flow_helpers import artifacts

pytestmark = pytest.mark.slow
MODEL = str(goldens.CHECKPOINT)


def test_label_corpus_flow_labels_publishes_and_resumes(harness, ray_local, tmp_path):
    from flows.label_corpus import label_corpus
    from pipelines.spec import JobSpec

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a01_tone_0p5s_16k.wav", "a06_speech_2p37s_16k.flac"):
        shutil.copy(goldens.INPUTS / name, inputs / name)
    (inputs / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    params = JobSpec(input=str(inputs), output=f"{tmp_path / 'out'}/", model=MODEL,
                     tasks=["asr", "emotion"], max_new_tokens=4)
    report = label_corpus(params)
    assert report["processed"] == 3
    assert report["status"] == {"ok": 2, "error": 1}
    # emotion labels every segment of the two clips, silent ones included
    segments = pq.read_table(tmp_path / "out" / "segments").num_rows
    assert segments >= 2 and sum(report["label_distribution"]["emotion"].values()) == segments

    found = asyncio.run(artifacts(["label-corpus-summary", "label-corpus-labels",
                                   "label-corpus-output", "label-corpus-progress"]))
    assert set(found) == {"label-corpus-summary", "label-corpus-labels", "label-corpus-output",
                          "label-corpus-progress"}
    progress = found["label-corpus-progress"]  # updated as the run went, ended at 100 %
    assert float(progress.data) == 100.0
    assert progress.description.startswith(f"run {report['run_id']} (completed): 3/3 files "
                                           "(1 failed), ")
    summary = {row["metric"]: row["value"]
               for row in json.loads(found["label-corpus-summary"].data)}
    assert summary["ok"] == 2 and summary["errors: undecodable"] == 1
    assert f"`{tmp_path / 'out'}/files/`" in found["label-corpus-output"].data  # no `out//`

    again = label_corpus(params)  # a rerun (or a retried run) resumes: nothing left to do
    assert again["processed"] == 0 and again["planned"]["already_done"] == 3
    # a dry run through the flow: its plan, published, and nothing run
    plan = label_corpus(params.model_copy(update={"dry_run": True}))
    assert plan["planned"] == {"listed": 3, "already_done": 3, "new": 0}
    shown = asyncio.run(artifacts(["label-corpus-dry-run"]))["label-corpus-dry-run"].data
    assert "to label: 0 (0 new, 0 changed, 0 earlier errors tried again); already labelled: 3" \
        in shown

    from flows.console.demo import run_summary  # what `make demo` prints of each run

    assert run_summary(report).startswith("3 new objects (0 already labelled) in ")
    assert run_summary(report).endswith(f"s; status {report['status']}")
    assert run_summary(again).startswith("0 new objects (3 already labelled) in ")
    assert "status" not in run_summary(again)
    from flows.console.demo import error_cell  # the demo table's error column: the reason, not the URI

    row = {"source_uri": "s3://audio/in/broken.wav", "error": {
        "kind": "undecodable", "message": "s3://audio/in/broken.wav: cannot decode audio: bad"}}
    assert error_cell(row) == "undecodable: cannot decode audio: bad"


def test_label_corpus_fails_with_the_reason_before_ray(harness, tmp_path):
    from flows.label_corpus import label_corpus
    from pipelines.errors import JobError
    from pipelines.spec import JobSpec

    (tmp_path / "in").mkdir()
    shutil.copy(goldens.INPUTS / "a01_tone_0p5s_16k.wav", tmp_path / "in")
    params = JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                     model=str(tmp_path / "no-model"))
    state = label_corpus(params, return_state=True)
    assert state.is_failed()
    with pytest.raises(JobError, match="label-corpus cannot run: model: .*checkpoint folder not "
                                       "found"):
        state.result()


def test_a_failed_flow_ends_the_command_with_its_reason_and_a_bug_keeps_its_traceback(
        harness):
    """`flows.console.running.run_flow_here`: the pipeline's own errors come out as they are (a refusal
    keeps its exit code 2) and Prefect's log line of them carries no stack; any other exception
    is a run that failed (exit 1) and keeps its traceback."""
    import logging

    from prefect import flow

    from flows.console.running import run_flow_here
    from pipelines.errors import JobError, RunFailed

    @flow(name="fails-for-the-user")
    def user_error(params):
        raise JobError("s3://audio/out: access_denied: the secret key does not match")

    @flow(name="fails-by-a-bug")
    def bug(params):
        return {}["missing"]

    class Records(logging.Handler):  # what Prefect's handlers get (its loggers do not
        def __init__(self):  # propagate to pytest's)
            super().__init__()
            self.records = []

        def emit(self, record):
            if "Encountered exception" in record.getMessage():
                self.records.append(record)

    seen = Records()
    logging.getLogger("prefect.flow_runs").addHandler(seen)
    try:
        with pytest.raises(JobError) as refused:
            run_flow_here(user_error, {}, "fails-for-the-user")
        assert str(refused.value) == "s3://audio/out: access_denied: the secret key does not match"
        assert refused.value.exit_code == 2
        with pytest.raises(RunFailed) as failed:
            run_flow_here(bug, {}, "fails-by-a-bug")
        assert str(failed.value) == "KeyError: 'missing'" and failed.value.exit_code == 1
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(seen)
    user, crash = seen.records
    assert "access_denied" in user.getMessage() and user.exc_info is None
    assert isinstance(crash.exc_info[1], KeyError)


def test_kimi_label_run_console_goes_through_the_flow(tmp_path, ray_address, here):
    import subprocess
    import sys
    from pathlib import Path

    console = Path(sys.executable).with_name("kimi-label")
    (tmp_path / "in").mkdir()
    shutil.copy(goldens.INPUTS / "a02_chirp_3s_16k.wav", tmp_path / "in")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("PREFECT_API_URL", None)  # ephemeral Prefect, as a user without a server gets
    env.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)  # kimi-label turns its telemetry off

    def run(*args):
        return subprocess.run([str(console), "run", "--input", str(tmp_path / "in"),
                               "--output", f"{tmp_path / 'out'}/", *args], env=env,
                              capture_output=True, text=True, timeout=300, check=False)

    def refusal(*args):  # refused before the flow: the same console, in this process
        return here("run", "--input", tmp_path / "in", "--output", f"{tmp_path / 'out'}/", *args)

    refused = refusal("--model", str(tmp_path / "nope"))
    assert refused.returncode == 2
    assert "checkpoint folder not found" in refused.stderr
    # the job options reach the job: a .flac the --extensions leave out, an explicit run id
    shutil.copy(goldens.INPUTS / "a06_speech_2p37s_16k.flac", tmp_path / "in")
    done = run("--model", MODEL, "--tasks", "asr,scene", "--max-new-tokens", "4",
               "--extensions", "wav", "--run-id", "my-run-1", "--device", "cpu",
               "--glm-tokenizer", str(goldens.CHECKPOINT / "glm-4-voice-tokenizer"),
               "--ray-address", ray_address)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run my-run-1: 1 processed" in done.stdout and "'ok': 1" in done.stdout
    assert (tmp_path / "out" / "_runs" / "my-run-1" / "report.json").is_file()
    assert "telemetry" not in done.stderr  # offline, Prefect's telemetry logged an ERROR
    assert (f"output: {tmp_path / 'out'}/files/ and {tmp_path / 'out'}/segments/; report: "
            f"{tmp_path / 'out'}/_runs/my-run-1/report.json") in done.stdout  # no `out//`
    assert list((tmp_path / "out" / "files").glob("part-*.parquet"))
    # a finished run leaves its report only: no plan, no empty staging folder
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_runs", "files", "segments"]
    assert [p.name for p in (tmp_path / "out" / "_runs" / "my-run-1").iterdir()] == [
        "report.json"]
    # the same run id again would overwrite that report: refused before the flow
    again = refusal("--model", MODEL, "--tasks", "asr,scene", "--max-new-tokens", "4",
                    "--run-id", "my-run-1")
    assert again.returncode == 2 and "run id 'my-run-1' names a finished run" in again.stderr
    assert "Flow run" not in again.stderr


def test_label_distribution_counts_this_runs_labels_shard_by_shard(tmp_path):
    """The closed-set counts cover this run's segments only, summed over every shard, nulls
    (segments without that label) left out."""
    import pyarrow as pa

    from flows.label_corpus import label_distribution
    from pipelines.job import JobSpec

    segments = tmp_path / "out" / "segments"
    segments.mkdir(parents=True)
    pq.write_table(pa.table({"run_id": ["r1", "r1", "r0", "r1"],
                             "emotion": ["happy", "sad", "happy", None]}), segments / "a.parquet")
    pq.write_table(pa.table({"run_id": ["r1", None], "emotion": ["happy", "sad"]}),
                   segments / "b.parquet")
    spec = JobSpec(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=MODEL,
                   tasks=["asr", "emotion"])
    assert label_distribution.fn(spec, "r1") == {"emotion": {"happy": 2, "sad": 1}}
    assert label_distribution.fn(spec.model_copy(update={"tasks": ["asr"]}), "r1") == {}
