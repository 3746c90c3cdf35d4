"""kimi_ops: Kimi-Audio inference (model, front-end, batched engine). No Ray, no Prefect here."""

from __future__ import annotations

__all__ = ["GenerationResult", "KimiAudio"]


def __getattr__(name: str):  # lazy: `python -m kimi_ops --help` should not import torch
    if name == "KimiAudio":
        from kimi_ops.engine.api import KimiAudio

        return KimiAudio
    if name == "GenerationResult":
        from kimi_ops.engine.generate import GenerationResult

        return GenerationResult
    raise AttributeError(name)
