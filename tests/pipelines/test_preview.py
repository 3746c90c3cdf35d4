"""A dry run's audio hours (`pipelines.job.preview`): exact from every header, estimated from a
sample past the cap, and a header read that stops at its byte budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.job import preview
from pipelines.job.preview import Reservoir, audio_hours, header_seconds
from pipelines.spec import JobSpec
from pipelines.storage import list_objects, opened_head
from tests import goldens

WAVS = {"a01_tone_0p5s_16k.wav": 0.5, "a02_chirp_3s_16k.wav": 3.0,
        "a03_speech_12s_16k.wav": 12.0, "a04_mix_31s_16k.wav": 31.0}  # 16 kHz mono PCM


def test_audio_hours_exact_then_estimated_from_a_sample_by_bytes(monkeypatch):
    spec = JobSpec(input=str(goldens.INPUTS), output="/nowhere", model="m")
    infos = [i for i in list_objects(str(goldens.INPUTS), {"wav"}) if i.uri.rsplit("/", 1)[-1]
             in WAVS]
    whole = Reservoir(10)
    for info in infos:
        whole.add(info)
    exact = audio_hours(spec, whole)
    assert exact["hours"] * 3600 == pytest.approx(sum(WAVS.values()), abs=0.01)
    assert (exact["objects"], exact["headers_read"], exact["estimated"]) == (4, 4, False)

    monkeypatch.setattr(preview, "HEADERS_LOCAL", 2)  # past the cap: a sample of 2 headers
    sample = Reservoir(10)
    for info in infos:
        sample.add(info)
    guessed = audio_hours(spec, sample)
    assert (guessed["headers_read"], guessed["objects"], guessed["estimated"]) == (2, 4, True)
    # same codec and rate: seconds per byte of any two files give the whole within headers
    assert guessed["hours"] * 3600 == pytest.approx(sum(WAVS.values()), rel=0.01)


def test_a_header_read_stops_at_its_budget():
    path = str(goldens.INPUTS / "a04_mix_31s_16k.wav")
    assert header_seconds(path) == pytest.approx(31.0)
    with opened_head(path, limit=16) as head:  # a WAV header needs more than 16 bytes
        assert head.read(100) == Path(path).read_bytes()[:16] and head.read(1) == b""
    assert head.exhausted and head.used == 16
    assert header_seconds(str(goldens.INPUTS / "nothing.wav")) is None  # gone: no length
