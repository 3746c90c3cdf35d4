"""Reference labels: the file a user gives, read and checked row by row.

References: one Parquet, CSV or JSON-lines file (CSV/JSONL may be .gz/.bz2/.zst/.xz), one row
per reference item, keyed by
  * `source_uri` (required): the object's URI as in the output's `files/` table; where no row
    has it exactly, as a run spells it (`pipelines.storage.uri.canonical_uri`, relative to the
    references file's folder: a relative path taken from there, `file://` dropped, `./` and
    `//` parts removed);
  * `segment_index` (optional): a row with a value refers to that segment (`segments/` row), a
    row without one (the column absent, or null) to the whole file;
and holding any of the task columns `transcript` (ASR, with an optional `language`, see
`kimi_ops.evaluation.text`) and closed-set labels named like the output's closed-set tasks
(`emotion`, `scene`, `sound_event`, or a user's own task). A null value (in CSV: an empty cell)
means "no reference for this task on this row"; an empty string in Parquet/JSONL is an empty
reference transcript. Closed-set labels match the output's label set ignoring case. Other
columns are ignored (and listed in the report). A key may appear once.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kimi_ops.evaluation import asr_language
from pipelines.evaluation.errors import EvaluationError, storage_refusal
from pipelines.storage import StorageConfig, canonical_uri, resolve, retrying
from pipelines.storage.uri import folder_of

KEY_COLUMNS = ("source_uri", "segment_index")
ASR_COLUMN = "transcript"
LANGUAGE_COLUMN = "language"
REFERENCE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl",
                     ".ndjson": "jsonl"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")


@dataclass(frozen=True)
class Reference:
    source_uri: str
    segment_index: int | None
    values: dict[str, str]  # task column -> reference value (transcript or label)
    language: str | None = None  # "en" | "zh" for a transcript
    # `source_uri` as a run spells the object (`as_listed`), tried when the exact one is absent
    listed_uri: str | None = None

    @property
    def key(self) -> tuple[str, int | None]:
        return self.source_uri, self.segment_index

    def uris(self) -> tuple[str, ...]:
        return (self.source_uri,) + ((self.listed_uri,) if self.listed_uri else ())


def as_listed(source: str, references_uri: str) -> str | None:
    """A reference's object spelled as a run's `files/` rows spell it (`canonical_uri`, a
    relative spelling taken from the references file's folder, as a manifest's entries are);
    None when it is already so, or when it names no object a run lists (above its bucket)."""
    try:
        spelled = canonical_uri(source, base=folder_of(references_uri))
    except ValueError:
        return None
    return spelled if spelled != source else None


# -- reading ---------------------------------------------------------------------------------

def reference_format(uri: str) -> str | None:
    """parquet, csv or jsonl, from the file name (a compression suffix aside); None if none."""
    lowered = uri.split("?", 1)[0].lower()
    for suffix in COMPRESSIONS:
        if lowered.endswith(suffix):
            lowered = lowered[: -len(suffix)]
            break
    return REFERENCE_FORMATS.get(posixpath.splitext(lowered)[1])


def read_reference_rows(uri: str, storage: StorageConfig
                        ) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the references file, values as stored (CSV: strings, '' -> None).
    Raises EvaluationError naming the file: an unknown format, unreadable contents, or the
    storage failure."""
    fmt = reference_format(uri)
    if fmt is None:
        raise EvaluationError(f"references {uri}: unknown format (expected .parquet, .csv or "
                              ".jsonl, optionally compressed)")
    data = _read_decompressed(uri, storage)
    try:
        return _ROW_READERS[fmt](data, uri)
    except (UnicodeDecodeError, csv.Error, EOFError, pa.ArrowException) as exc:
        raise EvaluationError(f"references {uri}: unreadable {fmt} ({exc})") from None


def _read_decompressed(uri: str, storage: StorageConfig) -> bytes:
    """The whole file, decompressed as its suffix says, read under the storage retry policy."""
    try:
        fs, path = resolve(uri, storage)
        return retrying(lambda: _whole(fs, path), uri, storage, "read references")
    except Exception as exc:  # noqa: BLE001 - every backend error is told as a storage error
        raise storage_refusal(exc, "references", uri, storage, "read references") from None


def _whole(fs, path: str) -> bytes:
    with fs.open(path, "rb", compression="infer") as handle:
        return handle.read()


def _parquet_rows(data: bytes, uri: str) -> tuple[list[str], list[dict[str, Any]]]:
    table = pq.read_table(pa.BufferReader(data))
    return table.column_names, table.to_pylist()


def _csv_rows(data: bytes, uri: str) -> tuple[list[str], list[dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
    rows = [{k: (v if v != "" else None) for k, v in row.items() if k is not None}
            for row in reader]
    return list(reader.fieldnames or []), rows


def _jsonl_rows(data: bytes, uri: str) -> tuple[list[str], list[dict[str, Any]]]:
    rows, columns = [], {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"references {uri}: line {number}: not JSON "
                                  f"({exc.msg})") from None
        if not isinstance(row, dict):
            raise EvaluationError(f"references {uri}: line {number}: expected a JSON object")
        columns.update(dict.fromkeys(row))
        rows.append(row)
    return list(columns), rows


_ROW_READERS = {"parquet": _parquet_rows, "csv": _csv_rows, "jsonl": _jsonl_rows}


# -- parsing ---------------------------------------------------------------------------------

def parse_references(uri: str, rows: Sequence[Mapping[str, Any]],
                     tasks: Sequence[str]) -> list[Reference]:
    """The rows (as read from `uri`) that hold a value for at least one of `tasks`, in order.
    Raises EvaluationError naming the row: no source_uri, a bad segment_index, a key already
    referenced, an unsupported transcript language."""
    refs, seen = [], {}
    for number, row in enumerate(rows, start=1):
        source = _source_uri(row, uri, number)
        index = _segment_index(row.get("segment_index"), uri, number)
        values = _task_values(row, tasks)
        if not values:
            continue
        key = (source, index)
        if key in seen:
            where = f"segment {index} of " if index is not None else ""
            raise EvaluationError(f"references {uri}: row {number}: {where}{source} is already "
                                  f"referenced in row {seen[key]}")
        seen[key] = number
        language = _language(row, values, uri, number)
        refs.append(Reference(source, index, values, language, as_listed(source, uri)))
    return refs


def _source_uri(row: Mapping[str, Any], uri: str, number: int) -> str:
    source = row.get("source_uri")
    if not isinstance(source, str) or not source.strip():
        raise EvaluationError(f"references {uri}: row {number}: empty or non-text source_uri")
    return source.strip()


def _segment_index(value: Any, uri: str, number: int) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        index = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        index = None
    if index is None or index < 0 or isinstance(value, bool):
        raise EvaluationError(f"references {uri}: row {number}: segment_index {value!r} is not "
                              "a non-negative integer")
    return index


def _task_values(row: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, str]:
    """The row's reference per task; a transcript as written (an empty one is a reference), a
    label stripped (an empty one is none)."""
    values = {t: str(row[t]) if t == ASR_COLUMN else str(row[t]).strip()
              for t in tasks if row.get(t) is not None}
    return {t: v for t, v in values.items() if v or t == ASR_COLUMN}


def _language(row: Mapping[str, Any], values: Mapping[str, str], uri: str,
              number: int) -> str | None:
    """The transcript's language ("en" | "zh"), declared or detected; None without one."""
    if ASR_COLUMN not in values:
        return None
    declared = row.get(LANGUAGE_COLUMN)
    try:
        return asr_language(values[ASR_COLUMN], None if declared is None else str(declared))
    except ValueError as exc:
        raise EvaluationError(f"references {uri}: row {number}: {exc}") from None
