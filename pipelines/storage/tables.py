"""Parquet tables on a filesystem: read shard by shard, written whole or not at all.

Every call is retried under a `RetryPolicy` (`pipelines.storage.retry`). Writes are staged under
the output's `_staging/` and moved into place, so a reader never sees a partial object (an
interrupted upload can be listed on some stores).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.storage.filesystem import uri_of
from pipelines.storage.layout import OutputLayout
from pipelines.storage.retry import RetryPolicy, retrying


def parquet_files(fs, folder: str, retry: RetryPolicy | None = None) -> list[str]:
    """The Parquet files under `folder`, sorted by path ([] when it does not exist)."""
    def listing() -> list[str]:
        return sorted(p for p in fs.find(folder) if p.endswith(".parquet")) \
            if fs.exists(folder) else []

    return retrying(listing, uri_of(fs, folder), action="list", policy=retry)


def read_parquet(fs, path: str, columns: list[str] | None = None,
                 retry: RetryPolicy | None = None) -> pa.Table:
    def read() -> pa.Table:
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)

    return retrying(read, uri_of(fs, path), action="read", policy=retry)


def read_schema(fs, path: str, retry: RetryPolicy | None = None) -> pa.Schema:
    """A Parquet file's schema, from its footer only."""
    def read() -> pa.Schema:
        with fs.open(path, "rb") as handle:
            return pq.read_schema(handle)

    return retrying(read, uri_of(fs, path), action="read", policy=retry)


def read_available(fs, path: str, columns: list[str],
                   retry: RetryPolicy | None = None) -> pa.Table:
    """The `columns` a Parquet file has, in one read; the others are skipped, not an error (an
    output labelled without a task, or by an older version, lacks that task's columns)."""
    def read() -> pa.Table:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            present = set(parquet.schema_arrow.names)
            return parquet.read(columns=[c for c in columns if c in present])

    return retrying(read, uri_of(fs, path), action="read", policy=retry)


def read_table_dir(fs, folder: str, columns: list[str] | None,
                   retry: RetryPolicy | None = None) -> Iterator[tuple[str, pa.Table]]:
    """(path, table) of every Parquet file under `folder` (sorted by path). The folder is listed
    at once; its files are read one at a time as the caller iterates, so a caller that folds
    them holds one shard, not the whole table."""
    paths = parquet_files(fs, folder, retry)
    return ((path, read_parquet(fs, path, columns, retry)) for path in paths)


def this_run(table: pa.Table, run_id: str) -> pa.Table:
    """The rows of `table` written by run `run_id`."""
    import pyarrow.compute as pc

    return table.filter(pc.equal(table["run_id"], run_id))


def write_atomic(fs, root: str, relative: str, write: Callable[[Any], None],
                 retry: RetryPolicy | None = None) -> None:
    """`write(handle)` into the output's staging folder, then move the object to
    `<root>/<relative>`. The whole write-and-move is retried under `retry`."""
    layout = OutputLayout(root)
    staged, final = layout.staged(relative), layout.path(relative)

    def write_and_move() -> None:
        fs.makedirs(layout.staging, exist_ok=True)
        with fs.open(staged, "wb") as handle:
            write(handle)
        fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        fs.mv(staged, final)

    retrying(write_and_move, uri_of(fs, final), action="write", policy=retry)


def write_parquet_atomic(fs, root: str, relative: str, table: pa.Table,
                         retry: RetryPolicy | None = None) -> None:
    write_atomic(fs, root, relative, lambda handle: pq.write_table(table, handle), retry)
