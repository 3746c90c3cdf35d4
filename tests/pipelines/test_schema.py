"""The output schema: the quality signals' columns, a file's signals from its segments, and
tables of earlier versions read in the current form."""

from __future__ import annotations

import pyarrow as pa
import pytest

from kimi_ops.tasks import get_task
from pipelines.schema import (SCHEMA_VERSION, file_fields, files_schema, normalized,
                              schema_version, segments_schema, to_table)
from tests.pipelines.schema_v1 import as_schema_1, as_schema_2

TASKS = [get_task("asr"), get_task("emotion"), get_task("question", question="Who speaks?")]
SIGNALS = ["transcript_avg_logprob", "transcript_min_logprob", "transcript_compression_ratio"]
SEGMENTS = [  # a whole file: two labelled segments and a silent one between them
    {"start_s": 0.0, "end_s": 3.0, "status": "ok", "speech_ratio": 0.9, "transcript": "a",
     "transcript_avg_logprob": -0.5, "transcript_min_logprob": -1.0,
     "transcript_compression_ratio": 1.0, "answer_avg_logprob": -0.2},
    {"start_s": 3.0, "end_s": 5.0, "status": "silent", "speech_ratio": 0.0,
     **get_task("asr").empty_fields()},
    {"start_s": 5.0, "end_s": 6.0, "status": "ok", "speech_ratio": 0.5, "transcript": "b",
     "transcript_avg_logprob": -2.0, "transcript_min_logprob": -4.0,
     "transcript_compression_ratio": 1.5, "answer_avg_logprob": None},
]


def test_signal_columns_follow_each_generative_tasks_fields_in_both_tables():
    segments = segments_schema(TASKS)
    names = segments.names
    assert SCHEMA_VERSION == "3"
    assert names[names.index("status") + 1] == "speech_ratio"
    assert names[names.index("transcript_looped") + 1: names.index("emotion")] == SIGNALS
    assert names[names.index("answer") + 1: names.index("answer") + 4] == [
        "answer_avg_logprob", "answer_min_logprob", "answer_compression_ratio"]
    assert all(segments.field(n).type == pa.float32() for n in SIGNALS + ["speech_ratio"])
    files = files_schema(TASKS).names
    assert files[files.index("transcript") + 1: files.index("transcript") + 8] == [
        "speech_ratio", *SIGNALS, "answer_avg_logprob", "answer_min_logprob",
        "answer_compression_ratio"]
    assert "speech_ratio" in files_schema().names and SIGNALS[0] not in files_schema().names


def test_a_files_signals_are_duration_weighted_over_the_segments_with_a_value():
    row = file_fields(SEGMENTS, [TASKS[0], TASKS[2]])
    assert row["num_segments"] == 3 and row["transcript"] == "a b"
    assert row["speech_ratio"] == pytest.approx((0.9 * 3 + 0.5 * 1) / 6)
    assert row["transcript_avg_logprob"] == pytest.approx((-0.5 * 3 - 2.0 * 1) / 4)
    assert row["transcript_min_logprob"] == -4.0
    assert row["transcript_compression_ratio"] == pytest.approx((1.0 * 3 + 1.5) / 4)
    assert row["answer_avg_logprob"] == pytest.approx(-0.2) and row["answer_compression_ratio"] is None
    table = to_table([{"source_uri": "/a.wav", "status": "ok", "run_id": "r", **row}],
                     files_schema(TASKS))
    assert table["transcript_min_logprob"].to_pylist() == [-4.0]


@pytest.mark.parametrize("version, as_old", [("1", as_schema_1), ("2", as_schema_2)])
def test_a_table_of_an_earlier_version_reads_with_the_signals_asked_for_as_nulls(version,
                                                                                as_old):
    rows = [{"source_uri": "/a.wav", "segment_index": i, "run_id": "r",
             "emotion_scores": {label: 1 / 7 for label in TASKS[1].labels}, **seg}
            for i, seg in enumerate(SEGMENTS)]
    current = to_table(rows, segments_schema(TASKS))
    old = as_old(current)
    assert schema_version(old.schema) == version and "speech_ratio" not in old.column_names
    asked = ["source_uri", "transcript", "emotion_scores", "speech_ratio", *SIGNALS]
    read = normalized(old.select([c for c in asked if c in old.column_names]), asked)
    assert set(read.column_names) == set(asked)
    for name in ("speech_ratio", *SIGNALS):
        assert read[name].type == pa.float32() and read[name].null_count == len(rows), name
    assert read["emotion_scores"].to_pylist() == current["emotion_scores"].to_pylist()
    assert normalized(current.select(asked), asked).equals(current.select(asked))
