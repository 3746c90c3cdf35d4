"""A job's pre-flight checks: everything that can be refused before Ray starts, so that a
mistake costs a second and one line (a `JobError`, exit 2), not a cluster's worth of actors.

`check_job(spec)` checks, in order: the tasks (known, not repeated, columns that do not clash),
the checkpoint's files, the Ray address, the device (for the job's own Ray), that the input
lists and holds audio, that the output is writable (not for a dry run, which writes nothing),
that its segments are of this schema version and were labelled with these tasks, this model and
these generation settings, and that no other run holds its lease.
`check_new_run_id` refuses a run id a user picked that names a finished run.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import JobError
from pipelines.job.plan import listing, nothing_listed
from pipelines.job.ray_cluster import check_ray_address
from pipelines.spec import JobSpec
from pipelines.stages.label import generation_settings
from pipelines.storage import (OutputLayout, StorageError, check_output, open_input,
                               parquet_files, resolve, retrying, uri_of)
from pipelines.storage.lease import busy_message, live_holder


def check_job(spec: JobSpec) -> tuple[list, str]:
    """Everything that can be checked before Ray starts. Returns (tasks, model id)."""
    from kimi_ops.errors import KimiError
    from kimi_ops.model.checkpoint import checkpoint_id, resolve_checkpoint

    tasks, schema = check_tasks(spec)
    try:
        paths = resolve_checkpoint(spec.model, spec.glm_tokenizer)
    except KimiError as exc:
        raise JobError(f"model: {exc}") from None
    address = spec.ray_address or os.environ.get("RAY_ADDRESS")
    check_ray_address(address)
    if not address:  # the job's own Ray runs its actors on this machine
        check_local_device(spec.device)
    model = checkpoint_id(paths.root)
    try:
        found = open_input(spec.input, spec.storage_options, spec.storage_retry)
        if found.is_prefix and not spec.is_manifest():
            check_some_audio(spec)
        if not spec.dry_run:  # (a probe object written and deleted)
            check_output(spec.output, spec.storage_options, spec.storage_retry)
        check_output_settings(spec, tasks, model, schema)
        check_output_free(spec)
    except StorageError as exc:
        raise JobError(str(exc)) from None
    return tasks, model


def check_tasks(spec: JobSpec) -> tuple[list, pa.Schema]:
    """The job's tasks and the segments schema they make, or a JobError naming the problem."""
    from kimi_ops.tasks import get_task
    from pipelines.schema import segments_schema

    try:
        tasks = [get_task(t, **spec.task_params()) for t in spec.tasks]
    except ValueError as exc:
        raise JobError(f"tasks: {exc}") from None
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise JobError(f"tasks: {', '.join(repeated)} named more than once")
    try:
        return tasks, segments_schema(tasks, spec.semantic_tokens)
    except ValueError as exc:
        raise JobError(str(exc)) from None


def check_new_run_id(spec: JobSpec) -> None:
    """A run id a user picks must not name a finished run of this output: its report would be
    overwritten. (Not for ids derived from a flow run, which its retries reuse on purpose.)"""
    if not spec.run_id:
        return
    fs, root = resolve(spec.output, spec.storage_options)
    report = OutputLayout(root).report(spec.run_id)
    if retrying(lambda: fs.exists(report), spec.output, action="read",
                policy=spec.storage_retry):
        raise JobError(f"run id {spec.run_id!r} names a finished run of {spec.output} (its "
                       f"report is {OutputLayout(spec.output).report(spec.run_id)}): pick a new "
                       "run id")


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



def check_some_audio(spec: JobSpec) -> None:
    """A folder or prefix with objects, none of them with an audio extension, is refused: the
    run would "succeed" with nothing labelled. Lists up to the first wanted object."""
    skipped: Counter = Counter()
    if next(listing(spec, skipped), None) is None and skipped:
        raise nothing_listed(spec, skipped)


def check_output_free(spec: JobSpec) -> None:
    """No other run holds the output's lease (a retry of this run, `spec.run_id`, may)."""
    fs, root = resolve(spec.output, spec.storage_options)
    holder = retrying(lambda: live_holder(fs, root, spec.run_id), spec.output,
                      action="read", policy=spec.storage_retry)
    if holder:
        raise JobError(busy_message(spec.output, holder))


REFUSE = ("A rerun only labels new or changed objects, so the output would mix the two: "
          "label into a new output, or run with the settings it holds")


def check_output_settings(spec: JobSpec, tasks: list, model: str, schema: pa.Schema) -> None:
    """An output holds labels of one kind: a run whose tasks (or semantic tokens), model or
    generation settings (`generation_settings`: the token budget, the language, ...) differ
    from those of the segments already there is refused, before anything is planned. Resuming
    skips labelled objects, so the output would mix the two (and, for the tasks, hold shards of
    two schemas). The first shard is read (this check keeps them alike); a setting its rows do
    not record (an older output) is not compared. An output of another schema version is
    refused (`check_schema_version`)."""
    found = _first_segments_shard(spec)
    if found is None:
        return
    there, head = found
    check_schema_version(spec, there)
    if set(there.names) != set(schema.names):  # the order of the tasks does not matter
        held = json.loads((there.metadata or {}).get(b"kimi_label.task_versions", b"{}"))

        def described(names, columns) -> str:
            tokens = "with" if "semantic_tokens" in columns else "without"
            return f"tasks {', '.join(names) or '?'} {tokens} semantic tokens"

        raise JobError(f"output {spec.output} holds segments labelled for "
                       f"{described(held, there.names)}; this run asks for "
                       f"{described(spec.tasks, schema.names)}. {REFUSE} (the same tasks)")
    _check_same_settings(spec, tasks, model, there, head)


def check_schema_version(spec: JobSpec, there: pa.Schema) -> None:
    """New rows are written in this version's schema: a shard of another version (1: map
    columns; 2: no quality signals) beside them would make the output unreadable as one table.
    Evaluate and prepare-training-data read outputs of earlier versions; a run does not add to
    them."""
    from pipelines.schema import SCHEMA_VERSION, schema_version

    version = schema_version(there)
    if version != SCHEMA_VERSION:
        raise JobError(f"output {spec.output} holds segments of output schema version {version}; "
                       f"this version of kimi-label writes version {SCHEMA_VERSION} and does "
                       "not add to it: label into a new output (evaluate and "
                       "prepare-training-data still read this one)")


def _check_same_settings(spec: JobSpec, tasks: list, model: str, there: pa.Schema,
                         head: pa.Table) -> None:
    """A task's version names its prompt and label set (`scene` and `scene:tut2017` share a
    column); the generation settings and the model are read from the first row."""
    versions = json.loads((there.metadata or {}).get(b"kimi_label.task_versions", b"{}"))
    held = {f"task {name}": version for name, version in versions.items()}
    asked = {f"task {t.name}": t.version for t in tasks}
    if head.num_rows:
        row = head.to_pylist()[0]
        held.update({**json.loads(row.get("generation") or "{}"), "model": row.get("model_id")})
        asked.update({**generation_settings(tasks, spec.max_new_tokens, spec.task_params(),
                                            spec.segmenter),
                      "model": model})
    differ = sorted(k for k in held.keys() & asked.keys()
                    if held[k] is not None and held[k] != asked[k])
    if differ:
        def described(values, checkpoint: str = "") -> str:
            return ", ".join(f"{k} {values[k]}{checkpoint if k == 'model' else ''}"
                             for k in differ)

        raise JobError(f"output {spec.output} holds segments labelled with {described(held)}; "
                       f"this run asks for {described(asked, f' ({spec.model})')}. {REFUSE}")


def _first_segments_shard(spec: JobSpec) -> tuple[pa.Schema, pa.Table] | None:
    """(schema, first row's model_id and generation) of the output's first segments shard."""
    fs, root = resolve(spec.output, spec.storage_options)
    shards = parquet_files(fs, OutputLayout(root).segments, spec.storage_retry)
    if not shards:
        return None

    def read_head() -> tuple[pa.Schema, pa.Table]:
        with fs.open(shards[0], "rb") as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            wanted = [c for c in ("model_id", "generation") if c in names]
            head = (parquet.read_row_group(0, columns=wanted).slice(0, 1)
                    if parquet.num_row_groups else pa.table({}))
            return parquet.schema_arrow, head

    return retrying(read_head, uri_of(fs, shards[0]), action="read", policy=spec.storage_retry)
