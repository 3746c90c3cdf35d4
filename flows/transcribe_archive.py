"""`transcribe-archive`: transcribe every new or changed recording under a prefix and write
subtitles (SRT and WebVTT) next to the Parquet tables.

Thin, like `label-corpus`: validate the parameters -> run the Ray Data job (`pipelines.job`,
task `asr` only) -> check the output -> write this run's subtitles -> publish a summary.
Credentials are never flow parameters: the job reads them from the worker's AWS_* environment;
only the non-secret endpoint may be passed.

Subtitles: for every file row of this run with status ok, its segments (ordered by
`segment_index`) become `<output>/subtitles/<relative path>.srt` and `.vtt`, where the relative
path is the object's path below the input prefix (below the manifest's folder for a manifest,
below the file's folder for a single-object input), extension kept (`a/b.wav` ->
`subtitles/a/b.wav.srt`). An object outside that prefix (a manifest entry elsewhere) uses its
basename; when two objects of one run would share a name, each of them gets a short hash of its
URI (`b.wav.1a2b3c4d.srt`). Objects whose row of this run is an error lose subtitles an earlier
run wrote for them (their content changed and is no longer usable). Cue layout and timing:
`flows.subtitles`.

Resuming: the job's run id is derived from the Prefect flow run (`<scheduled start>-<flow run id
prefix>`), so a retried task or flow run reuses it: the job skips objects already labelled, and
subtitles are recomputed for every file row carrying this run id, whichever attempt wrote it.
Writing them again gives the same bytes; a new flow run with nothing new to label has no rows
with its run id and writes nothing. The summary is computed from the `files/` rows of the run
id (not the last attempt's report), so it covers all attempts.
"""

# No `from __future__ import annotations`: served flows are pickled by value and pydantic
# must resolve the parameter model from the real annotation, not a string.

import hashlib
import os
import posixpath
import unicodedata
from collections import Counter, defaultdict
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from flows.label_corpus import flow_run_id, label_checked
from flows.subtitles import to_srt, to_webvtt
from pipelines.job import JobSpec, StageOverrides
from pipelines.stages import PIECE_SECONDS

SUBTITLES_DIR = "subtitles"


class TranscribeArchiveParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="s3://bucket/prefix, a local folder or a manifest")
    output: str
    model: str = Field(description="Kimi-Audio checkpoint folder on the workers")
    language: Literal["auto", "en", "zh"] = "auto"
    max_new_tokens: int = Field(384, ge=1, description="per segment of up to 30 s")
    max_audio_seconds: float | None = Field(
        None, gt=0, description="longer recordings get a too_long error row (default 6 h)")
    piece_seconds: float = Field(
        PIECE_SECONDS, ge=30, description="a longer recording travels through the stages as "
                                          "pieces of at most this much audio")
    endpoint_url: str | None = Field(None, description="S3 endpoint (credentials: AWS_* env)")
    ray_address: str | None = None
    stages: StageOverrides = {}

    def job_spec(self, run_id: str | None = None) -> JobSpec:
        options = {"endpoint_url": self.endpoint_url} if self.endpoint_url else None
        return JobSpec(input=self.input, output=self.output, model=self.model, tasks=["asr"],
                       language=self.language, max_new_tokens=self.max_new_tokens,
                       max_audio_seconds=self.max_audio_seconds, piece_seconds=self.piece_seconds,
                       storage_options=options,
                       ray_address=self.ray_address, run_id=run_id, **self.stages)


# -- paths ---------------------------------------------------------------------------------

def _location(uri: str) -> tuple[str, str]:
    """(protocol, path) without touching storage: local paths absolute, others as written."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "file", os.path.abspath(os.path.expanduser(uri))
    scheme = scheme.lower()
    if scheme == "file":
        return "file", os.path.abspath(rest)
    return ("s3" if scheme == "s3a" else scheme), rest.lstrip("/")  # memory:///x == memory://x


def input_prefix(input_uri: str, is_manifest: bool, is_single_object: bool) -> tuple[str, str]:
    """The (protocol, path) folder subtitle paths are relative to."""
    protocol, path = _location(input_uri)
    path = path.rstrip("/") or path
    if is_manifest or is_single_object:
        path = posixpath.dirname(path)
    return protocol, path


def relative_path(source_uri: str, prefix: tuple[str, str]) -> str:
    """`source_uri` below `prefix`, or its basename when it is not below it."""
    protocol, path = _location(source_uri)
    root = prefix[1].rstrip("/")
    if protocol == prefix[0] and path.startswith(root + "/"):
        relative = posixpath.normpath(path[len(root) + 1:])
        if not relative.startswith("../") and relative not in (".", ".."):
            return relative
    name = posixpath.basename(path.rstrip("/"))
    return name or hashlib.sha256(source_uri.encode()).hexdigest()[:8]


def safe_relative(relative: str) -> str:
    """A relative path every filesystem takes: control and format characters (NUL, newline,
    bidi overrides) become '_', '', '.' and '..' parts become '_', and a part over 200 bytes is
    cut and given a hash of itself (names stay under the 255-byte limit with .srt/.vtt)."""
    parts = []
    for part in relative.split("/"):
        part = "".join("_" if unicodedata.category(c) in ("Cc", "Cf", "Cs") else c
                       for c in part)
        if part in ("", ".", ".."):
            part = "_"
        if len(part.encode("utf-8", "surrogatepass")) > 200:
            digest = hashlib.sha256(part.encode("utf-8", "surrogatepass")).hexdigest()[:8]
            part = part.encode("utf-8", "surrogatepass")[:180].decode("utf-8", "ignore") + digest
        parts.append(part)
    return "/".join(parts)


def subtitle_names(source_uris: list[str], prefix: tuple[str, str]) -> dict[str, str]:
    """source URI -> relative path of its subtitles (without .srt/.vtt), unique within the list."""
    names = {uri: safe_relative(relative_path(uri, prefix)) for uri in sorted(set(source_uris))}
    shared = Counter(names.values())
    return {uri: (f"{name}.{hashlib.sha256(uri.encode()).hexdigest()[:8]}" if shared[name] > 1
                  else name) for uri, name in names.items()}


# -- subtitles -----------------------------------------------------------------------------

SEGMENT_COLUMNS = ["source_uri", "segment_index", "start_s", "end_s", "status", "transcript",
                   "run_id"]
FILE_COLUMNS = ["source_uri", "status", "error", "duration_s", "run_id"]


def write_file_subtitles(fs, root: str, name: str, segments: list[dict]) -> list[str]:
    """Write `<root>/subtitles/<name>.srt` and `.vtt` from one file's segment rows (any order;
    silent segments and empty transcripts give no cue). Returns the two paths."""
    ordered = sorted(segments, key=lambda s: s["segment_index"])
    cues = [(s["start_s"], s["end_s"], s.get("transcript") if s.get("status", "ok") == "ok"
             else None) for s in ordered]
    base = f"{root}/{SUBTITLES_DIR}/{name}"
    fs.makedirs(posixpath.dirname(base), exist_ok=True)
    paths = []
    for suffix, text in ((".srt", to_srt(cues)), (".vtt", to_webvtt(cues))):
        fs.pipe_file(base + suffix, text.encode("utf-8"))
        paths.append(base + suffix)
    return paths


def write_run_subtitles(spec: JobSpec, run_id: str) -> dict[str, Any]:
    """Subtitles for every ok file of `run_id`; stale subtitles of its error files removed.

    Reads `files/` (a few columns) for the run's rows, then, for the shards holding them, the
    segments shard of the same name (the writer names both parts of a shard alike), falling back
    to a scan of `segments/` for files it did not find there. Returns counts and kinds."""
    from pipelines.job import read_parquet, read_table_dir, this_run
    from pipelines.storage import open_input, resolve

    fs, root = resolve(spec.output, spec.storage_options)
    retry = spec.storage_retry
    files_by_shard: dict[str, list[dict]] = defaultdict(list)
    for path, table in read_table_dir(fs, f"{root}/files", FILE_COLUMNS, retry):
        rows = this_run(table, run_id).to_pylist()
        if rows:
            files_by_shard[path.rsplit("/", 1)[-1]].extend(rows)
    file_rows = [row for rows in files_by_shard.values() for row in rows]
    ok_uris = {r["source_uri"] for r in file_rows if r["status"] == "ok"}
    counts: dict[str, Any] = {
        "run_id": run_id, "recordings": len(ok_uris),
        "errors": sum(r["status"] != "ok" for r in file_rows),
        "errors_by_kind": dict(Counter((r["error"] or {}).get("kind") or "unknown"
                                       for r in file_rows if r["status"] != "ok")),
        "audio_hours": sum(r["duration_s"] or 0.0 for r in file_rows
                           if r["status"] == "ok") / 3600.0,
        "segments": 0, "recordings_without_segments": 0, "subtitle_files": 0,
        "subtitle_files_removed": 0, "subtitles_dir": f"{spec.output.rstrip('/')}/{SUBTITLES_DIR}/",
    }
    if not file_rows:
        return counts

    prefix = input_prefix(spec.input, spec.is_manifest(),
                          not spec.is_manifest()
                          and not open_input(spec.input, spec.storage_options).is_prefix)
    names = subtitle_names([r["source_uri"] for r in file_rows], prefix)

    for uri in sorted({r["source_uri"] for r in file_rows} - ok_uris):
        for suffix in (".srt", ".vtt"):
            stale = f"{root}/{SUBTITLES_DIR}/{names[uri]}{suffix}"
            if fs.exists(stale):
                fs.rm_file(stale)
                counts["subtitle_files_removed"] += 1

    pending = set(ok_uris)

    def write(segments_by_uri: dict[str, list[dict]]) -> None:
        for uri in sorted(segments_by_uri):
            if uri in pending:
                write_file_subtitles(fs, root, names[uri], segments_by_uri[uri])
                counts["segments"] += len(segments_by_uri[uri])
                counts["subtitle_files"] += 2
                pending.discard(uri)

    def segments_of(table) -> dict[str, list[dict]]:
        found: dict[str, list[dict]] = defaultdict(list)
        for row in this_run(table, run_id).to_pylist():
            if row["source_uri"] in pending:
                found[row["source_uri"]].append(row)
        return found

    for shard, rows in sorted(files_by_shard.items()):
        if any(r["source_uri"] in pending for r in rows) and fs.exists(f"{root}/segments/{shard}"):
            write(segments_of(read_parquet(fs, f"{root}/segments/{shard}", SEGMENT_COLUMNS,
                                           retry)))
    if pending:  # not in their shard's segments part: scan everything once
        collected: dict[str, list[dict]] = defaultdict(list)
        for _, table in read_table_dir(fs, f"{root}/segments", SEGMENT_COLUMNS, retry):
            for uri, segs in segments_of(table).items():
                collected[uri].extend(segs)
        write(collected)
    for uri in sorted(pending):  # an ok file without segment rows: empty subtitles, counted
        write_file_subtitles(fs, root, names[uri], [])
        counts["subtitle_files"] += 2
        counts["recordings_without_segments"] += 1
    return counts


# -- the flow ------------------------------------------------------------------------------

@task(retries=2, retry_delay_seconds=10)
def write_subtitles(spec: JobSpec, run_id: str) -> dict[str, Any]:
    return write_run_subtitles(spec, run_id)


@task
def publish(report: dict[str, Any], subtitles: dict[str, Any], output: str) -> None:
    output = output.rstrip("/")
    rows = [{"metric": "recordings transcribed", "value": subtitles["recordings"]},
            {"metric": "already transcribed (skipped)",
             "value": report["planned"].get("already_done", 0)},
            {"metric": "audio hours", "value": round(subtitles["audio_hours"], 4)},
            {"metric": "segments", "value": subtitles["segments"]},
            {"metric": "subtitle files written", "value": subtitles["subtitle_files"]},
            {"metric": "errors", "value": subtitles["errors"]},
            *({"metric": f"errors: {kind}", "value": n}
              for kind, n in sorted(subtitles["errors_by_kind"].items())),
            {"metric": "wall seconds (last attempt)", "value": round(report["wall_s"], 1)}]
    create_table_artifact(key="transcribe-archive-summary", table=rows,
                          description=f"run {subtitles['run_id']}")
    create_markdown_artifact(key="transcribe-archive-output", markdown=(
        f"### Transcripts of run `{subtitles['run_id']}`\n\n"
        f"- subtitles (`.srt`, `.vtt`): [`{output}/{SUBTITLES_DIR}/`]({output}/{SUBTITLES_DIR}/)\n"
        f"- files table (stitched transcripts): [`{output}/files/`]({output}/files/)\n"
        f"- segments table (timed transcripts): [`{output}/segments/`]({output}/segments/)\n"
        f"- run report: [`{output}/_runs/{report['run_id']}/report.json`]"
        f"({output}/_runs/{report['run_id']}/report.json)\n"))


@flow(name="transcribe-archive", log_prints=True)
def transcribe_archive(params: TranscribeArchiveParams) -> dict[str, Any]:
    logger = get_run_logger()
    spec = params.job_spec(run_id=flow_run_id())
    report = label_checked(spec, "transcribe-archive")
    subtitles = write_subtitles(spec, report["run_id"])
    publish(report, subtitles, spec.output)
    logger.info("run %s: %s recordings, %s subtitle files, errors %s", report["run_id"],
                subtitles["recordings"], subtitles["subtitle_files"], subtitles["errors_by_kind"])
    report["subtitles"] = subtitles
    return report
