"""Hostile audio: broken, mislabelled, crafted and extreme files, one by one, fuzzed, and all
together through the real pipeline (local Ray, the tiny checkpoint). Every input ends as a
decoded waveform or a KimiError with a stable kind; in the pipeline, as exactly one row."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimi_ops.audio import SAMPLE_RATE, load_audio
from kimi_ops.audio.decode import MAX_SECONDS_ENV
from kimi_ops.errors import AUDIO_ERROR_KINDS, AudioTooLongError
from tests import goldens
from tests.hostile_audio import DecodeWorker, hostile_corpus, long_silence_flac, valid_files

DECODE_TIMEOUT_S = 20.0  # per file; a healthy decode of these takes milliseconds


@pytest.fixture(scope="module")
def corpus():
    return hostile_corpus()


@pytest.fixture(scope="module")
def worker():
    w = DecodeWorker()
    yield w
    w.close()


def test_every_hostile_file_decodes_or_fails_with_its_kind(corpus, worker):
    seen = {}
    for name, case in corpus.items():
        started = time.monotonic()
        outcome = worker.decode(case.data, name, DECODE_TIMEOUT_S)
        elapsed = time.monotonic() - started
        assert outcome[0] in ("ok", "kimi"), (name, outcome)
        assert elapsed < 10, (name, elapsed)
        if outcome[0] == "ok":
            _, dtype, ndim, size, finite = outcome
            assert (dtype, ndim, finite) == ("<f4", 1, True) and size > 0, name
            seen[name] = "ok"
        else:
            _, _, kind, message = outcome
            assert kind in AUDIO_ERROR_KINDS and name in message, (name, outcome)
            seen[name] = kind
    assert seen == {name: case.expect for name, case in corpus.items()}


def test_mislabelled_files_decode_by_content(corpus):
    flac = load_audio(corpus["flac_named.wav"].data, name="flac_named.wav")
    wav = load_audio(corpus["wav_named.mp3"].data, name="wav_named.mp3")
    np.testing.assert_allclose(flac, wav, atol=1e-4)  # the same tone, whatever the name says
    assert len(wav) == SAMPLE_RATE // 2


def test_max_duration_guard_is_configurable(monkeypatch, tmp_path):
    ten_minutes = long_silence_flac(10 / 60)
    assert len(load_audio(ten_minutes)) == 600 * SAMPLE_RATE  # under the 2 h default
    with pytest.raises(AudioTooLongError, match="600 s .0.17 h. is longer than the 599 s limit") as info:
        load_audio(ten_minutes, max_seconds=599, name="lecture.flac")
    assert info.value.kind == "too_long" and "lecture.flac" in str(info.value)
    path = tmp_path / "lecture.flac"
    path.write_bytes(ten_minutes)
    monkeypatch.setenv(MAX_SECONDS_ENV, "60")
    with pytest.raises(AudioTooLongError, match="60 s limit"):
        load_audio(path)
    with pytest.raises(AudioTooLongError):  # in-memory waveforms are held to it as well
        load_audio((np.zeros(61 * 8000, np.float32), 8000))
    assert len(load_audio(path, max_seconds=None)) == 600 * SAMPLE_RATE
    monkeypatch.setenv(MAX_SECONDS_ENV, "none")
    assert len(load_audio(path)) == 600 * SAMPLE_RATE
    monkeypatch.setenv(MAX_SECONDS_ENV, "ten")
    with pytest.raises(ValueError, match=MAX_SECONDS_ENV):
        load_audio(path)


def test_seven_hour_file_is_refused_from_its_header_without_decoding(corpus):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(AudioTooLongError, match="7.00 h"):
        load_audio(corpus["long_silence.flac"].data, name="long_silence.flac")
    assert time.monotonic() - started < 1.0
    # decoding it would take 202 M samples at 8 kHz, 403 M at 16 kHz: over 2 GB
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50


def test_multichannel_mixdown_in_blocks_equals_whole_file_mean():
    rng = np.random.default_rng(3)
    six = (0.1 * rng.standard_normal((3 * (1 << 20) // 2, 6))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, six, 16000, format="WAV", subtype="FLOAT")
    wave = load_audio(buf.getvalue())
    np.testing.assert_array_equal(wave, six.mean(axis=1, dtype=np.float32))


# -- fuzz: mutated valid files ----------------------------------------------------------------

SEEDS = valid_files()
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]


@st.composite
def mutated_audio(draw) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[fmt])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "header", "splice", "duplicate"]))
        if not data:
            break
        if kind == "flip":  # a few bits anywhere
            for _ in range(draw(st.integers(1, 8))):
                pos = draw(st.integers(0, len(data) - 1))
                data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "header":  # a 1/2/4-byte field of the first 64 bytes set to an edge value
            width = draw(st.sampled_from([1, 2, 4]))
            pos = draw(st.integers(0, max(min(64, len(data)) - width, 0)))
            value = draw(st.sampled_from(INTERESTING)) & ((1 << (8 * width)) - 1)
            data[pos: pos + width] = value.to_bytes(width, draw(st.sampled_from(["little",
                                                                                  "big"])))
        elif kind == "splice":  # random bytes over a stretch
            pos = draw(st.integers(0, len(data)))
            data[pos: pos] = draw(st.binary(min_size=1, max_size=64))
        else:  # a stretch repeated: frame/chunk boundaries out of step
            a = draw(st.integers(0, len(data) - 1))
            b = draw(st.integers(a, min(len(data), a + 512)))
            data[b:b] = data[a:b]
    return fmt, bytes(data)


@settings(max_examples=500, deadline=5000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=mutated_audio())
def test_fuzzed_files_never_crash_hang_or_raise_an_unexpected_type(worker, case):
    fmt, data = case
    outcome = worker.decode(data, f"fuzz.{fmt}", DECODE_TIMEOUT_S)
    assert outcome[0] in ("ok", "kimi"), outcome
    if outcome[0] == "ok":
        _, dtype, ndim, size, finite = outcome
        assert (dtype, ndim, finite) == ("<f4", 1, True) and size > 0
    else:
        assert outcome[2] in AUDIO_ERROR_KINDS, outcome


# -- the whole hostile set through the real pipeline ---------------------------------------

ODD_NAMES = {  # valid audio under names a writer must not turn into paths
    "odd/div\u2215slash.wav", "odd/full\uff0e\uff0estop.wav", "odd/back\\slash\\..\\x.wav",
    "odd/..dots...wav", "odd/line\nbreak.wav", "odd/" + "long" * 60 + ".wav",
    "odd/\u202eevil\u202c.wav", "odd/-rf.flac", "odd/spaces  and\ttab.ogg",
}


@pytest.mark.slow
def test_hostile_set_through_the_pipeline_one_row_each(corpus, tmp_path, ray_local):
    from pipelines.job import JobSpec, run_job

    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "odd").mkdir(parents=True)
    for name, case in corpus.items():
        (inp / name).write_bytes(case.data)
    ok_wav = SEEDS["wav"]
    for name in ODD_NAMES:
        (inp / name).write_bytes(ok_wav if not name.endswith((".flac", ".ogg")) else
                                 SEEDS["flac"] if name.endswith(".flac") else SEEDS["ogg"])
    expected = {str(inp / n): c.expect for n, c in corpus.items()}
    expected.update({str(inp / n): "ok" for n in ODD_NAMES})

    report = run_job(JobSpec(input=str(inp), output=str(out), model=str(goldens.CHECKPOINT),
                             tasks=["asr"], max_new_tokens=4, no_progress_timeout_s=240),
                     ray_temp_dir=ray_local)

    rows = pq.read_table(out / "files").to_pylist()
    uris = [r["source_uri"] for r in rows]
    assert sorted(uris) == sorted(expected)  # exactly one row each: nothing lost, no duplicate
    got = {r["source_uri"]: "ok" if r["status"] == "ok" else r["error"]["kind"] for r in rows}
    assert got == expected
    for r in rows:
        if r["status"] == "error":  # a duration only where the header gave one past the limit
            assert r["error"]["message"]
            assert (r["duration_s"] > 6 * 3600) if r["error"]["kind"] == "too_long" else (
                r["duration_s"] is None)
        else:
            assert r["error"] is None and r["duration_s"] > 0
    assert report["processed"] == len(expected)
    assert sum(report["status"].values()) == len(expected)

    # the writer stays in its prefix whatever the input names: only its own names appear
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    for path in out.rglob("*"):
        rel = path.relative_to(out).as_posix()
        assert path.resolve().is_relative_to(out.resolve()), rel
        assert rel.isascii() and "\\" not in rel, rel
    assert not (out / "_staging").exists() or not any((out / "_staging").iterdir())
    assert os.listdir(inp / "odd") and sorted(os.listdir(inp / "odd")) == sorted(
        n.split("/", 1)[1] for n in ODD_NAMES)  # the input is left as it was
    assert Path(ray_local).is_dir()
