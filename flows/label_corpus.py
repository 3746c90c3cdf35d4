"""`label-corpus`: label every new or changed audio object under a prefix (meant for a schedule).

Thin by design: validate the parameters -> run the Ray Data job (`pipelines.job`) -> check the
output -> publish a summary. All logic lives in `pipelines`; a retried run resumes, because the
job skips every object already labelled with the same etag.

Credentials are never flow parameters (Prefect stores parameters). They come from the worker's
AWS_* environment, or from a Prefect Secret block named by `credentials_block` (the name is the
parameter; the values are read when the flow runs, held in memory, and reach the job's
storage options only: reports and artifacts show them masked). Only the non-secret endpoint
may be passed as such.
"""

# No `from __future__ import annotations`: served flows are pickled by value and pydantic
# must resolve the parameter model from the real annotation, not a string.

import re
from collections import Counter
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.job import JobError, JobSpec, StageOverrides, TaskNames, run_job, validate
from pipelines.stages import PIECE_SECONDS

DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a folder name under <output>/_runs/


class LabelCorpusParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="s3://bucket/prefix, a local folder or a manifest")
    output: str
    model: str = Field(description="Kimi-Audio checkpoint folder on the workers")
    glm_tokenizer: str | None = Field(
        None, description="GLM-4-Voice tokenizer folder or hub id (default: in the checkpoint)")
    tasks: TaskNames = ["asr", "emotion", "scene"]
    language: str = "auto"
    question: str | None = None
    max_new_tokens: int = Field(256, ge=1)
    max_audio_seconds: float | None = Field(
        None, gt=0, description="longer inputs get a too_long error row (default 6 h)")
    piece_seconds: float = Field(
        PIECE_SECONDS, ge=30, description="a longer recording travels through the stages as "
                                          "pieces of at most this much audio")
    semantic_tokens: bool = False
    extensions: list[str] | None = Field(
        None, description="file extensions to label, e.g. [\"wav\", \"flac\"] (default: "
                          "every audio extension the decoder reads)")
    endpoint_url: str | None = Field(None, description="S3 endpoint (credentials: AWS_* env)")
    credentials_block: str | None = Field(
        None, description="name of a Prefect Secret block holding the S3 credentials as JSON "
                          '{"key": ..., "secret": ..., "token": optional}; default: AWS_* env')
    ray_address: str | None = None
    device: str | None = Field(None, description="cpu, cuda or cuda:N per actor (default: cuda "
                                                 "when the actor has a GPU)")
    run_id: str | None = Field(None, description="default: derived from the flow run (stable "
                                                 "across its retries)")
    stages: StageOverrides = {}

    @field_validator("extensions")
    @classmethod
    def _some_extensions(cls, extensions: list[str] | None) -> list[str] | None:
        if extensions is not None and not [e for e in extensions if e.strip(" .")]:
            raise ValueError("name at least one extension, e.g. wav,flac")
        return extensions

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str | None) -> str | None:
        if device is not None and not DEVICE.fullmatch(device):
            raise ValueError(f"{device!r} is not a device (cpu, cuda, cuda:N, mps, xpu)")
        return device

    @field_validator("run_id")
    @classmethod
    def _folder_name(cls, run_id: str | None) -> str | None:
        if run_id is not None and not RUN_ID.fullmatch(run_id):
            raise ValueError(f"{run_id!r} must be 1-128 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit (it names a folder)")
        return run_id

    def job_spec(self, run_id: str | None = None,
                 credentials: dict[str, str] | None = None) -> JobSpec:
        """The job of these parameters; `run_id` is its run id unless they name one."""
        options = {"endpoint_url": self.endpoint_url} if self.endpoint_url else {}
        options = {**options, **(credentials or {})} or None
        return JobSpec(input=self.input, output=self.output, model=self.model,
                       glm_tokenizer=self.glm_tokenizer, tasks=self.tasks,
                       language=self.language, question=self.question,
                       max_new_tokens=self.max_new_tokens, semantic_tokens=self.semantic_tokens,
                       max_audio_seconds=self.max_audio_seconds, piece_seconds=self.piece_seconds,
                       extensions=self.extensions, storage_options=options,
                       ray_address=self.ray_address, device=self.device,
                       run_id=self.run_id or run_id, **self.stages)


_CREDENTIAL_NAMES = {"key": ("key", "access_key", "access_key_id", "aws_access_key_id"),
                     "secret": ("secret", "secret_key", "secret_access_key",
                                "aws_secret_access_key"),
                     "token": ("token", "session_token", "aws_session_token")}


class CannotRun(ValueError):
    """A flow cannot run with these parameters or inputs; the message is the reason, for the
    user (a retry would not help)."""


class CredentialsError(ValueError):
    """A credentials block that is missing or lacks a key and a secret."""


def load_credentials(block_name: str) -> dict[str, str]:
    """s3fs `key`/`secret`[/`token`] from the Secret block `block_name`, read now (at run time).
    Errors name the block and the fields, never a value."""
    import json

    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block_name).get()
    except ValueError as exc:  # Prefect's "Unable to find block document named ..."
        raise CredentialsError(f"credentials block {block_name!r} not found ({exc})") from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict):
        raise CredentialsError(f"credentials block {block_name!r} must hold a JSON object "
                               "with key and secret")
    lowered = {str(k).lower(): v for k, v in value.items()}
    found = {}
    for field, names in _CREDENTIAL_NAMES.items():
        hit = next((lowered[n] for n in names if lowered.get(n)), None)
        if hit is not None:
            found[field] = str(hit)
    missing = [f for f in ("key", "secret") if f not in found]
    if missing:
        raise CredentialsError(f"credentials block {block_name!r} has no "
                               f"{' or '.join(missing)} (fields: {sorted(lowered)})")
    return found


def flow_run_id() -> str | None:
    """A run id stable across retries of this flow run (`<scheduled start>-<id prefix>`), so
    rows written by a first attempt and by its retry belong to the same run."""
    from prefect.runtime import flow_run

    run = flow_run.id
    if not run:
        return None
    started = flow_run.scheduled_start_time
    stamp = started.strftime("%Y%m%dT%H%M%S") if hasattr(started, "strftime") else "run"
    return f"{stamp}-{str(run).replace('-', '')[:8]}"


def _unless_job_error(task, task_run, state) -> bool:
    """Retry storage hiccups, not a JobError: bad parameters do not get better on retry."""
    return not isinstance(state.result(raise_on_failure=False), JobError)


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=_unless_job_error)
def check_inputs(spec: JobSpec) -> str:
    """Tasks, checkpoint, input listing and output access, before any Ray work."""
    _, model_id = validate(spec)
    return model_id


@task(retries=1, retry_delay_seconds=30)
def run_labelling(spec: JobSpec) -> dict[str, Any]:
    return run_job(spec)


@task
def check_output(spec: JobSpec) -> dict[str, int]:
    """Every labelled object appears exactly once in files/."""
    from pipelines.job import read_table_dir
    from pipelines.storage import resolve

    fs, root = resolve(spec.output, spec.storage_options)
    counts = Counter()
    for _, table in read_table_dir(fs, f"{root}/files", ["source_uri"]):
        counts.update(table["source_uri"].to_pylist())
    duplicated = [uri for uri, n in counts.items() if n > 1]
    if duplicated:
        raise RuntimeError(f"{len(duplicated)} objects have more than one row in files/, "
                           f"e.g. {duplicated[0]}")
    return {"files_rows": sum(counts.values())}


def label_checked(spec: JobSpec, flow_name: str) -> dict[str, Any]:
    """A flow's labelling: inputs checked (a bad input or output is the caller's error, not a
    task to retry), the job run, its output checked for duplicates. Returns the job's report."""
    try:
        check_inputs(spec)
    except JobError as exc:
        raise CannotRun(f"{flow_name} cannot run: {exc}") from None
    report = run_labelling(spec)
    check_output(spec)
    return report


@task
def label_distribution(spec: JobSpec, run_id: str) -> dict[str, dict[str, int]]:
    """Counts of each closed-set label over this run's segments (read one shard at a time, and
    of it only the run and the labels)."""
    import pyarrow.compute as pc

    from kimi_ops.tasks import ChoiceTask, get_task
    from pipelines.job import read_table_dir, this_run
    from pipelines.storage import resolve

    names = [t.name for t in (get_task(s, **spec.task_params()) for s in spec.tasks)
             if isinstance(t, ChoiceTask)]
    if not names:
        return {}
    fs, root = resolve(spec.output, spec.storage_options)
    dist: dict[str, Counter] = {name: Counter() for name in names}
    for _, table in read_table_dir(fs, f"{root}/segments", ["run_id", *names],
                                   spec.storage_retry):
        mine = this_run(table, run_id)
        for name in names:
            for count in pc.value_counts(mine[name].drop_null()).to_pylist():
                dist[name][count["values"]] += count["counts"]
    return {name: dict(counter) for name, counter in dist.items()}


@task
def publish(report: dict[str, Any], distribution: dict[str, dict[str, int]], output: str) -> None:
    output = output.rstrip("/")
    ok = report["status"].get("ok", 0)
    rows = [{"metric": "inputs processed", "value": report["processed"]},
            {"metric": "already labelled (skipped)",
             "value": report["planned"].get("already_done", 0)},
            {"metric": "ok", "value": ok},
            {"metric": "errors", "value": report["status"].get("error", 0)},
            *({"metric": f"errors: {kind}", "value": n}
              for kind, n in sorted(report["errors_by_kind"].items())),
            {"metric": "audio hours", "value": round(report["audio_hours"], 4)},
            {"metric": "audio-hours per hour", "value": round(report["audio_hours_per_hour"], 2)},
            {"metric": "wall seconds", "value": round(report["wall_s"], 1)}]
    create_table_artifact(key="label-corpus-summary", table=rows,
                          description=f"run {report['run_id']}")
    dist_rows = [{"task": task_name, "label": label, "segments": n}
                 for task_name, counts in distribution.items()
                 for label, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    if dist_rows:
        create_table_artifact(key="label-corpus-labels", table=dist_rows,
                              description="closed-set labels over this run's segments")
    create_markdown_artifact(key="label-corpus-output", markdown=(
        f"### Output of run `{report['run_id']}`\n\n"
        f"- files table: `{output}/files/`\n- segments table: `{output}/segments/`\n"
        f"- run report: `{output}/_runs/{report['run_id']}/report.json`\n"))


@flow(name="label-corpus", log_prints=True)
def label_corpus(params: LabelCorpusParams) -> dict[str, Any]:
    logger = get_run_logger()
    try:
        credentials = (load_credentials(params.credentials_block)
                       if params.credentials_block else None)
    except CredentialsError as exc:
        raise CannotRun(f"label-corpus cannot run: {exc}") from None
    spec = params.job_spec(run_id=flow_run_id(), credentials=credentials)
    report = label_checked(spec, "label-corpus")
    distribution = label_distribution(spec, report["run_id"])
    publish(report, distribution, spec.output)
    logger.info("run %s: %s processed, status %s", report["run_id"], report["processed"],
                report["status"])
    report["label_distribution"] = distribution
    return report
