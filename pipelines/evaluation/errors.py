"""Why an evaluation cannot run: `EvaluationError`, and a storage failure told as one."""

from __future__ import annotations

from pipelines.errors import PipelineError
from pipelines.storage import StorageConfig, redact_uri, storage_error

# storage failures a retry may get past: the store down past its retry budget, or an I/O error
# nobody classified; a missing file or a refused identity stays so
TRANSIENT_KINDS = frozenset({"unavailable", "io_error"})


class EvaluationError(PipelineError):
    """The evaluation cannot run; the message names the file and the reason. `retryable`: a
    storage failure that a retry may get past, unlike bad input."""

    kind = "cannot_evaluate"

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable

    def __reduce__(self):  # keeps `retryable` when Prefect stores the exception
        return (type(self), (str(self), self.retryable))


def storage_refusal(exc: BaseException, role: str, uri: str, storage: StorageConfig,
                    action: str) -> EvaluationError:
    """`exc`, raised while `action` on `uri`, as an EvaluationError: "<role> <uri>: <kind>:
    <reason>" (role: references, output, compare, report folder), never with a secret."""
    err = storage_error(exc, uri, storage, action)
    return EvaluationError(f"{role} {redact_uri(uri)}: {err.kind}: {err.reason}",
                           retryable=err.kind in TRANSIENT_KINDS)
