"""The layout of a labelled output: the only code that spells its folders and files.

    <output>/files/part-<hash>.parquet         one row per input object (pipelines.schema)
    <output>/segments/part-<hash>.parquet      one row per segment; same name as its files part
    <output>/subtitles/<name>.srt|.vtt         transcribe-archive's subtitles
    <output>/_lease.json                       the running job's lease (pipelines.storage.lease)
    <output>/_runs/<run id>/report.json        a finished run's report
    <output>/_runs/<run id>/plan/plan-*.parquet  a running job's to-do list
    <output>/_runs/<run id>/subtitles.json     how a transcribe-archive run named its subtitles
    <output>/_staging/                         objects being written (moved into place)
    <output>/_evaluations/<UTC time>/          evaluation reports (default folder)

`OutputLayout(root)` joins these onto `root`, which may be a URI (for messages and reports) or
a path on the output's filesystem (for I/O): both are plain strings joined with '/'.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

TABLES = ("files", "segments")  # a shard's two parts (its segments part is written first)
SUBTITLES = "subtitles"
RUNS = "_runs"
STAGING = "_staging"
EVALUATIONS = "_evaluations"
LEASE = "_lease.json"
REPORT = "report.json"
PLAN = "plan"
SUBTITLE_NAMING = "subtitles.json"


@dataclass(frozen=True)
class OutputLayout:
    root: str

    def __post_init__(self):
        object.__setattr__(self, "root", self.root.rstrip("/") or self.root)

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    @property
    def files(self) -> str:
        return self.path("files")

    @property
    def segments(self) -> str:
        return self.path("segments")

    def table(self, name: str) -> str:
        """The folder of table `name` (one of `TABLES`)."""
        if name not in TABLES:
            raise ValueError(f"unknown table {name!r} (tables: {', '.join(TABLES)})")
        return self.path(name)

    def shard(self, table: str, name: str) -> str:
        return f"{self.table(table)}/{name}"

    @staticmethod
    def shard_relative(table: str, name: str) -> str:
        """A shard's path below the output (what staged writes take)."""
        return f"{table}/{name}"

    @property
    def subtitles(self) -> str:
        return self.path(SUBTITLES)

    def subtitle(self, name: str, suffix: str) -> str:
        return f"{self.subtitles}/{name}{suffix}"

    @property
    def runs(self) -> str:
        return self.path(RUNS)

    def run(self, run_id: str) -> str:
        return f"{self.runs}/{run_id}"

    def report(self, run_id: str) -> str:
        return f"{self.run(run_id)}/{REPORT}"

    def plan(self, run_id: str) -> str:
        return f"{self.run(run_id)}/{PLAN}"

    def plan_shard(self, run_id: str, number: int) -> str:
        return f"{self.plan(run_id)}/plan-{number:05d}.parquet"

    def subtitle_naming(self, run_id: str) -> str:
        return f"{self.run(run_id)}/{SUBTITLE_NAMING}"

    @property
    def lease(self) -> str:
        return self.path(LEASE)

    @property
    def staging(self) -> str:
        return self.path(STAGING)

    def staged(self, relative: str) -> str:
        """Where the object bound for `relative` is written before it is moved there."""
        return f"{self.staging}/{relative.replace('/', '-')}"

    def evaluation(self, stamp: str) -> str:
        return self.path(f"{EVALUATIONS}/{stamp}")

    @staticmethod
    def run_id_of(run_folder: str) -> str:
        """The run id of a `_runs/<run id>` folder or of a file in it."""
        parts = run_folder.rstrip("/").split("/")
        return parts[len(parts) - parts[::-1].index(RUNS)]


def shard_name(uris_and_etags: list[tuple[str, str | None]]) -> str:
    """A shard's file name, from its objects' URIs and etags: the same objects always land in
    the same shard name (a rerun or a retried task rewrites it, never a second copy)."""
    digest = hashlib.sha256()
    for uri, etag in sorted(uris_and_etags, key=lambda x: (x[0], x[1] or "")):
        digest.update(f"{uri}\0{etag or ''}\n".encode())
    return f"part-{digest.hexdigest()[:20]}.parquet"
