"""Self-made demo clips, synthesised deterministically with numpy (no downloads, no licences).

`write_sample_audio(out_dir)` writes the five clips of `SAMPLE_CLIPS` and returns their
paths in that order. Together they cover what the audio path must handle: a sub-second
clip, a chirp with noise bursts, a speech-like FLAC, a 44.1 kHz stereo WAV (downmix and
resampling), and a 35 s clip that crosses the 30 s window. About 2 MB in total; the same
bytes on every run (16-bit PCM, fixed noise seeds).

The "speech-like" signal is additive harmonic synthesis: a glottal-ish harmonic series on a
gliding pitch contour, shaped by vowel formant envelopes that change per syllable, with
syllabic amplitude modulation and short fricative noise. It is not speech, but it has the
spectro-temporal texture of speech, which is all the random tiny models need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

__all__ = ["SAMPLE_CLIPS", "SampleClip", "synthesize_sample", "write_sample_audio"]


@dataclass(frozen=True)
class SampleClip:
    name: str  # file name, extension decides the container (WAV or FLAC)
    sample_rate: int
    channels: int
    duration_s: float
    description: str

    @property
    def num_frames(self) -> int:
        return round(self.duration_s * self.sample_rate)


SAMPLE_CLIPS: tuple[SampleClip, ...] = (
    SampleClip("s01_tones_1p5s_16k.wav", 16000, 1, 1.5,
               "three pure tones (440, 660, 880 Hz) with short fades"),
    SampleClip("s02_chirp_bursts_4s_16k.wav", 16000, 1, 4.0,
               "2 s log chirp 100 Hz -> 6 kHz, then four white-noise bursts"),
    SampleClip("s03_speechlike_6s_16k.flac", 16000, 1, 6.0,
               "speech-like formant/AM synthesis, FLAC"),
    SampleClip("s04_stereo_3s_44k1.wav", 44100, 2, 3.0,
               "stereo 44.1 kHz: speech-like left, tone + chirp right"),
    SampleClip("s05_mix_35s_16k.wav", 16000, 1, 35.0,
               "35 s: speech-like, tones, noise, silence; crosses the 30 s window"),
)

_VOWEL_FORMANTS = (  # (F1, F2, F3) Hz, roughly a, i, u, e, o
    (730.0, 1090.0, 2440.0),
    (270.0, 2290.0, 3010.0),
    (300.0, 870.0, 2240.0),
    (530.0, 1840.0, 2480.0),
    (570.0, 840.0, 2410.0),
)


def _fade(x: np.ndarray, sr: int, ms: float = 10.0) -> np.ndarray:
    n = min(len(x) // 2, int(sr * ms / 1000))
    if n > 0:
        ramp = np.linspace(0.0, 1.0, n)
        x[:n] *= ramp
        x[-n:] *= ramp[::-1]
    return x


def _tone(freq: float, dur: float, sr: int) -> np.ndarray:
    t = np.arange(round(dur * sr)) / sr
    return _fade(np.sin(2 * np.pi * freq * t), sr)


def _chirp(f0: float, f1: float, dur: float, sr: int) -> np.ndarray:
    n = round(dur * sr)
    t = np.arange(n) / sr
    k = np.log(f1 / f0) / dur  # exponential sweep
    phase = 2 * np.pi * f0 * (np.exp(k * t) - 1) / k
    return _fade(np.sin(phase), sr)


def _noise_bursts(dur: float, sr: int, seed: int, count: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros(round(dur * sr))
    slot = len(out) // count
    for i in range(count):
        n = slot // 2
        burst = rng.standard_normal(n) * (0.6 - 0.1 * i)
        out[i * slot: i * slot + n] = _fade(burst, sr, 5.0)
    return out


def _speech_like(dur: float, sr: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = round(dur * sr)
    t = np.arange(n) / sr
    # Syllables of 120-300 ms, each with a vowel; pitch glides around 110-190 Hz.
    bounds = [0.0]
    while bounds[-1] < dur:
        bounds.append(bounds[-1] + rng.uniform(0.12, 0.30))
    syl = np.searchsorted(np.asarray(bounds[1:]), t, side="right")
    vowels = rng.integers(0, len(_VOWEL_FORMANTS), size=len(bounds))
    formants = np.asarray(_VOWEL_FORMANTS)[vowels][syl]  # [n, 3]
    # Smooth formant transitions over ~30 ms.
    k = int(0.03 * sr)
    kernel = np.ones(k) / k
    formants = np.stack(
        [np.convolve(np.pad(formants[:, j], (k // 2, k - 1 - k // 2), mode="edge"), kernel,
                     mode="valid") for j in range(3)], axis=1)
    f0 = 150 + 35 * np.sin(2 * np.pi * 0.35 * t + rng.uniform(0, 2 * np.pi)) \
        + 10 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = np.zeros(n)
    bandwidths = np.array([90.0, 110.0, 170.0])
    gains = np.array([1.0, 0.6, 0.3])
    for h in range(1, 40):
        fh = h * f0
        env = (gains / (1.0 + ((fh[:, None] - formants) / bandwidths) ** 2)).sum(axis=1)
        env *= fh < 0.45 * sr
        voiced += env * np.sin(h * phase) / np.sqrt(h)
    # Syllabic AM: each syllable rises and falls; small gaps between some syllables.
    starts = np.asarray(bounds[:-1])[syl]
    lengths = (np.asarray(bounds[1:]) - np.asarray(bounds[:-1]))[syl]
    pos = np.clip((t - starts) / lengths, 0.0, 1.0)
    am = np.sin(np.pi * pos) ** 0.6
    gaps = rng.random(len(bounds)) < 0.2
    am *= ~gaps[syl]
    # Fricative noise at some syllable onsets (first 25 % of the syllable).
    fric = rng.random(len(bounds)) < 0.3
    noise = np.diff(rng.standard_normal(n + 1))  # high-passed white noise
    fricative = noise * 0.15 * (fric[syl] & (pos < 0.25))
    return voiced * am + fricative


def _normalise(x: np.ndarray, peak: float = 0.5) -> np.ndarray:
    m = np.abs(x).max()
    return (x * (peak / m) if m > 0 else x).astype(np.float32)


def synthesize_sample(clip: SampleClip | str) -> np.ndarray:
    """The clip's float32 waveform: shape [frames] (mono) or [frames, channels]."""
    if isinstance(clip, str):
        by_name = {c.name: c for c in SAMPLE_CLIPS}
        if clip not in by_name:
            raise ValueError(f"unknown sample clip {clip!r}; choose one of {sorted(by_name)}")
        clip = by_name[clip]
    sr, dur, n = clip.sample_rate, clip.duration_s, clip.num_frames
    if clip.name.startswith("s01"):
        x = np.concatenate([_tone(f, dur / 3, sr) for f in (440.0, 660.0, 880.0)])
    elif clip.name.startswith("s02"):
        x = np.concatenate([0.8 * _chirp(100.0, 6000.0, 2.0, sr), _noise_bursts(dur - 2.0, sr, 2)])
    elif clip.name.startswith("s03"):
        x = _speech_like(dur, sr, seed=3)
    elif clip.name.startswith("s04"):
        left = _speech_like(dur, sr, seed=4)
        right = 0.5 * _tone(330.0, dur, sr) + 0.3 * _chirp(200.0, 8000.0, dur, sr)
        x = np.stack([_normalise(left, 0.5), _normalise(right, 0.4)], axis=1)
        return x[:n].astype(np.float32)
    elif clip.name.startswith("s05"):
        parts = [
            _speech_like(12.0, sr, seed=51),
            np.zeros(int(1.0 * sr)),
            0.5 * _tone(523.25, 2.0, sr),
            _noise_bursts(3.0, sr, seed=52, count=3),
            _speech_like(14.0, sr, seed=53),  # spans the 30 s boundary
            0.3 * _chirp(150.0, 4000.0, 3.0, sr),
        ]
        x = np.concatenate(parts)
    else:  # pragma: no cover - every clip in SAMPLE_CLIPS is handled above
        raise ValueError(clip.name)
    x = np.pad(x, (0, max(0, n - len(x))))[:n]
    return _normalise(x)


def write_sample_audio(out_dir: str | Path) -> list[Path]:
    """Write every clip of `SAMPLE_CLIPS` (16-bit PCM) into `out_dir`; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for clip in SAMPLE_CLIPS:
        path = out / clip.name
        fmt = "FLAC" if path.suffix == ".flac" else "WAV"
        sf.write(str(path), synthesize_sample(clip), clip.sample_rate, subtype="PCM_16",
                 format=fmt)
        paths.append(path)
    return paths
