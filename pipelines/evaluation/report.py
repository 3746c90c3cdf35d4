"""A report presented and stored: the summary table, the console's text, the report files.

`summary_rows` is the table both the console and the `evaluate` flow show (`signal_rows`, from
`pipelines.evaluation.signals`, the signals' table); `format_summary` is
what the console prints; `no_match_message` is the console's refusal when no reference matched
the output; `write_report` stores `report.json` and `confusion.png` in the report folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pipelines.evaluation.confusion import confusion_png
from pipelines.evaluation.errors import storage_refusal
from pipelines.evaluation.signals import signal_rows
from pipelines.evaluation.spec import EvaluationSpec
from pipelines.storage import resolve

REPORT_NAME = "report.json"
CONFUSION_NAME = "confusion.png"


def summary_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per headline metric (with the compared output's value and the delta when the
    report has a comparison): the console's table and the flow's table artifact."""
    comparison = report.get("comparison")
    if comparison:
        return [{"metric": d["metric"], "output": _round(d["output"]),
                 "compare": _round(d["compare"]), "delta": _round(d["delta"])}
                for d in comparison["deltas"]]
    return [{"metric": name, "value": _round(value)} for name, value in report["metrics"].items()]


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows as aligned text columns: the first left-aligned, the others right; None as '-'."""
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [[("-" if row[c] is None else str(row[c])) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    body = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w)
                      in enumerate(zip(r, widths))) for r in cells]
    return "\n".join([line.rstrip(), "  ".join("-" * w for w in widths), *body])


def excluded_label_warnings(report: Mapping[str, Any]) -> list[str]:
    """Per closed-set task with reference labels outside its label set: what was left out of
    scoring, and the labels the task has (printed by the console, shown by the flow)."""
    warnings = []
    for task, rep in report["results"].items():
        if rep.get("unknown_reference_labels"):
            unknown = ", ".join(f"{label!r} ({n})"
                                for label, n in rep["unknown_reference_labels"].items())
            warnings.append(f"{task}: {rep['excluded']} reference items left out of scoring, "
                            f"their labels are not in the task's label set: {unknown}; "
                            f"{task} labels: {', '.join(rep['known_labels'])}")
    return warnings


def _comparison_lines(comparison: Mapping[str, Any]) -> list[str]:
    lines = [f"{len(comparison['changed'])} items changed in "
             f"{len(comparison['changed_files'])} files (vs {comparison['compare']})"]
    if comparison.get("unavailable_tasks"):
        lines.append(f"not compared: {', '.join(comparison['unavailable_tasks'])} "
                     f"({comparison['compare']} has no such labels; the output's metrics "
                     "are shown alone)")
    return lines


def format_summary(report: Mapping[str, Any]) -> str:
    """What the console prints: the metrics table, coverage, changes, the quality signals,
    warnings, file URIs."""
    coverage = report["coverage"]
    lines = [format_table(summary_rows(report)), "",
             (f"{coverage['references']} reference items: {coverage['scored']} scored, "
              f"{coverage['missing']} missing, {coverage['errored']} errored")]
    if report.get("comparison"):
        lines += _comparison_lines(report["comparison"])
    if report.get("signals"):
        lines += ["", "quality signals vs. each reference's transcript error (spearman: rank "
                      "correlation; by decile: pooled WER/CER):",
                  format_table(signal_rows(report)), ""]
    lines += [f"warning: {w}" for w in excluded_label_warnings(report)]
    if report.get("ignored_reference_columns"):
        lines.append(f"reference columns ignored: {', '.join(report['ignored_reference_columns'])}"
                     " (no such task in the output)")
    files = report.get("files") or {}
    if files.get("report"):
        lines.append(f"report: {files['report']}")
    if files.get("confusion_png"):
        lines.append(f"confusion matrices: {files['confusion_png']}")
    return "\n".join(lines)


def no_match_message(report: Mapping[str, Any]) -> str | None:
    """Why the scores mean nothing when not one reference item matched a row of the evaluated
    output (every item missing: the references spell the objects otherwise); None when any
    matched, or when there are no references."""
    coverage = report["coverage"]
    if not coverage["references"] or coverage["missing"] != coverage["references"]:
        return None
    example = coverage["missing_examples"][0]["source_uri"]
    return (f"none of the {coverage['references']} references matched a row of "
            f"{report['output']} (e.g. {example!r}): source_uri must name an object as the "
            "output's files/ rows do (the input's s3:// URIs, or local paths), and "
            "segment_index one of its segments")


def write_report(report: dict[str, Any], spec: EvaluationSpec) -> dict[str, str | None]:
    """`report.json` and (with a closed-set task) `confusion.png` under `report["report_dir"]`;
    their URIs, also recorded in the report as `files`. Raises EvaluationError naming the
    folder when the store refuses them."""
    folder = report["report_dir"]
    png = confusion_png(report)
    paths = {"report": f"{folder}/{REPORT_NAME}",
             "confusion_png": f"{folder}/{CONFUSION_NAME}" if png is not None else None}
    report["files"] = paths
    try:
        fs, root = resolve(folder, spec.storage_options)
        fs.makedirs(root, exist_ok=True)
        if png is not None:
            fs.pipe_file(f"{root}/{CONFUSION_NAME}", png)
        fs.pipe_file(f"{root}/{REPORT_NAME}", json.dumps(report, indent=2).encode())
    except Exception as exc:  # noqa: BLE001 - every backend error is told as a storage error
        raise storage_refusal(exc, "report folder", folder, spec.storage_options,
                              "write report") from None
    return paths
