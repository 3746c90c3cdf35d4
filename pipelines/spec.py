"""The one definition of a labelling job's parameters: `JobSpec`.

    spec = JobSpec(input="s3://audio/in/", output="s3://audio/labels/", model="/models/kimi")

Every parameter is declared here once, with its type, default, description and validation. The
console's options (`kimi-label run --help`) and the flows' parameters (`label-corpus`,
`transcribe-archive`) are derived from these fields, never copied; `TranscribeArchiveSpec` is
the same job with the `asr` task only and a longer token budget. Validation here is everything
that needs no I/O (names, ranges, a run id that is a folder name, a device that is a device);
what needs the store, the checkpoint or the cluster is checked by `pipelines.job.checks`
before anything is allocated or written.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, field_validator,
                      model_validator)
from pydantic.fields import FieldInfo

from kimi_ops.audio.segmenters import DEFAULT_SEGMENTER, SEGMENTERS
from pipelines.storage import AUDIO_EXTENSIONS, StorageOptions, StorageRetry, is_manifest
from pipelines.storage import uri as uris

log = logging.getLogger(__name__)

PIECE_SECONDS = 300.0  # a long file's pieces hold at most this much audio (piece_seconds)
PLAN_SHARD_ROWS = 2000
UNIT_ROWS = 32  # 2 CPUs, 256 files: 64-row units ran 1.1x slower (later overlap)
UNIT_BYTES = 256 << 20
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a folder name under <output>/_runs/
DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")


class StageResources(BaseModel):
    """How one stage is scheduled: its `map_batches` arguments, in one place."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(4, ge=1, description="rows per call")
    num_cpus: float = Field(0.5, ge=0, description="CPUs per task or actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor")
    concurrency: int | None = Field(1, ge=1, description="actors (actor stages) or parallel "
                                                         "tasks (none: as Ray schedules them)")
    # worker deaths survived: restarts of a dead actor and retries of the batch it held (actor
    # stages), or re-runs of a task whose worker died (task stages); Ray's own default for
    # actors is unbounded, which turns a batch that always kills its worker into a hang
    max_restarts: int = Field(3, ge=0, description="worker deaths survived")
    # torch threads of an actor stage (None: Ray's OMP_NUM_THREADS, the whole CPUs asked for,
    # at least 1); see `pipelines.job.placement.place_on_cpus` for the local default
    threads: int | None = Field(None, ge=1, description="torch threads of an actor")


STAGE_DEFAULTS = {  # what each stage gets unless set; a stage's settings are merged over these
    "decode": StageResources(batch_size=4, num_cpus=0.5),
    "frontend": StageResources(batch_size=4, num_cpus=0.5),
    "label": StageResources(batch_size=8, num_cpus=0.5),
    "write": StageResources(batch_size=8, num_cpus=0.25),
}


class StageSettings(BaseModel):
    """Each stage's scheduling. Given as `{"label": {"batch_size": 32}}`, a stage's settings
    are merged over its defaults (`STAGE_DEFAULTS`); the fields a user set are the stage's
    `model_fields_set` (placement fills in only the others)."""

    model_config = ConfigDict(extra="forbid")
    decode: StageResources = STAGE_DEFAULTS["decode"]
    frontend: StageResources = STAGE_DEFAULTS["frontend"]
    label: StageResources = STAGE_DEFAULTS["label"]
    write: StageResources = STAGE_DEFAULTS["write"]

    @model_validator(mode="before")
    @classmethod
    def _over_defaults(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        unknown = sorted(set(values) - set(STAGE_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown stages {unknown} (known: {', '.join(STAGE_DEFAULTS)})")
        unbounded = [n for n in ("frontend", "label") if isinstance(values.get(n), dict)
                     and "concurrency" in values[n] and values[n]["concurrency"] is None]
        if unbounded:
            raise ValueError(f"{unbounded[0]}: an actor stage needs a number of actors "
                             "(concurrency)")
        merged = {}
        for name, given in values.items():
            if isinstance(given, dict):
                default = STAGE_DEFAULTS[name]
                given = {**default.model_dump(include=default.model_fields_set), **given}
            merged[name] = given
        return merged


def _some_tasks(tasks: list[str]) -> list[str]:
    """Task specs without stray spaces, in one order whatever order they were given in (the
    shards of an output then share one column order)."""
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ValueError("name at least one task, e.g. asr,emotion")
    return sorted(tasks)


def _some_extensions(extensions: list[str] | None) -> list[str] | None:
    if extensions is not None and not [e for e in extensions if e.strip(" .")]:
        raise ValueError("name at least one extension, e.g. wav,flac")
    return extensions


TaskNames = Annotated[list[str], AfterValidator(_some_tasks)]
_QUESTIONS_IGNORED: set[tuple[str, tuple[str, ...]]] = set()


class JobSpec(BaseModel):
    """A labelling job: what to label, with what, where the labels go, how it runs."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="s3://bucket/prefix, any fsspec URI, a local folder, or a "
                                   "manifest (.parquet/.csv/.jsonl with a uri column)")
    output: str = Field(description="where files/ and segments/ go (s3:// URI or local folder)")
    model: str = Field(description="Kimi-Audio checkpoint folder (on the workers)")
    glm_tokenizer: str | None = Field(
        None, description="GLM-4-Voice tokenizer folder; none: glm-4-voice-tokenizer/ in the "
                          "checkpoint")
    tasks: TaskNames = Field(
        ["asr"], description="comma-separated: asr, caption, emotion, scene[:tut2017], "
                             "sound_event[:nonspeech7k], question, or a registered task")
    language: Literal["auto", "en", "zh"] = Field(
        "auto", description="the speech's language for the asr prompt")
    question: str | None = Field(None, description="what the `question` task asks of each clip")
    max_new_tokens: int = Field(256, ge=1, description="generated tokens per segment and task "
                                                       "at most")
    max_audio_seconds: float | None = Field(
        None, gt=0, description="a longer input gets a too_long error row, read from its header; "
                                "none: $KIMI_MAX_AUDIO_SECONDS on the workers, else 6 hours")
    piece_seconds: float = Field(
        PIECE_SECONDS, ge=30, description="a longer file travels through the stages as pieces "
                                          "of whole segments of at most this much audio, so a "
                                          "batch of N rows holds at most N times this much")
    segmenter: Literal[SEGMENTERS] = Field(
        DEFAULT_SEGMENTER, description="how files are cut into <= 30 s segments: vad (speech "
                                       "regions; the rest is silent, not sent to the model) or "
                                       "energy (at quiet points; silent below -50 dBFS)")
    semantic_tokens: bool = Field(
        False, description="also write each segment's 12.5 Hz VQ tokens (training data)")
    extensions: Annotated[list[str] | None, AfterValidator(_some_extensions)] = Field(
        None, description="comma-separated extensions to label, e.g. wav,flac; none: every "
                          "container the decoder reads: "
                          f"{','.join(sorted(AUDIO_EXTENSIONS))}")
    storage_options: StorageOptions
    storage_retry: StorageRetry
    ray_address: str | None = Field(
        None, description="join this Ray cluster: its GCS host:port, or auto; none: "
                          "$RAY_ADDRESS, else a Ray of the job's own on this machine")
    device: str | None = Field(
        None, description="cpu, cuda or cuda:N for the model actors; none: cuda where an actor "
                          "has a GPU")
    run_id: str | None = Field(
        None, description="names this run's rows and _runs/<id>/ (a folder name); none: the "
                          "time and a random suffix, or the flow run's")
    stages: StageSettings = Field(
        StageSettings(), description='JSON per stage (decode, frontend, label, write), e.g. '
                                     '{"label": {"num_gpus": 1, "concurrency": 8, '
                                     '"batch_size": 32}}; unset: CPU shares here, one front-end '
                                     '+ one label actor per GPU')
    no_progress_timeout_s: float = Field(
        600.0, gt=0, description="the run fails when no stage finishes a block for this long")
    plan_shard_rows: int = Field(PLAN_SHARD_ROWS, ge=1, description="objects per plan file")
    # the work unit Ray hands to the stages: a slice of a plan shard of at most this many
    # objects and input bytes (one larger object is a unit alone). It bounds what a stage
    # holds at once, whatever the corpus size, and spreads the corpus over the cluster.
    unit_rows: int = Field(UNIT_ROWS, ge=1, description="objects per work unit at most")
    unit_bytes: int = Field(UNIT_BYTES, ge=1, description="input bytes per work unit at most")
    # Without a budget Ray Data lets the queues grow to half the node's object store (Ray's
    # default store is 30 % of RAM), so a fast stage ran ahead by the whole corpus and the
    # shared memory the next stage touched grew with it. A job's own local Ray gets an object
    # store of twice this (Ray Data's share of it is half).
    inflight_bytes: int | None = Field(
        None, ge=1 << 20, description="object-store bytes of the blocks in flight between the "
                                      "stages; none: 128 MiB per node on CPUs, 1 GiB per GPU")
    # a dry run is the same job, planned and not run (`pipelines.job.preview`): the checks, the
    # listing and the output's rows are read as a run reads them, and nothing is written
    dry_run: bool = Field(
        False, description="print the plan (objects new, already labelled, changed, skipped; "
                           "audio hours from the headers; the output) and stop: no Ray, no "
                           "lease, nothing written")

    @field_validator("input", "output")
    @classmethod
    def _local_path_absolute(cls, value: str) -> str:
        """A local input or output given relative to here becomes absolute: the stages run in
        other working directories (a joined cluster's workers run in its head's)."""
        return uris.local_path(value) if value and uris.is_local(value) else value

    @field_validator("model", "glm_tokenizer")
    @classmethod
    def _local_folder_absolute(cls, value: str | None) -> str | None:
        """A local folder given relative to here becomes absolute (the actors run elsewhere);
        a hub id (`owner/name`) stays as it is."""
        if value and uris.is_local(value) and os.path.isdir(uris.local_path(value)):
            return uris.local_path(value)
        return value

    @field_validator("run_id")
    @classmethod
    def _folder_name(cls, run_id: str | None) -> str | None:
        if run_id is not None and not RUN_ID.fullmatch(run_id):
            raise ValueError(f"{run_id!r} must be 1-128 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit (it names a folder)")
        return run_id

    @field_validator("device")
    @classmethod
    def _a_device(cls, device: str | None) -> str | None:
        if device is not None and not DEVICE.fullmatch(device):
            raise ValueError(f"{device!r} is not a device (cpu, cuda, cuda:N, mps, xpu)")
        return device

    @model_validator(mode="after")
    def _question_for_the_question_task(self) -> JobSpec:
        """A question without the `question` task asks nothing: it is dropped, with a warning
        (and not recorded in `generation` either; refusing it would break saved flows)."""
        if self.question is not None and "question" not in self.task_kinds():
            said = (self.question, tuple(self.tasks))
            if said not in _QUESTIONS_IGNORED:  # once, not for each spec built from it
                _QUESTIONS_IGNORED.add(said)
                log.warning("--question %r is ignored: it is the question task's question, "
                            "and the tasks are %s (add `question` to them to ask it)",
                            self.question, ",".join(self.tasks))
            self.question = None
        return self

    def task_kinds(self) -> set[str]:
        """The task names without their label-set variants (`scene:tut2017` -> `scene`)."""
        return {t.partition(":")[0] for t in self.tasks}

    def task_params(self) -> dict[str, Any]:
        return {"language": self.language, "question": self.question}

    def is_manifest(self) -> bool:
        return is_manifest(self.input)


def with_default(model: type[BaseModel], name: str, default: Any) -> FieldInfo:
    """`model`'s field `name` (its constraints and description) with another default."""
    return FieldInfo.merge_field_infos(model.model_fields[name], default=default)


class TranscribeArchiveSpec(JobSpec):
    """A job that transcribes: the `asr` task only, with room for a 30 s segment's transcript."""

    tasks: TaskNames = with_default(JobSpec, "tasks", ["asr"])
    max_new_tokens: int = with_default(JobSpec, "max_new_tokens", 384)

    @field_validator("tasks")
    @classmethod
    def _asr_only(cls, tasks: list[str]) -> list[str]:
        if tasks != ["asr"]:
            raise ValueError(f"transcribe-archive runs the asr task only, not {tasks}")
        return tasks

    FIXED: ClassVar[tuple[str, ...]] = ("tasks", "question", "semantic_tokens")  # not options
