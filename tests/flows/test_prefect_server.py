"""The deployment path on a real Prefect server: the embedded stack's server, S3 and Ray head (with
its dashboard and Jobs API) on 127.0.0.1, `label_corpus_on_ray.serve(...)` in its own process,
flow runs created through the client from the deployment and executed by the serve process's
runner. Each submits its labelling job to the stack's Ray through the Jobs API, with the
worker's S3 credentials as the job's environment: one labels two objects of the stack's bucket
with the tiny checkpoint (its state, Parquet output and artifacts as the server has them), one
names an input that is not there (a Failed run with the job's reason).

Every process the test starts is stopped by PID: the serve process and the flow-run processes its
runner spawns (found by a marker in their environment; the runner gives each run its own session),
then the stack (`stack_down`, which stops the server, the Ray head and its workers by PID).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from pipelines.local_stack import MARKER_ENV as STACK_MARKER_ENV
from pipelines.local_stack import StackState, stack_down, stack_up
from tests import goldens
from tests.processes import alive as _alive
from tests.processes import marked, stop

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MODEL = str(goldens.CHECKPOINT)
INPUTS = ("a01_tone_0p5s_16k.wav", "a06_speech_2p37s_16k.flac")
FLOW_NAME = "label-corpus-on-ray"
MARKER_ENV = "KIMI_LABEL_PREFECT_IT"
DEPLOY_TIMEOUT_S = 90
RUN_TIMEOUT_S = 120

# The runner executes each flow run in a multiprocessing "spawn" child, which imports this script
# again as __mp_main__: without the guard that child would start a second runner instead.
SERVE = textwrap.dedent("""
    import sys

    from flows.label_corpus_on_ray import label_corpus_on_ray

    if __name__ == "__main__":
        label_corpus_on_ray.serve(name=sys.argv[1], tags=["integration-test"])  # until SIGTERM
""")


def _marked(marker: str, env_name: str = MARKER_ENV) -> list[tuple[int, float]]:
    return marked(env_name, marker)


def _stop(procs: list[tuple[int, float]]) -> None:
    stop(procs, timeout_s=15.0)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "RAY_", "PREFECT_", MARKER_ENV, STACK_MARKER_ENV))}


@pytest.fixture
def stack():
    # Short: Ray's unix socket paths under <home>/ray must stay below 107 bytes.
    home = Path(tempfile.mkdtemp(dir="/tmp", prefix="kl-pfit-"))
    marker = uuid.uuid4().hex[:12]
    try:
        with pytest.MonkeyPatch.context() as env:  # the cluster gets no S3 credentials of ours
            for key in [k for k in os.environ if k.startswith("AWS_")]:
                env.delenv(key)
            state = stack_up(home, prefect=True, ray=True)
        yield state, marker
    finally:
        _stop(_marked(marker))  # serve and flow-run processes, if the test did not get there
        stack_down(home)
        shutil.rmtree(home, ignore_errors=True)


def _wait_for_deployment(client, name: str, serve: subprocess.Popen, log: Path):
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while True:
        assert serve.poll() is None, f"serve exited {serve.returncode}:\n{_tail(log)}"
        with contextlib.suppress(ObjectNotFound):
            return client.read_deployment_by_name(f"{FLOW_NAME}/{name}")
        assert time.monotonic() < deadline, f"no deployment after {DEPLOY_TIMEOUT_S} s:\n" \
                                            f"{_tail(log)}"
        time.sleep(0.5)


def _tail(path: Path, chars: int = 5000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _run_logs(client, flow_run_id, chars: int | None = 6000) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
        any_=[flow_run_id])))
    text = "\n".join(f"{entry.level} {entry.message}" for entry in logs)
    return text[-chars:] if chars else text


def _wait_final(client, flow_run_ids, serve: subprocess.Popen, log: Path) -> dict:
    """The flow runs, once all of them are in a final state."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        runs = {i: client.read_flow_run(i) for i in flow_run_ids}
        if all(run.state.is_final() for run in runs.values()):
            return runs
        if time.monotonic() > deadline:
            pytest.fail(f"flow runs {[r.state.name for r in runs.values()]} after "
                        f"{RUN_TIMEOUT_S} s\n"
                        + "".join(f"run logs:\n{_run_logs(client, i)}\n" for i in runs)
                        + f"serve log:\n{_tail(log)}")
        assert serve.poll() is None, f"serve exited {serve.returncode}:\n{_tail(log)}"
        time.sleep(1)


def test_served_deployment_submits_label_corpus_to_ray_through_the_jobs_api(stack, tmp_path):
    import s3fs
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    state, marker = stack
    assert isinstance(state, StackState)
    env = state.env()
    api, dashboard = env["PREFECT_API_URL"], env["RAY_API_SERVER_ADDRESS"]
    assert api.startswith("http://127.0.0.1:") and dashboard.startswith("http://127.0.0.1:")
    secret = env["AWS_SECRET_ACCESS_KEY"]
    # the credentials can only come from the flow's side: the cluster has none
    raylet = next(p.pid for p in state.services["ray"].main)
    assert "AWS_SECRET_ACCESS_KEY" not in psutil.Process(raylet).environ()

    fs = s3fs.S3FileSystem(**state.storage_options())
    prefix = f"audio/it-{marker}"
    fs.pipe({f"{prefix}/in/{name}": (goldens.INPUTS / name).read_bytes() for name in INPUTS})
    output = f"s3://{prefix}/out"

    # The serve process: the deployment's runner, a client of the stack's server, S3 and Ray.
    deployment_name = f"it-{marker}"
    script = tmp_path / "serve_label_corpus_on_ray.py"
    script.write_text(SERVE)
    log = tmp_path / "serve.log"
    serve_env = {
        **_clean_env(), **env,
        "PREFECT_HOME": str(Path(state.home) / "serve-prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PYTHONPATH": str(ROOT),
        MARKER_ENV: marker,
    }
    started = time.monotonic()
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, str(script), deployment_name], cwd=ROOT,
                                 env=serve_env, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with SyncPrefectClient(api) as client:
            deployment = _wait_for_deployment(client, deployment_name, serve, log)
            params = {"output": output, "model": MODEL, "tasks": ["asr", "emotion"],
                      "max_new_tokens": 4}
            # where to submit: the worker's RAY_API_SERVER_ADDRESS, or the parameter
            good, bad = (client.create_flow_run_from_deployment(deployment.id, parameters={
                "params": {**params, "input": f"s3://{prefix}/{where}/",
                           "output": f"{output}-{where}"}, **more})
                for where, more in (("in", {}), ("missing", {"ray_dashboard": dashboard})))
            runs = _wait_final(client, [good.id, bad.id], serve, log)
            elapsed = time.monotonic() - started
            run, failed = runs[good.id], runs[bad.id]
            logs = _run_logs(client, good.id, chars=None)
            assert run.state.is_completed(), (
                f"flow run {run.state.name}: {run.state.message}\n"
                f"run logs:\n{logs[-6000:]}\nserve log:\n{_tail(log)}")
            artifacts = {a.key: a for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
                    any_=[good.id])))}
            # a job that fails fails its flow run, with the job's reason
            assert failed.state.is_failed(), failed.state
            assert f"s3://{prefix}/missing/: no object or folder with objects" in failed.state.message
            assert "Ray job kimi-label-" in failed.state.message
            failed_logs = _run_logs(client, bad.id, chars=None)
        print(f"flow runs final {elapsed:.1f} s after the serve process started")

        # The summary artifact on the server: every input processed and ok.
        summary = {row["metric"]: row["value"]
                   for row in json.loads(artifacts["label-corpus-summary"].data)}
        assert summary["inputs processed"] == len(INPUTS)
        assert summary["ok"] == len(INPUTS) and summary["errors"] == 0
        run_id = artifacts["label-corpus-summary"].description.removeprefix("run ")
        labels = json.loads(artifacts["label-corpus-labels"].data)

        # The Parquet output in the bucket: one files row per input, from this run; emotion
        # labelled every segment (silent ones included)
        files = pq.read_table(f"{prefix}/out-in/files", filesystem=fs).to_pylist()
        assert sorted(r["source_uri"].rsplit("/", 1)[1] for r in files) == sorted(INPUTS)
        assert {r["status"] for r in files} == {"ok"} and {r["run_id"] for r in files} == {run_id}
        segments = pq.read_table(f"{prefix}/out-in/segments", filesystem=fs).num_rows
        assert segments >= len(INPUTS)
        assert sum(r["segments"] for r in labels if r["task"] == "emotion") == segments
        assert fs.exists(f"{prefix}/out-in/_runs/{run_id}/report.json")

        # The job ran on the cluster, as a Ray job with the run's id; its log became the flow
        # run's; the credentials went as its environment, never in its command line or a log.
        # (the Jobs API over plain HTTP: Ray's client reads its token settings once a process)
        token = (Path(state.home) / "ray_auth_token").read_text().strip()
        with urllib.request.urlopen(urllib.request.Request(
                dashboard + "/api/jobs/", headers={"Authorization": f"Bearer {token}"}),
                timeout=10) as resp:
            jobs = {j["metadata"].get("kimi_label_run_id"): j for j in json.load(resp)}
        job = jobs[run_id]
        assert job["status"] == "SUCCEEDED"
        assert job["entrypoint"].startswith("python -m pipelines.job --spec ")
        assert job["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == secret
        assert f"submitted Ray job {job['submission_id']}" in logs
        assert f"run {run_id}: {len(INPUTS)} processed" in logs
        assert [j["status"] for j in jobs.values() if j is not job] == ["FAILED"]
        for text in (job["entrypoint"], logs, failed_logs, log.read_text(errors="replace")):
            assert secret not in text
    finally:
        # The serve process and every flow-run process its runner started, by PID.
        ours = _marked(marker)
        _stop(ours)
        serve.poll()
    assert serve.returncode is not None
    assert not [p for p in ours if _alive(*p)] and _marked(marker) == []

    # The stack: server, Ray head and its workers (the jobs' drivers too), stopped by PID.
    assert sorted(stack_down(state.home)) == ["prefect", "ray", "s3"]
    assert _marked(state.stack_id + "/", STACK_MARKER_ENV) == []
