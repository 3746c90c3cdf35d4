"""Which segments a build keeps, which split each goes to, and the rows it writes.

A segment is kept when its file has an ok row in `files/` with the same etag (segments left by a
crash or by an older version of the object are not), it is the first row of its
(source_uri, segment_index), its status is ok, it has tokens, and it passes the filters. Each
dropped row is counted under the first rule it fails (`DROP_REASONS` order).

A quality-signal filter (`SIGNAL_RULES`) that is set drops a row whose signal is null or NaN
as `no_<signal>` (an older shard, a segment the signal was not computed for: its quality is
unknown, and a build that asks for a minimum quality keeps only rows known to have it), then a
row outside the threshold as `low_<signal>` / `high_<signal>`. Values are compared in float32,
the column's precision, so a value written as the threshold itself is kept.

Split: by source file. A file goes to validation when the first 64 bits of
sha256(split_salt + NUL + source_uri), as a fraction of 2**64, fall below `validation_fraction`:
the same input always gives the same split, and no file has segments in both splits.

A row's `language` is the language its run asked the asr task for (`--language`, in the
segments' `generation` settings); null for auto, and without asr.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.signals import SIGNAL_COLUMNS
from pipelines.training_data.spec import TrainingFilters


@dataclass(frozen=True)
class SignalRule:
    """A quality-signal filter: the signal it reads and when a value is dropped."""

    signal: str  # a key of `pipelines.signals.SIGNAL_COLUMNS`
    drops: Callable  # (values, threshold) -> dropped: pc.less for a minimum, pc.greater a maximum
    reason: str  # the drop reason of a value outside the threshold

    @property
    def column(self) -> str:
        return SIGNAL_COLUMNS[self.signal]

    @property
    def no_value(self) -> str:
        """The drop reason of a null value."""
        return f"no_{self.signal}"


# TrainingFilters field -> its rule, in the order the rules are checked
SIGNAL_RULES = {
    "min_speech_ratio": SignalRule("speech_ratio", pc.less, "low_speech_ratio"),
    "min_avg_logprob": SignalRule("avg_logprob", pc.less, "low_avg_logprob"),
    "max_compression_ratio": SignalRule("compression_ratio", pc.greater,
                                        "high_compression_ratio"),
}

FORMAT_VERSION = "2"  # 2: the language column; the webdataset, lhotse and hf formats
SPLITS = ("train", "validation")
# the order in which rules are checked; a dropped row counts under the first it fails
DROP_REASONS = ("not_in_files", "duplicate", "error", "silent", "no_semantic_tokens",
                "truncated", "looped", "too_short", "too_long", "empty_transcript",
                *(reason for rule in SIGNAL_RULES.values()
                  for reason in (rule.no_value, rule.reason)))
# + "low_confidence:<task>" per task of `min_confidence`, last; then, with an export holding
# audio, "source_changed" (`pipelines.training_data.build`)
SPLIT_RULE = ("validation iff int(sha256(salt + '\\0' + source_uri)[:8 bytes]) "
              "< validation_fraction * 2**64")


def split_of(source_uri: str, validation_fraction: float, salt: str = "") -> str:
    """'train' or 'validation' for every segment of `source_uri`; deterministic."""
    digest = hashlib.sha256(f"{salt}\0{source_uri}".encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "big") < validation_fraction * 2 ** 64 \
        else "train"


def sample_key(source_uri: str, segment_index: int) -> str:
    """A segment's key: unique, and free of dots and slashes (WebDataset splits on them)."""
    return f"{hashlib.sha256(source_uri.encode()).hexdigest()[:24]}-{int(segment_index):06d}"


def output_schema(tasks: list[str]) -> pa.Schema:
    """The schema of every shard a build writes, with a label and confidence per task."""
    fields = [pa.field("key", pa.string(), nullable=False),
              pa.field("source_uri", pa.string(), nullable=False),
              pa.field("segment_index", pa.int32(), nullable=False),
              pa.field("start_s", pa.float64(), nullable=False),
              pa.field("end_s", pa.float64(), nullable=False),
              pa.field("duration_s", pa.float64(), nullable=False),
              pa.field("num_tokens", pa.int32(), nullable=False),
              pa.field("semantic_tokens", pa.list_(pa.int32()), nullable=False),
              pa.field("transcript", pa.string()),
              pa.field("language", pa.string())]
    for name in tasks:
        fields += [pa.field(name, pa.string()), pa.field(f"{name}_confidence", pa.float32())]
    fields += [pa.field("model_id", pa.string()), pa.field("run_id", pa.string())]
    return pa.schema(fields, metadata={b"kimi_label.table": b"training",
                                       b"kimi_label.training_format": FORMAT_VERSION.encode()})


def _column(table: pa.Table, name: str, type_: pa.DataType) -> pa.Array:
    """A column as one array of `type_`; all null when the shard lacks it."""
    if name in table.column_names:
        return table[name].combine_chunks().cast(type_)
    return pa.nulls(table.num_rows, type_)


def _top_probability(table: pa.Table, task: str) -> pa.Array:
    """The highest probability of each row's `<task>_scores` (a struct, as
    `source.read_segments` gives every version's); null without scores."""
    name = f"{task}_scores"
    if name not in table.column_names or not table.schema.field(name).type.num_fields:
        return pa.nulls(table.num_rows, pa.float32())
    scores = table[name].combine_chunks()
    labels = [pc.struct_field(scores, [i]) for i in range(scores.type.num_fields)]
    return pc.max_element_wise(*labels, skip_nulls=True).cast(pa.float32())


def _language(table: pa.Table) -> pa.Array:
    """The asr language of each row's run, from its `generation` JSON (null for auto)."""
    settings = _column(table, "generation", pa.string()).to_pylist()
    parsed = {text: json.loads(text).get("language") if text else None
              for text in set(settings)}
    return pa.array([None if parsed[s] == "auto" else parsed[s] for s in settings],
                    pa.string())


@dataclass
class _Derived:
    """The columns of a shard the rules and the written rows both use."""

    duration: pa.Array
    tokens: pa.Array
    transcript: pa.Array
    confidence: dict[str, pa.Array]

    @classmethod
    def of(cls, table: pa.Table, tasks: list[str]) -> _Derived:
        return cls(duration=pc.subtract(table["end_s"].combine_chunks(),
                                        table["start_s"].combine_chunks()),
                   tokens=_column(table, "semantic_tokens", pa.list_(pa.int32())),
                   transcript=_column(table, "transcript", pa.string()),
                   confidence={t: _top_probability(table, t) for t in tasks})


def signal_filters(filters: TrainingFilters) -> dict[str, SignalRule]:
    """The quality-signal filters that are set: field name -> rule."""
    return {name: rule for name, rule in SIGNAL_RULES.items()
            if getattr(filters, name) is not None}


def _signal_rules(table: pa.Table, filters: TrainingFilters) -> list[tuple[str, Any]]:
    """(reason, hit) of each quality-signal filter that is set: a null value, then a value
    outside the threshold (compared in float32, the column's type)."""
    rules = []
    for name, rule in signal_filters(filters).items():
        values = _column(table, rule.column, pa.float32())
        threshold = pa.scalar(getattr(filters, name), pa.float32())
        rules += [(rule.no_value, pc.is_null(values, nan_is_null=True)),
                  (rule.reason, rule.drops(values, threshold))]
    return rules


class Selector:
    """Applies the rules to one segments shard at a time (`selector(table)` -> the kept rows
    in `schema`); keeps the drop counts and the keys seen, so a later shard's duplicate of a
    segment is dropped."""

    def __init__(self, filters: TrainingFilters, files: dict[str, tuple[str, str | None]],
                 tasks: list[str]):
        self.filters, self.files, self.tasks = filters, files, tasks
        self.seen: set[tuple[str, int]] = set()
        self.dropped: Counter = Counter()
        self.input_rows = 0
        self.schema = output_schema(tasks)

    def __call__(self, table: pa.Table) -> pa.Table:
        self.input_rows += table.num_rows
        derived = _Derived.of(table, self.tasks)
        keep = self._apply(self._file_rules(table) + self._row_rules(table, derived),
                           table.num_rows)
        return self._kept_rows(table, derived, keep)

    def _file_rules(self, table: pa.Table) -> list[tuple[str, Any]]:
        """not_in_files, duplicate, and the file part of error: what the `files/` rows and the
        keys seen so far say about each row."""
        missing, duplicate, file_error = [], [], []
        for uri, index, etag in zip(table["source_uri"].to_pylist(),
                                    table["segment_index"].to_pylist(),
                                    _column(table, "etag", pa.string()).to_pylist()):
            status, file_etag = self.files.get(uri, (None, None))
            absent = status is None or (etag is not None and file_etag is not None
                                        and etag != file_etag)
            missing.append(absent)
            file_error.append(status not in (None, "ok"))
            duplicate.append(not absent and (uri, index) in self.seen)
            if not absent:
                self.seen.add((uri, index))
        return [("not_in_files", pa.array(missing, pa.bool_())),
                ("duplicate", pa.array(duplicate, pa.bool_())),
                ("error", pa.array(file_error, pa.bool_()))]

    def _row_rules(self, table: pa.Table, d: _Derived) -> list[tuple[str, Any]]:
        f, n = self.filters, table.num_rows
        never = pa.array([False] * n, pa.bool_())
        status = table["status"].combine_chunks()
        blank = pc.equal(pc.utf8_trim_whitespace(pc.fill_null(d.transcript, "")), "")
        return [
            ("error", pc.equal(status, "error")),
            ("silent", pc.not_equal(status, "ok")),  # silent, or any status but ok/error
            ("no_semantic_tokens", pc.or_kleene(pc.is_null(d.tokens),
                                                pc.equal(pc.list_value_length(d.tokens), 0))),
            ("truncated", _column(table, "transcript_truncated", pa.bool_())
             if f.drop_truncated else never),
            ("looped", _column(table, "transcript_looped", pa.bool_())
             if f.drop_looped else never),
            ("too_short", pc.less(d.duration, f.min_duration_s)),
            ("too_long", pc.greater(d.duration, f.max_duration_s)
             if f.max_duration_s is not None else never),
            ("empty_transcript", blank if f.require_transcript else never),
            *_signal_rules(table, f),
            *((f"low_confidence:{t}", pc.less(pc.fill_null(d.confidence[t], -1.0), minimum))
              for t, minimum in f.min_confidence.items()),
        ]

    def _apply(self, rules: list[tuple[str, Any]], n: int) -> pa.Array:
        """The rows no rule hits; each hit row is counted under the first rule that hits it."""
        keep = pa.array([True] * n, pa.bool_())
        for reason, hit in rules:
            hit = pc.and_(keep, pc.fill_null(hit, False))
            count = pc.sum(hit).as_py() or 0
            if count:
                self.dropped[reason] += count
            keep = pc.and_not(keep, hit)
        return keep

    def _kept_rows(self, table: pa.Table, d: _Derived, keep: pa.Array) -> pa.Table:
        flags = keep.to_pylist()
        uris = [u for u, k in zip(table["source_uri"].to_pylist(), flags) if k]
        indices = [i for i, k in zip(table["segment_index"].to_pylist(), flags) if k]
        columns = {
            "key": pa.array([sample_key(u, i) for u, i in zip(uris, indices)], pa.string()),
            "source_uri": pa.array(uris, pa.string()),
            "segment_index": pa.array(indices, pa.int32()),
            "start_s": table["start_s"].combine_chunks().filter(keep),
            "end_s": table["end_s"].combine_chunks().filter(keep),
            "duration_s": d.duration.filter(keep),
            "num_tokens": pc.list_value_length(d.tokens).filter(keep).cast(pa.int32()),
            "semantic_tokens": d.tokens.filter(keep),
            "transcript": d.transcript.filter(keep),
            "language": _language(table).filter(keep),
        }
        for t in self.tasks:
            columns[t] = _column(table, t, pa.string()).filter(keep)
            columns[f"{t}_confidence"] = d.confidence[t].filter(keep)
        for name in ("model_id", "run_id"):
            columns[name] = _column(table, name, pa.string()).filter(keep)
        return pa.Table.from_pydict(columns, schema=self.schema)
