"""Write stage (CPU tasks): typed Parquet shards of the labelled rows, and each file's line for
the run report (`SUMMARY_SCHEMA`).
"""

from __future__ import annotations

import json
import time

import pyarrow as pa

from pipelines.schema import files_schema, segments_schema, to_table
from pipelines.spec import STAGE_DEFAULTS, StageResources
from pipelines.stages.base import Stage
from pipelines.storage import (OutputLayout, RetryPolicy, StorageConfig, resolve, shard_name,
                               write_parquet_atomic)


class WriteStage(Stage):
    """Typed Parquet shards: the segments shard first, then the files shard, whose presence marks
    the shard complete (a reader of `files/` never sees a half-written shard; the planner removes
    segments shards left without their files shard by a crash). Returns one summary row per file
    (`SUMMARY_SCHEMA`); a piece of a long file is not written here but handed on, rows and all,
    to the driver's stitcher (`pipelines.job.stitch`), which writes the file once all its
    pieces are in."""

    name = "write"

    def __init__(self, output: str, storage: StorageConfig | None, task_specs: list[str],
                 task_params: dict, semantic_tokens: bool, retry: RetryPolicy | None = None,
                 resources: StageResources | None = None):
        from kimi_ops.tasks import get_task

        self.tasks = [get_task(spec, **task_params) for spec in task_specs]
        self.output = output.rstrip("/")
        self.storage = storage
        self.files_schema = files_schema(self.tasks)
        self.segments_schema = segments_schema(self.tasks, semantic_tokens)
        self.retry = retry  # None: the default policy
        self.resources = resources or STAGE_DEFAULTS["write"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        start = time.perf_counter()
        whole = pc.equal(batch["pieces"], 1)
        done = batch.filter(whole)
        files = [json.loads(s) for s in done["files_json"].to_pylist()]
        if files:
            self.write(files, [seg for s in done["segments_json"].to_pylist()
                               for seg in json.loads(s)])
        elapsed = time.perf_counter() - start
        rows = [{**summary_row(f, **times, write_s=elapsed / len(files)), "piece": 0, "pieces": 1}
                for f, times in zip(files, done.select(STAGE_TIMES).to_pylist())]
        # a piece goes on as the stitcher's input; its file's summary comes from the stitch
        rows += batch.filter(pc.invert(whole)).select(PIECE_COLUMNS).to_pylist()
        return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)

    def write(self, files: list[dict], segments: list[dict]) -> None:
        """One shard of `files` (and their `segments`), named by the files' URIs and etags."""
        name = shard_name([(f["source_uri"], f["etag"]) for f in files])
        fs, root = resolve(self.output, self.storage)
        for table_name, rows, schema in (("segments", segments, self.segments_schema),
                                         ("files", files, self.files_schema)):
            write_parquet_atomic(fs, root, OutputLayout.shard_relative(table_name, name),
                                 to_table(rows, schema), self.retry)


STAGE_TIMES = ("decode_s", "frontend_s", "label_s")
REPORT_COLUMNS = ("source_uri", "status", "error_kind", "duration_s", "num_segments",
                  *STAGE_TIMES, "write_s")  # a file's line in the run report
SUMMARY_SCHEMA = pa.schema([
    ("source_uri", pa.string()), ("status", pa.string()), ("error_kind", pa.string()),
    ("duration_s", pa.float64()), ("num_segments", pa.int64()),
    *((name, pa.float64()) for name in (*STAGE_TIMES, "write_s")),
    # a piece of a long file: which one, of how many, and its rows for the stitcher
    ("piece", pa.int32()), ("pieces", pa.int32()),
    ("files_json", pa.large_string()), ("segments_json", pa.large_string()),
])
PIECE_COLUMNS = ("source_uri", "piece", "pieces", "files_json", "segments_json", *STAGE_TIMES)


def summary_row(file_row: dict, **seconds: float) -> dict:
    """A written file's line in the run report: its status, audio and each stage's seconds."""
    return {"source_uri": file_row["source_uri"], "status": file_row["status"],
            "error_kind": (file_row.get("error") or {}).get("kind"),
            "duration_s": (file_row.get("duration_s") or 0.0) if file_row["status"] == "ok"
            else 0.0,  # the report's audio hours are the labelled ones
            "num_segments": file_row.get("num_segments") or 0, **seconds}
