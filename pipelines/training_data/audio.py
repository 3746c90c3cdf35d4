"""A kept segment's audio, for the exports that hold it (lhotse, hf): the one place that turns
a segment row into audio bytes.

The audio is what the model labelled: the source object fetched (`pipelines.storage.fetched`, a
large object through a local file) and decoded as the labelling run decoded it
(`kimi_ops.audio.load_audio`: float32 mono 16 kHz; no duration limit, the run accepted the
file), and a segment is samples [round(start_s * 16000), round(end_s * 16000)) of it: the run's
own sample offsets (`start_s` is start / 16000). It is encoded as 16-bit FLAC at 16 kHz.

A source is decoded once for a run of consecutive rows of it (a file's segments are adjacent in
input order), and one waveform is held at a time.

A source object that is gone, or whose ETag (a local file's fingerprint) is no longer that of
its `files/` row, no longer holds the labelled audio: `changed(uris)` names those, so that the
build drops their segments (`source_changed`) before it writes them.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping

import numpy as np

from pipelines.storage import ObjectInfo, StorageError, fetched, list_objects, redact_uri
from pipelines.training_data.errors import TrainingDataError

SAMPLE_RATE = 16000  # kimi_ops.audio.SAMPLE_RATE (not imported here: that pulls in the decoder)
SUBTYPE = "PCM_16"


def encode_flac(samples: np.ndarray) -> bytes:
    """float32 mono samples at 16 kHz as a 16-bit FLAC file."""
    import soundfile as sf

    sink = io.BytesIO()
    sf.write(sink, samples, SAMPLE_RATE, format="FLAC", subtype=SUBTYPE)
    return sink.getvalue()


def _cannot_read(uri: str, reason: str) -> TrainingDataError:
    return TrainingDataError(f"audio of {redact_uri(uri)}: {reason} (build without the audio "
                             "exports: --formats webdataset)")


class SegmentAudio:
    """Segments' audio from their source objects (module docstring). `etags`: source_uri ->
    the ETag of its `files/` row (None: not known, not compared)."""

    def __init__(self, storage, etags: Mapping[str, str | None]):
        self.storage, self.etags = storage, etags
        self.sizes: dict[str, int | None] = {}  # checked sources not read yet -> listed size
        self.current: tuple[str, np.ndarray] | None = None

    def changed(self, uris: Iterable[str]) -> set[str]:
        """The sources among `uris` that are gone, or changed since they were labelled."""
        changed = set()
        for uri in uris:
            info = self._info(uri)
            expected = self.etags.get(uri)
            if info is None or (expected and info.etag and info.etag != expected):
                changed.add(uri)
            else:
                self.sizes[uri] = info.size
        return changed

    def flac(self, uri: str, start_s: float, end_s: float) -> bytes:
        """The segment [start_s, end_s) of `uri` as FLAC."""
        wave = self._wave(uri)
        start, end = round(start_s * SAMPLE_RATE), round(end_s * SAMPLE_RATE)
        if end > len(wave):
            raise _cannot_read(uri, f"it is {len(wave) / SAMPLE_RATE:.3f} s long, the segment "
                                    f"ends at {end_s:.3f} s: it changed since it was labelled")
        return encode_flac(wave[start:end])

    def _info(self, uri: str) -> ObjectInfo | None:
        try:
            found = next(iter(list_objects(uri, None, self.storage)), None)
        except StorageError as err:
            if err.retryable:  # the store is down: the flow's task retries the build
                raise
            if err.kind == "not_found":
                return None
            raise _cannot_read(uri, err.reason) from None
        return found if found is not None and found.uri == uri else None

    def _wave(self, uri: str) -> np.ndarray:
        if self.current is None or self.current[0] != uri:
            self.current = None  # the last source's waveform goes before the next is read
            self.current = (uri, self._decode(uri))
        return self.current[1]

    def _decode(self, uri: str) -> np.ndarray:
        from kimi_ops.audio import load_audio
        from kimi_ops.errors import KimiError

        try:
            with fetched(uri, self.storage, size=self.sizes.pop(uri, None)) as (data, _):
                return load_audio(data, name=uri, max_seconds=None)
        except StorageError as err:
            if err.retryable:
                raise
            raise _cannot_read(uri, err.reason) from None
        except KimiError as exc:
            raise _cannot_read(uri, f"it no longer decodes ({exc})") from None
