"""Message lists -> the two parallel token streams Kimi-Audio reads, as the reference builds them.

A message is `{"role": "user"|"assistant", "message_type": "text"|"audio", "content": ...}`.
Text content is a string; audio content is a path, encoded bytes, a `(waveform, sample_rate)`
pair, or an already computed `AudioEncoding` (so one clip's front-end pass serves many prompts).

Layout per message (see the spec, section 5.1): a role marker when the role changes; text ->
its tokens on the text stream, blanks on the audio stream; audio -> media_begin, the VQ ids
(offset into the shared vocabulary, continuous positions), media_end, then `ct` (`ctd` for
output "both") and `msg_end` when the message closes its turn. A final assistant marker opens
the reply.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kimi_ops.errors import PromptError
from kimi_ops.model.text_tokenizer import TextTokenizer

ROLES = ("user", "assistant")
MESSAGE_TYPES = ("text", "audio")
OUTPUT_TYPES = ("text", "both")


@dataclass
class Prompt:
    audio_ids: list[int]
    text_ids: list[int]
    continuous_mask: list[bool]
    features: torch.Tensor  # [sum(continuous_mask), adaptor_in]: rows for the continuous positions

    def __len__(self) -> int:
        return len(self.audio_ids)

    def seed_id(self) -> int:
        """A number for the conversation's random generator, from its content: a sampled
        conversation draws the same tokens wherever it sits in a call, and twice in one call
        gives the same result twice."""
        key = np.asarray([*self.audio_ids, -1, *self.text_ids], dtype=np.int64).tobytes()
        return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


def validate_messages(messages: Any, where: str = "messages") -> list[dict]:
    """Check structure before any audio is touched; returns the list for chaining."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError(f"{where}: expected a non-empty list of messages")
    has_audio = False
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise PromptError(f"{where}[{i}]: a message must be a dict, got {type(msg).__name__}")
        role, kind = msg.get("role"), msg.get("message_type")
        if role not in ROLES:
            raise PromptError(f"{where}[{i}]: unknown role {role!r} (expected one of {ROLES})")
        if kind not in MESSAGE_TYPES:
            raise PromptError(
                f"{where}[{i}]: unknown message_type {kind!r} (expected one of {MESSAGE_TYPES})")
        if "content" not in msg or msg["content"] is None:
            raise PromptError(f"{where}[{i}]: message has no content")
        if kind == "text" and not isinstance(msg["content"], str):
            raise PromptError(f"{where}[{i}]: text content must be a string")
        has_audio |= kind == "audio"
    if not has_audio:
        raise PromptError(f"{where}: Kimi-Audio needs at least one audio message")
    return list(messages)


def audio_contents(messages: Sequence[dict]) -> list[Any]:
    return [m["content"] for m in messages if m["message_type"] == "audio"]


def build_prompt(
    messages: Sequence[dict],
    encodings: Sequence[Any],
    tokenizer: TextTokenizer,
    token_offset: int,
    output_type: str = "text",
) -> Prompt:
    """`encodings[k]` is the `AudioEncoding` (tokens, features) of the k-th audio message."""
    if output_type not in OUTPUT_TYPES:
        raise PromptError(f"output_type {output_type!r} is not one of {OUTPUT_TYPES}")
    sp = tokenizer.special
    audio, text, mask, features = [], [], [], []

    def put(a: int, t: int, continuous: bool = False) -> None:
        audio.append(a)
        text.append(t)
        mask.append(continuous)

    audio_index = 0
    for i, msg in enumerate(messages):
        role = msg["role"]
        closes_turn = i == len(messages) - 1 or messages[i + 1]["role"] != role
        if i == 0 or messages[i - 1]["role"] != role:
            put(sp.user_msg_start if role == "user" else sp.assistant_msg_start, sp.text_blank)
        if msg["message_type"] == "text":
            for token in tokenizer.encode(msg["content"]):
                put(sp.text_blank, token)
        else:
            enc = encodings[audio_index]
            audio_index += 1
            put(sp.media_begin, sp.text_blank)
            for code in np.asarray(enc.tokens).tolist():
                put(int(code) + token_offset, sp.text_blank, continuous=True)
            put(sp.media_end, sp.text_blank)
            features.append(enc.features[: len(enc.tokens)])
            if closes_turn:
                put(sp.speech_ct if output_type == "text" else sp.speech_ctd, sp.text_blank)
        if closes_turn:
            put(sp.msg_end, sp.text_blank)
    put(sp.assistant_msg_start, sp.text_blank)
    rows = torch.cat([f.float() for f in features]) if features else torch.zeros(0)
    return Prompt(audio, text, mask, rows)
