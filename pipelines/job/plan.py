"""Planning a run: the to-do list, streamed from the input's listing into Parquet plan shards.

Planning skips every object already in `<output>/files/` with the same URI and etag, labelled
or failed for a reason in its bytes (so a rerun adds nothing and a killed run resumes; errors of
the store, the device or the duration limit are tried again, see `settled`), rewrites earlier
rows of objects it redoes out of their shards, and removes what a crash left: segments shards
without their files shard, other runs' to-do lists. The list is written as plan shards under
`<output>/_runs/<run_id>/plan/`, which Ray reads: the driver never holds audio, and holds only
one plan shard of the listing at a time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kimi_ops.errors import content_error_kinds
from pipelines.batching import work_units
from pipelines.errors import JobError
from pipelines.spec import JobSpec
from pipelines.stages.read import PLAN_SCHEMA
from pipelines.storage import (AUDIO_EXTENSIONS, ObjectInfo, OutputLayout, RetryPolicy,
                               is_local_fs, list_objects, read_manifest, read_parquet,
                               read_table_dir, resolve, retrying, uri_of, write_parquet_atomic)
from pipelines.storage.layout import TABLES

NOT_LISTED_NAMED = 20  # objects a report names of those no longer in the input


@dataclass
class Plan:
    """What `plan` wrote: counts for the report, the plan shards and their work units."""

    counts: Counter
    shards: list[str] = field(default_factory=list)
    units: list[dict] = field(default_factory=list)  # {"plan_shard", "start", "stop"}
    plan_dir: str = ""
    not_listed: list[str] = field(default_factory=list)  # the first NOT_LISTED_NAMED
    skipped: Counter = field(default_factory=Counter)  # left out by extension, by extension


def settled(row: dict[str, Any], limit: float | None) -> bool:
    """Whether a files row is final for an unchanged object: labelled, or failed for a reason in
    its content (`kimi_ops.errors.content_error_kinds`). Errors of the store, of the device
    (out_of_memory) or of anything else are tried again by a rerun, and so is a `too_long` file
    that the run's duration limit (`limit`; None: no limit) now admits."""
    if row["status"] == "ok":
        return True
    kind = (row["error"] or {}).get("kind")
    if kind == "too_long":
        return limit is not None and row["duration_s"] is not None and row["duration_s"] > limit
    return kind in content_error_kinds()


def nothing_listed(spec: JobSpec, skipped: Counter) -> JobError:
    """The refusal of an input whose objects are none of them audio: what it held instead, and
    how to take it."""
    wanted = sorted(spec.extensions or AUDIO_EXTENSIONS)
    found = ", ".join(f"{n} .{ext}" if ext else f"{n} without an extension"
                      for ext, n in skipped.most_common(5))
    return JobError(f"{spec.input}: no audio to label: its {sum(skipped.values())} objects "
                    f"({found}) have none of the extensions {', '.join(wanted)} (--extensions "
                    "picks others that libsndfile reads, e.g. sph)")


def listing(spec: JobSpec, skipped: Counter | None = None) -> Iterator[ObjectInfo]:
    """The input's objects: a manifest's entries, or the audio objects under the prefix (those
    left out by extension counted in `skipped`)."""
    if spec.is_manifest():
        return read_manifest(spec.input, spec.storage_options, spec.storage_retry)
    return list_objects(spec.input, spec.extensions or AUDIO_EXTENSIONS, spec.storage_options,
                        spec.storage_retry, skipped=skipped)


def plan(spec: JobSpec, run_id: str) -> Plan:
    """Write the to-do list of run `run_id` as plan shards; returns what it wrote."""
    from kimi_ops.audio.decode import default_max_seconds

    fs, root = resolve(spec.output, spec.storage_options)
    layout, retry = OutputLayout(root), spec.storage_retry
    retrying(lambda: remove_leftovers(fs, layout, run_id), spec.output, action="cleanup",
             policy=retry)
    done = finished_objects(fs, layout, spec.max_audio_seconds or default_max_seconds(), retry)
    writer = _PlanWriter(fs, layout.plan(run_id), spec)
    result = Plan(Counter(), plan_dir=writer.folder)
    changed: set[str] = set()
    for info in to_do(spec, result, *done, changed):
        writer.add({"uri": info.uri, "size": info.size, "etag": info.etag})
    writer.flush()
    result.shards, result.units = writer.shards, writer.units
    if changed:
        drop_rows(fs, layout, changed, retry)
    return result


def to_do(spec: JobSpec, result: Plan, done: dict[str, str | None], retry_errors: set[str],
          changed: set[str]) -> Iterator[ObjectInfo]:
    """The listed objects a run labels (`finished_objects` gave `done` and `retry_errors`):
    new ones, changed ones, and those whose earlier error a rerun tries again (their URIs into
    `changed`). What it passes over is counted in `result` as it goes, the rest (skipped,
    not listed, changed) once the listing is exhausted. Reads, never writes."""
    seen: set[str] = set()
    for info in listing(spec, result.skipped):
        if info.uri in seen:  # a manifest naming an object twice: labelled once
            result.counts["duplicates"] += 1
            continue
        seen.add(info.uri)
        result.counts["listed"] += 1
        if info.uri in done:
            if done[info.uri] == info.etag and info.uri not in retry_errors:
                result.counts["already_done"] += 1
                continue
            changed.add(info.uri)
            result.counts["retried_errors"] += info.uri in retry_errors
        result.counts["todo"] += 1
        yield info
    _count_the_rest(spec, result, done, seen, changed)


def _count_the_rest(spec: JobSpec, result: Plan, done: dict, seen: set, changed: set) -> None:
    """Counts of what the listing left out, lacked or changed (zeros are not counted)."""
    counts = result.counts
    if result.skipped:
        counts["skipped_by_extension"] = sum(result.skipped.values())
    if not counts["listed"] and result.skipped:
        raise nothing_listed(spec, result.skipped)
    # objects labelled here before that this listing lacks (deleted from the input, or out of
    # its scope): their rows stay, and the report says how many there are
    not_listed = sorted(uri for uri in done if uri not in seen)
    if not_listed:
        counts["not_listed"] = len(not_listed)
    result.not_listed = not_listed[:NOT_LISTED_NAMED]
    if len(changed) > counts["retried_errors"]:
        counts["changed"] = len(changed) - counts["retried_errors"]
    for name in [k for k, n in counts.items() if not n]:
        del counts[name]


class _PlanWriter:
    """Plan rows -> plan shards of `spec.plan_shard_rows` rows, and their work units."""

    def __init__(self, fs, folder: str, spec: JobSpec):
        self.fs, self.folder, self.spec = fs, folder, spec
        self.rows: list[dict] = []
        self.shards: list[str] = []
        self.units: list[dict] = []
        fs.makedirs(folder, exist_ok=True)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.spec.plan_shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        # similar sizes next to each other: Ray batches, and so the engine's batches, then hold
        # clips of similar duration (a size-sorted shard is a cheap duration bucketing)
        self.rows.sort(key=lambda row: row["size"] or 0)
        path = f"{self.folder}/plan-{len(self.shards):05d}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=PLAN_SCHEMA)

        def write():
            with self.fs.open(path, "wb") as handle:
                pq.write_table(table, handle)

        retrying(write, uri_of(self.fs, self.folder), action="write",
                 policy=self.spec.storage_retry)
        self.shards.append(path)
        self.units.extend({"plan_shard": path, "start": a, "stop": b}
                          for a, b in work_units([row["size"] for row in self.rows],
                                                 self.spec.unit_rows, self.spec.unit_bytes))
        self.rows.clear()


def finished_objects(fs, layout: OutputLayout, limit: float | None,
                     retry: RetryPolicy | None) -> tuple[dict[str, str | None], set[str]]:
    """({uri: etag} of every object with a files row, the uris whose row a rerun may turn into
    labels: those not `settled`)."""
    done: dict[str, str | None] = {}
    retry_errors: set[str] = set()
    columns = ["source_uri", "etag", "status", "error", "duration_s"]
    for _, table in read_table_dir(fs, layout.files, columns, retry):
        for row in table.to_pylist():
            done[row["source_uri"]] = row["etag"]
            if not settled(row, limit):
                retry_errors.add(row["source_uri"])
    return done, retry_errors


def remove_leftovers(fs, layout: OutputLayout, run_id: str) -> None:
    """What crashed or stopped runs left: segments shards without their files shard (their
    objects are redone), and other runs' to-do lists (with their folder when nothing else is in
    it; a finished run's report stays). A retry of this run (`run_id`) rewrites its own."""
    if fs.exists(layout.segments):
        have = ({p.rsplit("/", 1)[-1] for p in fs.find(layout.files)}
                if fs.exists(layout.files) else set())
        for path in fs.find(layout.segments):
            if path.rsplit("/", 1)[-1] not in have:
                fs.rm(path)
    if not fs.exists(layout.runs):
        return
    for folder in fs.ls(layout.runs, detail=False):
        other = OutputLayout.run_id_of(folder)
        if other == run_id:
            continue
        if fs.exists(layout.plan(other)):
            fs.rm(layout.plan(other), recursive=True)
        if is_local_fs(fs) and fs.isdir(folder) and not fs.ls(folder):
            fs.rmdir(folder)


def drop_rows(fs, layout: OutputLayout, uris: set[str], retry: RetryPolicy | None = None) -> None:
    """Rewrite the shards that hold rows of `uris` without them (their content changed)."""
    for table_name in TABLES[::-1]:  # segments first, as a shard is written
        for path, table in read_table_dir(fs, layout.table(table_name), ["source_uri"], retry):
            stale = [u in uris for u in table["source_uri"].to_pylist()]
            if not any(stale):
                continue
            full = read_parquet(fs, path, None, retry)
            keep = pa.array([not s for s in stale])
            write_parquet_atomic(fs, layout.root, path[len(layout.root) + 1:], full.filter(keep),
                                 retry)
