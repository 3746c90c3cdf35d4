"""kimi_ops.audio: decoding, downmix, resampling and 30 s chunking, against librosa's goldens."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kimi_ops.audio import CHUNK_SAMPLES, SAMPLE_RATE, load_audio, num_chunks, split_chunks
from kimi_ops.errors import (
    AudioDecodeError,
    AudioError,
    AudioNotFoundError,
    EmptyAudioError,
    NonFiniteAudioError,
)
from tests import goldens
from tests.goldens import INPUTS


def _inputs() -> list[Path]:
    goldens.require()
    return sorted(INPUTS.iterdir())


def test_stereo_44k1_matches_librosa_load():
    goldens.require()
    expected = goldens.load_npz("frontend_debug.npz")["wav16k__a05_stereo_5s_44k1"]
    wav = load_audio(INPUTS / "a05_stereo_5s_44k1.wav")
    assert wav.dtype == np.float32 and wav.ndim == 1 and wav.flags.c_contiguous
    assert wav.shape == expected.shape
    np.testing.assert_allclose(wav, expected, rtol=0, atol=1e-5)


def test_lengths_match_reference_for_every_input():
    golden = goldens.load_json("audio_tokens.json")["inputs"]
    paths = _inputs()
    assert len(paths) == len(golden) == 6
    for path in paths:
        assert load_audio(path).shape == (golden[path.stem]["num_samples_16k"],), path.name


@pytest.mark.parametrize("name", ["a05_stereo_5s_44k1.wav", "a06_speech_2p37s_16k.flac"])
def test_bytes_and_waveform_inputs_equal_path_input(name):
    goldens.require()
    path = INPUTS / name
    expected = load_audio(path)
    raw, rate = sf.read(path, dtype="float32", always_2d=True)  # [frames, channels]
    variants = {
        "str path": load_audio(str(path)),
        "bytes": load_audio(path.read_bytes()),
        "bytearray": load_audio(bytearray(path.read_bytes()), name=name),
        "tuple channels-last": load_audio((raw, rate)),
        "tuple channels-first tensor": load_audio((torch.from_numpy(raw.T.copy()), rate)),
        "bare array + sample_rate": load_audio(raw, sample_rate=rate),
        "tuple mono 1-D": load_audio((raw.mean(axis=1, dtype=np.float32), rate)),
    }
    for label, wav in variants.items():
        np.testing.assert_array_equal(wav, expected, err_msg=label)


def test_integer_pcm_waveform_is_scaled_like_soundfile():
    goldens.require()
    path = INPUTS / "a02_chirp_3s_16k.wav"
    pcm, rate = sf.read(path, dtype="int16")
    np.testing.assert_array_equal(load_audio((pcm, rate)), load_audio(path))


def test_16k_input_is_not_resampled():
    goldens.require()
    path = INPUTS / "a03_speech_12s_16k.wav"
    raw, rate = sf.read(path, dtype="float32")
    assert rate == SAMPLE_RATE
    np.testing.assert_array_equal(load_audio(path), raw)


@pytest.mark.parametrize("rate", [48000, 44100, 22050])
def test_block_by_block_decoding_equals_one_shot_resampling(tmp_path, rate):
    """A file longer than the decoder's read block (1 Mi frames) is read, mixed down and
    resampled block by block; the result is bit for bit soxr's one-shot resample of the whole
    mono signal with librosa's length fix, what the reference gets from librosa.load."""
    import math

    import soxr

    from kimi_ops.audio import decode

    seconds = 2.5 * decode._BLOCK_FRAMES / rate  # two whole blocks and a half one
    t = np.arange(int(seconds * rate)) / rate
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 97 * t)], 1)
    path = tmp_path / "long.flac"
    sf.write(path, stereo.astype(np.float32), rate, subtype="PCM_24")
    mono = sf.read(path, dtype="float32", always_2d=True)[0].mean(axis=1, dtype=np.float32)
    expected = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    target = math.ceil(mono.size * SAMPLE_RATE / rate)
    expected = np.pad(expected, (0, max(target - expected.size, 0)))[:target]
    np.testing.assert_array_equal(load_audio(path), expected)
    np.testing.assert_array_equal(load_audio((mono, rate)), expected)


def _wav_bytes(samples: np.ndarray, rate: int = 16000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "missing_clip.wav"
    with pytest.raises(AudioNotFoundError, match="missing_clip.wav") as info:
        load_audio(path)
    assert info.value.kind == "not_found" and str(path) in str(info.value)
    with pytest.raises(AudioNotFoundError, match="nowhere"):
        load_audio(tmp_path / "nowhere")
    with pytest.raises(AudioNotFoundError):
        load_audio(tmp_path)  # a directory


def test_undecodable_bytes_and_file(tmp_path):
    junk = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(AudioDecodeError, match="junk_upload.wav") as info:
        load_audio(junk, name="junk_upload.wav")
    assert info.value.kind == "undecodable" and info.value.source == "junk_upload.wav"
    with pytest.raises(AudioDecodeError, match="<bytes>"):
        load_audio(junk)
    path = tmp_path / "corrupt.flac"
    path.write_bytes(junk)
    with pytest.raises(AudioDecodeError, match="corrupt.flac"):
        load_audio(path)


@pytest.mark.parametrize("fmt, subtype", [
    ("WAV", "PCM_16"), ("WAV", "FLOAT"), ("WAVEX", "PCM_24"), ("RF64", "PCM_16"),
    ("AIFF", "PCM_16"), ("AU", "PCM_16"), ("AU", "ULAW"), ("W64", "FLOAT"), ("W64", "PCM_24"),
])
def test_truncated_file_is_undecodable_not_shortened(tmp_path, fmt, subtype):
    """libsndfile reads a cut-off WAV, AIFF, AU or W64 as the shorter file it now is; the
    header knows."""
    buf = io.BytesIO()
    sf.write(buf, np.full(160000, 0.1, np.float32), 16000, format=fmt, subtype=subtype)
    path = tmp_path / "cut_off.wav"
    path.write_bytes(buf.getvalue()[:5000])  # `head -c 5000`: the header still says 10 s
    for source in (path, path.read_bytes()):
        with pytest.raises(AudioDecodeError) as info:
            load_audio(source, name="cut_off.wav")
        assert info.value.kind == "undecodable"
        assert re.fullmatch(r"cut_off\.wav: truncated: the header declares 10\.000 s but "
                            r"the file holds only 0\.[0-3]\d\d s", str(info.value))


def test_streamed_wav_without_a_size_decodes():
    """A WAV written to a pipe keeps its placeholder sizes; it is whole, not truncated."""
    data = bytearray(_wav_bytes(np.full(16000, 0.1, np.float32)))
    at = data.index(b"data")
    for size in (0xFFFFFFFF, 0x7FFFF000):
        data[4:8] = data[at + 4: at + 8] = size.to_bytes(4, "little")
        assert load_audio(bytes(data)).shape == (16000,)


def test_an_mp3_next_to_a_macos_appledouble_sidecar_decodes(tmp_path):
    """Archives copied from a Mac hold `._<name>` sidecars; libsndfile, given the path, took
    one for an SD2 resource fork and refused the MP3 beside it."""
    path = tmp_path / "talk.mp3"
    sf.write(path, np.full(16000, 0.1, np.float32), 16000, format="MP3")
    (tmp_path / "._talk.mp3").write_bytes(b"\x00\x05\x16\x07" + bytes(200))  # AppleDouble
    assert abs(load_audio(path).shape[0] - 16000) < 2000
    with pytest.raises(AudioDecodeError, match=r"\._talk\.mp3: cannot decode audio: a macOS "
                                               r"AppleDouble sidecar .*, not audio"):
        load_audio(tmp_path / "._talk.mp3")


def test_an_au_file_of_unknown_size_decodes_whole():
    """An AU written to a pipe says 0xFFFFFFFF for its data size: nothing declared."""
    buf = io.BytesIO()
    sf.write(buf, np.full(16000, 0.1, np.float32), 16000, format="AU", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    data[8:12] = b"\xff" * 4
    assert load_audio(bytes(data)).shape == (16000,)


def test_empty_audio(tmp_path):
    path = tmp_path / "silent_nothing.wav"
    sf.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(EmptyAudioError, match="silent_nothing.wav") as info:
        load_audio(path)
    assert info.value.kind == "empty_audio"
    with pytest.raises(EmptyAudioError, match="empty.bin"):
        load_audio(b"", name="empty.bin")
    zero_bytes = tmp_path / "zero_bytes.wav"  # a path as bytes: empty, not undecodable
    zero_bytes.write_bytes(b"")
    with pytest.raises(EmptyAudioError, match="zero_bytes.wav: zero bytes of audio data"):
        load_audio(zero_bytes)
    with pytest.raises(EmptyAudioError, match="<waveform>"):
        load_audio((np.zeros(0, dtype=np.float32), 16000))


def test_non_finite_samples(tmp_path):
    samples = np.zeros(1600, dtype=np.float32)
    samples[100] = np.nan
    path = tmp_path / "has_nan.wav"
    path.write_bytes(_wav_bytes(samples, subtype="FLOAT"))
    with pytest.raises(NonFiniteAudioError, match="has_nan.wav") as info:
        load_audio(path)
    assert info.value.kind == "non_finite"
    stereo = np.zeros((44100, 2), dtype=np.float32)
    stereo[5, 1] = np.inf
    with pytest.raises(NonFiniteAudioError, match="clip-7"):
        load_audio((stereo, 44100), name="clip-7")


def test_bad_waveform_arguments():
    with pytest.raises(AudioDecodeError, match="sample_rate"):
        load_audio(np.zeros(16000, dtype=np.float32))  # bare array without a rate
    with pytest.raises(AudioDecodeError, match="sample rate"):
        load_audio((np.zeros(16000, dtype=np.float32), 0))
    with pytest.raises(AudioDecodeError, match="1-D or 2-D"):
        load_audio((np.zeros((2, 2, 100), dtype=np.float32), 16000))
    with pytest.raises(AudioDecodeError, match="disagrees"):
        load_audio((np.zeros(100, dtype=np.float32), 8000), sample_rate=16000)
    with pytest.raises(AudioDecodeError, match="44100"):
        goldens.require()
        load_audio(INPUTS / "a05_stereo_5s_44k1.wav", sample_rate=16000)
    assert issubclass(AudioDecodeError, AudioError)


def test_split_chunks():
    wav = np.arange(CHUNK_SAMPLES + 16000, dtype=np.float32)
    chunks = split_chunks(wav)
    assert [len(c) for c in chunks] == [CHUNK_SAMPLES, 16000]
    np.testing.assert_array_equal(np.concatenate(chunks), wav)
    assert [len(c) for c in split_chunks(wav[:CHUNK_SAMPLES])] == [CHUNK_SAMPLES]
    assert [len(c) for c in split_chunks(np.zeros(2 * CHUNK_SAMPLES + 1))] == [
        CHUNK_SAMPLES,
        CHUNK_SAMPLES,
        1,
    ]
    assert split_chunks(np.zeros(0)) == []
    assert [num_chunks(n) for n in (0, 1, CHUNK_SAMPLES, CHUNK_SAMPLES + 1)] == [0, 1, 1, 2]


@pytest.mark.parametrize("fmt, subtype, suffix", [
    ("WAV", "PCM_16", ".wav"), ("FLAC", "PCM_16", ".flac"), ("OGG", "VORBIS", ".ogg"),
    ("OGG", "OPUS", ".opus"), ("MP3", "MPEG_LAYER_III", ".mp3"), ("AIFF", "PCM_24", ".aiff"),
    ("RF64", "FLOAT", ".rf64"), ("WAVEX", "PCM_24", ".wav"),
])
def test_common_formats_decode_to_16k_mono(tmp_path, fmt, subtype, suffix):
    sr = 48000
    t = np.arange(sr) / sr  # 1 s, stereo, 440 Hz
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t)], axis=1)
    path = tmp_path / f"tone{suffix}"
    sf.write(path, (0.5 * stereo).astype(np.float32), sr, format=fmt, subtype=subtype)
    wav = load_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - SAMPLE_RATE) <= 0.06 * SAMPLE_RATE  # lossy codecs add priming frames
    spectrum = np.abs(np.fft.rfft(wav[2000:14000]))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / 12000
    assert abs(peak_hz - 440) < 5
    assert 0.25 < np.max(np.abs(wav)) < 0.5  # mean of the two channels (0.5 and 0.25 amplitude)
