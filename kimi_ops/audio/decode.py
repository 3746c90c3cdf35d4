"""Decode any supported audio source into the float32 mono 16 kHz waveform both front-ends take.

Reproduces what the reference does with `librosa.load(path, sr=16000)`: read float32 samples
with libsndfile, average the channels, resample with soxr at "HQ" quality (librosa's default
`soxr_hq`) and fix the length to `ceil(n * 16000 / sr)` samples. librosa itself is not used.

Accepted sources (`AudioSource`):
  * a path (`str` / `os.PathLike`) to any file libsndfile reads (wav, flac, ogg/vorbis, opus,
    mp3 with libsndfile >= 1.1, aiff, au, w64, rf64, caf, ...; `AUDIO_FILE_EXTENSIONS` names
    the usual extensions of these containers);
  * `bytes` / `bytearray` / `memoryview` holding such an encoded file;
  * a tuple `(waveform, sample_rate)`, or a bare `waveform` with `sample_rate=` given, where
    `waveform` is a numpy array or torch tensor, 1-D `[samples]` or 2-D. For 2-D arrays the
    SHORTER axis is the channel axis, so both `[channels, samples]` (torchaudio) and
    `[samples, channels]` (soundfile) work; a square array is read as `[channels, samples]`.
    Float samples are taken as they are; signed-integer PCM is scaled by 2**(bits-1), uint8
    as offset binary.

Every failure is an `AudioError` subclass naming the source (`name`, else the path, else
'<bytes>' / '<waveform>') and the reason, with a stable `kind` (`kimi_ops.errors`).

Guards against hostile input (each checked from the header, before any sample is decoded):
  * Sample rate outside [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE] (1 kHz .. 768 kHz) -> `bad_sample_rate`;
    a 1 Hz header would otherwise resample 1,000 frames into 16 M samples.
  * Duration over `max_seconds` -> `too_long`. The default is 6 hours (`MAX_SECONDS`, so long
    archive recordings pass), or the `KIMI_MAX_AUDIO_SECONDS` environment variable (read at
    each call, so a Ray worker started with it set uses it); `max_seconds=None` disables the
    guard. The limit bounds memory: an encoded file is read block by block, each block mixed
    down and resampled as it comes (soxr's stream resampler, whose output is bitwise the
    one-shot `soxr.resample`'s), so only the 16 kHz result is ever whole: 58 MB of float32 per
    hour, 1.4 GB for 6 h, whatever the source's rate and channels.
  * A decoder error anywhere in the stream (a truncated FLAC or Ogg file) makes the file
    `undecodable`: a partial recording is not labelled as if it were whole. WAV, RF64, AIFF,
    AU and W64 files of PCM, float or G.711 samples whose data holds fewer frames than their
    header declares are `undecodable` too (libsndfile reads them silently, shortened). A
    streamed WAV's placeholder size (0, 0x7FFFF000 or 0xFFFFFFFF) and an AU's 0xFFFFFFFF
    declare nothing. MP3 has no reliable count to compare with: a truncated MP3 gives what is
    there; so do rarer containers libsndfile also opens (IRCAM, NIST, VOC, ...), which the
    default listing does not pick (it takes `AUDIO_FILE_EXTENSIONS`).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
from typing import Any, Union

import numpy as np

from kimi_ops.errors import (
    AudioDecodeError,
    AudioNotFoundError,
    AudioTooLongError,
    EmptyAudioError,
    NonFiniteAudioError,
    UnsupportedSampleRateError,
)

SAMPLE_RATE = 16000
CHUNK_SECONDS = 30
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000: the 30 s window both front-ends cut by

MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 768000
MAX_SECONDS = 6 * 3600.0  # default duration limit; see the module docstring
MAX_SECONDS_ENV = "KIMI_MAX_AUDIO_SECONDS"
_BLOCK_FRAMES = 1 << 20  # frames per read when mixing down
# Containers and sample types whose header states the exact frame count (see _declared_frames).
_COUNTED_FORMATS = frozenset({"WAV", "WAVEX", "RF64", "AIFF", "AU", "W64"})
_FIXED_WIDTH_SUBTYPES = frozenset({"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT",
                                   "DOUBLE", "ULAW", "ALAW"})
# The extensions of the containers above that this decoder reads, and checks for truncation
# (MP3 aside): the audio a listing takes by default (`pipelines.storage.listing`).
AUDIO_FILE_EXTENSIONS = frozenset({
    "wav", "wave", "rf64", "w64",  # RIFF WAVE, its 64-bit forms
    "flac",
    "ogg", "oga", "opus",  # Ogg: Vorbis, FLAC or Opus
    "mp3",
    "aif", "aiff", "aifc",  # AIFF and AIFF-C
    "au", "snd",  # Sun/NeXT
    "caf",  # Apple Core Audio
})
# What writers that cannot seek back (ffmpeg, sox, libsndfile to a pipe) leave as a WAV data size.
_STREAMED_SIZES = frozenset({0, 0x7FFFF000, 0xFFFFFFFF})

_DEFAULT = object()

AudioSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, tuple, Any]


def load_audio(
    source: AudioSource,
    sample_rate: int | None = None,
    name: str | None = None,
    max_seconds: float | None = _DEFAULT,  # type: ignore[assignment]
) -> np.ndarray:
    """Return `source` as a contiguous float32 1-D array at 16 kHz (see the module docstring).

    `sample_rate` is the rate of a bare waveform `source`; with a `(waveform, sr)` tuple it must
    be None or equal `sr`; for encoded sources (path, bytes) the file header gives the rate and
    `sample_rate` must be None or equal to it. `name` labels the source in error messages.
    `max_seconds` is the duration limit (default: `default_max_seconds()`; None: no limit).
    """
    if max_seconds is _DEFAULT:
        max_seconds = default_max_seconds()
    if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        if isinstance(source, (str, os.PathLike)):
            label = name or os.fspath(source) or "<empty path>"
            if not os.fspath(source):
                raise AudioNotFoundError(label, "the audio path is empty")
            wave, rate = _read_path(os.fspath(source), label, max_seconds)
        else:
            label = name or "<bytes>"
            wave, rate = _read_bytes(bytes(source), label, max_seconds)
        if sample_rate is not None and sample_rate != rate:
            raise AudioDecodeError(label, f"file is {rate} Hz but sample_rate={sample_rate} "
                                          "was given")
        return wave
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
            if not (isinstance(source, (list, np.ndarray)) or hasattr(source, "__array__")
                    or hasattr(source, "detach")):
                raise AudioDecodeError(label, "audio must be a file path, bytes or a "
                                              f"(waveform, sample_rate) pair, got "
                                              f"{type(source).__name__}")
            rate = sample_rate
            if rate is None:
                raise AudioDecodeError(label, "a bare waveform has no sample rate: pass "
                                              "(waveform, sample_rate)")
        samples = _waveform_to_mono(source, label)
    return _finish(samples, rate, label, max_seconds)


def default_max_seconds() -> float | None:
    """`KIMI_MAX_AUDIO_SECONDS` when set (a number; 0 or 'none' for no limit), else MAX_SECONDS."""
    raw = os.environ.get(MAX_SECONDS_ENV, "").strip()
    if not raw:
        return MAX_SECONDS
    if raw.lower() in ("none", "0", "inf"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{MAX_SECONDS_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0 or math.isnan(value):
        raise ValueError(f"{MAX_SECONDS_ENV}={raw!r} must be positive")
    return value


def split_chunks(wav: np.ndarray, chunk_samples: int = CHUNK_SAMPLES) -> list[np.ndarray]:
    """Cut a waveform into consecutive `[0, 30 s), [30 s, 60 s), ...` views (last one shorter).

    An empty waveform gives no chunks, as in the reference's `while t * 16000 < len(audio)` loop.
    """
    return [wav[start : start + chunk_samples] for start in range(0, len(wav), chunk_samples)]


def num_chunks(num_samples: int, chunk_samples: int = CHUNK_SAMPLES) -> int:
    return -(-num_samples // chunk_samples)


def _read_path(path: str, label: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    if not os.path.exists(path):
        raise AudioNotFoundError(label, "no such file")
    if os.path.isdir(path):
        raise AudioNotFoundError(label, "is a directory, not an audio file")
    if os.path.getsize(path) == 0:
        raise EmptyAudioError(label, "zero bytes of audio data")
    with audio_file(path) as file:
        return _read_encoded(file, label, max_seconds)


def audio_file(data: str | bytes):
    """A path (or bytes) as a file object for soundfile, opened here, not by libsndfile: given a
    path, libsndfile takes a macOS AppleDouble sidecar (`._name`, common in archives copied
    from a Mac) for a Sound Designer II resource fork and refuses an MP3 next to one ("bad data
    offset"). A context manager either way."""
    return open(data, "rb") if isinstance(data, str) else contextlib.nullcontext(io.BytesIO(data))


def _read_bytes(data: bytes, label: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    if not data:
        raise EmptyAudioError(label, "zero bytes of audio data")
    return _read_encoded(io.BytesIO(data), label, max_seconds)


def _read_encoded(file: Any, label: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """(the file as 16 kHz float32 mono, read, mixed down and resampled block by block, the
    file's sample rate)."""
    import soundfile

    decode_errors = (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError,
                     OverflowError)
    try:
        snd = soundfile.SoundFile(file)
    except decode_errors as exc:  # libsndfile's own words, not "Error opening <BytesIO at 0x..>"
        reason = getattr(exc, "error_string", None) or str(exc)
        file.seek(0)
        if file.read(4) == _APPLEDOUBLE_MAGIC:
            reason = ("a macOS AppleDouble sidecar (the Finder's metadata of the file named "
                      "without its '._'), not audio")
        raise AudioDecodeError(label, f"cannot decode audio: {reason}") from exc
    with snd:
        rate, frames, channels = int(snd.samplerate), int(snd.frames), int(snd.channels)
        _check_rate(rate, label)
        if channels < 1:
            raise AudioDecodeError(label, f"the header declares {channels} channels")
        _check_duration(frames, rate, label, max_seconds)
        out = _To16k(rate, frames)
        filled = bad = 0
        try:
            while filled < frames:
                # float32 like librosa.load; the mean of float32 samples == librosa.to_mono
                block = snd.read(min(_BLOCK_FRAMES, frames - filled), dtype="float32",
                                 always_2d=True)
                if block.shape[0] == 0:
                    break
                mono = block[:, 0] if channels == 1 else block.mean(axis=1, dtype=np.float32)
                filled += block.shape[0]
                bad += mono.size - int(np.count_nonzero(np.isfinite(mono)))
                if not bad:  # a file with a NaN is refused below: stop resampling it
                    out.add(mono)
        except decode_errors as exc:
            raise AudioDecodeError(label, f"cannot decode audio: {exc}") from exc
        counted = snd.format in _COUNTED_FORMATS and snd.subtype in _FIXED_WIDTH_SUBTYPES
    if filled == 0:
        raise EmptyAudioError(label, "audio has zero samples")
    # libsndfile cuts its frame count to the bytes present: the header's own count is the claim
    declared = _declared_frames(file) if counted else None
    if declared is not None and filled < declared:
        raise AudioDecodeError(
            label, f"truncated: the header declares {declared / rate:.3f} s but the file holds "
                   f"only {filled / rate:.3f} s")
    if bad:
        raise NonFiniteAudioError(label, f"{bad} of {filled} samples are NaN or infinite")
    return _finish_16k(out.finish(filled), label), rate


def _declared_frames(file: Any) -> int | None:
    """The frame count a WAV, RF64, AIFF, AU or W64 header declares (path or file object);
    None when it declares none (a streamed WAV) or is laid out in a way this short reader does
    not follow."""
    if isinstance(file, (str, bytes)):
        with open(file, "rb") as f:
            return _declared_frames(f)
    file.seek(0)
    head = file.read(40)
    file.seek(12)
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return _wav_declared_frames(file, rf64=head[:4] == b"RF64")
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return _aiff_declared_frames(file)
    if head[:4] in (b".snd", b"dns."):
        return _au_declared_frames(head)
    if head[:16] == _W64_RIFF and head[24:40] == _W64_WAVE:
        file.seek(40)
        return _w64_declared_frames(file)
    return None


def _wav_declared_frames(f: Any, rf64: bool) -> int | None:
    """data chunk bytes / fmt block align; RF64 keeps its data size in the ds64 chunk."""
    block_align = data64 = None
    while len(chunk := f.read(8)) == 8:
        name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if name == b"data":
            if rf64 and size == 0xFFFFFFFF:
                size = data64
            if not block_align or size is None or (not rf64 and size in _STREAMED_SIZES):
                return None
            return size // block_align
        body = f.read(min(size, 28))
        if name == b"fmt " and len(body) >= 14:
            block_align = struct.unpack_from("<H", body, 12)[0]
        elif name == b"ds64" and len(body) >= 16:
            data64 = struct.unpack_from("<Q", body, 8)[0]
        f.seek(size + (size & 1) - len(body), 1)
    return None


def _aiff_declared_frames(f: Any) -> int | None:
    """numSampleFrames of the COMM chunk."""
    while len(chunk := f.read(8)) == 8:
        name, size = chunk[:4], struct.unpack(">I", chunk[4:])[0]
        if name == b"COMM":
            body = f.read(6)
            return struct.unpack_from(">I", body, 2)[0] if len(body) == 6 else None
        f.seek(size + (size & 1), 1)
    return None


# Sun/NeXT AU sample encodings -> bytes per sample (mu-law, 8/16/24/32-bit PCM, float,
# double, A-law); the ADPCM ones have no fixed width
_AU_SAMPLE_BYTES = {1: 1, 2: 1, 3: 2, 4: 3, 5: 4, 6: 4, 7: 8, 27: 1}
_APPLEDOUBLE_MAGIC = b"\x00\x05\x16\x07"
_W64_RIFF = b"riff\x2e\x91\xcf\x11\xa5\xd6\x28\xdb\x04\xc1\x00\x00"
_W64_WAVE = b"wave\xf3\xac\xd3\x11\x8c\xd1\x00\xc0\x4f\x8e\xdb\x8a"


def _au_declared_frames(head: bytes) -> int | None:
    """AU header: data size / (sample bytes x channels); big-endian `.snd`, little `dns.`."""
    if len(head) < 24:
        return None
    order = ">" if head[:4] == b".snd" else "<"
    _, size, encoding, _, channels = struct.unpack_from(order + "5I", head, 4)
    width = _AU_SAMPLE_BYTES.get(encoding)
    if size == 0xFFFFFFFF or not width or not channels:  # unknown size (written to a pipe)
        return None
    return size // (width * channels)


def _w64_declared_frames(f: Any) -> int | None:
    """Sony Wave64: chunks named by GUIDs (`fmt ...`, `data ...`) with 64-bit sizes that
    count their 24-byte header, bodies 8-byte aligned; data bytes / fmt block align."""
    block_align = None
    while len(chunk := f.read(24)) == 24:
        name, size = chunk[:4], struct.unpack_from("<Q", chunk, 16)[0]
        if size < 24:
            return None
        if name == b"data":
            return (size - 24) // block_align if block_align else None
        body = f.read(min(size - 24, 16))
        if name == b"fmt " and len(body) >= 14:
            block_align = struct.unpack_from("<H", body, 12)[0]
        f.seek((size + 7) // 8 * 8 - 24 - len(body), 1)
    return None


class _To16k:
    """16 kHz output of a signal fed block by block: soxr's stream resampler at "HQ" quality
    (librosa's default `soxr_hq`), whose output equals the one-shot `soxr.resample` bit for bit
    (checked at blocks of 4 k to 1 M samples, 8 to 96 kHz), written into one buffer sized from
    the header's frame count. `finish` fixes the length to `ceil(n * 16000 / rate)` as
    librosa.resample(fix=True) does: trimmed, or padded with zeros."""

    def __init__(self, rate: int, frames: int):
        import soxr

        self.rate = rate
        self.stream = (None if rate == SAMPLE_RATE else
                       soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ"))
        self.buffer = np.empty(self._length(frames) + 16, dtype=np.float32)
        self.size = 0

    def _length(self, n: int) -> int:
        return n if self.stream is None else math.ceil(n * (SAMPLE_RATE / self.rate))

    def add(self, mono: np.ndarray, last: bool = False) -> None:
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        chunk = mono if self.stream is None else self.stream.resample_chunk(mono, last=last)
        self._reserve(self.size + len(chunk))
        self.buffer[self.size: self.size + len(chunk)] = chunk
        self.size += len(chunk)

    def _reserve(self, size: int) -> None:
        if size > len(self.buffer):  # a header that understated its frames
            self.buffer.resize(max(size, 2 * len(self.buffer)), refcheck=False)

    def finish(self, samples_in: int) -> np.ndarray:
        """The whole output for `samples_in` input samples (the buffer itself, shrunk)."""
        if self.stream is not None:
            self.add(np.zeros(0, dtype=np.float32), last=True)
        target = self._length(samples_in)
        self._reserve(target)
        self.buffer[self.size: target] = 0.0
        self.buffer.resize(target, refcheck=False)
        return self.buffer


def _check_rate(rate: Any, label: str) -> None:
    try:
        rate_ok = float(rate) > 0 and float(rate) == int(rate)
    except (TypeError, ValueError, OverflowError):
        rate_ok = False
    if not rate_ok:
        raise AudioDecodeError(label, f"invalid sample rate {rate!r}")
    if not MIN_SAMPLE_RATE <= int(rate) <= MAX_SAMPLE_RATE:
        raise UnsupportedSampleRateError(
            label, f"sample rate {int(rate)} Hz is outside the supported "
                   f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")


def _check_duration(frames: int, rate: int, label: str, max_seconds: float | None) -> None:
    if max_seconds is not None and frames > max_seconds * rate:
        seconds = frames / rate
        raise AudioTooLongError(
            label, f"{seconds:.0f} s ({seconds / 3600:.2f} h) is longer than the "
                   f"{max_seconds:.0f} s limit (raise it with max_seconds= or {MAX_SECONDS_ENV})",
            seconds, max_seconds)


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


def _finish(mono: np.ndarray, rate: Any, label: str, max_seconds: float | None) -> np.ndarray:
    """A decoded waveform's checks, then 16 kHz."""
    _check_rate(rate, label)
    rate = int(rate)
    _check_duration(mono.size, rate, label, max_seconds)
    if mono.size == 0:
        raise EmptyAudioError(label, "audio has zero samples")
    if not np.isfinite(mono).all():
        bad = int(np.count_nonzero(~np.isfinite(mono)))
        raise NonFiniteAudioError(label, f"{bad} of {mono.size} samples are NaN or infinite")
    out = _To16k(rate, mono.size)
    out.add(mono)
    return _finish_16k(out.finish(mono.size), label)


def _finish_16k(wave: np.ndarray, label: str) -> np.ndarray:
    if wave.size == 0:
        raise EmptyAudioError(label, f"audio is shorter than one sample at {SAMPLE_RATE} Hz")
    return np.ascontiguousarray(wave, dtype=np.float32)
