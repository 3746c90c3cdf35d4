"""The tiktoken text tokenizer with Kimi's special tokens, against the checkpoint's own files."""

import json

from tests import goldens


def test_special_ids_match_tokenizer_config(tokenizer):
    config = json.loads((goldens.CHECKPOINT / "tokenizer_config.json").read_text())
    decoder = {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()}
    assert {tokenizer.num_base_tokens + i: n for i, n in enumerate(tokenizer.special_names)} == decoder
    extra = goldens.load_json("prompts.json")["extra_tokens"]
    sp = tokenizer.special
    assert (sp.msg_end, sp.media_begin, sp.media_end, sp.text_blank, sp.text_eos,
            sp.user_msg_start, sp.assistant_msg_start, sp.speech_ct, sp.speech_ctd, sp.pad) == (
        extra["msg_end"], extra["media_begin"], extra["media_end"], extra["kimia_text_blank"],
        extra["kimia_text_eos"], extra["kimia_user_msg_start"],
        extra["kimia_assistant_msg_start"], extra["kimia_speech_ct_id"],
        extra["kimia_speech_ctd_id"], extra["pad"])


def test_special_strings_in_user_text_are_plain_text(tokenizer):
    ids = tokenizer.encode("<|im_media_begin|>")
    assert tokenizer.special.media_begin not in ids
    assert tokenizer.decode(ids) == "<|im_media_begin|>"


def test_specials_decode_to_literal_names(tokenizer):
    sp = tokenizer.special
    assert tokenizer.decode([sp.text_blank, sp.text_eos]) == (
        "<|im_kimia_text_blank|><|im_kimia_text_eos|>")


def test_round_trip_multilingual(tokenizer):
    text = "Kimi 音频 test — ça va? 123\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
