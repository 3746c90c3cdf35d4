"""`transcribe-archive`: transcribe every new or changed recording under a prefix and write
subtitles (SRT and WebVTT) next to the Parquet tables.

Thin, like `label-corpus`: validate the parameters -> run the Ray Data job (`pipelines.job`,
task `asr` only) -> check the output -> write the subtitles -> publish a summary.
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
`pipelines.subtitles.formats`.

Resuming: the job's run id is derived from the Prefect flow run (`<scheduled start>-<flow run id
prefix>`), so a retried task or flow run reuses it: the job skips objects already labelled, and
subtitles are recomputed for every file row carrying this run id, whichever attempt wrote it.
Writing them again gives the same bytes. A run stopped between labelling and subtitles leaves ok
rows of an earlier run id without subtitles (or with those of the object's previous content):
every run also writes the subtitles of the input's earlier ok rows whose files are missing or
older than their `files/` shard, found from one listing of `subtitles/` and of `files/`, so a
new flow run with nothing new to label and nothing missing writes nothing. Each run records
the folder its names are below and the objects it named otherwise (`_runs/<run id>/
subtitles.json`); earlier recordings are looked for, and written back, under the names their
run gave them (a run on a subfolder of an earlier run's input would otherwise write copies
under names relative to the subfolder). A name that an earlier run's recording holds (runs on
sibling folders, a day's folder each, whose recorders repeat file names) is not taken over:
the new recording gets its URI's hash, as two objects of one run do. The summary is
computed from the `files/` rows of the run id (not the last attempt's report), so it covers all
attempts; it adds how many earlier recordings got their subtitles back.
"""

# No `from __future__ import annotations`: served flows are pickled by value and pydantic
# must resolve the parameter model from the real annotation, not a string.

import hashlib
import json
import os
import posixpath
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from flows.label_corpus import flow_run_id, label_checked
from pipelines.job import JobSpec, StageOverrides
from pipelines.stages import PIECE_SECONDS
from pipelines.subtitles import to_srt, to_webvtt

SUBTITLES_DIR = "subtitles"
NAMING_FILE = "subtitles.json"  # in _runs/<run id>/: the folder its subtitle names are below


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


def _below(source_uri: str, prefix: tuple[str, str]) -> str | None:
    """`source_uri` relative to `prefix`, None when it is not below it."""
    protocol, path = _location(source_uri)
    root = prefix[1].rstrip("/")
    if protocol == prefix[0] and path.startswith(root + "/"):
        relative = posixpath.normpath(path[len(root) + 1:])
        if not relative.startswith("../") and relative not in (".", ".."):
            return relative
    return None


def relative_path(source_uri: str, prefix: tuple[str, str]) -> str:
    """`source_uri` below `prefix`, or its basename when it is not below it."""
    relative = _below(source_uri, prefix)
    if relative is not None:
        return relative
    name = posixpath.basename(_location(source_uri)[1].rstrip("/"))
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
    return {uri: with_hash(name, uri) if shared[name] > 1 else name
            for uri, name in names.items()}


def with_hash(name: str, uri: str) -> str:
    """`name` made the object's own: a short hash of its URI appended (`b.wav.1a2b3c4d`)."""
    return f"{name}.{hashlib.sha256(uri.encode()).hexdigest()[:8]}"


# -- subtitles -----------------------------------------------------------------------------

SEGMENT_COLUMNS = ["source_uri", "segment_index", "start_s", "end_s", "status", "transcript",
                   "run_id"]
FILE_COLUMNS = ["source_uri", "status", "error", "duration_s", "run_id"]


def write_file_subtitles(fs, root: str, name: str, segments: list[dict],
                         unless_same: bool = False) -> list[str]:
    """Write `<root>/subtitles/<name>.srt` and `.vtt` from one file's segment rows (any order;
    silent segments and empty transcripts give no cue). Returns the paths written: both, or
    none when `unless_same` and both files already hold these bytes."""
    ordered = sorted(segments, key=lambda s: s["segment_index"])
    cues = [(s["start_s"], s["end_s"], s.get("transcript") if s.get("status", "ok") == "ok"
             else None) for s in ordered]
    base = f"{root}/{SUBTITLES_DIR}/{name}"
    texts = {base + ".srt": to_srt(cues).encode("utf-8"),
             base + ".vtt": to_webvtt(cues).encode("utf-8")}
    if unless_same:
        try:
            if all(fs.cat_file(path) == body for path, body in texts.items()):
                return []
        except FileNotFoundError:
            pass
    fs.makedirs(posixpath.dirname(base), exist_ok=True)
    for path, body in texts.items():
        fs.pipe_file(path, body)
    return list(texts)


def modified_times(fs, folder: str, retry=None) -> dict[str, float | None]:
    """Path -> modification time (POSIX seconds; None where the store gives none) of every file
    under `folder`, from one listing: no request per file."""
    from pipelines.storage import retrying, uri_of

    def listing() -> dict[str, dict]:
        return fs.find(folder, detail=True) if fs.exists(folder) else {}

    times: dict[str, float | None] = {}
    for path, info in retrying(listing, uri_of(fs, folder), action="list", policy=retry).items():
        when = next((info[k] for k in ("mtime", "LastModified", "created")
                     if info.get(k) is not None), None)
        times[path] = when.timestamp() if hasattr(when, "timestamp") else when
    return times


def input_scope(spec: JobSpec, prefix: tuple[str, str]) -> Callable[[str], bool]:
    """Whether an object is one of this input's: a manifest's entry, else below the prefix.
    Only those get subtitles recovered, under the names this input gives them (an output once
    written from another input would otherwise get copies under other names)."""
    from pipelines.storage import read_manifest

    if spec.is_manifest():
        listed = {info.uri for info in read_manifest(spec.input, spec.storage_options,
                                                     spec.storage_retry)}
        return listed.__contains__
    return lambda uri: _below(uri, prefix) is not None


def naming_file(root: str, run_id: str) -> str:
    """Where a run records how it named its subtitles."""
    return f"{root}/_runs/{run_id}/{NAMING_FILE}"


Naming = tuple[tuple[str, str], dict[str, str]]  # (folder names are below, {uri: other name})


def record_naming(fs, root: str, run_id: str, prefix: tuple[str, str],
                  renamed: dict[str, str], retry=None) -> None:
    """The folder this run's names are below, and the objects it named otherwise (a name an
    earlier run's object holds)."""
    from pipelines.storage import retrying, uri_of

    path = naming_file(root, run_id)
    body = json.dumps({"protocol": prefix[0], "path": prefix[1], "renamed": renamed}).encode()

    def write() -> None:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.pipe_file(path, body)

    retrying(write, uri_of(fs, path), action="write", policy=retry)


def recorded_namings(fs, root: str, run_ids: list[str], retry=None) -> dict[str, Naming]:
    """How each of `run_ids` named its subtitles, read in one batch of requests; a run that
    wrote none (stopped before its subtitles) or wrote them before runs recorded it is absent."""
    from pipelines.storage import retrying, uri_of

    paths = [naming_file(root, run_id) for run_id in run_ids]
    found = retrying(lambda: fs.cat(paths, on_error="omit") if paths else {},
                     uri_of(fs, f"{root}/_runs"), action="read", policy=retry)
    namings = {}
    for path, body in found.items():  # .../_runs/<run id>/subtitles.json, however spelled
        data = json.loads(body)
        namings[path.rstrip("/").rsplit("/", 2)[-2]] = (
            (data["protocol"], data["path"]), data.get("renamed") or {})
    return namings


def names_of(source_uris: list[str], naming: Naming) -> dict[str, str]:
    """The names a run with `naming` gave these objects."""
    prefix, renamed = naming
    names = subtitle_names(source_uris, prefix)
    names.update({uri: renamed[uri] for uri in names if uri in renamed})
    return names


def write_run_subtitles(spec: JobSpec, run_id: str) -> dict[str, Any]:
    """Subtitles for every ok file of `run_id`, and for every earlier ok file of the input whose
    subtitles are missing or older than its row (a run stopped between labelling and subtitles:
    never written, or still those of the object's previous content); stale subtitles of error
    files removed.

    Lists `subtitles/` and `files/` once and reads `files/` (a few columns), then, for the
    shards holding files to write, the segments shard of the same name (the writer names both
    parts of a shard alike), falling back to a scan of `segments/` for files it did not find
    there. Returns counts and kinds: those of the run's rows, plus `subtitle_files` written and
    `recovered` (earlier recordings whose subtitles were written again)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.job import read_parquet, read_table_dir
    from pipelines.storage import open_input, resolve

    fs, root = resolve(spec.output, spec.storage_options)
    retry = spec.storage_retry
    written_at = modified_times(fs, f"{root}/{SUBTITLES_DIR}", retry)
    shard_at = modified_times(fs, f"{root}/files", retry)
    file_rows: list[dict] = []
    earlier: dict[str, list[tuple[str, bool, str]]] = defaultdict(list)  # run: (uri, ok, shard)
    for shard in sorted(p for p in shard_at if p.endswith(".parquet")):
        for row in read_parquet(fs, shard, FILE_COLUMNS, retry).to_pylist():
            if row["run_id"] == run_id:
                file_rows.append({**row, "shard": shard})
            else:
                earlier[row["run_id"]].append((row["source_uri"], row["status"] == "ok", shard))
    ok_uris = {r["source_uri"] for r in file_rows if r["status"] == "ok"}
    counts: dict[str, Any] = {
        "run_id": run_id, "recordings": len(ok_uris),
        "errors": sum(r["status"] != "ok" for r in file_rows),
        "errors_by_kind": dict(Counter((r["error"] or {}).get("kind") or "unknown"
                                       for r in file_rows if r["status"] != "ok")),
        "audio_hours": sum(r["duration_s"] or 0.0 for r in file_rows
                           if r["status"] == "ok") / 3600.0,
        "segments": 0, "recordings_without_segments": 0, "subtitle_files": 0,
        "subtitle_files_removed": 0, "recovered": 0,
        "subtitles_dir": f"{spec.output.rstrip('/')}/{SUBTITLES_DIR}/",
    }
    if not file_rows and not earlier:
        return counts

    prefix = input_prefix(spec.input, spec.is_manifest(),
                          not spec.is_manifest()
                          and not open_input(spec.input, spec.storage_options).is_prefix)
    namings = recorded_namings(fs, root, sorted(earlier), retry) if earlier else {}
    claimed: dict[str, str] = {}  # subtitle name -> the earlier object whose subtitles it holds
    for other, rows in sorted(earlier.items()):
        if other in namings:
            for uri, name in names_of([u for u, ok, _ in rows if ok], namings[other]).items():
                claimed.setdefault(name, uri)
    names = subtitle_names([r["source_uri"] for r in file_rows], prefix)
    # runs on sibling folders (a day's folder each) give their files the same names: a name an
    # earlier object holds gets this object's hash, as two objects of one run do
    renamed = {uri: with_hash(name, uri) for uri, name in names.items()
               if claimed.get(name, uri) != uri}
    names.update(renamed)
    if file_rows:
        record_naming(fs, root, run_id, prefix, renamed, retry)
    pending: dict[str, tuple[str, str, str]] = {}  # uri -> (run id, subtitle name, files shard)
    unwanted = [names[r["source_uri"]] for r in file_rows if r["status"] != "ok"]
    for row in file_rows:
        if row["status"] == "ok":
            pending[row["source_uri"]] = (run_id, names[row["source_uri"]], row["shard"])

    in_scope = input_scope(spec, prefix) if earlier else None
    maybe_same: set[str] = set()
    for other, rows in sorted(earlier.items()):
        rows = [row for row in rows if row[0] not in names and in_scope(row[0])]
        if not rows:
            continue
        # as that run named them: an earlier run on a parent or sibling folder of this input
        # named them relative to its own input
        other_names = names_of([uri for uri, _, _ in rows], namings.get(other, (prefix, {})))
        for uri, ok, shard in rows:
            paths = [f"{root}/{SUBTITLES_DIR}/{other_names[uri]}{s}" for s in (".srt", ".vtt")]
            missing = any(p not in written_at for p in paths)
            # older than the row: written for the object's previous content (the run that
            # relabelled it stopped before its subtitles)
            stale = any(written_at.get(p) is not None and shard_at[shard] is not None
                        and written_at[p] < shard_at[shard] for p in paths)
            if ok and (missing or stale):
                pending[uri] = (other, other_names[uri], shard)
                if not missing:  # maybe only its shard was rewritten (a row of another
                    maybe_same.add(uri)  # object dropped from it): compared before writing
            elif not ok and stale:
                unwanted.append(other_names[uri])

    for name in sorted(unwanted):
        for suffix in (".srt", ".vtt"):
            stale = f"{root}/{SUBTITLES_DIR}/{name}{suffix}"
            if stale in written_at:
                fs.rm_file(stale)
                counts["subtitle_files_removed"] += 1

    def put(uri: str, segments: list[dict]) -> None:
        written = write_file_subtitles(fs, root, pending[uri][1], segments,
                                       unless_same=uri in maybe_same)
        counts["subtitle_files"] += len(written)
        if pending[uri][0] != run_id and written:
            counts["recovered"] += 1
        del pending[uri]

    def write(segments_by_uri: dict[str, list[dict]]) -> None:
        for uri in sorted(segments_by_uri):
            if uri in pending:
                if pending[uri][0] == run_id:
                    counts["segments"] += len(segments_by_uri[uri])
                put(uri, segments_by_uri[uri])

    def segments_of(table) -> dict[str, list[dict]]:
        """The segments of pending files, of the run that wrote their file row."""
        found: dict[str, list[dict]] = defaultdict(list)
        wanted = table.filter(pc.is_in(table["source_uri"], pa.array(sorted(pending), pa.string())))
        for row in wanted.to_pylist():
            if row["run_id"] == pending[row["source_uri"]][0]:
                found[row["source_uri"]].append(row)
        return found

    for shard in sorted({shard for _, _, shard in pending.values()}):
        segments = f"{root}/segments/{shard.rsplit('/', 1)[-1]}"
        if fs.exists(segments):
            write(segments_of(read_parquet(fs, segments, SEGMENT_COLUMNS, retry)))
    if pending:  # not in their shard's segments part: scan everything once
        collected: dict[str, list[dict]] = defaultdict(list)
        for _, table in read_table_dir(fs, f"{root}/segments", SEGMENT_COLUMNS, retry):
            for uri, segs in segments_of(table).items():
                collected[uri].extend(segs)
        write(collected)
    for uri in sorted(pending):  # an ok file without segment rows: empty subtitles, counted
        counts["recordings_without_segments"] += pending[uri][0] == run_id
        put(uri, [])
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
            {"metric": "recordings of earlier runs given their missing subtitles",
             "value": subtitles["recovered"]},
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
    logger.info("run %s: %s recordings, %s subtitle files (%s recordings of earlier runs), "
                "errors %s", report["run_id"], subtitles["recordings"],
                subtitles["subtitle_files"], subtitles["recovered"], subtitles["errors_by_kind"])
    report["subtitles"] = subtitles
    return report
