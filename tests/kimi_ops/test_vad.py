"""Voice-activity segmentation (kimi_ops.audio.vad) on speech whose place is known: espeak-ng
speech laid into noise, tones and silence (bench/speech.py)."""

from __future__ import annotations

import numpy as np
import pytest

from kimi_ops.audio import vad as vad_module
from kimi_ops.audio.segmenters import SEGMENTERS, cut
from kimi_ops.audio.vad import LANE_SECONDS, WARMUP_SECONDS, WINDOW, speech_probabilities
from tests.bench_modules import bench_module

speech = bench_module("speech")
segmentation = bench_module("segmentation")


def covered(segments, n: int, max_samples: int) -> None:
    assert segments[0].start == 0 and segments[-1].end == n
    for a, b in zip(segments, segments[1:]):
        assert a.end == b.start
    assert all(0 < s.end - s.start <= max_samples for s in segments)
    assert [s.index for s in segments] == list(range(len(segments)))


def sent_shares(mix, segments) -> tuple[float, float]:
    """(share of the speech sent to the model, share of the non-speech farther than 0.5 s from
    speech that is sent): the segmentation benchmark's measure."""
    return segmentation.sent_shares(len(mix.wave), [(s.start, s.end) for s in segments
                                                    if not s.silent], mix.speech)


@pytest.fixture(scope="module")
def archive():
    return speech.archive_fixture()


def test_noise_between_utterances_stays_out_and_the_speech_goes_in(archive):
    """The issue's recording: 60 s, three utterances in steady noise at -32 dBFS. The loudness
    cutter sends all of it; voice activity sends the speech and keeps the noise out."""
    n = len(archive.wave)
    assert 15 * 16000 < sum(b - a for a, b in archive.speech) < 20 * 16000
    vad = cut(archive.wave, "vad")
    covered(vad, n, 30 * 16000)
    recall, noise = sent_shares(archive, vad)
    assert recall >= 0.95 and noise <= 0.20, (recall, noise)
    assert sum(not s.silent for s in vad) == 3  # one segment per utterance
    for s in vad:
        assert 0.0 <= s.speech_ratio <= 1.0
        assert (s.speech_ratio > 0.5) if not s.silent else (s.speech_ratio < 0.05)
    energy = cut(archive.wave, "energy")
    covered(energy, n, 30 * 16000)
    assert sent_shares(archive, energy) == (1.0, 1.0)  # every second, noise included
    assert {s.speech_ratio for s in energy} == {1.0}  # loud: 1.0, as the energy cutter says


def test_speech_longer_than_a_segment_is_cut_and_silence_is_cut_evenly():
    mix = speech.mixture([("silence", 70.0), ("speech", 45.0), ("silence", 1.0)], snr_db=30.0)
    segments = cut(mix.wave, "vad")
    covered(segments, len(mix.wave), 30 * 16000)
    talk = [s for s in segments if not s.silent]
    assert len(talk) == 2  # 45 s of speech in two pieces at a pause
    assert sum(s.end - s.start for s in talk) >= mix.speech[0][1] - mix.speech[0][0]
    lead = [s for s in segments if s.end <= talk[0].start]
    assert len(lead) == 3 and all(s.silent and s.speech_ratio == 0.0 for s in lead)
    assert max(s.end - s.start for s in lead) - min(s.end - s.start for s in lead) <= 1


def test_silence_and_tones_are_no_speech_and_short_input_works():
    assert cut(np.zeros(0, np.float32), "vad") == []
    (one,) = cut(np.zeros(100, np.float32), "vad")
    assert one.silent and (one.start, one.end) == (0, 100)
    tones = 0.2 * speech.tones(20.0, seed=1)
    assert all(s.silent for s in cut(tones, "vad"))


def test_probabilities_are_one_per_window_and_depend_on_the_waveform_only(archive):
    import torch

    wave = archive.wave[: 25 * 16000 + 77]  # three lanes, a partial last window
    threads = torch.get_num_threads()
    probs = speech_probabilities(wave)
    assert torch.get_num_threads() == threads  # one thread while it ran, then the caller's
    assert probs.shape == (-(-len(wave) // WINDOW),) and probs.dtype == np.float32
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_array_equal(probs, speech_probabilities(wave.copy()))
    # the first lane alone (a clip of that length) is the same pass, but a batch of one row
    # may take other matmul kernels than a batch of three: fp32 sums in another order, each
    # off by at most ~K * 2^-24 relative (K = 512 inputs: 3e-5) of values bounded by 1 before
    # the sigmoid, so 1e-4; the speech decisions are the same away from that band
    lane = int(LANE_SECONDS * 16000) // WINDOW
    alone = speech_probabilities(wave[: lane * WINDOW])
    np.testing.assert_allclose(alone, probs[:lane], atol=1e-4)
    clear = np.abs(probs[:lane] - 0.5) > 1e-4
    np.testing.assert_array_equal((alone >= 0.5)[clear], (probs[:lane] >= 0.5)[clear])


def test_the_net_runs_once_per_window_it_keeps_plus_the_warm_up(monkeypatch):
    """A clip shorter than a lane costs one call of the net per window of the clip, not one per
    window of a whole lane: a 1 s clip took 312 calls (0.2 s), and 400 one-second files on two
    cores spent 90 s more in the VAD than in the loudness cutter."""
    net, calls = vad_module._silero(), []

    class Counting:
        def reset_states(self):
            net.reset_states()

        def __call__(self, chunk, sample_rate):
            calls.append(chunk.shape[0])
            return net(chunk, sample_rate)

    monkeypatch.setattr(vad_module, "_silero", Counting)
    speech_probabilities(np.zeros(16000, np.float32))
    assert calls == [1] * -(-16000 // WINDOW)  # 32 windows, one lane of one row
    calls.clear()
    n = 25 * 16000 + 77  # lanes of 312 windows from 0, 312 and 624; 782 windows in all
    speech_probabilities(np.zeros(n, np.float32))
    lane, warm = int(LANE_SECONDS * 16000) // WINDOW, int(WARMUP_SECONDS * 16000) // WINDOW
    assert calls == [3] * (warm + lane)  # the longest lane: a full one after its warm-up


def test_an_unknown_segmenter_is_refused_by_name():
    assert SEGMENTERS == ("vad", "energy")
    with pytest.raises(ValueError, match="segmenter must be one of vad, energy, got 'loud'"):
        cut(np.zeros(16000, np.float32), "loud")
