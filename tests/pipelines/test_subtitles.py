"""The transcribe-archive flow and its subtitle writers.

Subtitle formatting is checked against hand-computed text; the flow runs end to end under
Prefect's test harness on a real local Ray and the tiny random checkpoint, whose transcripts are
meaningless (often empty once special tokens are removed), so there the structure is checked and
the exact text is checked by calling the writer on known segment rows.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipelines.subtitles import split_cue, to_srt, to_webvtt
from tests import goldens
from tests.flow_helpers import artifacts

pytestmark = pytest.mark.slow
MODEL = str(goldens.CHECKPOINT)


# -- subtitle formats ------------------------------------------------------------------------

def test_srt_numbers_from_one_formats_hours_and_skips_empty_text():
    cues = [(0.0, 2.5, "hello there"), (3.0, 4.0, ""), (4.0, 5.0, None), (5.0, 6.0, "  \n "),
            (3725.25, 3726.002, "over an\nhour")]
    assert to_srt(cues) == (
        "1\n00:00:00,000 --> 00:00:02,500\nhello there\n"
        "\n"
        "2\n01:02:05,250 --> 01:02:06,002\nover an hour\n")
    assert to_srt([]) == ""


def test_webvtt_header_dot_timestamps_and_arrow_escaping():
    cues = [(0.0, 1.0, "a --> b & <c>"), (1.0, 1.0, ""), (36000.0, 36001.5, "ten hours")]
    assert to_webvtt(cues) == (
        "WEBVTT\n"
        "\n"
        "00:00:00.000 --> 00:00:01.000\na --&gt; b &amp; &lt;c&gt;\n"
        "\n"
        "10:00:00.000 --> 10:00:01.500\nten hours\n")
    assert to_webvtt([]) == "WEBVTT\n"
    assert [line for line in to_webvtt(cues).splitlines() if "-->" in line] == [
        "00:00:00.000 --> 00:00:01.000", "10:00:00.000 --> 10:00:01.500"]  # timing lines only
    assert to_srt(cues[:1]) == "1\n00:00:00,000 --> 00:00:01,000\na --> b & <c>\n"  # SRT: as is


def test_long_segment_splits_into_two_line_cues_with_interpolated_times():
    # 10 words of 9 letters: 99 characters; a 99 s segment gives 1 s per character
    words = [c * 9 for c in "abcdefghij"]
    text = " ".join(words)
    # fewest 42-character lines: 3 (4 + 4 + 2 words); no narrower width keeps 3 lines, so
    # lines of 39, 39 and 19 characters; cues: lines 1-2 (offsets 0..80), line 3 (80..99)
    line1, line2, line3 = " ".join(words[:4]), " ".join(words[4:8]), " ".join(words[8:])
    assert to_srt([(3600.0, 3699.0, text)]) == (
        f"1\n01:00:00,000 --> 01:01:20,000\n{line1}\n{line2}\n"
        "\n"
        f"2\n01:01:20,000 --> 01:01:39,000\n{line3}\n")
    assert to_webvtt([(3600.0, 3699.0, text)]) == (
        f"WEBVTT\n\n01:00:00.000 --> 01:01:20.000\n{line1}\n{line2}\n"
        f"\n01:01:20.000 --> 01:01:39.000\n{line3}\n")
    # one cue per 19-character line (2 words), 49 characters over 49 s: cues start at the
    # offsets of their first word (0, 20, 40) and end where the next starts, the last at the end
    cues = split_cue(10.0, 59.0, " ".join(["x" * 9] * 5), line_chars=19, lines_per_cue=1)
    assert [(c.start_s, c.end_s) for c in cues] == [(10.0, 30.0), (30.0, 50.0), (50.0, 59.0)]


def test_wrapping_is_balanced_and_cjk_breaks_between_characters():
    # 48 characters fit two lines; balanced lines instead of 42 + 5
    text = "one two three four five six seven eight nine ten"
    (cue,) = split_cue(0.0, 4.0, text)
    assert cue.text == "one two three four five\nsix seven eight nine ten"
    # Chinese has no spaces: 64 characters, 2 lines of 32; punctuation stays with its character
    zh = "今天天气很好，我们去公园散步吧！" * 4
    (cue,) = split_cue(0.0, 6.0, zh)
    lines = cue.text.split("\n")
    assert lines == [zh[:32], zh[32:]] and all(len(line) <= 42 for line in lines)
    assert not any(line[0] in "，！" for line in lines)
    # a word longer than a line is cut, not overflowing
    (cue,) = split_cue(0.0, 1.0, "x" * 50)
    assert cue.text == "x" * 42 + "\n" + "x" * 8


# -- subtitle paths and the writer over known rows ---------------------------------------------

def test_relative_paths_below_the_prefix_else_basename():
    from pipelines.subtitles import input_prefix, relative_path, subtitle_names

    prefix = input_prefix("s3://audio/corpus/", is_manifest=False, is_single_object=False)
    assert prefix == ("s3", "audio/corpus")
    assert relative_path("s3://audio/corpus/a/b.wav", prefix) == "a/b.wav"
    assert relative_path("s3://audio/corpus2/b.wav", prefix) == "b.wav"  # not below: basename
    assert relative_path("/local/corpus/x.wav", prefix) == "x.wav"
    manifest = input_prefix("/data/lists/m.csv", is_manifest=True, is_single_object=False)
    assert relative_path("/data/lists/sub/x.wav", manifest) == "sub/x.wav"
    names = subtitle_names(["/elsewhere/one/x.wav", "/elsewhere/two/x.wav",
                            "/data/lists/y.wav"], manifest)
    assert names["/data/lists/y.wav"] == "y.wav"
    assert re.fullmatch(r"x\.wav\.[0-9a-f]{8}", names["/elsewhere/one/x.wav"])
    assert names["/elsewhere/one/x.wav"] != names["/elsewhere/two/x.wav"]


def test_writer_on_known_segment_rows(tmp_path):
    import fsspec

    from pipelines.subtitles import write_file_subtitles

    fs = fsspec.filesystem("file")
    rows = [  # out of order on purpose; a silent segment gives no cue
        {"segment_index": 2, "start_s": 3700.0, "end_s": 3702.5, "status": "ok",
         "transcript": "the end"},
        {"segment_index": 0, "start_s": 0.0, "end_s": 1.25, "status": "ok",
         "transcript": "first words"},
        {"segment_index": 1, "start_s": 1.25, "end_s": 3700.0, "status": "silent",
         "transcript": None},
    ]
    paths = write_file_subtitles(fs, str(tmp_path), "dir/talk.wav", rows)
    assert paths == [f"{tmp_path}/subtitles/dir/talk.wav.srt",
                     f"{tmp_path}/subtitles/dir/talk.wav.vtt"]
    assert (tmp_path / "subtitles/dir/talk.wav.srt").read_text() == (
        "1\n00:00:00,000 --> 00:00:01,250\nfirst words\n"
        "\n2\n01:01:40,000 --> 01:01:42,500\nthe end\n")
    assert (tmp_path / "subtitles/dir/talk.wav.vtt").read_text() == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.250\nfirst words\n"
        "\n01:01:40.000 --> 01:01:42.500\nthe end\n")


def test_run_subtitles_cover_every_attempt_of_the_run_and_nothing_else(tmp_path):
    """Two shards with this run's id (a retried attempt writes its own shard), one of another
    run whose subtitles are in place, an error row of this run whose old subtitles go, and a
    rerun that rewrites the same bytes."""
    from kimi_ops.tasks import get_task
    from pipelines.schema import files_schema, segments_schema, to_table
    from pipelines.spec import TranscribeArchiveSpec
    from pipelines.storage import write_parquet_atomic
    from pipelines.subtitles import write_run_subtitles

    inputs, out = tmp_path / "in", str(tmp_path / "out")
    (inputs / "a").mkdir(parents=True)
    for name in ("a/one.wav", "two.wav", "old.wav", "bad.wav"):
        (inputs / name).write_bytes(b"x")
    tasks = [get_task("asr")]

    def shard(name, run_id, files):
        file_rows, seg_rows = [], []
        for uri, status, texts in files:
            file_rows.append({"source_uri": uri, "status": status, "run_id": run_id,
                              "duration_s": 2.0 * len(texts) if status == "ok" else None,
                              "error": None if status == "ok" else
                              {"kind": "undecodable", "message": "no"}})
            seg_rows += [{"source_uri": uri, "segment_index": i, "start_s": 2.0 * i,
                          "end_s": 2.0 * i + 2, "status": "ok", "transcript": t,
                          "run_id": run_id} for i, t in enumerate(texts)]
        import fsspec

        fs = fsspec.filesystem("file")
        write_parquet_atomic(fs, out, f"segments/{name}",
                             to_table(seg_rows, segments_schema(tasks)))
        write_parquet_atomic(fs, out, f"files/{name}", to_table(file_rows, files_schema(tasks)))

    shard("part-1.parquet", "R", [(str(inputs / "a/one.wav"), "ok", ["hi", "there"])])
    shard("part-2.parquet", "R", [(str(inputs / "two.wav"), "ok", ["two"]),
                                  (str(inputs / "bad.wav"), "error", [])])
    shard("part-3.parquet", "OTHER", [(str(inputs / "old.wav"), "ok", ["old"])])
    stale = tmp_path / "out/subtitles/bad.wav.srt"
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier run")
    for suffix in (".srt", ".vtt"):  # written by run OTHER after its rows: left alone
        (tmp_path / f"out/subtitles/old.wav{suffix}").write_text("run OTHER's")

    spec = TranscribeArchiveSpec(input=str(inputs), output=out, model=MODEL, run_id="R")
    counts = write_run_subtitles(spec, "R")
    assert counts["recordings"] == 2 and counts["segments"] == 3
    assert counts["subtitle_files"] == 4 and counts["subtitle_files_removed"] == 1
    assert counts["errors_by_kind"] == {"undecodable": 1}
    written = sorted(p.relative_to(tmp_path / "out/subtitles").as_posix()
                     for p in (tmp_path / "out/subtitles").rglob("*") if p.is_file())
    assert written == ["a/one.wav.srt", "a/one.wav.vtt", "old.wav.srt", "old.wav.vtt",
                       "two.wav.srt", "two.wav.vtt"]
    assert counts["recovered"] == 0 and stale.parent.joinpath("old.wav.srt").read_text() == (
        "run OTHER's")
    srt = (tmp_path / "out/subtitles/a/one.wav.srt").read_text()
    assert srt == ("1\n00:00:00,000 --> 00:00:02,000\nhi\n"
                   "\n2\n00:00:02,000 --> 00:00:04,000\nthere\n")
    before = {p: p.read_bytes() for p in (tmp_path / "out/subtitles").rglob("*.*")}
    assert write_run_subtitles(spec, "R")["subtitle_files"] == 4  # a retried task: same bytes
    assert {p: p.read_bytes() for p in (tmp_path / "out/subtitles").rglob("*.*")} == before
    assert write_run_subtitles(spec, "NEW")["subtitle_files"] == 0  # nothing of a new run


def test_a_run_on_a_subfolder_keeps_the_names_an_earlier_run_gave(tmp_path):
    """Run R1 on the archive names a recording `a/one.wav`; later runs on `archive/a` find its
    subtitles under that name (recorded in `_runs/R1/`) instead of writing copies as `one.wav`,
    and write back a missing one under R1's name."""
    import fsspec

    from kimi_ops.tasks import get_task
    from pipelines.schema import files_schema, segments_schema, to_table
    from pipelines.spec import TranscribeArchiveSpec
    from pipelines.storage import write_parquet_atomic
    from pipelines.subtitles import write_run_subtitles

    inputs, out = tmp_path / "archive", tmp_path / "out"
    (inputs / "a").mkdir(parents=True)
    uris = [str(inputs / "a/one.wav"), str(inputs / "a/two.wav")]
    for uri in uris:
        Path(uri).write_bytes(b"x")
    tasks = [get_task("asr")]
    files = [{"source_uri": u, "status": "ok", "run_id": "R1", "duration_s": 1.0, "error": None}
             for u in uris]
    segments = [{"source_uri": u, "segment_index": 0, "start_s": 0.0, "end_s": 1.0,
                 "status": "ok", "transcript": "hi", "run_id": "R1"} for u in uris]
    fs = fsspec.filesystem("file")
    write_parquet_atomic(fs, str(out), "segments/p.parquet",
                         to_table(segments, segments_schema(tasks)))
    write_parquet_atomic(fs, str(out), "files/p.parquet", to_table(files, files_schema(tasks)))

    def run(folder, run_id):
        spec = TranscribeArchiveSpec(input=str(folder), output=str(out), model=MODEL,
                                     run_id=run_id)
        return write_run_subtitles(spec, run_id)

    def written():
        return sorted(p.relative_to(out / "subtitles").as_posix()
                      for p in (out / "subtitles").rglob("*") if p.is_file())

    assert run(inputs, "R1")["subtitle_files"] == 4
    expected = ["a/one.wav.srt", "a/one.wav.vtt", "a/two.wav.srt", "a/two.wav.vtt"]
    assert written() == expected
    assert json.loads((out / "_runs/R1/subtitles.json").read_text())["path"] == str(inputs)

    idle = run(inputs / "a", "R2")
    assert idle["subtitle_files"] == 0 and idle["recovered"] == 0 and written() == expected
    (out / "subtitles/a/two.wav.srt").unlink()
    again = run(inputs / "a", "R3")
    assert again["recovered"] == 1 and again["subtitle_files"] == 2 and written() == expected

    # the shard rewritten later (a rerun dropping a changed object's row from it): newer than
    # the subtitles, which still hold what they should: compared, not rewritten
    shard = out / "files/p.parquet"
    os.utime(shard, (shard.stat().st_mtime + 100, shard.stat().st_mtime + 100))
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "subtitles").rglob("*.*")}
    touched = run(inputs, "R4")
    assert touched["subtitle_files"] == 0 and touched["recovered"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "subtitles").rglob("*.*")} == mtimes


def test_runs_on_sibling_folders_do_not_overwrite_each_others_subtitles(tmp_path):
    """A day's folder per run, into one output, with the recorder's names repeating: the second
    day's `rec.wav` would take `subtitles/rec.wav.srt` from the first's. It gets its hash
    instead, recorded, so later runs find (and write back) it under that name."""
    import hashlib

    import fsspec

    from kimi_ops.tasks import get_task
    from pipelines.schema import files_schema, segments_schema, to_table
    from pipelines.spec import TranscribeArchiveSpec
    from pipelines.storage import write_parquet_atomic
    from pipelines.subtitles import write_run_subtitles

    archive, out = tmp_path / "archive", tmp_path / "out"
    fs = fsspec.filesystem("file")
    tasks = [get_task("asr")]

    def labelled(day, run_id, text):
        (archive / day).mkdir(parents=True)
        uri = str(archive / day / "rec.wav")
        Path(uri).write_bytes(b"x")
        write_parquet_atomic(fs, str(out), f"segments/{day}.parquet", to_table(
            [{"source_uri": uri, "segment_index": 0, "start_s": 0.0, "end_s": 1.0,
              "status": "ok", "transcript": text, "run_id": run_id}], segments_schema(tasks)))
        write_parquet_atomic(fs, str(out), f"files/{day}.parquet", to_table(
            [{"source_uri": uri, "status": "ok", "run_id": run_id, "duration_s": 1.0,
              "error": None}], files_schema(tasks)))
        return uri

    def run(day, run_id):
        spec = TranscribeArchiveSpec(input=str(archive / day), output=str(out), model=MODEL,
                                     run_id=run_id)
        return write_run_subtitles(spec, run_id)

    labelled("day1", "R1", "first day")
    assert run("day1", "R1")["subtitle_files"] == 2
    second = labelled("day2", "R2", "second day")
    assert run("day2", "R2")["subtitle_files"] == 2
    hashed = f"rec.wav.{hashlib.sha256(second.encode()).hexdigest()[:8]}"
    subtitles = out / "subtitles"
    assert sorted(p.name for p in subtitles.iterdir()) == sorted(
        ["rec.wav.srt", "rec.wav.vtt", f"{hashed}.srt", f"{hashed}.vtt"])
    assert "first day" in (subtitles / "rec.wav.srt").read_text()
    assert "second day" in (subtitles / f"{hashed}.srt").read_text()

    assert run("day2", "R3")["subtitle_files"] == 0  # nothing new, nothing missing
    (subtitles / f"{hashed}.vtt").unlink()
    again = run("day2", "R4")
    assert again["recovered"] == 1 and (subtitles / f"{hashed}.vtt").is_file()
    assert "first day" in (subtitles / "rec.wav.srt").read_text()


# -- the flow end to end -----------------------------------------------------------------------

def recording_with_pauses(seconds: int, sr: int = 16000) -> bytes:
    """A modulated tone with a 0.6 s pause every 9 s: cut into >= 3 segments at the pauses."""
    t = np.arange(seconds * sr) / sr
    wave = 0.3 * np.sin(2 * np.pi * 300 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    for start in range(7, seconds, 9):
        wave[start * sr: int((start + 0.6) * sr)] = 0.0
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


TIMING = re.compile(r"^(\d\d):(\d\d):(\d\d)[,.](\d\d\d) --> (\d\d):(\d\d):(\d\d)[,.](\d\d\d)$",
                    re.MULTILINE)


def cue_times(text: str) -> list[tuple[float, float]]:
    def secs(h, m, s, ms):
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000

    return [(secs(*g[:4]), secs(*g[4:])) for g in TIMING.findall(text)]


def test_transcribe_archive_flow_writes_subtitles_publishes_and_reruns_idle(
        harness, ray_local, tmp_path):
    from flows.transcribe_archive import transcribe_archive
    from pipelines.spec import TranscribeArchiveSpec

    inputs, out = tmp_path / "in", tmp_path / "out"
    (inputs / "archive").mkdir(parents=True)
    (inputs / "archive/talk_70s.wav").write_bytes(recording_with_pauses(70))
    shutil.copy(goldens.INPUTS / "a06_speech_2p37s_16k.flac", inputs / "clip.flac")
    (inputs / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    params = TranscribeArchiveSpec(input=str(inputs), output=str(out), model=MODEL,
                                   max_new_tokens=3)
    report = transcribe_archive(params)
    assert report["status"] == {"ok": 2, "error": 1}
    subs = report["subtitles"]
    assert subs["run_id"] == report["run_id"] and subs["recordings"] == 2
    assert re.fullmatch(r"\d{8}T\d{6}-[0-9a-f]{8}", report["run_id"])  # from the flow run: a
    # retried task or flow run reuses it, so its subtitles cover every attempt
    assert subs["subtitle_files"] == 4 and subs["errors_by_kind"] == {"undecodable": 1}

    files = pq.read_table(out / "files").to_pylist()
    segments = pq.read_table(out / "segments").to_pylist()
    duration = {r["source_uri"]: r["duration_s"] for r in files}
    long_uri = str(inputs / "archive/talk_70s.wav")
    assert sum(s["source_uri"] == long_uri for s in segments) >= 3
    assert subs["segments"] == len(segments)

    for rel in ("archive/talk_70s.wav", "clip.flac"):
        uri = str(inputs / rel)
        ordered = sorted((s for s in segments if s["source_uri"] == uri),
                         key=lambda s: s["segment_index"])
        cues = [(s["start_s"], s["end_s"], s["transcript"]) for s in ordered
                if s["status"] == "ok"]
        srt = (out / "subtitles" / f"{rel}.srt").read_text()
        vtt = (out / "subtitles" / f"{rel}.vtt").read_text()
        assert srt == to_srt(cues) and vtt == to_webvtt(cues)  # whatever the random model said
        assert vtt.startswith("WEBVTT\n")
        times = cue_times(srt)
        assert times == cue_times(vtt)
        assert len(re.findall(r"^\d+$", srt, re.MULTILINE)) == len(times)
        flat = [t for pair in times for t in pair]
        assert flat == sorted(flat)  # monotonic, no overlap
        assert all(0 <= t <= duration[uri] + 0.001 for t in flat)
    assert not list((out / "subtitles").glob("broken.wav*"))
    written = sorted(p.relative_to(out / "subtitles").as_posix()
                     for p in (out / "subtitles").rglob("*") if p.is_file())
    assert written == ["archive/talk_70s.wav.srt", "archive/talk_70s.wav.vtt",
                       "clip.flac.srt", "clip.flac.vtt"]

    found = asyncio.run(artifacts(["transcribe-archive-summary", "transcribe-archive-output"]))
    assert set(found) == {"transcribe-archive-summary", "transcribe-archive-output"}
    summary = {row["metric"]: row["value"]
               for row in json.loads(found["transcribe-archive-summary"].data)}
    assert summary["recordings transcribed"] == 2 and summary["errors: undecodable"] == 1
    assert summary["subtitle files written"] == 4 and summary["segments"] == len(segments)
    assert summary["audio hours"] == round((70 + 2.37) / 3600, 4)
    assert f"{out}/subtitles/" in found["transcribe-archive-output"].data

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "subtitles").rglob("*.*")}
    again = transcribe_archive(params)  # a new run with nothing new: labels and writes nothing
    assert again["processed"] == 0 and again["planned"]["already_done"] == 3
    assert again["run_id"] != report["run_id"] and again["subtitles"]["subtitle_files"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "subtitles").rglob("*.*")} == mtimes


def test_a_rerun_writes_the_subtitles_a_stopped_run_left_missing_or_stale(
        harness, ray_local, tmp_path):
    """A run stopped between labelling and subtitles: one recording's subtitles never written,
    another's still those of its previous content (older than its row). The next run, with
    nothing to label, writes both as the first run did; the one after writes nothing."""
    from flows.transcribe_archive import transcribe_archive
    from pipelines.spec import TranscribeArchiveSpec

    inputs, out = tmp_path / "in", tmp_path / "out"
    (inputs / "a").mkdir(parents=True)
    shutil.copy(goldens.INPUTS / "a06_speech_2p37s_16k.flac", inputs / "a/clip.flac")
    shutil.copy(goldens.INPUTS / "a02_chirp_3s_16k.wav", inputs / "chirp.wav")
    shutil.copy(goldens.INPUTS / "a01_tone_0p5s_16k.wav", inputs / "tone.wav")
    params = TranscribeArchiveSpec(input=str(inputs), output=str(out), model=MODEL,
                                   max_new_tokens=3)
    first = transcribe_archive(params)
    assert first["status"] == {"ok": 3} and first["subtitles"]["subtitle_files"] == 6
    subtitles = out / "subtitles"
    expected = {p: p.read_bytes() for p in subtitles.rglob("*.*")}
    assert len(expected) == 6

    for suffix in (".srt", ".vtt"):
        (subtitles / f"a/clip.flac{suffix}").unlink()
        stale = subtitles / f"chirp.wav{suffix}"
        stale.write_text("the previous content's transcript")
        os.utime(stale, (1e9, 1e9))  # 2001
    again = transcribe_archive(params)
    assert again["processed"] == 0 and again["planned"]["already_done"] == 3
    assert {p: p.read_bytes() for p in subtitles.rglob("*.*")} == expected
    subs = again["subtitles"]
    assert subs["recordings"] == 0 and subs["recovered"] == 2 and subs["subtitle_files"] == 4

    mtimes = {p: p.stat().st_mtime_ns for p in subtitles.rglob("*.*")}
    idle = transcribe_archive(params)["subtitles"]
    assert idle["subtitle_files"] == 0 and idle["recovered"] == 0
    assert {p: p.stat().st_mtime_ns for p in subtitles.rglob("*.*")} == mtimes


def test_transcribe_archive_refuses_bad_parameters(harness, tmp_path):
    from pydantic import ValidationError

    from flows.transcribe_archive import transcribe_archive
    from pipelines.spec import TranscribeArchiveSpec

    from pipelines.errors import JobError

    with pytest.raises(ValidationError):
        TranscribeArchiveSpec(input="x", output="y", model="m", language="fr")
    with pytest.raises(ValidationError):
        TranscribeArchiveSpec(input="x", output="y", model="m", stages={"nope": {}})
    with pytest.raises(ValidationError, match="runs the asr task only"):
        TranscribeArchiveSpec(input="x", output="y", model="m", tasks=["asr", "emotion"])
    assert TranscribeArchiveSpec(input="x", output="y", model="m").tasks == ["asr"]
    (tmp_path / "in").mkdir()
    shutil.copy(goldens.INPUTS / "a01_tone_0p5s_16k.wav", tmp_path / "in")
    state = transcribe_archive(TranscribeArchiveSpec(
        input=str(tmp_path / "in"), output=str(tmp_path / "out"),
        model=str(tmp_path / "no-model")), return_state=True)
    assert state.is_failed()
    with pytest.raises(JobError, match="checkpoint folder not found"):
        state.result()
