"""`label-corpus-on-ray`: label-corpus as a job on a running Ray cluster, submitted through the
Ray Jobs API (what the deployments of infra/prefect run; no Ray Client).

Thin, like `label-corpus`: submit the job to the cluster's dashboard and follow it to its end,
its log lines becoming the flow run's (`pipelines.job.submit`) -> check the output -> publish
the same summary. The job's parameters are `pipelines.spec.JobSpec`, defined there once; the
flow adds only where to submit it. A job that fails or is stopped fails the flow run with the
job's reason; a cancelled flow run stops its job. A rerun resumes (the job skips every object
already labelled with the same etag).

Credentials are never flow parameters: the worker's AWS_* environment, or the Secret block the
parameters name, reach the job as its runtime_env (`pipelines.job.submit`); Ray's token comes
from the worker's RAY_AUTH_MODE / RAY_AUTH_TOKEN.
"""

# No `from __future__ import annotations`: served flows are pickled by value and pydantic
# must resolve the parameter model from the real annotation, not a string.

from typing import Any

from prefect import flow, get_run_logger, task

from flows.label_corpus import published
from flows.labelling import check_output, job_of
from pipelines.job.submit import run_on_cluster
from pipelines.spec import JobSpec

@task
def run_ray_job(spec: JobSpec, ray_dashboard: str | None) -> dict[str, Any]:
    """The job on the cluster, followed to its end; its report."""
    logger = get_run_logger()
    return run_on_cluster(spec, ray_dashboard, on_log=logger.info)


@flow(name="label-corpus-on-ray", log_prints=True)
def label_corpus_on_ray(params: JobSpec, ray_dashboard: str | None = None) -> dict[str, Any]:
    """`params`' job on the Ray cluster whose dashboard serves the Jobs API.

    Args:
        params: the labelling job (pipelines.spec.JobSpec)
        ray_dashboard: the Ray head's dashboard, http://<head>:8265; none:
            $RAY_API_SERVER_ADDRESS of the worker
    """
    spec = job_of(params)
    report = run_ray_job(spec, ray_dashboard)
    check_output(spec)
    return published(spec, report)
