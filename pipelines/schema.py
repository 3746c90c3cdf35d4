"""The output contract: two Parquet tables under the output URI, explicit and versioned.

`<output>/files/`    exactly one row per input object (labelled or failed).
`<output>/segments/` one row per segment of every decodable object.

The schemas are code, never inferred from data: the segments table gets one column group per
selected task (`ChoiceTask` -> its label as a string and `<task>_scores`, a struct of one float32
per label in the label set's order; `GenerativeTask` -> its text fields as strings, its flags
as booleans and its three quality signals as float32), then `finish_reason` (a struct of one
string per generative task) and `task_versions` (a struct of one string per task). Structs, not
maps: duckdb (`emotion_scores.joy`), polars (`struct.field`), pyarrow and Hugging Face
`datasets` (a dict) all load them. The schema version and the task versions are also written to
the Parquet key-value metadata of every file.

Quality signals (`kimi_ops.tasks.base`), float32, null where a segment had no model call: each
segment's `speech_ratio` (its share of speech, from the segmenter) and, per generative task,
`<text>_avg_logprob`, `<text>_min_logprob` and `<text>_compression_ratio` after the task's
first text field (asr: `transcript_...`). The files table carries them over the file's
segments (`file_fields`): `speech_ratio` and the two means weighted by duration, the minimum
as the least, each over the segments that have a value.

Versions: 1 had `map<string, ...>` columns where 2 has these structs (the files table was the
same in both); 3 added the quality signals. Readers of an output take any of them:
`normalized` gives a table of version 1 or 2 the current form in memory (structs for maps, the
signal columns asked for as nulls). A run does not add to an output of an earlier version
(`pipelines.job.checks` refuses it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa

from kimi_ops.tasks import ChoiceTask, GenerativeTask, Task
from kimi_ops.tasks.base import SIGNAL_SUFFIXES, SPEECH_RATIO, merge_segments

SCHEMA_VERSION = "3"
SCHEMA_VERSION_KEY = b"kimi_label.schema_version"
TASK_VERSIONS_KEY = b"kimi_label.task_versions"
SCORES_SUFFIX = "_scores"

ERROR_TYPE = pa.struct([("kind", pa.string()), ("message", pa.string())])

FILES_FIELDS = [
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
    pa.field("error", ERROR_TYPE),  # null when ok
    pa.field("duration_s", pa.float64()),
    pa.field("num_segments", pa.int32()),
    pa.field("transcript", pa.string()),  # the segments' transcripts stitched in order
    # then speech_ratio and each generative task's signals over the file (`files_schema`)
    pa.field("sample_rate", pa.int32()),  # of the source, before resampling
    pa.field("channels", pa.int32()),
    pa.field("size_bytes", pa.int64()),
    pa.field("etag", pa.string()),  # the object's ETag (S3) or fingerprint (local)
    pa.field("model_id", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),
]

SEGMENT_BASE_FIELDS = [
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("segment_index", pa.int32(), nullable=False),
    pa.field("start_s", pa.float64(), nullable=False),
    pa.field("end_s", pa.float64(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # "ok" | "silent" | "error"
    pa.field(SPEECH_RATIO, pa.float32()),  # the share of the segment that is speech, [0, 1]
    pa.field("error", ERROR_TYPE),
]
FILE_SIGNALS_AFTER = "transcript"  # where a file's signals go among FILES_FIELDS

SEMANTIC_TOKENS_FIELD = pa.field("semantic_tokens", pa.list_(pa.int32()))  # 12.5 Hz VQ codes


def scores_type(task: ChoiceTask) -> pa.StructType:
    """A closed-set task's scores: one float32 probability per label, in the label set's order."""
    return pa.struct([pa.field(label, pa.float32()) for label in task.labels])


def _strings(names: Sequence[str]) -> pa.StructType:
    return pa.struct([pa.field(name, pa.string()) for name in names])


def task_fields(task: Task) -> list[pa.Field]:
    if isinstance(task, ChoiceTask):
        return [pa.field(task.name, pa.string()),
                pa.field(f"{task.name}{SCORES_SUFFIX}", scores_type(task))]
    if isinstance(task, GenerativeTask):
        return ([pa.field(f, pa.string()) for f in task.text_fields]
                + [pa.field(f, pa.bool_()) for f in task.flags] + signal_fields(task))
    raise TypeError(f"unknown task type {type(task).__name__}")


def signal_fields(task: GenerativeTask) -> list[pa.Field]:
    """A generative task's quality signals (`GenerativeTask.signals`), in both tables."""
    return [pa.field(name, pa.float32()) for name in task.signals]


def tail_fields(tasks: Sequence[Task]) -> list[pa.Field]:
    """The columns after the tasks'. A struct needs a field (Parquet has no empty struct), so
    `finish_reason` is left out of a run without generative tasks, `task_versions` of none."""
    generative = [t.name for t in tasks if isinstance(t, GenerativeTask)]
    return [*([pa.field("finish_reason", _strings(generative))] if generative else []),
            pa.field("model_id", pa.string()),
            *([pa.field("task_versions", _strings([t.name for t in tasks]))] if tasks else []),
            pa.field("generation", pa.string()),  # JSON of the generation parameters
            pa.field("etag", pa.string()),
            pa.field("run_id", pa.string(), nullable=False)]


def _metadata(tasks: Sequence[Task], table: str) -> dict[bytes, bytes]:
    return {SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode(),
            b"kimi_label.table": table.encode(),
            TASK_VERSIONS_KEY: json.dumps({t.name: t.version for t in tasks}).encode()}


def files_schema(tasks: Sequence[Task] = ()) -> pa.Schema:
    """FILES_FIELDS, with the file's `speech_ratio` and each generative task's signals after
    its transcript."""
    at = [f.name for f in FILES_FIELDS].index(FILE_SIGNALS_AFTER) + 1
    signals = [pa.field(SPEECH_RATIO, pa.float32())] + [
        field for task in tasks if isinstance(task, GenerativeTask)
        for field in signal_fields(task)]
    return pa.schema(FILES_FIELDS[:at] + signals + FILES_FIELDS[at:],
                     metadata=_metadata(tasks, "files"))


def file_fields(segments: Sequence[dict], tasks: Sequence[Task]) -> dict:
    """A labelled file's columns that come from its segments rows (every one of the file, in
    order): `num_segments`, the stitched `transcript`, `speech_ratio` and each generative
    task's signals, weighted by the segments' durations (`merge_segments`, the one place that
    aggregates; the label stage calls this for a whole file, the driver for a long file's
    stitched pieces)."""
    merged = merge_segments(list(segments), [s["end_s"] - s["start_s"] for s in segments], tasks)
    names = [SPEECH_RATIO, *(n for t in tasks if isinstance(t, GenerativeTask)
                             for n in t.signals)]
    return {"num_segments": len(segments), "transcript": merged.get("transcript"),
            **{name: merged[name] for name in names}}


def segments_schema(tasks: Sequence[Task], semantic_tokens: bool = False) -> pa.Schema:
    fields = list(SEGMENT_BASE_FIELDS)
    tail = tail_fields(tasks)
    seen = {f.name for f in fields} | {f.name for f in tail} | {"finish_reason",
                                                                  "task_versions"}
    for task in tasks:
        for field in task_fields(task):
            if field.name in seen:
                raise ValueError(f"task {task.name!r}: output column {field.name!r} clashes "
                                 "with another column")
            seen.add(field.name)
            fields.append(field)
    fields += tail
    if semantic_tokens:
        fields.append(SEMANTIC_TOKENS_FIELD)
    return pa.schema(fields, metadata=_metadata(tasks, "segments"))


def to_table(rows: Sequence[dict], schema: pa.Schema) -> pa.Table:
    """Rows (plain dicts) -> a table of exactly `schema`: missing keys become nulls, extra keys
    are an error (a typo must not silently drop a column). A struct column takes a dict: a
    field it lacks is null, a key that is not a field is an error (a label outside the task's
    label set)."""
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise ValueError(f"row has columns not in the schema: {sorted(extra)}")
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    for field in schema:
        if pa.types.is_struct(field.type):
            _check_struct_keys(field, columns[field.name])
    return pa.Table.from_pydict(columns, schema=schema)


def _check_struct_keys(field: pa.Field, values: list) -> None:
    allowed = {child.name for child in field.type}
    for value in values:
        extra = set(value) - allowed if isinstance(value, dict) else set()
        if extra:
            raise ValueError(f"column {field.name!r}: {sorted(extra)} not among its fields "
                             f"({', '.join(child.name for child in field.type)})")


# -- reading outputs of either version -------------------------------------------------------

def schema_version(schema: pa.Schema) -> str:
    """The schema version a shard was written with: its footer's, else "1" when it has a map
    column (version 1 wrote both), else the current one."""
    written = (schema.metadata or {}).get(SCHEMA_VERSION_KEY)
    if written:
        return written.decode()
    return "1" if any(pa.types.is_map(f.type) for f in schema) else SCHEMA_VERSION


def closed_set_tasks(schema: pa.Schema) -> list[str]:
    """Tasks with a `<name>` label column and a `<name>_scores` column (a struct, or a map in
    schema version 1), in the schema's order."""
    names = set(schema.names)
    return [f.name[: -len(SCORES_SUFFIX)] for f in schema
            if f.name.endswith(SCORES_SUFFIX) and f.name[: -len(SCORES_SUFFIX)] in names
            and (pa.types.is_struct(f.type) or pa.types.is_map(f.type))]


def added_in_version_3(name: str) -> bool:
    """Whether column `name` is one version 3 added: `speech_ratio` or a quality signal."""
    return name == SPEECH_RATIO or name.endswith(SIGNAL_SUFFIXES)


def normalized(table: pa.Table, columns: Sequence[str] = ()) -> pa.Table:
    """`table` (any columns of a shard of any version) in the current form. Version 1: each
    `map<string, X>` column becomes a struct of X with one field per key, in the order the keys
    first appear (version 1 wrote a task's scores in its label set's order), null where a row's
    map lacks the key. Versions 1 and 2: each of `columns` (those the reader asked for; a read
    of the columns a shard has leaves the others out) that version 3 added and the table lacks
    comes back as a float32 column of nulls, at the end. A current table is returned as is."""
    version = int(schema_version(table.schema))
    for i, field in enumerate(table.schema):
        if pa.types.is_map(field.type):
            table = table.set_column(i, field.name, _struct_of_map(table[field.name]))
    if version < 3:
        for name in columns:
            if added_in_version_3(name) and name not in table.column_names:
                table = table.append_column(pa.field(name, pa.float32()),
                                            pa.nulls(table.num_rows, pa.float32()))
    return table


def _struct_of_map(column: pa.ChunkedArray) -> pa.Array:
    import pyarrow.compute as pc

    maps = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    offsets = maps.offsets
    first, last = offsets[0].as_py(), offsets[-1].as_py()
    keys = pc.unique(maps.keys.slice(first, last - first)).to_pylist()  # in first-seen order
    if not keys:  # no row has a key: nothing to keep (and a struct array needs a field)
        return pa.nulls(len(maps), pa.struct([]))
    values = [pc.map_lookup(maps, pa.scalar(k, maps.type.key_type), "first") for k in keys]
    return pa.StructArray.from_arrays(values, fields=[pa.field(k, maps.type.item_type)
                                                      for k in keys], mask=pc.is_null(maps))
