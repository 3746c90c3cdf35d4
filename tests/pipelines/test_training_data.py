"""Training shards from a hand-made labelled output: filters, split, shards, manifest, flow;
the lhotse and HF exports from the same output backed by real audio files."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from kimi_ops.tasks import get_task
from pipelines.schema import files_schema, segments_schema, to_table
from pipelines.training_data import (
    TrainingDataError,
    TrainingDataSpec,
    TrainingFilters,
    build_training_data,
    sample_key,
    split_of,
)
from tests.flow_helpers import artifacts
from tests.s3_fixtures import s3_prefix, seaweed  # noqa: F401

TASKS = [get_task("asr"), get_task("emotion"), get_task("scene")]
RUN, MODEL = "run-1", "kimi-test"
MANY = [f"s3://b/many/f{i:02d}.wav" for i in range(20)]
A, B, C, D, E, F, G, H = (f"s3://b/{x}.wav" for x in "abcdefgh")
ORPHAN = "s3://b/orphan.wav"


def tokens_for(uri: str, index: int, start: float, end: float) -> list[int]:
    base = int(hashlib.sha256(uri.encode()).hexdigest()[:4], 16)
    return [(base + 7 * index + k) % 16384 for k in range(max(1, round((end - start) * 12.5)))]


def scores(label: str, p: float, others: tuple[str, str]) -> dict[str, float]:
    return {label: p, others[0]: (1 - p) / 2, others[1]: (1 - p) / 2}  # top = p for p >= 1/3


def seg(uri, index, start, end, *, status="ok", transcript="some words", truncated=False,
        looped=False, emotion=("neutral", 0.9), scene=("kitchen", 0.8), tokens="auto",
        etag=None, with_tokens=True):
    language = "auto" if uri == C else "en"  # C's run transcribed with --language auto
    row = {"source_uri": uri, "segment_index": index, "start_s": start, "end_s": end,
           "status": status, "model_id": MODEL, "run_id": RUN, "etag": etag or f"etag-{uri}",
           "task_versions": {t.name: t.version for t in TASKS},
           "generation": json.dumps({"language": language, "max_new_tokens": 384})}
    if status == "error":
        row["error"] = {"kind": "internal", "message": "boom"}
    if status == "ok":
        row.update(transcript=transcript, transcript_truncated=truncated,
                   transcript_looped=looped, emotion=emotion[0],
                   emotion_scores=scores(*emotion, ("joy", "anger")), scene=scene[0],
                   scene_scores=scores(*scene, ("park", "bus")))
    if with_tokens:
        row["semantic_tokens"] = (tokens_for(uri, index, start, end) if tokens == "auto"
                                  else tokens)
    return row


def file_row(uri, status="ok", n=1):
    return {"source_uri": uri, "status": status, "etag": f"etag-{uri}", "run_id": RUN,
            "model_id": MODEL, "num_segments": n,
            "error": {"kind": "undecodable", "message": "x"} if status == "error" else None}


SHARD1 = [
    seg(A, 0, 0.0, 2.0),                                   # kept
    seg(A, 1, 2.0, 3.0, status="silent", tokens=None),     # silent
    seg(A, 2, 3.0, 6.0, truncated=True),                   # truncated
    seg(B, 0, 0.0, 0.3),                                   # too short (min 0.5)
    seg(B, 1, 0.3, 2.3, looped=True),                      # looped
    seg(B, 2, 2.3, 4.0, emotion=("sadness", 0.4)),         # low emotion confidence (< 0.5)
    seg(C, 0, 0.0, 1.5, transcript="   "),                 # blank transcript
    seg(C, 1, 1.5, 3.5, transcript="second part"),         # kept
    seg(E, 0, 0.0, 1.0, tokens=[]),                        # no tokens
    seg(F, 0, 0.0, 28.0),                                  # too long (max 25)
    seg(H, 0, 0.0, 1.0, status="error", tokens=None),      # error segment
    seg(D, 0, 0.0, 1.0),                                   # its file's row is an error
]
SHARD2 = [seg(uri, i, 2.0 * i, 2.0 * i + 1.5,
              scene=("kitchen", 0.6) if (uri, i) == (MANY[0], 2) else ("kitchen", 0.8))
          for uri in MANY for i in range(3)]
SHARD2.append(seg(C, 1, 1.5, 3.5, transcript="DUP"))       # duplicate of C/1: the first wins
SHARD3 = [seg(G, 0, 0.0, 1.0, with_tokens=False), seg(G, 1, 1.0, 2.0, with_tokens=False)]
ORPHANS = [seg(ORPHAN, 0, 0.0, 1.0),                       # no files row (crash leftover)
           seg(A, 5, 6.0, 7.0, etag="stale-etag")]         # older version of A
INPUT_ROWS = len(SHARD1) + len(SHARD2) + len(SHARD3) + len(ORPHANS)  # 77

MANY_KEYS = {(u, i) for u in MANY for i in range(3)}
STRICT = TrainingFilters(min_duration_s=0.5, max_duration_s=25.0,
                         min_confidence={"emotion": 0.5}, require_transcript=True)
CASES = {
    "strict": (STRICT, {(A, 0), (C, 1)} | MANY_KEYS,
               {"silent": 1, "truncated": 1, "not_in_files": 2, "too_short": 1, "looped": 1,
                "low_confidence:emotion": 1, "empty_transcript": 1, "duplicate": 1,
                "no_semantic_tokens": 3, "too_long": 1, "error": 2}),
    "defaults": (TrainingFilters(), {(A, 0), (B, 0), (B, 2), (C, 0), (C, 1), (F, 0)} | MANY_KEYS,
                 {"silent": 1, "truncated": 1, "looped": 1, "duplicate": 1,
                  "no_semantic_tokens": 3, "not_in_files": 2, "error": 2}),
    "keep_flagged": (TrainingFilters(drop_truncated=False, drop_looped=False,
                                     min_confidence={"scene": 0.7}),
                     {(A, 0), (A, 2), (B, 0), (B, 1), (B, 2), (C, 0), (C, 1), (F, 0)}
                     | (MANY_KEYS - {(MANY[0], 2)}),
                     {"silent": 1, "duplicate": 1, "no_semantic_tokens": 3, "not_in_files": 2,
                      "error": 2, "low_confidence:scene": 1}),
}


def write(path: Path, table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


GONE, CHANGED = MANY[18], MANY[19]  # with audio: deleted, and rewritten, since labelling
RATES = {C: 22050}  # the decoder resamples it; every other file is 16 kHz


def audio_files(folder: Path, rows: list[dict]) -> dict[str, tuple[str, str]]:
    """A WAV file of noise for each source of `rows` (but GONE), long enough for its segments:
    uri -> (its path, its etag as a listing gives it)."""
    from pipelines.storage import list_objects

    folder.mkdir(parents=True, exist_ok=True)
    ends: dict[str, float] = {}
    for row in rows:
        ends[row["source_uri"]] = max(ends.get(row["source_uri"], 0.0), row["end_s"])
    moved = {}
    for n, (uri, end) in enumerate(sorted(ends.items())):
        path, rate = folder / uri.rsplit("/", 1)[1], RATES.get(uri, 16000)
        etag = None
        if uri != GONE:
            noise = np.random.default_rng(n).uniform(-0.5, 0.5, int((end + 0.25) * rate))
            sf.write(path, noise, rate, subtype="PCM_16")
            etag = next(iter(list_objects(str(path), None))).etag
        moved[uri] = (str(path), etag)
    return moved


def relocated(rows: list[dict], moved: dict[str, tuple[str, str]]) -> list[dict]:
    """`rows` naming the audio files, with the files' etags (GONE, CHANGED and a stale etag
    keep theirs)."""
    out = []
    for row in rows:
        path, etag = moved[row["source_uri"]]
        fresh = row["etag"] == f"etag-{row['source_uri']}" and etag is not None \
            and row["source_uri"] != CHANGED
        out.append({**row, "source_uri": path, "etag": etag if fresh else row["etag"]})
    return out


def make_output(root: Path, semantic_tokens: bool = True, audio: Path | None = None) -> str:
    """The labelled output; with `audio`, its sources are real audio files in that folder."""
    seg_schema = segments_schema(TASKS, semantic_tokens=semantic_tokens)
    strip = (lambda rows: rows) if semantic_tokens else \
        (lambda rows: [{k: v for k, v in r.items() if k != "semantic_tokens"} for r in rows])
    files = {"part-1": [file_row(u) for u in (A, B, C, E, F, H)] + [file_row(D, "error", 0)],
             "part-2": [file_row(u, n=3) for u in MANY],
             "part-3": [file_row(G, n=2)]}
    segments = {"part-1": SHARD1, "part-2": SHARD2, "part-3": SHARD3, "part-9-orphan": ORPHANS}
    if audio is not None:
        moved = audio_files(audio, [r for rows in segments.values() for r in rows])
        files = {name: relocated(rows, moved) for name, rows in files.items()}
        segments = {name: relocated(rows, moved) for name, rows in segments.items()}
    for name, rows in files.items():
        write(root / "files" / f"{name}.parquet", to_table(rows, files_schema(TASKS)))
    for name, rows in segments.items():
        schema = segments_schema(TASKS) if name == "part-3" else seg_schema
        write(root / "segments" / f"{name}.parquet",
              to_table(rows if name == "part-3" else strip(rows), schema))
    return str(root)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    return make_output(tmp_path_factory.mktemp("labelled") / "out")


def build(source, dest, **kw):
    """A build; Parquet shards only unless a test names formats (these sources are not
    audio: the `exported` build is the one with audio)."""
    kw.setdefault("formats", [])
    return build_training_data(TrainingDataSpec(input=source, output=str(dest), **kw))


def read_split(dest: Path, split: str) -> list[dict]:
    rows = []
    for path in sorted((dest / split).glob("part-*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def expected_row(key) -> dict:
    row = next(r for r in SHARD1 + SHARD2 if (r["source_uri"], r["segment_index"]) == key)
    return {"key": sample_key(*key), "source_uri": key[0], "segment_index": key[1],
            "start_s": row["start_s"], "end_s": row["end_s"],
            "duration_s": row["end_s"] - row["start_s"],
            "num_tokens": len(row["semantic_tokens"]), "semantic_tokens": row["semantic_tokens"],
            "transcript": row["transcript"], "language": None if key[0] == C else "en",
            "emotion": row["emotion"],
            "emotion_confidence": pytest.approx(max(row["emotion_scores"].values()), abs=1e-6),
            "scene": row["scene"],
            "scene_confidence": pytest.approx(max(row["scene_scores"].values()), abs=1e-6),
            "model_id": MODEL, "run_id": RUN}


def test_an_output_of_schema_version_1_builds_the_rows_of_its_version_2_twin(source, tmp_path):
    """An output written before schema version 2 (its scores as maps) gives the same shards,
    confidences included, and the same counts."""
    from tests.pipelines.schema_v1 import copy_in_schema

    old = copy_in_schema(source, tmp_path / "old", 1)
    assert pq.read_schema(f"{old}/segments/part-1.parquet").metadata[
        b"kimi_label.schema_version"] == b"1"
    filters = CASES["keep_flagged"][0]  # a confidence filter reads the scores
    built = [build(out, tmp_path / name, filters=filters, validation_fraction=0.3)
             for out, name in ((source, "ds-new"), (old, "ds-old"))]
    assert built[1]["counts"] == built[0]["counts"]
    assert built[1]["tasks"] == built[0]["tasks"] == ["emotion", "scene"]
    for split in ("train", "validation"):
        assert read_split(tmp_path / "ds-old", split) == read_split(tmp_path / "ds-new", split)


@pytest.mark.parametrize("case", sorted(CASES))
def test_filters_keep_exactly_the_expected_rows(source, tmp_path, case):
    filters, kept, dropped = CASES[case]
    manifest = build(source, tmp_path / "ds", filters=filters, validation_fraction=0.3,
                     rows_per_shard=7)
    rows = read_split(tmp_path / "ds", "train") + read_split(tmp_path / "ds", "validation")
    assert {(r["source_uri"], r["segment_index"]) for r in rows} == kept
    assert len(rows) == len(kept)  # each once
    counts = manifest["counts"]
    assert counts["dropped"] == dropped
    assert counts["input_segments"] == INPUT_ROWS == counts["kept"] + sum(dropped.values())
    assert counts["kept"] == len(kept)
    assert manifest["tasks"] == ["emotion", "scene"]


def test_shards_hold_the_kept_rows_in_bounded_shards(source, tmp_path):
    dest = tmp_path / "ds"
    build(source, dest, filters=STRICT, validation_fraction=0.3, rows_per_shard=7)
    for split in ("train", "validation"):
        sizes = [pq.read_metadata(p).num_rows for p in sorted((dest / split).glob("*.parquet"))]
        assert sizes and all(n == 7 for n in sizes[:-1]) and 1 <= sizes[-1] <= 7
        for row in read_split(dest, split):
            assert row == expected_row((row["source_uri"], row["segment_index"]))
    c1 = next(r for r in read_split(dest, "train") + read_split(dest, "validation")
              if (r["source_uri"], r["segment_index"]) == (C, 1))
    assert c1["transcript"] == "second part"  # the first of the duplicates


def test_split_is_by_file_and_deterministic(source, tmp_path):
    first = build(source, tmp_path / "one", validation_fraction=0.3, rows_per_shard=7)
    second = build(source, tmp_path / "two", validation_fraction=0.3, rows_per_shard=7)
    by_split = {s: {r["source_uri"] for r in read_split(tmp_path / "one", s)}
                for s in ("train", "validation")}
    assert by_split["train"] and by_split["validation"]
    assert not by_split["train"] & by_split["validation"]  # no file in both: no leakage
    for split, uris in by_split.items():
        assert all(split_of(u, 0.3) == split for u in uris)
    for split in ("train", "validation"):  # same input, same rows in the same shards
        assert read_split(tmp_path / "one", split) == read_split(tmp_path / "two", split)
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in second["shards"]]
    assert first["counts"] == second["counts"]
    build(source, tmp_path / "salt", validation_fraction=0.3, split_salt="v2")
    assert {r["source_uri"] for r in read_split(tmp_path / "salt", "validation")} \
        != by_split["validation"]
    none = build(source, tmp_path / "all-train", validation_fraction=0.0)
    assert none["counts"]["splits"]["validation"]["rows"] == 0
    assert not (tmp_path / "all-train" / "validation").exists()


# -- the quality-signal filters --------------------------------------------------------------

SIGNALS = {"speech_ratio": "speech_ratio", "avg_logprob": "transcript_avg_logprob",
           "compression_ratio": "transcript_compression_ratio"}
Q = [f"s3://b/q{i}.wav" for i in range(11)]
# (speech_ratio, avg_logprob, compression_ratio) per segment, and what the three filters of
# SIGNAL_FILTERS say of it (the first rule it fails)
SIGNAL_ROWS = [
    ((1.0, -0.2, 1.5), None),                      # kept
    ((0.2, -0.2, 1.5), "low_speech_ratio"),
    ((None, -0.2, 1.5), "no_speech_ratio"),
    ((0.9, -1.5, 1.5), "low_avg_logprob"),
    ((0.9, None, 1.5), "no_avg_logprob"),
    ((0.9, -0.2, 3.0), "high_compression_ratio"),
    ((0.9, -0.2, None), "no_compression_ratio"),
    ((0.1, -2.0, 3.0), "low_speech_ratio"),        # fails all three: counted under the first
    ((0.5, -1.0, 2.4), None),                      # each value at its threshold: kept
    ((0.9, float("nan"), 1.5), "no_avg_logprob"),  # NaN: no value either
]
SIGNAL_FILTERS = {"min_speech_ratio": 0.5, "min_avg_logprob": -1.0, "max_compression_ratio": 2.4}


def signal_output(root: Path) -> str:
    """A labelled output with the quality-signal columns (as an output of schema version 3
    has them): a segment per SIGNAL_ROWS entry, plus a silent one without values."""
    import pyarrow as pa

    rows = [seg(Q[i], 0, 0.0, 2.0) for i in range(len(SIGNAL_ROWS))]
    rows.append(seg(Q[-1], 0, 0.0, 2.0, status="silent", tokens=None))
    values = [v for v, _ in SIGNAL_ROWS] + [(None, None, None)]
    table = to_table(rows, segments_schema(TASKS, semantic_tokens=True))
    for k, column in enumerate(SIGNALS.values()):
        new = pa.array([v[k] for v in values], pa.float32())
        table = (table.set_column(table.schema.get_field_index(column), column, new)
                 if column in table.column_names
                 else table.append_column(pa.field(column, pa.float32()), new))
    write(root / "segments" / "part-0.parquet", table)
    write(root / "files" / "part-0.parquet",
          to_table([file_row(u) for u in Q], files_schema(TASKS)))
    return str(root)


@pytest.fixture(scope="module")
def signals_source(tmp_path_factory) -> str:
    return signal_output(tmp_path_factory.mktemp("signals") / "out")


SIGNAL_CASES = {  # filters set -> the drop counts by rule
    (): {"silent": 1},
    ("min_speech_ratio",): {"silent": 1, "low_speech_ratio": 2, "no_speech_ratio": 1},
    ("min_avg_logprob",): {"silent": 1, "low_avg_logprob": 2, "no_avg_logprob": 2},
    ("max_compression_ratio",): {"silent": 1, "high_compression_ratio": 2,
                                 "no_compression_ratio": 1},
    tuple(SIGNAL_FILTERS): {"silent": 1, "low_speech_ratio": 2, "no_speech_ratio": 1,
                            "low_avg_logprob": 1, "no_avg_logprob": 2,
                            "high_compression_ratio": 1, "no_compression_ratio": 1},
}


@pytest.mark.parametrize("names", list(SIGNAL_CASES), ids=lambda n: "+".join(n) or "none")
def test_signal_filters_drop_by_rule(signals_source, tmp_path, names):
    """Each filter alone and all three: the exact drop counts by rule (a row failing several
    under the first), a null value dropped as no_<signal>, a value at its threshold kept; the
    printed summary names each rule."""
    from pipelines.training_data import DROP_REASONS, format_training_data

    filters = TrainingFilters(**{name: SIGNAL_FILTERS[name] for name in names})
    manifest = build(signals_source, tmp_path / "ds", filters=filters)
    dropped = SIGNAL_CASES[names]
    assert manifest["counts"]["dropped"] == dropped and set(dropped) <= set(DROP_REASONS)
    assert manifest["counts"]["kept"] == len(SIGNAL_ROWS) + 1 - sum(dropped.values())
    assert manifest["filters"] == filters.model_dump()
    if len(names) == 3:
        kept = {r["source_uri"] for s in ("train", "validation")
                for r in read_split(tmp_path / "ds", s)}
        assert kept == {Q[i] for i, (_, fails) in enumerate(SIGNAL_ROWS) if fails is None}
        from collections import Counter  # the table's comments agree with the counts

        assert Counter(fails for _, fails in SIGNAL_ROWS if fails) + Counter(silent=1) \
            == Counter(dropped)
        assert "dropped: high_compression_ratio 1, low_avg_logprob 1, low_speech_ratio 2, " \
               "no_avg_logprob 2, no_compression_ratio 1, no_speech_ratio 1, silent 1" \
               in format_training_data(manifest)


def test_a_signal_filter_on_an_output_without_the_signal_is_refused(source, tmp_path):
    """An output labelled before the quality signals: a filter on them is refused in one line
    before anything is written; unset, the build goes on as before."""
    from pipelines.training_data import check_training_data
    from tests.pipelines.schema_v1 import copy_in_schema

    older = copy_in_schema(source, tmp_path / "older", 2)
    for name, value in SIGNAL_FILTERS.items():
        column = SIGNALS[name.split("_", 1)[1]]
        spec = TrainingDataSpec(input=older, output=str(tmp_path / "ds"), formats=[],
                                filters=TrainingFilters(**{name: value}))
        with pytest.raises(TrainingDataError, match=rf"^{name}: the segments of {older} have "
                                                    rf"no {column} column \(labelled before"):
            check_training_data(spec)
        with pytest.raises(TrainingDataError, match=f"no {column} column"):
            build_training_data(spec)
        assert not (tmp_path / "ds").exists()
    with pytest.raises(ValueError, match="less than or equal to 0"):
        TrainingFilters(min_avg_logprob=0.5)
    with pytest.raises(ValueError, match="less than or equal to 1"):
        TrainingFilters(min_speech_ratio=1.5)
    with pytest.raises(ValueError, match="greater than 0"):
        TrainingFilters(max_compression_ratio=0)


# -- every format, from the output backed by audio files ------------------------------------

BY_NAME = {uri.rsplit("/", 1)[1]: uri for uri in (A, B, C, D, E, F, G, H, ORPHAN, *MANY)}
EXPORTED_KEPT = len(CASES["strict"][1]) - 6  # GONE's and CHANGED's 3 segments each


@pytest.fixture(scope="module")
def audio_source(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("labelled-audio")
    return make_output(root / "out", audio=root / "audio")


@pytest.fixture(scope="module")
def exported(audio_source, tmp_path_factory) -> tuple[Path, dict]:
    """One build in every format (the default) from the output backed by audio files."""
    dest = tmp_path_factory.mktemp("exported") / "ds"
    return dest, build_training_data(TrainingDataSpec(
        input=audio_source, output=str(dest), filters=STRICT, validation_fraction=0.3,
        rows_per_shard=7))


def labels_of(row: dict) -> dict:
    """The input labels of a written row (its source is an audio file named as in the
    hand-made rows)."""
    return expected_row((BY_NAME[Path(row["source_uri"]).name], row["segment_index"]))


def samples_of(row: dict) -> int:
    return round(row["end_s"] * 16000) - round(row["start_s"] * 16000)


def files_listed(manifest: dict, folder_files) -> list[str]:
    """The paths of every object the manifest names: a lhotse-audio entry is a folder, whose
    files `folder_files(path)` lists ((name, size) pairs), checked against its counts."""
    listed = []
    for shard in manifest["shards"]:
        if shard["format"] != "lhotse-audio":
            listed.append(shard["path"])
            continue
        files = folder_files(shard["path"])
        assert len(files) == shard["rows"] and sum(size for _, size in files) == shard["bytes"]
        listed += [f"{shard['path']}{name}" for name, _ in files]
    return sorted(listed)


def test_manifest_matches_the_files(exported, audio_source):
    dest, result = exported
    manifest = json.loads((dest / "manifest.json").read_text())
    assert result["manifest_uri"] == f"{dest}/manifest.json"
    assert manifest["source"] == audio_source and manifest["filters"] == STRICT.model_dump()
    assert manifest["created_at"] and manifest["source_runs"] == [RUN]
    assert manifest["formats"] == ["webdataset", "lhotse", "hf"]
    assert manifest["counts"]["dropped"] == {**CASES["strict"][2], "source_changed": 6}
    assert manifest["counts"]["kept"] == EXPORTED_KEPT
    on_disk = sorted(str(p.relative_to(dest)) for p in dest.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert files_listed(manifest, lambda path: sorted(
        (p.name, p.stat().st_size) for p in (dest / path).iterdir())) == on_disk
    for shard in (s for s in manifest["shards"] if s["format"] != "lhotse-audio"):
        data = (dest / shard["path"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["bytes"] == len(data)
        if shard["format"] in ("parquet", "hf"):
            assert pq.read_metadata(dest / shard["path"]).num_rows == shard["rows"]
    for split, stats in manifest["counts"]["splits"].items():
        rows = read_split(dest, split)
        assert stats["rows"] == len(rows) == sum(
            s["rows"] for s in manifest["shards"] if s["split"] == split
            and s["format"] == "parquet")
        assert stats["source_files"] == len({r["source_uri"] for r in rows})
        assert stats["tokens"] == sum(r["num_tokens"] for r in rows)
        for row in rows:
            assert row == {**labels_of(row), "source_uri": row["source_uri"],
                           "key": sample_key(row["source_uri"], row["segment_index"])}
    assert [f["name"] for f in manifest["schema"]][:10] == [
        "key", "source_uri", "segment_index", "start_s", "end_s", "duration_s", "num_tokens",
        "semantic_tokens", "transcript", "language"]


def test_lhotse_manifests_match_the_labels(exported):
    from lhotse import CutSet, load_manifest

    from kimi_ops.audio import load_audio

    dest, _ = exported
    waves: dict[str, np.ndarray] = {}
    for split in ("train", "validation"):
        rows = {r["key"]: r for r in read_split(dest, split)}
        cuts = CutSet.from_manifests(
            recordings=load_manifest(dest / "lhotse" / f"recordings_{split}.jsonl.gz"),
            supervisions=load_manifest(dest / "lhotse" / f"supervisions_{split}.jsonl.gz"))
        assert sorted(cut.recording_id for cut in cuts) == sorted(rows)
        for cut in cuts:
            row = rows[cut.recording_id]
            labels = labels_of(row)
            (sup,) = cut.supervisions
            assert (sup.text, sup.language) == (labels["transcript"], labels["language"])
            assert {k: sup.custom[k] for k in ("emotion", "emotion_confidence", "scene",
                                               "scene_confidence", "semantic_tokens")} \
                == {k: labels[k] for k in ("emotion", "emotion_confidence", "scene",
                                           "scene_confidence", "semantic_tokens")}
            assert (sup.custom["source_uri"], sup.custom["segment_index"],
                    sup.custom["source_start_s"], sup.custom["source_end_s"]) \
                == (row["source_uri"], row["segment_index"], row["start_s"], row["end_s"])
            assert sup.start == 0 and sup.duration == cut.duration \
                == pytest.approx(labels["duration_s"], abs=1e-9)
            samples = cut.load_audio()  # the FLAC the recording points to
            assert cut.sampling_rate == 16000 and samples.shape == (1, samples_of(row))
            if row["source_uri"] not in waves:
                waves[row["source_uri"]] = load_audio(row["source_uri"])
            start = round(row["start_s"] * 16000)
            np.testing.assert_allclose(  # the samples the model labelled, in 16 bits
                samples[0], waves[row["source_uri"]][start:start + samples.shape[1]],
                atol=1 / 32768)
    assert len(waves) > 2 and any(Path(u).name == Path(C).name for u in waves)  # C: 22.05 kHz


def test_hf_dataset_matches_the_labels(exported, tmp_path):
    import importlib.util

    import datasets

    dest, manifest = exported
    loaded = datasets.load_dataset(str(dest / "hf"), cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(loaded) == ["train", "validation"]
    for split, ds in loaded.items():
        assert ds.features["audio"] == datasets.Audio(sampling_rate=16000)
        rows = read_split(dest, split)
        assert len(ds) == len(rows) == manifest["counts"]["splits"][split]["rows"]
        for row, got in zip(rows, ds.cast_column("audio", datasets.Audio(decode=False))):
            audio = got.pop("audio")
            assert got == row  # the label columns, row for row
            assert got["emotion"] == labels_of(row)["emotion"]
            samples, rate = sf.read(io.BytesIO(audio["bytes"]), dtype="float32")
            assert rate == 16000 and samples.shape == (samples_of(row),)
            assert audio["path"] == f"{row['key']}.flac"
            (flac,) = dest.glob(f"lhotse/audio/{split}-*/{row['key']}.flac")
            assert audio["bytes"] == flac.read_bytes()  # one encoding for both exports
    if importlib.util.find_spec("torchcodec") is not None:  # datasets decodes with it
        first = loaded["train"][0]
        decoded = first["audio"].get_all_samples()
        assert decoded.sample_rate == 16000
        assert decoded.data.shape[-1] == samples_of(first)


def test_webdataset_tars_match_the_parquet_shards(source, tmp_path):
    dest = tmp_path / "ds"
    build(source, dest, filters=STRICT, validation_fraction=0.3, rows_per_shard=7,
          formats=["webdataset"])
    for split in ("train", "validation"):
        parquet = sorted((dest / split).glob("*.parquet"))
        tars = sorted((dest / "webdataset").glob(f"{split}-*.tar"))
        assert [p.name for p in tars] == [f"{split}-{i:06d}.tar" for i in range(len(parquet))]
        for pq_path, tar_path in zip(parquet, tars):
            rows = pq.read_table(pq_path).to_pylist()
            with tarfile.open(tar_path) as tar:
                members = tar.getmembers()
                names = [m.name for m in members]
                assert names == [n for r in rows
                                 for n in (f"{r['key']}.json", f"{r['key']}.tokens.npy")]
                for row in rows:
                    assert "." not in row["key"] and "/" not in row["key"]
                    meta = json.loads(tar.extractfile(f"{row['key']}.json").read())
                    tokens = np.load(io.BytesIO(tar.extractfile(
                        f"{row['key']}.tokens.npy").read()), allow_pickle=False)
                    assert tokens.dtype == np.int32
                    assert tokens.tolist() == row.pop("semantic_tokens")
                    assert meta == row
    keys = [r["key"] for s in ("train", "validation") for r in read_split(dest, s)]
    assert len(keys) == len(set(keys))


def test_clear_errors(source, tmp_path):
    no_tokens = make_output(tmp_path / "no-tokens", semantic_tokens=False)
    with pytest.raises(TrainingDataError, match="no semantic_tokens column.*--semantic-tokens"):
        build(no_tokens, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    with pytest.raises(TrainingDataError, match="not a labelled output"):
        build(str(tmp_path / "nothing"), tmp_path / "ds")
    with pytest.raises(TrainingDataError, match=r"min_confidence names \['speaker'\]"):
        build(source, tmp_path / "ds", filters=TrainingFilters(min_confidence={"speaker": 0.5}))
    with pytest.raises(ValueError, match="max_duration_s"):
        TrainingFilters(min_duration_s=5, max_duration_s=1)
    with pytest.raises(ValueError, match="output must differ"):
        TrainingDataSpec(input=source, output=f"{source}/segments/x")
    with pytest.raises(ValueError, match="unknown format 'tar'; the formats are webdataset, "
                                         "lhotse, hf"):
        TrainingDataSpec(input=source, output=str(tmp_path / "ds"), formats=["hf", "tar"])

    dest = tmp_path / "built"
    build(source, dest, rows_per_shard=7)
    with pytest.raises(TrainingDataError, match="already holds a build"):
        build(source, dest)
    again = build(source, dest, rows_per_shard=1000, overwrite=True)  # old shards replaced
    on_disk = sorted(str(p.relative_to(dest)) for p in dest.rglob("*.parquet"))
    assert on_disk == sorted(s["path"] for s in again["shards"])
    (dest / "manifest.json").unlink()  # an interrupted build: cleared without overwrite
    build(source, dest, rows_per_shard=1000)
    (dest / "train" / "notes.txt").write_text("mine")
    with pytest.raises(TrainingDataError, match="not training shards"):
        build(source, dest, overwrite=True)


def test_check_training_data_refuses_before_anything_is_written(source, tmp_path):
    """The console's pre-flight: the input checked as the flow checks it, and an output that
    holds a build refused unless overwrite."""
    from pipelines.training_data import check_training_data

    built = tmp_path / "built"
    build(source, built)
    info = check_training_data(TrainingDataSpec(input=source, output=str(tmp_path / "new")))
    assert info.tasks == ["emotion", "scene"] and info.shards_without_tokens == 1
    with pytest.raises(TrainingDataError,
                       match=r"already holds a build \(manifest.json\); pass --overwrite"):
        check_training_data(TrainingDataSpec(input=source, output=str(built)))
    check_training_data(TrainingDataSpec(input=source, output=str(built), overwrite=True))
    with pytest.raises(TrainingDataError, match="is not a labelled output"):
        check_training_data(TrainingDataSpec(input=str(tmp_path / "nowhere"),
                                             output=str(tmp_path / "new")))
    assert not (tmp_path / "new").exists()


def test_s3_source_and_destination(seaweed, s3_prefix, audio_source):
    """Input and output on S3 (the audio stays local): every format, and the lhotse recordings
    point at their FLACs by URI."""
    import gzip

    from pipelines.storage import resolve

    options = seaweed.storage_options
    fs, _ = resolve(s3_prefix, options)
    src = f"{s3_prefix}/labels"
    fs.put(f"{audio_source}/", src.removeprefix("s3://"), recursive=True)
    dest = f"{s3_prefix}/training"
    spec = {"input": src, "output": dest, "filters": STRICT, "validation_fraction": 0.3,
            "rows_per_shard": 7, "storage_options": options}
    build_training_data(TrainingDataSpec(**spec, formats=["webdataset"]))
    manifest = build_training_data(TrainingDataSpec(**spec, overwrite=True))  # replaces
    assert manifest["counts"]["kept"] == EXPORTED_KEPT
    assert manifest["manifest_uri"] == f"{dest}/manifest.json"
    root = dest.removeprefix("s3://")
    stored = json.loads(fs.cat_file(f"{root}/manifest.json"))
    assert stored["counts"] == manifest["counts"]
    for shard in (s for s in stored["shards"] if s["format"] != "lhotse-audio"):
        assert hashlib.sha256(fs.cat_file(f"{root}/{shard['path']}")).hexdigest() \
            == shard["sha256"]
    listed = sorted(p[len(root) + 1:] for p in fs.find(root))
    assert listed == sorted(files_listed(stored, lambda path: sorted(
        (p.rsplit("/", 1)[1], fs.size(p)) for p in fs.find(f"{root}/{path}")))
        + ["manifest.json"])
    recording = json.loads(gzip.decompress(fs.cat_file(
        f"{root}/lhotse/recordings_train.jsonl.gz")).splitlines()[0])
    (audio,) = recording["sources"]
    assert audio["type"] == "url" and audio["source"].startswith(f"{dest}/lhotse/audio/train-")
    assert fs.size(audio["source"].removeprefix("s3://")) > 0


# -- the flow ----------------------------------------------------------------------------

def test_flow_builds_and_publishes(harness, source, tmp_path):
    from flows.prepare_training_data import prepare_training_data

    params = TrainingDataSpec(input=source, output=str(tmp_path / "ds"), filters=STRICT,
                              validation_fraction=0.3, rows_per_shard=7,
                              formats=["webdataset"])
    manifest = prepare_training_data(params)
    assert manifest["counts"]["kept"] == len(CASES["strict"][1])
    assert (tmp_path / "ds" / "manifest.json").exists()

    keys = ["prepare-training-data-counts", "prepare-training-data-output"]
    found = asyncio.run(artifacts(keys))
    assert set(found) == set(keys)
    table = {r["metric"]: r["value"]
             for r in json.loads(found["prepare-training-data-counts"].data)}
    splits = manifest["counts"]["splits"]
    assert table["input segments"] == INPUT_ROWS and table["kept"] == 62
    assert table["train: segments"] == splits["train"]["rows"]
    assert table["validation: segments"] == splits["validation"]["rows"]
    assert table["dropped: low_confidence:emotion"] == 1 and table["dropped: silent"] == 1
    assert f"{tmp_path / 'ds'}/manifest.json" in found["prepare-training-data-output"].data


def test_flow_refuses_a_source_without_tokens(harness, tmp_path):
    from flows.prepare_training_data import prepare_training_data

    source = make_output(tmp_path / "no-tokens", semantic_tokens=False)
    state = prepare_training_data(TrainingDataSpec(
        input=source, output=str(tmp_path / "ds")), return_state=True)
    assert state.is_failed()
    with pytest.raises(TrainingDataError, match="semantic_tokens"):
        state.result()


def test_an_empty_build_is_said_and_a_nan_fraction_named(source, tmp_path):
    from pipelines.training_data import format_training_data

    manifest = build(source, tmp_path / "ds", filters=TrainingFilters(min_duration_s=1e6))
    assert manifest["counts"]["kept"] == 0
    printed = format_training_data(manifest)
    assert printed.startswith("warning: the build is empty: every segment was dropped, most by "
                              "too_short (--filters sets the rules")
    assert not format_training_data(build(source, tmp_path / "ds2")).startswith("warning")
    with pytest.raises(ValueError, match="finite number"):
        TrainingDataSpec(input=source, output=str(tmp_path / "x"),
                         validation_fraction=float("nan"))
