"""Outputs in the layouts of output schema versions 1 and 2, for the tests that read old
outputs. Version 2 had no quality signals (`speech_ratio`, `<text>_avg_logprob`, ...); version 1
had none either, and `<task>_scores` was `map<string, float32>`, `finish_reason` and
`task_versions` were `map<string, string>`. The footers said their version. Made here with
pyarrow from current tables of the same rows (a version 1 map held the keys a row had)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MAP_COLUMNS = ("finish_reason", "task_versions")


def _was_a_map(field: pa.Field) -> bool:
    return pa.types.is_struct(field.type) and (field.name.endswith("_scores")
                                               or field.name in MAP_COLUMNS)


def as_schema_2(table: pa.Table) -> pa.Table:
    """`table` (a current segments or files table) as version 2 wrote it."""
    from pipelines.schema import added_in_version_3

    table = table.drop_columns([n for n in table.column_names if added_in_version_3(n)])
    metadata = {**(table.schema.metadata or {}), b"kimi_label.schema_version": b"2"}
    return table.replace_schema_metadata(metadata)


def as_schema_1(table: pa.Table) -> pa.Table:
    """`table` (a current segments or files table) as version 1 wrote it."""
    table = as_schema_2(table)
    fields, columns = [], []
    for field, column in zip(table.schema, table.columns):
        if _was_a_map(field):
            type_ = pa.map_(pa.string(), field.type.field(0).type)
            column = pa.array([None if v is None else [(k, x) for k, x in v.items()
                                                       if x is not None]
                               for v in column.to_pylist()], type_)
            field = pa.field(field.name, type_)
        fields.append(field)
        columns.append(column)
    metadata = {**(table.schema.metadata or {}), b"kimi_label.schema_version": b"1"}
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=metadata))


def copy_in_schema(output: str | Path, old: str | Path, version: int) -> str:
    """A copy of the local `output` whose Parquet shards are in the version 1 or 2 layout."""
    convert = {1: as_schema_1, 2: as_schema_2}[version]
    shutil.copytree(output, old)
    for path in Path(old).rglob("*.parquet"):
        pq.write_table(convert(pq.read_table(path)), path)
    return str(old)
