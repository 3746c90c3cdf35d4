"""Decode stage: fetch each object, decode it to 16 kHz mono, cut it into <= 30 s segments (by
voice activity, or at quiet points: the job's `segmenter`), and emit the file as one row, or as *pieces* of at most `piece_seconds` of whole
segments (CPU tasks).

A row's waveform is one object, which the next stages batch by row count: without pieces one
multi-hour archive (1.4 GB of waveform for 6 h, 2.8 GB of the full model's features) or a batch
of hour-long files would set the workers' memory, whatever the in-flight budget, and one long
recording would keep one actor busy while the others idle (Ray Data cuts a task's output into
blocks of about 128 MiB, each a separate actor call). The driver stitches the pieces back
(`pipelines.job.stitch`).

An object that cannot be used becomes an error row here. A store that stays unavailable past
the job's retry budget is not a property of the file: that StorageError ends the run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from kimi_ops.audio.segmenters import DEFAULT_SEGMENTER
from pipelines.batching import work_units
from pipelines.spec import PIECE_SECONDS, STAGE_DEFAULTS, StageResources
from pipelines.stages.base import Stage, error_row
from pipelines.storage import SPOOL_BYTES, RetryPolicy, StorageConfig, StorageError, fetched


class DecodeStage(Stage):
    """Fetch each object, decode to 16 kHz mono, cut into <= 30 s segments (the job's
    `segmenter`), and emit the file as one row, or as pieces of at most `piece_seconds` of
    whole segments."""

    name = "decode"

    def __init__(self, storage: StorageConfig | None, max_segment_seconds: float = 30.0,
                 retry: RetryPolicy | None = None, max_audio_seconds: float | None = None,
                 piece_seconds: float = PIECE_SECONDS, spool_bytes: int | None = None,
                 segmenter: str = DEFAULT_SEGMENTER, resources: StageResources | None = None):
        self.storage = storage
        # objects over this many bytes are decoded from a local copy (None: storage's default)
        self.spool_bytes = SPOOL_BYTES if spool_bytes is None else spool_bytes
        self.max_segment_seconds = max_segment_seconds
        self.segmenter = segmenter  # kimi_ops.audio.segmenters.SEGMENTERS
        self.piece_seconds = piece_seconds
        # None: the decoder's default (KIMI_MAX_AUDIO_SECONDS, else 6 h)
        self.limit = {"max_seconds": max_audio_seconds} if max_audio_seconds else {}
        self.retry = retry  # None: the default policy
        self.resources = resources or STAGE_DEFAULTS["decode"]

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        """One table per object, yielded as it is decoded: Ray Data stores each before the
        next object is fetched, so a task holds one object's waveform at a time."""
        for plan in batch.to_pylist():
            yield self.decode(plan)

    def decode(self, plan: dict) -> pa.Table:
        """One object's rows: an error row, or its pieces (one for most files)."""
        row = {"source_uri": plan["uri"], "etag": plan.get("etag"),
               "size_bytes": plan.get("size"), "error_kind": None, "error_message": None,
               "sample_rate": None, "channels": None, "duration_s": None,
               "segments": None, "audio": None, "decode_s": 0.0,
               "piece": 0, "pieces": 1, "first_segment": 0, "offset": 0}
        start = time.perf_counter()
        wave = self._wave(plan, row)
        row["decode_s"] = time.perf_counter() - start
        if wave is None:
            return pa.Table.from_pylist([row], schema=DECODED_SCHEMA)
        return self._pieces(row, wave)

    def _wave(self, plan: dict, row: dict) -> np.ndarray | None:
        """The object's 16 kHz waveform, with its header facts and duration in `row`; None
        (and `row` an error row) when it cannot be used."""
        from kimi_ops.audio import SAMPLE_RATE, load_audio
        from kimi_ops.errors import AudioTooLongError, KimiError

        try:
            # bytes, or for a large object a local file, which the decoder reads block by block
            with fetched(plan["uri"], self.storage, retry=self.retry,
                         size=plan.get("size"), spool_bytes=self.spool_bytes) as (data, size):
                row["size_bytes"] = size
                row["sample_rate"], row["channels"] = _header(data)
                wave = load_audio(data, name=plan["uri"], **self.limit)
            row["duration_s"] = len(wave) / SAMPLE_RATE
            return wave
        except StorageError as exc:
            if exc.retryable:  # the store, not the file: end the run, do not label it
                raise
            error_row(row, exc.kind, f"{exc.uri}: {exc.reason}")  # as audio errors: no kind
        except AudioTooLongError as exc:  # the job's own knob, and the duration for a rerun
            row["duration_s"] = exc.seconds
            error_row(row, exc.kind, f"{plan['uri']}: {exc.seconds:.0f} s is longer than the "
                                     f"{exc.limit:.0f} s limit (max_audio_seconds, "
                                     "--max-audio-seconds; a rerun with a higher limit labels it)")
        except KimiError as exc:
            error_row(row, exc.kind, str(exc))
        return None

    def _pieces(self, row: dict, wave: np.ndarray) -> pa.Table:
        """The file's segments as runs of consecutive segments of at most `piece_seconds` (a
        file has >= 1 segment); the segments cover the waveform, so the pieces split it without
        gaps. The pieces' `audio` values are views of the one waveform buffer, not copies."""
        from kimi_ops.audio import SAMPLE_RATE
        from kimi_ops.audio.segmenters import cut

        segments = cut(wave, self.segmenter, SAMPLE_RATE, self.max_segment_seconds)
        cuts = work_units([s.end - s.start for s in segments], len(segments),
                          int(self.piece_seconds * SAMPLE_RATE))
        rows = [{**row, "piece": piece, "pieces": len(cuts), "first_segment": first,
                 "offset": segments[first].start, "decode_s": row["decode_s"] / len(cuts),
                 "segments": [{"start": s.start, "end": s.end, "silent": s.silent,
                               "speech_ratio": s.speech_ratio}
                              for s in segments[first:stop]]}
                for piece, (first, stop) in enumerate(cuts)]
        bounds = np.array([r["offset"] for r in rows] + [len(wave)], dtype=np.int64)
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        audio = pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), len(rows),
            [None, pa.py_buffer(bounds * wave.itemsize), pa.py_buffer(wave)])
        table = pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)
        return table.set_column(table.schema.get_field_index("audio"), "audio", audio)


def _header(data) -> tuple[int | None, int | None]:
    """(sample rate, channels) from the file's header, or Nones when it has none that
    libsndfile reads (the decoder then reports the file by name)."""
    import soundfile as sf

    from kimi_ops.audio.decode import audio_file

    try:
        with audio_file(data) as handle:  # (not by path: see audio_file)
            info = sf.info(handle)
        return int(info.samplerate), int(info.channels)
    except (RuntimeError, OSError, sf.LibsndfileError):
        return None, None


DECODED_SCHEMA = pa.schema([
    ("source_uri", pa.string()), ("etag", pa.string()), ("size_bytes", pa.int64()),
    ("error_kind", pa.string()), ("error_message", pa.string()),
    ("sample_rate", pa.int32()), ("channels", pa.int32()), ("duration_s", pa.float64()),
    ("segments", pa.list_(pa.struct([("start", pa.int64()), ("end", pa.int64()),
                                     ("silent", pa.bool_()),
                                     ("speech_ratio", pa.float32())]))),
    ("audio", pa.large_binary()), ("decode_s", pa.float64()),
    # which piece of its file the row is, and where it starts: its first segment's index in
    # the file and its first sample (its segments' start/end are sample offsets in the file)
    ("piece", pa.int32()), ("pieces", pa.int32()), ("first_segment", pa.int32()),
    ("offset", pa.int64()),
])
