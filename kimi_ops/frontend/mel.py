"""Whisper-style log-mel spectrograms, batched over equal-length waveforms.

Both reference paths compute the same thing (OpenAI `log_mel_spectrogram` for Kimi's whisper
features, HF `WhisperFeatureExtractor._torch_extract_fbank_features` for the GLM VQ tokens):
centred reflect-padded STFT with a periodic Hann window, power spectrum with the last frame
dropped, Slaney mel filters, `log10(max(mel, 1e-10))`, floor at (max - 8) where the max is taken
over each row's whole (padded) spectrogram, then `(x + 4) / 4`.

They differ only in where the filter bank comes from, so both are available:
  * "openai": the `mel_filters.npz` shipped with Kimi-Audio, i.e. `librosa.filters.mel` (float32
    weights, Slaney normalisation applied in float32); recomputed here with numpy;
  * "hf": what `transformers.audio_utils.mel_filter_bank(norm="slaney", mel_scale="slaney")`
    gives the HF feature extractor (float64, cast to float32 at use); recomputed here with numpy,
    so that a front-end does not import transformers (tests/kimi_ops/test_frontend.py holds the
    two equal).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128


@functools.lru_cache(maxsize=8)
def mel_filters(
    kind: str, n_mels: int = N_MELS, n_fft: int = N_FFT, sampling_rate: int = 16000
) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] float32 Slaney mel filter bank ("openai" or "hf" flavour)."""
    if kind == "openai":
        weights = _librosa_style_mel(sampling_rate, n_fft, n_mels)
    elif kind == "hf":
        weights = _hf_style_mel(sampling_rate, n_fft, n_mels)
    else:
        raise ValueError(f"unknown mel filter kind {kind!r}")
    return torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))


def log_mel(
    waveforms: torch.Tensor,
    filters: torch.Tensor,
    n_fft: int = N_FFT,
    hop_length: int = HOP_LENGTH,
    lengths: Sequence[int] | None = None,
) -> torch.Tensor:
    """[B, N] float32 waveforms -> [B, n_mels, N // hop_length] log-mel, per-row max floor.

    `lengths`: each row's real samples, zeros after them (Whisper's 30 s padding). The STFT then
    stops `2 * n_fft` samples after the longest row: every later frame reads only zeros (its
    reflect padding at the cut mirrors zeros too), so its power is exactly 0, which is what the
    frames left out get. The result is the same, bit for bit; a 1 s clip in a 30 s window costs
    a tenth of the STFT and filter product.
    """
    frames = waveforms.shape[-1] // hop_length
    used = waveforms.shape[-1]
    if lengths is not None:
        used = min(used, max(lengths, default=0) + 2 * n_fft)
    window = torch.hann_window(n_fft, device=waveforms.device)
    stft = torch.stft(waveforms[..., :used], n_fft, hop_length, window=window,
                      return_complex=True)
    power = (stft[..., :frames].abs() ** 2).contiguous()  # [B, n_fft/2+1, <= frames]
    mel = filters.to(waveforms.device) @ power
    if mel.shape[-1] < frames:  # the all-zero frames' power: 0
        mel = F.pad(mel, (0, frames - mel.shape[-1]))
    log_spec = torch.clamp(mel, min=1e-10).log10()
    row_max = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, row_max - 8.0)
    return (log_spec + 4.0) / 4.0


def _librosa_style_mel(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters as librosa 0.10 builds them."""
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_edges = np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2.0), n_mels + 2)
    hz_edges = _mel_to_hz(mel_edges)
    widths = np.diff(hz_edges)
    ramps = hz_edges[:, None] - fft_freqs[None, :]
    weights = np.zeros((n_mels, fft_freqs.shape[0]), dtype=np.float32)
    for i in range(n_mels):
        rising = -ramps[i] / widths[i]
        falling = ramps[i + 2] / widths[i + 1]
        weights[i] = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (hz_edges[2 : n_mels + 2] - hz_edges[:n_mels]))[:, None]
    return weights


def _hf_style_mel(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """The same filters as transformers builds them: float64 throughout, frequency bins from
    `linspace`, band edges up to sr // 2."""
    fft_freqs = np.linspace(0, sr // 2, 1 + n_fft // 2)
    mel_edges = np.linspace(_hz_to_mel(0.0), _hz_to_mel(float(sr // 2)), n_mels + 2)
    hz_edges = _mel_to_hz(mel_edges)
    widths = np.diff(hz_edges)
    ramps = hz_edges[None, :] - fft_freqs[:, None]
    rising = -ramps[:, :-2] / widths[:-1]
    falling = ramps[:, 2:] / widths[1:]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= 2.0 / (hz_edges[2 : n_mels + 2] - hz_edges[:n_mels])
    return weights.T


_F_SP = 200.0 / 3  # Slaney: linear below 1 kHz (3 mels per 200 Hz), log above
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel(hz: float) -> float:
    if hz >= _MIN_LOG_HZ:
        return _MIN_LOG_MEL + float(np.log(hz / _MIN_LOG_HZ)) / _LOGSTEP
    return hz / _F_SP


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    hz = _F_SP * mels
    log_part = mels >= _MIN_LOG_MEL
    hz[log_part] = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mels[log_part] - _MIN_LOG_MEL))
    return hz
