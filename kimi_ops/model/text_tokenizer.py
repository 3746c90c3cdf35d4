"""The text tokenizer: tiktoken BPE from `tiktoken.model` plus Kimi's special tokens.

Special tokens are numbered as the official `tokenization_kimia.py` does: after the N BPE ranks
come 421 specials in a fixed order (34 named, the rest `<|reserved_token_K|>`), so a special's id
is N + its offset whatever N is (151643 in the release, 512 in the tiny checkpoints).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import tiktoken

from kimi_ops.errors import CheckpointError

NUM_SPECIAL_TOKENS = 421
PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
NAMED_SPECIALS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_msg_end|>", 3: "<|im_user_msg_start|>",
    4: "<|im_assistant_msg_start|>", 9: "[EOT]", 18: "<|im_media_begin|>",
    20: "<|im_media_end|>", 23: "<|im_kimia_text_blank|>", 24: "<|im_kimia_text_eos|>",
    27: "<|im_kimia_user_msg_start|>", 28: "<|im_kimia_assistant_msg_start|>",
    32: "<|im_kimia_speech_ct_id|>", 33: "<|im_kimia_speech_ctd_id|>",
}


def special_token_names() -> list[str]:
    names, reserved = [], 0
    for offset in range(NUM_SPECIAL_TOKENS):
        if offset in NAMED_SPECIALS:
            names.append(NAMED_SPECIALS[offset])
        else:
            names.append(f"<|reserved_token_{reserved}|>")
            reserved += 1
    return names


@dataclass(frozen=True)
class SpecialIds:
    """The ids the prompt builder and the generation loop use (`ExtraTokens` upstream)."""

    msg_end: int
    media_begin: int
    media_end: int
    text_blank: int
    text_eos: int
    user_msg_start: int
    assistant_msg_start: int
    speech_ct: int
    speech_ctd: int
    pad: int

    @classmethod
    def from_base(cls, num_base: int) -> SpecialIds:
        return cls(msg_end=num_base + 2, media_begin=num_base + 18, media_end=num_base + 20,
                   text_blank=num_base + 23, text_eos=num_base + 24,
                   user_msg_start=num_base + 27, assistant_msg_start=num_base + 28,
                   speech_ct=num_base + 32, speech_ctd=num_base + 33,
                   pad=num_base + NUM_SPECIAL_TOKENS - 1)


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    try:
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: tokenizer file not found") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: line {line_no} is not '<base64> <rank>' ({exc})") from None
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise CheckpointError(f"{path}: {len(missing_bytes)} single bytes have no rank")
    return ranks


class TextTokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        ranks = read_ranks(path)
        self.num_base_tokens = len(ranks)
        self.special_names = special_token_names()
        specials = {name: self.num_base_tokens + i for i, name in enumerate(self.special_names)}
        self.encoding = tiktoken.Encoding(path.name, pat_str=PATTERN, mergeable_ranks=ranks,
                                          special_tokens=specials)
        self.special = SpecialIds.from_base(self.num_base_tokens)
        self.vocab_size = self.num_base_tokens + NUM_SPECIAL_TOKENS

    def encode(self, text: str) -> list[int]:
        """No BOS/EOS; special-token strings in user text are encoded as ordinary text."""
        return self.encoding.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        """Ids below the text vocabulary; specials decode to their literal `<|...|>` names."""
        return self.encoding.decode(list(ids))
