"""Everything an evaluation can be refused for, refused before any table is read.

`check_inputs(spec)` reads the references file, the outputs' Parquet footers only, and proves
the report folder writable; it returns the `EvaluationPlan` that `evaluate` follows, or raises
`EvaluationError` naming the file and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from pipelines.evaluation.errors import EvaluationError, storage_refusal
from pipelines.evaluation.outputs import OutputInfo, inspect_output
from pipelines.evaluation.references import (KEY_COLUMNS, LANGUAGE_COLUMN, Reference,
                                             parse_references, read_reference_rows)
from pipelines.evaluation.spec import EvaluationSpec
from pipelines.storage import StorageError, check_output


@dataclass
class EvaluationPlan:
    references: list[Reference]
    tasks: list[str]  # task columns scored: "transcript" and/or closed-set task names
    ignored_columns: list[str]
    outputs: list[OutputInfo]  # the input, then the compared output when there is one
    created: datetime
    report_dir: str
    compare_unavailable: list[str] = field(default_factory=list)  # tasks `compare` lacks

    def tasks_of(self, index: int) -> list[str]:
        """The tasks scored in `outputs[index]`."""
        skipped = self.compare_unavailable if index else []
        return [t for t in self.tasks if t not in skipped]


def _outputs(spec: EvaluationSpec) -> list[OutputInfo]:
    """The input's footers, then the compared output's."""
    outputs = [inspect_output(spec.input, spec.storage_options)]
    if spec.compare:
        if spec.compare.rstrip("/") == spec.input.rstrip("/"):
            raise EvaluationError(f"compare {spec.compare}: the same output as --input")
        outputs.append(inspect_output(spec.compare, spec.storage_options, "compare"))
    return outputs


def _scorable(info: OutputInfo, columns: list[str]) -> list[str]:
    """The output's tasks that the references have a column for."""
    return [t for t in info.tasks() if t in columns]


def _check_report_folder(folder: str, spec: EvaluationSpec) -> None:
    try:
        check_output(folder, spec.storage_options)
    except StorageError as err:
        raise storage_refusal(err, "report folder", folder, spec.storage_options,
                              "write") from None


def check_inputs(spec: EvaluationSpec) -> EvaluationPlan:
    """The references file (format, key column, at least one task column the input has, rows
    that parse), the outputs (footers) and write access to the report folder; EvaluationError
    otherwise."""
    created = datetime.now(timezone.utc)
    columns, rows = read_reference_rows(spec.references, spec.storage_options)
    if "source_uri" not in columns:
        raise EvaluationError(f"references {spec.references}: no source_uri column "
                              f"(columns: {columns})")
    outputs = _outputs(spec)
    tasks = _scorable(outputs[0], columns)
    if not tasks:
        raise EvaluationError(
            f"references {spec.references}: no task column the output can be scored on "
            f"(reference columns: {columns}; output tasks: {outputs[0].tasks() or 'none'})")
    unavailable = ([t for t in tasks if t not in _scorable(outputs[-1], columns)]
                   if spec.compare else [])
    ignored = [c for c in columns if c not in (*tasks, *KEY_COLUMNS, LANGUAGE_COLUMN)]
    references = parse_references(spec.references, rows, tasks)
    if not references:
        raise EvaluationError(f"references {spec.references}: no row holds a value for "
                              f"{', '.join(tasks)}")
    report_dir = spec.report_folder(created)
    _check_report_folder(report_dir, spec)
    return EvaluationPlan(references, tasks, ignored, outputs, created, report_dir, unavailable)
