"""asr: the transcript of the audio.

Prompts are the evaluation's: English (LibriSpeech) or Chinese (AISHELL/WenetSpeech); `auto`
uses the reference's own ASR instruction from infer.py. Decoding uses the evaluation's text
repetition penalty (1.1 over the last 16 tokens). The transcript is cleaned of special-token
text; `transcript_truncated` says the token budget ran out, `transcript_looped` that the output
ends in a repeated pattern (both are signs of a hallucinating decode).
"""

from __future__ import annotations

from typing import Any

from kimi_ops.tasks.base import GenerativeTask
from kimi_ops.tasks.text_cleanup import clean_text, is_looping

VERSION = "asr-1"
PROMPTS = {
    "auto": "请将音频内容转换为文字。",
    "en": "Please transcribe the spoken content into written text.",
    "zh": "请把这段语音转录成文本。",
}
SAMPLING = {"text_repetition_penalty": 1.1, "text_repetition_window_size": 16}


def parse(text: str, result: Any) -> dict[str, Any]:
    tokens = list(getattr(result, "text_token_ids", []) or [])
    return {
        "transcript": clean_text(text),
        "transcript_truncated": getattr(result, "finish_reason", "stop") == "length",
        "transcript_looped": is_looping(tokens),
    }


def make(language: str = "auto") -> GenerativeTask:
    if language not in PROMPTS:
        raise ValueError(f"asr: language must be one of {sorted(PROMPTS)}, got {language!r}")
    return GenerativeTask(name="asr", version=VERSION, instruction=PROMPTS[language], parse=parse,
                          text_fields=("transcript",),
                          flags=("transcript_truncated", "transcript_looped"),
                          sampling=dict(SAMPLING), skip_silent=True)
