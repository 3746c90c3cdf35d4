"""GLM-4-Voice VQ semantic tokens (raw codebook ids, 12.5 Hz) for 16 kHz waveforms.

Reference: GLM-4-Voice `speech_tokenizer/utils.py::extract_speech_token`, called by Kimi-Audio's
`Glm4Tokenizer.tokenize` once per file. Per file: cut into 30 s pieces; featurise the file's
pieces together with HF `WhisperFeatureExtractor(padding="longest", pad_to_multiple_of=1280)`,
i.e. every piece zero-padded to the file's longest piece rounded up to 1280 samples; encode;
keep the ids where the sample mask subsampled to 12.5 Hz is 1 (exactly ceil(L / 1280) per piece).

Here the log-mel is computed per group of equal padded length (so each file sees exactly its own
padding), and the encoder then runs over the pieces of ALL files at once, in bounded
mini-batches, each piece further padded with zero frames. With causal convs and block-causal
attention over masked keys, a valid frame never sees those extra frames, so a file's ids do not
depend on what else is in the call.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import torch

from kimi_ops.audio import CHUNK_SAMPLES, SAMPLE_RATE, split_chunks
from kimi_ops.errors import CheckpointError
from kimi_ops.frontend.encoder import AudioEncoder, EncoderConfig, load_encoder_weights, read_json
from kimi_ops.frontend.mel import log_mel, mel_filters


class GlmVqTokenizer:
    """`from_pretrained(dir)` then `tokenize([wav, ...]) -> [int64 ids, ...]`."""

    def __init__(
        self,
        encoder: AudioEncoder,
        n_fft: int = 400,
        hop_length: int = 160,
        max_batch_pieces: int = 16,
        name: str = "glm-4-voice-tokenizer",
    ):
        self.encoder = encoder
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.max_batch_pieces = max_batch_pieces
        self.name = name
        # samples per token: conv strides (1 * 2) * pooling * hop -> 1280 for GLM-4-Voice
        self.samples_per_token = encoder.cfg.frames_per_token * hop_length
        self.filters = mel_filters("hf", encoder.cfg.num_mel_bins, n_fft, SAMPLE_RATE)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_pieces: int = 16,
    ) -> GlmVqTokenizer:
        model_dir = os.fspath(model_dir)
        config_path = os.path.join(model_dir, "config.json")
        cfg = EncoderConfig.glm_vq(read_json(config_path), config_path)
        pre_path = os.path.join(model_dir, "preprocessor_config.json")
        pre = read_json(pre_path) if os.path.exists(pre_path) else {}
        if pre.get("sampling_rate", SAMPLE_RATE) != SAMPLE_RATE:
            raise CheckpointError(f"{pre_path}: sampling_rate must be {SAMPLE_RATE}")
        if pre.get("feature_size", cfg.num_mel_bins) != cfg.num_mel_bins:
            raise CheckpointError(f"{pre_path}: feature_size != num_mel_bins of config.json")
        encoder = load_encoder_weights(cfg, model_dir, dtype, device)
        return cls(
            encoder,
            n_fft=pre.get("n_fft", 400),
            hop_length=pre.get("hop_length", 160),
            max_batch_pieces=max_batch_pieces,
            name=model_dir,
        )

    @property
    def device(self) -> torch.device:
        return self.encoder.conv1.weight.device

    def token_count(self, num_samples: int) -> int:
        """Ids produced for a 16 kHz waveform of `num_samples` samples."""
        full, last = divmod(num_samples, CHUNK_SAMPLES)
        per_full = -(-CHUNK_SAMPLES // self.samples_per_token)
        return full * per_full + -(-last // self.samples_per_token)

    def input_features(self, wav: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What HF `WhisperFeatureExtractor` gives the reference for one file:
        (log-mel [pieces, mels, frames] float32, attention mask [pieces, frames] int32)."""
        pieces = self._pieces([wav])
        mel, valid = self._features([(samples, padded) for _, samples, padded in pieces])
        return mel.numpy(), valid.numpy().astype(np.int32)

    def tokenize(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        """16 kHz float32 mono waveforms -> raw codebook ids (int64, one array per waveform)."""
        pieces = self._pieces(wavs)
        # mini-batches of pieces within 4:3 of each other's length; causal convs make extra
        # padding harmless, otherwise only equal padded lengths may share a batch
        order = sorted(range(len(pieces)), key=lambda i: -pieces[i][2])
        batches: list[list[int]] = []
        for i in order:
            last = batches[-1] if batches else None
            if (
                last is not None
                and len(last) < self.max_batch_pieces
                and 4 * pieces[i][2] >= 3 * pieces[last[0]][2]  # bound the padding work
                and (self.encoder.cfg.causal_conv or pieces[last[0]][2] == pieces[i][2])
            ):
                last.append(i)
            else:
                batches.append([i])

        piece_ids: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(pieces)
        for batch in batches:
            chosen = [(pieces[i][1], pieces[i][2]) for i in batch]
            for i, ids in zip(batch, self._encode_batch(chosen)):
                piece_ids[i] = ids

        out: list[list[np.ndarray]] = [[] for _ in wavs]
        for (file_index, _, _), ids in zip(pieces, piece_ids):
            out[file_index].append(ids)
        return [np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64) for parts in out]

    def _pieces(self, wavs: list[np.ndarray]) -> list[tuple[int, np.ndarray, int]]:
        """(file index, samples, padded length) per 30 s piece; a file's pieces are padded to
        its own longest piece rounded up to a whole token (HF padding="longest")."""
        stride = self.samples_per_token
        pieces = []
        for file_index, wav in enumerate(wavs):
            chunks = split_chunks(np.asarray(wav, dtype=np.float32).reshape(-1))
            if chunks:
                padded = -(-max(len(c) for c in chunks) // stride) * stride
                pieces.extend((file_index, c, padded) for c in chunks)
        return pieces

    @torch.inference_mode()
    def _features(self, batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel [n, mels, max frames] (zero beyond each piece's padded length) and the
        100 Hz validity mask [n, max frames] (HF: the sample mask taken every hop)."""
        hop = self.hop_length
        frames = max(padded for _, padded in batch) // hop
        mel = torch.zeros(len(batch), self.encoder.cfg.num_mel_bins, frames)
        valid = torch.zeros(len(batch), frames, dtype=torch.bool)
        # one STFT per padded length: the reflect padding at the end and the per-piece max
        # floor must see exactly the waveform the reference featurised
        by_length: dict[int, list[int]] = defaultdict(list)
        for row, (_, padded) in enumerate(batch):
            by_length[padded].append(row)
        for padded, rows in by_length.items():
            wave = torch.zeros(len(rows), padded)
            for j, row in enumerate(rows):
                samples = batch[row][0]
                wave.numpy()[j, : len(samples)] = samples  # also from a read-only buffer
            feats = log_mel(wave, self.filters, self.n_fft, hop)  # [n, mels, padded / hop]
            mel[rows, :, : feats.shape[-1]] = feats
        for row, (samples, _) in enumerate(batch):
            valid[row, : -(-len(samples) // hop)] = True
        return mel, valid

    @torch.inference_mode()
    def _encode_batch(self, batch: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        mel, valid = self._features(batch)
        hidden, token_valid = self.encoder(mel.to(self.device), valid.to(self.device))
        ids = self.encoder.quantize(hidden).cpu()
        token_valid = token_valid.cpu()
        result = []
        for row, (samples, _) in enumerate(batch):
            kept = ids[row][token_valid[row]].numpy().astype(np.int64)
            expected = -(-len(samples) // self.samples_per_token)
            if kept.shape[0] != expected:  # a config with an unexpected stride
                raise CheckpointError(
                    f"{self.name}: {kept.shape[0]} VQ ids for {len(samples)} samples, "
                    f"expected {expected}"
                )
            result.append(kept)
        return result
