"""`transcribe-archive`: transcribe every new or changed recording under a prefix and write
subtitles (SRT and WebVTT) next to the Parquet tables.

Thin, like `label-corpus`: check the job -> run the Ray Data job (`pipelines.job`, its
parameters `pipelines.spec.TranscribeArchiveSpec`: the asr task only) -> check the output ->
write the subtitles (`pipelines.subtitles`: naming, resuming and recovery of earlier runs'
subtitles) -> publish a summary. A dry run checks the job and publishes its plan. Credentials are never flow parameters (`flows.labelling`).

Resuming: the job's run id is derived from the Prefect flow run (`<scheduled start>-<flow run id
prefix>`), so a retried task or flow run reuses it: the job skips objects already labelled, and
subtitles are recomputed for every file row carrying this run id, whichever attempt wrote it.
The summary is computed from the `files/` rows of the run id (not the last attempt's report),
so it covers all attempts; it adds how many earlier recordings got their subtitles back.
"""

# No `from __future__ import annotations`: served flows are pickled by value and pydantic
# must resolve the parameter model from the real annotation, not a string.

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.labelling import job_of, label_checked, planned_checked
from flows.retry import retry_unless_final
from pipelines.spec import JobSpec, TranscribeArchiveSpec
from pipelines.storage import OutputLayout
from pipelines.subtitles import write_run_subtitles


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_final)
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
def transcribe_archive(params: TranscribeArchiveSpec) -> dict[str, Any]:
    logger = get_run_logger()
    spec = job_of(params)
    if spec.dry_run:  # the plan, nothing run or written
        return planned_checked(spec, "transcribe-archive")
    report = label_checked(spec, "transcribe-archive")
    subtitles = write_subtitles(spec, report["run_id"])
    publish(report, subtitles, spec.output)
    logger.info("run %s: %s recordings, %s subtitle files (%s recordings of earlier runs), "
                "errors %s", report["run_id"], subtitles["recordings"],
                subtitles["subtitle_files"], subtitles["recovered"], subtitles["errors_by_kind"])
    report["subtitles"] = subtitles
    return report
