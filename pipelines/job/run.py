"""Running a job: check, hold the output, plan, run the stages on Ray, stitch, report.

    report = run_job(JobSpec(input="s3://audio/in/", output="s3://audio/labels/", model=...))

A rerun resumes (finished shards are kept and skipped); a store that stays unavailable past
the retry budget ends the run with `RunFailed` (exit 1), naming the cause.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pipelines.errors import JobError, RunFailed
from pipelines.job import placement, ray_cluster
from pipelines.job.checks import check_job
from pipelines.job.dataset import build_dataset, job_stages
from pipelines.job.preview import dry_run
from pipelines.job.plan import Plan, plan
from pipelines.job.progress import ProgressTracker
from pipelines.job.report import make_report
from pipelines.job.stitch import PieceStitcher
from pipelines.spec import JobSpec
from pipelines.storage import OutputLayout, StorageError, is_local_fs, resolve, retrying
from pipelines.storage.lease import OutputLease


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def run_job(spec: JobSpec, ray_temp_dir: str | None = None) -> dict[str, Any]:
    """Check, plan, run, report. Returns the report (also written as JSON to
    `<output>/_runs/<run_id>/report.json`); for a dry run (`spec.dry_run`), the plan
    (`pipelines.job.preview`), nothing written."""
    started = time.time()
    tasks, model_id = check_job(spec)
    if spec.dry_run:
        return dry_run(spec)
    run_id = spec.run_id or new_run_id()
    fs, root = resolve(spec.output, spec.storage_options)
    lease = OutputLease(fs, root, spec.output, run_id)
    retrying(lease.acquire, spec.output, action="write", policy=spec.storage_retry)
    try:
        report, plan_dir = _run_holding(spec, run_id, [t.name for t in tasks], model_id,
                                        started, ray_temp_dir)
        _finish(spec, run_id, report, plan_dir)
    except Exception as exc:
        cause = storage_cause(exc)
        if cause is None:
            raise
        raise RunFailed(f"{cause}; objects finished so far are kept, a rerun resumes") from None
    finally:
        lease.release()
    return report


def _run_holding(spec: JobSpec, run_id: str, task_names: list[str], model_id: str,
                 started: float, ray_temp_dir: str | None) -> tuple[dict[str, Any], str]:
    """(the run's report, its plan folder)."""
    from pipelines import stages

    planned = plan(spec, run_id)
    # the stages get this process's S3 endpoint and credentials (a running cluster's workers
    # do not share its AWS_* environment); the report shows the options as given
    workers = spec.model_copy(update={"storage_options": spec.storage_options.for_workers()})
    writer = stages.WriteStage(spec.output, workers.storage_options, spec.tasks,
                               spec.task_params(), spec.semantic_tokens, spec.storage_retry,
                               spec.stages.write)
    stitcher = PieceStitcher(writer)
    summary: list[dict] = []
    tracker = ProgressTracker(run_id, planned.counts["todo"])
    tracker.start()
    ok = False
    try:
        stats = _run_on_ray(workers, planned, model_id, run_id, stitcher, summary, tracker,
                            ray_temp_dir) if planned.shards else ""
        ok = True
    finally:
        tracker.end(ok)
    report = make_report(spec, run_id, model_id, task_names, planned, summary,
                         time.time() - started, stats)
    report["long_files_in_pieces"] = {"files": stitcher.files, "pieces": stitcher.pieces}
    return report, planned.plan_dir


def _run_on_ray(spec: JobSpec, planned: Plan, model_id: str, run_id: str,
                stitcher: PieceStitcher, summary: list[dict], tracker: ProgressTracker,
                ray_temp_dir: str | None) -> str:
    """The planned units through the stages on Ray; the files' summary rows into `summary`,
    each counted by `tracker` as it lands (a long file once, when stitched). Returns Ray Data's
    stats."""
    import ray

    store = placement.local_object_store_bytes(spec, ray_cluster.local_gpus())
    started_ray = ray_cluster.init_ray(spec.ray_address, store, ray_temp_dir)
    try:
        spec = placement.place(spec, ray_cluster.cluster_gpus(), len(ray_cluster.alive_nodes()),
                               ray_cluster.smallest_node_cpus())
        writer = stitcher.writer
        writer.resources = spec.stages.write
        ds = build_dataset(job_stages(spec, model_id, run_id, writer), planned.units,
                           spec.no_progress_timeout_s, spec.inflight_bytes,
                           ray_progress_bars=not tracker.replaces_ray_progress)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for row in batch.to_pylist():
                for done in stitcher.add(row):
                    summary.append(done)
                    tracker.file_done(done)
        stitcher.check_complete()
        return ds.stats()
    finally:
        if started_ray:
            ray.shutdown()


def _finish(spec: JobSpec, run_id: str, report: dict[str, Any], plan_dir: str) -> None:
    """The run completed: its to-do list goes, the report is written."""
    fs, root = resolve(spec.output, spec.storage_options)
    layout = OutputLayout(root)

    def finish():
        if fs.exists(plan_dir):
            fs.rm(plan_dir, recursive=True)
        # the writers' (local) staging folder, empty once done
        if is_local_fs(fs) and fs.isdir(layout.staging) and not fs.ls(layout.staging):
            fs.rmdir(layout.staging)
        with fs.open(layout.report(run_id), "w") as handle:
            handle.write(json.dumps(report, indent=2))

    retrying(finish, OutputLayout(spec.output).run(run_id), action="write",
             policy=spec.storage_retry)


def storage_cause(exc: BaseException) -> StorageError | None:
    """The StorageError that ended a run, also when Ray wrapped it (a stage raises one when
    the store stays unavailable past the retry budget): found via causes and Ray's `.cause`."""
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


__all__ = ["JobError", "RunFailed", "new_run_id", "run_job", "storage_cause"]
