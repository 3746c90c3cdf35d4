"""kimi_ops.frontend on the tiny checkpoint, against the reference's goldens (fp32).

VQ ids must be identical for every input; whisper features within 1e-4; batching across files
(mixed lengths, mini-batches, multi-block attention masks) must not change any file's result.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kimi_ops.audio import CHUNK_SAMPLES, load_audio
from kimi_ops.errors import CheckpointError
from kimi_ops.frontend import AudioEncoding, AudioFrontend, GlmVqTokenizer, KimiWhisperEncoder
from kimi_ops.frontend.encoder import load_encoder_weights
from tests import goldens
from tests.goldens import CHECKPOINT, INPUTS

GLM_DIR = CHECKPOINT / "glm-4-voice-tokenizer"
WHISPER_DIR = CHECKPOINT / "whisper-large-v3"

STEMS = [
    "a01_tone_0p5s_16k",
    "a02_chirp_3s_16k",
    "a03_speech_12s_16k",
    "a04_mix_31s_16k",
    "a05_stereo_5s_44k1",
    "a06_speech_2p37s_16k",
]


@pytest.fixture(scope="module")
def wavs() -> dict[str, np.ndarray]:
    goldens.require()
    paths = {p.stem: p for p in INPUTS.iterdir()}
    assert sorted(paths) == STEMS
    return {stem: load_audio(paths[stem]) for stem in STEMS}


@pytest.fixture(scope="module")
def frontend() -> AudioFrontend:
    goldens.require()
    return AudioFrontend.from_checkpoint(CHECKPOINT)


@pytest.fixture(scope="module")
def single(frontend, wavs) -> dict[str, AudioEncoding]:
    """One file per call."""
    return {stem: frontend.encode([wavs[stem]])[0] for stem in STEMS}


@pytest.fixture(scope="module")
def batched(frontend, wavs) -> dict[str, AudioEncoding]:
    """All six files in one call, mixed lengths, in an order unlike the sorted one."""
    order = [STEMS[i] for i in (3, 0, 5, 2, 4, 1)]
    return dict(zip(order, frontend.encode([wavs[s] for s in order])))


@pytest.fixture(scope="module")
def golden_tokens() -> dict:
    return goldens.load_json("audio_tokens.json")["inputs"]


@pytest.fixture(scope="module")
def golden_features() -> dict[str, np.ndarray]:
    return goldens.load_npz("whisper_features.npz")


@pytest.fixture(scope="module")
def debug() -> dict[str, np.ndarray]:
    return goldens.load_npz("frontend_debug.npz")


# ---- parity with the reference --------------------------------------------------------------


@pytest.mark.parametrize("stem", STEMS)
def test_vq_tokens_equal_reference(single, golden_tokens, stem):
    tokens = single[stem].tokens
    assert tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, np.array(golden_tokens[stem]["vq_codes"]))


@pytest.mark.parametrize("stem", STEMS)
def test_whisper_features_match_reference(single, golden_features, stem):
    features = single[stem].features
    expected = golden_features[stem][0]
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    assert tuple(features.shape) == expected.shape
    np.testing.assert_allclose(features.numpy(), expected, rtol=0, atol=1e-4)


def test_kimi_whisper_logmel_matches_reference(frontend, wavs, debug):
    mel = frontend.whisper.input_features(wavs["a02_chirp_3s_16k"])
    expected = debug["debug_kimi_whisper_logmel__a02_chirp_3s_16k"]
    assert tuple(mel.shape) == (1, *expected.shape)
    np.testing.assert_allclose(mel[0].numpy(), expected, rtol=0, atol=1e-4)


def test_vq_input_features_match_reference(frontend, wavs, debug):
    """Within the goldens' feature tolerance (1e-4, as the Kimi whisper log-mel above): the fp32
    STFT rounds differently per CPU. The AMD machine matched to 1e-5, the Intel AVX-512 one to
    3.8e-5, in the low-power bins; the VQ codes built on them are exact on both."""
    mel, mask = frontend.vq.input_features(wavs["a02_chirp_3s_16k"])
    expected = debug["debug_vq_input_features__a02_chirp_3s_16k"]
    assert mel.shape == expected.shape
    np.testing.assert_allclose(mel, expected, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(mask, debug["debug_vq_attention_mask__a02_chirp_3s_16k"])


def _edge_wav(num_samples: int) -> np.ndarray:
    """Noise whose last samples reach the reflect padding of the final STFT frames."""
    rng = np.random.default_rng(num_samples)
    return (0.1 * rng.standard_normal(num_samples)).astype(np.float32)


@pytest.mark.parametrize("num_samples", [12 * 1280 - 60, 12 * 1280, CHUNK_SAMPLES + 1280 - 30])
def test_vq_features_equal_hf_feature_extractor(frontend, wavs, num_samples):
    """The extractor call the reference makes per file: its pieces, padding to the longest."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor.from_pretrained(GLM_DIR)
    wav = _edge_wav(num_samples)
    pieces = [wav[i : i + CHUNK_SAMPLES] for i in range(0, len(wav), CHUNK_SAMPLES)]
    ref = extractor(
        pieces,
        sampling_rate=16000,
        return_attention_mask=True,
        return_tensors="np",
        padding="longest",
        pad_to_multiple_of=1280,
    )
    mel, mask = frontend.vq.input_features(wav)
    np.testing.assert_allclose(mel, ref["input_features"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(mask, ref["attention_mask"])


# ---- lengths and batching -------------------------------------------------------------------


def test_token_counts_are_ceil_per_piece(single, wavs, frontend):
    for stem in STEMS:
        n = len(wavs[stem])
        expected = sum(
            -(-len(wavs[stem][i : i + CHUNK_SAMPLES]) // 1280) for i in range(0, n, CHUNK_SAMPLES)
        )
        assert len(single[stem]) == expected == frontend.vq.token_count(n)
        assert single[stem].features.shape == (expected, frontend.feature_dim)
    assert len(single["a04_mix_31s_16k"]) == 375 + 13  # two pieces: 30 s + 1 s


def test_batched_equals_one_at_a_time(single, batched):
    for stem in STEMS:
        np.testing.assert_array_equal(batched[stem].tokens, single[stem].tokens, err_msg=stem)
        torch.testing.assert_close(batched[stem].features, single[stem].features, rtol=0, atol=1e-5)


def test_padding_edge_cases_batch_like_single(frontend, wavs):
    """Lengths within n_fft/2 of a token boundary, batched with long and short files."""
    extra = [_edge_wav(12 * 1280 - 60), _edge_wav(CHUNK_SAMPLES + 1280 - 30), _edge_wav(1)]
    group = [wavs["a04_mix_31s_16k"], *extra, wavs["a01_tone_0p5s_16k"]]
    together = frontend.vq.tokenize(group)
    for wav, ids in zip(group, together):
        np.testing.assert_array_equal(ids, frontend.vq.tokenize([wav])[0])
    assert [len(t) for t in together[1:4]] == [12, 375 + 1, 1]


def test_mini_batches_do_not_change_results(frontend, wavs, single):
    all_wavs = [wavs[s] for s in STEMS]
    vq = GlmVqTokenizer(frontend.vq.encoder, max_batch_pieces=2)
    for stem, ids in zip(STEMS, vq.tokenize(all_wavs)):
        np.testing.assert_array_equal(ids, single[stem].tokens)
    whisper = KimiWhisperEncoder(frontend.whisper.encoder, max_batch_pieces=3)
    for stem, feats in zip(STEMS, whisper.features(all_wavs)):
        torch.testing.assert_close(feats, single[stem].features, rtol=0, atol=1e-5)


def test_multi_block_mask_batching(frontend, wavs):
    """Block size 8 frames (instead of 200) puts many block boundaries inside short clips."""
    small = dataclasses.replace(frontend.vq.encoder.cfg, block_size=8)
    encoder = load_encoder_weights(small, str(GLM_DIR), torch.float32, "cpu")
    group = [wavs[s] for s in STEMS]
    batched = GlmVqTokenizer(encoder, max_batch_pieces=16).tokenize(group)
    one_by_one = GlmVqTokenizer(encoder, max_batch_pieces=1)
    for wav, ids in zip(group, batched):
        np.testing.assert_array_equal(ids, one_by_one.tokenize([wav])[0])


@pytest.mark.parametrize("block,length", [(8, 37), (50, 100), (200, 750)])
def test_block_causal_mask_matches_upstream_construction(frontend, block, length):
    rng = np.random.default_rng(block)
    valid = torch.from_numpy(rng.random((3, length)) > 0.3)
    valid[:, 0] = True
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    blocks = [
        torch.ones(min(block, length - s), min(block, length - s)) for s in range(0, length, block)
    ]
    upstream = (causal | torch.block_diag(*blocks).bool())[None] & valid[:, None, :]
    ours = frontend.vq.encoder._block_mask(valid, block)
    assert torch.equal(ours[:, 0], upstream)


def test_empty_inputs(frontend):
    assert frontend.encode([]) == []
    (enc,) = frontend.encode([np.zeros(0, dtype=np.float32)])
    assert enc.tokens.shape == (0,) and tuple(enc.features.shape) == (0, frontend.feature_dim)


def test_outputs_are_plain_tensors(single):
    features = single["a02_chirp_3s_16k"].features
    assert not features.is_inference() and not features.requires_grad
    features.clone().add_(1)  # usable outside inference mode


def test_bf16_whisper_runs_and_returns_float32(wavs, single):
    encoder = KimiWhisperEncoder.from_pretrained(WHISPER_DIR, dtype=torch.bfloat16)
    (feats,) = encoder.features([wavs["a06_speech_2p37s_16k"]])
    expected = single["a06_speech_2p37s_16k"].features
    assert feats.dtype == torch.float32 and feats.shape == expected.shape
    assert (feats - expected).abs().max() < 0.25
    (native,) = encoder.features([wavs["a06_speech_2p37s_16k"]], out_dtype=None)
    assert native.dtype == torch.bfloat16


def test_length_mismatch_is_reported(frontend, wavs, monkeypatch):
    real = frontend.vq.tokenize
    monkeypatch.setattr(frontend.vq, "tokenize", lambda w: [t[:-1] for t in real(w)])
    with pytest.raises(CheckpointError, match="VQ tokens but"):
        frontend.encode([wavs["a01_tone_0p5s_16k"]])


# ---- checkpoint loading -------------------------------------------------------------------


def _rewrite(src: Path, dst: Path, edit) -> None:
    with safe_open(src / "model.safetensors", framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - not a dict
    save_file(edit(tensors), dst / "model.safetensors")


def _copy_without_weights(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def test_checkpoint_errors(tmp_path):
    goldens.require()
    glm = _copy_without_weights(GLM_DIR, tmp_path / "glm")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        GlmVqTokenizer.from_pretrained(glm)

    _rewrite(GLM_DIR, glm, lambda t: {k: v for k, v in t.items() if k != "layers.1.fc2.weight"})
    with pytest.raises(CheckpointError, match=r"layers\.1\.fc2\.weight"):
        GlmVqTokenizer.from_pretrained(glm)

    _rewrite(GLM_DIR, glm, lambda t: {**t, "codebook.weight": t["codebook.weight"][:-1]})
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: tensor codebook\.weight has shape"
    ):
        GlmVqTokenizer.from_pretrained(glm)

    (glm / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        GlmVqTokenizer.from_pretrained(glm)

    with pytest.raises(CheckpointError, match="not found"):
        AudioFrontend.from_checkpoint(tmp_path / "no_such_model")


def test_whisper_accepts_encoder_prefix(tmp_path, wavs, single):
    goldens.require()
    whisper = _copy_without_weights(WHISPER_DIR, tmp_path / "whisper")
    _rewrite(
        WHISPER_DIR,
        whisper,
        lambda t: {
            k.removeprefix("model."): v for k, v in t.items() if k.startswith("model.encoder.")
        },
    )
    (feats,) = KimiWhisperEncoder.from_pretrained(whisper).features([wavs["a01_tone_0p5s_16k"]])
    torch.testing.assert_close(feats, single["a01_tone_0p5s_16k"].features, rtol=0, atol=0)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_hf_mel_filters_equal_transformers_without_importing_it(n_mels):
    """The "hf" filter bank, rebuilt with numpy, equals transformers' float32 weights bit for
    bit (the GLM tokenizer's features use them), and building it imports no transformers."""
    import subprocess
    import sys

    from transformers.audio_utils import mel_filter_bank

    from kimi_ops.frontend.mel import mel_filters

    theirs = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                             max_frequency=8000.0, sampling_rate=16000, norm="slaney",
                             mel_scale="slaney").T.astype(np.float32)
    assert np.array_equal(mel_filters("hf", n_mels).numpy(), theirs)
    probe = ("import sys; from kimi_ops.frontend.mel import mel_filters; mel_filters('hf'); "
             "print('transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("lengths", [[16000], [1, 479_999, 480_000], [0, 5_000, 800, 160_000],
                                     [479_300, 100]])
def test_log_mel_of_a_padded_batch_skips_the_zeros_and_changes_no_bit(lengths):
    """Whisper's 30 s window is mostly zeros for a short clip: `lengths` stops the STFT past the
    longest row, and every bit of the result stays what the whole window gives."""
    from kimi_ops.frontend.mel import log_mel, mel_filters

    rng = np.random.default_rng(len(lengths))
    wave = torch.zeros(len(lengths), CHUNK_SAMPLES)
    for row, n in enumerate(lengths):
        wave[row, :n] = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 0.1)
    filters = mel_filters("openai")
    whole = log_mel(wave, filters)
    assert whole.shape == (len(lengths), 128, 3000)
    assert torch.equal(log_mel(wave, filters, lengths=lengths), whole)
