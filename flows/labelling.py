"""The Prefect tasks every flow that runs a labelling job shares: check the job, run it (a
retried run resumes), check its output (every object exactly once in `files/`).

Credentials are never flow parameters (Prefect stores parameters): they come from the worker's
AWS_* environment, or from the Secret block the parameters name (`flows.credentials`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from prefect import task

from flows.credentials import with_credentials_read
from flows.retry import retry_unless_final
from pipelines.errors import JobError
from pipelines.job import check_job, run_job
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


@task(retries=1, retry_delay_seconds=30, retry_condition_fn=retry_unless_final)
def run_labelling(spec: JobSpec) -> dict[str, Any]:
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


def label_checked(spec: JobSpec, flow_name: str) -> dict[str, Any]:
    """A flow's labelling: inputs checked (a bad input or output is the caller's error, not a
    task to retry), the job run, its output checked for duplicates. Returns the job's report."""
    try:
        check_inputs(spec)
    except JobError as exc:
        raise JobError(f"{flow_name} cannot run: {exc}") from None
    report = run_labelling(spec)
    check_output(spec)
    return report
