"""One Whisper-style audio encoder for both front-ends, driven by `EncoderConfig`.

  * Kimi continuous features (`whisper-large-v3/`): conv1 (k3, pad 1) -> GELU -> conv2 (k3,
    stride 2, pad 1) -> GELU -> + embed_positions -> all pre-LN layers with full attention ->
    final LayerNorm.
  * GLM-4-Voice VQ tokens (`glm-4-voice-tokenizer/`, THUDM WhisperVQEncoder): causal convs (left
    pad 2), block-causal attention (a frame sees its whole block and everything before it;
    block = `quantize_causal_block_size` frames at 50 Hz, /pooling after the pool) with padded
    keys masked, avg-pool after layer `pooling_position`, nearest-codebook (L2) ids after layer
    `quantize_position`; layers after that, `embed_positions2` (added to the quantised vectors)
    and the final LayerNorm only matter for a full VQ encoder-decoder and are not run.

`weights.py`-style name mapping lives in `load_encoder_weights`; nothing else knows tensor names.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kimi_ops.errors import CheckpointError
from kimi_ops.model.empty import uninitialised


@dataclass(frozen=True)
class EncoderConfig:
    d_model: int
    num_heads: int
    ffn_dim: int
    num_layers: int  # layers actually run
    num_mel_bins: int = 128
    max_source_positions: int = 1500
    causal_conv: bool = False
    block_size: int | None = None  # block-causal attention block, in 50 Hz frames
    pooling_kernel: int | None = None
    pooling_position: int | None = None  # pool after this many layers
    quantize_position: int | None = None  # quantise after this many layers
    codebook_size: int | None = None
    codebook_positions: int | None = None  # rows of embed_positions2 (loaded, checked, unused)
    final_layer_norm: bool = True
    layer_norm_eps: float = 1e-5

    @classmethod
    def kimi_whisper(cls, cfg: dict, source: str = "config.json") -> EncoderConfig:
        """The Kimi whisper-large-v3 encoder from an HF `WhisperConfig` dict."""
        return cls(
            d_model=_field(cfg, "d_model", source),
            num_heads=_field(cfg, "encoder_attention_heads", source),
            ffn_dim=_field(cfg, "encoder_ffn_dim", source),
            num_layers=_field(cfg, "encoder_layers", source),
            num_mel_bins=_field(cfg, "num_mel_bins", source),
            max_source_positions=_field(cfg, "max_source_positions", source),
        )

    @classmethod
    def glm_vq(cls, cfg: dict, source: str = "config.json") -> EncoderConfig:
        """The GLM-4-Voice WhisperVQEncoder, run up to its quantiser."""
        quantize_position = _field(cfg, "quantize_position", source)
        vocab = _field(cfg, "quantize_vocab_size", source)
        kernel = cfg.get("pooling_kernel_size")
        pooling_position = cfg.get("pooling_position") if kernel else None
        if cfg.get("encoder_causal_attention") or cfg.get("quantize_causal_encoder"):
            raise CheckpointError(f"{source}: fully causal VQ attention is not supported")
        if cfg.get("activation_function", "gelu") != "gelu":
            raise CheckpointError(f"{source}: activation_function must be 'gelu'")
        if pooling_position is not None and pooling_position > quantize_position:
            raise CheckpointError(f"{source}: pooling_position > quantize_position")
        max_pos = _field(cfg, "max_source_positions", source)
        return cls(
            d_model=_field(cfg, "d_model", source),
            num_heads=_field(cfg, "encoder_attention_heads", source),
            ffn_dim=_field(cfg, "encoder_ffn_dim", source),
            num_layers=quantize_position,
            num_mel_bins=_field(cfg, "num_mel_bins", source),
            max_source_positions=max_pos,
            causal_conv=bool(cfg.get("encoder_causal_convolution", False)),
            block_size=cfg.get("quantize_causal_block_size"),
            pooling_kernel=kernel,
            pooling_position=pooling_position,
            quantize_position=quantize_position,
            codebook_size=vocab,
            codebook_positions=math.ceil(max_pos / kernel) if kernel else max_pos,
            final_layer_norm=False,
        )

    @property
    def frames_per_token(self) -> int:
        """Mel frames (100 Hz) per encoder output step: conv stride 2 x pooling."""
        return 2 * (self.pooling_kernel or 1)


def _field(cfg: dict, key: str, source: str):
    if key not in cfg or cfg[key] is None:
        raise CheckpointError(f"{source}: missing config field {key!r}")
    return cfg[key]


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: file not found") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc})") from exc


class EncoderLayer(nn.Module):
    """Pre-LN Whisper encoder layer (k_proj without bias), SDPA attention."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads = cfg.num_heads
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, d)
        self.self_attn.k_proj = nn.Linear(d, d, bias=False)
        self.self_attn.v_proj = nn.Linear(d, d)
        self.self_attn.out_proj = nn.Linear(d, d)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        attn = self.self_attn
        h = self.self_attn_layer_norm(x)

        def heads(y: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, D/H]
            return y.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)

        q, k, v = heads(attn.q_proj(h)), heads(attn.k_proj(h)), heads(attn.v_proj(h))
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + attn.out_proj(h.transpose(1, 2).reshape(b, t, d))
        h = self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        return x + h


class AudioEncoder(nn.Module):
    """Whisper encoder stack; `forward` gives hidden states, `quantize` gives VQ ids."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(
            cfg.num_mel_bins, d, kernel_size=3, padding=0 if cfg.causal_conv else 1
        )
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=0 if cfg.causal_conv else 1)
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        if cfg.final_layer_norm:
            self.layer_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        if cfg.codebook_size is not None:
            self.codebook = nn.Embedding(cfg.codebook_size, d)
            self.embed_positions2 = nn.Embedding(cfg.codebook_positions, d)

    def _conv(self, conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.causal_conv:
            x = F.pad(x, (conv.kernel_size[0] - 1, 0))  # left pad only: output t sees <= t
        return F.gelu(conv(x))

    def _block_mask(self, key_valid: torch.Tensor | None, block: int) -> torch.Tensor | None:
        """[B, 1, T, T] bool: key k visible to query q iff (k <= q or same block) and k valid."""
        if key_valid is None:
            return None
        t = key_valid.shape[1]
        pos = torch.arange(t, device=key_valid.device)
        allowed = (pos[None, :] <= pos[:, None]) | (pos[None, :] // block == pos[:, None] // block)
        return (allowed[None] & key_valid[:, None, :])[:, None]

    def forward(
        self, mel: torch.Tensor, frame_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the stack.

        mel: [B, n_mels, F] (F even); frame_valid: [B, F] bool (100 Hz), or None for no masking.
        Returns (hidden [B, T, d], valid [B, T] or None): the hidden states after the last layer
        run (after pooling / final LayerNorm where configured) and their validity mask. For a
        quantising config the hidden states are the pre-quantisation vectors.
        """
        cfg = self.cfg
        x = self._conv(self.conv2, self._conv(self.conv1, mel.to(self.conv1.weight.dtype)))
        x = x.transpose(1, 2)  # [B, T50, d]
        t = x.shape[1]
        if t > cfg.max_source_positions:
            raise ValueError(f"{t} frames exceed max_source_positions={cfg.max_source_positions}")
        x = x + self.embed_positions.weight[:t]
        valid = frame_valid[:, ::2] if frame_valid is not None else None
        block = cfg.block_size
        mask = self._block_mask(valid, block) if block else _key_mask(valid)
        for index, layer in enumerate(self.layers, start=1):
            x = layer(x, mask)
            if cfg.pooling_kernel and index == cfg.pooling_position:
                x, valid = self._pool(x, valid)
                if block:
                    block //= cfg.pooling_kernel
                mask = self._block_mask(valid, block) if block else _key_mask(valid)
        if cfg.final_layer_norm:
            x = self.layer_norm(x)
        return x, valid

    def _pool(self, x: torch.Tensor, valid: torch.Tensor | None):
        k = self.cfg.pooling_kernel
        h = x.transpose(1, 2)
        if h.shape[-1] % k:
            h = F.pad(h, (0, k - h.shape[-1] % k))  # zeros take part in the average, as upstream
        x = F.avg_pool1d(h, k).transpose(1, 2)
        return x, (valid[:, ::k] if valid is not None else None)

    def quantize(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d] -> [...] int64 nearest codebook ids (L2, computed in float32)."""
        codebook = self.codebook.weight.float()
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        # same expansion as upstream: |c|^2 + |x|^2 - 2 x.c
        dist = torch.addmm(
            (codebook**2).sum(1)[None, :] + (flat**2).sum(1, keepdim=True),
            flat,
            codebook.t(),
            beta=1.0,
            alpha=-2.0,
        )
        return dist.argmin(dim=1).reshape(hidden.shape[:-1])


def _key_mask(valid: torch.Tensor | None) -> torch.Tensor | None:
    return None if valid is None else valid[:, None, None, :]


_PREFIXES = ("", "model.encoder.", "encoder.")


def load_encoder_weights(
    cfg: EncoderConfig, model_dir: str, dtype: torch.dtype, device: str | torch.device
) -> AudioEncoder:
    """An `AudioEncoder` of `cfg` filled from `model_dir/model*.safetensors` (any of the prefixes '', 'model.encoder.',
    'encoder.'); every parameter must be present with the right shape. Extra tensors (decoder,
    EMA buffers, layers past the quantiser) are ignored."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "model*.safetensors")))
    if not files:
        raise CheckpointError(f"{os.path.join(model_dir, 'model.safetensors')}: file not found")
    with uninitialised():
        module = AudioEncoder(cfg)
    wanted = module.state_dict()
    found: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as fh:
                keys = set(fh.keys())
                for name, ref in wanted.items():
                    if name in found:
                        continue
                    key = next((p + name for p in _PREFIXES if p + name in keys), None)
                    if key is None:
                        continue
                    shape = tuple(fh.get_slice(key).get_shape())
                    if shape != tuple(ref.shape):
                        raise CheckpointError(
                            f"{path}: tensor {key} has shape {list(shape)}, expected {list(ref.shape)}"
                        )
                    found[name] = fh.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:  # corrupt or truncated file
            raise CheckpointError(f"{path}: cannot read safetensors ({exc})") from exc
    missing = [name for name in wanted if name not in found]
    if missing:
        where = files[0] if len(files) == 1 else f"{model_dir}/model*.safetensors"
        raise CheckpointError(
            f"{where}: missing tensor(s) {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    module.load_state_dict(found, strict=True, assign=True)
    module.to(device=device, dtype=dtype)
    return module.eval().requires_grad_(False)
