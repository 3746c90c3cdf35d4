"""A dry run: what a run of a job would do, read from the input's listing, the output's `files/`
and the headers of the objects to label. Nothing is written, no lease is taken, Ray is not
started.

    plan = dry_run(spec)          # JSON-able: counts, skipped, audio hours, the output
    print(format_dry_run(plan))

The counts are the planning's own (`pipelines.job.plan.to_do`): new, changed, earlier errors
tried again, already labelled, repeated entries, skipped by extension, and objects with rows
in the output that the input no longer lists.

The audio hours are read from the headers of the objects to label (`soundfile.info` through
`pipelines.storage.opened_head`: at most 1 MiB of each object, one or two range requests on
S3). Up to `HEADERS_LOCAL` local objects, or `HEADERS_REMOTE` remote ones (each costs requests),
every header is read and the hours are exact; past that the headers of a random sample of that
many are read and the hours estimated from it (hours per byte of the sample times the bytes to
label, or per object without sizes), and the plan says so. An object whose header tells no
length within the bytes read (not audio, broken) adds no hours and is counted as unreadable:
a run would make it an error row.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from pipelines.job.plan import Plan, finished_objects, to_do
from pipelines.job.progress import clock_time
from pipelines.spec import JobSpec
from pipelines.storage import (HEAD_BYTES, ObjectInfo, OutputLayout, RetryPolicy, StorageError,
                               opened_head, resolve, retrying)
from pipelines.storage import uri as uris

HEADERS_LOCAL = 20_000  # local headers read at most (a millisecond each)
HEADERS_REMOTE = 500  # remote headers read at most (a request or two each)


def dry_run(spec: JobSpec) -> dict[str, Any]:
    """The plan of a run of `spec`, read and not written (module docstring)."""
    from kimi_ops.audio.decode import default_max_seconds

    fs, root = resolve(spec.output, spec.storage_options)
    done = finished_objects(fs, OutputLayout(root), spec.max_audio_seconds
                            or default_max_seconds(), spec.storage_retry)
    planned = Plan(Counter())
    sample = Reservoir(HEADERS_LOCAL)
    for info in to_do(spec, planned, *done, set()):
        sample.add(info)
    counts = dict(planned.counts)
    counts["new"] = (counts.get("todo", 0) - counts.get("changed", 0)
                     - counts.get("retried_errors", 0))
    layout = OutputLayout(spec.output)
    return {"dry_run": True, "input": spec.input, "output": spec.output, "run_id": spec.run_id,
            "planned": counts, "skipped_by_extension": dict(planned.skipped),
            "not_listed": planned.not_listed, "audio": audio_hours(spec, sample),
            "writes": {"files": layout.files, "segments": layout.segments,
                       "report": layout.report(spec.run_id or "<run id>")}}


class Reservoir:
    """A uniform random sample of at most `size` objects of a stream (reservoir sampling), with
    the count and the bytes of the whole stream."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.rng = size, random.Random(seed)
        self.items: list[ObjectInfo] = []
        self.count = self.bytes = 0
        self.sizes_known = True

    def add(self, info: ObjectInfo) -> None:
        self.count += 1
        self.bytes += info.size or 0
        self.sizes_known = self.sizes_known and info.size is not None
        if len(self.items) < self.size:
            self.items.append(info)
            return
        slot = self.rng.randrange(self.count)
        if slot < self.size:
            self.items[slot] = info

    def subsample(self, size: int) -> list[ObjectInfo]:
        """At most `size` of the sample, still uniform over the stream."""
        return self.items if len(self.items) <= size else self.rng.sample(self.items, size)


def audio_hours(spec: JobSpec, sample: Reservoir) -> dict[str, Any]:
    """The audio of the objects `sample` saw, from headers (module docstring)."""
    remote = any(not uris.is_local(info.uri) for info in sample.items)
    items = sample.subsample(HEADERS_REMOTE if remote else HEADERS_LOCAL)
    seconds = [header_seconds(info.uri, spec.storage_options, spec.storage_retry)
               for info in items]
    total = sum(s or 0.0 for s in seconds)
    estimated = len(items) < sample.count
    if estimated:
        read_bytes = sum(info.size or 0 for info in items)
        total = (total / read_bytes * sample.bytes if sample.sizes_known and read_bytes
                 else total / len(items) * sample.count)
    return {"objects": sample.count, "bytes": sample.bytes if sample.sizes_known else None,
            "headers_read": len(items), "unreadable": sum(s is None for s in seconds),
            "hours": total / 3600.0, "estimated": estimated}


def header_seconds(uri: str, storage=None, retry: RetryPolicy | None = None) -> float | None:
    """The object's length in seconds from its header (at most `HEAD_BYTES` read), or None when
    its header tells none: not audio, broken, gone, or not readable by us. A store that stays
    unavailable raises its StorageError."""
    import soundfile as sf

    def read() -> float | None:
        with opened_head(uri, storage) as head:
            try:
                info = sf.info(head)
            except (RuntimeError, sf.LibsndfileError):
                info = None
            if head.error is not None:
                raise head.error
        if info is None or head.exhausted or info.samplerate <= 0 or info.frames <= 0:
            return None
        return info.frames / info.samplerate

    try:
        return retrying(read, uri, storage, "read", retry)
    except StorageError as exc:
        if exc.retryable:
            raise
        return None


def format_dry_run(plan: dict[str, Any]) -> str:
    """The dry run's plan for a reader: counts, audio, what a run would write."""
    counts, audio = plan["planned"], plan["audio"]
    lines = ["dry run: nothing was labelled or written",
             f"input {plan['input']}: {counts.get('listed', 0)} audio objects"
             + _skipped(plan["skipped_by_extension"]),
             f"  to label: {counts.get('todo', 0)} ({counts['new']} new, "
             f"{counts.get('changed', 0)} changed, {counts.get('retried_errors', 0)} earlier "
             f"errors tried again); already labelled: {counts.get('already_done', 0)}"]
    if counts.get("duplicates"):
        lines.append(f"  {counts['duplicates']} repeated entries of the input, labelled once")
    if counts.get("not_listed"):
        named = ", ".join(plan["not_listed"][:3])
        lines.append(f"  {counts['not_listed']} objects with rows in the output are not in this "
                     f"input (deleted, or outside it; their rows stay), e.g. {named}")
    lines.append(_audio(audio))
    writes, run_id = plan["writes"], plan["run_id"]
    lines.append(f"output {plan['output']}: would write {writes['files']}/, "
                 f"{writes['segments']}/ and {writes['report']} (run id: "
                 + (f"{run_id})" if run_id else "a new one when the run starts)"))
    return "\n".join(lines)


def _skipped(skipped: dict[str, int]) -> str:
    if not skipped:
        return ""
    named = ", ".join(f"{n} .{ext}" if ext else f"{n} without an extension"
                      for ext, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f", {sum(skipped.values())} other objects skipped by extension ({named})"


def _audio(audio: dict[str, Any]) -> str:
    if not audio["objects"]:
        return "audio to label: none"
    hours = f"{clock_time(audio['hours'] * 3600)} ({audio['hours']:.3g} hours)"
    unreadable = (f"; {audio['unreadable']} without a length in their first "
                  f"{HEAD_BYTES >> 20} MiB (not audio, or broken)" if audio["unreadable"] else "")
    if not audio["estimated"]:
        return (f"audio to label: {hours}, from the headers of all {audio['objects']} objects"
                f"{unreadable}")
    return (f"audio to label: about {hours}, estimated from the headers of "
            f"{audio['headers_read']} of {audio['objects']} objects chosen at random "
            f"(each header read costs a request){unreadable}")
