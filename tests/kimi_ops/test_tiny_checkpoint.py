"""The random-checkpoint generator reproduces the official (shared tiny) layout exactly."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import tiktoken
from safetensors import safe_open

from kimi_ops.audio.samples import SAMPLE_CLIPS, write_sample_audio
from kimi_ops.model.tiny_checkpoint import PRESETS, SPECIAL_TOKENS, make_tiny_checkpoint
from tests import goldens

SHARED = goldens.CHECKPOINT
WEIGHT_FILES = (
    "model.safetensors",
    "whisper-large-v3/model.safetensors",
    "glm-4-voice-tokenizer/model.safetensors",
)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}


def _digests(root: Path) -> dict[str, str]:
    return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in sorted(_files(root))}


@pytest.fixture(scope="module")
def shared() -> Path:
    # A missing shared checkpoint is a broken checkout, not a reason to skip.
    assert SHARED.is_dir(), f"shared tiny checkpoint not found at {SHARED}"
    return SHARED


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("small"), seed=0, preset="small")


def test_tiny_file_set_matches_shared(shared, tiny):
    assert _files(tiny) == _files(shared)


@pytest.mark.parametrize("rel", WEIGHT_FILES)
def test_tiny_keys_dtypes_shapes_match_shared(shared, tiny, rel):
    mine, theirs = _header(tiny / rel), _header(shared / rel)
    assert set(mine) == set(theirs)
    assert mine == theirs
    assert not any("inv_freq" in k for k in mine)  # the shared checkpoint has none


def test_tiny_json_files_equal_shared(shared, tiny):
    for rel in sorted(f for f in _files(shared) if f.endswith(".json")):
        assert json.loads((tiny / rel).read_text()) == json.loads((shared / rel).read_text()), rel


def test_special_token_ids(shared, tiny):
    mine = json.loads((tiny / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    theirs = json.loads((shared / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {k: v["content"] for k, v in mine.items()} == {
        k: v["content"] for k, v in theirs.items()}
    ids = {v["content"]: int(k) for k, v in mine.items()}
    assert len(ids) == len(SPECIAL_TOKENS) == 421
    # spec §1.2 offsets from num_base_tokens = 512
    assert ids["[BOS]"] == 512 and ids["[EOS]"] == 513 and ids["<|im_msg_end|>"] == 514
    assert ids["<|im_media_begin|>"] == 530 and ids["<|im_media_end|>"] == 532
    assert ids["<|im_kimia_text_blank|>"] == 535 and ids["<|im_kimia_text_eos|>"] == 536
    assert ids["<|im_kimia_speech_ct_id|>"] == 544 and ids["<|im_kimia_speech_ctd_id|>"] == 545
    assert ids["<|reserved_token_406|>"] == 932
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["kimia_token_offset"] == 512 + 421
    assert cfg["vocab_size"] == cfg["kimia_token_offset"] + 128


def test_tiktoken_model_loads_and_round_trips(tiny):
    lines = (tiny / "tiktoken.model").read_text().splitlines()
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (ln.split() for ln in lines)}
    assert len(ranks) == 512 and sorted(ranks.values()) == list(range(512))
    assert all(ranks[bytes([b])] == b for b in range(256))
    learned = [t for t, r in sorted(ranks.items(), key=lambda kv: kv[1]) if r >= 256]
    assert all(len(t) >= 2 for t in learned)
    specials = {name: 512 + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(
        "kimi_tiny", pat_str=r"""\s*[\r\n]+|\s+(?!\S)|\s+|[^\s]+""",
        mergeable_ranks=ranks, special_tokens=specials)
    for text in ("Please transcribe the spoken content into written text.",
                 "请将音频内容转换为文字。", "mixed 中文 and English 123"):
        ids = enc.encode(text)
        assert enc.decode(ids) == text
        assert len(ids) < len(text.encode("utf-8"))  # the merges actually compress
    assert enc.decode([536]) == "<|im_kimia_text_eos|>"


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny):
    again = make_tiny_checkpoint(tmp_path / "again", seed=0)
    assert _digests(again) == _digests(tiny)
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    a, b = _digests(tiny), _digests(other)
    for rel in WEIGHT_FILES:
        assert a[rel] != b[rel]
    assert {k for k in a if a[k] != b[k]} == set(WEIGHT_FILES)
    with safe_open(str(tiny / "model.safetensors"), "pt") as f0, \
            safe_open(str(other / "model.safetensors"), "pt") as f1:
        w0, w1 = f0.get_tensor("lm_head.weight"), f1.get_tensor("lm_head.weight")
    assert not w0.equal(w1)


def test_weights_are_plausible(tiny):
    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        norm = f.get_tensor("model.norm.weight").float()
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
    assert abs(norm.mean().item() - 1.0) < 0.1
    assert 0.05 < q.std().item() < 0.25
    with safe_open(str(tiny / "glm-4-voice-tokenizer/model.safetensors"), "pt") as f:
        codebook = f.get_tensor("codebook.weight")
        assert f.get_tensor("ema_weight").equal(codebook)
        assert bool((f.get_tensor("ema_count") == 1).all())
    # Random unit-scale inputs land on many different codes (VQ tokens vary).
    x = np.random.default_rng(0).standard_normal((512, codebook.shape[1])).astype(np.float32)
    d = ((x[:, None, :] - codebook.numpy()[None]) ** 2).sum(-1)
    assert len(set(d.argmin(1).tolist())) > 64


def test_rotary_inv_freq_option(tmp_path):
    out = make_tiny_checkpoint(tmp_path / "rot", rotary_inv_freq=True)
    header = _header(out / "model.safetensors")
    inv = [k for k in header if k.endswith("self_attn.rotary_emb.inv_freq")]
    assert len(inv) == 4 + 2 and all(header[k] == ("BF16", (8,)) for k in inv)


def test_small_preset_sharded_index(small):
    shards = sorted(p.name for p in small.glob("model-*.safetensors"))
    assert shards == ["model-1-of-2.safetensors", "model-2-of-2.safetensors"]
    assert not (small / "model.safetensors").exists()
    index = json.loads((small / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    seen: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(str(small / shard), "pt") as f:
            for key in list(f.keys()):  # safe_open is not iterable
                assert key not in seen, f"{key} in {seen[key]} and {shard}"
                seen[key] = shard
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    assert seen == weight_map
    assert index["metadata"]["total_size"] == total
    top = {k for k, v in weight_map.items() if v == "model-2-of-2.safetensors"}
    assert top == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                   "mimo_output.weight", "model.mimo_norm.weight"}


def test_small_preset_dims(small):
    p = PRESETS["small"]
    cfg = json.loads((small / "config.json").read_text())
    assert cfg["hidden_size"] == 512 and cfg["num_hidden_layers"] == 8
    assert cfg["kimia_mimo_layers"] == 2
    assert cfg["num_hidden_layers"] // 2 <= cfg["kimia_mimo_transformer_from_layer_index"] < 8
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (8, 4)
    assert cfg["num_base_tokens"] == 512 and cfg["kimia_token_offset"] == 933
    assert cfg["vocab_size"] == 933 + p.codebook_size
    whisper = json.loads((small / "whisper-large-v3/config.json").read_text())
    glm = json.loads((small / "glm-4-voice-tokenizer/config.json").read_text())
    assert cfg["kimia_adaptor_input_dim"] == 4 * whisper["d_model"]
    assert glm["quantize_vocab_size"] == p.codebook_size
    index = json.loads((small / "model.safetensors.index.json").read_text())
    shapes = {}
    for shard in set(index["weight_map"].values()):
        shapes.update(_header(small / shard))
    assert shapes["model.layers.7.self_attn.k_proj.weight"] == ("BF16", (256, 512))
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == ("BF16", (p.intermediate_size, 512))
    assert shapes["model.mimo_layers.1.self_attn.q_proj.bias"] == ("BF16", (512,))
    assert shapes["model.vq_adaptor.layers.0.weight"] == ("BF16", (512, 4 * whisper["d_model"]))
    assert shapes["lm_head.weight"] == ("BF16", (cfg["vocab_size"], 512))
    w = _header(small / "whisper-large-v3/model.safetensors")
    n_enc = {int(m.group(1)) for k in w if (m := re.match(r"model\.encoder\.layers\.(\d+)\.", k))}
    assert n_enc == set(range(whisper["encoder_layers"]))
    g = _header(small / "glm-4-voice-tokenizer/model.safetensors")
    n_glm = {int(m.group(1)) for k in g if (m := re.match(r"layers\.(\d+)\.", k))}
    assert n_glm == set(range(glm["quantize_position"]))
    assert g["codebook.weight"] == ("F32", (p.codebook_size, glm["d_model"]))


def test_reshard_removes_stale_weights(tmp_path):
    out = make_tiny_checkpoint(tmp_path / "ck", num_shards=3)
    assert len(list(out.glob("model-*-of-3.safetensors"))) == 3
    make_tiny_checkpoint(out, num_shards=1)
    assert not list(out.glob("model-*.safetensors"))
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "model.safetensors").is_file()


def test_sample_audio(tmp_path):
    paths = write_sample_audio(tmp_path / "a")
    assert [p.name for p in paths] == [c.name for c in SAMPLE_CLIPS] and len(paths) == 5
    assert sum(p.stat().st_size for p in paths) < 3_000_000
    for path, clip in zip(paths, SAMPLE_CLIPS):
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        assert sr == clip.sample_rate and data.shape == (clip.num_frames, clip.channels)
        assert np.isfinite(data).all() and 0.05 < np.abs(data).max() <= 1.0
    kinds = {(c.sample_rate, c.channels, Path(c.name).suffix) for c in SAMPLE_CLIPS}
    assert (44100, 2, ".wav") in kinds and any(k[2] == ".flac" for k in kinds)
    assert any(c.duration_s > 30 for c in SAMPLE_CLIPS)
    again = write_sample_audio(tmp_path / "b")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
