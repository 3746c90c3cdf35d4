"""Audio front-end: GLM-4-Voice VQ ids and Kimi whisper features for 16 kHz waveforms.

`AudioFrontend.from_checkpoint(model_dir).encode(wavs)` gives, per waveform, the raw VQ ids
(12.5 Hz; the prompt adds `kimia_token_offset`) and the [T, 4 * d_model] whisper features the
LM's vq_adaptor consumes, with the same T. Both parts batch all pieces of all waveforms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from kimi_ops.errors import CheckpointError
from kimi_ops.frontend.glm_vq import GlmVqTokenizer
from kimi_ops.frontend.kimi_whisper import KimiWhisperEncoder

__all__ = ["AudioEncoding", "AudioFrontend", "GlmVqTokenizer", "KimiWhisperEncoder"]


@dataclass
class AudioEncoding:
    """One waveform's front-end output. `tokens`: int64 [T] raw VQ codebook ids;
    `features`: [T, 4 * whisper d_model] (float32 on CPU unless asked otherwise)."""

    tokens: np.ndarray
    features: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


class AudioFrontend:
    def __init__(self, vq: GlmVqTokenizer, whisper: KimiWhisperEncoder):
        if vq.samples_per_token != 1280:
            raise CheckpointError(
                f"{vq.name}: VQ tokens every {vq.samples_per_token} samples; the whisper "
                "features are fixed at 1280 (12.5 Hz), the two cannot be paired"
            )
        self.vq = vq
        self.whisper = whisper

    @classmethod
    def from_checkpoint(
        cls,
        model_dir: str | os.PathLike,
        glm_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        vq_dtype: torch.dtype | None = None,
    ) -> AudioFrontend:
        """Whisper from `<model_dir>/whisper-large-v3`, VQ from `glm_dir` (default
        `<model_dir>/glm-4-voice-tokenizer`). `dtype` is the whisper encoder's; the VQ encoder
        runs in `vq_dtype`, default float32 as in the reference."""
        model_dir = os.fspath(model_dir)
        glm_dir = (
            os.fspath(glm_dir)
            if glm_dir is not None
            else os.path.join(model_dir, "glm-4-voice-tokenizer")
        )
        for path in (model_dir, glm_dir):
            if not os.path.isdir(path):
                raise CheckpointError(f"{path}: checkpoint directory not found")
        vq = GlmVqTokenizer.from_pretrained(glm_dir, device, vq_dtype or torch.float32)
        whisper = KimiWhisperEncoder.from_pretrained(
            os.path.join(model_dir, "whisper-large-v3"), device, dtype
        )
        return cls(vq, whisper)

    @property
    def feature_dim(self) -> int:
        return self.whisper.feature_dim

    def encode(self, wavs: list[np.ndarray],
               features_dtype: torch.dtype | None = torch.float32) -> list[AudioEncoding]:
        """16 kHz float32 mono waveforms (see `kimi_ops.audio.load_audio`) -> one
        `AudioEncoding` per waveform, in order. Features are float32 by default; `None` keeps
        the Whisper encoder's own dtype (bf16 on CUDA: half the bytes, the same numbers)."""
        tokens = self.vq.tokenize(wavs)
        features = self.whisper.features(wavs, out_dtype=features_dtype)
        out = []
        for index, (ids, feats) in enumerate(zip(tokens, features)):
            if ids.shape[0] != feats.shape[0]:
                raise CheckpointError(
                    f"waveform {index}: {ids.shape[0]} VQ tokens but {feats.shape[0]} whisper "
                    "feature rows; the tokenizer and whisper checkpoints disagree on frame rate"
                )
            out.append(AudioEncoding(tokens=ids, features=feats))
        return out
