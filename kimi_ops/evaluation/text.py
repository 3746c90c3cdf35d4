"""Transcript normalisation before scoring, and which normalisation a reference gets.

Two languages, two metrics:
  * "en" -> WER: Whisper's English normaliser (`whisper_normalizer.english.EnglishTextNormalizer`:
    lower case, punctuation and fillers removed, British spellings and numbers standardised),
    then split on whitespace into words.
  * "zh" -> CER: NFKC (full-width letters, digits and punctuation become their ASCII forms),
    case folded, then every whitespace and Unicode punctuation character (category P*: ，。！？、
    「」《》…… and their ASCII cousins) removed; the tokens are the remaining characters.

Which one a reference gets (`asr_language`): its declared language when there is one (a value
starting with "zh" or "en", any case, e.g. "zh-CN", "en_US"); otherwise "zh" when the reference
text holds at least one Han character (CJK Unified Ideographs, Extension A/B, Compatibility
Ideographs), else "en". Other declared languages are refused rather than scored with the wrong
rule.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

LANGUAGES = {"en": "wer", "zh": "cer"}  # language -> the metric it is scored with
AUTO = ("", "auto")

_HAN = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df]")


@lru_cache(maxsize=1)
def _english_normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize_english(text: str) -> str:
    return _english_normalizer()(text)


def normalize_chinese(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(c for c in text
                   if not c.isspace() and not unicodedata.category(c).startswith("P"))


def has_han(text: str) -> bool:
    return _HAN.search(text) is not None


def asr_language(reference: str, declared: str | None = None) -> str:
    """'en' or 'zh' for this reference transcript (see the module doc for the rule)."""
    if declared is not None and declared.strip().lower() not in AUTO:
        code = declared.strip().lower()
        for language in LANGUAGES:
            if code == language or code[:3] in (f"{language}-", f"{language}_"):
                return language
        raise ValueError(f"language {declared!r} is not supported for ASR scoring "
                         f"(supported: {', '.join(LANGUAGES)}, or empty/auto to detect)")
    return "zh" if has_han(reference) else "en"


def tokens(text: str, language: str) -> list[str]:
    """The normalised units that are aligned: words for 'en', characters for 'zh'."""
    if language == "en":
        return normalize_english(text).split()
    if language == "zh":
        return list(normalize_chinese(text))
    raise ValueError(f"unknown ASR language {language!r} (expected one of {sorted(LANGUAGES)})")
