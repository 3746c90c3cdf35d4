"""Evaluation against reference labels: metrics with hand-computed expectations, scoring of a
hand-made labelled output (coverage, file/segment joins, comparison), the CLI and the flow."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kimi_ops.evaluation import (
    ErrorCounts,
    align,
    asr_language,
    calibration,
    classification_report,
    normalize_chinese,
    transcript_errors,
)
# imported here, not in a test: Prefect sets up its console logging on import, and inside a
# test using capsys it would keep writing to that test's closed stream
from flows.evaluate import report_markdown
from kimi_ops.tasks import ChoiceTask, get_task
from pipelines.evaluation import EvaluationError, EvaluationSpec, check_inputs, evaluate
from pipelines.schema import files_schema, segments_schema, to_table
from tests.s3_fixtures import s3_prefix, seaweed  # noqa: F401

# -- ASR metrics -----------------------------------------------------------------------------


@pytest.mark.parametrize("reference, hypothesis, expected", [
    # one word dropped: D=1 of N=6
    ("the cat sat on the mat", "the cat sat on mat", (0, 1, 0, 6, 5)),
    # one word added: I=1 of N=2
    ("hello world", "hello there world", (0, 0, 1, 2, 3)),
    # one word swapped: S=1 of N=3
    ("a b c", "a x c", (1, 0, 0, 3, 3)),
    # case, punctuation, fillers and spellings are normalised away (Whisper's normaliser)
    # (both become "hello world mister smith is color": 6 words)
    ("Hello, World! Mr. Smith's colour.", "uh hello world mister smith's color", (0, 0, 0, 6, 6)),
    # empty hypothesis: every reference word is a deletion
    ("red green blue", "", (0, 3, 0, 3, 0)),
    # empty reference: every hypothesis word is an insertion
    ("", "good morning", (0, 0, 2, 0, 2)),
    ("", "", (0, 0, 0, 0, 0)),
])
def test_word_errors_on_known_pairs(reference, hypothesis, expected):
    counts = transcript_errors(reference, hypothesis, "en")
    assert (counts.substitutions, counts.deletions, counts.insertions, counts.reference_length,
            counts.hypothesis_length) == expected
    assert counts.hits == expected[3] - expected[0] - expected[1]


def test_rates_and_the_empty_reference_rule():
    assert transcript_errors("the cat sat on the mat", "the cat sat on mat", "en").rate \
        == pytest.approx(1 / 6)
    assert transcript_errors("hello world", "hello there world", "en").rate == 0.5
    assert transcript_errors("red green blue", "", "en").rate == 1.0  # 3 deletions / 3
    assert transcript_errors("", "good morning", "en").rate is None  # 2 insertions / 0: undefined
    assert transcript_errors("", "", "en").rate == 0.0


def test_corpus_rate_sums_edits_over_summed_reference_length():
    a = align(["a", "b"], ["a", "x"])  # 1 substitution of 2 words: rate 0.5
    b = align(list("cdefghij"), list("cdefghij"))  # 0 of 8
    total = a + b
    assert total == ErrorCounts(substitutions=1, reference_length=10, hypothesis_length=10)
    assert total.rate == 0.1  # 1 / (2 + 8), not the mean of the rates (0.5 + 0) / 2 = 0.25
    only_insertions = align([], ["x"]) + align([], [])
    assert only_insertions.insertions == 1 and only_insertions.rate is None
    assert (align([], []) + align([], [])).rate == 0.0


def test_character_errors_for_chinese():
    assert normalize_chinese("你好，世界！ ＡＢＣ　１２３。") == "你好世界abc123"  # full-width too
    # 你好世界 vs 你好世届: one substitution of 4 characters
    counts = transcript_errors("你好，世界！", "你好 世届", "zh")
    assert (counts.substitutions, counts.deletions, counts.insertions) == (1, 0, 0)
    assert counts.rate == 0.25
    assert transcript_errors("你好", "", "zh").deletions == 2
    empty_ref = transcript_errors("。", "好的", "zh")  # punctuation only: an empty reference
    assert (empty_ref.insertions, empty_ref.reference_length, empty_ref.rate) == (2, 0, None)


def test_which_metric_a_reference_gets():
    assert asr_language("hello", "zh-CN") == "zh"  # a declared language wins
    assert asr_language("你好", "EN_us") == "en"
    assert asr_language("今天 is sunny", None) == "zh"  # any Han character: Chinese
    assert asr_language("naïve café", "auto") == "en"
    assert asr_language("", None) == "en"
    with pytest.raises(ValueError, match="'fr' is not supported"):
        asr_language("bonjour", "fr")


# -- closed-set metrics ----------------------------------------------------------------------

def test_accuracy_macro_f1_and_confusion_on_a_known_table():
    refs = ["joy", "joy", "joy", "anger", "anger", "neutral"]
    preds = ["joy", "joy", "anger", "anger", "neutral", "neutral"]
    report = classification_report(refs, preds, ("neutral", "joy", "anger", "fear"))
    # "fear" is in the label set but neither a reference nor a prediction: not a row or column
    assert report.labels == ("neutral", "joy", "anger")
    assert report.confusion == ((1, 0, 0),   # reference neutral
                                (0, 2, 1),   # reference joy: one predicted anger
                                (1, 0, 1))   # reference anger: one predicted neutral
    assert report.accuracy == pytest.approx(4 / 6)
    # F1 = 2TP / (2TP + FP + FN): neutral 2/(2+1+0), joy 4/(4+0+1), anger 2/(2+1+1)
    assert report.per_label["neutral"].f1 == pytest.approx(2 / 3)
    assert report.per_label["joy"].f1 == pytest.approx(4 / 5)
    assert report.per_label["anger"].f1 == pytest.approx(1 / 2)
    assert report.per_label["joy"].precision == 1.0
    assert report.per_label["joy"].recall == pytest.approx(2 / 3)
    assert report.macro_f1 == pytest.approx((2 / 3 + 4 / 5 + 1 / 2) / 3)  # = 59/90
    empty = classification_report([], [])
    assert empty.accuracy is None and empty.macro_f1 is None and empty.labels == ()


def test_expected_calibration_error_on_known_scores():
    # 5 bins of width 0.2:
    #   [0.8, 1.0]: 0.95 T, 0.85 T -> confidence 0.9,   accuracy 1.0, gap 0.1
    #   [0.6, 0.8): 0.75 F, 0.65 T -> confidence 0.7,   accuracy 0.5, gap 0.2
    #   [0.2, 0.4): 0.30 F, 0.35 T -> confidence 0.325, accuracy 0.5, gap 0.175
    # ECE = 2/6 * 0.1 + 2/6 * 0.2 + 2/6 * 0.175 = 0.95 / 6
    cal = calibration([0.95, 0.85, 0.75, 0.65, 0.30, 0.35],
                      [True, True, False, True, False, True], n_bins=5)
    assert cal.ece == pytest.approx(0.95 / 6)
    assert [b.count for b in cal.bins] == [0, 2, 0, 2, 2]
    assert cal.bins[4].mean_confidence == pytest.approx(0.9) and cal.bins[4].accuracy == 1.0
    assert cal.bins[1].mean_confidence == pytest.approx(0.325)
    assert cal.bins[0].mean_confidence is None
    edges = calibration([0.0, 1.0, 1.00001], [False, True, True], n_bins=10)
    assert [b.count for b in edges.bins] == [1] + [0] * 8 + [2]  # 1.0 sits in the last bin
    assert edges.ece == 0.0
    assert calibration([], []).ece is None
    with pytest.raises(ValueError, match="not a probability"):
        calibration([1.5], [True])


# -- a hand-made labelled output -------------------------------------------------------------

LABELS = ("neutral", "joy", "anger")
# the output's closed-set task: emotion, with a label set of three to keep the sums by hand short
TASKS = [get_task("asr"), ChoiceTask(name="emotion", version="emotion-test",
                                     question="Which emotion?", labels=LABELS)]
A, B, C, D, E, F, G, H, I = (f"s3://audio/in/{x}.wav" for x in "abcdefghi")  # noqa: E741


def emotion(label: str, p: float) -> dict[str, float]:
    return {x: (p if x == label else (1 - p) / 2) for x in LABELS}  # top = p for p > 1/3


def file_row(uri, transcript=None, status="ok", kind=None, etag=None, run="run-1"):
    row = {"source_uri": uri, "status": status, "etag": etag or f"etag-{uri}", "run_id": run,
           "model_id": "kimi-test"}
    if status == "error":
        row["error"] = {"kind": kind, "message": "boom"}
    else:
        row.update(transcript=transcript, duration_s=8.0, num_segments=1)
    return row


def seg_row(uri, index, start, end, scores=None, status="ok", transcript="x", etag=None,
            kind="internal"):
    row = {"source_uri": uri, "segment_index": index, "start_s": start, "end_s": end,
           "status": status, "etag": etag or f"etag-{uri}", "run_id": "run-1"}
    if status == "error":
        row["error"] = {"kind": kind, "message": "boom"}
    else:
        label = max(scores, key=scores.__getitem__)
        row.update(transcript=transcript, emotion=label, emotion_scores=scores)
    return row


def write_output(root, files, segments):
    for table, rows, schema in (("files", files, files_schema(TASKS)),
                                ("segments", segments, segments_schema(TASKS))):
        os.makedirs(root / table, exist_ok=True)
        pq.write_table(to_table(rows, schema), root / table / "part-0.parquet")
    return str(root)


# B's file label: duration-weighted mean of its two segments' scores (2 s and 6 s):
#   anger   (2 * 0.60 + 6 * 0.20) / 8 = 0.30
#   joy     (2 * 0.30 + 6 * 0.50) / 8 = 0.45   <- the file's label and confidence
#   neutral (2 * 0.10 + 6 * 0.30) / 8 = 0.25
# (by segment count it would be a 1:1 tie between anger and joy)
B_SEGMENTS = [{"neutral": 0.1, "joy": 0.3, "anger": 0.6}, {"neutral": 0.3, "joy": 0.5,
                                                           "anger": 0.2}]


def make_output(root, *, a_emotion="joy", b_transcript="hello there world", c_ok=False):
    files = [file_row(A, "the cat sat on mat"), file_row(B, b_transcript),
             file_row(C, "anything") if c_ok else file_row(C, status="error", kind="undecodable"),
             file_row(E), file_row(F, "你好世届"), file_row(G), file_row(H, "good morning"),
             file_row(I, "")]
    segments = [seg_row(A, 0, 0, 3, emotion(a_emotion, 0.95)),
                seg_row(B, 0, 0, 2, B_SEGMENTS[0]), seg_row(B, 1, 2, 8, B_SEGMENTS[1]),
                seg_row(E, 0, 0, 5, emotion("anger", 0.85)), seg_row(E, 1, 5, 8, status="error"),
                seg_row(F, 0, 0, 2, emotion("neutral", 0.7)),
                # a row of an older version of G (another etag) comes first and must not count
                seg_row(G, 0, 0, 4, emotion("neutral", 0.9), etag="old"),
                seg_row(G, 0, 0, 4, emotion("joy", 0.65)),
                seg_row(H, 0, 0, 2, emotion("neutral", 0.5)),
                seg_row(I, 0, 0, 2, emotion("neutral", 0.5), status="silent", transcript="")]
    if c_ok:
        segments.append(seg_row(C, 0, 0, 2, emotion("anger", 0.7)))
    return write_output(root, files, segments)


REFERENCES = [
    {"source_uri": A, "transcript": "The cat sat on the mat.", "emotion": "joy"},
    {"source_uri": B, "transcript": "hello world", "emotion": "Joy"},  # any case
    {"source_uri": C, "transcript": "anything", "emotion": "anger"},  # errored: undecodable
    {"source_uri": D, "emotion": "neutral"},  # missing: no output row
    {"source_uri": E, "segment_index": 0, "emotion": "anger"},
    {"source_uri": E, "segment_index": 1, "emotion": "anger"},  # errored segment: internal
    {"source_uri": E, "segment_index": 5, "emotion": "neutral"},  # missing segment
    {"source_uri": F, "transcript": "你好，世界！"},
    {"source_uri": G, "emotion": "neutral", "speaker": "x"},  # wrong; speaker is ignored
    {"source_uri": H, "transcript": ""},  # an empty reference transcript
    {"source_uri": I, "transcript": "red green blue"},  # an empty hypothesis
]


def write_references(path, rows=REFERENCES):
    columns = ["source_uri", "segment_index", "transcript", "emotion", "speaker"]
    table = pa.table({c: [r.get(c) for r in rows] for c in columns},
                     schema=pa.schema([("source_uri", pa.string()), ("segment_index", pa.int32()),
                                       ("transcript", pa.string()), ("emotion", pa.string()),
                                       ("speaker", pa.string())]))
    pq.write_table(table, path)
    return str(path)


@pytest.fixture
def scored(tmp_path):
    output = make_output(tmp_path / "out")
    refs = write_references(tmp_path / "refs.parquet")
    spec = EvaluationSpec(input=output, references=refs, output=str(tmp_path / "eval"))
    return evaluate(spec)


def test_coverage_counts_missing_and_errored_references(scored):
    coverage = scored["coverage"]
    assert (coverage["references"], coverage["scored"], coverage["missing"],
            coverage["errored"]) == (11, 7, 2, 2)
    assert coverage["errors_by_kind"] == {"internal": 1, "undecodable": 1}
    assert {(x["source_uri"], x["segment_index"]) for x in coverage["missing_examples"]} \
        == {(D, None), (E, 5)}
    assert scored["levels"] == {"file": 8, "segment": 3}
    assert scored["tasks"] == ["transcript", "emotion"]
    assert scored["ignored_reference_columns"] == ["speaker"]


def test_asr_scores_of_the_output(scored):
    asr = scored["results"]["transcript"]
    assert (asr["references"], asr["scored"], asr["unlabelled"]) == (6, 5, 0)  # C errored
    en, zh = asr["by_language"]["en"], asr["by_language"]["zh"]
    # English: A 1 deletion of 6, B 1 insertion of 2, H 2 insertions of 0, I 3 deletions of 3
    assert (en["substitutions"], en["deletions"], en["insertions"], en["reference_length"]) \
        == (0, 4, 3, 11)
    assert en["rate"] == pytest.approx(7 / 11) and en["utterances"] == 4
    # Chinese: F 你好世界 -> 你好世届, one substitution of 4 characters
    assert (zh["metric"], zh["substitutions"], zh["reference_length"], zh["rate"]) \
        == ("cer", 1, 4, 0.25)
    rows = {r["source_uri"]: r for r in asr["rows"]}
    assert rows[H]["rate"] is None and rows[H]["insertions"] == 2
    assert rows[I]["rate"] == 1.0 and rows[I]["hypothesis"] == ""
    assert rows[A]["reference"] == "the cat sat on the mat"
    assert scored["metrics"]["asr.wer.en"] == pytest.approx(7 / 11)
    assert scored["metrics"]["asr.cer.zh"] == 0.25
    assert scored["signals"] is None  # an output without the quality signals


def test_closed_set_scores_of_the_output(scored):
    emo = scored["results"]["emotion"]
    # scored: A joy->joy (0.95), B joy->joy (file label, 0.45), E#0 anger->anger (0.85),
    # G neutral->joy (0.65); C/E#1 errored, D/E#5 missing
    assert (emo["references"], emo["scored"], emo["count"]) == (8, 4, 4)
    rows = {(r["source_uri"], r["segment_index"]): r for r in emo["rows"]}
    assert rows[(B, None)]["predicted"] == "joy"
    assert rows[(B, None)]["confidence"] == pytest.approx(0.45, abs=1e-6)
    assert rows[(G, None)]["predicted"] == "joy"  # not the stale row's neutral
    assert emo["accuracy"] == 0.75
    assert emo["labels"] == ["neutral", "joy", "anger"]  # the scores' order
    assert emo["confusion"] == [[0, 1, 0], [0, 2, 0], [0, 0, 1]]
    # F1: neutral 0 (no TP), joy 2*2/(4+1+0) = 0.8, anger 1.0 -> macro (0 + 0.8 + 1) / 3
    assert emo["macro_f1"] == pytest.approx(0.6)
    # 10 bins: 0.95 T (bin 9, gap 0.05), 0.85 T (bin 8, 0.15), 0.65 F (bin 6, 0.65),
    # 0.45 T (bin 4, 0.55) -> ECE = (0.05 + 0.15 + 0.65 + 0.55) / 4 = 0.35
    assert emo["calibration"]["ece"] == pytest.approx(0.35, abs=1e-6)
    assert [b["count"] for b in emo["calibration"]["bins"]] == [0, 0, 0, 0, 1, 0, 1, 0, 1, 1]


def test_an_output_of_schema_version_1_scores_as_its_version_2_twin(tmp_path):
    """An output written before schema version 2 (map columns) is read as the same output in
    structs: the same coverage, labels, confidences and metrics."""
    from tests.pipelines.schema_v1 import copy_in_schema

    new = make_output(tmp_path / "new")
    old = copy_in_schema(new, tmp_path / "old", 1)
    assert pa.types.is_map(pq.read_schema(f"{old}/segments/part-0.parquet")
                           .field("emotion_scores").type)
    refs = write_references(tmp_path / "refs.parquet")
    reports = [evaluate(EvaluationSpec(input=out, references=refs, output=str(tmp_path / name)))
               for out, name in ((new, "eval-new"), (old, "eval-old"))]
    for key in ("coverage", "metrics", "results", "tasks", "levels"):
        assert reports[1][key] == reports[0][key], key
    assert reports[1]["results"]["emotion"]["labels"] == ["neutral", "joy", "anger"]


def test_comparison_reports_deltas_and_changed_files(tmp_path):
    output = make_output(tmp_path / "new")
    other = make_output(tmp_path / "old", a_emotion="neutral", b_transcript="hello world",
                        c_ok=True)
    refs = write_references(tmp_path / "refs.parquet")
    report = evaluate(EvaluationSpec(input=output, references=refs, compare=other,
                                     output=str(tmp_path / "eval")))
    deltas = {d["metric"]: d for d in report["comparison"]["deltas"]}
    # old: C is scored too (errored 1 instead of 2); English errors A 1, B 0, C 0, H 2, I 3 = 6
    # over 6 + 2 + 1 + 0 + 3 = 12 words -> 0.5
    assert deltas["coverage.errored"] == {"metric": "coverage.errored", "output": 2,
                                          "compare": 1, "delta": 1}
    assert deltas["asr.wer.en"]["compare"] == 0.5
    assert deltas["asr.wer.en"]["delta"] == pytest.approx(7 / 11 - 0.5)
    # old emotion: A neutral (wrong), B joy, C anger, E#0 anger, G joy (wrong) -> 3/5
    assert deltas["emotion.accuracy"]["delta"] == pytest.approx(0.75 - 0.6)
    changed = {(c["source_uri"], c["task"]): (c["output"], c["compare"])
               for c in report["comparison"]["changed"]}
    assert changed == {(A, "emotion"): ("joy", "neutral"),
                       (B, "transcript"): ("hello there world", "hello world"),
                       (C, "transcript"): ("<errored: undecodable>", "anything"),
                       (C, "emotion"): ("<errored: undecodable>", "anger")}
    assert report["comparison"]["changed_files"] == [A, B, C]
    assert report["comparison"]["changed_by_task"] == {"transcript": 2, "emotion": 2}


def test_comparison_with_an_output_lacking_a_task_keeps_the_outputs_metrics(tmp_path, capsys):
    """An older output without emotion labels: the output's emotion metrics are still scored
    and shown, with no compare value or delta, and the report and the printout say why."""
    from flows.console import main

    output = make_output(tmp_path / "new")
    asr_only = [get_task("asr")]
    old = tmp_path / "old"
    for table, rows, schema in (
            ("files", [file_row(A, "the cat sat on the mat"), file_row(B, "hello world")],
             files_schema(asr_only)),
            ("segments", [{"source_uri": uri, "segment_index": 0, "start_s": 0.0, "end_s": 2.0,
                           "status": "ok", "etag": f"etag-{uri}", "run_id": "run-0",
                           "transcript": text}
                          for uri, text in ((A, "the cat sat on the mat"), (B, "hello world"))],
             segments_schema(asr_only))):
        os.makedirs(old / table)
        pq.write_table(to_table(rows, schema), old / table / "part-0.parquet")
    refs = write_references(tmp_path / "refs.parquet")
    assert main(["evaluate", "--input", output, "--references", refs, "--compare", str(old),
                 "--output", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.strip()}
    assert lines["emotion.accuracy"] == ["0.75", "-", "-"]  # as without --compare
    assert lines["emotion.ece"] == ["0.35", "-", "-"]
    assert lines["coverage.scored"][0] == "7"  # every reference row, emotion-only ones too
    assert f"not compared: emotion ({old} has no such labels" in printed
    assert "reference columns ignored: speaker" in printed
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["tasks"] == ["transcript", "emotion"]
    assert report["ignored_reference_columns"] == ["speaker"]
    assert report["metrics"]["emotion.accuracy"] == 0.75
    assert report["comparison"]["unavailable_tasks"] == ["emotion"]
    # the transcripts are still compared: A and B differ, C F H I are missing in the old one
    assert report["comparison"]["changed_by_task"] == {"transcript": 6}
    deltas = {d["metric"]: d for d in report["comparison"]["deltas"]}
    assert deltas["asr.wer.en.reference_length"]["compare"] == 8  # A 6 + B 2 words


def test_file_label_without_scores_is_the_longest_label():
    from pipelines.evaluation.outputs import file_label

    # joy covers 1 s + 1 s, anger 3 s: anger wins by duration (2 segments to 1 by count)
    segments = [{"start_s": 0.0, "end_s": 1.0, "emotion": "joy"},
                {"start_s": 1.0, "end_s": 4.0, "emotion": "anger"},
                {"start_s": 4.0, "end_s": 5.0, "emotion": "joy"},
                {"start_s": 5.0, "end_s": 6.0, "emotion": None}]  # no label: no vote
    assert file_label(segments, "emotion") == ("anger", None)  # no scores: no confidence
    assert file_label(segments[3:], "emotion") == (None, None)


def test_csv_and_jsonl_references_read_like_parquet(tmp_path):
    output = make_output(tmp_path / "out")
    (tmp_path / "refs.csv").write_text(
        "source_uri,segment_index,transcript,language,emotion\n"
        f"{A},,The cat sat on the mat.,en,joy\n"
        f"{E},0,,,anger\n"  # an empty cell is no reference: E#0 has no transcript
        f"{F},,你好，世界！,zh-CN,\n")
    (tmp_path / "refs.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"source_uri": A, "transcript": "The cat sat on the mat.", "emotion": "joy"},
        {"source_uri": E, "segment_index": 0, "emotion": "anger"},
        {"source_uri": F, "transcript": "你好，世界！", "language": "zh"}]) + "\n")
    reports = [evaluate(EvaluationSpec(input=output, references=str(tmp_path / name),
                                       output=str(tmp_path / "eval")))
               for name in ("refs.csv", "refs.jsonl")]
    for report in reports:
        assert report["levels"] == {"file": 2, "segment": 1}
        assert report["metrics"]["asr.wer.en"] == pytest.approx(1 / 6)
        assert report["metrics"]["asr.cer.zh"] == 0.25
        assert report["metrics"]["emotion.accuracy"] == 1.0
        assert report["results"]["transcript"]["references"] == 2


def test_inputs_are_refused_with_the_file_and_the_reason(tmp_path):
    output = make_output(tmp_path / "out")

    def refused(references, match, out=output, **kwargs):
        spec = EvaluationSpec(input=out, references=str(references),
                              output=str(tmp_path / "eval"), **kwargs)
        with pytest.raises(EvaluationError, match=match):
            check_inputs(spec)

    missing = tmp_path / "nope.csv"
    refused(missing, f"references {missing}: not_found")
    (tmp_path / "refs.txt").write_text("x")
    refused(tmp_path / "refs.txt", "refs.txt: unknown format")
    (tmp_path / "nokey.csv").write_text("uri,emotion\na,joy\n")
    refused(tmp_path / "nokey.csv", r"nokey.csv: no source_uri column \(columns: \['uri', ")
    (tmp_path / "notask.csv").write_text(f"source_uri,caption\n{A},a dog\n")
    refused(tmp_path / "notask.csv", "notask.csv: no task column the output can be scored on")
    (tmp_path / "fr.csv").write_text(f"source_uri,transcript,language\n{A},a,en\n{B},b,fr\n")
    refused(tmp_path / "fr.csv", "fr.csv: row 2: language 'fr' is not supported")
    (tmp_path / "dup.csv").write_text(f"source_uri,emotion\n{A},joy\n{A},anger\n")
    refused(tmp_path / "dup.csv", "dup.csv: row 2: .*a.wav is already referenced in row 1")
    (tmp_path / "seg.csv").write_text(f"source_uri,segment_index,emotion\n{A},first,joy\n")
    refused(tmp_path / "seg.csv", "seg.csv: row 1: segment_index 'first' is not")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"source_uri": A, "emotion": "joy"})
                                        + "\n{not json\n")
    refused(tmp_path / "bad.jsonl", "bad.jsonl: line 2: not JSON")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "dup.csv", "output .*empty: no files/", out=str(tmp_path / "empty"))
    (tmp_path / "ok.csv").write_text(f"source_uri,emotion\n{A},joy\n")
    refused(tmp_path / "ok.csv", "compare .*: no files/", compare=str(tmp_path / "empty"))



def test_references_output_and_report_on_s3(seaweed, s3_prefix, tmp_path):
    import gzip

    from pipelines.evaluation import write_report
    from pipelines.storage import resolve

    options = seaweed.storage_options
    fs, root = resolve(s3_prefix, options)
    fs.put(f"{make_output(tmp_path / 'out')}/", f"{root}/out", recursive=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in REFERENCES]
    fs.pipe_file(f"{root}/refs.jsonl.gz", gzip.compress("\n".join(lines).encode()))
    spec = EvaluationSpec(input=f"{s3_prefix}/out", references=f"{s3_prefix}/refs.jsonl.gz",
                          storage_options=options)
    report = evaluate(spec)
    assert report["metrics"]["asr.wer.en"] == pytest.approx(7 / 11)
    assert report["metrics"]["emotion.accuracy"] == 0.75
    files = write_report(report, spec)
    assert files["report"].startswith(f"{s3_prefix}/out/_evaluations/")
    stored = json.loads(fs.cat_file(files["report"].removeprefix("s3://")))
    assert stored["coverage"] == report["coverage"]
    assert fs.cat_file(files["confusion_png"].removeprefix("s3://"))[:4] == b"\x89PNG"

    # a read-only identity may read everything but not write the report: refused up front
    reader = seaweed.storage_options_for("reader")
    spec = EvaluationSpec(input=f"{s3_prefix}/out", references=f"{s3_prefix}/refs.jsonl.gz",
                          output=f"{s3_prefix}/eval", storage_options=reader)
    with pytest.raises(EvaluationError, match=f"report folder {s3_prefix}/eval: access_denied") \
            as refused:
        check_inputs(spec)
    assert reader["secret"] not in str(refused.value)

# -- the command line and the flow -----------------------------------------------------------

def test_kimi_label_evaluate_prints_and_writes_the_report(tmp_path, capsys):
    from flows.console import main

    output = make_output(tmp_path / "new")
    other = make_output(tmp_path / "old", a_emotion="neutral", b_transcript="hello world",
                        c_ok=True)
    refs = write_references(tmp_path / "refs.parquet")
    assert main(["evaluate", "--input", output, "--references", refs,
                 "--output", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.strip()}
    assert lines["asr.wer.en"] == ["0.6364"]  # 7 / 11
    assert lines["emotion.accuracy"] == ["0.75"] and lines["emotion.ece"] == ["0.35"]
    assert "11 reference items: 7 scored, 2 missing, 2 errored" in printed
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["coverage"]["errors_by_kind"] == {"internal": 1, "undecodable": 1}
    assert report["results"]["emotion"]["confusion"] == [[0, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert (tmp_path / "eval" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"confusion matrices: {tmp_path / 'eval' / 'confusion.png'}" in printed

    # with --compare: both values and the delta; default report folder under the output
    assert main(["evaluate", "--input", output, "--references", refs, "--compare", other]) == 0
    printed = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.strip()}
    assert lines["metric"] == ["output", "compare", "delta"]
    assert lines["coverage.errored"] == ["2", "1", "1"]
    assert lines["emotion.accuracy"] == ["0.75", "0.6", "0.15"]
    assert "4 items changed in 3 files" in printed
    written = list((tmp_path / "new" / "_evaluations").glob("*/report.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["comparison"]["changed_files"] \
        == [A, B, C]


def test_reference_labels_outside_the_label_set_are_left_out_and_printed(tmp_path, capsys):
    """'happy' where the task says 'joy' could never be predicted: its items are not scored
    (they would lower accuracy and macro-F1), and the printout names them and the task's
    labels."""
    from flows.console import main

    output = make_output(tmp_path / "out")
    # H and I are scored (both neutral); as unknown labels they leave the metrics as they were
    rows = [*REFERENCES[:-2], {**REFERENCES[-2], "emotion": "happy"},
            {**REFERENCES[-1], "emotion": "Sad"}]
    refs = write_references(tmp_path / "refs.parquet", rows)
    assert main(["evaluate", "--input", output, "--references", refs,
                 "--output", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.strip()}
    assert lines["emotion.accuracy"] == ["0.75"] and lines["emotion.macro_f1"] == ["0.6"]
    assert ("warning: emotion: 2 reference items left out of scoring, their labels are not in "
            "the task's label set: 'Sad' (1), 'happy' (1); emotion labels: neutral, joy, anger"
            ) in printed
    assert "11 reference items: 7 scored, 2 missing, 2 errored" in printed  # coverage as before
    emo = json.loads((tmp_path / "eval" / "report.json").read_text())["results"]["emotion"]
    assert (emo["references"], emo["excluded"], emo["scored"], emo["count"]) == (10, 2, 4, 4)
    assert emo["unknown_reference_labels"] == {"Sad": 1, "happy": 1}
    assert emo["known_labels"] == ["neutral", "joy", "anger"]
    assert emo["labels"] == ["neutral", "joy", "anger"]
    assert {r["source_uri"] for r in emo["rows"]} == {A, B, E, G}
    # the flow's report artifact shows it too
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert ("- **warning**: emotion: 2 reference items left out of scoring, their labels are not "
            "in the task's label set: 'Sad' (1), 'happy' (1)") in report_markdown(report)


def test_kimi_label_evaluate_refuses_bad_inputs_before_scoring(tmp_path, capsys):
    from flows.console import main

    output = make_output(tmp_path / "out")
    missing = tmp_path / "refs.csv"
    assert main(["evaluate", "--input", output, "--references", str(missing),
                 "--output", str(tmp_path / "eval")]) == 2
    assert f"error: references {missing}: not_found" in capsys.readouterr().err
    (tmp_path / "captions.jsonl").write_text(json.dumps({"source_uri": A, "caption": "x"}))
    assert main(["evaluate", "--input", output, "--references",
                 str(tmp_path / "captions.jsonl"), "--output", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "captions.jsonl: no task column the output can be scored on" in err
    assert "output tasks: ['transcript', 'emotion']" in err
    for args, message in ((["--bins", "0"], "error: --bins: Input should be greater than"),
                          (["--storage-options", "{bad"], "error: --storage-options is not "
                                                          "valid JSON (Expecting property name"),
                          (["--storage-options", "[1]"], "error: --storage-options must be a "
                                                         "JSON object")):
        assert main(["evaluate", "--input", output, "--references", str(missing),
                     "--output", str(tmp_path / "eval"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and "n_bins" not in err, err
    assert not (tmp_path / "eval").exists()  # nothing written for a refused evaluation


@pytest.mark.slow
def test_evaluate_flow_publishes_its_artifacts(harness, tmp_path):
    from flows.evaluate import evaluate_flow
    from tests.flow_helpers import artifacts

    output = make_output(tmp_path / "new")
    other = make_output(tmp_path / "old", a_emotion="neutral", b_transcript="hello world",
                        c_ok=True)
    refs = write_references(tmp_path / "refs.parquet")
    report = evaluate_flow(EvaluationSpec(input=output, references=refs, compare=other,
                                          output=str(tmp_path / "eval")))
    assert report["metrics"]["emotion.accuracy"] == 0.75
    keys = ["evaluation-summary", "evaluation-coverage", "evaluation-report",
            "evaluation-changes"]
    found = asyncio.run(artifacts(keys))
    assert set(found) == set(keys)
    summary = {row["metric"]: row for row in json.loads(found["evaluation-summary"].data)}
    assert summary["asr.wer.en"]["output"] == round(7 / 11, 4)
    assert summary["asr.wer.en"]["compare"] == 0.5
    coverage = {row["state"]: row["references"]
                for row in json.loads(found["evaluation-coverage"].data)}
    assert coverage == {"scored": 7, "missing": 2, "errored": 2, "errored: internal": 1,
                        "errored: undecodable": 1}
    markdown = found["evaluation-report"].data
    png = tmp_path / "eval" / "confusion.png"
    assert f"![confusion matrices]({png})" in markdown and png.exists()
    assert f"`{tmp_path / 'eval' / 'report.json'}`" in markdown
    assert "| joy | 0 | 2 | 0 |" in markdown  # the emotion matrix's joy row
    changes = json.loads(found["evaluation-changes"].data)
    assert {(c["source_uri"], c["task"]) for c in changes} == {
        (A, "emotion"), (B, "transcript"), (C, "transcript"), (C, "emotion")}

    state = evaluate_flow(EvaluationSpec(input=output, references=str(tmp_path / "no.csv")),
                          return_state=True)
    assert state.is_failed()
    with pytest.raises(EvaluationError,
                       match="evaluate cannot run: references .*no.csv: not_found"):
        state.result()


def test_flow_tasks_retry_a_storage_failure_not_bad_input(tmp_path):
    """The flows' retry condition: an EvaluationError from a storage failure a retry may get
    past is retried, one from bad input is not; any other exception is."""
    from types import SimpleNamespace

    from flows.retry import retry_unless_final

    def retried(exc) -> bool:
        state = SimpleNamespace(result=lambda raise_on_failure: exc)
        return retry_unless_final(None, None, state)

    output = make_output(tmp_path / "out")
    with pytest.raises(EvaluationError) as missing:
        check_inputs(EvaluationSpec(input=output, references=str(tmp_path / "no.csv")))
    assert not missing.value.retryable and not retried(missing.value)
    assert retried(EvaluationError("references x: unavailable: store down", retryable=True))
    assert retried(OSError("connection reset"))


def test_references_spelled_as_a_user_types_them_match_the_rows(tmp_path, capsys):
    """A run spells local objects as absolute paths: a reference naming them relative to the
    references file's folder, with `file://`, or with `./`, still finds its row; when no
    reference names any object of the output, the command says so and exits 2."""
    from flows.console import main
    from pipelines.evaluation import as_listed

    clip = tmp_path / "corpus" / "clip.wav"
    output = write_output(tmp_path / "out", [file_row(str(clip), "hello world")],
                          [seg_row(str(clip), 0, 0, 2, emotion("joy", 0.9))])
    for spelled in ("corpus/clip.wav", f"file://{clip}", f"file://localhost{clip}",
                    f"{tmp_path}/./corpus//clip.wav"):
        refs = write_references(tmp_path / "refs.parquet",
                                [{"source_uri": spelled, "emotion": "joy"}])
        report = evaluate(EvaluationSpec(input=output, references=refs,
                                         output=str(tmp_path / "eval")))
        assert report["coverage"]["scored"] == 1, spelled
    assert as_listed("s3://b/in//a/./x.wav", "s3://b/refs.csv") == "s3://b/in/a/x.wav"
    assert as_listed("x.wav", "s3://b/refs/list.csv") == "s3://b/refs/x.wav"
    assert as_listed(str(clip), str(tmp_path / "refs.csv")) is None  # already as listed
    assert as_listed("../../x.wav", "s3://b/refs.csv") is None  # above the bucket
    assert as_listed("~/x.wav", str(tmp_path / "refs.csv")) == str(Path.home() / "x.wav")

    refs = write_references(tmp_path / "refs.parquet",
                            [{"source_uri": "elsewhere/clip.wav", "emotion": "joy"}])
    assert main(["evaluate", "--input", output, "--references", refs,
                 "--output", str(tmp_path / "eval2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: none of the 1 references matched a row of ")
    assert "'elsewhere/clip.wav'" in err


def test_no_match_message_names_the_output_and_an_example(tmp_path):
    """The console's refusal when not one reference matched a row (its scores mean nothing):
    the output and a reference as written; none as soon as one matched."""
    from pipelines.evaluation import no_match_message

    clip = tmp_path / "corpus" / "clip.wav"
    output = write_output(tmp_path / "out", [file_row(str(clip), "hello world")],
                          [seg_row(str(clip), 0, 0, 2, emotion("joy", 0.9))])
    for spelled, matched in (("elsewhere/clip.wav", False), (str(clip), True)):
        refs = write_references(tmp_path / "refs.parquet",
                                [{"source_uri": spelled, "emotion": "joy"}])
        message = no_match_message(evaluate(EvaluationSpec(
            input=output, references=refs, output=str(tmp_path / "eval"))))
        if matched:
            assert message is None
        else:
            assert message.startswith(f"none of the 1 references matched a row of {output} ")
            assert "'elsewhere/clip.wav'" in message


# -- the quality signals against transcript errors ------------------------------------------

def test_rank_correlation_and_deciles_on_known_values():
    from kimi_ops.evaluation import average_ranks, error_by_decile, spearman

    assert average_ranks([3.0, 1.0, 2.0, 2.0]).tolist() == [4.0, 1.0, 2.5, 2.5]  # ties: mean
    # ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5), scipy's spearmanr too
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert spearman([-0.1, -0.5, -2.0], [0.0, 0.2, 0.9]) == -1.0
    assert spearman([1, 2, 3], [0.5, 0.5, 0.5]) is None  # constant: nothing to rank
    assert spearman([1, 2], [2, 1]) is None  # too few
    # 5 items in 3 groups of 2, 2, 1 by ascending signal; rates pooled: errors / words
    bins = error_by_decile([0.5, 0.1, 0.4, 0.2, 0.3], [5, 1, 4, 2, 3], [10, 10, 10, 10, 0], 3)
    assert [(b.count, b.signal_min, b.signal_max, b.errors, b.reference_length) for b in bins] \
        == [(2, 0.1, 0.2, 3, 20), (2, 0.3, 0.4, 7, 10), (1, 0.5, 0.5, 5, 10)]
    assert [b.rate for b in bins] == [0.15, 0.7, 0.5]
    assert bins[0].mean_signal == pytest.approx(0.15)
    assert len(error_by_decile([1.0, 2.0], [0, 1], [1, 1])) == 2  # fewer items than deciles


WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango").split()
SIGNALS = ("transcript_avg_logprob", "transcript_min_logprob", "transcript_compression_ratio",
           "speech_ratio")


def with_signals(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """`rows` as a table of `schema` with their quality-signal columns (float32) appended, as
    an output of schema version 3 has them."""
    table = to_table([{k: v for k, v in r.items() if k not in SIGNALS} for r in rows], schema)
    for name in SIGNALS:
        table = table.append_column(pa.field(name, pa.float32()),
                                    pa.array([r.get(name) for r in rows], pa.float32()))
    return table


def signal_output(root: Path) -> tuple[str, list[dict]]:
    """An asr output whose 20 segments of A have a known error each, segment i with i of its
    20 words wrong (WER i/20), its avg_logprob falling and its compression ratio rising with
    i; speech_ratio on the even ones only; a 21st segment with an empty reference. Files B, C,
    D carry file-level aggregates. Returns (output, references)."""
    asr = [get_task("asr")]
    segments, refs = [], []
    for i in range(20):
        hypothesis = " ".join(["zulu"] * i + WORDS[i:])
        segments.append({"source_uri": A, "segment_index": i, "start_s": float(i),
                         "end_s": i + 1.0, "status": "ok", "etag": f"etag-{A}",
                         "run_id": "run-1", "transcript": hypothesis,
                         "transcript_avg_logprob": -0.05 * (i + 1),
                         "transcript_min_logprob": -0.05 * (i + 1) - 1.0,
                         "transcript_compression_ratio": 1.0 + 0.1 * i,
                         "speech_ratio": 1.0 - 0.01 * i if i % 2 == 0 else None})
        refs.append({"source_uri": A, "segment_index": i, "transcript": " ".join(WORDS)})
    segments.append({**segments[0], "segment_index": 20, "transcript": "zulu"})
    refs.append({"source_uri": A, "segment_index": 20, "transcript": ""})  # rate undefined
    files = [{**file_row(A, "x"), "transcript_avg_logprob": -0.5},
             {**file_row(B, "hello world"), "transcript_avg_logprob": -0.1},  # WER 0
             {**file_row(C, "hello"), "transcript_avg_logprob": -0.9},  # WER 0.5
             file_row(D, "hello world")]  # no signal
    refs += [{"source_uri": u, "transcript": "hello world"} for u in (B, C, D)]
    for table, rows, schema in (("files", files, files_schema(asr)),
                                ("segments", segments, segments_schema(asr))):
        os.makedirs(root / table, exist_ok=True)
        pq.write_table(with_signals(rows, schema),
                       root / table / "part-0.parquet")
    return str(root), refs


def test_signals_rank_the_errors_they_were_made_to_rank(tmp_path, capsys):
    """Constructed so that the answer is known: the log-probabilities fall as the WER rises
    (Spearman -1), the compression ratio rises with it (+1), and each decile's pooled WER is
    that of its two segments; file references are related at their own level."""
    from flows.console import main

    output, rows = signal_output(tmp_path / "out")
    refs = write_references(tmp_path / "refs.parquet", rows)
    assert main(["evaluate", "--input", output, "--references", refs,
                 "--output", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    segment, files = report["signals"]["segment"], report["signals"]["file"]
    assert list(segment) == list(SIGNALS) and list(files) == ["transcript_avg_logprob"]
    logprob = segment["transcript_avg_logprob"]
    assert (logprob["items"], logprob["without_signal"], logprob["undefined_rate"]) == (20, 0, 1)
    assert logprob["spearman"] == -1.0 and logprob["metrics"] == ["wer"]
    assert segment["transcript_min_logprob"]["spearman"] == -1.0
    assert segment["transcript_compression_ratio"]["spearman"] == 1.0
    # decile k (ascending avg_logprob) holds segments 21-2k and 20-2k: (41 - 4k) of 40 words
    assert [d["count"] for d in logprob["deciles"]] == [2] * 10
    assert [(d["errors"], d["reference_length"]) for d in logprob["deciles"]] \
        == [(41 - 4 * k, 40) for k in range(1, 11)]
    assert [d["rate"] for d in logprob["deciles"]] == [(41 - 4 * k) / 40 for k in range(1, 11)]
    assert logprob["deciles"][0]["mean_signal"] == pytest.approx(-0.975, abs=1e-6)
    ratio = segment["transcript_compression_ratio"]["deciles"]
    assert [d["rate"] for d in ratio] == sorted(d["rate"] for d in ratio)  # rising with it
    speech = segment["speech_ratio"]  # on the even segments only, falling as the WER rises
    assert (speech["items"], speech["without_signal"], speech["spearman"]) == (10, 10, -1.0)
    assert [d["count"] for d in speech["deciles"]] == [1] * 10
    by_file = files["transcript_avg_logprob"]  # B (-0.1, WER 0) and C (-0.9, WER 0.5)
    assert (by_file["items"], by_file["without_signal"], by_file["spearman"]) == (2, 1, None)
    assert [d["rate"] for d in by_file["deciles"]] == [0.5, 0.0]
    lines = {tuple(line.split()[:2]): line.split()[2:] for line in printed.splitlines()
             if line.startswith(("transcript_", "speech_ratio"))}
    assert lines[("transcript_avg_logprob", "segment")][:2] == ["20", "-1.0"]
    assert lines[("transcript_compression_ratio", "segment")][:3] == ["20", "1.0", "0.03"]
    assert lines[("transcript_avg_logprob", "file")] == ["2", "-", "0.50", "0.00"]
    assert "quality signals vs. each reference's transcript error" in printed
