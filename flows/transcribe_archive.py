"""`transcribe-archive`: transcribe every new or changed recording under a prefix and write
subtitles (SRT and WebVTT) next to the Parquet tables.

Thin, like `label-corpus`: validate the parameters -> run the Ray Data job (`pipelines.job`,
task `asr` only) -> check the output -> write the subtitles (`pipelines.subtitles`: naming,
resuming and recovery of earlier runs' subtitles) -> publish a summary.
Credentials are never flow parameters: the job reads them from the worker's AWS_* environment;
only the non-secret endpoint may be passed.

Resuming: the job's run id is derived from the Prefect flow run (`<scheduled start>-<flow run id
prefix>`), so a retried task or flow run reuses it: the job skips objects already labelled, and
subtitles are recomputed for every file row carrying this run id, whichever attempt wrote it.
The summary is computed from the `files/` rows of the run id (not the last attempt's report),
so it covers all attempts; it adds how many earlier recordings got their subtitles back.
"""

# No `from __future__ import annotations`: served flows are pickled by value and pydantic
# must resolve the parameter model from the real annotation, not a string.

from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from flows.label_corpus import flow_run_id, label_checked
from pipelines.job import JobSpec, StageOverrides
from pipelines.stages import PIECE_SECONDS
from pipelines.storage import OutputLayout
from pipelines.subtitles import write_run_subtitles


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


# -- the flow ------------------------------------------------------------------------------

@task(retries=2, retry_delay_seconds=10)
def write_subtitles(spec: JobSpec, run_id: str) -> dict[str, Any]:
    return write_run_subtitles(spec, run_id)


def _link(target: str) -> str:
    return f"[`{target}`]({target})"


@task
def publish(report: dict[str, Any], subtitles: dict[str, Any], output: str) -> None:
    layout = OutputLayout(output)
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
        f"- subtitles (`.srt`, `.vtt`): {_link(layout.subtitles + '/')}\n"
        f"- files table (stitched transcripts): {_link(layout.files + '/')}\n"
        f"- segments table (timed transcripts): {_link(layout.segments + '/')}\n"
        f"- run report: {_link(layout.report(report['run_id']))}\n"))


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
