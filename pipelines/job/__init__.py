"""A labelling job: check, plan, run the Ray Data pipeline, report.

    report = run_job(JobSpec(input="s3://bucket/prefix", output="s3://bucket/labels",
                             model="/models/kimi"))

One module a job each:
  checks       the pre-flight checks (`check_job`), before anything is allocated or written
  plan         the to-do list, streamed from the listing into plan shards; what a rerun skips
  preview      a dry run: the plan of a run, read and not written, with the audio hours of its headers
  progress     a run's progress (files, audio, throughput, ETA) told to listeners as it goes
  ray_cluster  the Ray connection: address forms, tokens, loopback, start or join
  placement    where the stages run and how much they hold, from the cluster found
  dataset      the Ray adapter: the job's stages as one Ray Data pipeline
  stitch       the driver's end: a long file's pieces stitched back into one file
  report       the run's report and its summary lines
  run          `run_job`: all of the above, holding the output's lease
  submit       the job on a running Ray cluster through its Jobs API: submit, follow, stop
  __main__     `python -m pipelines.job --spec JSON`: the job's entry point on a cluster
"""

from pipelines.errors import JobError, RunFailed
from pipelines.job.checks import check_job, check_new_run_id
from pipelines.job.preview import dry_run, format_dry_run
from pipelines.job.report import format_report
from pipelines.job.run import new_run_id, run_job
from pipelines.spec import JobSpec

__all__ = ["JobError", "JobSpec", "RunFailed", "check_job", "check_new_run_id", "dry_run",
           "format_dry_run", "format_report", "new_run_id", "run_job"]
