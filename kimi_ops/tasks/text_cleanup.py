"""Cleaning the model's free text and noticing when it went wrong (loops, budget exhausted)."""

from __future__ import annotations

import re

SPECIAL_TAG = re.compile(r"<\|[^|<>]*\|>")
END_MARKERS = re.compile(r"\[(?:EOS|BOS|EOT)\]")
SPACE_BEFORE_PUNCT = re.compile(r"\s+([!,.?;:。，！？；：])")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Drop special-token text (`<|...|>`, `[EOS]`...), control characters, the replacement
    character of broken UTF-8, and collapse whitespace (the evaluation's `remove_sp`)."""
    text = END_MARKERS.sub(" ", SPECIAL_TAG.sub(" ", text)).replace("\ufffd", "")
    text = CONTROL.sub("", text)
    text = " ".join(text.split())
    return SPACE_BEFORE_PUNCT.sub(r"\1", text).strip()


def is_looping(token_ids: list[int], min_repeats: int = 4, max_period: int = 16,
               min_tail: int = 12) -> bool:
    """True when the output ends in a short pattern repeated at least `min_repeats` times
    (covering at least `min_tail` tokens): the classic decoding loop."""
    n = len(token_ids)
    for period in range(1, max_period + 1):
        tail = token_ids[n - period:]
        repeats = 1
        while (repeats + 1) * period <= n and (
                token_ids[n - (repeats + 1) * period: n - repeats * period] == tail):
            repeats += 1
        if repeats >= min_repeats and repeats * period >= min_tail:
            return True
    return False
