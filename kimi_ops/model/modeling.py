"""Kimi-Audio's language model: a Qwen2 backbone with a MIMO (audio-head) branch and a VQ adaptor.

One file, components in dependency order, driven by `KimiAudioConfig`. Module names follow the
official checkpoint so `weights.py` can load tensors by name; the module knows nothing of files.

Inputs are the two parallel token streams of a prompt (see `kimi_ops.engine.prompt`):
`audio_ids` and `text_ids`, both [B, S]. Rows are left-padded; `key_valid` marks real keys.
Positions are per row (the first real token of a row is position 0), so a padded row computes
the same values as the row alone. Attention is PyTorch SDPA with an explicit boolean mask;
no flash-attn is needed.

Which logits are which (a naming trap in the reference): `text_logits` come from the full
backbone (`model.norm` -> `lm_head`); `audio_logits` from the MIMO branch that forks after
backbone layer `kimia_mimo_transformer_from_layer_index` (`model.mimo_norm` -> `mimo_output`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kimi_ops.model.config import KimiAudioConfig
from kimi_ops.model.empty import uninitialised


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, S, head_dim] for arbitrary per-token positions (angles in fp32)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
    inv_freq = 1.0 / (theta ** (exponent / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # [B, S, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys/values for every attention layer (backbone first, then MIMO).

    Tensors are [B, kv_heads, capacity, head_dim]; all rows share one write cursor `length`
    (rows are left-padded, so their real tokens end at the same column).

    A *static* cache (`write_at` set: a 1-element int64 tensor on the device) keeps every shape
    fixed for CUDA graphs: one-token steps write at column `write_at` and attend over the
    whole capacity, unwritten columns being masked by the caller's key mask.
    """

    def __init__(self, num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads, capacity, head_dim)
        # zeros, not empty: masked pad columns still enter probs @ V, and 0 * NaN garbage is NaN
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.write_at: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more positions (grows geometrically, copying once)."""
        need = self.length + extra
        if need <= self.capacity:
            return
        grown = max(need, 2 * self.capacity)

        def grow(t: torch.Tensor) -> torch.Tensor:
            bigger = t.new_empty(t.shape[0], t.shape[1], grown, t.shape[3])
            bigger[:, :, : self.length] = t[:, :, : self.length]
            return bigger

        self.keys = [grow(k) for k in self.keys]
        self.values = [grow(v) for v in self.values]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.write_at is not None:
            self.keys[layer].index_copy_(2, self.write_at, k)
            self.values[layer].index_copy_(2, self.write_at, v)
            return self.keys[layer], self.values[layer]
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def put_rows(self, rows: torch.Tensor, part: KVCache, end: int) -> None:
        """Copy `part` (a cache of len(rows) rows) into `rows`, its last position at `end` - 1."""
        start = end - part.length
        for mine, theirs in ((self.keys, part.keys), (self.values, part.values)):
            for layer, tensor in enumerate(theirs):
                mine[layer][rows, :, start:end] = tensor[:, :, : part.length]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (drop finished sequences)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean key mask as the additive bias `decode_attention` takes: 0 where True, -inf
    where False (computed once per step, shared by every layer)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     spans: Sequence[tuple[int, int, int]] | None = None) -> torch.Tensor:
    """One query per row against the cache: two batched matmuls with the query heads grouped by
    their KV head. On CPU this is several times faster than SDPA's kernel for q_len = 1.

    `spans` [(first row, end row, first key column)] split the batch into row blocks that skip
    the left padding before their first real key (see `key_spans`): decode attention is bound
    by reading the cache, and in a batch of mixed lengths much of it is padding.

    q [B, H, 1, d]; k, v [B, KV, K, d]; bias [B, 1, 1, K] (`mask_bias`) -> [B, H, 1, d].
    """
    if spans is not None and len(spans) > 1:
        return torch.cat([decode_attention(q[a:b], k[a:b, :, c:], v[a:b, :, c:], bias[a:b, ..., c:])
                          for a, b, c in spans])
    if spans:
        c = spans[0][2]
        k, v, bias = k[:, :, c:], v[:, :, c:], bias[..., c:]
    b, h, _, d = q.shape
    kv = k.shape[1]
    q = q.view(b, kv, h // kv, d)
    # bias + scale * scores in one op: the same numbers as scaling, then masking
    scores = torch.add(bias, torch.matmul(q, k.transpose(-1, -2)), alpha=d**-0.5)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # [B, KV, group, K]
    return torch.matmul(probs, v).view(b, h, 1, d)


def key_spans(first_key: Sequence[int], num_keys: int, min_rows: int = 4, shrink: float = 0.8
              ) -> list[tuple[int, int, int]]:
    """Row blocks for `decode_attention` from each row's first real key column (best with rows
    ordered by it): a block ends where the next row has fewer than `shrink` times the keys of
    the block's first row and the block has `min_rows` rows; a block reads from the smallest
    first column of its rows, so any row order stays correct.
    """
    bounds, start = [], 0
    for i in range(1, len(first_key)):
        if i - start >= min_rows and (num_keys - first_key[i]
                                      < shrink * (num_keys - first_key[start])):
            bounds.append((start, i))
            start = i
    bounds.append((start, len(first_key)))
    return [(a, b, min(first_key[a:b])) for a, b in bounds if b > a]


SMALL_GEMM_ROWS = (16, 48)


def small_gemm_rows(x: torch.Tensor) -> int:
    """x's row count when `Linear` computes x's product transposed, else 0."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    low, high = SMALL_GEMM_ROWS
    on_cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32
    return rows if on_cpu_fp32 and low <= rows <= high else 0


class Linear(nn.Linear):
    """nn.Linear whose CPU fp32 forward over 16-48 rows (a batched decode step) computes
    (W @ x^T)^T instead of x @ W^T.

    For these row counts MKL's sgemm in the x @ W^T layout appears to repack the whole weight on
    every call: on a 2-core Xeon it took 0.73 ms for the `small` preset's gate/up weight at
    32 rows, the transposed form 0.45 ms, and the two gave bitwise equal outputs at 16-64 rows.
    Below 16 rows and above 48 the usual layout was as fast or faster, so other shapes keep it
    (a single sequence and prefill are unchanged).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = small_gemm_rows(x)
        if not rows:
            return F.linear(x, self.weight, self.bias)
        flat_t = x.reshape(rows, x.shape[-1]).T
        out = (torch.mm(self.weight, flat_t) if self.bias is None
               else torch.addmm(self.bias[:, None], self.weight, flat_t))
        return out.T.contiguous().view(*x.shape[:-1], self.out_features)


def fused_linear(parts: Sequence[nn.Linear]) -> Linear:
    """One linear layer whose outputs are `parts`' outputs side by side: one larger GEMM instead
    of several. Each output element is the same dot product; on CPU the results were bitwise
    equal to the separate layers' in our checks, and the golden tests hold the tokens to it."""
    weight = torch.cat([p.weight for p in parts])
    bias = torch.cat([p.bias for p in parts]) if parts[0].bias is not None else None
    with uninitialised():
        fused = Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias, requires_grad=False)
    return fused


class Attention(nn.Module):
    def __init__(self, config: KimiAudioConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = Linear(hidden, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = Linear(hidden, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=False)
        self.qkv_proj: Linear | None = None  # set by `fuse_projections`

    def fuse_projections(self) -> None:
        self.qkv_proj = fused_linear((self.q_proj, self.k_proj, self.v_proj))
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer_index: int, spans=None):
        b, s, _ = x.shape
        if self.qkv_proj is not None:
            kv_width = self.kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split(
                (self.num_heads * self.head_dim, kv_width, kv_width), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer_index, k, v)
        if s == 1:
            out = decode_attention(q, k, v, mask, spans)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=self.num_heads != self.kv_heads
            )  # [B, H, S, head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, config: KimiAudioConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: Linear | None = None  # set by `fuse_projections`

    def fuse_projections(self) -> None:
        self.gate_up_proj = fused_linear((self.gate_proj, self.up_proj))
        del self.gate_proj, self.up_proj

    def forward(self, x):
        rows = small_gemm_rows(x)
        if rows and self.gate_up_proj is not None:
            # `Linear`'s transposed product, kept transposed from gate/up through down: no
            # copies back to row-major in between
            gate, up = torch.mm(self.gate_up_proj.weight, x.reshape(rows, -1).T).chunk(2)
            out = torch.mm(self.down_proj.weight, F.silu(gate) * up)
            return out.T.view(*x.shape[:-1], -1)
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: KimiAudioConfig, cache_index: int):
        super().__init__()
        self.cache_index = cache_index
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, mask, cache, spans=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, self.cache_index,
                               spans)
        return h + self.mlp(self.post_attention_layernorm(h))


class VQAdaptor(nn.Module):
    """Whisper features (4 x d_model at 12.5 Hz) -> hidden size. Indices 0/3/4 carry weights."""

    def __init__(self, config: KimiAudioConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(config.kimia_adaptor_input_dim, config.hidden_size, bias=True),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Linear(config.hidden_size, config.hidden_size, bias=True),
            nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps, bias=True),
        )

    def forward(self, x):
        return self.layers(x)


class KimiAudioBackbone(nn.Module):
    """The `model.` prefix of the checkpoint."""

    def __init__(self, config: KimiAudioConfig):
        super().__init__()
        n = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(n))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mimo_layers = nn.ModuleList(
            DecoderLayer(config, n + j) for j in range(config.kimia_mimo_layers)
        )
        self.mimo_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vq_adaptor = VQAdaptor(config)


@dataclass
class ForwardOutput:
    text_logits: torch.Tensor  # [B, S or 1, vocab], fp32
    audio_logits: torch.Tensor | None  # same, None when the MIMO branch was skipped


class KimiAudioForCausalLM(nn.Module):
    def __init__(self, config: KimiAudioConfig):
        super().__init__()
        self.config = config
        self.model = KimiAudioBackbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mimo_output = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def num_cache_layers(self) -> int:
        return self.config.num_hidden_layers + self.config.kimia_mimo_layers

    def fuse_projections(self) -> None:
        """After loading: q/k/v and gate/up of every layer become one matmul each (fewer, larger
        GEMMs; module names then no longer match the checkpoint's)."""
        for layer in (*self.model.layers, *self.model.mimo_layers):
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def new_cache(self, batch: int, capacity: int, with_mimo: bool) -> KVCache:
        layers = self.num_cache_layers if with_mimo else self.config.num_hidden_layers
        p = self.lm_head.weight
        return KVCache(layers, batch, capacity, self.config.num_key_value_heads,
                       self.config.head_dim, p.dtype, p.device)

    def embed(self, audio_ids, text_ids, continuous_mask=None, continuous_features=None,
              row_valid=None, text_embedding: str = "per_call"):
        """Input embedding of the two streams.

        continuous_features: [N, adaptor_in] rows for the True entries of continuous_mask, in
        row-major order. row_valid: [B, S] real (non-pad) tokens, used for the reference quirk
        that skips the text embedding of a row whose text ids in this call are all 0.
        text_embedding="per_position" applies that rule to each position on its own, i.e. what
        feeding the positions one decode step at a time would do (used to score continuations).
        """
        emb = self.model.embed_tokens
        x = emb(audio_ids)
        if continuous_features is not None and continuous_features.shape[0]:
            adapted = self.model.vq_adaptor(continuous_features.to(x.dtype))
            sqrt2 = torch.sqrt(torch.tensor(2.0, dtype=x.dtype, device=x.device))
            x = x.clone()
            x[continuous_mask] = (x[continuous_mask] + adapted) * sqrt2
        if text_embedding == "per_position":
            adds_text = (text_ids != 0)[..., None]
        else:
            real_text = text_ids if row_valid is None else text_ids * row_valid
            adds_text = (real_text.sum(dim=1) != 0)[:, None, None]
        return x + emb(text_ids) * adds_text.to(x.dtype)

    def forward(
        self,
        audio_ids: torch.Tensor,
        text_ids: torch.Tensor,
        position_ids: torch.Tensor,
        key_valid: torch.Tensor,
        cache: KVCache | None = None,
        continuous_mask: torch.Tensor | None = None,
        continuous_features: torch.Tensor | None = None,
        with_mimo: bool = True,
        last_only: bool = True,
        text_embedding: str = "per_call",
        spans: Sequence[tuple[int, int, int]] | None = None,
    ) -> ForwardOutput:
        """One step over S new tokens per row (S = prompt length at prefill, 1 when decoding).

        key_valid: [B, K] bool over every key position so far (cache + the new S tokens).
        spans: row blocks that skip left padding when decoding (S = 1), see `key_spans`.
        """
        cfg = self.config
        _, s = audio_ids.shape
        static = cache is not None and cache.write_at is not None
        if static and s != 1:
            raise ValueError("a static cache takes one token per row per step")
        x = self.embed(audio_ids, text_ids, continuous_mask, continuous_features,
                       row_valid=None if static else key_valid[:, -s:],
                       text_embedding=text_embedding)
        cos, sin = rotary_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        if s == 1:  # decoding: `decode_attention` takes an additive bias
            if not static:  # (a static key_valid covers the capacity, this column included)
                key_valid = key_valid.clone()
                key_valid[:, -1] = True  # a left-pad row sees itself, as below
            mask = mask_bias(key_valid[:, None, None, :], x.dtype)
        else:
            k = key_valid.shape[1]
            causal = torch.ones(s, k, dtype=torch.bool, device=x.device).tril(k - s)
            mask = (causal[None] & key_valid[:, None, :])[:, None]  # [B, 1, S, K]
            # A left-pad query row sees no key at all; let it see itself so softmax stays finite.
            rows = torch.arange(s, device=x.device)[:, None] + (k - s)
            mask = mask | (torch.arange(k, device=x.device)[None] == rows)

        fork = cfg.kimia_mimo_transformer_from_layer_index
        h, mimo_h = x, None
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, mask, cache, spans)
            if i == fork and with_mimo:
                mimo_h = h
        if last_only:
            h = h[:, -1:]
        text_logits = self.lm_head(self.model.norm(h)).float()
        audio_logits = None
        if with_mimo:
            for layer in self.model.mimo_layers:
                mimo_h = layer(mimo_h, cos, sin, mask, cache, spans)
            if last_only:
                mimo_h = mimo_h[:, -1:]
            audio_logits = self.mimo_output(self.model.mimo_norm(mimo_h)).float()
        if cache is not None and not static:
            cache.length += s
        return ForwardOutput(text_logits, audio_logits)

