"""Test material with known speech: espeak-ng speech in noise, tones and silence, 16 kHz.

Speech comes from espeak-ng's library and voices as the `espeakng-loader` wheel ships them (a
dev dependency: no system package), driven through ctypes. `mixture` lays utterances on a
timeline of steady noise (at a given SNR against the speech, or a given level), music-like
tones and digital silence, and returns the waveform with the exact sample intervals that hold
speech: the ground truth for `bench/segmentation.py` and the VAD tests.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass

import numpy as np
import soxr

RATE = 16000
_SYNTH_LOCK = threading.Lock()
SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "We will meet again on Thursday morning to finish the report for the committee.",
    "A large archive of recordings was labelled overnight by the new pipeline.",
    "She sells sea shells by the sea shore, and the shells she sells are surely seashells.",
    "Turn left at the second light, then keep going until you see the old library.",
)


@functools.cache
def _espeak():
    """espeak-ng initialised for synchronous synthesis into a buffer: (library, sample rate,
    the samples list its callback fills, the callback, kept alive)."""
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.restype = ctypes.c_int
    rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)  # SYNCHRONOUS
    if rate <= 0:
        raise RuntimeError("espeak-ng did not initialise")
    samples: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                     ctypes.c_void_p)

    def collect(wav, count, _events):
        if wav and count > 0:
            samples.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    callback = callback_type(collect)
    lib.espeak_SetSynthCallback(callback)
    return lib, rate, samples, callback


def speak(text: str, voice: str = "en", rate_wpm: int = 160) -> np.ndarray:
    """`text` spoken by espeak-ng, float32 at 16 kHz, peak-normalised to 0.5."""
    lib, rate, samples, _ = _espeak()
    with _SYNTH_LOCK:
        samples.clear()
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        lib.espeak_SetParameter(1, rate_wpm, 0)  # espeakRATE
        data = text.encode()
        # POS_CHARACTER, espeakCHARS_UTF8
        lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)
        lib.espeak_Synchronize()
        wave = np.concatenate(samples).astype(np.float32) / 32768.0 if samples else np.zeros(0)
    wave = soxr.resample(wave, rate, RATE).astype(np.float32)
    voiced = np.flatnonzero(np.abs(wave) > 1e-3)  # espeak pads with silence: trim it
    wave = wave[voiced[0]: voiced[-1] + 1] if voiced.size else wave
    return 0.5 * wave / max(float(np.abs(wave).max()), 1e-9)


@dataclass(frozen=True)
class Mixture:
    wave: np.ndarray
    speech: list[tuple[int, int]]  # sample intervals [start, end) that hold speech
    description: str

    @property
    def seconds(self) -> float:
        return len(self.wave) / RATE


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def noise(seconds: float, seed: int) -> np.ndarray:
    """Steady pink-ish noise (white noise through a one-pole low-pass), unit RMS."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(int(seconds * RATE))
    shaped = np.empty_like(white)
    acc = 0.0
    for i in range(0, len(white), 4096):  # blockwise one-pole filter (a loop per block)
        block = white[i:i + 4096]
        out = np.empty_like(block)
        for j, v in enumerate(block):
            acc = 0.95 * acc + v
            out[j] = acc
        shaped[i:i + 4096] = out
    return (shaped / rms(shaped)).astype(np.float32)


def tones(seconds: float, seed: int) -> np.ndarray:
    """Music-like: a sequence of chords of sine partials with attack and decay, unit RMS."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    out = np.zeros(n, np.float64)
    t = np.arange(int(0.5 * RATE)) / RATE
    envelope = np.minimum(1.0, t / 0.02) * np.exp(-3 * t)
    for start in range(0, n, len(t)):
        root = 110 * 2 ** (rng.integers(0, 24) / 12)
        chord = sum(np.sin(2 * np.pi * root * r * t) for r in (1, 1.26, 1.5, 2))
        piece = (chord * envelope)[: n - start]
        out[start:start + len(piece)] += piece
    return (out / rms(out)).astype(np.float32)


def mixture(layout: list[tuple[str, float]], snr_db: float | None = 10.0,
            noise_dbfs: float | None = None, seed: int = 0, words_per_minute: int = 160
            ) -> Mixture:
    """A recording from `layout`, a list of (kind, seconds): "speech" (an utterance of whole
    sentences, at least `seconds` long), "pause" (background only), "tones", "silence" (digital zero, no background).
    The background noise runs under everything but "silence", at `snr_db` below the speech's
    RMS, or at `noise_dbfs` when given."""
    parts, speech, position, said = [], [], 0, 0
    for kind, seconds in layout:
        if kind == "speech":  # sentences, until the utterance is at least `seconds` long
            words = []
            while not words or len(np.concatenate(words)) < seconds * RATE:
                words.append(speak(SENTENCES[(seed + said) % len(SENTENCES)],
                                   rate_wpm=words_per_minute))
                said += 1
            piece = np.concatenate(words)
            speech.append((position, position + len(piece)))
        elif kind == "tones":
            piece = 0.1 * tones(seconds, seed + position)
        else:
            piece = np.zeros(int(seconds * RATE), np.float32)
        parts.append((kind, piece))
        position += len(piece)
    wave = np.concatenate([p for _, p in parts]).astype(np.float32)
    speech_rms = rms(np.concatenate([wave[a:b] for a, b in speech])) if speech else 0.1
    level = (10 ** (noise_dbfs / 20) if noise_dbfs is not None
             else speech_rms / 10 ** ((snr_db or 0.0) / 20))
    background = level * noise(len(wave) / RATE, seed)
    position = 0
    for kind, piece in parts:
        if kind != "silence":
            wave[position:position + len(piece)] += background[position:position + len(piece)]
        position += len(piece)
    np.clip(wave, -1.0, 1.0, out=wave)
    described = (f"noise at {noise_dbfs:g} dBFS" if noise_dbfs is not None
                 else f"SNR {snr_db:g} dB")
    return Mixture(wave, speech, described)


def archive_fixture(seed: int = 0) -> Mixture:
    """An archive recording: 60 s, three utterances (about 17 s of speech) in steady noise at
    about -32 dBFS."""
    return fitted([("pause", 5.0), ("speech", 0), ("pause", 10.0), ("speech", 0),
                   ("pause", 8.0), ("speech", 0)], 60.0, noise_dbfs=-32.0, seed=seed,
                  words_per_minute=115)


def fitted(layout: list[tuple[str, float]], seconds: float, **kwargs) -> Mixture:
    """`mixture(layout)` with a final pause that brings it to `seconds`."""
    head = mixture(layout, **kwargs)
    rest = max(0.0, seconds - head.seconds)
    return mixture([*layout, ("pause", rest)], **kwargs) if rest else head
