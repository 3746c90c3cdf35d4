"""The output contract: two Parquet tables under the output URI, explicit and versioned.

`<output>/files/`    exactly one row per input object (labelled or failed).
`<output>/segments/` one row per segment of every decodable object.

The schemas are code, never inferred from data: the segments table gets one column group per
selected task (`ChoiceTask` -> label + `map<string, float>` scores; `GenerativeTask` -> its text
fields as strings and its flags as booleans). The schema version and the task versions are also
written to the Parquet key-value metadata of every file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa

from kimi_ops.tasks import ChoiceTask, GenerativeTask, Task

SCHEMA_VERSION = "1"

ERROR_TYPE = pa.struct([("kind", pa.string()), ("message", pa.string())])

FILES_FIELDS = [
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
    pa.field("error", ERROR_TYPE),  # null when ok
    pa.field("duration_s", pa.float64()),
    pa.field("num_segments", pa.int32()),
    pa.field("transcript", pa.string()),  # the segments' transcripts stitched in order
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
    pa.field("error", ERROR_TYPE),
]

SEGMENT_TAIL_FIELDS = [
    pa.field("finish_reason", pa.map_(pa.string(), pa.string())),  # generative task -> reason
    pa.field("model_id", pa.string()),
    pa.field("task_versions", pa.map_(pa.string(), pa.string())),
    pa.field("generation", pa.string()),  # JSON of the generation parameters
    pa.field("etag", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),
]

SEMANTIC_TOKENS_FIELD = pa.field("semantic_tokens", pa.list_(pa.int32()))  # 12.5 Hz VQ codes


def task_fields(task: Task) -> list[pa.Field]:
    if isinstance(task, ChoiceTask):
        return [pa.field(task.name, pa.string()),
                pa.field(f"{task.name}_scores", pa.map_(pa.string(), pa.float32()))]
    if isinstance(task, GenerativeTask):
        return ([pa.field(f, pa.string()) for f in task.text_fields]
                + [pa.field(f, pa.bool_()) for f in task.flags])
    raise TypeError(f"unknown task type {type(task).__name__}")


def _metadata(tasks: Sequence[Task], table: str) -> dict[bytes, bytes]:
    return {b"kimi_label.schema_version": SCHEMA_VERSION.encode(),
            b"kimi_label.table": table.encode(),
            b"kimi_label.task_versions": json.dumps({t.name: t.version for t in tasks}).encode()}


def files_schema(tasks: Sequence[Task] = ()) -> pa.Schema:
    return pa.schema(FILES_FIELDS, metadata=_metadata(tasks, "files"))


def segments_schema(tasks: Sequence[Task], semantic_tokens: bool = False) -> pa.Schema:
    fields = list(SEGMENT_BASE_FIELDS)
    seen = {f.name for f in fields} | {f.name for f in SEGMENT_TAIL_FIELDS}
    for task in tasks:
        for field in task_fields(task):
            if field.name in seen:
                raise ValueError(f"task {task.name!r}: output column {field.name!r} clashes "
                                 "with another column")
            seen.add(field.name)
            fields.append(field)
    fields += SEGMENT_TAIL_FIELDS
    if semantic_tokens:
        fields.append(SEMANTIC_TOKENS_FIELD)
    return pa.schema(fields, metadata=_metadata(tasks, "segments"))


def to_table(rows: Sequence[dict], schema: pa.Schema) -> pa.Table:
    """Rows (plain dicts) -> a table of exactly `schema`: missing keys become nulls, extra keys
    are an error (a typo must not silently drop a column)."""
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise ValueError(f"row has columns not in the schema: {sorted(extra)}")
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    for field in schema:
        if pa.types.is_map(field.type):
            columns[field.name] = [list(v.items()) if isinstance(v, dict) else v
                                   for v in columns[field.name]]
    return pa.Table.from_pydict(columns, schema=schema)
