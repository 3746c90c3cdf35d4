"""The model's configuration, read from the checkpoint's `config.json`.

A frozen dataclass so it ships cheaply to workers and cannot drift after load. Field names mirror
`config.json` (MoonshotAI's `KimiAudioConfig`); only what inference needs is kept, everything is
validated on load so a bad file fails here, before any tensor is allocated.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from kimi_ops.errors import CheckpointError


# the field annotations' types (strings under `from __future__ import annotations`) in words
_TYPE_WORDS = {"int": "an integer", "float": "a number", "int | None": "an integer or null",
               "str": "a string", "bool": "true or false"}
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
             "max_position_embeddings", "kimia_adaptor_input_dim")


def _has_type(value, annotation: str) -> bool:
    if annotation == "int | None" and value is None:
        return True
    if annotation in ("int", "int | None"):
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
            value)
    return isinstance(value, {"str": str, "bool": bool}[annotation])


@dataclass(frozen=True)
class KimiAudioConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    kimia_token_offset: int
    kimia_mimo_layers: int
    kimia_mimo_transformer_from_layer_index: int
    kimia_adaptor_input_dim: int
    kimia_media_begin: int
    kimia_media_end: int
    pad_token_id: int
    kimia_text_output_vocab: int | None = None
    kimia_mimo_audiodelaytokens: int = 6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> KimiAudioConfig:
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: must hold a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = sorted(name for name in required if name not in raw)
        if missing:
            raise CheckpointError(f"{source}: missing required fields {missing}")
        for f in fields(cls):
            if f.name in raw and not _has_type(raw[f.name], f.type):
                raise CheckpointError(f"{source}: {f.name} must be {_TYPE_WORDS[f.type]}, got "
                                      f"{raw[f.name]!r}")
        for name in _POSITIVE:
            if raw[name] <= 0:
                raise CheckpointError(f"{source}: {name} must be > 0, got {raw[name]}")
        config = cls(**{k: v for k, v in raw.items() if k in known})
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> KimiAudioConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, source=str(path))

    def validate(self, source: str = "config.json") -> None:
        def fail(reason: str) -> None:
            raise CheckpointError(f"{source}: {reason}")

        if self.hidden_act != "silu":
            fail(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings=true is not the Kimi-Audio layout")
        if self.hidden_size % self.num_attention_heads:
            fail("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_attention_heads must be divisible by num_key_value_heads")
        if not 0 <= self.kimia_mimo_transformer_from_layer_index < self.num_hidden_layers:
            fail("kimia_mimo_transformer_from_layer_index must index a backbone layer")
        if not 0 < self.kimia_token_offset < self.vocab_size:
            fail("kimia_token_offset must lie inside vocab_size")
        if self.head_dim % 2:
            fail("head_dim must be even for rotary embeddings")
