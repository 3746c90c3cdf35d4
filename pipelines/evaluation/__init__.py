"""Label quality of a labelled output against reference labels, and two outputs compared.

    spec = EvaluationSpec(input="s3://audio/labels", references="s3://audio/refs.csv",
                          compare="s3://audio/labels-v0")
    plan = check_inputs(spec)          # references + output footers only; EvaluationError
    report = evaluate(spec, plan)      #   names the file and the reason
    paths = write_report(report, spec) # report.json + confusion.png under the report folder

One module a job each:
  spec        `EvaluationSpec`: the parameters, declared once (the console's options and the
              flow's parameters)
  errors      `EvaluationError` (a `PipelineError`; `retryable` for a storage failure)
  references  the references file: formats, keys, task columns, how an object is spelled
  outputs     a labelled output: footers, rows, each reference's outcome (what it is compared
              with)
  scoring     coverage, per-task metrics, excluded labels, two outputs compared
  checks      `check_inputs` -> `EvaluationPlan`: every refusal before any table is read
  signals     the quality signals against per-item transcript errors (`signals_section`)
  run         `evaluate`: the plan scored into the report
  report      the summary table, the console's text, `write_report`
  confusion   the confusion matrices as a PNG
"""

from pipelines.evaluation.checks import EvaluationPlan, check_inputs
from pipelines.evaluation.errors import EvaluationError
from pipelines.evaluation.references import Reference, as_listed, parse_references
from pipelines.evaluation.report import (excluded_label_warnings, format_summary, format_table,
                                         no_match_message, summary_rows, write_report)
from pipelines.evaluation.run import evaluate
from pipelines.evaluation.signals import signal_rows, signals_section
from pipelines.evaluation.spec import EvaluationSpec

__all__ = [
    "EvaluationError", "EvaluationPlan", "EvaluationSpec", "Reference", "as_listed",
    "check_inputs", "evaluate", "excluded_label_warnings", "format_summary", "format_table",
    "no_match_message", "parse_references", "signal_rows", "signals_section", "summary_rows",
    "write_report",
]
