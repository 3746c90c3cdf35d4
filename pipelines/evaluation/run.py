"""One evaluation, from its plan to its report (a JSON-ready dict; `write_report` stores it).

The report holds the input's coverage, headline metrics (`metrics`), per-task results
(`results`, with every scored row), how the quality signals relate to transcript errors
(`signals`, `pipelines.evaluation.signals`; None without them) and, with `compare`, the
comparison (of labels and metrics; the signals are the input's). Its keys keep their
first names, so existing readers keep working: `output` is the evaluated labelled output (the
spec's `input`) and `report_dir` the report folder (the spec's `output`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipelines.evaluation.checks import EvaluationPlan, check_inputs
from pipelines.evaluation.outputs import collect
from pipelines.evaluation.references import ASR_COLUMN
from pipelines.evaluation.scoring import compare_outcomes, score, summary_metrics
from pipelines.evaluation.signals import signals_section
from pipelines.evaluation.spec import EvaluationSpec

FORMAT = "kimi-label-evaluation"
FORMAT_VERSION = "1"


def _score_outputs(spec: EvaluationSpec, plan: EvaluationPlan) -> list[tuple]:
    """(outcomes, scores, facts) of each output of the plan, the input first."""
    results = []
    for index, info in enumerate(plan.outputs):
        tasks = plan.tasks_of(index)
        outcomes, label_order, facts = collect(info, plan.references, tasks,
                                               spec.storage_options)
        results.append((outcomes, score(plan.references, tasks, outcomes, label_order,
                                        spec.bins), facts))
    return results


def _comparison(spec: EvaluationSpec, plan: EvaluationPlan, mine: tuple, theirs: tuple,
                metrics: dict[str, Any]) -> dict[str, Any]:
    (outcomes, _, _), (other_outcomes, other_scored, other_facts) = mine, theirs
    return {**compare_outcomes(plan.references, plan.tasks_of(1), outcomes, other_outcomes,
                               metrics, summary_metrics(other_scored), spec.compare),
            "unavailable_tasks": plan.compare_unavailable,
            "compare_runs": other_facts["runs"], "compare_model_ids": other_facts["model_ids"],
            "compare_coverage": other_scored["coverage"]}


def evaluate(spec: EvaluationSpec, plan: EvaluationPlan | None = None) -> dict[str, Any]:
    """The report (JSON-ready); `check_inputs` first when no plan is given."""
    plan = plan or check_inputs(spec)
    results = _score_outputs(spec, plan)
    _, scored, facts = results[0]
    levels = Counter("segment" if r.segment_index is not None else "file"
                     for r in plan.references)
    report = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "created_at": plan.created.isoformat(timespec="seconds"),
              "output": spec.input, "references": spec.references,
              "report_dir": plan.report_dir, "tasks": plan.tasks,
              "reference_rows": len(plan.references),
              "levels": {k: levels[k] for k in ("file", "segment")},
              "ignored_reference_columns": plan.ignored_columns,
              "output_runs": facts["runs"], "model_ids": facts["model_ids"],
              "coverage": scored["coverage"], "metrics": summary_metrics(scored),
              "results": scored["tasks"],
              "signals": signals_section(scored["tasks"].get(ASR_COLUMN)),
              "comparison": None}
    if len(results) > 1:
        report["comparison"] = _comparison(spec, plan, results[0], results[1], report["metrics"])
    return report
