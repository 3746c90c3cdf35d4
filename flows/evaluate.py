"""`evaluate`: score a labelled output against reference labels (and against another output).

Thin by design: check the inputs (`pipelines.evaluation.check_inputs`: the references file, the
outputs' footers, write access to the report folder) -> score -> write report.json and
confusion.png -> publish them as artifacts. All logic lives in `pipelines.evaluation`; the
flow's parameter is its `EvaluationSpec`.

Artifacts: `evaluation-summary` (headline metrics; with `compare`, both values and the delta),
`evaluation-coverage` (scored/missing/errored, errors by kind), `evaluation-report` (markdown:
where report.json and the confusion-matrix PNG are, the matrices as tables) and, with `compare`,
`evaluation-changes` (reference items whose label, transcript or state differs) and, when the
output has quality signals, `evaluation-signals` (each signal against the transcript errors).

Credentials are never flow parameters: `storage_options` leaves them out of every dump, so they
come from the worker's AWS_* environment; only the non-secret endpoint and region may be passed.
"""

# No `from __future__ import annotations`: served flows are pickled by value and pydantic
# must resolve the parameter model from the real annotation, not a string.

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.credentials import with_credentials_read
from flows.retry import retry_unless_final
from pipelines.evaluation import (
    EvaluationError,
    EvaluationPlan,
    EvaluationSpec,
    check_inputs,
    evaluate,
    excluded_label_warnings,
    signal_rows,
    summary_rows,
    write_report,
)

CHANGES_SHOWN = 500  # rows of the changes artifact; report.json has them all


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_final)
def check(spec: EvaluationSpec) -> EvaluationPlan:
    return check_inputs(spec)


@task(retries=1, retry_delay_seconds=30, retry_condition_fn=retry_unless_final)
def score_and_write(spec: EvaluationSpec, plan: EvaluationPlan) -> dict[str, Any]:
    report = evaluate(spec, plan)
    write_report(report, spec)
    return report


def _markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(report: dict[str, Any]) -> str:
    files = report["files"]
    parts = [f"### Evaluation of `{report['output']}`\n",
             (f"- references: `{report['references']}` ({report['reference_rows']} items: "
              f"{report['levels']['file']} files, {report['levels']['segment']} segments)"),
             f"- report: `{files['report']}`"]
    if report["comparison"]:
        parts.append(f"- compared with: `{report['comparison']['compare']}`")
    parts += [f"- **warning**: {w}" for w in excluded_label_warnings(report)]
    if files["confusion_png"]:
        parts += [f"- confusion matrices: `{files['confusion_png']}`", "",
                  f"![confusion matrices]({files['confusion_png']})"]
    for name, result in report["results"].items():
        if result["kind"] != "closed_set" or not result["count"]:
            continue
        labels = result["labels"]
        parts += ["", f"#### {name} (rows: reference, columns: predicted)", "",
                  _markdown_table(["", *labels],
                                  [[label, *row] for label, row in zip(labels,
                                                                       result["confusion"])])]
    return "\n".join(parts) + "\n"


@task
def publish(report: dict[str, Any]) -> None:
    create_table_artifact(key="evaluation-summary", table=summary_rows(report),
                          description=f"{report['output']} against {report['references']}")
    coverage = report["coverage"]
    rows = [{"state": state, "references": coverage[state]}
            for state in ("scored", "missing", "errored")]
    rows += [{"state": f"errored: {kind}", "references": n}
             for kind, n in coverage["errors_by_kind"].items()]
    create_table_artifact(key="evaluation-coverage", table=rows,
                          description=f"{coverage['references']} reference items")
    create_markdown_artifact(key="evaluation-report", markdown=report_markdown(report))
    if report["signals"]:
        create_table_artifact(key="evaluation-signals", table=signal_rows(report),
                              description="quality signals against each reference's "
                                          "transcript error (report.json: every decile)")
    comparison = report["comparison"]
    if comparison:
        create_table_artifact(
            key="evaluation-changes", table=comparison["changed"][:CHANGES_SHOWN],
            description=(f"{len(comparison['changed'])} changed items in "
                         f"{len(comparison['changed_files'])} files, output vs "
                         f"{comparison['compare']}"))


@flow(name="evaluate", log_prints=True)
def evaluate_flow(params: EvaluationSpec) -> dict[str, Any]:
    logger = get_run_logger()
    try:
        spec = with_credentials_read(params)
        plan = check(spec)
        report = score_and_write(spec, plan)
    except EvaluationError as exc:
        raise EvaluationError(f"evaluate cannot run: {exc}", exc.retryable) from None
    publish(report)
    logger.info("evaluated %d reference items: %s -> %s", report["reference_rows"],
                report["metrics"], report["files"]["report"])
    return report
