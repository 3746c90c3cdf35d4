"""The Ray Data job end to end: real SeaweedFS, a real local Ray, the tiny checkpoint."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipelines.job import JobError, JobSpec, run_job
from pipelines.spec import PIECE_SECONDS
from pipelines.storage import resolve
from tests import goldens
from tests.s3_fixtures import s3_prefix, seaweed  # noqa: F401

pytestmark = pytest.mark.slow
MODEL = str(goldens.CHECKPOINT)
TASKS = ["asr", "emotion", "scene"]


def encode(wave: np.ndarray, sr: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, sr: int, channels: int = 1, freq: float = 300.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    mono = 0.3 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return np.stack([mono] * channels, axis=1).astype(np.float32) if channels > 1 else mono


def long_with_pauses(seconds: int, sr: int = 16000) -> np.ndarray:
    wave = tone(seconds, sr)
    for start in range(7, seconds, 9):  # a 0.6 s pause every 9 s
        wave[start * sr: int((start + 0.6) * sr)] = 0.0
    return wave.astype(np.float32)


GOOD = {
    "mono_8k.wav": lambda: encode(tone(2, 8000), 8000, "WAV", "PCM_16"),
    "stereo_22k.flac": lambda: encode(tone(3, 22050, 2), 22050, "FLAC", "PCM_16"),
    "nested/vorbis_44k.ogg": lambda: encode(tone(2, 44100), 44100, "OGG", "VORBIS"),
    "nested/opus_48k.opus": lambda: encode(tone(2, 48000, 2), 48000, "OGG", "OPUS"),
    "mp3_44k.MP3": lambda: encode(tone(2, 44100), 44100, "MP3", "MPEG_LAYER_III"),
    "archive_65s.wav": lambda: encode(long_with_pauses(65), 16000, "WAV", "PCM_16"),
}
BAD = {
    "bad/random.wav": lambda: bytes(np.random.default_rng(0).integers(0, 255, 3000, np.uint8)),
    "bad/empty.flac": lambda: b"",
    "bad/zero_frames.wav": lambda: encode(np.zeros(0, np.float32), 16000, "WAV", "PCM_16"),
    "bad/text.mp3": lambda: b"this is a text file, not an mp3\n" * 20,
}


def upload(seaweed, prefix: str, files: dict) -> None:
    fs, root = resolve(prefix, seaweed.storage_options)
    fs.pipe({f"{root}/{name}": make() for name, make in files.items()})


def read_table(seaweed, output: str, table: str):
    fs, root = resolve(output, seaweed.storage_options)
    paths = sorted(p for p in fs.find(f"{root}/{table}") if p.endswith(".parquet"))
    import pyarrow as pa

    tables = []
    for p in paths:
        with fs.open(p, "rb") as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables) if tables else None


def spec_for(seaweed, prefix: str, **overrides) -> JobSpec:
    """A job over `prefix`/in. Its clips are tones: the loudness cutter labels them (voice
    activity, the default, calls them no speech; tests/kimi_ops/test_vad.py and the console's
    noisy-recording run test it)."""
    base = dict(input=f"{prefix}/in", output=f"{prefix}/out", model=MODEL, tasks=TASKS,
                max_new_tokens=6, semantic_tokens=True, storage_options=seaweed.storage_options,
                no_progress_timeout_s=240, segmenter="energy")
    base.update(overrides)
    return JobSpec(**base)


def test_job_labels_mixed_formats_segments_long_audio_and_reports_bad_files(
        seaweed, s3_prefix, ray_local, caplog, capfd):
    from pipelines.job import dry_run
    from pipelines.job.progress import watching
    from tests.pipelines.test_progress import Recorder

    upload(seaweed, f"{s3_prefix}/in", {**GOOD, **BAD, "notes.txt": lambda: b"skip me"})
    # the 65 s archive travels as pieces of at most 30 s, stitched back by the driver
    spec = spec_for(seaweed, s3_prefix, piece_seconds=30)
    # a dry run first: the plan, the audio from the headers (range reads), nothing written
    plan = dry_run(spec)
    n = len(GOOD) + len(BAD)
    assert plan["planned"] == {"listed": n, "todo": n, "new": n, "skipped_by_extension": 1}
    assert plan["audio"]["unreadable"] == len(BAD) and not plan["audio"]["estimated"]
    assert plan["audio"]["hours"] == pytest.approx((2 + 3 + 2 + 2 + 2 + 65) / 3600, rel=0.02)
    fs, out_root = resolve(spec.output, seaweed.storage_options)
    assert not fs.exists(out_root)
    seen = Recorder()
    with watching(seen):
        report = run_job(spec)
    # its progress counted every file once, the pieces of the archive as one file
    assert [(kind, p.files_done, p.files_total) for kind, p in seen.events] == [
        ("started", 0, n), *(("advanced", i, n) for i in range(1, n + 1)), ("ended", n, n)]
    assert seen.events[-1][1].audio_s == pytest.approx(report["audio_hours"] * 3600)

    files = read_table(seaweed, f"{s3_prefix}/out", "files")
    segments = read_table(seaweed, f"{s3_prefix}/out", "segments")
    con = duckdb.connect()
    con.register("files", files)
    con.register("segments", segments)
    expected = {f"{s3_prefix}/in/{name}" for name in {**GOOD, **BAD}}
    rows = con.sql("select source_uri, count(*) from files group by 1").fetchall()
    assert {uri for uri, _ in rows} == expected and all(n == 1 for _, n in rows)

    by_uri = {r["source_uri"]: r for r in files.to_pylist()}
    for name in GOOD:
        row = by_uri[f"{s3_prefix}/in/{name}"]
        assert row["status"] == "ok" and row["error"] is None, name
        assert row["etag"] and row["run_id"] == report["run_id"]
    kinds = {name: by_uri[f"{s3_prefix}/in/{name}"]["error"]["kind"] for name in BAD}
    assert kinds == {"bad/random.wav": "undecodable", "bad/empty.flac": "empty_audio",
                     "bad/zero_frames.wav": "empty_audio", "bad/text.mp3": "undecodable"}
    assert by_uri[f"{s3_prefix}/in/stereo_22k.flac"]["channels"] == 2
    assert by_uri[f"{s3_prefix}/in/stereo_22k.flac"]["sample_rate"] == 22050

    archive = f"{s3_prefix}/in/archive_65s.wav"
    segs = con.sql(f"select segment_index, start_s, end_s, status, len(semantic_tokens) n, "
                   f"transcript from segments where source_uri = '{archive}' "
                   f"order by segment_index").fetchall()
    assert len(segs) == by_uri[archive]["num_segments"] >= 3
    assert segs[0][1] == 0.0 and segs[-1][2] == pytest.approx(65.0)
    for (_, _, end, *_), (_, start, *_) in zip(segs, segs[1:]):
        assert end == start  # contiguous: the timestamps cover the recording
    for _, start, end, status, n, _ in segs:
        assert end - start <= 30.0 and status == "ok"
        assert n == int(np.ceil((end - start) * 16000 / 1280))  # 12.5 Hz semantic tokens
    stitched = " ".join(t for *_, t in segs if t)
    assert by_uri[archive]["transcript"] == stitched
    assert report["long_files_in_pieces"] == {"files": 1, "pieces": len(segs)}

    check_quality_signals(con, by_uri, [f"{s3_prefix}/in/{name}" for name in GOOD])

    scores = con.sql("select emotion_scores from segments").fetchall()
    assert all(abs(sum(v for v in s[0].values()) - 1) < 1e-4 for s in scores)
    assert report["status"] == {"ok": len(GOOD), "error": len(BAD)}
    assert report["errors_by_kind"] == {"undecodable": 2, "empty_audio": 2}
    assert report["audio_hours"] == pytest.approx((2 + 3 + 2 + 2 + 2 + 65) / 3600, rel=0.02)

    # credentials never leave: not in the report, the Parquet bytes, or anything logged
    secret = seaweed.storage_options["secret"]
    fs, root = resolve(f"{s3_prefix}/out", seaweed.storage_options)
    for path in fs.find(root):
        assert secret.encode() not in fs.cat(path), path
    out, err = capfd.readouterr()
    assert secret not in out + err + caplog.text
    for path in Path(ray_local).rglob("*"):  # Ray's session logs of every worker
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in json.dumps(report)


def check_quality_signals(con, files: dict, uris: list[str]) -> None:
    """Every labelled segment carries asr's signals (log-probs <= 0, min <= avg, a compression
    ratio > 0 for a non-empty transcript); a file's are its segments' over their durations
    (a long file's from its stitched pieces too), so is its speech_ratio."""
    rows = con.sql("select source_uri, status, end_s - start_s, speech_ratio, transcript, "
                   "transcript_avg_logprob, transcript_min_logprob, "
                   "transcript_compression_ratio from segments").fetchall()
    for _, status, _, speech, text, avg, low, ratio in rows:
        assert speech is None or 0.0 <= speech <= 1.0
        if status == "ok":
            assert low <= avg <= 0.0
            assert ratio > 0.0 if text else ratio is None
        else:
            assert (avg, low, ratio) == (None, None, None)
    assert any(r[1] == "ok" for r in rows)

    def weighted(values: list[tuple[float, float | None]]) -> float | None:
        known = [(d, v) for d, v in values if v is not None]
        return (pytest.approx(sum(d * v for d, v in known) / sum(d for d, _ in known), rel=1e-5)
                if known else None)

    for uri in uris:
        mine = [r for r in rows if r[0] == uri]
        row = files[uri]
        assert row["speech_ratio"] == weighted([(r[2], r[3]) for r in mine]), uri
        assert row["transcript_avg_logprob"] == weighted([(r[2], r[5]) for r in mine]), uri
        assert row["transcript_min_logprob"] == min(
            (r[6] for r in mine if r[6] is not None), default=None), uri
        assert row["transcript_compression_ratio"] == weighted([(r[2], r[7]) for r in mine])


def test_rerun_adds_nothing_and_changed_objects_are_redone(seaweed, s3_prefix, ray_local,
                                                             tmp_path):
    upload(seaweed, f"{s3_prefix}/in", {k: GOOD[k] for k in ("mono_8k.wav", "stereo_22k.flac")})
    first = run_job(spec_for(seaweed, s3_prefix))
    assert first["processed"] == 2
    again = run_job(spec_for(seaweed, s3_prefix))
    assert again["processed"] == 0 and again["planned"]["already_done"] == 2
    assert len(read_table(seaweed, f"{s3_prefix}/out", "files")) == 2

    upload(seaweed, f"{s3_prefix}/in",
           {"mono_8k.wav": lambda: encode(tone(4, 8000, freq=500), 8000, "WAV", "PCM_16")})
    third = run_job(spec_for(seaweed, s3_prefix))
    assert third["processed"] == 1 and third["planned"]["changed"] == 1
    files = read_table(seaweed, f"{s3_prefix}/out", "files").to_pylist()
    assert sorted(f["source_uri"].rsplit("/", 1)[-1] for f in files) == ["mono_8k.wav",
                                                                         "stereo_22k.flac"]
    changed = next(f for f in files if f["source_uri"].endswith("mono_8k.wav"))
    assert changed["duration_s"] == pytest.approx(4.0) and changed["run_id"] == third["run_id"]
    segments = read_table(seaweed, f"{s3_prefix}/out", "segments").to_pylist()
    assert sorted((s["source_uri"].rsplit("/", 1)[-1], s["segment_index"]) for s in segments) == [
        ("mono_8k.wav", 0), ("stereo_22k.flac", 0)]

    # other tasks (or semantic tokens) on this output: refused before planning, since the
    # labelled objects would keep the old columns; the same tasks in another order run
    fs, root = resolve(f"{s3_prefix}/out", seaweed.storage_options)
    runs_before = fs.ls(f"{root}/_runs")
    for other in ({"tasks": [*TASKS, "sound_event"]}, {"semantic_tokens": False}):
        with pytest.raises(JobError) as refused:
            run_job(spec_for(seaweed, s3_prefix, **other))
        assert "label into a new output" in str(refused.value)
        assert f"tasks {', '.join(TASKS)} with semantic tokens" in str(refused.value)
    # so is another model or other generation settings: the labels would be of two kinds
    from kimi_ops.model.tiny_checkpoint import make_tiny_checkpoint
    from kimi_ops.model.checkpoint import checkpoint_id as model_id

    other_model = make_tiny_checkpoint(tmp_path / "other_model", seed=7)
    for other, held, asked in (
            ({"max_new_tokens": 9}, "max_new_tokens 6", "max_new_tokens 9"),
            ({"tasks": ["asr", "emotion", "scene:tut2017"]}, "task scene scene-1-cochlscene",
             "task scene scene-1-tut2017"),  # one column, another label set
            ({"language": "zh"}, "language auto", "language zh"),
            ({"segmenter": "vad"}, "segmenter energy", "segmenter vad"),
            ({"model": str(other_model)}, f"model {first_model_id(seaweed, s3_prefix)}",
             f"model {model_id(other_model)} ({other_model})")):
        with pytest.raises(JobError) as refused:
            run_job(spec_for(seaweed, s3_prefix, **other))
        assert f"holds segments labelled with {held}; this run asks for {asked}" in str(
            refused.value)
        assert "label into a new output" in str(refused.value)
    assert fs.ls(f"{root}/_runs", refresh=True) == runs_before
    reordered = run_job(spec_for(seaweed, s3_prefix, tasks=TASKS[::-1]))
    assert reordered["processed"] == 0 and reordered["planned"]["already_done"] == 2
    with pytest.raises(JobError, match="asr named more than once"):
        run_job(spec_for(seaweed, s3_prefix, tasks=[*TASKS, "asr"]))


def first_model_id(seaweed, prefix: str) -> str:
    return read_table(seaweed, f"{prefix}/out", "segments")["model_id"][0].as_py()


KILL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import pipelines.stages as stages
    from pipelines.job import JobSpec, run_job

    class SlowWriteStage(stages.WriteStage):  # defined in __main__: shipped to workers by value
        def __call__(self, batch):
            time.sleep(1.5)
            return super().__call__(batch)

    stages.WriteStage = SlowWriteStage
    run_job(JobSpec(**json.loads(sys.argv[1])))
""")


def comparable(rows: list[dict]) -> list[dict]:
    """Rows without what differs between runs by design (run_id), in a stable order."""
    return sorted(({k: v for k, v in r.items() if k != "run_id"} for r in rows),
                  key=lambda r: (r["source_uri"], r.get("segment_index", 0)))


def test_job_killed_mid_run_then_rerun_is_complete_without_duplicates(seaweed, s3_prefix,
                                                                      ray_address, tmp_path):
    names = {f"clip{i:02d}.wav": (lambda i=i: encode(tone(1 + i % 3, 16000, freq=200 + 40 * i),
                                                     16000, "WAV", "PCM_16"))
             for i in range(12)}
    upload(seaweed, f"{s3_prefix}/in", names)
    spec = spec_for(seaweed, s3_prefix, stages={"write": {"batch_size": 2, "num_cpus": 0.25},
                                                "label": {"batch_size": 2, "num_cpus": 0.5}})
    script = tmp_path / "slow_job.py"
    script.write_text(KILL_SCRIPT)
    # (a spec's JSON never holds credentials: the driver has them from its environment); the
    # driver joins the session's Ray, as a driver pod joins a cluster, and dies on its own
    env = {**os.environ, **seaweed.env, "RAY_USAGE_STATS_ENABLED": "0"}
    joining = spec.model_copy(update={"ray_address": ray_address})
    proc = subprocess.Popen([sys.executable, str(script), joining.model_dump_json()],
                            env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "job.log", "w"), start_new_session=True)
    fs, root = resolve(f"{s3_prefix}/out", seaweed.storage_options)
    try:
        import time

        deadline = time.time() + 240
        while time.time() < deadline:
            if fs.exists(f"{root}/files") and fs.find(f"{root}/files"):
                break
            assert proc.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.3)
        os.kill(proc.pid, 9)  # the driver dies first, as a lost driver pod would
        assert proc.wait(timeout=60) == -9
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)  # and whatever else of its group outlived it
        proc.wait(timeout=60)
    fs.invalidate_cache()
    partial = len(read_table(seaweed, f"{s3_prefix}/out", "files"))
    assert 0 < partial < len(names)

    killed_plans = [p for p in fs.find(f"{root}/_runs") if "/plan/" in p]
    assert killed_plans  # the killed run's to-do list
    report = run_job(spec)
    assert report["planned"]["already_done"] == partial
    assert report["processed"] == len(names) - partial
    assert [p for p in fs.find(f"{root}/_runs") if "/plan/" in p] == []  # gone with the rerun
    files = read_table(seaweed, f"{s3_prefix}/out", "files").to_pylist()
    assert sorted(f["source_uri"] for f in files) == sorted(
        f"{s3_prefix}/in/{n}" for n in names)
    segments = read_table(seaweed, f"{s3_prefix}/out", "segments").to_pylist()
    keys = [(s["source_uri"], s["segment_index"]) for s in segments]
    assert len(keys) == len(set(keys)) == sum(f["num_segments"] for f in files)

    # the killed-and-resumed output equals a clean run's (greedy decoding is deterministic)
    clean = run_job(spec.model_copy(update={"output": f"{s3_prefix}/clean"}))
    assert clean["processed"] == len(names) > report["processed"]
    assert comparable(files) == comparable(
        read_table(seaweed, f"{s3_prefix}/clean", "files").to_pylist())
    resumed = comparable(segments)
    fresh = comparable(read_table(seaweed, f"{s3_prefix}/clean", "segments").to_pylist())
    assert [{k: v for k, v in r.items() if not k.endswith("_scores")} for r in resumed] == [
        {k: v for k, v in r.items() if not k.endswith("_scores")} for r in fresh]
    for a, b in zip(resumed, fresh):  # float32 scores; batches differed between the runs
        for name in (k for k in a if k.endswith("_scores")):
            assert dict(a[name]) == pytest.approx(dict(b[name]), abs=1e-4)


def test_cli_refuses_to_start_with_a_clear_reason(seaweed, s3_prefix, tmp_path, here):
    upload(seaweed, f"{s3_prefix}/in", {"mono_8k.wav": GOOD["mono_8k.wav"]})
    opts = json.dumps(seaweed.storage_options)

    def run(*args):
        return here("run", *args)

    bad_model = run("--input", f"{s3_prefix}/in", "--output", f"{s3_prefix}/out",
                    "--model", str(tmp_path / "nope"), "--storage-options", opts)
    assert bad_model.returncode == 2 and "checkpoint folder not found" in bad_model.stderr
    no_bucket = run("--input", f"{s3_prefix}/in", "--output", "s3://no-such-bucket/out",
                    "--model", MODEL, "--storage-options", opts)
    assert no_bucket.returncode == 2 and "bucket_missing" in no_bucket.stderr
    wrong = {**seaweed.storage_options, "secret": "wrong-secret-value-123"}
    denied = run("--input", f"{s3_prefix}/in", "--output", f"{s3_prefix}/out",
                 "--model", MODEL, "--storage-options", json.dumps(wrong))
    assert denied.returncode == 2 and "access_denied" in denied.stderr
    assert "wrong-secret-value-123" not in denied.stderr + denied.stdout
    # objects, but no audio among them (here: the default extensions; NIST needs asking for)
    upload(seaweed, f"{s3_prefix}/notes", {"a.txt": lambda: b"x", "b.txt": lambda: b"y",
                                           "c.sph": lambda: b"z"})
    no_audio = run("--input", f"{s3_prefix}/notes", "--output", f"{s3_prefix}/out2",
                   "--model", MODEL, "--storage-options", opts)
    assert no_audio.returncode == 2 and no_audio.stderr.strip().endswith(
        f"{s3_prefix}/notes: no audio to label: its 3 objects (2 .txt, 1 .sph) have none of "
        "the extensions aif, aifc, aiff, au, caf, flac, mp3, oga, ogg, opus, rf64, snd, w64, "
        "wav, wave (--extensions picks others that libsndfile reads, e.g. sph)")
    for proc in (bad_model, no_bucket, denied, no_audio):
        assert "Started a local Ray instance" not in proc.stderr  # refused before Ray
        assert "Traceback" not in proc.stderr


def test_the_listing_counts_what_it_leaves_out_by_extension(tmp_path):
    from collections import Counter

    from pipelines.storage import list_objects

    for name in ("a.wav", "b.TXT", "c.sph", "d/e.txt", "README", "f.AIFF", "g.oga", "h.au"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    skipped = Counter()
    listed = [i.uri for i in list_objects(str(tmp_path), skipped=skipped)]
    assert listed == [str(tmp_path / n) for n in ("a.wav", "f.AIFF", "g.oga", "h.au")]
    assert skipped == {"txt": 2, "sph": 1, "": 1}


def test_a_local_folder_of_oga_aiff_and_au_is_labelled_into_tables_every_reader_loads(tmp_path,
                                                                                     engine):
    """The job's default listing takes every container the decoder reads (`.oga`, `.aiff` and
    `.au` among them); the stages, run here in process on the tiny checkpoint, label them into
    `files/` and `segments/` that pyarrow, Hugging Face `datasets`, duckdb and polars all load:
    `emotion_scores` is a struct of the task's labels (no map column)."""
    import datasets
    import polars as pl
    import pyarrow as pa

    from kimi_ops.tasks import get_task
    from pipelines.job.plan import listing
    from pipelines.stages import DecodeStage, FrontendStage, LabelStage, WriteStage
    from pipelines.stages.base import run_in_process

    speech, sr = sf.read(goldens.INPUTS / "a06_speech_2p37s_16k.flac", dtype="float32")
    clips = {"speech.oga": (speech, sr, "OGG", "VORBIS"),
             "tone.aiff": (tone(1, 22050), 22050, "AIFF", "PCM_16"),
             "tone.au": (tone(1, 8000), 8000, "AU", "PCM_16")}
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name, (wave, rate, fmt, subtype) in clips.items():
        sf.write(folder / name, wave, rate, format=fmt, subtype=subtype)
    (folder / "notes.txt").write_text("not audio")
    spec = JobSpec(input=str(folder), output=str(out), model=MODEL, tasks=["asr", "emotion"])
    plan = pa.Table.from_pylist([{"uri": o.uri, "etag": o.etag, "size": o.size}
                                 for o in listing(spec)])
    assert [Path(u).name for u in plan["uri"].to_pylist()] == sorted(clips)
    frontend = FrontendStage(MODEL, None, "cpu")
    label = LabelStage(MODEL, None, "cpu", spec.tasks, {}, 4, True, "model", "run",
                       segmenter="energy")
    frontend.frontend, label.engine = engine.frontend, engine  # the session's, loaded once
    summary = run_in_process([DecodeStage(None, segmenter="energy"), frontend, label,
                              WriteStage(str(out), None, spec.tasks, {}, True)], plan)
    assert summary["status"].to_pylist() == ["ok"] * 3, summary["error_kind"].to_pylist()

    labels = list(get_task("emotion").labels)
    segments = pa.concat_tables(pq.read_table(p) for p in sorted((out / "segments").iterdir()))
    assert segments.schema.field("emotion_scores").type.names == labels
    assert not any(pa.types.is_map(f.type) for f in segments.schema)
    expected = sorted((r["source_uri"], r["emotion_scores"]["joy"], r["task_versions"]["asr"],
                       r["finish_reason"]["asr"]) for r in segments.to_pylist())
    assert len(expected) == 3 and all(0.0 <= row[1] <= 1.0 for row in expected)

    for table in ("files", "segments"):  # Hugging Face datasets: scores are dicts
        loaded = datasets.load_dataset("parquet", data_files=str(out / table / "*.parquet"),
                                       split="train", cache_dir=str(tmp_path / "hf"))
        assert loaded.num_rows == 3, table
    rows = loaded.to_list()
    assert sorted((r["source_uri"], r["emotion_scores"]["joy"], r["task_versions"]["asr"],
                   r["finish_reason"]["asr"]) for r in rows) == expected
    assert all(list(r["emotion_scores"]) == labels for r in rows)
    assert all(len(r["semantic_tokens"]) > 0 for r in rows)

    glob = str(out / "segments" / "*.parquet")
    assert sorted(duckdb.sql(  # duckdb: a label's probability is a field
        f"select source_uri, emotion_scores.joy, task_versions.asr, finish_reason.asr "
        f"from read_parquet('{glob}')").fetchall()) == expected
    frame = pl.read_parquet(glob).select(  # polars: a struct field
        "source_uri", pl.col("emotion_scores").struct.field("joy"),
        pl.col("task_versions").struct.field("asr"),
        pl.col("finish_reason").struct.field("asr").alias("finish"))
    assert sorted(frame.iter_rows()) == expected


def test_gpu_placement_by_configuration_only():
    from pipelines.job.placement import place_on_gpus

    spec = JobSpec(input="/in", output="/out", model=MODEL)
    assert place_on_gpus(spec, 0) == spec  # CPU-only: the CPU shares stay
    eight = place_on_gpus(spec, 8)
    assert (eight.stages.label.num_gpus, eight.stages.label.concurrency) == (0.75, 8)
    assert (eight.stages.frontend.num_gpus, eight.stages.frontend.concurrency) == (0.25, 8)
    assert eight.stages.frontend.num_gpus + eight.stages.label.num_gpus == 1
    pinned = JobSpec(input="/in", output="/out", model=MODEL,
                     stages={"label": {"num_gpus": 1, "concurrency": 2}})
    assert place_on_gpus(pinned, 8) == pinned  # explicit settings win


def test_decode_and_write_tasks_scale_with_nodes_and_gpus_unless_set():
    from pipelines.job.placement import place_io_tasks

    spec = JobSpec(input="/in", output="/out", model=MODEL)
    local = place_io_tasks(spec, 0, 1)
    assert (local.stages.decode.concurrency, local.stages.write.concurrency) == (1, 1)
    cpus = place_io_tasks(spec, 0, 4)  # a CPU cluster: a decode task per node
    assert (cpus.stages.decode.concurrency, cpus.stages.write.concurrency) == (4, 1)
    gpus = place_io_tasks(spec, 8, 2)  # four decode tasks and a writer per GPU
    assert (gpus.stages.decode.concurrency, gpus.stages.write.concurrency) == (32, 8)
    # only the concurrency moves
    assert gpus.stages.decode.batch_size == spec.stages.decode.batch_size
    pinned = JobSpec(input="/in", output="/out", model=MODEL,
                     stages={"decode": {"concurrency": 2},
                             "write": {"batch_size": 16, "concurrency": 1}})
    kept = place_io_tasks(pinned, 8, 2)
    # explicit settings win
    assert (kept.stages.decode.concurrency, kept.stages.write.concurrency) == (2, 1)


def test_max_audio_seconds_reaches_the_decode_stage(tmp_path):
    """JobSpec.max_audio_seconds (CLI --max-audio-seconds, the flows' parameter) refuses longer
    inputs as `too_long` rows, naming the object; shorter ones decode. JobSpec.piece_seconds
    comes in the same ways (--piece-seconds, the flows' parameter)."""
    import pyarrow as pa
    from pydantic import ValidationError

    from flows.console.app import build_parser
    from flows.console.options import model_from_args
    from pipelines.spec import TranscribeArchiveSpec
    from pipelines.stages import DecodeStage

    for seconds in (1, 3):
        sf.write(tmp_path / f"tone{seconds}.wav",
                 0.1 * np.sin(np.arange(16000 * seconds) / 10).astype(np.float32), 16000)
    plan = pa.Table.from_pylist([{"uri": str(tmp_path / f"tone{s}.wav"), "etag": None, "size": 0}
                                 for s in (1, 3)])
    rows = pa.concat_tables(DecodeStage(None, max_audio_seconds=2.0)(plan)).to_pylist()
    assert [r["error_kind"] for r in rows] == [None, "too_long"]
    assert "tone3.wav" in rows[1]["error_message"] and "2 s limit" in rows[1]["error_message"]
    assert rows[0]["duration_s"] == 1.0
    unlimited = pa.concat_tables(DecodeStage(None)(plan)).to_pylist()  # default: 6 h
    assert [r["error_kind"] for r in unlimited] == [None, None]

    def spec_of(command: str, *options: str) -> JobSpec:  # as the console makes it
        model = JobSpec if command == "run" else TranscribeArchiveSpec
        args = build_parser().parse_args([command, "--input", "/in", "--output", "/out",
                                          "--model", MODEL, *options])
        return model_from_args(model, args)

    for command in ("run", "transcribe-archive"):
        assert spec_of(command, "--max-audio-seconds", "90").max_audio_seconds == 90
        assert spec_of(command).max_audio_seconds is None
        # the pieces' length takes the same ways in (the pieces test shows what the stage does)
        assert spec_of(command, "--piece-seconds", "60").piece_seconds == 60
        assert spec_of(command).piece_seconds == PIECE_SECONDS
    with pytest.raises(ValidationError, match="max_audio_seconds"):
        JobSpec(input="/in", output="/out", model=MODEL, max_audio_seconds=0)
    with pytest.raises(ValidationError, match="piece_seconds"):
        JobSpec(input="/in", output="/out", model=MODEL, piece_seconds=10)


def test_cpu_actors_get_threads_for_the_node_unless_set():
    import torch

    from pipelines.job.placement import place_on_cpus
    from pipelines.stages.base import set_threads

    spec = place_on_cpus(JobSpec(input="/in", output="/out", model=MODEL), 8)
    assert (spec.stages.frontend.threads, spec.stages.label.threads) == (8, 8)
    assert spec.stages.decode.threads is None  # task stages keep Ray's setting
    two = place_on_cpus(JobSpec(input="/in", output="/out", model=MODEL,
                                stages={"label": {"concurrency": 2},
                                        "frontend": {"threads": 3}}), 8)
    # explicit wins; split by actors
    assert (two.stages.frontend.threads, two.stages.label.threads) == (3, 4)
    on_gpu = place_on_cpus(JobSpec(input="/in", output="/out", model=MODEL,
                                   stages={"label": {"num_gpus": 1}}), 8)
    assert on_gpu.stages.label.threads is None and on_gpu.stages.frontend.threads == 8
    assert place_on_cpus(JobSpec(input="/in", output="/out", model=MODEL),
                         0.5).stages.label.threads == 1
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(None)  # leaves it
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


HEAP_PROBE = textwrap.dedent("""
    import ctypes, sys
    from pipelines.stages.base import keep_large_buffers_off_the_heap

    libc = ctypes.CDLL("libc.so.6")
    class Info(ctypes.Structure):  # glibc's mallinfo2; hblkhd: bytes in mmapped chunks
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.free(libc.malloc(20 << 20))  # a freed 20 MB buffer lifts glibc's threshold to 20 MB
    if sys.argv[1] == "actor":
        keep_large_buffers_off_the_heap()
    before = libc.mallinfo2().hblkhd
    libc.malloc(4 << 20)
    print(libc.mallinfo2().hblkhd - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_model_actors_keep_large_buffers_off_the_heap():
    """After a large buffer is freed, glibc cuts the next ones from its heap, which fragments
    and grows over a corpus; the stage actors keep each buffer of 1 MiB or more in a mapping
    of its own (their peak RSS stays flat: tests/pipelines/test_load.py)."""
    def mapped(mode: str) -> int:
        root = str(Path(__file__).resolve().parents[2])
        done = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True,
                              text=True, check=True, env={**os.environ, "PYTHONPATH": root})
        return int(done.stdout)

    assert mapped("default") == 0  # from the heap
    assert mapped("actor") >= 4 << 20  # a mapping of its own


def test_inflight_budget_and_local_object_store_are_fixed_sizes():
    from pipelines.job.placement import (INFLIGHT_BYTES, inflight_budget,
                                         local_object_store_bytes)

    spec = JobSpec(input="/in", output="/out", model=MODEL)
    assert inflight_budget(spec, 0) == INFLIGHT_BYTES == 128 << 20  # not the corpus, not RAM
    assert inflight_budget(spec, 0, nodes=4) == 4 * INFLIGHT_BYTES  # a CPU cluster: per node
    assert inflight_budget(spec, 8, nodes=4) == 8 << 30  # per GPU, wherever they are
    assert local_object_store_bytes(spec) == 2 * INFLIGHT_BYTES
    assert inflight_budget(spec, 8) == 8 << 30  # GPU stages: feature blocks are large
    small = JobSpec(input="/in", output="/out", model=MODEL, inflight_bytes=16 << 20)
    assert inflight_budget(small, 8) == 16 << 20  # explicit settings win
    assert local_object_store_bytes(small) == 75 << 20  # Ray's minimum store


def test_model_id_is_a_content_hash(tmp_path):
    from kimi_ops.model.checkpoint import checkpoint_id as model_id

    folder = tmp_path / "ckpt"
    shutil.copytree(goldens.CHECKPOINT, folder)
    cache = tmp_path / "digests.json"
    first = model_id(folder, cache)
    assert first == model_id(folder, cache) == model_id(goldens.CHECKPOINT, cache)
    weights = folder / "whisper-large-v3" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert model_id(folder, cache) != first


def test_manifest_input_with_bad_objects_and_a_rerun_retrying_what_can_change(seaweed, s3_prefix,
                                                                           ray_local):
    nan_wave = tone(1, 16000).astype(np.float32)
    nan_wave[100] = np.nan
    upload(seaweed, f"{s3_prefix}/in", {
        "ok.wav": GOOD["mono_8k.wav"],
        "nan.wav": lambda: encode(nan_wave, 16000, "WAV", "FLOAT"),
        "long.wav": lambda: encode(tone(3, 16000), 16000, "WAV", "PCM_16"),
        "list.jsonl": lambda: b'{"uri": "ok.wav"}\n{"uri": "nan.wav"}\n{"uri": "gone.wav"}\n'
                              b'{"uri": "long.wav"}\n',
    })
    spec = spec_for(seaweed, s3_prefix, input=f"{s3_prefix}/in/list.jsonl",
                    max_audio_seconds=2.5)
    report = run_job(spec)
    files = {r["source_uri"].rsplit("/", 1)[-1]: r
             for r in read_table(seaweed, f"{s3_prefix}/out", "files").to_pylist()}
    assert files["ok.wav"]["status"] == "ok"
    assert files["nan.wav"]["error"]["kind"] == "non_finite"
    assert files["gone.wav"]["error"] == {"kind": "vanished", "message": (
        f"{s3_prefix}/in/gone.wav: not found when read (it was listed, or named in the manifest)")}
    assert files["long.wav"]["error"]["kind"] == "too_long"
    assert files["long.wav"]["duration_s"] == pytest.approx(3.0)
    assert "--max-audio-seconds" in files["long.wav"]["error"]["message"]
    assert report["errors_by_kind"] == {"non_finite": 1, "vanished": 1, "too_long": 1}

    # a rerun tries the store's errors again (the object is there now), not the file whose
    # bytes failed, nor the one still over the limit; a higher limit then takes that one too
    upload(seaweed, f"{s3_prefix}/in", {"gone.wav": GOOD["mono_8k.wav"]})
    again = run_job(spec)
    assert again["processed"] == 1 and again["planned"]["retried_errors"] == 1
    assert again["planned"]["already_done"] == 3 and "changed" not in again["planned"]
    higher = run_job(spec.model_copy(update={"max_audio_seconds": 10.0}))
    assert higher["processed"] == 1 and higher["status"] == {"ok": 1}
    files = read_table(seaweed, f"{s3_prefix}/out", "files").to_pylist()
    kinds = {r["source_uri"].rsplit("/", 1)[-1]: (r["error"] or {}).get("kind") for r in files}
    assert kinds == {"ok.wav": None, "nan.wav": "non_finite", "gone.wav": None, "long.wav": None}
    assert len(read_table(seaweed, f"{s3_prefix}/out", "segments")) == 3

    # an object the input no longer names keeps its row; the report counts it
    upload(seaweed, f"{s3_prefix}/in", {
        "list.jsonl": lambda: b'{"uri": "ok.wav"}\n{"uri": "nan.wav"}\n{"uri": "gone.wav"}\n'})
    fewer = run_job(spec)
    assert fewer["processed"] == 0 and fewer["planned"]["not_listed"] == 1
    assert fewer["not_listed"] == [f"{s3_prefix}/in/long.wav"]  # named, in the report
    assert len(read_table(seaweed, f"{s3_prefix}/out", "files")) == 4
    from pipelines.job import format_report

    assert ("; 1 objects with rows here are not in this input (deleted, or outside it; their "
            f"rows stay): {s3_prefix}/in/long.wav),") in format_report(fewer)


def test_work_units_bound_rows_and_bytes():
    from pipelines.batching import work_units

    assert work_units([1] * 10, 4, 100) == [(0, 4), (4, 8), (8, 10)]
    # bytes: 60 + 50 > 100 starts a new unit; a 500-byte object is a unit alone
    assert work_units([60, 50, 500, 10, None, 20], 10, 100) == [(0, 1), (1, 2), (2, 3), (3, 6)]
    assert work_units([], 4, 100) == []


def golden_files_through_the_front_end(names, piece_seconds: float = PIECE_SECONDS):
    """(the front-end stage's batch for these golden inputs, a label stage for asr + emotion),
    both in this process on CPU."""
    import pyarrow as pa

    from pipelines.stages import DecodeStage, FrontendStage, LabelStage

    plan = pa.Table.from_pylist([{"uri": str(goldens.INPUTS / n), "etag": None, "size": 0}
                                 for n in names])
    decoded = pa.concat_tables(DecodeStage(None, piece_seconds=piece_seconds,
                                           segmenter="energy")(plan))
    frontend = FrontendStage(MODEL, None, "cpu")
    frontend.setup()
    label = LabelStage(MODEL, None, "cpu", ["asr", "emotion"], {}, 4, False, "model", "run")
    label.setup()
    return frontend(decoded), label


def out_of_memory_on(monkeypatch, tokens: int) -> None:
    """The engine runs out of device memory on any labelling call that holds a segment of
    `tokens` VQ tokens (as it raises once halving is down to that one prompt)."""
    import torch

    import kimi_ops.tasks.runner as runner

    real = runner.label_segments

    def label_segments(engine, encodings, *args, **kwargs):
        if any(len(e.tokens) == tokens for e in encodings):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(engine, encodings, *args, **kwargs)

    monkeypatch.setattr(runner, "label_segments", label_segments)


def test_a_file_too_large_for_the_device_becomes_an_error_row_and_the_batch_goes_on(
        monkeypatch):
    """When one file's prompt does not fit the device even alone (the engine has halved the
    batch down to it and re-raised), the label stage labels the batch file by file: that file
    gets an `out_of_memory` error row naming it, the others their normal rows."""
    names = ("a01_tone_0p5s_16k.wav", "a02_chirp_3s_16k.wav", "a06_speech_2p37s_16k.flac")
    encoded, label = golden_files_through_the_front_end(names)

    def files(batch):
        return [json.loads(f) for f in batch["files_json"].to_pylist()]

    expected = files(label(encoded))
    out_of_memory_on(monkeypatch, len(encoded["tokens"][1].as_py()[0]))  # the chirp's segment
    got = files(label(encoded))
    assert [f["status"] for f in got] == ["ok", "error", "ok"]
    assert got[1]["error"]["kind"] == "out_of_memory"
    assert names[1] in got[1]["error"]["message"] and "9.00 GiB" in got[1]["error"]["message"]
    assert json.loads(label(encoded)["segments_json"][1].as_py()) == []  # no segment rows
    for i in (0, 2):
        assert got[i]["transcript"] == expected[i]["transcript"]


def test_features_travel_in_the_encoders_dtype_and_bf16_changes_no_label():
    """The front-end stage sends features in its encoder's dtype (bf16 from a GPU: half the
    bytes); the label stage reads them back exactly, and since the label model casts features
    to its own dtype, bf16 features give the same labels as their exact fp32 upcast."""
    import pyarrow as pa
    import torch

    from pipelines.stages import features_from_bytes, features_to_bytes

    for dtype in (torch.float32, torch.bfloat16):
        original = torch.randn(7, 12).to(dtype)
        data, name = features_to_bytes(original)
        assert len(data) == original.numel() * original.element_size()
        assert torch.equal(features_from_bytes(data, name, 7), original)
    empty, name = features_to_bytes(torch.zeros(0, 12))
    assert features_from_bytes(empty, name, 0).shape[0] == 0

    encoded, label = golden_files_through_the_front_end(("a02_chirp_3s_16k.wav",
                                                         "a05_stereo_5s_44k1.wav"))
    assert encoded["features_dtype"].to_pylist() == ["float32", "float32"]  # a CPU encoder

    def with_features(to_dtype):
        """The batch with every feature rounded to bf16, then sent as `to_dtype`."""
        rows = encoded.to_pylist()
        for row in rows:
            parts = []
            for data, toks in zip(row["features"], row["tokens"]):
                rounded = features_from_bytes(data, "float32", len(toks)).to(torch.bfloat16)
                parts.append(features_to_bytes(rounded.to(to_dtype))[0])
            row["features"] = parts
            row["features_dtype"] = str(to_dtype).removeprefix("torch.")
        return pa.Table.from_pylist(rows, schema=encoded.schema)

    as_bf16 = with_features(torch.bfloat16)
    as_fp32 = with_features(torch.float32)
    assert sum(map(len, as_bf16["features"].to_pylist()[0])) * 2 == sum(
        map(len, as_fp32["features"].to_pylist()[0]))
    assert label(as_bf16)["segments_json"].to_pylist() == \
        label(as_fp32)["segments_json"].to_pylist()


def test_a_long_file_travels_in_pieces_and_is_stitched_to_the_rows_it_gives_whole(
        tmp_path, monkeypatch):
    """With `piece_seconds` below its length, the 31 s golden input runs through the stages as
    two rows (one per segment), and the driver's stitcher writes exactly the files and segments
    rows it gives as one row. A piece the device cannot label makes the whole file one
    `out_of_memory` error row with no segments, and the other file is labelled."""
    import pyarrow as pa

    from pipelines.job.stitch import PieceStitcher
    from pipelines.stages import WriteStage

    names = ("a04_mix_31s_16k.wav", "a02_chirp_3s_16k.wav")

    def run(piece_seconds: float, out: Path):
        encoded, label = golden_files_through_the_front_end(names, piece_seconds)
        writer = WriteStage(str(out), None, ["asr", "emotion"], {}, False)
        stitcher = PieceStitcher(writer)
        written = writer(label(encoded)).to_pylist()
        summary = [row for w in written for row in stitcher.add(w)]
        stitcher.check_complete()
        tables = {name: pa.concat_tables(pq.read_table(p) for p in sorted((out / name).iterdir()))
                  .sort_by([("source_uri", "ascending")]
                           + ([("segment_index", "ascending")] if name == "segments" else []))
                  for name in ("files", "segments")}
        return encoded, written, summary, stitcher, tables

    encoded, written, summary, stitcher, pieces = run(30.0, tmp_path / "pieces")
    assert encoded["pieces"].to_pylist() == [2, 2, 1]
    assert encoded["first_segment"].to_pylist() == [0, 1, 0]
    assert [len(s) for s in encoded["segments"].to_pylist()] == [1, 1, 1]
    assert (stitcher.files, stitcher.pieces) == (1, 2)
    # a run that ends with only the first piece in writes nothing of the file and says so
    partial = PieceStitcher(WriteStage(str(tmp_path / "partial"), None, ["asr", "emotion"], {},
                                       False))
    assert partial.add(next(w for w in written if (w["pieces"], w["piece"]) == (2, 0))) == []
    assert not (tmp_path / "partial").exists()
    with pytest.raises(RuntimeError, match=names[0]):
        partial.check_complete()
    whole_encoded, _, whole_summary, _, whole = run(PIECE_SECONDS, tmp_path / "whole")
    assert whole_encoded["pieces"].to_pylist() == [1, 1]
    for name in ("files", "segments"):
        assert pieces[name].to_pylist() == whole[name].to_pylist(), name
    assert pieces["files"]["num_segments"].to_pylist() == [1, 2]  # the chirp sorts first
    key = ("source_uri", "status", "num_segments", "duration_s")
    assert (sorted([r[k] for k in key] for r in summary)
            == sorted([r[k] for k in key] for r in whole_summary))

    out_of_memory_on(monkeypatch, len(encoded["tokens"][1].as_py()[0]))  # 2nd piece's segment
    _, _, summary, _, failed = run(30.0, tmp_path / "failed")
    rows = {Path(r["source_uri"]).name: r for r in failed["files"].to_pylist()}
    assert rows[names[0]]["status"] == "error"
    assert rows[names[0]]["error"]["kind"] == "out_of_memory"
    assert names[0] in rows[names[0]]["error"]["message"]
    alone = dict(rows[names[1]])  # labelled alone here, in a batch before: its log-probs
    batched = next(r for r in whole["files"].to_pylist() if r["source_uri"].endswith(names[1]))
    for name in ("transcript_avg_logprob", "transcript_min_logprob"):  # round apart
        assert alone.pop(name) == pytest.approx(batched.pop(name),
                                                abs=goldens.fp32_logprob_tolerance())
    assert alone == batched
    assert set(failed["segments"]["source_uri"].to_pylist()) == {str(goldens.INPUTS / names[1])}
    assert sorted(r["status"] for r in summary) == ["error", "ok"]


def test_a_large_object_decodes_from_a_local_copy_to_the_same_rows(
        seaweed, s3_prefix):  # noqa: F811
    """An object over the decode stage's `spool_bytes` is downloaded to a temp file and read
    block by block from there: the rows equal those decoded from the object's bytes."""
    import pyarrow as pa

    from pipelines.stages import DecodeStage

    upload(seaweed, f"{s3_prefix}/in", {"stereo_44k.flac": lambda: encode(
        long_with_pauses(40, 44100)[:, None].repeat(2, axis=1), 44100, "FLAC", "PCM_16")})
    fs, root = resolve(f"{s3_prefix}/in/stereo_44k.flac", seaweed.storage_options)
    size = fs.size(root)
    plan = pa.Table.from_pylist([{"uri": f"{s3_prefix}/in/stereo_44k.flac", "etag": "e",
                                  "size": size}])

    def decoded(spool_bytes):
        rows = pa.concat_tables(DecodeStage(seaweed.storage_options, spool_bytes=spool_bytes,
                                            piece_seconds=30)(plan)).to_pylist()
        return [{k: v for k, v in r.items() if k != "decode_s"} for r in rows]

    spooled, in_memory = decoded(0), decoded(size)
    assert spooled == in_memory
    assert len(spooled) == 2 and spooled[0]["error_kind"] is None
    assert spooled[0]["size_bytes"] == size and spooled[0]["channels"] == 2


def test_tasks_in_one_order_and_settings_only_of_the_tasks_run(caplog):
    """`--tasks "sound_event, asr"` and `--tasks asr,sound_event` write the same columns in the
    same order; `--question` without the question task is dropped with a warning, and a task
    parameter no task
    of the run takes (asr's language for an emotion run) is not recorded as a setting, so it
    neither splits an output's `generation` values nor blocks a rerun."""
    import logging

    from kimi_ops.tasks import get_task
    from pipelines.schema import segments_schema
    from pipelines.stages import generation_settings

    a = JobSpec(input="x", output="y", model="m", tasks=["sound_event", " asr"])
    b = JobSpec(input="x", output="y", model="m", tasks=["asr", "sound_event "])
    assert a.tasks == b.tasks == ["asr", "sound_event"]
    assert segments_schema([get_task(t) for t in a.tasks]).names == segments_schema(
        [get_task(t) for t in b.tasks]).names
    with caplog.at_level(logging.WARNING, logger="pipelines.spec"):
        for _ in range(2):  # (said once per process, not for each spec built from it)
            assert JobSpec(input="x", output="y", model="m", tasks=["asr"],
                           question="who is it, one order?").question is None
    assert caplog.text.count("--question 'who is it, one order?' is ignored: it is the question "
                             "task's question") == 1

    def settings(tasks, **params):
        spec = JobSpec(input="x", output="y", model="m", tasks=tasks, **params)
        built = [get_task(t, **spec.task_params()) for t in spec.tasks]
        return generation_settings(built, spec.max_new_tokens, spec.task_params(),
                                   spec.segmenter)

    assert "language" not in settings(["emotion"], language="en")
    assert settings(["asr"], language="en")["language"] == "en"
    asked = settings(["asr", "question"], question="Who speaks?")
    assert asked["question"] == "Who speaks?" and asked["language"] == "auto"


def test_a_manifest_naming_an_object_twice_plans_it_once_and_says_so(tmp_path):
    from pipelines.job import format_report
    from pipelines.job.plan import plan

    (tmp_path / "a.wav").write_bytes(GOOD["mono_8k.wav"]())
    (tmp_path / "list.jsonl").write_text(  # one file, three spellings
        f'{{"uri": "a.wav"}}\n{{"uri": "a.wav"}}\n{{"uri": "file://{tmp_path}/a.wav"}}\n')
    spec = JobSpec(input=str(tmp_path / "list.jsonl"), output=str(tmp_path / "out"), model=MODEL)
    planned = plan(spec, "r1")
    assert planned.counts["listed"] == 1 and planned.counts["duplicates"] == 2
    report = {"output": spec.output, "planned": dict(planned.counts), "run_id": "r1",
              "processed": 0, "status": {}, "errors_by_kind": {}, "audio_hours": 0.0,
              "wall_s": 1.0, "audio_hours_per_hour": 0.0}
    assert "; 2 repeated entries of the input labelled once" in format_report(report)


def test_a_large_local_mp3_beside_an_appledouble_sidecar_keeps_its_header_facts(tmp_path):
    """A local object over `spool_bytes` is read from its path: its rate and channels come from
    the file opened here, not by libsndfile's path lookup, which refused an MP3 beside a macOS
    `._name` sidecar (the row was ok but had no sample rate)."""
    import pyarrow as pa
    import soundfile as sf

    from pipelines.stages import DecodeStage

    clip = tmp_path / "talk.mp3"
    sf.write(clip, np.full(16000, 0.1, np.float32), 16000, format="MP3")
    (tmp_path / "._talk.mp3").write_bytes(b"\x00\x05\x16\x07" + bytes(200))
    plan = pa.Table.from_pylist([{"uri": str(clip), "etag": "e", "size": clip.stat().st_size}])
    (row,) = pa.concat_tables(DecodeStage(None, spool_bytes=0)(plan)).to_pylist()
    assert row["error_kind"] is None
    assert (row["sample_rate"], row["channels"]) == (16000, 1)
