"""The input of a build: a labelled output's footers checked, then its rows read for selection.

Input: the `files/` and `segments/` tables of a `kimi-label run` made with `--semantic-tokens`.
`inspect_source` needs only the Parquet footers; the rows are read one `segments/` shard at a
time, with only the columns the build uses.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import BaseModel, Field

from pipelines.schema import closed_set_tasks, normalized
from pipelines.storage import (OutputLayout, parquet_files, read_available, read_schema,
                               read_table_dir, redact_uri, resolve, storage_error)
from pipelines.training_data.errors import TrainingDataError
from pipelines.training_data.selection import signal_filters
from pipelines.training_data.spec import TrainingDataSpec, TrainingFilters

# what the build reads of each segments row, besides each closed-set task's label and scores
# and the columns of the quality-signal filters that are set
SEGMENT_COLUMNS = ("source_uri", "segment_index", "start_s", "end_s", "status", "etag",
                   "model_id", "run_id", "semantic_tokens", "transcript",
                   "transcript_truncated", "transcript_looped", "generation")
FILE_COLUMNS = ["source_uri", "status", "etag"]


class SourceInfo(BaseModel):
    """What the input holds, from its footers."""

    files_shards: int = Field(description="Parquet shards under files/")
    segments_shards: list[str] = Field(description="the segments/ shards, sorted by path")
    tasks: list[str] = Field(description="closed-set tasks found in the segments")
    has_transcript: bool = Field(description="whether the segments have a transcript column")
    shards_without_tokens: int = Field(
        description="segments shards labelled without --semantic-tokens (their rows are "
                    "dropped)")


def _footers(spec: TrainingDataSpec) -> tuple[list[str], list[str], list[pa.Schema]]:
    """(files shards, segments shards, the segments shards' schemas); the store's own
    exceptions are told as storage errors, never with a secret."""
    try:
        fs, root = resolve(spec.input, spec.storage_options)
        layout = OutputLayout(root)
        files, segments = parquet_files(fs, layout.files), parquet_files(fs, layout.segments)
        return files, segments, [read_schema(fs, path) for path in segments]
    except Exception as exc:  # noqa: BLE001 - every backend error is told as a storage error
        err = storage_error(exc, spec.input, spec.storage_options, "read")
        raise TrainingDataError(f"input: {err}") from None


def _tasks_of(schemas: list[pa.Schema]) -> list[str]:
    tasks: list[str] = []
    for schema in schemas:
        tasks += [t for t in closed_set_tasks(schema) if t not in tasks]
    return tasks


def _check_signal_columns(filters: TrainingFilters, schemas: list[pa.Schema], uri: str) -> None:
    """Each quality-signal filter that is set names a column some segments shard has."""
    for name, rule in signal_filters(filters).items():
        if not any(rule.column in s.names for s in schemas):
            raise TrainingDataError(
                f"{name}: the segments of {uri} have no {rule.column} column (labelled before "
                "the quality signals, or without the task that gives it); relabel, or leave "
                "the filter unset")


def inspect_source(spec: TrainingDataSpec) -> SourceInfo:
    """The checks that need only the Parquet footers: a labelled output with semantic tokens,
    and filters that name columns it has. Raises TrainingDataError."""
    uri = redact_uri(spec.input)
    files, segments, schemas = _footers(spec)
    if not files or not segments:
        raise TrainingDataError(f"{uri} is not a labelled output: no Parquet shards under "
                                f"{'files/' if not files else 'segments/'}")
    with_tokens = [s for s in schemas if "semantic_tokens" in s.names]
    if not with_tokens:
        raise TrainingDataError(f"{uri}: the segments have no semantic_tokens column; label "
                                "with `kimi-label run --semantic-tokens` (semantic_tokens=True)")
    tasks = _tasks_of(schemas)
    unknown = sorted(set(spec.filters.min_confidence) - set(tasks))
    if unknown:
        raise TrainingDataError(f"min_confidence names {unknown}, not closed-set tasks of "
                                f"{uri} (it has {tasks or 'none'})")
    has_transcript = any("transcript" in s.names for s in schemas)
    if spec.filters.require_transcript and not has_transcript:
        raise TrainingDataError(f"require_transcript: {uri} has no transcript column (no asr "
                                "task)")
    _check_signal_columns(spec.filters, schemas, uri)
    return SourceInfo(files_shards=len(files), segments_shards=segments, tasks=tasks,
                      has_transcript=has_transcript,
                      shards_without_tokens=len(schemas) - len(with_tokens))


def read_file_states(fs, root: str) -> dict[str, tuple[str, str | None]]:
    """source_uri -> (status, etag) of every `files/` row (a later row of a URI wins)."""
    states: dict[str, tuple[str, str | None]] = {}
    for _, table in read_table_dir(fs, OutputLayout(root).files, FILE_COLUMNS):
        for uri, status, etag in zip(table["source_uri"].to_pylist(),
                                     table["status"].to_pylist(), table["etag"].to_pylist()):
            states[uri] = (status, etag)
    return states


def read_segments(fs, path: str, tasks: list[str], filters: TrainingFilters) -> pa.Table:
    """The columns the build uses of one `segments/` shard (those it has), its scores in the
    current schema's form whatever version wrote the shard (`pipelines.schema.normalized`)."""
    columns = [*SEGMENT_COLUMNS, *tasks, *(f"{t}_scores" for t in tasks),
               *(rule.column for rule in signal_filters(filters).values())]
    return normalized(read_available(fs, path, columns))
