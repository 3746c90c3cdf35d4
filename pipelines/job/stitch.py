"""The driver's end of a job: a long file's pieces stitched back into one file.

Whole files' summary rows pass through; a long file's pieces are held until all are in, then
the file is stitched (its segments in order, its transcript joined and its signals aggregated
over all of them, as for a whole file: `pipelines.schema.file_fields`) and
written through the write stage's `write`, as one shard, like any other. A file with a failed
piece gets that piece's error row and no segments: every input stays one row. Nothing of a file
is written before all its pieces are labelled, so a run that dies in between leaves no trace of
it and the rerun labels it again.
"""

from __future__ import annotations

import json
import time

from pipelines.schema import file_fields
from pipelines.stages.write import REPORT_COLUMNS, STAGE_TIMES, WriteStage, summary_row


class PieceStitcher:
    """Summary rows in, final summary rows out (module docstring)."""

    def __init__(self, writer: WriteStage):
        self.writer = writer
        self.pending: dict[str, dict[int, dict]] = {}
        self.files = 0  # long files stitched
        self.pieces = 0

    def add(self, row: dict) -> list[dict]:
        """Summary rows that are final after `row` (a `SUMMARY_SCHEMA` row): [] while its file
        waits for pieces."""
        if row["pieces"] == 1:
            return [{k: row[k] for k in REPORT_COLUMNS}]
        got = self.pending.setdefault(row["source_uri"], {})
        got[row["piece"]] = row  # a piece Ray re-ran replaces itself
        if len(got) < row["pieces"]:
            return []
        del self.pending[row["source_uri"]]
        return [self._stitch([got[i] for i in sorted(got)])]

    def _stitch(self, pieces: list[dict]) -> dict:
        start = time.perf_counter()
        files = [json.loads(p["files_json"]) for p in pieces]
        failed = next((f for f in files if f["status"] == "error"), None)
        file_row, segments = dict(failed or files[0]), []
        if failed is None:
            segments = [seg for p in pieces for seg in json.loads(p["segments_json"])]
            file_row.update(file_fields(segments, self.writer.tasks))
        self.writer.write([file_row], segments)
        self.files, self.pieces = self.files + 1, self.pieces + len(pieces)
        return summary_row(file_row, **{k: sum(p[k] for p in pieces) for k in STAGE_TIMES},
                           write_s=time.perf_counter() - start)

    def check_complete(self) -> None:
        """Raise if a file still misses pieces when the dataset is exhausted (never expected:
        Ray Data delivers every row or fails the run)."""
        if self.pending:
            uri, got = next(iter(self.pending.items()))
            expected = next(iter(got.values()))["pieces"]
            raise RuntimeError(f"{len(self.pending)} long file(s) lack pieces at the end of the "
                               f"run, e.g. {uri}: {len(got)} of {expected}; a rerun labels them")
