"""The Prefect tasks every flow that runs a labelling job shares: check the job, run it (a
retried run resumes, its progress a Prefect progress artifact `<flow>-progress` updated as the
files land), check its output (every object exactly once in `files/`); or, for a dry run, check
the job and publish its plan.

Credentials are never flow parameters (Prefect stores parameters): they come from the worker's
AWS_* environment, or from the Secret block the parameters name (`flows.credentials`).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from prefect import task

from flows.credentials import with_credentials_read
from flows.retry import retry_unless_final
from pipelines.errors import JobError
from pipelines.job import check_job, dry_run, format_dry_run, run_job
from pipelines.job.progress import Progress, ProgressListener, describe, watching
from pipelines.spec import JobSpec
from pipelines.storage import OutputLayout, read_table_dir, resolve


def flow_run_id() -> str | None:
    """A run id stable across retries of this flow run (`<scheduled start>-<id prefix>`), so
    rows written by a first attempt and by its retry belong to the same run."""
    from prefect.runtime import flow_run

    run = flow_run.id
    if not run:
        return None
    started = flow_run.scheduled_start_time
    stamp = started.strftime("%Y%m%dT%H%M%S") if hasattr(started, "strftime") else "run"
    return f"{stamp}-{str(run).replace('-', '')[:8]}"


def job_of(params: JobSpec) -> JobSpec:
    """The job a flow runs for `params`: its credentials block read, the flow run's id as its
    run id unless the parameters name one."""
    return with_credentials_read(params).model_copy(update={
        "run_id": params.run_id or flow_run_id()})


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_final)
def check_inputs(spec: JobSpec) -> str:
    """Tasks, checkpoint, input listing and output access, before any Ray work."""
    _, model_id = check_job(spec)
    return model_id


ARTIFACT_EVERY_S = 10.0  # a progress artifact's update is an API call: at most one this often


class ArtifactProgress(ProgressListener):
    """A run's progress as a Prefect progress artifact (percent of files done, described by
    `pipelines.job.progress.describe`), created when the run starts, updated at most every
    `every_s` seconds and when it ends."""

    def __init__(self, key: str, every_s: float = ARTIFACT_EVERY_S, clock=time.monotonic):
        self.key, self.every_s, self.clock = key, every_s, clock
        self.artifact_id = None
        self.last = 0.0

    def started(self, progress: Progress) -> None:
        from prefect.artifacts import create_progress_artifact

        self.last = self.clock()
        self.artifact_id = create_progress_artifact(
            100.0 * progress.fraction, key=self.key,
            description=f"run {progress.run_id}: {describe(progress)}")

    def advanced(self, progress: Progress) -> None:
        if self.clock() - self.last >= self.every_s:
            self._update(progress)

    def ended(self, progress: Progress) -> None:
        self._update(progress)

    def _update(self, progress: Progress) -> None:
        from prefect.artifacts import update_progress_artifact

        self.last = self.clock()
        state = "" if progress.state == "running" else f" ({progress.state})"
        update_progress_artifact(self.artifact_id, 100.0 * progress.fraction,
                                 description=f"run {progress.run_id}{state}: "
                                             f"{describe(progress)}")


@task(retries=1, retry_delay_seconds=30, retry_condition_fn=retry_unless_final)
def run_labelling(spec: JobSpec, flow_name: str) -> dict[str, Any]:
    with watching(ArtifactProgress(f"{flow_name}-progress")):
        return run_job(spec)


@task
def check_output(spec: JobSpec) -> dict[str, int]:
    """Every labelled object appears exactly once in files/."""
    fs, root = resolve(spec.output, spec.storage_options)
    counts: Counter = Counter()
    for _, table in read_table_dir(fs, OutputLayout(root).files, ["source_uri"],
                                   spec.storage_retry):
        counts.update(table["source_uri"].to_pylist())
    duplicated = [uri for uri, n in counts.items() if n > 1]
    if duplicated:
        raise RuntimeError(f"{len(duplicated)} objects have more than one row in files/, "
                           f"e.g. {duplicated[0]}")
    return {"files_rows": sum(counts.values())}


@task
def plan_only(spec: JobSpec, flow_name: str) -> dict[str, Any]:
    """A dry run's plan (`pipelines.job.preview`), published as the markdown artifact
    `<flow>-dry-run`; nothing is labelled or written."""
    from prefect.artifacts import create_markdown_artifact

    plan = dry_run(spec)
    create_markdown_artifact(key=f"{flow_name}-dry-run",
                             markdown=f"```\n{format_dry_run(plan)}\n```")
    return plan


def planned_checked(spec: JobSpec, flow_name: str) -> dict[str, Any]:
    """A flow's dry run: its inputs checked as for a run, then its plan. Returns the plan."""
    try:
        check_inputs(spec)
    except JobError as exc:
        raise JobError(f"{flow_name} cannot run: {exc}") from None
    return plan_only(spec, flow_name)


def label_checked(spec: JobSpec, flow_name: str) -> dict[str, Any]:
    """A flow's labelling: inputs checked (a bad input or output is the caller's error, not a
    task to retry), the job run, its output checked for duplicates. Returns the job's report."""
    try:
        check_inputs(spec)
    except JobError as exc:
        raise JobError(f"{flow_name} cannot run: {exc}") from None
    report = run_labelling(spec, flow_name)
    check_output(spec)
    return report
