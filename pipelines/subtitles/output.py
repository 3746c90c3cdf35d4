"""What subtitles are made from, read from a labelled output with as few requests as it takes.

  * `read_state`: one listing of `subtitles/` and one of `files/`, each with its files'
    modification times (no request per file), and the `files/` rows (a few columns), this
    run's apart from every earlier run's.
  * `segments_of`: the segment rows of the files whose subtitles are to be written, each of the
    run that wrote the file's row. They are read from the `segments/` part named as the file's
    `files/` shard (the writer names both parts of a shard alike); the files not found there
    from one scan of `segments/`.

Paths are those of the output's filesystem, as its listings spell them (`OutputLayout` over
the path `resolve` gave).
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from pipelines.storage.filesystem import uri_of
from pipelines.storage.layout import OutputLayout
from pipelines.storage.retry import RetryPolicy, retrying
from pipelines.storage.tables import read_parquet, read_table_dir

FILE_COLUMNS = ["source_uri", "status", "error", "duration_s", "run_id"]
SEGMENT_COLUMNS = ["source_uri", "segment_index", "start_s", "end_s", "status", "transcript",
                   "run_id"]


class EarlierFile(NamedTuple):
    """A file row of an earlier run."""

    uri: str
    ok: bool
    shard: str  # the `files/` shard holding the row


@dataclass
class OutputState:
    """The output as one run's subtitles see it."""

    run_id: str
    subtitle_times: dict[str, float | None]  # every file under subtitles/ -> modified (or None)
    shard_times: dict[str, float | None]  # the same for files/
    this_run: list[dict] = field(default_factory=list)  # FILE_COLUMNS and `shard`
    earlier: dict[str, list[EarlierFile]] = field(default_factory=dict)  # by run id

    def ok_uris_by_run(self) -> dict[str, list[str]]:
        """Earlier run id -> its ok objects."""
        return {run_id: [f.uri for f in files if f.ok] for run_id, files in self.earlier.items()}


def modified_times(fs, folder: str, retry: RetryPolicy | None = None) -> dict[str, float | None]:
    """Path -> modification time (POSIX seconds; None where the store gives none) of every file
    under `folder`, from one listing: no request per file."""
    def listing() -> dict[str, dict]:
        return fs.find(folder, detail=True) if fs.exists(folder) else {}

    times: dict[str, float | None] = {}
    for path, info in retrying(listing, uri_of(fs, folder), action="list", policy=retry).items():
        when = next((info[k] for k in ("mtime", "LastModified", "created")
                     if info.get(k) is not None), None)
        times[path] = when.timestamp() if hasattr(when, "timestamp") else when
    return times


def read_state(fs, layout: OutputLayout, run_id: str,
               retry: RetryPolicy | None = None) -> OutputState:
    """The output at `layout` (on `fs`) as run `run_id`'s subtitles see it."""
    state = OutputState(run_id, modified_times(fs, layout.subtitles, retry),
                        modified_times(fs, layout.files, retry))
    earlier: dict[str, list[EarlierFile]] = defaultdict(list)
    for shard in sorted(p for p in state.shard_times if p.endswith(".parquet")):
        for row in read_parquet(fs, shard, FILE_COLUMNS, retry).to_pylist():
            if row["run_id"] == run_id:
                state.this_run.append({**row, "shard": shard})
            else:
                earlier[row["run_id"]].append(
                    EarlierFile(row["source_uri"], row["status"] == "ok", shard))
    state.earlier = dict(earlier)
    return state


def _rows_for(table, wanted: Mapping[str, tuple[str, str]]) -> dict[str, list[dict]]:
    """The rows of `table` of wanted files, each of the run its file row is of."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found: dict[str, list[dict]] = defaultdict(list)
    keep = pc.is_in(table["source_uri"], pa.array(sorted(wanted), pa.string()))
    for row in table.filter(keep).to_pylist():
        if row["run_id"] == wanted[row["source_uri"]][0]:
            found[row["source_uri"]].append(row)
    return found


def segments_of(fs, layout: OutputLayout, wanted: Mapping[str, tuple[str, str]],
                retry: RetryPolicy | None = None) -> Iterator[tuple[str, list[dict]]]:
    """(source URI, its segment rows, in no order) of every file in `wanted` (source URI ->
    (the run whose rows to take, the file row's `files/` shard)), each once: those of one
    segments part together, in URI order, then those found by the scan, then those without
    segment rows (with [])."""
    waiting = dict(wanted)

    def taken(found: Mapping[str, list[dict]]) -> Iterator[tuple[str, list[dict]]]:
        for uri in sorted(found):
            del waiting[uri]
            yield uri, found[uri]

    for shard in sorted({shard for _, shard in wanted.values()}):
        part = layout.shard("segments", posixpath.basename(shard))
        if fs.exists(part):
            yield from taken(_rows_for(read_parquet(fs, part, SEGMENT_COLUMNS, retry), waiting))
    if waiting:  # not in their shard's segments part: scan everything once
        scanned: dict[str, list[dict]] = defaultdict(list)
        for _, table in read_table_dir(fs, layout.segments, SEGMENT_COLUMNS, retry):
            for uri, rows in _rows_for(table, waiting).items():
                scanned[uri].extend(rows)
        yield from taken(scanned)
    yield from taken({uri: [] for uri in waiting})
