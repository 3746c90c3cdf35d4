"""Why a training-data build cannot run."""

from __future__ import annotations

from pipelines.errors import PipelineError


class TrainingDataError(PipelineError):
    """The build cannot run: not a labelled output, no semantic tokens, bad filters, an output
    that already holds a build, or the store refusing either side. Final: the same build fails
    the same way again (a store that is down is retried where it is read)."""

    kind = "cannot_build_training_data"
