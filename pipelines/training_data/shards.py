"""The shards of a build: kept rows buffered per split, serialised, written in place.

Rows go out in input order, at most `rows_per_shard` per shard. The tars hold the same rows as
the Parquet shard of the same number: per sample `<key>.json` (every column but the tokens) and
`<key>.tokens.npy` (int32, numpy format), adjacent as WebDataset wants; so do the exports with
audio (`pipelines.training_data.exports`), which get each shard once it is written. Every object
is serialised first, so the sha256 in the manifest is that of exactly what was uploaded, then
staged and moved into place (`pipelines.storage.write_atomic`).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.storage import write_atomic
from pipelines.training_data.output import TOKENS_MEMBER, parquet_shard, webdataset_shard
from pipelines.training_data.selection import SPLITS

if TYPE_CHECKING:
    from pipelines.training_data.exports import AudioExports

TAR_MTIME = 0  # fixed member metadata: the same rows always give the same tar bytes


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def webdataset_bytes(table: pa.Table) -> bytes:
    """One tar: per row `<key>.json` then `<key>.tokens.npy`."""
    import numpy as np

    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for row in table.to_pylist():
            npy = io.BytesIO()
            np.save(npy, np.asarray(row.pop("semantic_tokens"), dtype=np.int32),
                    allow_pickle=False)
            _tar_member(tar, f"{row['key']}.json",
                        json.dumps(row, ensure_ascii=False, sort_keys=True).encode())
            _tar_member(tar, f"{row['key']}.{TOKENS_MEMBER}", npy.getvalue())
    return sink.getvalue()


def put_bytes(fs, root: str, relative: str, data: bytes) -> None:
    """Bytes already serialised, staged and moved to `<root>/<relative>`, retried while the
    store is unavailable."""
    write_atomic(fs, root, relative, lambda handle: handle.write(data))


class ShardWriter:
    """Buffers kept rows per split and writes `rows_per_shard`-row shards as they fill; keeps
    each written shard's manifest entry (`shards`) and each split's totals (`stats`). Each
    Parquet shard also goes to WebDataset with `webdataset`, and to `exports` when given."""

    def __init__(self, fs, root: str, rows_per_shard: int, webdataset: bool,
                 exports: AudioExports | None = None):
        self.fs, self.root = fs, root
        self.rows_per_shard, self.webdataset = rows_per_shard, webdataset
        self.exports = exports
        self.buffers: dict[str, list[pa.Table]] = {s: [] for s in SPLITS}
        self.buffered = dict.fromkeys(SPLITS, 0)
        self.shards: list[dict[str, Any]] = []
        self.number = dict.fromkeys(SPLITS, 0)
        self.stats = {s: {"rows": 0, "source_files": set(), "duration_s": 0.0, "tokens": 0}
                      for s in SPLITS}

    def add(self, split: str, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.buffers[split].append(table)
        self.buffered[split] += table.num_rows
        while self.buffered[split] >= self.rows_per_shard:
            self._flush(split, self.rows_per_shard)

    def close(self) -> None:
        for split in SPLITS:
            if self.buffered[split]:
                self._flush(split, self.buffered[split])
        if self.exports is not None:
            self.shards += self.exports.close()

    def _take(self, split: str, rows: int) -> pa.Table:
        """The first `rows` buffered rows of `split`; the rest stay buffered."""
        whole = pa.concat_tables(self.buffers[split])
        shard, rest = whole.slice(0, rows).combine_chunks(), whole.slice(rows)
        self.buffers[split] = [rest] if rest.num_rows else []
        self.buffered[split] = rest.num_rows
        return shard

    def _flush(self, split: str, rows: int) -> None:
        shard = self._take(split, rows)
        number = self.number[split]
        self.number[split] += 1
        outputs: list[tuple[str, str, Callable[[pa.Table], bytes]]] = [
            (parquet_shard(split, number), "parquet", parquet_bytes)]
        if self.webdataset:
            outputs.append((webdataset_shard(split, number), "webdataset", webdataset_bytes))
        for relative, fmt, serialise in outputs:
            data = serialise(shard)
            put_bytes(self.fs, self.root, relative, data)
            self.shards.append({"path": relative, "split": split, "format": fmt,
                                "rows": shard.num_rows, "bytes": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()})
        if self.exports is not None:
            self.shards += self.exports.write(split, number, shard)
        self._count(split, shard)

    def _count(self, split: str, shard: pa.Table) -> None:
        stats = self.stats[split]
        stats["rows"] += shard.num_rows
        stats["source_files"].update(shard["source_uri"].to_pylist())
        stats["duration_s"] += pc.sum(shard["duration_s"]).as_py() or 0.0
        stats["tokens"] += pc.sum(shard["num_tokens"]).as_py() or 0

    def split_totals(self) -> dict[str, dict[str, Any]]:
        """Per split: rows, source files, duration (s, rounded to ms) and tokens written."""
        return {s: {"rows": st["rows"], "source_files": len(st["source_files"]),
                    "duration_s": round(st["duration_s"], 3), "tokens": st["tokens"]}
                for s, st in self.stats.items()}
