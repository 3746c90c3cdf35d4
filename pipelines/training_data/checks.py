"""The pre-flight of a build, before a flow run starts: everything it can be refused for.

`check_training_data(spec)` is what the flow's first task checks (`inspect_source`: a labelled
output with semantic tokens, filters naming its columns) and that the output holds no build
unless `overwrite`; the console runs it before it starts the flow, so a refusal is one line.
"""

from __future__ import annotations

from pipelines.storage import resolve, storage_error
from pipelines.training_data.errors import TrainingDataError
from pipelines.training_data.output import already_built, holds_build
from pipelines.training_data.source import SourceInfo, inspect_source
from pipelines.training_data.spec import TrainingDataSpec


def _output_holds_build(spec: TrainingDataSpec) -> bool:
    """Whether the output holds a build; the store's own exceptions are told as storage
    errors, never with a secret."""
    try:
        fs, root = resolve(spec.output, spec.output_storage())
        return holds_build(fs, root)
    except Exception as exc:  # noqa: BLE001 - every backend error is told as a storage error
        err = storage_error(exc, spec.output, spec.output_storage(), "read")
        raise TrainingDataError(f"output: {err}") from None


def check_training_data(spec: TrainingDataSpec) -> SourceInfo:
    """The input's footers checked and the output free (or `overwrite`); what the input holds.
    Raises TrainingDataError naming the side and the reason."""
    info = inspect_source(spec)
    if not spec.overwrite and _output_holds_build(spec):
        raise already_built(spec.output)
    return info
