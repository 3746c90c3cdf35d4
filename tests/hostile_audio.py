"""A generator of broken, mislabelled and extreme audio files for the hostile-input tests.

    from tests.hostile_audio import hostile_corpus
    for name, case in hostile_corpus().items():
        case.data      # the file's bytes
        case.expect    # "ok" or the stable error kind load_audio must raise

Everything is built in memory from soundfile encodings and hand-crafted headers (RIFF/WAVE
layout: https://www.mmsp.ece.mcgill.ca/Documents/AudioFormats/WAVE/WAVE.html), so the corpus is
deterministic and small: the whole set is about 1 MB, the 7-hour file included (FLAC of digital
silence compresses to a few bytes per block).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import soundfile as sf


@dataclass(frozen=True)
class HostileCase:
    data: bytes
    expect: str  # "ok" or the KimiError kind


def encode(wave: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, rate: int = 16000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_header(*, channels: int = 1, rate: int = 16000, bits: int = 16, fmt_tag: int = 1,
               data_bytes: int = 0, riff_bytes: int | None = None) -> bytes:
    """A canonical 44-byte WAV header with every field under the caller's control."""
    block_align = channels * bits // 8
    byte_rate = (rate * block_align) & 0xFFFFFFFF
    riff = (36 + data_bytes if riff_bytes is None else riff_bytes) & 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, fmt_tag, channels, rate & 0xFFFFFFFF,
                                    byte_rate, block_align & 0xFFFF, bits)
            + b"data" + struct.pack("<I", data_bytes & 0xFFFFFFFF))


def crafted_wav(samples: bytes, **header) -> bytes:
    header.setdefault("data_bytes", len(samples))
    return wav_header(**header) + samples


def png_bytes() -> bytes:
    """A valid 1x1 grey PNG."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))


def long_silence_flac(hours: float, rate: int = 8000) -> bytes:
    """`hours` of digital silence as FLAC, written block by block (never the whole array)."""
    buf = io.BytesIO()
    block = np.zeros(rate * 60, dtype=np.int16)  # one minute
    with sf.SoundFile(buf, "w", samplerate=rate, channels=1, format="FLAC",
                      subtype="PCM_16") as out:
        for _ in range(int(hours * 60)):
            out.write(block)
    return buf.getvalue()


def valid_files() -> dict[str, bytes]:
    """Small valid files of every format, the seeds the fuzz test mutates."""
    wave = tone(0.5, 16000)
    return {
        "wav": encode(wave, 16000, "WAV", "PCM_16"),
        "float_wav": encode(wave, 16000, "WAV", "FLOAT"),
        "flac": encode(wave, 16000, "FLAC", "PCM_16"),
        "ogg": encode(tone(0.5, 44100), 44100, "OGG", "VORBIS"),
        "mp3": encode(tone(0.5, 44100), 44100, "MP3", "MPEG_LAYER_III"),
    }


def hostile_corpus(long_hours: float = 7.0) -> dict[str, HostileCase]:
    """name -> case. The name's extension is what a listing would see (some lie on purpose)."""
    seeds = valid_files()
    wav = seeds["wav"]
    nan_wave = tone(0.5)
    nan_wave[[10, 500]] = np.nan
    inf_wave = tone(0.5)
    inf_wave[100] = np.inf
    pcm = (tone(1.0) * 32767).astype("<i2").tobytes()
    corpus = {
        "empty.wav": HostileCase(b"", "empty_audio"),
        "header_only.wav": HostileCase(wav[:44], "empty_audio"),
        # fewer frames than the header declares: refused rather than labelled as if whole
        "truncated.wav": HostileCase(wav[: len(wav) // 2], "undecodable"),
        "truncated_in_header.wav": HostileCase(wav[:30], "undecodable"),
        # a decoder error mid-stream: refused rather than labelled as if whole
        "truncated.flac": HostileCase(seeds["flac"][: len(seeds["flac"]) // 2], "undecodable"),
        "truncated_in_header.flac": HostileCase(seeds["flac"][:20], "undecodable"),
        "truncated.ogg": HostileCase(seeds["ogg"][: len(seeds["ogg"]) // 2], "undecodable"),
        "truncated.mp3": HostileCase(seeds["mp3"][: len(seeds["mp3"]) // 2], "ok"),
        "random.wav": HostileCase(
            np.random.default_rng(7).integers(0, 256, 5000, np.uint8).tobytes(), "undecodable"),
        "random.mp3": HostileCase(
            np.random.default_rng(8).integers(0, 256, 5000, np.uint8).tobytes(), "undecodable"),
        "flac_named.wav": HostileCase(seeds["flac"], "ok"),
        "wav_named.mp3": HostileCase(wav, "ok"),
        "text.wav": HostileCase(b"this is a text file, not audio\n" * 40, "undecodable"),
        "config.flac": HostileCase(json.dumps({"audio": False, "x": list(range(200))}).encode(),
                                   "undecodable"),
        "image.ogg": HostileCase(png_bytes(), "undecodable"),
        "nan.wav": HostileCase(encode(nan_wave, 16000, "WAV", "FLOAT"), "non_finite"),
        "inf.wav": HostileCase(encode(inf_wave, 16000, "WAV", "FLOAT"), "non_finite"),
        "zero_channels.wav": HostileCase(crafted_wav(pcm, channels=0), "undecodable"),
        "rate_1hz.wav": HostileCase(crafted_wav(pcm[:2000], rate=1), "bad_sample_rate"),
        "rate_100mhz.wav": HostileCase(crafted_wav(pcm, rate=100_000_000), "bad_sample_rate"),
        "rate_4ghz.wav": HostileCase(crafted_wav(pcm, rate=4_000_000_000), "undecodable"),
        "rate_0hz.wav": HostileCase(crafted_wav(pcm, rate=0), "undecodable"),
        "zero_frames.wav": HostileCase(encode(np.zeros(0, np.float32), 16000, "WAV", "PCM_16"),
                                       "empty_audio"),
        # a header that claims ~37 hours of 16 kHz PCM but holds one second: truncated, refused
        "claims_hours.wav": HostileCase(crafted_wav(pcm, data_bytes=0xFFFFFFF0), "undecodable"),
        # a real multi-hour file: refused before decoding (max duration guard), never OOM
        "long_silence.flac": HostileCase(long_silence_flac(long_hours), "too_long"),
    }
    return corpus


# -- decoding in a child process: a hang or a crash in C fails one example, not the session ----

def decode_outcome(data: bytes, name: str) -> tuple:
    """("ok", dtype, ndim, samples, all finite) | ("kimi", class, kind, message)
    | ("unexpected", class, message, traceback)."""
    import traceback

    from kimi_ops.audio import load_audio
    from kimi_ops.errors import KimiError

    try:
        wave = load_audio(data, name=name)
    except KimiError as exc:
        return ("kimi", type(exc).__name__, exc.kind, str(exc))
    except BaseException as exc:  # noqa: BLE001 - exactly what the tests look for
        return ("unexpected", type(exc).__name__, str(exc), traceback.format_exc())
    return ("ok", wave.dtype.str, wave.ndim, int(wave.size), bool(np.isfinite(wave).all()))


def _serve(conn) -> None:
    while True:
        request = conn.recv()
        if request is None:
            return
        conn.send(decode_outcome(*request))


class DecodeWorker:
    """One spawned process that decodes on request; `decode` gives up after `timeout_s`, kills
    the process (by its PID) and starts a new one."""

    def __init__(self):
        self._start()

    def _start(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def decode(self, data: bytes, name: str, timeout_s: float) -> tuple:
        self.conn.send((data, name))
        if not self.conn.poll(timeout_s):
            self._kill()
            self._start()
            return ("timeout", timeout_s)
        try:
            return self.conn.recv()
        except EOFError:
            self.proc.join(5)
            code = self.proc.exitcode
            self._start()
            return ("crashed", code)

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)
        self.conn.close()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self._kill()
