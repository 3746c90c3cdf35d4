"""A job on a running Ray cluster through the Ray Jobs API (its dashboard's HTTP API,
``http://<head>:8265``): submit it, follow it to its end, stop it, read its report.

    report = run_on_cluster(spec, "http://127.0.0.1:8265", on_log=print)

Contract:
  * The job runs ``python -m pipelines.job --spec <JSON>`` (`pipelines.job.__main__`) with the
    head's Python, in the project the cluster's image holds; the JSON is the `JobSpec` as
    given (its unset fields stay unset), with `ray_address` "auto" (the job joins the cluster
    it runs on) and the run id fixed here, so the report is found at
    ``<output>/_runs/<run id>/report.json`` afterwards.
  * Credentials go as `StorageConfig.for_workers()` hands them to workers: the submitter's (a
    credentials block it read, else its AWS_* environment) become the job's runtime_env
    ``env_vars`` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), the endpoint
    and region go in the spec; with none here the job uses the cluster's own environment. They
    are never on the command line nor in a log line. Ray keeps the runtime_env in its GCS:
    clients holding the cluster's token can read it (the dashboard's pages mask env_vars).
  * Ray's token: as for any Ray client, RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or
    RAY_AUTH_TOKEN_PATH) in this process's environment.
  * The outcome: SUCCEEDED -> the run's report; FAILED or STOPPED -> `JobError` when the job
    refused to start (exit status 2), else `RunFailed`, with the job's own `error:` line (else
    Ray's message). Anything that ends the follower early (an exception, Ctrl-C, a flow run's
    cancellation) stops the job first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.errors import ConfigError, JobError, PipelineError, RunFailed
from pipelines.job.report import read_report
from pipelines.spec import JobSpec
from pipelines.storage import redact_uri
from pipelines.storage.config import CREDENTIAL_VARIABLES

ENTRYPOINT = "python -m pipelines.job --spec"
FINAL = ("SUCCEEDED", "FAILED", "STOPPED")
POLL_S = 2.0
REFUSED_EXIT = 2  # `python -m pipelines.job`: refused before anything ran


def _ignore(line: str) -> None:
    """The default log sink: the job's log stays on the cluster (and its dashboard)."""


@dataclass
class JobOutcome:
    """How a submitted job ended: Ray's status and message, the entrypoint's exit status and
    the job's last `error:` line."""

    submission_id: str
    status: str
    message: str
    exit_code: int | None
    error: str | None


def dashboard_url(address: str | None) -> str:
    """The Jobs API's URL for a dashboard address (``host:port`` or ``http(s)://host:port``;
    none: $RAY_API_SERVER_ADDRESS, as Ray's `ray job` commands read it)."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise ConfigError("no Ray cluster to submit the job to: give the head's dashboard, "
                          "http://<head>:8265 (or set RAY_API_SERVER_ADDRESS)")
    if address.startswith("ray://"):
        raise ConfigError(f"{address!r} is a Ray Client address; submit to the head's "
                          "dashboard instead: http://<head>:8265")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"{address!r}: expected the head's dashboard, http://<head>:8265")
    return address.rstrip("/")


def job_client(address: str | None):
    """A `JobSubmissionClient` of the cluster whose dashboard is at `address`; a JobError
    says why there is none (no answer, no Jobs API, a token refused)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = dashboard_url(address)
    try:
        return JobSubmissionClient(url)
    except AuthenticationError:
        raise JobError(f"the Ray cluster at {url} refused this client's authentication token "
                       "(none sent, or not the cluster's): export RAY_AUTH_MODE=token and "
                       "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, a file holding it)") from None
    except (ConnectionError, RuntimeError) as exc:
        said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise JobError(f"cannot submit to the Ray cluster at {url}: {said}; is the head "
                       "running, with its dashboard (ray[default])?") from None


def submitted_spec(spec: JobSpec, run_id: str) -> JobSpec:
    """The spec the cluster runs: `run_id`, joining its cluster, this side's endpoint and
    region made explicit (credentials go apart, `job_env`)."""
    if spec.ray_address not in (None, "auto"):
        raise ConfigError(f"ray_address {spec.ray_address!r}: a job submitted to a cluster "
                          "joins that cluster; leave ray_address unset")
    for name in ("input", "output", "model", "glm_tokenizer"):
        value = getattr(spec, name)
        if value and redact_uri(value) != value:
            raise ConfigError(f"{name} {redact_uri(value)}: a password in a location would be "
                              "on the job's command line; give the credentials as storage "
                              "options or a credentials block")
    return spec.model_copy(update={"run_id": run_id, "ray_address": "auto",
                                   "storage_options": spec.storage_options.for_workers()})


def entrypoint(spec: JobSpec) -> str:
    """The job's command line: the spec's JSON, its unset fields left out (never a secret:
    credentials are not part of a spec's JSON)."""
    return f"{ENTRYPOINT} {shlex.quote(spec.model_dump_json(exclude_unset=True))}"


def job_env(spec: JobSpec) -> dict[str, str]:
    """The job's credentials as environment variables ({} without any: the cluster's own)."""
    credentials = spec.storage_options.for_workers().credentials
    if credentials is None:
        return {}
    return {CREDENTIAL_VARIABLES[k]: v for k, v in credentials.s3fs().items()}


def submit(client, spec: JobSpec, run_id: str) -> str:
    """Submit the job of `spec` as run `run_id`; returns its submission id."""
    job = submitted_spec(spec, run_id)
    env = job_env(spec)
    try:
        return client.submit_job(
            entrypoint=entrypoint(job),
            submission_id=f"kimi-label-{run_id}-{uuid.uuid4().hex[:6]}",
            runtime_env={"env_vars": env} if env else None,
            metadata={"kimi_label_run_id": run_id, "output": redact_uri(spec.output)})
    except RuntimeError as exc:
        raise JobError(f"the Ray cluster refused the job: {exc}") from None


def follow(client, submission_id: str, on_log: Callable[[str], None] = _ignore,
           poll_s: float = POLL_S) -> JobOutcome:
    """Wait for the job to end, handing each line of its log to `on_log` as it comes (streamed
    from the dashboard; should the stream drop, the status is polled every `poll_s` and the
    rest of the log shown at the end). Whatever ends the wait early (an exception, a signal,
    a cancellation) stops the job, then goes on."""
    try:
        lines = LineSplitter(on_log)
        try:
            asyncio.run(_stream_log(client, submission_id, lines))
        except (RuntimeError, OSError):  # the stream dropped (Ray says RuntimeError)
            pass
        while str((info := client.get_job_info(submission_id)).status) not in FINAL:
            time.sleep(poll_s)
        logs = client.get_job_logs(submission_id)
        lines.feed(logs[lines.seen:])
        lines.flush()
        return JobOutcome(submission_id, str(info.status), info.message or "",
                          info.driver_exit_code, last_error(logs))
    except BaseException:
        stop(client, submission_id)
        raise


async def _stream_log(client, submission_id: str, lines: LineSplitter) -> None:
    # closed on the way out whatever happens, so its HTTP session is closed too
    async with contextlib.aclosing(client.tail_job_logs(submission_id)) as chunks:
        async for chunk in chunks:  # ends with the job
            lines.feed(chunk)


class LineSplitter:
    """Chunks of a log in, whole lines out; counts the characters seen."""

    def __init__(self, on_line: Callable[[str], None]):
        self.on_line, self.seen, self.partial = on_line, 0, ""

    def feed(self, chunk: str) -> None:
        self.seen += len(chunk)
        *whole, self.partial = (self.partial + chunk).split("\n")
        for line in whole:
            self.on_line(line)

    def flush(self) -> None:
        if self.partial:
            self.on_line(self.partial)
            self.partial = ""


def stop(client, submission_id: str) -> None:
    """Ask the cluster to stop the job (SIGTERM to its driver, SIGKILL a few seconds later); a
    job that already ended, or a head that does not answer, is left as it is."""
    try:
        client.stop_job(submission_id)
    except Exception:  # noqa: BLE001 - best effort while something else is being raised
        pass


def last_error(logs: str) -> str | None:
    """The job's last one-line error (`error: ...`, what `python -m pipelines.job` prints)."""
    errors = [line for line in logs.splitlines() if line.startswith("error: ")]
    return errors[-1].removeprefix("error: ") if errors else None


def outcome_error(outcome: JobOutcome) -> PipelineError:
    """A job that did not succeed, as the pipeline's error: refused (JobError) or failed."""
    said = outcome.error or (outcome.message.splitlines()[0] if outcome.message else None)
    reason = (f"Ray job {outcome.submission_id} "
              f"{'was stopped' if outcome.status == 'STOPPED' else 'failed'}: "
              f"{said or 'no reason given'}")
    if outcome.status == "FAILED" and outcome.exit_code == REFUSED_EXIT:
        return JobError(reason)
    return RunFailed(reason)


def run_on_cluster(spec: JobSpec, address: str | None, on_log: Callable[[str], None] = _ignore,
                   run_id: str | None = None, poll_s: float = POLL_S) -> dict[str, Any]:
    """Submit the job, follow it to its end, and return its report (read from the output);
    raise the job's failure as a `PipelineError` (module docstring)."""
    from pipelines.job.run import new_run_id

    run_id = run_id or spec.run_id or new_run_id()
    client = job_client(address)
    submission_id = submit(client, spec, run_id)
    on_log(f"submitted Ray job {submission_id} to {dashboard_url(address)}")
    outcome = follow(client, submission_id, on_log, poll_s)
    if outcome.status != "SUCCEEDED":
        raise outcome_error(outcome)
    return read_report(spec, run_id)


__all__ = ["JobOutcome", "dashboard_url", "entrypoint", "follow", "job_client", "job_env",
           "run_on_cluster", "stop", "submit", "submitted_spec"]
