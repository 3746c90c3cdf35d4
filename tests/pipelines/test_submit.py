"""A job for a Ray cluster's Jobs API (`pipelines.job.submit`) and its entry point there
(`python -m pipelines.job`): what goes on the command line and what goes in the environment,
and how a job's end becomes the pipeline's error. No cluster here: the stack tests submit to
a real one (tests/pipelines/test_local_stack.py, tests/flows/test_prefect_server.py)."""

from __future__ import annotations

import shlex

import pytest

from pipelines.errors import ConfigError, JobError, RunFailed
from pipelines.job.__main__ import main, parse_spec
from pipelines.job.submit import (
    JobOutcome,
    dashboard_url,
    entrypoint,
    job_env,
    outcome_error,
    submitted_spec,
)
from pipelines.spec import JobSpec
from pipelines.storage import StorageConfig

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.fixture
def no_aws_env(monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)


def test_the_command_line_carries_the_spec_and_the_environment_the_credentials(no_aws_env,
                                                                             monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://store.example:8333")
    spec = JobSpec(input="s3://audio/in/", output="s3://audio/out/", model="/models/kimi",
                   tasks=["emotion", "asr"], stages={"label": {"batch_size": 32}},
                   storage_options={"key": "AKIDEXAMPLE", "secret": SECRET})
    job = submitted_spec(spec, "run-1")
    command = entrypoint(job)
    assert SECRET not in command and "AKIDEXAMPLE" not in command
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "pipelines.job", "--spec"]
    parsed = parse_spec(argv[4])
    # the job as given, joining the cluster it runs on, as run-1, at this side's endpoint
    assert parsed.model_dump() == spec.model_dump() | {
        "run_id": "run-1", "ray_address": "auto",
        "storage_options": spec.storage_options.model_dump() | {
            "endpoint_url": "http://store.example:8333"}}
    # a stage's settings stay what the user set (placement fills in the others)
    assert parsed.stages.label.model_fields_set == spec.stages.label.model_fields_set
    assert job_env(spec) == {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET}


def test_credentials_come_from_this_side_or_not_at_all(no_aws_env, monkeypatch):
    spec = JobSpec(input="s3://audio/in/", output="s3://audio/out/", model="/m")
    assert job_env(spec) == {}  # the cluster's own environment then
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session")
    assert job_env(spec) == {"AWS_ACCESS_KEY_ID": "AKIDENV", "AWS_SECRET_ACCESS_KEY": SECRET,
                             "AWS_SESSION_TOKEN": "session"}
    block = spec.model_copy(update={"storage_options": StorageConfig().with_credentials(
        StorageConfig(key="AKIDBLOCK", secret="s").credentials)})
    assert job_env(block)["AWS_ACCESS_KEY_ID"] == "AKIDBLOCK"  # a block read wins


def test_addresses(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="no Ray cluster to submit the job to"):
        dashboard_url(None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")
    assert dashboard_url(None) == "http://127.0.0.1:8265"  # as `ray job submit` reads it
    assert dashboard_url("head:8265") == "http://head:8265"
    assert dashboard_url("https://head.example/ray/") == "https://head.example/ray"
    with pytest.raises(ConfigError, match="Ray Client address"):
        dashboard_url("ray://head:10001")
    spec = JobSpec(input="/in", output="/out", model="/m", ray_address="head:6379")
    with pytest.raises(ConfigError, match="joins that cluster; leave ray_address unset"):
        submitted_spec(spec, "r")
    # a password in a location would be on the command line
    secret = SECRET.replace("/", "%2F")  # as a URI spells it
    spec = JobSpec(input=f"s3://AKIDEXAMPLE:{secret}@audio/in/", output="s3://audio/o", model="m")
    with pytest.raises(ConfigError) as refused:
        submitted_spec(spec, "r")
    assert secret not in str(refused.value) and "give the credentials as storage options" in str(
        refused.value)


def test_how_a_job_ends_becomes_the_pipelines_error():
    logs = "INFO planning\nerror: not_found: s3://audio/nope/: no object or folder\n"
    ray_said = "Job entrypoint command failed with exit code 2, last available logs:\n..."
    refused = outcome_error(JobOutcome("kimi-label-r-1", "FAILED", ray_said, 2, "not_found: "
                                       "s3://audio/nope/: no object or folder"))
    assert type(refused) is JobError and str(refused) == (
        "Ray job kimi-label-r-1 failed: not_found: s3://audio/nope/: no object or folder")
    from pipelines.job.submit import last_error

    assert last_error(logs) == "not_found: s3://audio/nope/: no object or folder"
    crashed = outcome_error(JobOutcome("j", "FAILED", ray_said.replace("2", "1"), 1, None))
    assert type(crashed) is RunFailed and str(crashed) == (
        "Ray job j failed: Job entrypoint command failed with exit code 1, last available "
        "logs:")
    stopped = outcome_error(JobOutcome("j", "STOPPED", "Job was intentionally stopped.", None,
                                       None))
    assert type(stopped) is RunFailed and str(stopped) == (
        "Ray job j was stopped: Job was intentionally stopped.")


def test_the_entry_point_refuses_a_bad_spec_in_one_line(capsys):
    assert main(["--spec", '{"input": "/in", "tasks": []}']) == 2
    err = capsys.readouterr().err
    assert err == ("error: --spec is not a valid job: output: Field required; model: Field "
                   "required; tasks: Value error, name at least one task, e.g. asr,emotion\n")
