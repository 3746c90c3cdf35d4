"""What an evaluation is: `EvaluationSpec`, each parameter declared once, with its description.

    spec = EvaluationSpec(input="s3://audio/labels", references="s3://audio/refs.csv",
                          compare="s3://audio/labels-v0")

`input` is what is read and scored (a labelled output), `output` where the report is written.
The console's options and the `evaluate` flow's parameters are these fields; the storage
configuration's credentials are never part of a dump, so Prefect never stores them.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from pipelines.storage import OutputLayout, StorageOptions

REPORT_STAMP = "%Y%m%dT%H%M%SZ"  # the default report folder's name: the UTC time


class EvaluationSpec(BaseModel):
    """A labelled output scored against reference labels, and optionally against another."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="the labelled output to score: the URI holding files/ and "
                                   "segments/")
    references: str = Field(
        description="reference labels: Parquet/CSV/JSONL keyed by source_uri[, segment_index] "
                    "with any of transcript (+ language), emotion, scene, sound_event")
    compare: str | None = Field(
        None, description="another labelled output of the same inputs, scored against the same "
                          "references and compared with the input")
    output: str | None = Field(
        None, description="where report.json and confusion.png go; none: "
                          "<input>/_evaluations/<UTC time>")
    bins: int = Field(10, ge=1, le=100, description="equal-width calibration bins")
    storage_options: StorageOptions

    def report_folder(self, created: datetime) -> str:
        """Where this evaluation's report goes when it is created at `created` (UTC)."""
        if self.output:
            return self.output.rstrip("/")
        return OutputLayout(self.input).evaluation(created.strftime(REPORT_STAMP))
