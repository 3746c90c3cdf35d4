"""`label-corpus`: label every new or changed audio object under a prefix (meant for a schedule).

Thin by design: check the job -> run the Ray Data job (`pipelines.job`) -> check the output ->
publish a summary (a dry run: check the job -> publish its plan). Its parameters are the job's (`pipelines.spec.JobSpec`), defined there once;
all logic lives in `pipelines`. A retried run resumes, because the job skips every object
already labelled with the same etag.
"""

# No `from __future__ import annotations`: served flows are pickled by value and pydantic
# must resolve the parameter model from the real annotation, not a string.

from collections import Counter
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.labelling import job_of, label_checked, planned_checked
from pipelines.spec import JobSpec
from pipelines.storage import OutputLayout, read_table_dir, resolve, this_run


@task
def label_distribution(spec: JobSpec, run_id: str) -> dict[str, dict[str, int]]:
    """Counts of each closed-set label over this run's segments (read one shard at a time, and
    of it only the run and the labels)."""
    import pyarrow.compute as pc

    from kimi_ops.tasks import ChoiceTask, get_task

    names = [t.name for t in (get_task(s, **spec.task_params()) for s in spec.tasks)
             if isinstance(t, ChoiceTask)]
    if not names:
        return {}
    fs, root = resolve(spec.output, spec.storage_options)
    dist: dict[str, Counter] = {name: Counter() for name in names}
    for _, table in read_table_dir(fs, OutputLayout(root).segments, ["run_id", *names],
                                   spec.storage_retry):
        mine = this_run(table, run_id)
        for name in names:
            for count in pc.value_counts(mine[name].drop_null()).to_pylist():
                dist[name][count["values"]] += count["counts"]
    return {name: dict(counter) for name, counter in dist.items()}


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"metric": "inputs processed", "value": report["processed"]},
            {"metric": "already labelled (skipped)",
             "value": report["planned"].get("already_done", 0)},
            {"metric": "ok", "value": report["status"].get("ok", 0)},
            {"metric": "errors", "value": report["status"].get("error", 0)},
            *({"metric": f"errors: {kind}", "value": n}
              for kind, n in sorted(report["errors_by_kind"].items())),
            {"metric": "audio hours", "value": round(report["audio_hours"], 4)},
            {"metric": "audio-hours per hour", "value": round(report["audio_hours_per_hour"], 2)},
            {"metric": "wall seconds", "value": round(report["wall_s"], 1)}]


@task
def publish(report: dict[str, Any], distribution: dict[str, dict[str, int]], output: str) -> None:
    create_table_artifact(key="label-corpus-summary", table=summary_rows(report),
                          description=f"run {report['run_id']}")
    dist_rows = [{"task": task_name, "label": label, "segments": n}
                 for task_name, counts in distribution.items()
                 for label, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    if dist_rows:
        create_table_artifact(key="label-corpus-labels", table=dist_rows,
                              description="closed-set labels over this run's segments")
    layout = OutputLayout(output)
    create_markdown_artifact(key="label-corpus-output", markdown=(
        f"### Output of run `{report['run_id']}`\n\n"
        f"- files table: `{layout.files}/`\n- segments table: `{layout.segments}/`\n"
        f"- run report: `{layout.report(report['run_id'])}`\n"))


@flow(name="label-corpus", log_prints=True)
def label_corpus(params: JobSpec) -> dict[str, Any]:
    spec = job_of(params)
    if spec.dry_run:  # the plan, nothing run or written
        return planned_checked(spec, "label-corpus")
    return published(spec, label_checked(spec, "label-corpus"))


def published(spec: JobSpec, report: dict[str, Any]) -> dict[str, Any]:
    """A finished run's artifacts published and logged; its report with the label
    distribution (what a flow that ran the job returns)."""
    distribution = label_distribution(spec, report["run_id"])
    publish(report, distribution, spec.output)
    get_run_logger().info("run %s: %s processed, status %s", report["run_id"],
                          report["processed"], report["status"])
    report["label_distribution"] = distribution
    return report
