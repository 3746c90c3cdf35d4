"""Checkpoint resolution and loading end to end: generated sharded checkpoints, hub ids offline."""

import subprocess
import sys

import pytest

from kimi_ops.engine.api import KimiAudio
from kimi_ops.errors import CheckpointError
from kimi_ops.model.checkpoint import resolve_checkpoint
from tests import goldens


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    proc = subprocess.run([sys.executable, "-m", "kimi_ops", "make-tiny-checkpoint", str(out),
                           "--preset", "small", "--seed", "3"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return out


def test_sharded_small_checkpoint_runs_batched_equal_to_single(small_checkpoint):
    assert (small_checkpoint / "model.safetensors.index.json").is_file()
    engine = KimiAudio(small_checkpoint, device="cpu")
    assert engine.config.hidden_size == 512
    files = ["a02_chirp_3s_16k.wav", "a06_speech_2p37s_16k.flac", "a05_stereo_5s_44k1.wav"]
    conversations = [[{"role": "user", "message_type": "text", "content": "Describe the audio."},
                      {"role": "user", "message_type": "audio", "content": str(goldens.INPUTS / f)}]
                     for f in files]
    batched = engine.generate_batch(conversations, max_new_tokens=10)
    singles = [engine.generate_batch([c], max_new_tokens=10)[0] for c in conversations]
    assert [r.text_token_ids for r in batched] == [r.text_token_ids for r in singles]
    assert all(len(r.text_token_ids) == 10 or r.finish_reason == "stop" for r in batched)

    # sampled: a conversation draws the same tokens wherever it sits in the call, and twice in
    # one call gives the same result twice (its generator is seeded from its content)
    sampling = dict(max_new_tokens=10, text_temperature=0.8, text_top_k=5, seed=123)
    a, b = conversations[0], conversations[1]
    alone = engine.generate_batch([b], **sampling)[0].text_token_ids
    after_a = engine.generate_batch([a, b], **sampling)[1].text_token_ids
    twice = [r.text_token_ids for r in engine.generate_batch([b, b], **sampling)]
    assert after_a == alone and twice == [alone, alone]
    assert engine.generate_batch([b], **{**sampling, "seed": 124})[0].text_token_ids != alone
    with pytest.raises(ValueError, match="seed must be an integer, got None"):
        engine.generate_batch([b], **{**sampling, "seed": None})


def test_glm_tokenizer_folder_is_overridable(tmp_path):
    # a path that is not there is named as a missing folder, never tried as a hub id
    with pytest.raises(CheckpointError, match="elsewhere: GLM-4-Voice tokenizer folder not found"):
        resolve_checkpoint(goldens.CHECKPOINT, glm_tokenizer=tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="tokenizer folder not found"):
        resolve_checkpoint(goldens.CHECKPOINT, glm_tokenizer="./glm")
    paths = resolve_checkpoint(goldens.CHECKPOINT,
                               glm_tokenizer=goldens.CHECKPOINT / "glm-4-voice-tokenizer")
    assert paths.glm == goldens.CHECKPOINT / "glm-4-voice-tokenizer"


def test_hub_id_without_network_fails_clearly():
    with pytest.raises(CheckpointError, match="kimi-label-tests/no-such-model"):
        resolve_checkpoint("kimi-label-tests/no-such-model")


def test_missing_checkpoint_part_is_named(tmp_path):
    for name in ("config.json", "tiktoken.model"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(CheckpointError, match="whisper-large-v3"):
        resolve_checkpoint(tmp_path)
