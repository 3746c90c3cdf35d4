"""Prompt streams built from raw audio files equal the reference's, and bad message lists fail."""

import pytest

from kimi_ops.engine.prompt import validate_messages
from kimi_ops.errors import PromptError
from tests import goldens


def with_input_paths(messages):
    return [{**m, "content": str(goldens.INPUTS / m["content"])} if m["message_type"] == "audio"
            else m for m in messages]


def test_prompts_match_reference(engine):
    cases = goldens.prompts()
    for name, case in cases.items():
        prompt = engine.build_prompts([with_input_paths(case["messages"])],
                                      output_type=case["output_type"])[0]
        assert prompt.audio_ids == case["audio_ids"], name
        assert prompt.text_ids == case["text_ids"], name
        assert prompt.continuous_mask == [bool(x) for x in case["is_continuous_mask"]], name
        rows = sum(shape[1] for shape in case["continuous_feature_shapes"])
        assert tuple(prompt.features.shape) == (rows, case["continuous_feature_shapes"][0][2])


def test_prompt_layout_for_multiturn_two_audio_messages(engine, tokenizer):
    case = goldens.prompts()["multiturn"]
    prompt = engine.build_prompts([with_input_paths(case["messages"])])[0]
    sp = tokenizer.special
    assert prompt.audio_ids.count(sp.media_begin) == 2
    assert prompt.audio_ids.count(sp.speech_ct) == 1  # only after the audio that closes a turn
    assert prompt.audio_ids[-1] == sp.assistant_msg_start


@pytest.mark.parametrize("messages, reason", [
    ([], "non-empty list"),
    ([{"role": "user", "message_type": "text", "content": "hi"}], "at least one audio"),
    ([{"role": "system", "message_type": "audio", "content": "a.wav"}], "unknown role 'system'"),
    ([{"role": "user", "message_type": "video", "content": "a.mp4"}], "unknown message_type"),
    ([{"role": "user", "message_type": "text", "content": 3},
      {"role": "user", "message_type": "audio", "content": "a.wav"}], "must be a string"),
    ([{"role": "user", "message_type": "audio"}], "no content"),
])
def test_bad_message_lists_raise_prompt_error(messages, reason):
    with pytest.raises(PromptError, match=reason):
        validate_messages(messages)
