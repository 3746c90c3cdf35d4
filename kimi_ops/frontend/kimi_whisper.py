"""Kimi-Audio continuous whisper features: [T, 4 * d_model] at 12.5 Hz per waveform.

Reference: Kimi-Audio `whisper_Lv3/whisper.py::WhisperEncoder.tokenize_waveform` (via
`KimiAPromptManager.extract_whisper_feat`). Per 30 s piece of L samples: zero-pad to 480000,
OpenAI log-mel (128 bins, 3000 frames, max floor over the padded 30 s), full 1500-frame encoder
without masks (padding is attended, as in stock Whisper), keep the first 4 * ceil(L / 1280)
frames; concatenate a file's pieces and group 4 consecutive 50 Hz frames into one vector.
Every piece has the same shape, so pieces of all files run through the encoder together.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from kimi_ops.audio import CHUNK_SAMPLES, split_chunks
from kimi_ops.errors import CheckpointError
from kimi_ops.frontend.encoder import AudioEncoder, EncoderConfig, load_encoder_weights, read_json
from kimi_ops.frontend.mel import HOP_LENGTH, N_FFT, log_mel, mel_filters

FRAMES_PER_FEATURE = 4  # 50 Hz encoder frames stacked into one 12.5 Hz feature
SAMPLES_PER_FEATURE = 1280  # = hop 160 * conv stride 2 * 4, same grid as the GLM VQ ids


class KimiWhisperEncoder:
    """`from_pretrained(dir)` then `features([wav, ...]) -> [Tensor[T, 4 * d_model], ...]`."""

    def __init__(self, encoder: AudioEncoder, max_batch_pieces: int = 8):
        cfg = encoder.cfg
        if cfg.max_source_positions * 2 * HOP_LENGTH != CHUNK_SAMPLES:
            raise CheckpointError(
                f"whisper encoder: max_source_positions={cfg.max_source_positions} does not "
                f"cover a 30 s chunk (needs {CHUNK_SAMPLES // (2 * HOP_LENGTH)})"
            )
        self.encoder = encoder
        self.max_batch_pieces = max_batch_pieces
        self.filters = mel_filters("openai", cfg.num_mel_bins, N_FFT)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_pieces: int = 8,
    ) -> KimiWhisperEncoder:
        model_dir = os.fspath(model_dir)
        config_path = os.path.join(model_dir, "config.json")
        cfg = EncoderConfig.kimi_whisper(read_json(config_path), config_path)
        encoder = load_encoder_weights(cfg, model_dir, dtype, device)
        return cls(encoder, max_batch_pieces=max_batch_pieces)

    @property
    def device(self) -> torch.device:
        return self.encoder.conv1.weight.device

    @property
    def feature_dim(self) -> int:
        return FRAMES_PER_FEATURE * self.encoder.cfg.d_model

    def input_features(self, wav: np.ndarray) -> torch.Tensor:
        """The log-mel the reference feeds the encoder: [pieces, 128, 3000] float32."""
        return self._log_mel(split_chunks(_mono(wav)))

    def features(
        self, wavs: list[np.ndarray], out_dtype: torch.dtype | None = torch.float32
    ) -> list[torch.Tensor]:
        """16 kHz float32 mono waveforms -> CPU tensors [ceil-per-piece tokens, 4 * d_model].

        The encoder runs in its own dtype; `out_dtype=None` keeps it, default is float32.
        """
        pieces = [
            (file_index, chunk)
            for file_index, wav in enumerate(wavs)
            for chunk in split_chunks(_mono(wav))
        ]
        frames: list[torch.Tensor] = []  # per piece: [4 * tokens, d]
        for start in range(0, len(pieces), self.max_batch_pieces):
            batch = [samples for _, samples in pieces[start : start + self.max_batch_pieces]]
            frames.extend(self._encode_batch(batch, out_dtype))

        # outside inference mode, so callers get ordinary tensors
        d = self.encoder.cfg.d_model
        dtype = out_dtype or self.encoder.conv1.weight.dtype
        per_file: list[list[torch.Tensor]] = [[] for _ in wavs]
        for (file_index, _), piece in zip(pieces, frames):
            per_file[file_index].append(piece)
        return [
            torch.cat(parts).reshape(-1, FRAMES_PER_FEATURE * d)
            if parts
            else torch.zeros(0, FRAMES_PER_FEATURE * d, dtype=dtype)
            for parts in per_file
        ]

    @torch.inference_mode()
    def _log_mel(self, chunks: list[np.ndarray]) -> torch.Tensor:
        wave = torch.zeros(len(chunks), CHUNK_SAMPLES)  # pad_or_trim to 30 s with zeros
        for row, samples in enumerate(chunks):
            wave.numpy()[row, : len(samples)] = samples  # also from a read-only buffer
        return log_mel(wave, self.filters, lengths=[len(c) for c in chunks])  # [n, 128, 3000]

    @torch.inference_mode()
    def _encode_batch(
        self, chunks: list[np.ndarray], out_dtype: torch.dtype | None
    ) -> list[torch.Tensor]:
        hidden, _ = self.encoder(self._log_mel(chunks).to(self.device))  # [n, 1500, d]
        hidden = hidden.to("cpu", out_dtype or hidden.dtype)
        return [
            hidden[row, : FRAMES_PER_FEATURE * -(-len(samples) // SAMPLES_PER_FEATURE)]
            for row, samples in enumerate(chunks)
        ]


def _mono(wav: np.ndarray) -> np.ndarray:
    return np.asarray(wav, dtype=np.float32).reshape(-1)
