"""The output contract: two Parquet tables under the output URI, explicit and versioned.

`<output>/files/`    exactly one row per input object (labelled or failed).
`<output>/segments/` one row per segment of every decodable object.

The schemas are code, never inferred from data: the segments table gets one column group per
selected task (`ChoiceTask` -> its label as a string and `<task>_scores`, a struct of one float32
per label in the label set's order; `GenerativeTask` -> its text fields as strings and its flags
as booleans), then `finish_reason` (a struct of one string per generative task) and
`task_versions` (a struct of one string per task). Structs, not maps: duckdb
(`emotion_scores.joy`), polars (`struct.field`), pyarrow and Hugging Face `datasets` (a dict)
all load them. The schema version and the task versions are also written to the Parquet
key-value metadata of every file.

Schema version 1 had `map<string, ...>` columns where version 2 has these structs (the files
table is the same in both). Readers of an output take either: `normalized` turns a version 1
table into the version 2 form in memory. A run does not add to a version 1 output
(`pipelines.job.checks` refuses it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa

from kimi_ops.tasks import ChoiceTask, GenerativeTask, Task

SCHEMA_VERSION = "2"
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
                + [pa.field(f, pa.bool_()) for f in task.flags])
    raise TypeError(f"unknown task type {type(task).__name__}")


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
    return pa.schema(FILES_FIELDS, metadata=_metadata(tasks, "files"))


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


def normalized(table: pa.Table) -> pa.Table:
    """`table` (any columns of a segments shard of either version) in the version 2 form: each
    `map<string, X>` column becomes a struct of X with one field per key, in the order the keys
    first appear (version 1 wrote a task's scores in its label set's order), null where a row's
    map lacks the key. A version 2 table is returned as is."""
    for i, field in enumerate(table.schema):
        if pa.types.is_map(field.type):
            table = table.set_column(i, field.name, _struct_of_map(table[field.name]))
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
