"""kimi_ops.audio.segment: pause-aware cutting of long audio into <= 30 s segments."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimi_ops.audio.segment import Segment, segment_audio

SR = 16000


def _speech_like(seconds: float, seed: int, sr: int = SR, level: float = 0.1) -> np.ndarray:
    """Noise bursts of 0.1-0.4 s, amplitude-modulated, with no digital-silence gaps."""
    rng = np.random.default_rng(seed)
    n = round(seconds * sr)
    noise = rng.standard_normal(n).astype(np.float32)
    t = np.arange(n, dtype=np.float32) / sr
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 3.1 * t) ** 2  # never reaches zero
    return (noise * envelope * level).astype(np.float32)


def _with_pauses(seconds: float, pauses: list[tuple[float, float]], seed: int = 0, sr: int = SR):
    wave = _speech_like(seconds, seed, sr)
    for a, b in pauses:
        wave[round(a * sr) : round(b * sr)] = 0.0
    return wave


def _check_invariants(segments: list[Segment], n: int, sr: int, max_s: float, min_s: float):
    assert segments, "a non-empty waveform gives at least one segment"
    assert segments[0].start == 0
    assert segments[-1].end == n
    for i, seg in enumerate(segments):
        assert seg.index == i
        assert seg.sample_rate == sr
        assert seg.end > seg.start
        assert seg.end - seg.start <= int(max_s * sr)
        if len(segments) > 1:
            assert seg.end - seg.start >= round(min_s * sr)
        assert seg.silent == (seg.rms_db < -50.0)
    for a, b in itertools.pairwise(segments):
        assert a.end == b.start


def test_short_audio_is_one_segment():
    wave = _speech_like(12.3, seed=1)
    (seg,) = segment_audio(wave)
    assert (seg.index, seg.start, seg.end, seg.silent) == (0, 0, wave.size, False)
    assert seg.duration_s == pytest.approx(12.3)
    assert seg.start_s == 0.0 and seg.end_s == pytest.approx(12.3)
    assert seg.slice(wave) is not wave and np.shares_memory(seg.slice(wave), wave)


def test_exactly_max_is_one_segment_and_one_sample_more_is_two():
    wave = _speech_like(30.0, seed=2)
    assert len(segment_audio(wave)) == 1
    longer = np.concatenate([wave, wave[:1]])
    segments = segment_audio(longer)
    assert len(segments) == 2
    _check_invariants(segments, longer.size, SR, 30.0, 5.0)


def test_empty_waveform_gives_no_segments():
    assert segment_audio(np.zeros(0, dtype=np.float32)) == []


def test_cuts_land_inside_planted_pauses():
    pauses = [(23.0, 23.5), (47.0, 47.5), (71.2, 71.7), (98.0, 98.5)]
    wave = _with_pauses(115.0, pauses, seed=3)
    segments = segment_audio(wave)
    _check_invariants(segments, wave.size, SR, 30.0, 5.0)
    cuts = [seg.start / SR for seg in segments[1:]]
    assert len(cuts) == len(pauses)
    for cut, (a, b) in zip(cuts, pauses):
        assert a < cut < b, (cut, a, b)
        assert abs(cut - (a + b) / 2) < 0.05  # the middle of the pause, away from both words
    assert not any(seg.silent for seg in segments)
    # slices reassemble the waveform exactly
    np.testing.assert_array_equal(np.concatenate([s.slice(wave) for s in segments]), wave)


def test_quietest_pause_in_window_wins_and_later_wins_a_tie():
    # window for the first cut is [20 s, 30 s]: a -40 dB dip at 27 s loses to a true pause at 21 s
    wave = _speech_like(50.0, seed=4)
    wave[27 * SR : round(27.5 * SR)] *= 0.01
    wave[21 * SR : round(21.5 * SR)] = 0.0
    assert 21.0 < segment_audio(wave)[1].start_s < 21.5
    # two equal pauses: the later one is taken, so the segment stays long
    wave = _with_pauses(50.0, [(21.0, 21.5), (28.0, 28.5)], seed=4)
    assert 28.0 < segment_audio(wave)[1].start_s < 28.5


def test_pause_outside_the_search_window_is_not_used():
    # a pause at 12 s is outside [20 s, 30 s], so the cut falls in the window regardless
    wave = _with_pauses(50.0, [(12.0, 12.5)], seed=5)
    segments = segment_audio(wave)
    assert 20.0 <= segments[1].start_s <= 30.0


def test_long_signal_without_pauses_still_cuts_at_max():
    wave = _speech_like(185.0, seed=6)
    segments = segment_audio(wave)
    _check_invariants(segments, wave.size, SR, 30.0, 5.0)
    assert len(segments) >= 7
    assert all(seg.duration_s <= 30.0 for seg in segments)
    assert all(seg.duration_s >= 20.0 for seg in segments[:-1])  # cut inside the 10 s window


def test_no_tiny_trailing_segment():
    # 31 s: a naive cut at 30 s leaves 1 s; the rest must be >= min_seconds
    wave = _speech_like(31.0, seed=7)
    segments = segment_audio(wave)
    assert len(segments) == 2
    assert segments[1].duration_s >= 5.0
    # same with a tempting pause at 29.5 s that would leave 1.5 s: it is not used
    wave = _with_pauses(31.0, [(29.3, 29.8)], seed=7)
    segments = segment_audio(wave)
    assert segments[1].duration_s >= 5.0 and segments[0].end_s <= 26.0


def test_silence_only_input_is_all_silent():
    wave = np.zeros(95 * SR, dtype=np.float32)
    segments = segment_audio(wave)
    _check_invariants(segments, wave.size, SR, 30.0, 5.0)
    assert len(segments) > 1
    assert all(seg.silent and seg.rms_db == -120.0 for seg in segments)
    # faint hiss below the threshold is silence too
    hiss = np.random.default_rng(8).standard_normal(40 * SR).astype(np.float32) * 10 ** (-70 / 20)
    assert all(seg.silent for seg in segment_audio(hiss))


def test_mixed_file_marks_only_the_silent_region():
    # speech 0-25 s, silence 25-55 s, speech 55-80 s
    wave = _speech_like(80.0, seed=9)
    wave[25 * SR : 55 * SR] = 0.0
    segments = segment_audio(wave)
    _check_invariants(segments, wave.size, SR, 30.0, 5.0)
    assert [seg.silent for seg in segments] == [False, True, False]
    silent = segments[1]
    assert 25.0 <= silent.start_s and silent.end_s <= 55.0
    assert silent.duration_s >= 20.0


def test_one_short_word_in_silence_keeps_the_segment():
    wave = np.zeros(60 * SR, dtype=np.float32)
    wave[40 * SR : round(40.2 * SR)] = _speech_like(0.2, seed=10, level=0.01)  # ~-45 dBFS
    segments = segment_audio(wave)
    flags = [(seg.start_s <= 40.0 and 40.2 <= seg.end_s, seg.silent) for seg in segments]
    assert (True, False) in flags
    assert all(silent for holds_word, silent in flags if not holds_word)


def test_two_hours_segment_fast_and_correct():
    # a 50 s pattern with a pause every 25 s, tiled to 2 h (115.2 M samples): every search
    # window holds exactly one pause, so every cut must land in one
    pattern = _with_pauses(50.0, [(24.0, 24.5), (49.0, 49.5)], seed=11)
    wave = np.tile(pattern, 144)
    assert wave.size == 2 * 3600 * SR
    segments = segment_audio(wave)
    _check_invariants(segments, wave.size, SR, 30.0, 5.0)
    assert len(segments) == 2 * 3600 // 25
    for seg in segments[1:]:
        assert 24.0 < seg.start_s % 25.0 < 24.5, seg
    assert not any(seg.silent for seg in segments)


def test_other_sample_rate_and_parameters():
    sr = 8000
    wave = _with_pauses(40.0, [(9.0, 9.4), (19.0, 19.4), (29.5, 29.9)], seed=12, sr=sr)
    segments = segment_audio(
        wave, sample_rate=sr, max_seconds=12.0, min_seconds=3.0, search_seconds=4.0
    )
    _check_invariants(segments, wave.size, sr, 12.0, 3.0)
    assert [round(s.start_s, 1) for s in segments[1:4]] == [9.2, 19.2, 29.7]
    assert segments[1].start_s == segments[1].start / sr


def test_input_is_not_modified_and_float64_works():
    wave = _speech_like(70.0, seed=13).astype(np.float64)
    before = wave.copy()
    segments = segment_audio(wave)
    np.testing.assert_array_equal(wave, before)
    _check_invariants(segments, wave.size, SR, 30.0, 5.0)
    # a strided (non-contiguous) view gives the same cuts as its contiguous copy
    view = np.repeat(wave, 2)[::2]
    assert [s.start for s in segment_audio(view)] == [s.start for s in segments]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_seconds": 0}, "max_seconds"),
        ({"max_seconds": -1}, "max_seconds"),
        ({"max_seconds": float("inf")}, "max_seconds"),
        ({"min_seconds": -1}, "min_seconds"),
        ({"min_seconds": 20.0}, "min_seconds"),  # > max / 2
        ({"min_seconds": 30.0}, "min_seconds"),
        ({"search_seconds": 0}, "search_seconds"),
        ({"search_seconds": float("nan")}, "search_seconds"),
        ({"silence_db": float("nan")}, "silence_db"),
        ({"sample_rate": 0}, "sample_rate"),
        ({"sample_rate": 16000.0}, "sample_rate"),
        ({"sample_rate": True}, "sample_rate"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        segment_audio(np.zeros(SR, dtype=np.float32), **kwargs)


@pytest.mark.parametrize(
    "wave, match",
    [
        (np.zeros((2, SR), dtype=np.float32), "1-D"),
        (np.zeros(SR, dtype=np.int16), "floating"),
        (np.array([0.0, np.nan, 0.0], dtype=np.float32), "NaN"),
        (np.array([np.inf] * 500, dtype=np.float32), "NaN or infinite"),
    ],
)
def test_bad_waveforms_raise_value_error(wave, match):
    with pytest.raises(ValueError, match=match):
        segment_audio(wave)


@st.composite
def _layouts(draw):
    """A random waveform at 1 kHz (cheap), random pauses, random valid parameters."""
    sr = 1000
    max_s = draw(st.sampled_from([2.0, 5.0, 10.0, 30.0]))
    min_s = draw(st.floats(0.0, max_s / 2))
    search_s = draw(st.floats(0.01, max_s * 1.5))
    seconds = draw(st.floats(0.001, 10 * max_s))
    n = max(1, round(seconds * sr))
    starts = draw(st.lists(st.integers(0, n - 1), max_size=12))
    lengths = draw(st.lists(st.integers(1, 3 * sr), min_size=len(starts), max_size=len(starts)))
    silent_all = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    wave = np.zeros(n, dtype=np.float32)
    if not silent_all:
        wave = _speech_like(n / sr, seed, sr)[:n]
        for a, length in zip(starts, lengths):
            wave[a : a + length] = 0.0
    return wave, sr, max_s, min_s, search_s


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_layouts())
def test_invariants_hold_for_random_layouts(layout):
    wave, sr, max_s, min_s, search_s = layout
    segments = segment_audio(
        wave, sample_rate=sr, max_seconds=max_s, min_seconds=min_s, search_seconds=search_s
    )
    n = wave.size
    assert segments[0].start == 0 and segments[-1].end == n
    for a, b in itertools.pairwise(segments):
        assert a.end == b.start
    max_n = int(max_s * sr + 1e-9)
    min_n = int(np.ceil(min_s * sr - 1e-9))
    assert all(0 < s.end - s.start <= max_n for s in segments)
    if n <= max_n:
        assert len(segments) == 1
    else:
        assert all(s.end - s.start >= min_n for s in segments)
    assert [s.index for s in segments] == list(range(len(segments)))
    assert all(s.silent == (s.rms_db < -50.0) for s in segments)
    if not wave.any():
        assert all(s.silent for s in segments)
    # a cut whose search window holds a whole 30 ms zero frame lands where the wave is zero
    hop, min_cut = 10, max(min_n, 1)
    zero = wave == 0
    for prev, seg in itertools.pairwise(segments):
        hi = min(prev.start + max_n, n - min_cut)
        lo = max(prev.start + min_cut, hi - max(1, round(search_s * sr)))
        centres = np.arange(-(-(lo - 5) // hop), (hi - 5) // hop + 1) * hop + 5
        quiet = [c for c in centres if c - 15 >= 0 and c + 15 <= n and zero[c - 15 : c + 15].all()]
        if quiet:
            assert zero[seg.start], (seg.start, lo, hi)
