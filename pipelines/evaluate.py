"""Label quality of a labelled output against reference labels, and two outputs compared.

    spec = EvaluationSpec(output="s3://audio/labels", references="s3://audio/refs.csv",
                          compare="s3://audio/labels-v0")
    plan = check_inputs(spec)          # references + output footers only; EvaluationError
    report = evaluate(spec, plan)      #   names the file and the reason
    paths = write_report(report, spec) # report.json + confusion.png under the report folder

References: one Parquet, CSV or JSON-lines file (CSV/JSONL may be .gz/.bz2/.zst/.xz), one row
per reference item, keyed by
  * `source_uri` (required): the object's URI as in the output's `files/` table; where no row
    has it exactly, as a run would spell it (`as_listed`: a relative path from the references
    file's folder, `file://` dropped, `./` and `//` parts removed);
  * `segment_index` (optional): a row with a value refers to that segment (`segments/` row), a
    row without one (the column absent, or null) to the whole file;
and holding any of the task columns `transcript` (ASR, with an optional `language`, see
`kimi_ops.evaluation.text`) and closed-set labels named like the output's closed-set tasks
(`emotion`, `scene`, `sound_event`, or a user's own task). A null value (in CSV: an empty cell)
means "no reference for this task on this row"; an empty string in Parquet/JSONL is an empty
reference transcript. Closed-set labels match the output's label set ignoring case. Other
columns are ignored (and listed in the report). A key may appear once.

A closed-set reference label outside the output's label set (the keys of its `<task>_scores`),
say `happy` where the task says `joy`, could never be predicted: such rows are left out of that
task's metrics, whatever their coverage, and reported as the task's `excluded` count with
`unknown_reference_labels` ({label as written: rows}); `kimi-label evaluate` prints them with
the task's labels. Without scores in the output the label set is unknown and every label counts.

What a reference is compared with:
  * file level: the file's `files/` row (`transcript` is the segments' stitched transcript); a
    closed-set label is the argmax of the duration-weighted mean of the `<task>_scores` of the
    file's ok and silent segments (its confidence: that mean's top value); segments without
    scores vote with their label by duration and the file's confidence is then unknown.
  * segment level: the `segments/` row (label; confidence = the score of that label).
Segments rows count only with their file's current etag, and the first row of a
(source_uri, segment_index) wins, as in the training-data build.

Coverage, per reference row: `missing` (no `files/` row, or no `segments/` row for a segment
reference), `errored` (an error row for the file or the segment, by `error.kind`) or `scored`.
Per task, a scored row whose value is null (the task did not run for it) is `unlabelled`.
Only scored, labelled rows enter the metrics.

Comparison (`compare`): both outputs are scored against the same references; each summary
metric gets `delta = output - compare`, and every reference item whose outcome differs is
listed: another closed-set label, another normalised transcript, or another coverage state.
The tasks scored are those of the output; a task the compared output lacks is scored for the
output alone and listed in the comparison's `unavailable_tasks` (its metrics have no compare
value or delta, and its items are not compared).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import posixpath
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kimi_ops.evaluation import (
    LANGUAGES,
    ErrorCounts,
    align,
    asr_language,
    calibration,
    classification_report,
    tokens,
)

log = logging.getLogger(__name__)

FORMAT = "kimi-label-evaluation"
FORMAT_VERSION = "1"
REPORT_NAME = "report.json"
CONFUSION_NAME = "confusion.png"
KEY_COLUMNS = ("source_uri", "segment_index")
ASR_COLUMN = "transcript"
LANGUAGE_COLUMN = "language"
REFERENCE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl",
                     ".ndjson": "jsonl"}
COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")
EXAMPLES = 20  # URIs listed per coverage state in the report
MISSING, ERRORED, SCORED = "missing", "errored", "scored"


class EvaluationError(Exception):
    """The evaluation cannot run; the message names the file and the reason. `retryable`: a
    storage hiccup (kind io_error) that a retry may get past, unlike bad input."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class EvaluationOptions(BaseModel):
    """What to evaluate, without where the credentials come from (the flow's parameters)."""

    model_config = ConfigDict(extra="forbid")

    output: str = Field(description="a labelled output: the URI holding files/ and segments/")
    references: str = Field(description="Parquet/CSV/JSONL keyed by source_uri[, segment_index]")
    compare: str | None = Field(None, description="another labelled output of the same inputs")
    report_dir: str | None = Field(
        None, description="where report.json and confusion.png go "
                          "(default: <output>/_evaluations/<UTC time>)")
    n_bins: int = Field(10, ge=1, le=100, description="equal-width calibration bins")


class EvaluationSpec(EvaluationOptions):
    storage_options: dict[str, Any] | None = None  # for every URI; None: the AWS_* environment

    def report_location(self, created: datetime) -> str:
        if self.report_dir:
            return self.report_dir.rstrip("/")
        return f"{self.output.rstrip('/')}/_evaluations/{created.strftime('%Y%m%dT%H%M%SZ')}"


# -- references ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    source_uri: str
    segment_index: int | None
    values: dict[str, str]  # task column -> reference value (transcript or label)
    language: str | None = None  # "en" | "zh" for a transcript
    # `source_uri` as a run spells the object (`as_listed`), tried when the exact one is absent
    listed_uri: str | None = None

    @property
    def key(self) -> tuple[str, int | None]:
        return self.source_uri, self.segment_index

    def uris(self) -> tuple[str, ...]:
        return (self.source_uri,) + ((self.listed_uri,) if self.listed_uri else ())


def as_listed(source: str, references_uri: str) -> str | None:
    """A reference's object spelled as a run's `files/` rows spell it, when that differs: a
    local path absolute and normalised (`file://` dropped; a relative one taken from the
    references file's folder, as a manifest's entries are), an S3 key without `//` or `./`
    parts. None when it is already so."""
    import os

    text = source
    for local in ("file://localhost/", "file://"):
        if text.startswith(local):
            text = "/" + text[len(local):].lstrip("/") if local.endswith("/") else text[7:]
            break
    scheme, sep, rest = text.partition("://")
    base = (references_uri[len("file://"):] if references_uri.startswith("file://")
            else references_uri)
    base_scheme, base_sep, base_rest = base.partition("://")
    if sep or (base_sep and not posixpath.isabs(text)):
        if not sep:  # relative to the references file's folder, in its bucket
            scheme, rest = base_scheme, posixpath.join(posixpath.dirname(base_rest), text)
        bucket, _, key = rest.partition("/")
        key = posixpath.normpath(key) if key.strip("/") else ""
        if not key or key == ".." or key.startswith("../"):
            return None  # nothing, or above the bucket: no object a run lists
        spelled = f"{scheme}://{bucket}/{key}"
    else:
        text = os.path.expanduser(text)
        folder = os.path.dirname(os.path.abspath(base))
        spelled = os.path.normpath(text if os.path.isabs(text) else os.path.join(folder, text))
    return spelled if spelled != source else None


def _format(path: str) -> str | None:
    lowered = path.lower()
    for suffix in COMPRESSIONS:
        if lowered.endswith(suffix):
            lowered = lowered[: -len(suffix)]
            break
    return REFERENCE_FORMATS.get(posixpath.splitext(lowered)[1])


def _raw_rows(uri: str, storage_options) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the references file, values as stored (CSV: strings, '' -> None)."""
    from pipelines.storage import StorageError, resolve, storage_error

    fmt = _format(uri.split("?", 1)[0])
    if fmt is None:
        raise EvaluationError(f"references {uri}: unknown format (expected .parquet, .csv or "
                              ".jsonl, optionally compressed)")
    try:
        fs, path = resolve(uri, storage_options)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as handle:
                table = pq.read_table(handle)
            return table.column_names, table.to_pylist()
        with fs.open(path, "rb", compression="infer") as handle:
            text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
            if fmt == "csv":
                reader = csv.DictReader(text)
                rows = [{k: (v if v != "" else None) for k, v in row.items() if k is not None}
                        for row in reader]
                return list(reader.fieldnames or []), rows
            rows, columns = [], {}
            for number, line in enumerate(text, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EvaluationError(f"references {uri}: line {number}: not JSON "
                                          f"({exc.msg})") from None
                if not isinstance(row, dict):
                    raise EvaluationError(f"references {uri}: line {number}: expected a JSON "
                                          "object")
                columns.update(dict.fromkeys(row))
                rows.append(row)
            return list(columns), rows
    except EvaluationError:
        raise
    except (UnicodeDecodeError, csv.Error, EOFError) as exc:
        raise EvaluationError(f"references {uri}: unreadable {fmt} ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - storage and parquet errors come from many places
        if type(exc).__module__.startswith("pyarrow"):
            raise EvaluationError(f"references {uri}: unreadable {fmt} ({exc})") from None
        err = exc if isinstance(exc, StorageError) else storage_error(
            exc, uri, storage_options, "read references")
        raise EvaluationError(f"references {uri}: {err.kind}: {err.reason}",
                              retryable=err.kind == "io_error") from None


def _segment_index(value: Any, uri: str, number: int) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        index = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        index = None
    if index is None or index < 0 or isinstance(value, bool):
        raise EvaluationError(f"references {uri}: row {number}: segment_index {value!r} is not "
                              "a non-negative integer")
    return index


def parse_references(uri: str, rows: Sequence[Mapping[str, Any]],
                     tasks: Sequence[str]) -> list[Reference]:
    """The rows (as read from `uri`) that hold a value for at least one of `tasks`, in order."""
    refs, seen = [], {}
    for number, row in enumerate(rows, start=1):
        source = row.get("source_uri")
        if not isinstance(source, str) or not source.strip():
            raise EvaluationError(f"references {uri}: row {number}: empty or non-text "
                                  "source_uri")
        index = _segment_index(row.get("segment_index"), uri, number)
        values = {t: str(row[t]) if t == ASR_COLUMN else str(row[t]).strip()
                  for t in tasks if row.get(t) is not None}
        values = {t: v for t, v in values.items() if v or t == ASR_COLUMN}
        if not values:
            continue
        key = (source.strip(), index)
        if key in seen:
            where = f"segment {index} of " if index is not None else ""
            raise EvaluationError(f"references {uri}: row {number}: {where}{key[0]} is already "
                                  f"referenced in row {seen[key]}")
        seen[key] = number
        language = None
        if ASR_COLUMN in values:
            declared = row.get(LANGUAGE_COLUMN)
            try:
                language = asr_language(values[ASR_COLUMN],
                                        None if declared is None else str(declared))
            except ValueError as exc:
                raise EvaluationError(f"references {uri}: row {number}: {exc}") from None
        refs.append(Reference(key[0], index, values, language, as_listed(key[0], uri)))
    return refs


# -- outputs ---------------------------------------------------------------------------------

@dataclass
class OutputInfo:
    """What an output holds, from its Parquet footers only."""

    uri: str
    files_shards: list[str]
    segments_shards: list[str]
    closed_set: list[str]  # tasks with `<task>` and `<task>_scores` columns
    has_transcript: bool
    segment_columns: set[str] = field(default_factory=set)


def _parquet_files(fs, folder: str) -> list[str]:
    if not fs.exists(folder):
        return []
    return sorted(p for p in fs.find(folder) if p.endswith(".parquet"))


def _metadata_tasks(schema) -> dict[str, str]:
    raw = (schema.metadata or {}).get(b"kimi_label.task_versions")
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


def inspect_output(uri: str, storage_options: Mapping[str, Any] | None = None,
                   role: str = "output") -> OutputInfo:
    """The output's shards and tasks; `role` ("output" | "compare") starts every message."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.storage import StorageError, resolve, storage_error

    try:
        fs, root = resolve(uri, storage_options)
        files = _parquet_files(fs, f"{root}/files")
        segments = _parquet_files(fs, f"{root}/segments")
        if not files:
            raise EvaluationError(f"{role} {uri}: no files/*.parquet under it (not a kimi-label "
                                  "output, or nothing labelled yet)")
        columns: set[str] = set()
        map_columns: set[str] = set()
        task_names: set[str] = set()
        for path in segments:
            with fs.open(path, "rb") as handle:
                schema = pq.read_schema(handle)
            columns.update(schema.names)
            map_columns.update(f.name for f in schema if pa.types.is_map(f.type))
        if not segments:  # every file failed: the tasks are in the files tables' metadata
            for path in files:
                with fs.open(path, "rb") as handle:
                    task_names.update(_metadata_tasks(pq.read_schema(handle)))
    except EvaluationError:
        raise
    except Exception as exc:  # noqa: BLE001
        err = exc if isinstance(exc, StorageError) else storage_error(
            exc, uri, storage_options, "read output")
        raise EvaluationError(f"{role} {uri}: {err.kind}: {err.reason}",
                              retryable=err.kind == "io_error") from None
    closed = sorted(c for c in columns if f"{c}_scores" in map_columns)
    closed += sorted(_choice_tasks(task_names) - set(closed))
    has_transcript = ASR_COLUMN in columns or "asr" in task_names
    return OutputInfo(uri, files, segments, closed, has_transcript, columns)


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


def _read_rows(fs, shards: Sequence[str], columns: Sequence[str], uris: set[str]):
    """Rows of `shards` whose source_uri is in `uris`, with the `columns` each shard has; map
    columns become dicts."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    wanted = pa.array(sorted(uris), pa.string())
    for path in shards:
        with fs.open(path, "rb") as handle:
            pf = pq.ParquetFile(handle)
            schema = pf.schema_arrow
            present = [c for c in columns if c in schema.names]
            table = pf.read(columns=present)
        table = table.filter(pc.is_in(table["source_uri"], value_set=wanted))
        maps = [f.name for f in schema if f.name in present and pa.types.is_map(f.type)]
        for row in table.to_pylist():
            for name in maps:
                if row[name] is not None:
                    row[name] = dict(row[name])
            yield row


@dataclass
class Outcome:
    """One reference item as an output has it."""

    state: str  # scored | missing | errored
    error_kind: str | None = None
    values: dict[str, Any] = field(default_factory=dict)  # task column -> hypothesis/label
    confidence: dict[str, float | None] = field(default_factory=dict)
    label_order: dict[str, list[str]] = field(default_factory=dict)


def _file_label(segments: list[dict], task: str) -> tuple[str | None, float | None]:
    """A file's label from its segments: see the module doc."""
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
            for label, p in scores.items():
                mean[label] = mean.get(label, 0.0) + w * float(p) / total
        label = max(mean, key=mean.__getitem__)  # ties: the first in the label set's order
        return label, mean[label]
    votes: Counter = Counter()
    for s, w in weights:
        votes[s[task]] += w
    return max(votes, key=votes.__getitem__), None


def collect(info: OutputInfo, refs: Sequence[Reference], tasks: Sequence[str],
            storage_options: Mapping[str, Any] | None = None
            ) -> tuple[dict[tuple[str, int | None], Outcome], dict[str, list[str]], dict]:
    """Each reference key's outcome in this output, the label order of each closed-set task
    (the order of its scores map) and facts about the rows (runs, models)."""
    from pipelines.storage import resolve

    fs, _ = resolve(info.uri, storage_options)
    uris = {u for r in refs for u in r.uris()}
    closed = [t for t in tasks if t != ASR_COLUMN]
    files: dict[str, dict] = {}
    duplicated = 0
    for row in _read_rows(fs, info.files_shards, ["source_uri", "status", "error", "etag",
                                                  ASR_COLUMN, "run_id", "model_id"], uris):
        if row["source_uri"] in files:
            duplicated += 1
            continue
        files[row["source_uri"]] = row
    if duplicated:
        log.warning("output %s: %d duplicated files/ rows; the first of each counts",
                    info.uri, duplicated)
    segment_columns = ["source_uri", "segment_index", "start_s", "end_s", "status", "error",
                       "etag", ASR_COLUMN, *closed, *(f"{t}_scores" for t in closed)]
    by_file: dict[str, dict[int, dict]] = defaultdict(dict)
    for row in _read_rows(fs, info.segments_shards, segment_columns, uris):
        owner = files.get(row["source_uri"])
        if owner is None or (owner.get("etag") and row.get("etag")
                             and owner["etag"] != row["etag"]):
            continue
        by_file[row["source_uri"]].setdefault(row["segment_index"], row)

    label_order: dict[str, list[str]] = {}
    for segs in by_file.values():
        for row in segs.values():
            for task in closed:
                if task not in label_order and row.get(f"{task}_scores"):
                    label_order[task] = list(row[f"{task}_scores"])

    outcomes = {}
    for ref in refs:
        uri = next((u for u in ref.uris() if u in files), None)
        if uri is None:
            outcomes[ref.key] = Outcome(MISSING)
            continue
        file_row = files[uri]
        if file_row["status"] == "error":
            outcomes[ref.key] = Outcome(ERRORED, (file_row.get("error") or {}).get("kind"))
            continue
        segments = by_file.get(uri, {})
        if ref.segment_index is None:
            usable = [s for _, s in sorted(segments.items()) if s["status"] in ("ok", "silent")]
            outcome = Outcome(SCORED, values={ASR_COLUMN: file_row.get(ASR_COLUMN)})
            for task in closed:
                outcome.values[task], outcome.confidence[task] = _file_label(usable, task)
        else:
            seg = segments.get(ref.segment_index)
            if seg is None:
                outcomes[ref.key] = Outcome(MISSING)
                continue
            if seg["status"] == "error":
                outcomes[ref.key] = Outcome(ERRORED, (seg.get("error") or {}).get("kind"))
                continue
            outcome = Outcome(SCORED, values={ASR_COLUMN: seg.get(ASR_COLUMN)})
            for task in closed:
                label, scores = seg.get(task), seg.get(f"{task}_scores")
                outcome.values[task] = label
                outcome.confidence[task] = (float(scores[label]) if label is not None and scores
                                            and label in scores else None)
        outcomes[ref.key] = outcome
    facts = {"runs": sorted({r["run_id"] for r in files.values() if r.get("run_id")}),
             "model_ids": sorted({r["model_id"] for r in files.values() if r.get("model_id")})}
    return outcomes, label_order, facts


# -- checks ----------------------------------------------------------------------------------

@dataclass
class EvaluationPlan:
    references: list[Reference]
    tasks: list[str]  # task columns scored: "transcript" and/or closed-set task names
    ignored_columns: list[str]
    outputs: list[OutputInfo]  # the output, then the compared output when there is one
    created: datetime
    report_dir: str
    compare_unavailable: list[str] = field(default_factory=list)  # tasks `compare` lacks

    def tasks_of(self, index: int) -> list[str]:
        """The tasks scored in `outputs[index]`."""
        skipped = self.compare_unavailable if index else []
        return [t for t in self.tasks if t not in skipped]


def check_inputs(spec: EvaluationSpec) -> EvaluationPlan:
    """Everything that can be refused, refused before any table is read: the references file
    (format, key column, at least one task column the output has), the outputs (Parquet
    footers only) and write access to the report folder."""
    from pipelines.storage import StorageError, check_output

    created = datetime.now(timezone.utc)
    columns, rows = _raw_rows(spec.references, spec.storage_options)
    if "source_uri" not in columns:
        raise EvaluationError(f"references {spec.references}: no source_uri column "
                              f"(columns: {columns})")
    outputs = [inspect_output(spec.output, spec.storage_options)]
    if spec.compare:
        if spec.compare.rstrip("/") == spec.output.rstrip("/"):
            raise EvaluationError(f"compare {spec.compare}: the same output as --output")
        outputs.append(inspect_output(spec.compare, spec.storage_options, "compare"))
    def scorable(info: OutputInfo) -> list[str]:
        return [t for t in ([ASR_COLUMN] if info.has_transcript else []) + info.closed_set
                if t in columns]

    available = ([ASR_COLUMN] if outputs[0].has_transcript else []) + outputs[0].closed_set
    tasks = scorable(outputs[0])
    if not tasks:
        raise EvaluationError(
            f"references {spec.references}: no task column the output can be scored on "
            f"(reference columns: {columns}; output tasks: {available or 'none'})")
    unavailable = [t for t in tasks if t not in scorable(outputs[-1])] if spec.compare else []
    ignored = [c for c in columns
               if c not in tasks and c not in (*KEY_COLUMNS, LANGUAGE_COLUMN)]
    references = parse_references(spec.references, rows, tasks)
    if not references:
        raise EvaluationError(f"references {spec.references}: no row holds a value for "
                              f"{', '.join(tasks)}")
    report_dir = spec.report_location(created)
    try:
        check_output(report_dir, spec.storage_options)
    except StorageError as err:
        raise EvaluationError(f"report folder {err.uri}: {err.kind}: {err.reason}",
                              retryable=err.kind == "io_error") from None
    return EvaluationPlan(references, tasks, ignored, outputs, created, report_dir, unavailable)


# -- scoring ---------------------------------------------------------------------------------

def _coverage(refs: Sequence[Reference], outcomes) -> dict[str, Any]:
    states = Counter(outcomes[r.key].state for r in refs)
    kinds = Counter(outcomes[r.key].error_kind or "unknown" for r in refs
                    if outcomes[r.key].state == ERRORED)

    def examples(state):
        return [{"source_uri": r.source_uri, "segment_index": r.segment_index,
                 **({"error_kind": outcomes[r.key].error_kind} if state == ERRORED else {})}
                for r in refs if outcomes[r.key].state == state][:EXAMPLES]

    return {"references": len(refs), SCORED: states[SCORED], MISSING: states[MISSING],
            ERRORED: states[ERRORED], "errors_by_kind": dict(sorted(kinds.items())),
            "missing_examples": examples(MISSING), "errored_examples": examples(ERRORED)}


def _asr_report(refs: Sequence[Reference], outcomes) -> dict[str, Any]:
    rows, totals = [], {lang: ErrorCounts() for lang in LANGUAGES}
    utterances: Counter = Counter()
    counts = Counter()
    for ref in refs:
        if ASR_COLUMN not in ref.values:
            continue
        counts["references"] += 1
        outcome = outcomes[ref.key]
        if outcome.state != SCORED:
            continue
        hypothesis = outcome.values.get(ASR_COLUMN)
        if hypothesis is None:
            counts["unlabelled"] += 1
            continue
        counts["scored"] += 1
        ref_tokens = tokens(ref.values[ASR_COLUMN], ref.language)
        hyp_tokens = tokens(hypothesis, ref.language)
        errors = align(ref_tokens, hyp_tokens)
        totals[ref.language] += errors
        utterances[ref.language] += 1
        joiner = "" if ref.language == "zh" else " "
        rows.append({"source_uri": ref.source_uri, "segment_index": ref.segment_index,
                     "language": ref.language, "metric": LANGUAGES[ref.language],
                     **errors.to_dict(), "reference": joiner.join(ref_tokens),
                     "hypothesis": joiner.join(hyp_tokens)})
    by_language = {lang: {"metric": LANGUAGES[lang], "utterances": utterances[lang],
                          **totals[lang].to_dict()}
                   for lang in LANGUAGES if utterances[lang]}
    return {"kind": "asr", "references": counts["references"], "scored": counts["scored"],
            "unlabelled": counts["unlabelled"], "by_language": by_language, "rows": rows}


def _closed_set_report(task: str, refs: Sequence[Reference], outcomes,
                       label_order: Sequence[str], n_bins: int) -> dict[str, Any]:
    canonical = {label.casefold(): label for label in label_order}
    rows, counts, unknown = [], Counter(), Counter()
    for ref in refs:
        if task not in ref.values:
            continue
        counts["references"] += 1
        if canonical and ref.values[task].casefold() not in canonical:
            unknown[ref.values[task]] += 1  # never predictable: it would only lower the scores
            continue
        outcome = outcomes[ref.key]
        if outcome.state != SCORED:
            continue
        predicted = outcome.values.get(task)
        if predicted is None:
            counts["unlabelled"] += 1
            continue
        counts["scored"] += 1
        reference = canonical.get(ref.values[task].casefold(), ref.values[task])
        rows.append({"source_uri": ref.source_uri, "segment_index": ref.segment_index,
                     "reference": reference, "predicted": predicted,
                     "confidence": outcome.confidence.get(task),
                     "correct": reference == predicted})
    report = classification_report([r["reference"] for r in rows],
                                   [r["predicted"] for r in rows], label_order)
    with_conf = [r for r in rows if r["confidence"] is not None]
    cal = calibration([r["confidence"] for r in with_conf], [r["correct"] for r in with_conf],
                      n_bins) if with_conf else None
    return {"kind": "closed_set", "references": counts["references"], "scored": counts["scored"],
            "unlabelled": counts["unlabelled"], "excluded": sum(unknown.values()),
            **report.to_dict(), "calibration": cal.to_dict() if cal else None,
            "calibration_items": len(with_conf), "known_labels": list(label_order),
            "unknown_reference_labels": dict(sorted(unknown.items())), "rows": rows}


def score(refs: Sequence[Reference], tasks: Sequence[str], outcomes,
          label_order: Mapping[str, Sequence[str]], n_bins: int = 10) -> dict[str, Any]:
    """Coverage and per-task metrics of one output's outcomes."""
    out = {"coverage": _coverage(refs, outcomes), "tasks": {}}
    for task in tasks:
        out["tasks"][task] = (_asr_report(refs, outcomes) if task == ASR_COLUMN
                              else _closed_set_report(task, refs, outcomes,
                                                      label_order.get(task, []), n_bins))
    return out


def summary_metrics(scored: Mapping[str, Any]) -> dict[str, float | int | None]:
    """The headline numbers of one output's scores, flat: what a comparison takes deltas of."""
    cov = scored["coverage"]
    flat: dict[str, float | int | None] = {f"coverage.{k}": cov[k]
                                           for k in (SCORED, MISSING, ERRORED)}
    for task, rep in scored["tasks"].items():
        if rep["kind"] == "asr":
            for lang, agg in rep["by_language"].items():
                prefix = f"asr.{agg['metric']}.{lang}"
                flat[prefix] = agg["rate"]
                for k in ("substitutions", "deletions", "insertions", "reference_length"):
                    flat[f"{prefix}.{k}"] = agg[k]
        else:
            flat[f"{task}.accuracy"] = rep["accuracy"]
            flat[f"{task}.macro_f1"] = rep["macro_f1"]
            flat[f"{task}.ece"] = rep["calibration"]["ece"] if rep["calibration"] else None
    return flat


def _hypothesis(ref: Reference, task: str, outcome: Outcome) -> Any:
    """What a comparison compares: the label, the normalised transcript, or the state."""
    if outcome.state != SCORED:
        return f"<{outcome.state}{': ' + outcome.error_kind if outcome.error_kind else ''}>"
    value = outcome.values.get(task)
    if value is None:
        return "<unlabelled>"
    if task == ASR_COLUMN:
        return ("" if ref.language == "zh" else " ").join(tokens(value, ref.language))
    return value


def compare_outcomes(refs: Sequence[Reference], tasks: Sequence[str], outcomes, other_outcomes,
                     metrics: Mapping[str, Any], other_metrics: Mapping[str, Any],
                     other_uri: str) -> dict[str, Any]:
    deltas = []
    for name in dict.fromkeys([*metrics, *other_metrics]):
        a, b = metrics.get(name), other_metrics.get(name)
        deltas.append({"metric": name, "output": a, "compare": b,
                       "delta": a - b if a is not None and b is not None else None})
    changed, per_task = [], Counter()
    for ref in refs:
        for task in tasks:
            if task not in ref.values:
                continue
            mine = _hypothesis(ref, task, outcomes[ref.key])
            theirs = _hypothesis(ref, task, other_outcomes[ref.key])
            if mine != theirs:
                per_task[task] += 1
                changed.append({"source_uri": ref.source_uri, "segment_index": ref.segment_index,
                                "task": task, "output": mine, "compare": theirs})
    return {"compare": other_uri, "deltas": deltas,
            "changed_by_task": {t: per_task[t] for t in tasks},
            "changed_files": sorted({c["source_uri"] for c in changed}), "changed": changed}


def evaluate(spec: EvaluationSpec, plan: EvaluationPlan | None = None) -> dict[str, Any]:
    """The report (JSON-ready); `check_inputs` first when no plan is given."""
    plan = plan or check_inputs(spec)
    refs, tasks = plan.references, plan.tasks
    results = []
    for index, info in enumerate(plan.outputs):
        mine = plan.tasks_of(index)
        outcomes, label_order, facts = collect(info, refs, mine, spec.storage_options)
        results.append((outcomes, score(refs, mine, outcomes, label_order, spec.n_bins), facts))
    outcomes, scored, facts = results[0]
    levels = Counter("segment" if r.segment_index is not None else "file" for r in refs)
    report = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "created_at": plan.created.isoformat(timespec="seconds"),
              "output": spec.output, "references": spec.references,
              "report_dir": plan.report_dir, "tasks": tasks,
              "reference_rows": len(refs), "levels": {k: levels[k] for k in ("file", "segment")},
              "ignored_reference_columns": plan.ignored_columns,
              "output_runs": facts["runs"], "model_ids": facts["model_ids"],
              "coverage": scored["coverage"], "metrics": summary_metrics(scored),
              "results": scored["tasks"], "comparison": None}
    if len(results) > 1:
        other_outcomes, other_scored, other_facts = results[1]
        report["comparison"] = {
            **compare_outcomes(refs, plan.tasks_of(1), outcomes, other_outcomes,
                               report["metrics"], summary_metrics(other_scored), spec.compare),
            "unavailable_tasks": plan.compare_unavailable,
            "compare_runs": other_facts["runs"], "compare_model_ids": other_facts["model_ids"],
            "compare_coverage": other_scored["coverage"]}
    return report


# -- presenting ------------------------------------------------------------------------------

def summary_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per headline metric (with the compared output's value and the delta when the
    report has a comparison): the CLI's table and the flow's table artifact."""
    comparison = report.get("comparison")
    if comparison:
        return [{"metric": d["metric"], "output": _round(d["output"]),
                 "compare": _round(d["compare"]), "delta": _round(d["delta"])}
                for d in comparison["deltas"]]
    return [{"metric": name, "value": _round(value)} for name, value in report["metrics"].items()]


def _round(value):
    return round(value, 4) if isinstance(value, float) else value


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [[("-" if row[c] is None else str(row[c])) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    body = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w)
                      in enumerate(zip(r, widths))) for r in cells]
    return "\n".join([line.rstrip(), "  ".join("-" * w for w in widths), *body])


def excluded_label_warnings(report: dict) -> list[str]:
    """Per closed-set task with reference labels outside its label set: what was left out of
    scoring, and the labels the task has (printed by the command, shown by the flow)."""
    warnings = []
    for task, rep in report["results"].items():
        if rep.get("unknown_reference_labels"):
            unknown = ", ".join(f"{label!r} ({n})"
                                for label, n in rep["unknown_reference_labels"].items())
            warnings.append(f"{task}: {rep['excluded']} reference items left out of scoring, "
                            f"their labels are not in the task's label set: {unknown}; "
                            f"{task} labels: {', '.join(rep['known_labels'])}")
    return warnings


def format_summary(report: Mapping[str, Any]) -> str:
    """What `kimi-label evaluate` prints: the metrics table, coverage, changes, file URIs."""
    coverage = report["coverage"]
    lines = [format_table(summary_rows(report)), "",
             (f"{coverage['references']} reference items: {coverage['scored']} scored, "
              f"{coverage['missing']} missing, {coverage['errored']} errored")]
    comparison = report.get("comparison")
    if comparison:
        lines.append(f"{len(comparison['changed'])} items changed in "
                     f"{len(comparison['changed_files'])} files (vs {comparison['compare']})")
        if comparison.get("unavailable_tasks"):
            lines.append(f"not compared: {', '.join(comparison['unavailable_tasks'])} "
                         f"({comparison['compare']} has no such labels; the output's metrics "
                         "are shown alone)")
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


def confusion_png(report: Mapping[str, Any]) -> bytes | None:
    """One confusion-matrix panel per closed-set task (rows: reference, columns: predicted);
    None when no closed-set task has scored items."""
    panels = [(task, rep) for task, rep in report["results"].items()
              if rep["kind"] == "closed_set" and rep["count"]]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    sizes = [max(4.5, 0.5 * len(rep["labels"]) + 2.5) for _, rep in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(sizes), max(sizes)), squeeze=False)
    try:
        for ax, (task, rep) in zip(axes[0], panels):
            matrix, labels = rep["confusion"], rep["labels"]
            ax.imshow(matrix, cmap="Blues", vmin=0)
            ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
            ax.set_yticks(range(len(labels)), labels)
            ax.set_xlabel("predicted")
            ax.set_ylabel("reference")
            ax.set_title(f"{task}\naccuracy {rep['accuracy']:.3f}, macro-F1 {rep['macro_f1']:.3f}",
                         fontsize=10)
            peak = max(max(row) for row in matrix) or 1
            for i, row in enumerate(matrix):
                for j, n in enumerate(row):
                    ax.text(j, i, str(n), ha="center", va="center",
                            color="white" if n > peak / 2 else "black")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def write_report(report: dict[str, Any], spec: EvaluationSpec) -> dict[str, str | None]:
    """`report.json` and (with a closed-set task) `confusion.png` under `report["report_dir"]`;
    their URIs, also recorded in the report as `files`."""
    from pipelines.storage import StorageError, resolve, storage_error

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
    except Exception as exc:  # noqa: BLE001
        err = exc if isinstance(exc, StorageError) else storage_error(
            exc, folder, spec.storage_options, "write report")
        raise EvaluationError(f"report folder {folder}: {err.kind}: {err.reason}",
                              retryable=err.kind == "io_error") from None
    return paths
