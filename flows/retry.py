"""When a flow's task is retried: unless the failure is final (a `PipelineError` that is not
`retryable`: bad parameters, bad input, a refusal), which a retry would only repeat."""

from __future__ import annotations

from pipelines.errors import PipelineError


def retry_unless_final(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, PipelineError) or exc.retryable
