"""Cut audio into segments by voice activity (Silero VAD), so that noise is not sent to the model.

A loudness cutter sends every second of a noisy recording to ASR: steady background noise is
as loud as quiet speech. `segment_speech` asks Silero VAD (the `silero-vad` package, its JIT
model shipped in the wheel, no torchaudio) where the speech is, and returns segments that
still cover the whole waveform, contiguous, each at most `max_seconds`:

  * speech segments (`silent=False`): speech regions, each widened by `pad_seconds` on both
    sides, merged while the pause between them is at most `merge_gap_seconds` and the merged
    span fits in `max_seconds`; a single region longer than that is cut at its quietest
    points by the loudness cutter (`kimi_ops.audio.segment.segment_audio`);
  * non-speech segments (`silent=True`, no model call for tasks that skip silence): the
    stretches between them, cut evenly into pieces of at most `max_seconds`. A pause shorter
    than `min_gap_seconds` between two speech segments gets no segment of its own: the two
    meet in its middle.

Each segment's `speech_ratio` is the share of its samples that the VAD calls speech (before
padding), in [0, 1].

Probabilities: one per 32 ms window (512 samples at 16 kHz). Silero's model is a recurrent net
run window after window; one window at a time costs about 80-100 CPU-seconds per audio hour on
one core, almost all of it per-call overhead. So a recording longer than `LANE_SECONDS` is read
in *lanes* of that length, run side by side as one batch (up to `MAX_LANES` rows per call).
Each lane but the first starts `WARMUP_SECONDS` early and the windows of that warm-up are
dropped, so no lane starts from a blank state. The net's state carries far back, so lanes do
not give exactly the probabilities of one pass over the whole recording (a few windows near a
decision flip), but they decide speech as well: on `bench/segmentation.py`'s material, 10 s
lanes with 2 s of warm-up kept speech recall and noise sent within 0.005 of 30 s lanes, at
36 instead of 95 CPU-seconds per audio hour. A clip of at most one lane is one pass, as
Silero's own `get_speech_timestamps` runs it. The lanes are views of the waveform: the VAD
holds one [lanes, 512] batch and one float per window (about 2.7 MB for six hours), nothing of
the size of the waveform, and its result depends on the waveform only.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

from kimi_ops.audio.decode import SAMPLE_RATE
from kimi_ops.audio.segment import Segment, level_db, segment_audio

WINDOW = 512  # Silero's window at 16 kHz: 32 ms
LANE_SECONDS = 10.0
WARMUP_SECONDS = 2.0
MAX_LANES = 32

THRESHOLD = 0.5  # speech probability that starts speech (Silero's default)
MIN_SPEECH_SECONDS = 0.25  # shorter bursts are not speech (Silero's default)
MIN_SILENCE_SECONDS = 0.3  # a pause inside speech shorter than this does not end it
PAD_SECONDS = 0.2  # speech regions are widened by this much on each side
MERGE_GAP_SECONDS = 1.0  # speech regions this close share a segment (when it fits)
MIN_GAP_SECONDS = 0.5  # a shorter pause between speech segments gets no segment of its own

_model = None
_lock = threading.Lock()


def _silero():
    """Silero's JIT model, loaded once per process (it is stateful: use it under `_lock`)."""
    global _model
    if _model is None:
        from silero_vad import load_silero_vad

        _model = load_silero_vad(onnx=False)
    return _model


def speech_probabilities(wave: np.ndarray) -> np.ndarray:
    """Silero's speech probability of each 32 ms window of a 16 kHz mono waveform (the last
    window zero-padded), float32, `ceil(len(wave) / 512)` of them."""
    import torch

    n = len(wave)
    windows = -(-n // WINDOW)
    lane = int(LANE_SECONDS * SAMPLE_RATE) // WINDOW  # windows kept per lane
    warm = int(WARMUP_SECONDS * SAMPLE_RATE) // WINDOW
    starts = np.arange(0, windows, lane)  # each lane's first kept window
    probs = np.empty(windows, np.float32)
    offsets = np.arange(WINDOW)
    with _lock, torch.inference_mode(), _one_thread(torch):
        model = _silero()
        for first in range(0, len(starts), MAX_LANES):
            batch = starts[first:first + MAX_LANES]
            lead = np.where(batch > 0, np.minimum(batch, warm), 0)  # warm-up windows
            steps = int((lead + np.minimum(lane, windows - batch)).max())  # a short clip: few
            model.reset_states()
            for step in range(steps):
                at = batch - lead + step  # each lane's window at this step
                index = at[:, None] * WINDOW + offsets[None, :]
                chunk = np.where(index < n, wave[np.minimum(index, n - 1)], 0.0)
                out = model(torch.from_numpy(chunk.astype(np.float32)), SAMPLE_RATE)
                keep = (step >= lead) & (at < np.minimum(batch + lane, windows))
                probs[at[keep]] = out[:, 0].numpy()[keep]
    return probs


@contextlib.contextmanager
def _one_thread(torch):
    """torch on one thread while the VAD runs: its calls are small, and more threads only
    spin (on two busy cores a minute of audio took 5 CPU-seconds instead of 0.6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def speech_regions(probs: np.ndarray, num_samples: int) -> list[tuple[int, int]]:
    """Speech as (start, end) sample ranges, unpadded, from the window probabilities (Silero's
    hysteresis: speech starts at THRESHOLD, ends below THRESHOLD - 0.15 held for
    MIN_SILENCE_SECONDS; bursts under MIN_SPEECH_SECONDS are dropped)."""
    from silero_vad import get_speech_timestamps_from_probs

    found = get_speech_timestamps_from_probs(
        probs.tolist(), sampling_rate=SAMPLE_RATE, threshold=THRESHOLD,
        min_speech_duration_ms=int(MIN_SPEECH_SECONDS * 1000),
        min_silence_duration_ms=int(MIN_SILENCE_SECONDS * 1000), speech_pad_ms=0,
        audio_length_samples=num_samples)
    return [(int(s["start"]), min(int(s["end"]), num_samples)) for s in found
            if s["end"] > s["start"]]


def segment_speech(wave: np.ndarray, sample_rate: int = SAMPLE_RATE,
                   max_seconds: float = 30.0, pad_seconds: float = PAD_SECONDS,
                   merge_gap_seconds: float = MERGE_GAP_SECONDS,
                   min_gap_seconds: float = MIN_GAP_SECONDS) -> list[Segment]:
    """Segments of a 16 kHz mono waveform by voice activity (rules in the module docstring):
    contiguous, covering it, each at most `max_seconds`; `silent` marks the non-speech ones."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"segment_speech takes {SAMPLE_RATE} Hz audio, got {sample_rate}")
    n = len(wave)
    if n == 0:
        return []
    limit = math.floor(max_seconds * sample_rate + 1e-9)
    speech = speech_regions(speech_probabilities(wave), n)
    spans = _speech_spans(speech, n, limit, round(pad_seconds * sample_rate),
                          round(merge_gap_seconds * sample_rate))
    cuts = _timeline(spans, n, limit, round(min_gap_seconds * sample_rate))
    segments = []
    for start, end, is_speech in cuts:
        if is_speech and end - start > limit:  # one region longer than a segment
            pieces = [(start + s.start, start + s.end)
                      for s in segment_audio(wave[start:end], sample_rate,
                                             max_seconds=max_seconds)]
        else:
            pieces = [(start, end)]
        for a, b in pieces:
            segments.append(Segment(index=len(segments), start=a, end=b, silent=not is_speech,
                                    rms_db=level_db(wave, a, b, sample_rate),
                                    speech_ratio=_overlap(speech, a, b) / (b - a),
                                    sample_rate=sample_rate))
    return segments


def _speech_spans(speech: list[tuple[int, int]], n: int, limit: int, pad: int,
                  merge_gap: int) -> list[list[int]]:
    """Padded speech regions merged while close and short enough: [start, end] sample spans."""
    spans: list[list[int]] = []
    for start, end in speech:
        start, end = max(0, start - pad), min(n, end + pad)
        if spans and start - spans[-1][1] <= merge_gap and end - spans[-1][0] <= limit:
            spans[-1][1] = max(spans[-1][1], end)
        elif spans and start <= spans[-1][1]:  # overlapping pads that may not merge: meet
            middle = (start + spans[-1][1]) // 2
            spans[-1][1] = middle
            spans.append([middle, end])
        else:
            spans.append([start, end])
    return spans


def _timeline(spans: list[list[int]], n: int, limit: int, min_gap: int
              ) -> list[tuple[int, int, bool]]:
    """(start, end, is_speech) covering [0, n): the speech spans, and the stretches between
    them cut evenly to at most `limit` samples; a stretch under `min_gap` is split between its
    neighbours (at the file's edges it joins the speech next to it)."""
    out: list[tuple[int, int, bool]] = []
    position = 0
    for i, (start, end) in enumerate(spans):
        gap = start - position
        if 0 < gap < min_gap:
            if out:  # the previous speech span and this one meet in the middle
                middle = position + gap // 2
                out[-1] = (out[-1][0], middle, True)
                start = middle
            else:
                start = 0
        elif gap > 0:
            out += _even(position, start, limit)
        if i == len(spans) - 1 and 0 < n - end < min_gap:
            end = n
        out.append((start, end, True))
        position = end
    if position < n:
        out += _even(position, n, limit)
    return out


def _even(start: int, end: int, limit: int) -> list[tuple[int, int, bool]]:
    """[start, end) as non-speech pieces of equal length, at most `limit` samples each."""
    parts = -(-(end - start) // limit)
    bounds = [start + (end - start) * k // parts for k in range(parts + 1)]
    return [(a, b, False) for a, b in zip(bounds, bounds[1:])]


def _overlap(speech: list[tuple[int, int]], start: int, end: int) -> int:
    return sum(max(0, min(end, b) - max(start, a)) for a, b in speech)
