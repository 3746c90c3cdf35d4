"""label-corpus as a deployment on a real Prefect server: the embedded stack's server and Ray head
on 127.0.0.1, `label_corpus.serve(...)` in its own process, a flow run created through the client
from the deployment, executed by the serve process's runner, labelling a local folder with the
tiny checkpoint on the stack's Ray; then the run's state, its Parquet output and its artifacts as
the server has them.

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
import uuid
from pathlib import Path

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
INPUTS = ("a01_tone_0p5s_16k.wav", "a02_chirp_3s_16k.wav", "a06_speech_2p37s_16k.flac")
FLOW_NAME = "label-corpus"
MARKER_ENV = "KIMI_LABEL_PREFECT_IT"
DEPLOY_TIMEOUT_S = 90
RUN_TIMEOUT_S = 120

# The runner executes each flow run in a multiprocessing "spawn" child, which imports this script
# again as __mp_main__: without the guard that child would start a second runner instead.
SERVE = textwrap.dedent("""
    import sys

    from flows.label_corpus import label_corpus

    if __name__ == "__main__":
        label_corpus.serve(name=sys.argv[1], tags=["integration-test"])  # blocks until SIGTERM
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


def _run_logs(client, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
        any_=[flow_run_id])))
    return "\n".join(f"{entry.level} {entry.message}" for entry in logs)[-6000:]


def test_served_deployment_runs_label_corpus_on_a_real_server(stack, tmp_path):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    state, marker = stack
    assert isinstance(state, StackState)
    env = state.env()
    api = env["PREFECT_API_URL"]
    assert api.startswith("http://127.0.0.1:")

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in INPUTS:
        shutil.copy(goldens.INPUTS / name, inputs / name)
    output = tmp_path / "out"

    # The serve process: the deployment's runner, a client of the stack's server and Ray head.
    deployment_name = f"it-{marker}"
    script = tmp_path / "serve_label_corpus.py"
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
            assert deployment.name == deployment_name
            params = {"input": str(inputs), "output": str(output), "model": MODEL,
                      "tasks": ["asr", "emotion"], "max_new_tokens": 4,
                      "ray_address": env["RAY_ADDRESS"]}
            flow_run = client.create_flow_run_from_deployment(
                deployment.id, parameters={"params": params})
            assert flow_run.deployment_id == deployment.id

            deadline = time.monotonic() + RUN_TIMEOUT_S
            while True:
                run = client.read_flow_run(flow_run.id)
                if run.state.is_final():
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"flow run still {run.state.name} after {RUN_TIMEOUT_S} s\n"
                                f"run logs:\n{_run_logs(client, flow_run.id)}\n"
                                f"serve log:\n{_tail(log)}")
                assert serve.poll() is None, f"serve exited {serve.returncode}:\n{_tail(log)}"
                time.sleep(1)
            elapsed = time.monotonic() - started
            assert run.state.is_completed(), (
                f"flow run {run.state.name}: {run.state.message}\n"
                f"run logs:\n{_run_logs(client, flow_run.id)}\nserve log:\n{_tail(log)}")
            assert run.parameters["params"]["input"] == str(inputs)
            assert run.flow_id == deployment.flow_id

            artifacts = {a.key: a for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
                    any_=[flow_run.id])))}
        print(f"served flow run completed {elapsed:.1f} s after the serve process started")

        # The summary artifact on the server: every input processed and ok.
        assert {"label-corpus-summary", "label-corpus-labels",
                "label-corpus-output"} <= set(artifacts)
        summary = {row["metric"]: row["value"]
                   for row in json.loads(artifacts["label-corpus-summary"].data)}
        assert summary["inputs processed"] == len(INPUTS)
        assert summary["ok"] == len(INPUTS) and summary["errors"] == 0
        run_id = artifacts["label-corpus-summary"].description.removeprefix("run ")
        assert str(output) in artifacts["label-corpus-output"].data
        labels = json.loads(artifacts["label-corpus-labels"].data)
        assert sum(r["segments"] for r in labels if r["task"] == "emotion") == len(INPUTS)

        # The Parquet output: one files row per input, from this run.
        files = [r for p in sorted((output / "files").rglob("*.parquet"))
                 for r in pq.read_table(p).to_pylist()]
        assert sorted(Path(r["source_uri"]).name for r in files) == sorted(INPUTS)
        assert {r["status"] for r in files} == {"ok"}
        assert {r["run_id"] for r in files} == {run_id}
        assert (output / "_runs" / run_id / "report.json").exists()

        # The run's job joined the stack's Ray head (it did not start a Ray of its own): the flow
        # run's process writes to the serve process's output.
        served = log.read_text(errors="replace")
        assert f"Connecting to existing Ray cluster at address: {env['RAY_ADDRESS']}" in served
        assert "Started a local Ray instance" not in served
    finally:
        # The serve process and every flow-run process its runner started, by PID.
        ours = _marked(marker)
        _stop(ours)
        serve.poll()
    assert serve.returncode is not None
    assert not [p for p in ours if _alive(*p)] and _marked(marker) == []

    # The stack: server, Ray head and its workers, stopped by PID.
    assert sorted(stack_down(state.home)) == ["prefect", "ray", "s3"]
    assert _marked(state.stack_id + "/", STACK_MARKER_ENV) == []
