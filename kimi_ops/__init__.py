"""kimi_ops: Kimi-Audio inference (model, front-end, batched engine). No Ray, no Prefect here.

    from kimi_ops import KimiAudio, label_files
    engine = KimiAudio(model_path="moonshotai/Kimi-Audio-7B-Instruct", load_detokenizer=False)
    rows = label_files(engine, ["a.wav"], ["asr", "emotion"])  # one dict per file
"""

from __future__ import annotations

__all__ = ["GenerationResult", "KimiAudio", "label_files"]


def __getattr__(name: str):  # lazy: `python -m kimi_ops --help` should not import torch
    if name == "KimiAudio":
        from kimi_ops.engine.api import KimiAudio

        return KimiAudio
    if name == "GenerationResult":
        from kimi_ops.engine.generate import GenerationResult

        return GenerationResult
    if name == "label_files":
        from kimi_ops.tasks.runner import label_files

        return label_files
    raise AttributeError(name)
