"""The language model against the reference's forward-pass goldens, and the checkpoint loader."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kimi_ops.errors import CheckpointError
from kimi_ops.model.config import KimiAudioConfig
from kimi_ops.model.modeling import KimiAudioForCausalLM
from kimi_ops.model.weights import load_state_dict
from tests import goldens

FORWARD_CASES = ["asr_a02_chirp_3s_16k", "audio_then_question", "multiturn", "asr_a04_mix_31s_16k"]


def full_forward(model, prompt):
    t = len(prompt)
    with torch.inference_mode():
        return model(torch.tensor([prompt.audio_ids]), torch.tensor([prompt.text_ids]),
                     torch.arange(t)[None], torch.ones(1, t, dtype=torch.bool),
                     continuous_mask=torch.tensor([prompt.continuous_mask]),
                     continuous_features=prompt.features, with_mimo=True, last_only=False)


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_forward_logits_match_reference(tiny_model, case):
    out = full_forward(tiny_model, goldens.golden_prompt(case))
    pure = goldens.load_npz("pure_fp32/forward_logits.npz")
    main = goldens.load_npz("forward_logits.npz")
    pos = pure[f"{case}__positions"]
    text, audio = out.text_logits[0, pos].numpy(), out.audio_logits[0, pos].numpy()
    # text logits = backbone/lm_head; audio logits = MIMO branch/mimo_output (kimia.py naming)
    np.testing.assert_allclose(text, pure[f"{case}__text_logits"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(audio, pure[f"{case}__audio_logits"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(text, main[f"{case}__text_logits"],
                               atol=goldens.LOGIT_TOLERANCE, rtol=0)
    np.testing.assert_allclose(audio, main[f"{case}__audio_logits"],
                               atol=goldens.LOGIT_TOLERANCE, rtol=0)


def test_forward_all_positions(tiny_model):
    case = "asr_a02_chirp_3s_16k"
    out = full_forward(tiny_model, goldens.golden_prompt(case))
    pure = goldens.load_npz("pure_fp32/forward_logits.npz")
    np.testing.assert_allclose(out.text_logits[0].numpy(),
                               pure[f"{case}__text_logits_all_positions"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(out.audio_logits[0].numpy(),
                               pure[f"{case}__audio_logits_all_positions"], atol=1e-3, rtol=0)


def test_text_only_path_skips_mimo_with_identical_text_logits(tiny_model):
    prompt = goldens.golden_prompt("multiturn")
    full = full_forward(tiny_model, prompt)
    t = len(prompt)
    with torch.inference_mode():
        text_only = tiny_model(torch.tensor([prompt.audio_ids]), torch.tensor([prompt.text_ids]),
                               torch.arange(t)[None], torch.ones(1, t, dtype=torch.bool),
                               continuous_mask=torch.tensor([prompt.continuous_mask]),
                               continuous_features=prompt.features, with_mimo=False)
    assert text_only.audio_logits is None
    torch.testing.assert_close(text_only.text_logits[0, -1], full.text_logits[0, -1])


def test_text_embedding_skipped_for_all_zero_text_row(tiny_model):
    """Reference quirk: a row whose text ids sum to 0 gets no text embedding, per row."""
    audio = torch.tensor([[5, 6], [5, 6]])
    text = torch.tensor([[0, 0], [0, 7]])
    x = tiny_model.embed(audio, text)
    e = tiny_model.model.embed_tokens
    torch.testing.assert_close(x[0], e(audio[0]))
    torch.testing.assert_close(x[1], e(audio[1]) + e(text[1]))


def test_config_rejects_missing_fields(tmp_path):
    raw = json.loads((goldens.CHECKPOINT / "config.json").read_text())
    del raw["kimia_token_offset"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="kimia_token_offset"):
        KimiAudioConfig.from_file(tmp_path / "config.json")


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", "64", "hidden_size must be an integer, got '64'"),
    ("num_hidden_layers", None, "num_hidden_layers must be an integer, got None"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps must be a number"),
    ("num_attention_heads", 0, "num_attention_heads must be > 0, got 0"),
    ("tie_word_embeddings", 1, "tie_word_embeddings must be true or false, got 1"),
])
def test_config_fields_of_the_wrong_type_are_named(tmp_path, field, value, message):
    raw = json.loads((goldens.CHECKPOINT / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, field: value}))
    with pytest.raises(CheckpointError, match=f"config.json: {message}"):
        KimiAudioConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: must hold a JSON object, got list"):
        KimiAudioConfig.from_file(tmp_path / "config.json")


def _copy_weights(tmp_path):
    shutil.copy(goldens.CHECKPOINT / "config.json", tmp_path / "config.json")
    return load_file(goldens.CHECKPOINT / "model.safetensors")


def _new_model():
    config = KimiAudioConfig.from_file(goldens.CHECKPOINT / "config.json")
    with torch.device("meta"):
        return KimiAudioForCausalLM(config)


def test_sharded_checkpoint_loads_identically(tmp_path, tiny_model):
    tensors = _copy_weights(tmp_path)
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for shard, part in (("model-1-of-2.safetensors", names[:half]),
                        ("model-2-of-2.safetensors", names[half:])):
        save_file({n: tensors[n] for n in part}, tmp_path / shard)
        weight_map.update({n: shard for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    model = _new_model()
    load_state_dict(model, tmp_path, torch.float32)
    for (name, a), b in zip(model.state_dict().items(), tiny_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_inv_freq_buffers_are_ignored(tmp_path):
    tensors = _copy_weights(tmp_path)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8, dtype=torch.bfloat16)
    save_file(tensors, tmp_path / "model.safetensors")
    load_state_dict(_new_model(), tmp_path, torch.float32)


def test_missing_tensor_is_named(tmp_path):
    tensors = _copy_weights(tmp_path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        load_state_dict(_new_model(), tmp_path, torch.float32)


def test_misshapen_tensor_is_named(tmp_path):
    tensors = _copy_weights(tmp_path)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1].contiguous()
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lm_head.weight has shape \(1060, 64\)"):
        load_state_dict(_new_model(), tmp_path, torch.float32)


def test_missing_shard_file_is_named(tmp_path):
    _copy_weights(tmp_path)
    weight_map = {n: "model-1-of-1.safetensors" for n in _new_model().state_dict()}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="model-1-of-1.safetensors"):
        load_state_dict(_new_model(), tmp_path, torch.float32)


@pytest.mark.parametrize("damage", ["truncated", "header", "not_safetensors"])
def test_a_damaged_weights_file_is_named(tmp_path, damage):
    """The whisper and GLM loaders already said which file; the language model's loader let
    safetensors' bare `SafetensorError` through."""
    _copy_weights(tmp_path)
    data = (goldens.CHECKPOINT / "model.safetensors").read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "header": data[:100],
               "not_safetensors": b"version https://git-lfs.github.com/spec/v1\n"}[damage]
    (tmp_path / "model.safetensors").write_bytes(damaged)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors"):
        load_state_dict(_new_model(), tmp_path, torch.float32)


@pytest.mark.parametrize("weight_map, detail", [
    (5, "got int"), (["a"], "got list"), ({"lm_head.weight": 3}, "'lm_head.weight' maps to 3")])
def test_a_malformed_index_is_named(tmp_path, weight_map, detail):
    _copy_weights(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json: 'weight_map' must "
                                              f"map tensor names to shard file names.*{detail}"):
        load_state_dict(_new_model(), tmp_path, torch.float32)


def test_running_out_of_memory_while_loading_is_not_called_a_damaged_file(tmp_path, monkeypatch):
    """An out-of-memory error while the weights load (a GPU shared by two actors) stays one:
    it is not reported as a damaged checkpoint, which would send users to download it again."""
    _copy_weights(tmp_path)
    shutil.copy(goldens.CHECKPOINT / "model.safetensors", tmp_path / "model.safetensors")

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.Tensor, "to", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        load_state_dict(_new_model(), tmp_path, torch.float32)


@pytest.mark.parametrize("rows", [1, 15, 16, 32, 48, 49, 300])
def test_linear_and_mlp_agree_with_plain_products_at_every_row_count(tiny_model, rows):
    """`Linear` and the fused MLP switch to a transposed product at 16-48 rows on CPU; every row
    count gives the plain x @ W^T + b result (to fp32 rounding: the kernels may sum differently)."""
    from kimi_ops.model.modeling import small_gemm_rows

    layer = tiny_model.model.layers[0]
    x = torch.randn(rows, 1, tiny_model.config.hidden_size,
                    generator=torch.Generator().manual_seed(rows))
    assert bool(small_gemm_rows(x)) == (16 <= rows <= 48)
    qkv = layer.self_attn.qkv_proj
    torch.testing.assert_close(qkv(x), x @ qkv.weight.T + qkv.bias, rtol=1e-5, atol=1e-5)
    mlp = layer.mlp
    gate, up = (x @ mlp.gate_up_proj.weight.T).chunk(2, dim=-1)
    expected = (torch.nn.functional.silu(gate) * up) @ mlp.down_proj.weight.T
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)


def test_uninitialised_builds_meta_modules_and_restores_torch_init():
    """Inside: parameters on meta and torch.nn.init's functions skipped; after, even when the
    block raises, the real functions are back and a module built outside is initialised."""
    import pytest
    from torch import nn

    from kimi_ops.model.empty import uninitialised

    real = nn.init.normal_
    with pytest.raises(RuntimeError, match="boom"):
        with uninitialised():
            layer = nn.Linear(4, 3)
            assert layer.weight.is_meta and nn.init.normal_ is not real
            raise RuntimeError("boom")
    assert nn.init.normal_ is real
    assert not nn.Embedding(5, 2).weight.is_meta
