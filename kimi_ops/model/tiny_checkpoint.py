"""Write a random Kimi-Audio checkpoint in the official on-disk layout, at toy sizes.

The folder looks exactly like `moonshotai/Kimi-Audio-7B-Instruct` as far as text-output
inference is concerned (spec §2.1), so every loader, tokenizer and front-end path can be
exercised without downloading 20 GB:

    config.json  generation_config.json  special_tokens_map.json  tokenizer_config.json
    tiktoken.model                       (base64 token, space, rank; one per line)
    model.safetensors                    (bf16; or model-i-of-N.safetensors + index.json)
    whisper-large-v3/{config.json, preprocessor_config.json, model.safetensors}      (bf16)
    glm-4-voice-tokenizer/{config.json, preprocessor_config.json, model.safetensors} (fp32)

Preset `tiny` reproduces the dimensions, file set, tensor names, dtypes, shapes and every
JSON file of the shared parity checkpoint (`shared/kimi_tiny/checkpoint`) byte for byte;
only the weights and the BPE merges in `tiktoken.model` are our own. Preset `small` is a
~33 M-parameter language model with the same structure, written in two shards by default.

Contracts worth knowing:

* Special tokens: ids `num_ranks + offset` for the 421-entry ordered list of spec §1.2
  (`SPECIAL_TOKENS`), so `kimia_token_offset = num_ranks + 421` and
  `vocab_size = kimia_token_offset + codebook_size`.
* No `rotary_emb.inv_freq` tensors by default (the shared checkpoint has none); pass
  `rotary_inv_freq=True` to add them like the real 7B shards are believed to (spec §2.3).
* Whisper weights carry the `model.encoder.*` / `model.decoder.*` prefix; the GLM VQ
  encoder keeps only the `quantize_position` layers before quantisation, no final
  layer norm, plus `codebook.weight` and the `ema_count` / `ema_weight` buffers.
* Sharded main weights are named `model-{i}-of-{N}.safetensors` (not zero-padded); the
  last shard holds the five top-level tensors (embedding, both heads, both final norms)
  as in the official repo. `model.safetensors.index.json` has `metadata.total_size`
  (tensor bytes) and `weight_map`.
* Deterministic: the same (preset, seed, num_shards) gives byte-identical files. Each
  tensor draws from its own numpy generator keyed by (seed, tensor name).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from kimi_ops.model.text_tokenizer import NUM_SPECIAL_TOKENS, special_token_names

__all__ = [
    "PRESETS",
    "SPECIAL_TOKENS",
    "TinyPreset",
    "build_bpe_ranks",
    "make_tiny_checkpoint",
]

# ---------------------------------------------------------------------------------------
# Special tokens (spec §1.2): 34 named offsets, the rest reserved, pad = last.

SPECIAL_TOKENS: tuple[str, ...] = tuple(special_token_names())  # index = id - num_ranks
_OFFSET = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
_ADDITIONAL_SPECIALS = [
    "<|im_msg_end|>",
    "<|im_user_msg_start|>",
    "<|im_assistant_msg_start|>",
    "<|im_media_begin|>",
    "<|im_media_end|>",
    "<|im_kimia_text_blank|>",
    "<|im_kimia_text_eos|>",
    "<|im_kimia_user_msg_start|>",
    "<|im_kimia_assistant_msg_start|>",
    "<|im_kimia_speech_ct_id|>",
    "<|im_kimia_speech_ctd_id|>",
]
_PAD_TOKEN = SPECIAL_TOKENS[-1]  # <|reserved_token_406|>
_UNK_TOKEN = SPECIAL_TOKENS[-2]  # <|reserved_token_405|>


# ---------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class TinyPreset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mimo_layers: int
    mimo_from_layer_index: int
    codebook_size: int
    whisper_d_model: int
    whisper_encoder_layers: int
    whisper_heads: int
    whisper_ffn_dim: int
    glm_d_model: int
    glm_encoder_layers: int
    glm_heads: int
    glm_ffn_dim: int
    glm_pooling_position: int
    glm_quantize_position: int
    default_num_shards: int
    num_ranks: int = 512
    max_position_embeddings: int = 8192
    whisper_vocab_size: int = 512  # the (unused) Whisper decoder's vocabulary
    whisper_decoder_layers: int = 1
    num_audio_special_tokens: int = 512

    @property
    def kimia_token_offset(self) -> int:
        return self.num_ranks + NUM_SPECIAL_TOKENS

    @property
    def vocab_size(self) -> int:
        return self.kimia_token_offset + self.codebook_size

    def special_id(self, name: str) -> int:
        return self.num_ranks + _OFFSET[name]


PRESETS: dict[str, TinyPreset] = {
    # Mirrors shared/kimi_tiny/checkpoint exactly.
    "tiny": TinyPreset(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2,
        mimo_layers=2, mimo_from_layer_index=2, codebook_size=128,
        whisper_d_model=32, whisper_encoder_layers=2, whisper_heads=4, whisper_ffn_dim=64,
        glm_d_model=32, glm_encoder_layers=4, glm_heads=4, glm_ffn_dim=64,
        glm_pooling_position=2, glm_quantize_position=2,
        default_num_shards=1,
    ),
    # ~33 M LM parameters; fork at layer index 5 of 0..7 (the 7B forks at 21 of 0..27).
    "small": TinyPreset(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4,
        mimo_layers=2, mimo_from_layer_index=5, codebook_size=1024,
        whisper_d_model=128, whisper_encoder_layers=3, whisper_heads=4, whisper_ffn_dim=512,
        glm_d_model=64, glm_encoder_layers=6, glm_heads=4, glm_ffn_dim=256,
        glm_pooling_position=3, glm_quantize_position=3,
        default_num_shards=2,
    ),
}


# ---------------------------------------------------------------------------------------
# JSON files


def _dump_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _main_config(p: TinyPreset) -> dict:
    bos, eos, pad = p.special_id("[BOS]"), p.special_id("[EOS]"), p.special_id(_PAD_TOKEN)
    return {
        "architectures": ["MoonshotKimiaForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_moonshot_kimia.KimiAudioConfig",
            "AutoModel": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM",
            "AutoModelForCausalLM": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM",
        },
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "hidden_act": "silu",
        "hidden_size": p.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": p.intermediate_size,
        "kimia_adaptor_input_dim": 4 * p.whisper_d_model,
        "kimia_audio_output_vocab": p.codebook_size + p.num_audio_special_tokens,
        "kimia_media_begin": p.special_id("<|im_media_begin|>"),
        "kimia_media_end": p.special_id("<|im_media_end|>"),
        "kimia_mimo_audiodelaytokens": 6,
        "kimia_mimo_layers": p.mimo_layers,
        "kimia_mimo_transformer_from_layer_index": p.mimo_from_layer_index,
        "kimia_text_output_vocab": p.kimia_token_offset,
        "kimia_token_offset": p.kimia_token_offset,
        "max_position_embeddings": p.max_position_embeddings,
        "max_window_layers": p.num_hidden_layers,
        "model_type": "kimi_audio",
        "num_attention_heads": p.num_attention_heads,
        "num_audio_special_tokens": p.num_audio_special_tokens,
        "num_base_tokens": p.num_ranks,
        "num_hidden_layers": p.num_hidden_layers,
        "num_key_value_heads": p.num_key_value_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.44.1",
        "use_cache": True,
        "use_sliding_window": False,
        "use_whisper_feature": True,
        "vocab_size": p.vocab_size,
    }


def _generation_config(p: TinyPreset) -> dict:
    return {
        "bos_token_id": p.special_id("[BOS]"),
        "eos_token_id": p.special_id("[EOS]"),
        "pad_token_id": p.special_id(_PAD_TOKEN),
        "transformers_version": "4.44.1",
    }


def _special_tokens_map() -> dict:
    return {
        "additional_special_tokens": list(_ADDITIONAL_SPECIALS),
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": _PAD_TOKEN,
        "unk_token": _UNK_TOKEN,
    }


def _tokenizer_config(p: TinyPreset) -> dict:
    decoder = {
        str(p.num_ranks + i): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, name in enumerate(SPECIAL_TOKENS)
    }
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(_ADDITIONAL_SPECIALS),
        "auto_map": {"AutoTokenizer": ["tokenization_kimia.TikTokenTokenizer", None]},
        "bos_token": "[BOS]",
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "model_max_length": int(1e30),  # HF's "no limit" sentinel, as written by HF
        "pad_token": _PAD_TOKEN,
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": _UNK_TOKEN,
    }


_PREPROCESSOR_CONFIG = {
    "chunk_length": 30,
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "hop_length": 160,
    "n_fft": 400,
    "n_samples": 480000,
    "nb_max_frames": 3000,
    "padding_side": "right",
    "padding_value": 0.0,
    "processor_class": "WhisperProcessor",
    "return_attention_mask": False,
    "sampling_rate": 16000,
}


def _whisper_common(d_model: int, heads: int, ffn: int, layers: int, p: TinyPreset) -> dict:
    """Fields shared by both Whisper-style configs, in the order the shared files use."""
    return {
        "activation_dropout": 0.0,
        "activation_function": "gelu",
        "apply_spec_augment": False,
        "attention_dropout": 0.0,
        "begin_suppress_tokens": [220, p.whisper_vocab_size - 3],
        "bos_token_id": p.whisper_vocab_size - 3,
        "classifier_proj_size": 256,
        "d_model": d_model,
        "decoder_attention_heads": heads,
        "decoder_ffn_dim": ffn,
        "decoder_layerdrop": 0.0,
        "decoder_layers": p.whisper_decoder_layers,
        "decoder_start_token_id": p.whisper_vocab_size - 2,
        "dropout": 0.0,
        "encoder_attention_heads": heads,
        "encoder_ffn_dim": ffn,
        "encoder_layerdrop": 0.0,
        "encoder_layers": layers,
        "eos_token_id": p.whisper_vocab_size - 3,
        "init_std": 0.02,
        "is_encoder_decoder": True,
    }


def _whisper_config(p: TinyPreset) -> dict:
    c = _whisper_common(p.whisper_d_model, p.whisper_heads, p.whisper_ffn_dim,
                        p.whisper_encoder_layers, p)
    out = {"_name_or_path": "openai/whisper-large-v3"}
    for k, v in c.items():
        out[k] = v
        if k == "apply_spec_augment":
            out["architectures"] = ["WhisperForConditionalGeneration"]
    out.update({
        "mask_feature_length": 10,
        "mask_feature_min_masks": 0,
        "mask_feature_prob": 0.0,
        "mask_time_length": 10,
        "mask_time_min_masks": 2,
        "mask_time_prob": 0.05,
        "max_length": 448,
        "max_source_positions": 1500,
        "max_target_positions": 448,
        "median_filter_width": 7,
        "model_type": "whisper",
        "num_hidden_layers": p.whisper_encoder_layers,
        "num_mel_bins": 128,
        "pad_token_id": p.whisper_vocab_size - 1,
        "scale_embedding": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.44.1",
        "use_cache": True,
        "use_weighted_layer_sum": False,
        "vocab_size": p.whisper_vocab_size,
    })
    return out


def _glm_config(p: TinyPreset) -> dict:
    c = _whisper_common(p.glm_d_model, p.glm_heads, p.glm_ffn_dim, p.glm_encoder_layers, p)
    out = {"_name_or_path": "THUDM/glm-4-voice-tokenizer"}
    for k, v in c.items():
        out[k] = v
        if k == "apply_spec_augment":
            out["architectures"] = ["WhisperVQEncoder"]
        elif k == "encoder_attention_heads":
            out["encoder_causal_attention"] = False
            out["encoder_causal_convolution"] = True
    out.update({
        "max_length": 448,
        "max_source_positions": 1500,
        "max_target_positions": 448,
        "median_filter_width": 7,
        "model_type": "whisper",
        "num_hidden_layers": p.glm_encoder_layers,
        "num_mel_bins": 128,
        "pad_token_id": p.whisper_vocab_size - 1,
        "pooling_kernel_size": 4,
        "pooling_position": p.glm_pooling_position,
        "pooling_type": "avg",
        "quantize_causal_block_size": 200,
        "quantize_causal_encoder": False,
        "quantize_commit_coefficient": 0.25,
        "quantize_ema_decay": 0.99,
        "quantize_encoder_only": True,
        "quantize_loss_scale": 10.0,
        "quantize_position": p.glm_quantize_position,
        "quantize_restart_interval": 100,
        "quantize_vocab_size": p.codebook_size,
        "scale_embedding": False,
        "skip_language_detection": True,
        "torch_dtype": "float32",
        "transformers_version": "4.44.1",
        "use_cache": True,
        "use_weighted_layer_sum": False,
        "vocab_size": p.whisper_vocab_size,
    })
    return out


# ---------------------------------------------------------------------------------------
# tiktoken.model: 256 single bytes, then BPE merges learned on a small built-in corpus.

_BPE_CORPUS = """\
Please transcribe the spoken content into written text.
Please transcribe this audio. Transcribe the speech in this clip.
What is the speaker talking about? What can you hear in this audio?
Describe the sound in one sentence. Describe the audio and the acoustic scene.
Identify the human vocal sound in the audio.
Identify the predominant emotion in this speech.
Identify the acoustic scene in the audio.
Options: (A) Laughter (B) Sigh (C) Cough (D) Throat clearing (E) Sneeze (F) Sniff
Options: (A) neutral (B) joy (C) sadness (D) anger (E) surprise (F) fear (G) disgust
Options: (A) beach (B) bus (C) cafe or restaurant (D) car (E) city center (F) forest path
(G) grocery store (H) home (I) library (J) metro station (K) office (L) park (M) train
.Answer with the option's letter from the given choices directly and only give the best option.
The quick brown fox jumps over the lazy dog. Hello, this is Kimi, an audio language model.
The speaker says the weather is fine today, and the music in the background is quiet.
There is a dog barking, a car passing by, and people talking in a busy street.
A woman is speaking English with a calm voice; a man answers with a question.
I think it's a recording of a lecture about speech recognition and audio understanding.
They're listening to a tone, a chirp, a beep and some noise, then silence.
We'll test the tokenizer on numbers: 0 1 2 3 4 5 6 7 8 9 10 12 25 100 2024 3.14 16000 Hz.
one two three four five six seven eight nine ten, first second third.
Audio tokens are produced at 12.5 Hz; the text stream and the audio stream run in parallel.
请将音频内容转换为文字。请将这段语音转写成文字。请把这段语音转录成文本。
这是一个测试。这段音频里有人在说话，背景里有音乐和噪声。
今天天气很好，我们一起去公园散步吧。你好，我是Kimi，一个音频语言模型。
请描述这段音频的内容。说话人的情绪是什么？这是什么声音？
语音识别、音频理解、声音事件分类和情感识别都是常见的任务。
一二三四五六七八九十，百千万。中文和英文混合的句子也要能处理。
Bonjour, ceci est un test. Hola, esto es una prueba. Guten Tag, das ist ein Test.
こんにちは、これはテストです。안녕하세요, 이것은 테스트입니다. Привет, это тест.
"""

# GPT-2-style pre-tokenisation with stdlib `re` (\w is Unicode-aware, so Han counts as a
# letter run). Only used to learn merges; tokenisers apply Kimi's own regex at encode time.
_PRETOKENIZE = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+(?!\S)|\s+")


def build_bpe_ranks(num_ranks: int = 512, corpus: str = _BPE_CORPUS) -> list[bytes]:
    """Token bytes in rank order: all 256 single bytes, then greedy BPE merges.

    Each merge joins the most frequent adjacent pair (ties: smallest merged bytes, then
    smallest left part), so the list is deterministic and every learned token is the
    concatenation of two lower-ranked tokens, as tiktoken expects.
    """
    if num_ranks < 256:
        raise ValueError(f"num_ranks must be >= 256 (all single bytes), got {num_ranks}")
    words = Counter(m.group(0).encode("utf-8") for m in _PRETOKENIZE.finditer(corpus))
    seqs = {w: [bytes([b]) for b in w] for w in words}
    ranks = [bytes([b]) for b in range(256)]
    known = set(ranks)
    while len(ranks) < num_ranks:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for w, count in words.items():
            seq = seqs[w]
            for a, b in itertools.pairwise(seq):
                pairs[(a, b)] += count
        if not pairs:
            raise ValueError(f"BPE corpus too small for {num_ranks} ranks ({len(ranks)} reached)")
        a, b = min(pairs, key=lambda ab: (-pairs[ab], ab[0] + ab[1], ab[0]))
        merged = a + b
        for w, seq in seqs.items():
            if len(seq) < 2:
                continue
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
        if merged not in known:
            known.add(merged)
            ranks.append(merged)
    return ranks


def _write_tiktoken(path: Path, ranks: list[bytes]) -> None:
    lines = [f"{base64.b64encode(tok).decode('ascii')} {i}\n" for i, tok in enumerate(ranks)]
    path.write_text("".join(lines), encoding="ascii")


# ---------------------------------------------------------------------------------------
# Weights. Scales follow the shared checkpoint: linear/conv weights N(0, 1/fan_in),
# biases N(0, 0.05) (q/k/v biases 0.1), norm gains 1 + N(0, 0.1), token embeddings and
# heads N(0, 0.5), sinusoidal encoder positions, GLM codebook N(0, 1) (codes spread out so
# VQ tokens vary), ema_count = 1, ema_weight = codebook.


class _Init:
    def __init__(self, seed: int):
        self.seed = seed

    def rng(self, name: str) -> np.random.Generator:
        key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
        return np.random.default_rng([self.seed, key])

    def normal(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0):
        return (mean + std * self.rng(name).standard_normal(shape)).astype(np.float32)

    def linear(self, sd: dict, name: str, out_f: int, in_f: int, bias: bool, bias_std=0.05):
        sd[f"{name}.weight"] = self.normal(f"{name}.weight", (out_f, in_f), in_f ** -0.5)
        if bias:
            sd[f"{name}.bias"] = self.normal(f"{name}.bias", (out_f,), bias_std)

    def conv(self, sd: dict, name: str, out_c: int, in_c: int, k: int):
        sd[f"{name}.weight"] = self.normal(f"{name}.weight", (out_c, in_c, k), (in_c * k) ** -0.5)
        sd[f"{name}.bias"] = self.normal(f"{name}.bias", (out_c,), 0.05)

    def gain(self, sd: dict, name: str, dim: int):
        sd[name] = self.normal(name, (dim,), 0.1, mean=1.0)

    def layer_norm(self, sd: dict, name: str, dim: int):
        self.gain(sd, f"{name}.weight", dim)
        sd[f"{name}.bias"] = self.normal(f"{name}.bias", (dim,), 0.05)


def _sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed encoder position table ([sin | cos], HF `sinusoids`)."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float64))
    t = np.arange(length, dtype=np.float64)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def _main_weights(p: TinyPreset, init: _Init, rotary_inv_freq: bool) -> dict[str, np.ndarray]:
    h, ffn, v = p.hidden_size, p.intermediate_size, p.vocab_size
    head_dim = h // p.num_attention_heads
    kv = p.num_key_value_heads * head_dim
    sd: dict[str, np.ndarray] = {}

    def decoder_layer(prefix: str) -> None:
        init.gain(sd, f"{prefix}.input_layernorm.weight", h)
        init.gain(sd, f"{prefix}.post_attention_layernorm.weight", h)
        init.linear(sd, f"{prefix}.self_attn.q_proj", h, h, bias=True, bias_std=0.1)
        init.linear(sd, f"{prefix}.self_attn.k_proj", kv, h, bias=True, bias_std=0.1)
        init.linear(sd, f"{prefix}.self_attn.v_proj", kv, h, bias=True, bias_std=0.1)
        init.linear(sd, f"{prefix}.self_attn.o_proj", h, h, bias=False)
        init.linear(sd, f"{prefix}.mlp.gate_proj", ffn, h, bias=False)
        init.linear(sd, f"{prefix}.mlp.up_proj", ffn, h, bias=False)
        init.linear(sd, f"{prefix}.mlp.down_proj", h, ffn, bias=False)
        if rotary_inv_freq:
            sd[f"{prefix}.self_attn.rotary_emb.inv_freq"] = (
                1.0 / 1e6 ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
            ).astype(np.float32)

    for i in range(p.num_hidden_layers):
        decoder_layer(f"model.layers.{i}")
    for j in range(p.mimo_layers):
        decoder_layer(f"model.mimo_layers.{j}")
    adaptor_in = 4 * p.whisper_d_model
    init.linear(sd, "model.vq_adaptor.layers.0", h, adaptor_in, bias=True)
    init.linear(sd, "model.vq_adaptor.layers.3", h, h, bias=True)
    init.layer_norm(sd, "model.vq_adaptor.layers.4", h)
    sd["model.embed_tokens.weight"] = init.normal("model.embed_tokens.weight", (v, h), 0.5)
    sd["lm_head.weight"] = init.normal("lm_head.weight", (v, h), 0.5)
    sd["mimo_output.weight"] = init.normal("mimo_output.weight", (v, h), 0.5)
    # No boosted text-EOS row (the shared checkpoint scales its row ~3.7x): on random
    # weights that flips greedy decoding to "EOS at step 0 for every input" for some seeds,
    # so a demo would print nothing. Unboosted, generation runs to max_new_tokens.
    init.gain(sd, "model.norm.weight", h)
    init.gain(sd, "model.mimo_norm.weight", h)
    return sd


def _whisper_encoder_layer(sd: dict, init: _Init, prefix: str, d: int, ffn: int) -> None:
    init.linear(sd, f"{prefix}.self_attn.q_proj", d, d, bias=True)
    init.linear(sd, f"{prefix}.self_attn.k_proj", d, d, bias=False)
    init.linear(sd, f"{prefix}.self_attn.v_proj", d, d, bias=True)
    init.linear(sd, f"{prefix}.self_attn.out_proj", d, d, bias=True)
    init.layer_norm(sd, f"{prefix}.self_attn_layer_norm", d)
    init.linear(sd, f"{prefix}.fc1", ffn, d, bias=True)
    init.linear(sd, f"{prefix}.fc2", d, ffn, bias=True)
    init.layer_norm(sd, f"{prefix}.final_layer_norm", d)


def _whisper_weights(p: TinyPreset, init: _Init) -> dict[str, np.ndarray]:
    d, ffn = p.whisper_d_model, p.whisper_ffn_dim
    sd: dict[str, np.ndarray] = {}
    init.conv(sd, "model.encoder.conv1", d, 128, 3)
    init.conv(sd, "model.encoder.conv2", d, d, 3)
    sd["model.encoder.embed_positions.weight"] = _sinusoids(1500, d)
    for i in range(p.whisper_encoder_layers):
        _whisper_encoder_layer(sd, init, f"model.encoder.layers.{i}", d, ffn)
    init.layer_norm(sd, "model.encoder.layer_norm", d)
    # The decoder is never run by Kimi-Audio but ships in the folder (full HF Whisper).
    sd["model.decoder.embed_tokens.weight"] = init.normal(
        "model.decoder.embed_tokens.weight", (p.whisper_vocab_size, d), 0.5)
    sd["model.decoder.embed_positions.weight"] = init.normal(
        "model.decoder.embed_positions.weight", (448, d), 0.02)
    for i in range(p.whisper_decoder_layers):
        prefix = f"model.decoder.layers.{i}"
        for attn in ("self_attn", "encoder_attn"):
            init.linear(sd, f"{prefix}.{attn}.q_proj", d, d, bias=True)
            init.linear(sd, f"{prefix}.{attn}.k_proj", d, d, bias=False)
            init.linear(sd, f"{prefix}.{attn}.v_proj", d, d, bias=True)
            init.linear(sd, f"{prefix}.{attn}.out_proj", d, d, bias=True)
            init.layer_norm(sd, f"{prefix}.{attn}_layer_norm", d)
        init.linear(sd, f"{prefix}.fc1", ffn, d, bias=True)
        init.linear(sd, f"{prefix}.fc2", d, ffn, bias=True)
        init.layer_norm(sd, f"{prefix}.final_layer_norm", d)
    init.layer_norm(sd, "model.decoder.layer_norm", d)
    return sd


def _glm_weights(p: TinyPreset, init: _Init) -> dict[str, np.ndarray]:
    d, ffn = p.glm_d_model, p.glm_ffn_dim
    sd: dict[str, np.ndarray] = {}
    init.conv(sd, "conv1", d, 128, 3)
    init.conv(sd, "conv2", d, d, 3)
    sd["embed_positions.weight"] = _sinusoids(1500, d)
    sd["embed_positions2.weight"] = _sinusoids(1500 // 4, d)  # after avg-pool 4
    # quantize_encoder_only: only the layers before quantize_position exist, no layer_norm.
    for i in range(p.glm_quantize_position):
        _whisper_encoder_layer(sd, init, f"layers.{i}", d, ffn)
    codebook = init.normal("codebook.weight", (p.codebook_size, d), 1.0)
    sd["codebook.weight"] = codebook
    sd["ema_count"] = np.ones((p.codebook_size,), dtype=np.float32)
    sd["ema_weight"] = codebook.copy()
    return sd


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors writes 0600; give the weights the same (umask-derived) mode as the JSON
    # files next to them, so a checkpoint made by one user is readable like any other file.
    os.chmod(path, (path.parent / "config.json").stat().st_mode & 0o777)


def _to_torch(sd: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in sd.items()}


_TOP_LEVEL = (
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
    "mimo_output.weight",
    "model.mimo_norm.weight",
)


def _layer_group(key: str) -> str | None:
    m = re.match(r"model\.(layers|mimo_layers)\.(\d+)\.", key)
    return f"{m.group(1)}.{int(m.group(2)):06d}" if m else None


def _write_main_weights(out: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    if num_shards == 1:
        _save_safetensors(tensors, out / "model.safetensors")
        return
    # Decoder layers (backbone, then MIMO) split evenly over shards 1..N-1, the adaptor in
    # shard 1, the five top-level tensors alone in shard N (the official layout's pattern).
    groups = sorted({g for k in tensors if (g := _layer_group(k)) is not None},
                    key=lambda g: (g.startswith("mimo"), g))
    n_body = num_shards - 1
    if len(groups) < n_body:
        raise ValueError(
            f"num_shards={num_shards} is more than {len(groups) + 1} (decoder layers + 1)")
    shard_of_group = {g: 1 + (i * n_body) // len(groups) for i, g in enumerate(groups)}
    names = [f"model-{i}-of-{num_shards}.safetensors" for i in range(1, num_shards + 1)]
    weight_map: dict[str, str] = {}
    for key in tensors:
        if key in _TOP_LEVEL:
            shard = num_shards
        else:
            g = _layer_group(key)
            shard = shard_of_group[g] if g is not None else 1
        weight_map[key] = names[shard - 1]
    for name in names:
        part = {k: t for k, t in tensors.items() if weight_map[k] == name}
        _save_safetensors(part, out / name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _dump_json(out / "model.safetensors.index.json", index)


def _remove_stale_main_weights(out: Path) -> None:
    """A rerun with another num_shards must not leave old shards for a loader to find."""
    stale = [out / "model.safetensors", out / "model.safetensors.index.json"]
    stale += [f for f in out.glob("model-*-of-*.safetensors")]
    for f in stale:
        if f.is_file():
            f.unlink()


def _is_tiny_checkpoint(out: Path) -> bool:
    """Whether `out` holds a checkpoint this module wrote (its config has a preset's sizes)."""
    try:
        config = json.loads((out / "config.json").read_text())
        sizes = (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return any(sizes == (p.hidden_size, p.num_hidden_layers, p.vocab_size)
               for p in PRESETS.values())


def make_tiny_checkpoint(
    out_dir: str | Path,
    seed: int = 0,
    preset: str = "tiny",
    num_shards: int | None = None,
    *,
    rotary_inv_freq: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a random Kimi-Audio checkpoint (official layout) into `out_dir`; return it.

    `preset`: "tiny" (the shared parity checkpoint's dimensions) or "small".
    `num_shards`: main-model shard count (default: 1 for tiny, 2 for small); 1 writes
    `model.safetensors`, N > 1 writes `model-{i}-of-{N}.safetensors` plus the index.
    `rotary_inv_freq`: also write the (ignored) `self_attn.rotary_emb.inv_freq` tensors.
    A folder that holds anything but an earlier tiny checkpoint (a real model's, say, whose
    weights this would replace) is refused unless `overwrite`.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    num_shards = p.default_num_shards if num_shards is None else int(num_shards)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if (not overwrite and out.is_dir() and any(out.iterdir())
            and not _is_tiny_checkpoint(out)):
        raise FileExistsError(f"{out}: the folder holds other files (not a tiny checkpoint); "
                              "refusing to write random weights over them (overwrite=True, "
                              "or --overwrite, to do it anyway)")
    out.mkdir(parents=True, exist_ok=True)
    init = _Init(int(seed))

    _dump_json(out / "config.json", _main_config(p))
    _dump_json(out / "generation_config.json", _generation_config(p))
    _dump_json(out / "special_tokens_map.json", _special_tokens_map())
    _dump_json(out / "tokenizer_config.json", _tokenizer_config(p))
    _write_tiktoken(out / "tiktoken.model", build_bpe_ranks(p.num_ranks))
    _remove_stale_main_weights(out)
    main = _to_torch(_main_weights(p, init, rotary_inv_freq), torch.bfloat16)
    _write_main_weights(out, main, num_shards)

    whisper_dir = out / "whisper-large-v3"
    whisper_dir.mkdir(exist_ok=True)
    _dump_json(whisper_dir / "config.json", _whisper_config(p))
    _dump_json(whisper_dir / "preprocessor_config.json", _PREPROCESSOR_CONFIG)
    _save_safetensors(_to_torch(_whisper_weights(p, init), torch.bfloat16),
                      whisper_dir / "model.safetensors")

    glm_dir = out / "glm-4-voice-tokenizer"
    glm_dir.mkdir(exist_ok=True)
    _dump_json(glm_dir / "config.json", _glm_config(p))
    _dump_json(glm_dir / "preprocessor_config.json", _PREPROCESSOR_CONFIG)
    _save_safetensors(_to_torch(_glm_weights(p, init), torch.float32),
                      glm_dir / "model.safetensors")
    return out
