"""`kimi-label run` and `kimi-label transcribe-archive`: a labelling job through its flow.

The options are the job's parameters (`pipelines.spec.JobSpec`, `TranscribeArchiveSpec`). Before
the flow starts, the command checks what the flow's first task would (`pipelines.job.check_job`:
tasks, checkpoint, input, output, settings, lease; a credentials block is read) and that a
`--run-id` names no finished run, so a common mistake costs a second and one line (exit 2).
`--dry-run` prints the plan made after those checks (`pipelines.job.preview`) and stops, here:
no flow run, no Prefect server, no Ray, nothing written.
The flow runs here: ephemeral Prefect unless PREFECT_API_URL points at a server. The run's
progress is shown on stderr (`flows.console.progress`), its report on stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys

from flows.console.options import add_model_options, model_from_args
from flows.console.progress import progress_for
from flows.console.running import check_prefect_api, prefect_defaults, run_flow_here
from pipelines.errors import CredentialsError, JobError
from pipelines.job import check_job, check_new_run_id, dry_run, format_dry_run, format_report
from pipelines.job.progress import watching
from pipelines.spec import JobSpec, TranscribeArchiveSpec
from pipelines.storage import RetryPolicy

# Storage retries of the checks before the flow: a store that does not answer at all when the
# command starts is most often a mistyped endpoint, and the job's budget (sized to ride out a
# restart mid-run) would keep the user waiting over a minute to be told so.
PREFLIGHT_RETRY = RetryPolicy(attempts=4, base_delay_s=0.5, max_delay_s=2.0, budget_s=5.0)


def add_commands(commands) -> None:
    p = commands.add_parser("run", help="label every audio object under --input into Parquet "
                                        "(the label-corpus flow, a Ray job)",
                            description="Label every new or changed audio object under --input "
                                        "into <output>/files/ and <output>/segments/.")
    add_model_options(p, JobSpec)
    p.set_defaults(run=run)
    p = commands.add_parser("transcribe-archive",
                            help="transcripts (Parquet) and SRT/WebVTT subtitles of every "
                                 "recording under --input",
                            description="Transcribe every new or changed recording under "
                                        "--input: Parquet tables and <output>/subtitles/.")
    add_model_options(p, TranscribeArchiveSpec, skip=TranscribeArchiveSpec.FIXED)
    p.set_defaults(run=transcribe_archive)


def run(args: argparse.Namespace) -> int:
    return _job_through_flow(args, JobSpec, "label_corpus", format_report)


def transcribe_archive(args: argparse.Namespace) -> int:
    return _job_through_flow(args, TranscribeArchiveSpec, "transcribe_archive",
                             format_transcription)


def _job_through_flow(args: argparse.Namespace, model: type[JobSpec], flow_name: str,
                      formatter) -> int:
    """The job of `model` from the options, checked here, then run by the flow `flow_name`
    (the function of that name in `flows.<flow_name>`); its report printed by `formatter`."""
    import importlib

    prefect_defaults()  # before Prefect is imported
    params = model_from_args(model, args)
    name = flow_name.replace("_", "-")
    spec = check_before_flow(params, name)
    if spec.dry_run:  # the same plan as the flow's, made here: no flow run, no Prefect server
        print(format_dry_run(dry_run(spec)))
        return 0
    flow = getattr(importlib.import_module(f"flows.{flow_name}"), flow_name)
    with watching(progress_for(sys.stderr)):
        report = run_flow_here(flow, params, name)
    print(formatter(report))
    return 0


def check_before_flow(params: JobSpec, name: str) -> JobSpec:
    """The flow's checks, here and now (module docstring); a JobError says what to fix. Returns
    the job with its credentials block read."""
    from flows.credentials import with_credentials_read

    if not params.dry_run:  # (a dry run needs no Prefect)
        check_prefect_api()  # before the checks touch the output
    storage_log = logging.getLogger("pipelines.storage")
    level = storage_log.level
    storage_log.setLevel(logging.ERROR)  # its retry warnings: the refusal says how many there were
    try:
        # a credentials block is read here as well as by the flow (a deployment's runs have
        # only the flow's read)
        job = with_credentials_read(params)
        spec = job.model_copy(update={"storage_retry": PREFLIGHT_RETRY})
        check_job(spec)
        check_new_run_id(spec)  # (the spec carries a run id only when --run-id gave one)
    except (JobError, CredentialsError) as exc:
        raise JobError(f"{name} cannot run: {exc}") from None
    finally:
        storage_log.setLevel(level)
    return job


def format_transcription(report: dict) -> str:
    """`kimi-label run`'s report of the job, then what the subtitles step did."""
    subs = report["subtitles"]
    removed, recovered = subs["subtitle_files_removed"], subs.get("recovered", 0)
    return "\n".join([
        format_report(report),
        f"subtitles: {subs['subtitle_files']} files (.srt, .vtt) for {subs['recordings']} "
        f"recordings of this run ({subs['segments']} segments)"
        + (f" and {recovered} of earlier runs whose files were missing or stale"
           if recovered else "")
        + (f", {removed} stale removed" if removed else "") + f" in {subs['subtitles_dir']}"])
