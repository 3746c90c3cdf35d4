"""caption: a free-text description of the audio (speech, sounds, music, setting).

The evaluation toolkit has no captioning prompt (captioning was trained on AudioCaps, Clotho,
MACS and WavCaps style data); this instruction asks for the facets a corpus filter needs.
"""

from __future__ import annotations

from typing import Any

from kimi_ops.tasks.base import GenerativeTask
from kimi_ops.tasks.text_cleanup import clean_text, is_looping

VERSION = "caption-1"
INSTRUCTION = ("Describe the audio in one or two sentences: who or what is heard (speech, "
               "sounds, music) and the setting.")


def parse(text: str, result: Any) -> dict[str, Any]:
    tokens = list(getattr(result, "text_token_ids", []) or [])
    looped = is_looping(tokens) or getattr(result, "finish_reason", "stop") == "length"
    return {"caption": clean_text(text), "caption_unreliable": looped}


def make() -> GenerativeTask:
    return GenerativeTask(name="caption", version=VERSION, instruction=INSTRUCTION, parse=parse,
                          text_fields=("caption",), flags=("caption_unreliable",),
                          sampling={"text_repetition_penalty": 1.1,
                                    "text_repetition_window_size": 16})
