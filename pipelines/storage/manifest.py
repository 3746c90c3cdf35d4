"""Manifests: a Parquet, CSV or JSON-lines file naming the objects to label.

Each row needs a `uri` (or `source_uri`/`path`) column; `size` and `etag` are optional. Entries
are spelled canonically (`pipelines.storage.uri.canonical_uri`), relative ones against the
manifest's folder, so that an entry and a listing of the same object are one input.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Iterator, Mapping
from typing import Any

from pipelines.storage.errors import StorageError, storage_error
from pipelines.storage.filesystem import resolve
from pipelines.storage.listing import ObjectInfo
from pipelines.storage.retry import RetryPolicy, retrying
from pipelines.storage.uri import canonical_uri, folder_of

MANIFEST_URI_COLUMNS = ("uri", "source_uri", "path")
MANIFEST_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv",
                    ".jsonl": "jsonl", ".ndjson": "jsonl"}


def _manifest_format(path: str) -> str | None:
    lowered = path.lower()
    for suffix in (".gz", ".bz2", ".zst", ".xz"):
        if lowered.endswith(suffix) and not lowered.endswith(".parquet" + suffix):
            lowered = lowered[: -len(suffix)]
            break
    return MANIFEST_FORMATS.get(posixpath.splitext(lowered)[1])


def is_manifest(uri: str) -> bool:
    """True when ``uri`` names a Parquet/CSV/JSONL manifest (by its suffix)."""
    return _manifest_format(uri.split("?", 1)[0]) is not None



def _entry_uri(entry: str, manifest_uri: str, number: int) -> str:
    """An entry's canonical URI: relative ones against the manifest's folder (a leading '/'
    is an absolute path in a local manifest and the bucket's root in an S3 one)."""
    try:
        return canonical_uri(entry, base=folder_of(manifest_uri))
    except ValueError as exc:
        raise StorageError(manifest_uri, f"row {number}: {exc}", "bad_manifest") from None


def _manifest_rows(fmt: str, handle, uri: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(row number, row dict) in file order, streaming."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(handle)
        names = pf.schema_arrow.names
        column = next((c for c in MANIFEST_URI_COLUMNS if c in names), None)
        if column is None:
            raise StorageError(uri, f"no {'/'.join(MANIFEST_URI_COLUMNS)} column "
                                    f"(columns: {names})", "bad_manifest")
        wanted = [c for c in (column, "size", "etag") if c in names]
        number = 0
        for batch in pf.iter_batches(batch_size=4096, columns=wanted):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    elif fmt == "csv":
        reader = csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8", newline=""))
        if not reader.fieldnames:
            raise StorageError(uri, "empty CSV (no header row)", "bad_manifest")
        if not any(c in reader.fieldnames for c in MANIFEST_URI_COLUMNS):
            raise StorageError(uri, f"no {'/'.join(MANIFEST_URI_COLUMNS)} column "
                                    f"(columns: {reader.fieldnames})", "bad_manifest")
        for number, row in enumerate(reader, start=1):
            yield number, {k: (v if v != "" else None) for k, v in row.items() if k is not None}
    else:
        for number, line in enumerate(io.TextIOWrapper(handle, encoding="utf-8"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StorageError(uri, f"line {number}: not JSON ({exc.msg})",
                                   "bad_manifest") from None
            if not isinstance(row, dict):
                raise StorageError(uri, f"line {number}: expected a JSON object",
                                   "bad_manifest")
            yield number, row


def read_manifest(uri: str, storage=None,
                  retry: RetryPolicy | None = None) -> Iterator[ObjectInfo]:
    """Stream the entries of a Parquet, CSV or JSON-lines manifest.

    Each row needs a ``uri`` (or ``source_uri``/``path``) column; ``size`` and ``etag`` are
    optional. Entries without a scheme resolve against the manifest's folder (an absolute local
    path stays as is in a local manifest). ``.gz``/``.bz2``/``.zst``/``.xz`` CSV/JSONL files are
    decompressed. Problems raise ``StorageError`` of kind ``bad_manifest`` naming file and row.
    """
    fs, path = resolve(uri, storage)
    fmt = _manifest_format(path)
    if fmt is None:
        raise StorageError(uri, "unknown manifest format (expected .parquet, .csv or .jsonl)",
                           "bad_manifest")
    handle = retrying(lambda: fs.open(path, "rb", compression=None if fmt == "parquet"
                                      else "infer"), uri, storage, "read manifest", retry)
    with handle:
        try:
            column: str | None = None
            for number, row in _manifest_rows(fmt, handle, uri):
                column = column or _uri_column(row, uri)
                yield _entry(row, column, number, uri)
        except StorageError:
            raise
        except (UnicodeDecodeError, csv.Error, EOFError) as exc:
            raise StorageError(uri, f"unreadable {fmt} manifest ({type(exc).__name__}: {exc})",
                               "bad_manifest") from None
        except Exception as exc:  # noqa: BLE001 - parquet errors come from many places
            if type(exc).__module__.startswith("pyarrow"):
                raise StorageError(uri, f"unreadable {fmt} manifest ({exc})",
                                   "bad_manifest") from None
            raise storage_error(exc, uri, storage, "read manifest") from None


def _uri_column(row: Mapping[str, Any], uri: str) -> str:
    column = next((c for c in MANIFEST_URI_COLUMNS if c in row), None)
    if column is None:
        raise StorageError(uri, f"no {'/'.join(MANIFEST_URI_COLUMNS)} column "
                                f"(columns: {sorted(row)})", "bad_manifest")
    return column


def _entry(row: Mapping[str, Any], column: str, number: int, uri: str) -> ObjectInfo:
    """Row `number` of manifest `uri` as the object it names."""
    entry = row.get(column)
    if not isinstance(entry, str) or not entry.strip():
        raise StorageError(uri, f"row {number}: empty or non-text {column!r}", "bad_manifest")
    size = row.get("size")
    try:
        size = int(size) if size is not None else None
    except (TypeError, ValueError):
        raise StorageError(uri, f"row {number}: size {size!r} is not an integer",
                           "bad_manifest") from None
    etag = row.get("etag")
    return ObjectInfo(_entry_uri(entry, uri, number), size,
                      str(etag).strip('"') if etag not in (None, "") else None)

