"""How a file is cut into segments: the segmenters, the default, and `cut`, which runs one.

  * "vad": speech regions by voice activity (`kimi_ops.audio.vad`); the rest is silent;
  * "energy": the loudness cutter (`kimi_ops.audio.segment`), at quiet points.

Both cover the waveform with contiguous segments of at most `max_seconds` and mark those to
keep from the model `silent`.
"""

from __future__ import annotations

import numpy as np

from kimi_ops.audio.decode import SAMPLE_RATE
from kimi_ops.audio.segment import DEFAULT_MAX_SECONDS, Segment, segment_audio
from kimi_ops.audio.vad import segment_speech

SEGMENTERS = ("vad", "energy")
DEFAULT_SEGMENTER = "vad"


def cut(wave: np.ndarray, segmenter: str = DEFAULT_SEGMENTER, sample_rate: int = SAMPLE_RATE,
        max_seconds: float = DEFAULT_MAX_SECONDS) -> list[Segment]:
    """A waveform's segments by `segmenter` (one of `SEGMENTERS`)."""
    if segmenter == "vad":
        return segment_speech(wave, sample_rate, max_seconds=max_seconds)
    if segmenter == "energy":
        return segment_audio(wave, sample_rate, max_seconds=max_seconds)
    raise ValueError(f"segmenter must be one of {', '.join(SEGMENTERS)}, got {segmenter!r}")
