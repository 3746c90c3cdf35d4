"""Decode any supported audio source into the float32 mono 16 kHz waveform both front-ends take.

Reproduces what the reference does with `librosa.load(path, sr=16000)`: read float32 samples
with libsndfile, average the channels, resample with soxr at "HQ" quality (librosa's default
`soxr_hq`) and fix the length to `ceil(n * 16000 / sr)` samples. librosa itself is not used.

Accepted sources (`AudioSource`):
  * a path (`str` / `os.PathLike`) to any file libsndfile reads (wav, flac, ogg/vorbis, opus,
    mp3 with libsndfile >= 1.1);
  * `bytes` / `bytearray` / `memoryview` holding such an encoded file;
  * a tuple `(waveform, sample_rate)`, or a bare `waveform` with `sample_rate=` given, where
    `waveform` is a numpy array or torch tensor, 1-D `[samples]` or 2-D. For 2-D arrays the
    SHORTER axis is the channel axis, so both `[channels, samples]` (torchaudio) and
    `[samples, channels]` (soundfile) work; a square array is read as `[channels, samples]`.
    Float samples are taken as they are; signed-integer PCM is scaled by 2**(bits-1), uint8
    as offset binary.

Every failure is an `AudioError` subclass naming the source (`name`, else the path, else
'<bytes>' / '<waveform>') and the reason.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Union

import numpy as np

from kimi_ops.errors import (
    AudioDecodeError,
    AudioNotFoundError,
    EmptyAudioError,
    NonFiniteAudioError,
)

SAMPLE_RATE = 16000
CHUNK_SECONDS = 30
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000: the 30 s window both front-ends cut by

AudioSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, tuple, Any]


def load_audio(
    source: AudioSource, sample_rate: int | None = None, name: str | None = None
) -> np.ndarray:
    """Return `source` as a contiguous float32 1-D array at 16 kHz (see the module docstring).

    `sample_rate` is the rate of a bare waveform `source`; with a `(waveform, sr)` tuple it must
    be None or equal `sr`; for encoded sources (path, bytes) the file header gives the rate and
    `sample_rate` must be None or equal to it. `name` labels the source in error messages.
    """
    if isinstance(source, (str, os.PathLike)):
        label = name or os.fspath(source)
        samples, rate = _read_path(os.fspath(source), label)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        samples, rate = _read_bytes(bytes(source), label)
    else:
        label = name or "<waveform>"
        if isinstance(source, tuple):
            if len(source) != 2:
                raise AudioDecodeError(label, "expected a (waveform, sample_rate) tuple")
            source, rate = source
            if sample_rate is not None and sample_rate != rate:
                raise AudioDecodeError(
                    label, f"sample_rate={sample_rate} disagrees with the tuple's {rate}"
                )
        else:
            rate = sample_rate
            if rate is None:
                raise AudioDecodeError(label, "a bare waveform needs sample_rate=")
        samples = _waveform_to_mono(source, label)
        sample_rate = None
    if sample_rate is not None and sample_rate != rate:
        raise AudioDecodeError(label, f"file is {rate} Hz but sample_rate={sample_rate} was given")
    return _finish(samples, rate, label)


def split_chunks(wav: np.ndarray, chunk_samples: int = CHUNK_SAMPLES) -> list[np.ndarray]:
    """Cut a waveform into consecutive `[0, 30 s), [30 s, 60 s), ...` views (last one shorter).

    An empty waveform gives no chunks, as in the reference's `while t * 16000 < len(audio)` loop.
    """
    return [wav[start : start + chunk_samples] for start in range(0, len(wav), chunk_samples)]


def num_chunks(num_samples: int, chunk_samples: int = CHUNK_SAMPLES) -> int:
    return -(-num_samples // chunk_samples)


def _read_path(path: str, label: str) -> tuple[np.ndarray, int]:
    if not os.path.exists(path):
        raise AudioNotFoundError(label, "no such file")
    if os.path.isdir(path):
        raise AudioNotFoundError(label, "is a directory, not an audio file")
    return _read_encoded(path, label)


def _read_bytes(data: bytes, label: str) -> tuple[np.ndarray, int]:
    if not data:
        raise EmptyAudioError(label, "zero bytes of audio data")
    return _read_encoded(io.BytesIO(data), label)


def _read_encoded(file: Any, label: str) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        # always_2d: [frames, channels]; float32 like librosa.load
        samples, rate = soundfile.read(file, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as exc:
        raise AudioDecodeError(label, f"cannot decode audio: {exc}") from exc
    # mean over channels of the float32 samples == librosa.to_mono
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)
    return mono, int(rate)


def _waveform_to_mono(waveform: Any, label: str) -> np.ndarray:
    if hasattr(waveform, "detach") and hasattr(waveform, "cpu"):  # torch.Tensor, no import
        waveform = waveform.detach().cpu().float().numpy()
    try:
        array = np.asarray(waveform)
    except Exception as exc:  # any conversion failure is a bad input
        raise AudioDecodeError(label, f"not an array: {exc}") from exc
    if np.issubdtype(array.dtype, np.signedinteger):  # PCM: full scale -> [-1, 1)
        array = array.astype(np.float32) / float(2 ** (8 * array.dtype.itemsize - 1))
    elif array.dtype == np.uint8:  # 8-bit PCM is offset binary
        array = (array.astype(np.float32) - 128.0) / 128.0
    elif not np.issubdtype(array.dtype, np.floating):
        raise AudioDecodeError(label, f"unsupported sample dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if array.ndim == 1:
        return array
    if array.ndim != 2:
        raise AudioDecodeError(label, f"waveform must be 1-D or 2-D, got shape {array.shape}")
    channel_axis = 0 if array.shape[0] <= array.shape[1] else 1
    if array.shape[channel_axis] == 1:
        return array.reshape(-1)
    return array.mean(axis=channel_axis, dtype=np.float32)


def _finish(mono: np.ndarray, rate: Any, label: str) -> np.ndarray:
    try:
        rate_ok = float(rate) > 0 and float(rate) == int(rate)
    except (TypeError, ValueError):
        rate_ok = False
    if not rate_ok:
        raise AudioDecodeError(label, f"invalid sample rate {rate!r}")
    rate = int(rate)
    if mono.size == 0:
        raise EmptyAudioError(label, "audio has zero samples")
    if not np.isfinite(mono).all():
        bad = int(np.count_nonzero(~np.isfinite(mono)))
        raise NonFiniteAudioError(label, f"{bad} of {mono.size} samples are NaN or infinite")
    if rate != SAMPLE_RATE:
        mono = _resample(mono, rate)
        if mono.size == 0:
            raise EmptyAudioError(label, f"audio is shorter than one sample at {SAMPLE_RATE} Hz")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _resample(mono: np.ndarray, rate: int) -> np.ndarray:
    import soxr

    out = soxr.resample(np.ascontiguousarray(mono), rate, SAMPLE_RATE, quality="HQ")
    # librosa.resample(fix=True): trim or zero-pad to ceil(n * ratio)
    target = math.ceil(mono.shape[0] * (SAMPLE_RATE / rate))
    if out.shape[0] > target:
        out = out[:target]
    elif out.shape[0] < target:
        out = np.pad(out, (0, target - out.shape[0]))
    return out.astype(np.float32, copy=False)
