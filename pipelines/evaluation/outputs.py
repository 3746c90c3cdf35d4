"""A labelled output as an evaluation reads it: its footers, its rows, each reference's outcome.

What a reference is compared with:
  * file level: the file's `files/` row (`transcript` is the segments' stitched transcript); a
    closed-set label is the argmax of the duration-weighted mean of the `<task>_scores` of the
    file's ok and silent segments (its confidence: that mean's top value); segments without
    scores vote with their label by duration and the file's confidence is then unknown.
  * segment level: the `segments/` row (label; confidence = the score of that label).
Segments rows count only with their file's current etag, and the first row of a
(source_uri, segment_index) wins, as in the training-data build.

Quality signals (`pipelines.signals`): a segment reference's outcome carries its segments row's
values, a file reference's its `files/` row's (their duration-weighted aggregates), where the
output has them (`pipelines.evaluation.signals` relates them to the transcript errors).

Outcome, per reference row: `missing` (no `files/` row, or no `segments/` row for a segment
reference), `errored` (an error row for the file or the segment, by `error.kind`) or `scored`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.evaluation.errors import EvaluationError, storage_refusal
from pipelines.evaluation.references import ASR_COLUMN, Reference
from pipelines.schema import TASK_VERSIONS_KEY, closed_set_tasks, normalized
from pipelines.signals import SIGNAL_COLUMNS
from pipelines.storage import (OutputLayout, StorageConfig, parquet_files, read_available,
                               read_schema, resolve)

log = logging.getLogger(__name__)

MISSING, ERRORED, SCORED = "missing", "errored", "scored"
FILE_COLUMNS = ["source_uri", "status", "error", "etag", ASR_COLUMN, "run_id", "model_id",
                *SIGNAL_COLUMNS.values()]
SEGMENT_COLUMNS = ["source_uri", "segment_index", "start_s", "end_s", "status", "error", "etag",
                   ASR_COLUMN, *SIGNAL_COLUMNS.values()]


@dataclass
class OutputInfo:
    """What an output holds, from its Parquet footers only."""

    uri: str
    files_shards: list[str]
    segments_shards: list[str]
    closed_set: list[str]  # tasks with `<task>` and `<task>_scores` columns
    has_transcript: bool
    segment_columns: set[str] = field(default_factory=set)

    def tasks(self) -> list[str]:
        """The task columns this output can be scored on: `transcript`, then closed sets."""
        return ([ASR_COLUMN] if self.has_transcript else []) + self.closed_set


@dataclass
class Outcome:
    """One reference item as an output has it."""

    state: str  # scored | missing | errored
    error_kind: str | None = None
    values: dict[str, Any] = field(default_factory=dict)  # task column -> hypothesis/label
    confidence: dict[str, float | None] = field(default_factory=dict)
    signals: dict[str, float] = field(default_factory=dict)  # signal column -> value, if any


Outcomes = dict[tuple[str, int | None], Outcome]


# -- footers ---------------------------------------------------------------------------------

def inspect_output(uri: str, storage: StorageConfig | None = None,
                   role: str = "output") -> OutputInfo:
    """The output's shards and tasks; `role` ("output" | "compare") starts every message.
    Raises EvaluationError: no `files/` shards, or the storage failure."""
    storage = StorageConfig.coerce(storage)
    try:
        fs, root = resolve(uri, storage)
        layout = OutputLayout(root)
        files, segments = parquet_files(fs, layout.files), parquet_files(fs, layout.segments)
        if not files:
            raise EvaluationError(f"{role} {uri}: no files/*.parquet under it (not a kimi-label "
                                  "output, or nothing labelled yet)")
        # every file failed when there are no segments: the tasks are in the files' footers
        schemas = [read_schema(fs, path) for path in (segments or files)]
    except EvaluationError:
        raise
    except Exception as exc:  # noqa: BLE001 - every backend error is told as a storage error
        raise storage_refusal(exc, role, uri, storage, "read output") from None
    if segments:
        columns = {name for schema in schemas for name in schema.names}
        ran: set[str] = set()
        closed = sorted({t for schema in schemas for t in closed_set_tasks(schema)})
    else:
        columns = set()
        ran = {name for schema in schemas for name in _tasks_ran(schema)}
        closed = sorted(_choice_tasks(ran))
    return OutputInfo(uri, files, segments, closed, ASR_COLUMN in columns or "asr" in ran,
                      columns)


def _tasks_ran(schema: pa.Schema) -> dict[str, str]:
    raw = (schema.metadata or {}).get(TASK_VERSIONS_KEY)
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


def _choice_tasks(names: Iterable[str]) -> set[str]:
    from kimi_ops.tasks import TASKS, ChoiceTask, get_task

    found = set()
    for name in names:
        if name in TASKS:
            try:
                if isinstance(get_task(name), ChoiceTask):
                    found.add(name)
            except (TypeError, ValueError):  # a task that needs parameters is not a closed set
                pass
    return found


# -- rows ------------------------------------------------------------------------------------

def _read_rows(fs, shards: Sequence[str], columns: Sequence[str],
               uris: set[str]) -> Iterator[dict[str, Any]]:
    """Rows of `shards` whose source_uri is in `uris`, with the `columns` each shard has, of
    either schema version; scores are dicts, label -> probability, in label-set order."""
    wanted = pa.array(sorted(uris), pa.string())
    for path in shards:
        table = read_available(fs, path, list(columns))
        yield from normalized(table.filter(pc.is_in(table["source_uri"], value_set=wanted))
                              ).to_pylist()


def _files_rows(fs, info: OutputInfo, uris: set[str]) -> dict[str, dict]:
    """Each referenced file's `files/` row; the first of duplicated rows counts."""
    files: dict[str, dict] = {}
    duplicated = 0
    for row in _read_rows(fs, info.files_shards, FILE_COLUMNS, uris):
        if row["source_uri"] in files:
            duplicated += 1
            continue
        files[row["source_uri"]] = row
    if duplicated:
        log.warning("output %s: %d duplicated files/ rows; the first of each counts",
                    info.uri, duplicated)
    return files


def _segments_rows(fs, info: OutputInfo, uris: set[str], files: dict[str, dict],
                   closed: Sequence[str]) -> dict[str, dict[int, dict]]:
    """source_uri -> segment_index -> the first segments row of the file's current etag."""
    columns = [*SEGMENT_COLUMNS, *closed, *(f"{t}_scores" for t in closed)]
    by_file: dict[str, dict[int, dict]] = defaultdict(dict)
    for row in _read_rows(fs, info.segments_shards, columns, uris):
        owner = files.get(row["source_uri"])
        if owner is None or (owner.get("etag") and row.get("etag")
                             and owner["etag"] != row["etag"]):
            continue
        by_file[row["source_uri"]].setdefault(row["segment_index"], row)
    return by_file


def _label_orders(by_file: dict[str, dict[int, dict]],
                  closed: Sequence[str]) -> dict[str, list[str]]:
    """Each closed-set task's labels in the order of its scores (the first row that has
    them)."""
    orders: dict[str, list[str]] = {}
    for segments in by_file.values():
        for row in segments.values():
            for task in closed:
                if task not in orders and row.get(f"{task}_scores"):
                    orders[task] = list(row[f"{task}_scores"])
    return orders


# -- outcomes --------------------------------------------------------------------------------

def file_label(segments: list[dict], task: str) -> tuple[str | None, float | None]:
    """A file's label and confidence from its segments (module docstring)."""
    weights = [(s, max(float(s["end_s"]) - float(s["start_s"]), 0.0)) for s in segments
               if s.get(task) is not None]
    if not weights:
        return None, None
    if sum(w for _, w in weights) == 0:
        weights = [(s, 1.0) for s, _ in weights]
    total = sum(w for _, w in weights)
    scored = [(s[f"{task}_scores"], w) for s, w in weights if s.get(f"{task}_scores")]
    if len(scored) == len(weights):
        mean: dict[str, float] = {}
        for scores, w in scored:
            for label, p in scores.items():  # a label without a probability adds nothing
                mean[label] = mean.get(label, 0.0) + w * float(p or 0.0) / total
        label = max(mean, key=mean.__getitem__)  # ties: the first in the label set's order
        return label, mean[label]
    votes: Counter = Counter()
    for s, w in weights:
        votes[s[task]] += w
    return max(votes, key=votes.__getitem__), None


def _signals(row: dict) -> dict[str, float]:
    """The row's quality-signal values that are numbers (null and NaN left out)."""
    values = {c: row.get(c) for c in SIGNAL_COLUMNS.values()}
    return {c: float(v) for c, v in values.items() if v is not None and v == v}


def _errored(row: dict) -> Outcome:
    return Outcome(ERRORED, (row.get("error") or {}).get("kind"))


def _file_outcome(file_row: dict, segments: dict[int, dict], closed: Sequence[str]) -> Outcome:
    usable = [s for _, s in sorted(segments.items()) if s["status"] in ("ok", "silent")]
    outcome = Outcome(SCORED, values={ASR_COLUMN: file_row.get(ASR_COLUMN)},
                      signals=_signals(file_row))
    for task in closed:
        outcome.values[task], outcome.confidence[task] = file_label(usable, task)
    return outcome


def _segment_outcome(segment: dict | None, closed: Sequence[str]) -> Outcome:
    if segment is None:
        return Outcome(MISSING)
    if segment["status"] == "error":
        return _errored(segment)
    outcome = Outcome(SCORED, values={ASR_COLUMN: segment.get(ASR_COLUMN)},
                      signals=_signals(segment))
    for task in closed:
        label, scores = segment.get(task), segment.get(f"{task}_scores")
        outcome.values[task] = label
        outcome.confidence[task] = (float(scores[label]) if label is not None and scores
                                    and scores.get(label) is not None else None)
    return outcome


def _outcome(ref: Reference, files: dict[str, dict], by_file: dict[str, dict[int, dict]],
             closed: Sequence[str]) -> Outcome:
    uri = next((u for u in ref.uris() if u in files), None)
    if uri is None:
        return Outcome(MISSING)
    if files[uri]["status"] == "error":
        return _errored(files[uri])
    segments = by_file.get(uri, {})
    if ref.segment_index is None:
        return _file_outcome(files[uri], segments, closed)
    return _segment_outcome(segments.get(ref.segment_index), closed)


def collect(info: OutputInfo, refs: Sequence[Reference], tasks: Sequence[str],
            storage: StorageConfig | None = None
            ) -> tuple[Outcomes, dict[str, list[str]], dict[str, list[str]]]:
    """Each reference key's outcome in this output, the label order of each closed-set task
    (the order of its scores) and facts about the rows (`runs`, `model_ids`)."""
    fs, _ = resolve(info.uri, storage)
    uris = {u for r in refs for u in r.uris()}
    closed = [t for t in tasks if t != ASR_COLUMN]
    files = _files_rows(fs, info, uris)
    by_file = _segments_rows(fs, info, uris, files, closed)
    outcomes = {ref.key: _outcome(ref, files, by_file, closed) for ref in refs}
    facts = {"runs": sorted({r["run_id"] for r in files.values() if r.get("run_id")}),
             "model_ids": sorted({r["model_id"] for r in files.values() if r.get("model_id")})}
    return outcomes, _label_orders(by_file, closed), facts
