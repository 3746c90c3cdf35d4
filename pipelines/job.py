"""A labelling job: validate, plan, run the Ray Data pipeline, report.

    spec = JobSpec(input="s3://bucket/prefix", output="s3://bucket/labels", model="/models/kimi")
    report = run_job(spec)

Validation happens before anything heavy: the spec (pydantic), the tasks, the checkpoint's files,
that the input can be listed and the output written. Planning streams the input listing and
skips every object already in `<output>/files/` with the same URI and etag, labelled or failed
for a reason in its bytes (so a rerun adds nothing and a killed run resumes; errors of the
store, the device or the duration limit are tried again, see `settled`), rewrites earlier rows
of objects it redoes out of their shards, and removes segments shards a crash left without
their files shard. A run whose tasks differ from the output's is refused up front. The to-do
list is written as Parquet plan shards under `<output>/_runs/<run_id>/plan/`, which Ray reads:
the driver never holds audio, and holds only one plan shard of the listing at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, field_validator,
                      model_validator)

from pipelines.stages import PIECE_SECONDS
from pipelines.storage import RetryPolicy

log = logging.getLogger(__name__)

PLAN_SHARD_ROWS = 2000
UNIT_ROWS = 32  # 2 CPUs, 256 files: 64-row units ran 1.1x slower (later overlap)
UNIT_BYTES = 256 << 20
INFLIGHT_BYTES = 128 << 20  # CPU-only; 2 CPUs, 256 files: 64 MiB held the stages back (1.1x slower)
DECODE_TASKS_PER_GPU = 4  # see `place_io_tasks`
INFLIGHT_BYTES_PER_GPU = 1 << 30  # a 30 s segment's features: 3.8 MB in bf16 (full model)


class StageResources(BaseModel):
    """How one stage is scheduled: `map_batches` arguments, in one place."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(4, ge=1)
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    concurrency: int = Field(1, ge=1)  # actors (actor stages) or max parallel tasks
    # worker deaths survived: restarts of a dead actor and retries of the batch it held (actor
    # stages), or re-runs of a task whose worker died (task stages); Ray's own default for
    # actors is unbounded, which turns a batch that always kills its worker into a hang
    max_restarts: int = Field(3, ge=0)
    # torch threads of an actor stage (None: Ray's OMP_NUM_THREADS, the whole CPUs asked for,
    # at least 1); see `place_on_cpus` for the local default
    threads: int | None = Field(None, ge=1)


STAGES = ("decode", "frontend", "label", "write")  # the StageResources fields of a JobSpec


def known_stages(stages: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown} (known: {', '.join(STAGES)})")
    return stages


# stage settings by stage name, as flows take them (a JobSpec has one field per stage)
StageOverrides = Annotated[dict[str, StageResources], AfterValidator(known_stages)]


def some_tasks(tasks: list[str]) -> list[str]:
    """Task specs without stray spaces, in one order whatever order they were given in (the
    shards of an output then share one column order)."""
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ValueError("name at least one task, e.g. asr,emotion")
    return sorted(tasks)


TaskNames = Annotated[list[str], AfterValidator(some_tasks)]  # of a job, or a flow's params


_QUESTIONS_IGNORED: set[tuple[str, tuple[str, ...]]] = set()


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str  # s3://bucket/prefix, any fsspec URI, a local folder, or a manifest file
    output: str
    model: str
    glm_tokenizer: str | None = None
    tasks: TaskNames = ["asr"]
    language: str = "auto"
    question: str | None = None
    max_new_tokens: int = Field(256, ge=1)
    # a longer input gets a `too_long` error row, read from its header before decoding
    # (None: KIMI_MAX_AUDIO_SECONDS on the workers, else 6 h; kimi_ops.audio.decode)
    max_audio_seconds: float | None = Field(None, gt=0)
    semantic_tokens: bool = False
    extensions: list[str] | None = None
    storage_options: dict[str, Any] | None = Field(None, repr=False)  # may hold a secret
    storage_retry: RetryPolicy = RetryPolicy()  # reads, listings and writes of this job
    ray_address: str | None = None
    device: str | None = None  # per actor; default cuda when the actor has a GPU
    run_id: str | None = None
    decode: StageResources = StageResources(batch_size=4, num_cpus=0.5)
    frontend: StageResources = StageResources(batch_size=4, num_cpus=0.5)
    label: StageResources = StageResources(batch_size=8, num_cpus=0.5)
    write: StageResources = StageResources(batch_size=8, num_cpus=0.25)
    no_progress_timeout_s: float = 600.0
    # a file with more audio than this travels through the stages as pieces of whole segments
    # of at most this much, stitched back by the driver (`pipelines.stages.PieceStitcher`)
    piece_seconds: float = Field(PIECE_SECONDS, ge=30)
    plan_shard_rows: int = Field(PLAN_SHARD_ROWS, ge=1)  # rows per plan file
    # the work unit Ray hands to the stages: a slice of a plan shard of at most this many
    # objects and input bytes (one larger object is a unit alone). It bounds what a stage
    # holds at once, whatever the corpus size, and spreads the corpus over the cluster.
    unit_rows: int = Field(UNIT_ROWS, ge=1)
    unit_bytes: int = Field(UNIT_BYTES, ge=1)
    # object-store bytes the job's blocks in flight between the stages may take (Ray Data's
    # object-store budget; None: `inflight_budget`). Without it Ray Data lets the queues grow to
    # half the node's object store (Ray's default store is 30 % of RAM), so a fast stage ran
    # ahead by the whole corpus and the shared memory the next stage touched grew with it. A
    # job's own local Ray gets an object store of twice this (Ray Data's share of it is half).
    inflight_bytes: int | None = Field(None, ge=1 << 20)

    @model_validator(mode="after")
    def question_for_the_question_task(self) -> JobSpec:
        """A question without the `question` task asks nothing: it is dropped, with a warning
        (it is not recorded in `generation` either; refusing it would break saved flows)."""
        if self.question is not None and not any(t.partition(":")[0] == "question"
                                                 for t in self.tasks):
            said = (self.question, tuple(self.tasks))
            if said not in _QUESTIONS_IGNORED:  # once, not for each spec built from it
                _QUESTIONS_IGNORED.add(said)
                log.warning("--question %r is ignored: it is the question task's question, "
                            "and the tasks are %s (add `question` to them to ask it)",
                            self.question, ",".join(self.tasks))
            self.question = None
        return self

    @field_validator("input", "output")
    @classmethod
    def local_path_absolute(cls, value: str) -> str:
        """A local input or output given relative to here becomes absolute: the stages run in
        other working directories (a joined cluster's workers run in its head's), where a
        relative output landed somewhere else entirely."""
        if value and "://" not in value:
            return os.path.abspath(os.path.expanduser(value))
        return value

    @field_validator("model", "glm_tokenizer")
    @classmethod
    def local_folder_absolute(cls, value: str | None) -> str | None:
        """A local folder given relative to here becomes absolute: the actors run elsewhere
        (another working directory, other nodes). A hub id (`owner/name`) stays as it is."""
        if value and "://" not in value and os.path.isdir(os.path.expanduser(value)):
            return os.path.abspath(os.path.expanduser(value))
        return value

    def task_params(self) -> dict[str, Any]:
        return {"language": self.language, "question": self.question}

    def is_manifest(self) -> bool:
        from pipelines.storage import is_manifest

        return is_manifest(self.input)


class JobError(Exception):
    """The job could not run (bad spec, credentials, missing bucket, bad model path), or
    stopped because the object store stayed unavailable past the retry budget (a rerun
    resumes: finished shards are kept)."""


def validate(spec: JobSpec) -> tuple[list, str]:
    """Everything that can be checked before Ray starts. Returns (tasks, model_id)."""
    from kimi_ops.errors import KimiError
    from kimi_ops.model.checkpoint import resolve_checkpoint
    from kimi_ops.tasks import get_task
    from pipelines.storage import StorageError, check_output, open_input

    try:
        tasks = [get_task(t, **spec.task_params()) for t in spec.tasks]
    except ValueError as exc:
        raise JobError(f"tasks: {exc}") from None
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise JobError(f"tasks: {', '.join(repeated)} named more than once")
    from pipelines.schema import segments_schema

    try:
        schema = segments_schema(tasks, spec.semantic_tokens)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    try:
        paths = resolve_checkpoint(spec.model, spec.glm_tokenizer)
    except KimiError as exc:
        raise JobError(f"model: {exc}") from None
    address = spec.ray_address or os.environ.get("RAY_ADDRESS")
    check_ray_address(address)
    if not address:  # the job's own Ray runs its actors on this machine
        check_local_device(spec.device)
    model = model_id(paths.root)
    try:
        found = open_input(spec.input, spec.storage_options, spec.storage_retry)
        if found.is_prefix and not spec.is_manifest():
            check_some_audio(spec)
        check_output(spec.output, spec.storage_options, spec.storage_retry)
        check_output_settings(spec, tasks, model, schema)
        check_output_free(spec)
    except StorageError as exc:
        raise JobError(str(exc)) from None
    return tasks, model


def check_new_run_id(spec: JobSpec) -> None:
    """A run id a user picks must not name a finished run of this output: its report would be
    overwritten. (Not for ids derived from a flow run, which its retries reuse on purpose.)"""
    from pipelines.storage import resolve, retrying

    if not spec.run_id:
        return
    fs, root = resolve(spec.output, spec.storage_options)
    report = f"{root}/_runs/{spec.run_id}/report.json"
    if retrying(lambda: fs.exists(report), spec.output, action="read",
                policy=spec.storage_retry):
        raise JobError(f"run id {spec.run_id!r} names a finished run of {spec.output} (its "
                       f"report is _runs/{spec.run_id}/report.json): pick a new run id")


def check_local_device(device: str | None) -> None:
    """A device asked for by name must exist where the actors will run (here, for a local Ray):
    otherwise every actor fails to start, and the run with it, after its retries."""
    if device is None or device == "cpu":
        return
    import torch

    kind, _, index = device.partition(":")
    backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None),
               "mps": getattr(torch.backends, "mps", None)}.get(kind)
    available = backend is not None and backend.is_available()
    count = backend.device_count() if available and hasattr(backend, "device_count") else 1
    if not available or int(index or 0) >= count:
        raise JobError(f"device {device}: no such device on this machine, where the job's own "
                       "Ray runs its actors (leave it unset to use a GPU when there is one)")


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """A cluster to join must answer: `ray.init` would otherwise retry an address nobody listens
    on for many minutes. A GCS `host:port` is also asked for its session (`probe_gcs`); a
    `ray://` (Ray Client) one needs the client extra here and its server answering; "auto" and
    "local" are left to Ray."""
    if not address or address in ("auto", "local"):
        return
    if address.startswith("ray://"):  # Ray Client (infra/prefect's deployments use it)
        from ray._private.utils import get_ray_client_dependency_error

        if get_ray_client_dependency_error() is not None:
            raise JobError(f"ray address {address!r}: Ray Client needs its extra here: "
                           "pip install 'ray[client]' (or give the head's GCS host:port)")
        _reach(address, address[len("ray://"):], timeout_s,
               "is the head running its Ray Client server (port 10001 by default)?")
        return
    if "://" in address:
        raise JobError(f"ray address {address!r}: expected the head's GCS host:port (port 6379 "
                       "by default) or auto, not a URL (http://...:8265 is the dashboard)")
    _reach(address, address, timeout_s,
           "is it running, and is the address its head's host:port?")
    probe_gcs(address, timeout_s)


def _reach(address: str, host_port: str, timeout_s: float, hint: str) -> None:
    """`host_port` (of `address`, as given) accepts a TCP connection, else a JobError."""
    import socket

    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        raise JobError(f"ray address {address!r}: expected host:port (or auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise JobError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); "
                       f"{hint}") from None


def probe_gcs(address: str, timeout_s: float) -> None:
    """Ask the cluster's GCS for its session, with this process's Ray settings: a cluster that
    wants a token this client lacks, or a port that is not a GCS, is refused here in seconds
    (`ray.init` retried either for minutes, then failed as a bare `ConnectionError`)."""
    import threading

    try:
        from ray._raylet import GcsClient
    except ImportError:  # Ray moved its client: leave the check to ray.init
        return
    outcome: dict[str, BaseException | bool] = {}

    def ask() -> None:
        try:
            GcsClient(address=address).internal_kv_get(b"session_name", namespace=b"session",
                                                       timeout=timeout_s)
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported below, whatever Ray raised
            outcome["error"] = exc

    # a port that is not a GCS keeps Ray's client waiting about 40 s: wait in a thread
    thread = threading.Thread(target=ask, name="gcs-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 3)
    error = outcome.get("error")
    if outcome.get("ok"):
        return
    if error is None:
        raise JobError(f"{address} accepts connections but did not answer as a Ray cluster's "
                       f"GCS within {timeout_s + 3:g} s; is it the head's GCS port (6379 by "
                       "default), and is the head busy?")
    if type(error).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(error):
        raise JobError(
            f"the Ray cluster at {address} refused this client's authentication token (none "
            "sent, or not the cluster's): export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
            "RAY_AUTH_TOKEN_PATH, a file holding it); for the local stack, `kimi-label stack "
            "status` prints them")
    raise JobError(f"cannot talk to the Ray cluster at {address}: {error}")


def check_output_settings(spec: JobSpec, tasks: list, model: str, schema: pa.Schema) -> None:
    """An output holds labels of one kind: a run whose tasks (or semantic tokens), model or
    generation settings (`pipelines.stages.generation_settings`: the token budget, the
    language, ...) differ from those of the segments already there is refused, before anything
    is planned. Resuming skips labelled objects, so the output would mix the two (and, for the
    tasks, hold shards of two schemas). The first shard is read (the guard keeps them alike);
    a setting its rows do not record (an older output) is not compared."""
    from pipelines.stages import generation_settings
    from pipelines.storage import resolve, retrying, uri_of

    fs, root = resolve(spec.output, spec.storage_options)
    folder = f"{root}/segments"

    def first_shard() -> str | None:
        if not fs.exists(folder):
            return None
        return next((p for p in sorted(fs.find(folder)) if p.endswith(".parquet")), None)

    shard = retrying(first_shard, uri_of(fs, folder), action="list", policy=spec.storage_retry)
    if shard is None:
        return

    def read_head() -> tuple[pa.Schema, pa.Table]:
        with fs.open(shard, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            wanted = [c for c in ("model_id", "generation") if c in names]
            head = (parquet.read_row_group(0, columns=wanted).slice(0, 1)
                    if parquet.num_row_groups else pa.table({}))
            return parquet.schema_arrow, head

    there, head = retrying(read_head, uri_of(fs, shard), action="read",
                           policy=spec.storage_retry)
    refuse = ("A rerun only labels new or changed objects, so the output would mix the two: "
              "label into a new output, or run with the settings it holds")
    if set(there.names) != set(schema.names):  # the order of the tasks does not matter
        held = json.loads((there.metadata or {}).get(b"kimi_label.task_versions", b"{}"))

        def describe(names, columns) -> str:
            tokens = "with" if "semantic_tokens" in columns else "without"
            return f"tasks {', '.join(names) or '?'} {tokens} semantic tokens"

        raise JobError(f"output {spec.output} holds segments labelled for "
                       f"{describe(held, there.names)}; this run asks for "
                       f"{describe(spec.tasks, schema.names)}. {refuse} (the same tasks)")
    # a task's version names its prompt and label set (`scene` and `scene:tut2017` share a
    # column); the generation settings and the model are read from the first row
    versions = json.loads((there.metadata or {}).get(b"kimi_label.task_versions", b"{}"))
    held = {f"task {name}": version for name, version in versions.items()}
    asked = {f"task {t.name}": t.version for t in tasks}
    if head.num_rows:
        row = head.to_pylist()[0]
        held.update({**json.loads(row.get("generation") or "{}"), "model": row.get("model_id")})
        asked.update({**generation_settings(tasks, spec.max_new_tokens, spec.task_params()),
                      "model": model})
    differ = sorted(k for k in held.keys() & asked.keys()
                    if held[k] is not None and held[k] != asked[k])
    if differ:
        def describe(values, checkpoint: str = "") -> str:
            return ", ".join(f"{k} {values[k]}{checkpoint if k == 'model' else ''}"
                             for k in differ)

        raise JobError(f"output {spec.output} holds segments labelled with {describe(held)}; "
                       f"this run asks for {describe(asked, f' ({spec.model})')}. {refuse}")


def model_id(root: Path, cache_file: Path | None = None) -> str:
    """A content hash of the checkpoint: sha256 over every file's relative path and bytes.

    Hashing the 7B checkpoint (~25 GB with the Whisper and GLM folders) takes a minute, so each
    file's digest is cached by (path, size, mtime) in `~/.cache/kimi-label/file-digests.json`.
    """
    import hashlib

    cache_file = cache_file or Path.home() / ".cache" / "kimi-label" / "file-digests.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    digest = hashlib.sha256()
    changed = False
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in cache:
            file_digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    file_digest.update(block)
            cache[key] = file_digest.hexdigest()
            changed = True
        digest.update(f"{path.relative_to(root).as_posix()}\0{cache[key]}\n".encode())
    if changed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cache))
        except OSError:
            log.warning("cannot write the checkpoint digest cache %s", cache_file)
    return f"kimi-{digest.hexdigest()[:16]}"


# -- planning ------------------------------------------------------------------------------

def read_table_dir(fs, folder: str, columns: list[str] | None,
                   retry: RetryPolicy | None = None) -> Iterator[tuple[str, pa.Table]]:
    """Every Parquet file under `folder` (sorted by path), each listing and read retried. The
    folder is listed at once; its files are read one at a time as the caller iterates, so a
    caller that folds them holds one shard, not the whole table."""
    from pipelines.storage import retrying, uri_of

    def listing() -> list[str]:
        return sorted(fs.find(folder)) if fs.exists(folder) else []

    paths = retrying(listing, uri_of(fs, folder), action="list", policy=retry)
    return ((path, read_parquet(fs, path, columns, retry))
            for path in paths if path.endswith(".parquet"))


def this_run(table: pa.Table, run_id: str) -> pa.Table:
    """The rows of `table` written by run `run_id`."""
    import pyarrow.compute as pc

    return table.filter(pc.equal(table["run_id"], run_id))


def read_parquet(fs, path: str, columns: list[str] | None = None,
                 retry: RetryPolicy | None = None) -> pa.Table:
    from pipelines.storage import retrying, uri_of

    def read() -> pa.Table:
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)

    return retrying(read, uri_of(fs, path), action="read", policy=retry)


def check_some_audio(spec: JobSpec) -> None:
    """A folder or prefix with objects, none of them with an audio extension, is refused: the
    run would "succeed" with nothing labelled. Lists up to the first wanted object."""
    from pipelines.storage import AUDIO_EXTENSIONS, list_objects

    skipped: Counter = Counter()
    listing = list_objects(spec.input, spec.extensions or AUDIO_EXTENSIONS,
                           spec.storage_options, spec.storage_retry, skipped=skipped)
    if next(listing, None) is None and skipped:
        raise nothing_listed(spec, skipped)


NOT_LISTED_NAMED = 20  # objects a report names of those no longer in the input


def nothing_listed(spec: JobSpec, skipped: Counter) -> JobError:
    """The refusal of an input whose objects are none of them audio: what it held instead, and
    how to take it."""
    from pipelines.storage import AUDIO_EXTENSIONS

    wanted = sorted(spec.extensions or AUDIO_EXTENSIONS)
    found = ", ".join(f"{n} .{ext}" if ext else f"{n} without an extension"
                      for ext, n in skipped.most_common(5))
    return JobError(f"{spec.input}: no audio to label: its {sum(skipped.values())} objects "
                    f"({found}) have none of the extensions {', '.join(wanted)} (--extensions "
                    "picks others, e.g. aiff)")


def plan(spec: JobSpec, run_id: str) -> dict[str, Any]:
    """Write the to-do list as plan shards; returns counts and the shard paths."""
    from kimi_ops.audio.decode import default_max_seconds
    from pipelines.storage import list_objects, read_manifest, resolve, retrying

    retry = spec.storage_retry
    fs, root = resolve(spec.output, spec.storage_options)
    retrying(lambda: _remove_orphan_segment_shards(fs, root), spec.output, action="cleanup",
             policy=retry)
    retrying(lambda: _remove_stale_plans(fs, root, run_id), spec.output, action="cleanup",
             policy=retry)
    done: dict[str, str | None] = {}  # the etag of every object labelled for good
    retry_errors: set[str] = set()  # error rows a rerun may turn into labels
    limit = spec.max_audio_seconds or default_max_seconds()
    columns = ["source_uri", "etag", "status", "error", "duration_s"]
    for _, table in read_table_dir(fs, f"{root}/files", columns, retry):
        for row in table.to_pylist():
            done[row["source_uri"]] = row["etag"]
            if not settled(row, limit):
                retry_errors.add(row["source_uri"])

    skipped: Counter = Counter()  # objects of the input left out by their extension
    if spec.is_manifest():
        listing = read_manifest(spec.input, spec.storage_options, retry)
    elif spec.extensions:
        listing = list_objects(spec.input, spec.extensions, spec.storage_options, retry,
                               skipped=skipped)
    else:
        listing = list_objects(spec.input, storage_options=spec.storage_options, retry=retry,
                               skipped=skipped)
    plan_dir = f"{root}/_runs/{run_id}/plan"
    fs.makedirs(plan_dir, exist_ok=True)
    shards, units, buffer, seen = [], [], [], set()
    counts = Counter()
    changed: set[str] = set()

    def flush():
        # similar sizes next to each other: Ray batches, and so the engine's batches, then hold
        # clips of similar duration (a size-sorted shard is a cheap duration bucketing)
        buffer.sort(key=lambda row: row["size"] or 0)
        path = f"{plan_dir}/plan-{len(shards):05d}.parquet"
        table = pa.Table.from_pylist(buffer, schema=PLAN_SCHEMA)

        def write():
            with fs.open(path, "wb") as handle:
                pq.write_table(table, handle)

        retrying(write, f"{spec.output}/_runs/{run_id}/plan", action="write", policy=retry)
        shards.append(path)
        units.extend({"plan_shard": path, "start": a, "stop": b}
                     for a, b in work_units([row["size"] for row in buffer], spec.unit_rows,
                                            spec.unit_bytes))
        buffer.clear()

    for info in listing:
        if info.uri in seen:  # a manifest naming an object twice: labelled once
            counts["duplicates"] += 1
            continue
        seen.add(info.uri)
        counts["listed"] += 1
        if info.uri in done:
            if done[info.uri] == info.etag and info.uri not in retry_errors:
                counts["already_done"] += 1
                continue
            changed.add(info.uri)
            if info.uri in retry_errors:
                counts["retried_errors"] += 1
        buffer.append({"uri": info.uri, "size": info.size, "etag": info.etag})
        counts["todo"] += 1
        if len(buffer) >= spec.plan_shard_rows:
            flush()
    if buffer:
        flush()
    if skipped:
        counts["skipped_by_extension"] = sum(skipped.values())
    if not counts["listed"] and skipped:
        raise nothing_listed(spec, skipped)
    # objects labelled here before that this listing lacks (deleted from the input, or out of
    # its scope): their rows stay, and the report says how many there are
    not_listed = sorted(uri for uri in done if uri not in seen)
    if not_listed:
        counts["not_listed"] = len(not_listed)
    if changed:
        _drop_rows(fs, root, changed, retry)
        if len(changed) > counts["retried_errors"]:
            counts["changed"] = len(changed) - counts["retried_errors"]
    return {"counts": dict(counts), "shards": shards, "units": units, "plan_dir": plan_dir,
            "not_listed": not_listed[:NOT_LISTED_NAMED], "skipped": dict(skipped)}


# error kinds the object's bytes decide: a rerun of the same object would fail the same way
CONTENT_ERROR_KINDS = frozenset({"undecodable", "empty_audio", "non_finite", "bad_sample_rate",
                                 "audio_error"})


def settled(row: dict[str, Any], limit: float | None) -> bool:
    """Whether a files row is final for an unchanged object: labelled, or failed for a reason in
    its content. Errors of the store (vanished, not_found, access_denied, io_error...), of the
    device (out_of_memory) or of anything else are tried again by a rerun, and so is a
    `too_long` file that the run's duration limit (`limit`; None: no limit) now admits."""
    if row["status"] == "ok":
        return True
    kind = (row["error"] or {}).get("kind")
    if kind == "too_long":
        return limit is not None and row["duration_s"] is not None and row["duration_s"] > limit
    return kind in CONTENT_ERROR_KINDS


def work_units(sizes: list[int | None], max_rows: int, max_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most `max_rows` rows and `max_bytes` bytes (unknown sizes
    count as 0; a row larger than `max_bytes` is a unit alone)."""
    units, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        size = size or 0
        if i > start and (i - start >= max_rows or total + size > max_bytes):
            units.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        units.append((start, len(sizes)))
    return units


PLAN_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("etag", pa.string())])


def _remove_orphan_segment_shards(fs, root: str) -> None:
    """A crash between writing a shard's segments and its files part leaves segments nobody
    counts; the rerun redoes those objects, so the orphan goes."""
    seg_dir, files_dir = f"{root}/segments", f"{root}/files"
    if not fs.exists(seg_dir):
        return
    have = {p.rsplit("/", 1)[-1] for p in fs.find(files_dir)} if fs.exists(files_dir) else set()
    for path in fs.find(seg_dir):
        if path.rsplit("/", 1)[-1] not in have:
            fs.rm(path)


def _remove_stale_plans(fs, root: str, run_id: str) -> None:
    """A run that failed or was stopped leaves its to-do list (`_runs/<id>/plan/`) and its
    lease; a later run plans afresh, so they go, and with them the run's folder when nothing
    else is in it (a finished run's report stays). A retry of this run (`run_id`) rewrites its
    own."""
    from pipelines.lease import LEASE_FILE
    from pipelines.storage import is_local

    runs = f"{root}/_runs"
    if not fs.exists(runs):
        return
    for folder in fs.ls(runs, detail=False):
        if folder.rstrip("/").rsplit("/", 1)[-1] == run_id:
            continue
        if fs.exists(f"{folder}/plan"):
            fs.rm(f"{folder}/plan", recursive=True)
        if fs.exists(f"{folder}/{LEASE_FILE}"):  # lapsed: this run holds the output
            fs.rm(f"{folder}/{LEASE_FILE}")
        if is_local(fs) and fs.isdir(folder) and not fs.ls(folder):
            fs.rmdir(folder)


def _drop_rows(fs, root: str, uris: set[str], retry: RetryPolicy | None = None) -> None:
    """Rewrite the shards that hold rows of `uris` without them (their content changed)."""
    from pipelines.stages import write_parquet_atomic

    for table_name in ("segments", "files"):
        for path, table in read_table_dir(fs, f"{root}/{table_name}", ["source_uri"], retry):
            stale = [u in uris for u in table["source_uri"].to_pylist()]
            if not any(stale):
                continue
            full = read_parquet(fs, path, None, retry)
            keep = pa.array([not s for s in stale])
            write_parquet_atomic(fs, root, path[len(root) + 1:], full.filter(keep), retry)


# -- running ------------------------------------------------------------------------------

def _init_ray(spec: JobSpec, temp_dir: str | None = None):
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    address = spec.ray_address or os.environ.get("RAY_ADDRESS")
    try:
        with python_sigterm_kept():
            if address:  # join a running cluster ("auto" on a head or RayJob driver pod)
                # a loopback address stays one: Ray's client would otherwise rewrite it to
                # this machine's routable address, where a loopback-only head never answers
                with loopback_ray() if is_loopback(address) else contextlib.nullcontext():
                    ray.init(address=address, log_to_driver=False)
            else:
                with loopback_ray():
                    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False,
                             num_cpus=max(os.cpu_count() or 1, 2), _temp_dir=temp_dir,
                             object_store_memory=local_object_store_bytes(spec, local_gpus()),
                             log_to_driver=False)
    except BaseException:  # interrupted half way (Ctrl-C, SIGTERM): stop what it started
        ray.shutdown()
        raise
    return True


@contextlib.contextmanager
def python_sigterm_kept():
    """Around `ray.init`: a SIGTERM handler this process set in Python (the command line's,
    which ends a run in one line) is put back afterwards. Ray's driver installs its own, whose
    C++ part aborted the process with a stack dump."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def inflight_budget(spec: JobSpec, gpus: float, nodes: int = 1) -> int:
    """Object-store bytes of the job's blocks in flight: `spec.inflight_bytes`, else 1 GiB per
    GPU (feature blocks of long audio are large; the GPU stages must not wait on each other) or,
    without GPUs, 128 MiB per node (Ray Data's budget is one figure for the whole cluster: a
    fixed 128 MiB would feed about four 32-file units at a time, whatever the node count).
    Fixed, whatever the corpus size."""
    if spec.inflight_bytes is not None:
        return spec.inflight_bytes
    whole = int(gpus)
    return whole * INFLIGHT_BYTES_PER_GPU if whole >= 1 else max(nodes, 1) * INFLIGHT_BYTES


def local_object_store_bytes(spec: JobSpec, gpus: float = 0) -> int:
    """The object store of the job's own local Ray: twice the in-flight budget (Ray Data
    budgets half of a store; Ray's minimum is 75 MiB), so what the stages' shared memory can
    reach is bounded by configuration, not by the RAM. An object larger than the store still
    goes through (Ray's fallback allocation, a file in Ray's temp folder)."""
    from ray._private.ray_constants import OBJECT_STORE_MINIMUM_MEMORY_BYTES

    return max(2 * inflight_budget(spec, gpus), OBJECT_STORE_MINIMUM_MEMORY_BYTES)


def local_gpus() -> int:
    """GPUs a local `ray.init` will see (Ray's own detection: CUDA_VISIBLE_DEVICES, else NVML)."""
    try:
        from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager as nv

        visible = nv.get_current_process_visible_accelerator_ids()
        return len(visible) if visible is not None else nv.get_current_node_num_accelerators()
    except Exception:  # no NVML, or Ray moved it: size the store for CPUs
        return 0


def is_loopback(address: str) -> bool:
    """Whether a Ray `host:port` address names this machine's loopback interface."""
    import ipaddress

    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def loopback_ray():
    """Around a local `ray.init`: single-node mode, as the stack's Ray. Otherwise Ray rewrites
    127.0.0.1 to the routable address and its gRPC servers listen on every interface
    (tests/test_exposure.py). The env var reaches the daemons and workers `ray.init` starts;
    the driver read it when ray was imported, hence the constant. Both are restored after (an
    explicit RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 is left alone)."""
    from ray._private import ray_constants

    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    saved_env, saved_flag = os.environ.get(key), ray_constants.ENABLE_RAY_CLUSTER
    if saved_env is None or saved_env == "0":
        os.environ[key] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(key, None)


def place_on_gpus(spec: JobSpec, gpus: float) -> JobSpec:
    """With GPUs in the cluster and no GPU placement configured, put one front-end actor
    (a quarter GPU) and one label actor (the rest) on every GPU. Explicit settings win."""
    whole = int(gpus)
    if whole < 1 or spec.frontend.num_gpus or spec.label.num_gpus:
        return spec
    return spec.model_copy(update={
        "frontend": spec.frontend.model_copy(update={"num_gpus": 0.25, "concurrency": whole,
                                                     "batch_size": max(spec.frontend.batch_size, 16)}),
        "label": spec.label.model_copy(update={"num_gpus": 0.75, "concurrency": whole,
                                               "batch_size": max(spec.label.batch_size, 32)}),
    })


def place_io_tasks(spec: JobSpec, gpus: float, nodes: int) -> JobSpec:
    """Unless their concurrency is set, enough decode and write tasks to feed the model actors:
    one decode task per node on CPUs, and with GPUs `DECODE_TASKS_PER_GPU` decode tasks and one
    writer per GPU. At the 1000x real-time target a GPU takes about 33 clips of 30 s a second,
    while one decode task fetches each object (tens of ms from S3) and decodes it (tens of ms
    for 30 s of MP3) one after another: a single task for the cluster, the default, would
    starve it (estimated; no GPU run measured it yet)."""
    whole = int(gpus)
    want = {"decode": max(nodes, DECODE_TASKS_PER_GPU * whole, 1), "write": max(whole, 1)}
    update = {name: getattr(spec, name).model_copy(update={"concurrency": n})
              for name, n in want.items()
              if "concurrency" not in getattr(spec, name).model_fields_set}
    return spec.model_copy(update=update) if update else spec


def place_on_cpus(spec: JobSpec, node_cpus: float) -> JobSpec:
    """On CPUs, and unless set, the front-end and label actors get torch threads for a node's
    CPUs over the stage's actor count. With a fraction of a CPU apiece Ray gives each one
    thread, yet their work alternates more than it overlaps (a label batch waits for its
    front-end batch), so a lone busy stage left a core idle: 2 CPUs, 256 files, 1.5x faster."""
    update = {}
    for name in ("frontend", "label"):
        stage = getattr(spec, name)
        if stage.threads is None and not stage.num_gpus:
            threads = max(int(node_cpus) // stage.concurrency, 1)
            update[name] = stage.model_copy(update={"threads": threads})
    return spec.model_copy(update=update) if update else spec


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def smallest_node_cpus() -> float:
    return min((n["Resources"].get("CPU", 0) for n in alive_nodes()), default=1)


def build_dataset(spec: JobSpec, units: list[dict], model_id_: str, run_id: str, writer):
    """The job's dataset: plan units through the stages to `writer` (a `WriteStage`)."""
    import ray
    from ray.data import ActorPoolStrategy

    from pipelines.stages import DecodeStage, FrontendStage, LabelStage, PlanReader

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.execution_no_progress_timeout_s = spec.no_progress_timeout_s
    # the queues between the stages stop at a fixed budget (`inflight_budget`), not at half
    # the object store, so what the stages hold and touch does not grow with the corpus
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=spec.inflight_bytes)
    # a stage's StorageError reaches the driver as itself (kind, URI), not as a bare
    # UserCodeException whose cause Ray drops on the way
    ctx.raise_original_map_exception = True
    # The plan shards are read by a plain map task with the decode stage's CPU share: Ray's
    # read_parquet asks for a whole CPU per task, which small nodes full of actors never free.
    retry = spec.storage_retry
    # Ray 2.60 takes the retry settings only through `**ray_remote_args`, which it deprecates
    # for named parameters that arrive in 2.64 (hence the pin below it): not for users' eyes
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
            PlanReader(spec.output, spec.storage_options, retry), batch_format="pyarrow",
            batch_size=1, num_cpus=spec.decode.num_cpus, max_retries=spec.decode.max_restarts)
        # task stages get an instance (a plain function for Ray); actor stages get the class
        ds = ds.map_batches(DecodeStage(spec.storage_options, retry=retry,
                                        max_audio_seconds=spec.max_audio_seconds,
                                        piece_seconds=spec.piece_seconds),
            batch_format="pyarrow",
            batch_size=spec.decode.batch_size, num_cpus=spec.decode.num_cpus,
            max_retries=spec.decode.max_restarts,
            compute=ray.data.TaskPoolStrategy(size=spec.decode.concurrency))
        ds = ds.map_batches(FrontendStage, fn_constructor_kwargs={
            "model": spec.model, "glm_tokenizer": spec.glm_tokenizer, "device": spec.device,
            "threads": spec.frontend.threads},
            batch_format="pyarrow", batch_size=spec.frontend.batch_size,
            num_cpus=spec.frontend.num_cpus, num_gpus=spec.frontend.num_gpus or None,
            max_restarts=spec.frontend.max_restarts, max_task_retries=spec.frontend.max_restarts,
            compute=ActorPoolStrategy(size=spec.frontend.concurrency))
        ds = ds.map_batches(LabelStage, fn_constructor_kwargs={
            "model": spec.model, "glm_tokenizer": spec.glm_tokenizer, "device": spec.device,
            "task_specs": spec.tasks, "task_params": spec.task_params(),
            "max_new_tokens": spec.max_new_tokens, "semantic_tokens": spec.semantic_tokens,
            "model_id": model_id_, "run_id": run_id, "threads": spec.label.threads},
            batch_format="pyarrow", batch_size=spec.label.batch_size, num_cpus=spec.label.num_cpus,
            num_gpus=spec.label.num_gpus or None,
            max_restarts=spec.label.max_restarts, max_task_retries=spec.label.max_restarts,
            compute=ActorPoolStrategy(size=spec.label.concurrency))
        return ds.map_batches(writer, batch_format="pyarrow", batch_size=spec.write.batch_size,
            num_cpus=spec.write.num_cpus, max_retries=spec.write.max_restarts,
            compute=ray.data.TaskPoolStrategy(size=spec.write.concurrency))


def run_job(spec: JobSpec, ray_temp_dir: str | None = None) -> dict[str, Any]:
    """Validate, plan, run, report. Returns the report (also written as JSON to
    `<output>/_runs/<run_id>/report.json`)."""
    started = time.time()
    tasks, model_id_ = validate(spec)
    run_id = spec.run_id or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    try:
        return _run(spec, run_id, tasks, model_id_, started, ray_temp_dir)
    except Exception as exc:
        cause = storage_cause(exc)
        if cause is None:
            raise
        raise JobError(f"{cause}; objects finished so far are kept, a rerun resumes") from None


def _run(spec: JobSpec, run_id: str, tasks: list, model_id_: str, started: float,
         ray_temp_dir: str | None) -> dict[str, Any]:
    from pipelines.lease import OutputLease
    from pipelines.storage import resolve

    fs, root = resolve(spec.output, spec.storage_options)
    lease = OutputLease(fs, root, spec.output, run_id)
    hold_output(spec, lease)
    try:
        return _run_holding(spec, run_id, tasks, model_id_, started, ray_temp_dir)
    finally:
        lease.release()


def hold_output(spec: JobSpec, lease) -> None:
    """Take the output's lease (`pipelines.lease`), or raise JobError naming the run that
    holds it."""
    from pipelines.lease import OutputBusy
    from pipelines.storage import retrying

    busy: list[OutputBusy] = []

    def acquire():
        try:
            lease.acquire()
        except OutputBusy as exc:
            busy.append(exc)

    retrying(acquire, f"{spec.output}/_runs", action="write", policy=spec.storage_retry)
    if busy:
        raise JobError(str(busy[0]))


def check_output_free(spec: JobSpec) -> None:
    """Before a flow or job starts: no other run holds the output's lease (a retry of this
    run, `spec.run_id`, may hold it)."""
    from pipelines.lease import TTL_S, busy_message, live_holders
    from pipelines.storage import resolve, retrying

    fs, root = resolve(spec.output, spec.storage_options)
    holders = retrying(lambda: live_holders(fs, root, spec.run_id), spec.output,
                       action="read", policy=spec.storage_retry)
    if holders:
        raise JobError(busy_message(spec.output, holders[0], TTL_S))


def _run_holding(spec: JobSpec, run_id: str, tasks: list, model_id_: str, started: float,
                 ray_temp_dir: str | None) -> dict[str, Any]:
    # the stage classes are looked up at run time (tests replace them on the module)
    from pipelines.stages import PieceStitcher, WriteStage
    from pipelines.storage import options_for_workers, resolve, retrying

    planned = plan(spec, run_id)
    summary: list[dict] = []
    # the stages get this process's S3 endpoint and credentials (a running cluster's workers
    # do not share its AWS_* environment); the report keeps the options as given
    worker_options = options_for_workers((spec.input, spec.output), spec.storage_options)
    writer = WriteStage(spec.output, worker_options, spec.tasks, spec.task_params(),
                        spec.semantic_tokens, retry=spec.storage_retry)
    stitcher = PieceStitcher(writer)
    if planned["shards"]:
        import ray

        started_ray = _init_ray(spec, ray_temp_dir)
        try:
            gpus = ray.cluster_resources().get("GPU", 0)
            nodes = len(alive_nodes())
            spec = place_on_gpus(spec, gpus)
            spec = place_io_tasks(place_on_cpus(spec, smallest_node_cpus()), gpus, nodes)
            spec = spec.model_copy(update={"inflight_bytes": inflight_budget(spec, gpus, nodes)})
            ds = build_dataset(spec.model_copy(update={"storage_options": worker_options}),
                               planned["units"], model_id_, run_id, writer)
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in batch.to_pylist():
                    summary.extend(stitcher.add(row))
            stitcher.check_complete()
            stats = ds.stats()
        finally:
            if started_ray:
                ray.shutdown()
    else:
        stats = ""
    report = make_report(spec, run_id, model_id_, planned, summary, time.time() - started,
                         stats, [t.name for t in tasks])
    report["long_files_in_pieces"] = {"files": stitcher.files, "pieces": stitcher.pieces}
    fs, root = resolve(spec.output, spec.storage_options)

    from pipelines.storage import is_local

    def finish():
        if fs.exists(planned["plan_dir"]):
            fs.rm(planned["plan_dir"], recursive=True)  # the run completed: its to-do list
        staging = f"{root}/_staging"  # the writers' (local) staging folder, empty once done
        if is_local(fs) and fs.isdir(staging) and not fs.ls(staging):
            fs.rmdir(staging)
        with fs.open(f"{root}/_runs/{run_id}/report.json", "w") as handle:
            handle.write(json.dumps(report, indent=2))

    retrying(finish, f"{spec.output}/_runs/{run_id}", action="write", policy=spec.storage_retry)
    return report


def storage_cause(exc: BaseException):
    """The StorageError that ended a run, also when Ray wrapped it (a stage raises one when
    the store stays unavailable past the retry budget): found via causes and Ray's `.cause`."""
    from pipelines.storage import StorageError

    stack, seen = [exc], set()
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, StorageError) and "reason" in vars(err):
            return err
        stack += [getattr(err, "cause", None), err.__cause__, err.__context__]
    return None


def make_report(spec, run_id, model_id_, planned, summary, wall_s, stats, task_names):
    from pipelines.storage import safe_options

    status = Counter(r["status"] for r in summary)
    kinds = Counter(r["error_kind"] for r in summary if r["error_kind"])
    audio_h = sum(r["duration_s"] for r in summary) / 3600.0
    stage_s = {s: round(sum(r[f"{s}_s"] for r in summary), 3)
               for s in ("decode", "frontend", "label", "write")}
    return {
        "run_id": run_id, "model_id": model_id_, "input": spec.input, "output": spec.output,
        "tasks": task_names, "storage_options": safe_options(spec.storage_options),
        "planned": planned["counts"], "processed": len(summary),
        # the first objects with rows here that this input no longer lists, and what the
        # listing left out by extension
        "not_listed": planned.get("not_listed", []),
        "skipped_by_extension": planned.get("skipped", {}),
        "status": dict(status), "errors_by_kind": dict(kinds),
        "segments": sum(r["num_segments"] for r in summary),
        "audio_hours": audio_h, "wall_s": wall_s,
        "audio_hours_per_hour": audio_h / (wall_s / 3600.0) if wall_s else 0.0,
        "stage_seconds": stage_s, "ray_stats": str(stats)[:20000],
    }
