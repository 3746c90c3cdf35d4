"""When a flow's task is tried again: unless its failure is final."""

from pipelines.errors import PipelineError


def retry_unless_final(task, task_run, state) -> bool:
    """Prefect's `retry_condition_fn`: retry, unless the task raised a `PipelineError` that is
    not `retryable` (bad input, a refused check: the same call fails the same way again)."""
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, PipelineError) and not exc.retryable)
