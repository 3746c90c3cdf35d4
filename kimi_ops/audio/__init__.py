"""Audio in: decode bytes/paths/arrays to float32 mono 16 kHz and cut 30 s chunks."""

from kimi_ops.audio.decode import (
    CHUNK_SAMPLES,
    CHUNK_SECONDS,
    SAMPLE_RATE,
    AudioSource,
    load_audio,
    num_chunks,
    split_chunks,
)

__all__ = [
    "CHUNK_SAMPLES",
    "CHUNK_SECONDS",
    "SAMPLE_RATE",
    "AudioSource",
    "load_audio",
    "num_chunks",
    "split_chunks",
]
