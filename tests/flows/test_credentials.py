"""Credentials: from the environment or a Prefect Secret block only, never leaked; a wrong key
fails fast. Real SeaweedFS with auth enforced, Prefect's test harness, a real local Ray."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.storage import RetryPolicy, StorageError, check_output, open_input, resolve
from tests import goldens
from tests.s3_fixtures import s3_prefix, seaweed  # noqa: F401
from tests.pipelines.test_job import GOOD, upload

pytestmark = pytest.mark.slow
MODEL = str(goldens.CHECKPOINT)


def save_block(value: dict) -> str:
    from prefect.blocks.system import Secret

    name = f"kl-s3-{uuid.uuid4().hex[:8]}"
    Secret(value=value).save(name)
    return name


@pytest.fixture
def no_aws_env(monkeypatch):
    """The block is the only source of credentials in this process."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)


async def prefect_records(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, \
        LogFilterFlowRunId

    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = await client.read_artifacts()
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {"run": run, "logs": logs, "artifacts": artifacts, "task_runs": task_runs}


def prefect_database() -> list[Path]:
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
    return [p for p in db.parent.glob(db.name + "*") if p.is_file()]  # with -wal, -shm


def test_secret_block_credentials_work_and_never_leak(harness, ray_local, seaweed, s3_prefix,
                                                      no_aws_env, caplog):
    from flows.label_corpus import label_corpus
    from pipelines.spec import JobSpec

    secret, key = seaweed.admin.secret_key, seaweed.admin.access_key
    upload(seaweed, f"{s3_prefix}/in", {k: GOOD[k] for k in ("mono_8k.wav", "stereo_22k.flac")})
    block = save_block({"aws_access_key_id": key, "aws_secret_access_key": secret})
    params = JobSpec(input=f"{s3_prefix}/in", output=f"{s3_prefix}/out", model=MODEL,
                     tasks=["asr", "emotion"], max_new_tokens=4,
                     storage_options={"endpoint_url": seaweed.endpoint_url,
                                      "credentials_block": block})
    state = label_corpus(params, return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert report["processed"] == 2 and report["status"] == {"ok": 2}

    # the flow run's stored parameters name the block, nothing more
    found = asyncio.run(prefect_records(state.state_details.flow_run_id))
    assert found["run"].parameters["params"]["storage_options"]["credentials_block"] == block
    exposed = {
        "flow parameters": json.dumps(found["run"].parameters),
        "Prefect logs": "\n".join(log.message for log in found["logs"]),
        "artifacts": "\n".join(f"{a.key} {a.description} {a.data}" for a in found["artifacts"]),
        "task runs": "\n".join(t.model_dump_json() for t in found["task_runs"]),
        "flow result": json.dumps(report, default=str),
        "Python logging": caplog.text,  # stdout/stderr: see the CLI test
    }
    assert found["logs"] and found["artifacts"] and found["task_runs"]  # the grep saw things
    for where, text in exposed.items():
        assert secret not in text, where
        assert key not in text, where  # the key id appears only shortened (AKxx***)

    # everything written to the store: Parquet bytes, their key-value metadata, run reports
    fs, root = resolve(f"{s3_prefix}/out", seaweed.storage_options)
    written = fs.find(root)
    assert any(p.endswith("report.json") for p in written)
    for path in written:
        assert secret.encode() not in fs.cat(path), path
        if path.endswith(".parquet"):
            with fs.open(path, "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
            kv = {**(meta.metadata or {}), **(meta.schema.to_arrow_schema().metadata or {})}
            assert kv and not any(secret.encode() in k + v for k, v in kv.items()), path

    # Prefect's database (parameters, logs, artifacts, events, the block itself, encrypted)
    # and every Ray worker's log
    database = prefect_database()
    assert database and sum(p.stat().st_size for p in database) > 100_000
    for path in database + [p for p in Path(ray_local).rglob("*") if p.is_file()]:
        if path.stat().st_size < 50_000_000:
            assert secret.encode() not in path.read_bytes(), path


def test_wrong_key_fails_fast_as_access_denied_without_retries(seaweed, s3_prefix, caplog):
    wrong = {**seaweed.storage_options, "secret": "Wr0ng-" + uuid.uuid4().hex}
    # one waited retry would take at least 10 s (half of the first delay is never jittered)
    generous = RetryPolicy(attempts=20, base_delay_s=20.0, max_delay_s=30.0, budget_s=300)
    for call in (lambda: open_input(s3_prefix, wrong, generous),
                 lambda: check_output(f"{s3_prefix}/out", wrong, generous)):
        caplog.clear()
        started = time.monotonic()
        with pytest.raises(StorageError) as err:
            call()
        assert time.monotonic() - started < 10.0  # no backoff: not one retry was waited for
        assert err.value.kind == "access_denied" and err.value.attempts == 1
        assert "secret key does not match" in str(err.value)
        assert wrong["secret"] not in str(err.value)
        assert not [r for r in caplog.records if "retrying in" in r.getMessage()]


def test_wrong_key_in_the_block_stops_the_flow_before_ray(harness, seaweed, s3_prefix,
                                                          no_aws_env, caplog):
    from flows.label_corpus import label_corpus
    from pipelines.errors import PipelineError
    from pipelines.spec import JobSpec

    upload(seaweed, f"{s3_prefix}/in", {"mono_8k.wav": GOOD["mono_8k.wav"]})
    wrong = "Wr0ng-" + uuid.uuid4().hex
    block = save_block({"key": seaweed.admin.access_key, "secret": wrong})

    def params(block_name: str) -> JobSpec:
        return JobSpec(input=f"{s3_prefix}/in", output=f"{s3_prefix}/out", model=MODEL,
                       storage_options={"endpoint_url": seaweed.endpoint_url,
                                        "credentials_block": block_name})

    started = time.monotonic()
    state = label_corpus(params(block), return_state=True)
    elapsed = time.monotonic() - started
    assert state.is_failed()
    with pytest.raises(PipelineError, match="access_denied") as err:
        state.result()
    assert "secret key does not match" in str(err.value) and wrong not in str(err.value)
    assert elapsed < 30  # the harness's flow overhead; no retry waits (check_inputs' are 10 s)
    task_runs = asyncio.run(prefect_records(state.state_details.flow_run_id))["task_runs"]
    assert [(t.name.split("-")[0], t.run_count) for t in task_runs] == [("check_inputs", 1)]
    assert not [r for r in caplog.records if "retrying in" in r.getMessage()]

    missing = label_corpus(params("no-such-block"), return_state=True)
    assert missing.is_failed()
    with pytest.raises(PipelineError, match="credentials block 'no-such-block' not found"):
        missing.result()


def test_cli_takes_a_credentials_block_by_name_and_prints_no_secret(harness, seaweed, s3_prefix,
                                                                     ray_address, here,
                                                                     monkeypatch):
    from prefect.settings import PREFECT_API_URL

    upload(seaweed, f"{s3_prefix}/in", {"mono_8k.wav": GOOD["mono_8k.wav"]})
    secret = seaweed.admin.secret_key
    block = save_block({"key": seaweed.admin.access_key, "secret": secret})
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run(
        [sys.executable, "-m", "flows.console", "run", "--input", f"{s3_prefix}/in",
         "--output", f"{s3_prefix}/out", "--model", MODEL, "--tasks", "asr",
         "--max-new-tokens", "4", "--ray-address", ray_address, "--storage-options",
         json.dumps({"endpoint_url": seaweed.endpoint_url, "credentials_block": block})],
        env=env, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 processed" in done.stdout
    assert secret not in done.stdout + done.stderr  # the whole run's console output

    # the block is checked before the flow starts: a missing block, or a key the store
    # refuses, is one line and exit 2, no flow run, no traceback, no secret (in this process:
    # the console's pre-flight, against the session's Prefect API)
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)

    def refused(block_name: str) -> str:
        proc = here("run", "--input", f"{s3_prefix}/in", "--output", f"{s3_prefix}/out2",
                    "--model", MODEL, "--storage-options",
                    json.dumps({"endpoint_url": seaweed.endpoint_url,
                                "credentials_block": block_name}))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Flow run" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        return proc.stderr.strip().splitlines()[-1]

    line = refused("no-such-block")
    assert line.startswith("error: label-corpus cannot run: credentials block 'no-such-block' "
                           "not found")
    wrong = "Wr0ng-" + uuid.uuid4().hex
    line = refused(save_block({"key": seaweed.admin.access_key, "secret": wrong}))
    assert "access_denied" in line and wrong not in line
