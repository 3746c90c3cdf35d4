"""A run's report: what it planned, did and how fast (`report.json`), and its summary lines."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from pipelines.errors import RunFailed
from pipelines.stages.write import STAGE_TIMES
from pipelines.storage import OutputLayout, resolve, retrying


def make_report(spec, run_id: str, model_id: str, task_names: list[str], planned,
                summary: list[dict], wall_s: float, stats) -> dict[str, Any]:
    """The report of a run from its plan (`pipelines.job.plan.Plan`) and its files' summary
    rows (`pipelines.stages.write.SUMMARY_SCHEMA`)."""
    status = Counter(r["status"] for r in summary)
    kinds = Counter(r["error_kind"] for r in summary if r["error_kind"])
    audio_h = sum(r["duration_s"] for r in summary) / 3600.0
    stage_s = {name.removesuffix("_s"): round(sum(r[name] for r in summary), 3)
               for name in (*STAGE_TIMES, "write_s")}
    return {
        "run_id": run_id, "model_id": model_id, "input": spec.input, "output": spec.output,
        "tasks": task_names, "storage_options": spec.storage_options.safe(),
        "planned": dict(planned.counts), "processed": len(summary),
        # the first objects with rows here that this input no longer lists, and what the
        # listing left out by extension
        "not_listed": planned.not_listed, "skipped_by_extension": dict(planned.skipped),
        "status": dict(status), "errors_by_kind": dict(kinds),
        "segments": sum(r["num_segments"] for r in summary),
        "audio_hours": audio_h, "wall_s": wall_s,
        "audio_hours_per_hour": audio_h / (wall_s / 3600.0) if wall_s else 0.0,
        "stage_seconds": stage_s, "ray_stats": str(stats)[:20000],
    }


def read_report(spec, run_id: str) -> dict[str, Any]:
    """The report a finished run wrote (`<output>/_runs/<run_id>/report.json`); a RunFailed
    when it is not there (the run did not finish)."""
    fs, root = resolve(spec.output, spec.storage_options)
    path = OutputLayout(root).report(run_id)

    def read() -> dict[str, Any] | None:
        return json.loads(fs.cat_file(path)) if fs.exists(path) else None

    shown = OutputLayout(spec.output).report(run_id)
    report = retrying(read, shown, spec.storage_options, action="read", policy=spec.storage_retry)
    if report is None:
        raise RunFailed(f"run {run_id} wrote no report at {shown}")
    return report


def format_report(report: dict) -> str:
    """The run's report in three lines: counts, speed, where the output is."""
    layout = OutputLayout(report["output"])  # `--output s3://b/labels/` names the same folder
    planned = report["planned"]
    lines = [f"run {report['run_id']}: {report['processed']} processed "
             f"({planned.get('already_done', 0)} already done{_planned_notes(report)}), "
             f"status {report['status']}, errors {report['errors_by_kind']}",
             f"audio {report['audio_hours'] * 3600:.1f} s in {report['wall_s']:.1f} s "
             f"({report['audio_hours_per_hour']:.1f} audio-hours per hour)",
             f"output: {layout.files}/ and {layout.segments}/; "
             f"report: {layout.report(report['run_id'])}"]
    return "\n".join(lines)


def _planned_notes(report: dict) -> str:
    """What the plan retried, found missing, repeated or skipped, as clauses to append."""
    planned = report["planned"]
    notes = (f", {planned['retried_errors']} earlier errors tried again"
             if planned.get("retried_errors") else "")
    if planned.get("not_listed"):
        named = report.get("not_listed", [])[:3]  # (an older report names none)
        more = planned["not_listed"] - len(named)
        listed = ", ".join(named) + (f" and {more} more" if named and more > 0 else "")
        notes += (f"; {planned['not_listed']} objects with rows here are not in this input "
                  f"(deleted, or outside it; their rows stay){': ' + listed if named else ''}")
    if planned.get("duplicates"):
        notes += f"; {planned['duplicates']} repeated entries of the input labelled once"
    skipped = report.get("skipped_by_extension") or {}
    if skipped:
        notes += ("; skipped by extension: " + ", ".join(
            f"{n} .{ext}" if ext else f"{n} without one"
            for ext, n in sorted(skipped.items(), key=lambda kv: -kv[1])[:5]))
    return notes
