"""Cut long audio into <= 30 s segments at pauses, so each can be transcribed on its own.

Kimi-Audio handles at most 30 s per input well, and archive recordings run from minutes to
hours. `segment_audio` cuts a 16 kHz mono waveform (from `load_audio`) into contiguous
`Segment`s, each at most `max_seconds` long and cut at the quietest point the rules allow, and
marks the segments that hold only silence so they are not sent to ASR. Transcripts of the
segments, in `index` order, stitch back into the transcript of the whole recording.

Contract of the result, for a waveform of `n > 0` samples:
  * segments are contiguous and cover the waveform exactly: the first starts at 0, each `end`
    is the next `start` (sample indices, `end` exclusive), the last ends at `n`;
  * every segment is at most `max_seconds` long (`floor(max_seconds * sample_rate)` samples);
  * no segment is shorter than `min_seconds` unless the whole waveform is (then it is the one
    segment);
  * audio no longer than `max_seconds` is one segment; an empty waveform gives no segments.

Level measure: short-time RMS over 30 ms frames (three 10 ms hops) with a 10 ms hop, in dBFS
(full scale = 1.0), floored at `FLOOR_DB`. Frame `k` is centred on sample `k * hop + hop // 2`,
and those centres are the candidate cut points.

The cutting rule, applied greedily from the start. With `start` the current segment start:
  1. if the rest (`n - start`) fits in `max_seconds`, it is the last segment;
  2. otherwise the cut may go anywhere in `[lo, hi]`, where
     `hi = min(start + max, n - min)` (the segment fits, and the rest is not too short) and
     `lo = max(start + min, hi - search)` (a window of `search_seconds` ending at `hi`, never
     making this segment too short);
  3. among the frame centres in that window, take those within `TIE_DB` of the quietest
     ("near-ties"), take the LATEST run of consecutive near-tie frames, and cut at its middle:
     the middle keeps the cut away from the words on both sides of a pause, the latest run
     keeps segments long. A window narrower than one hop has no frame centre: cut at `hi`.
`min_seconds <= max_seconds / 2` is required: it is what guarantees a valid cut always exists
(any length above `max` splits into pieces of `min..max`).

Silence: a segment's `rms_db` is the level of its loudest frame (frames whose centre lies in
the segment); it is `silent` when `rms_db < silence_db`. Using the loudest frame, not a
percentile, errs towards sending audio to ASR: one short word in 30 s of silence keeps the
segment; a click costs only one wasted ASR call.

Defaults and why:
  * `max_seconds=30`: Kimi-Audio's 30 s window (`CHUNK_SECONDS`); longer inputs degrade or hang.
  * `min_seconds=5`: shorter segments give the model little context and each costs a whole
    model call; 5 s still leaves the cutter 25 s of freedom at the end of a recording.
  * `search_seconds=10`: natural speech pauses every few seconds, so a 10 s window almost always
    holds a real pause, while segments stay >= 20 s (fewer calls, fewer stitch points).
  * `silence_db=-50`: speech sits around -40..-10 dBFS even in quiet recordings; room tone
    and tape hiss of archive material is typically below -50 dBFS. All-zero audio is
    `FLOOR_DB` (-120) and always silent.

Cost: one vectorised pass over the waveform computes 10 ms hop energies (no copy for a
contiguous float array; float32 accumulation over 160 samples is ample for a dB level). The
rest works on the ~100-per-second frame levels, with one small numpy step per segment, so two
hours of audio segments in well under a second.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from kimi_ops.audio.decode import CHUNK_SECONDS, SAMPLE_RATE

HOP_SECONDS = 0.010
FRAME_HOPS = 3  # 30 ms frames: hops k-1, k, k+1 around frame k
FLOOR_DB = -120.0  # level of digital silence; keeps log10 finite
TIE_DB = 1.0  # frames within this of the window's quietest count as equally quiet

DEFAULT_MAX_SECONDS = float(CHUNK_SECONDS)
DEFAULT_MIN_SECONDS = 5.0
DEFAULT_SEARCH_SECONDS = 10.0
DEFAULT_SILENCE_DB = -50.0


@dataclass(frozen=True)
class Segment:
    """One piece of a recording: samples `[start, end)` of the waveform it was cut from."""

    index: int
    start: int
    end: int
    silent: bool
    rms_db: float  # level of the loudest 30 ms frame, dBFS (>= FLOOR_DB)
    # the share of the segment that is speech: by voice activity (`kimi_ops.audio.vad`), or
    # 1.0 / 0.0 for a loud / silent segment of the loudness cutter
    speech_ratio: float
    sample_rate: int = SAMPLE_RATE

    @property
    def num_samples(self) -> int:
        return self.end - self.start

    @property
    def start_s(self) -> float:
        return self.start / self.sample_rate

    @property
    def end_s(self) -> float:
        return self.end / self.sample_rate

    @property
    def duration_s(self) -> float:
        return (self.end - self.start) / self.sample_rate

    def slice(self, wave: np.ndarray) -> np.ndarray:
        """This segment's samples of `wave` (a view, not a copy)."""
        return wave[self.start : self.end]


def segment_audio(
    wave: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    min_seconds: float = DEFAULT_MIN_SECONDS,
    search_seconds: float = DEFAULT_SEARCH_SECONDS,
    silence_db: float = DEFAULT_SILENCE_DB,
) -> list[Segment]:
    """Cut a mono float waveform into segments at pauses (rules in the module docstring).

    Raises ValueError, naming the argument, for a waveform that is not a 1-D floating-point
    array or holds NaN/inf, and for out-of-range arguments.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"wave must be a 1-D array, got shape {wave.shape}")
    if not np.issubdtype(wave.dtype, np.floating):
        raise ValueError(f"wave must hold floating-point samples in [-1, 1], got {wave.dtype}")
    is_int = isinstance(sample_rate, (int, np.integer)) and not isinstance(sample_rate, bool)
    if not is_int or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
    _check_finite("max_seconds", max_seconds)
    _check_finite("min_seconds", min_seconds)
    _check_finite("search_seconds", search_seconds)
    if math.isnan(silence_db):
        raise ValueError("silence_db must be a number, got NaN")
    max_samples = math.floor(max_seconds * sample_rate + 1e-9)
    if max_seconds <= 0 or max_samples < 1:
        raise ValueError(f"max_seconds must be at least one sample long, got {max_seconds}")
    if min_seconds < 0:
        raise ValueError(f"min_seconds must be >= 0, got {min_seconds}")
    min_samples = math.ceil(min_seconds * sample_rate - 1e-9)
    if 2 * min_samples > max_samples:
        raise ValueError(
            f"min_seconds must be <= max_seconds / 2 (so a valid cut always exists), "
            f"got min_seconds={min_seconds}, max_seconds={max_seconds}"
        )
    if search_seconds <= 0:
        raise ValueError(f"search_seconds must be > 0, got {search_seconds}")
    search_samples = max(1, round(search_seconds * sample_rate))

    n = wave.shape[0]
    if n == 0:
        return []
    hop = max(1, round(HOP_SECONDS * sample_rate))
    levels = _frame_levels_db(wave, hop)

    cuts = [0]
    min_cut = max(min_samples, 1)  # a cut never makes an empty segment, even with min 0
    start = 0
    while n - start > max_samples:
        hi = min(start + max_samples, n - min_cut)
        lo = max(start + min_cut, hi - search_samples)
        start = _quietest_cut(levels, lo, hi, hop)
        cuts.append(start)
    cuts.append(n)

    segments = []
    for index, (seg_start, seg_end) in enumerate(itertools.pairwise(cuts)):
        rms_db = _segment_level_db(wave, levels, seg_start, seg_end, hop)
        segments.append(
            Segment(
                index=index,
                start=seg_start,
                end=seg_end,
                silent=bool(rms_db < silence_db),
                rms_db=rms_db,
                speech_ratio=float(rms_db >= silence_db),
                sample_rate=int(sample_rate),
            )
        )
    return segments


def _check_finite(name: str, value: float) -> None:
    try:
        ok = math.isfinite(value)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _frame_levels_db(wave: np.ndarray, hop: int) -> np.ndarray:
    """dBFS level of each 30 ms frame; frame k is centred on sample `k * hop + hop // 2`."""
    n = wave.shape[0]
    full = n // hop
    num_hops = -(-n // hop)
    hop_energy = np.zeros(num_hops + 2, dtype=np.float64)  # one zero hop of padding each side
    hop_count = np.zeros(num_hops + 2, dtype=np.float64)
    if full:
        blocks = wave[: full * hop].reshape(full, hop)  # [hops, hop]; a view when contiguous
        hop_energy[1 : full + 1] = np.einsum("ij,ij->i", blocks, blocks)
        hop_count[1 : full + 1] = hop
    if num_hops > full:  # the partial last hop
        tail = wave[full * hop :].astype(np.float64)
        hop_energy[num_hops] = np.dot(tail, tail)
        hop_count[num_hops] = tail.shape[0]
    if not np.isfinite(hop_energy).all():
        raise ValueError("wave holds NaN or infinite samples")
    # frame k sums padded hops k, k+1, k+2 == real hops k-1, k, k+1
    energy = hop_energy[:-2] + hop_energy[1:-1] + hop_energy[2:]
    count = hop_count[:-2] + hop_count[1:-1] + hop_count[2:]
    mean_square = energy / count
    floor = 10.0 ** (FLOOR_DB / 10.0)
    return 10.0 * np.log10(np.maximum(mean_square, floor))


def _quietest_cut(levels: np.ndarray, lo: int, hi: int, hop: int) -> int:
    """The cut in `[lo, hi]`: middle of the latest run of near-quietest frame centres."""
    half = hop // 2
    k_lo = -(-(lo - half) // hop)  # first frame centre >= lo
    k_hi = min((hi - half) // hop, levels.shape[0] - 1)  # last frame centre <= hi
    if k_lo > k_hi:
        return hi
    window = levels[k_lo : k_hi + 1]
    near = window <= window.min() + TIE_DB
    last = int(np.flatnonzero(near)[-1])
    breaks = np.flatnonzero(~near[:last])
    first = int(breaks[-1]) + 1 if breaks.size else 0
    k = k_lo + (first + last + 1) // 2
    return k * hop + half


def _segment_level_db(
    wave: np.ndarray, levels: np.ndarray, start: int, end: int, hop: int
) -> float:
    """Loudest frame centred in `[start, end)`; direct RMS for a segment shorter than a hop."""
    half = hop // 2
    k_start = max(0, -(-(start - half) // hop))
    k_end = min(levels.shape[0], -(-(end - half) // hop))
    if k_end > k_start:
        return float(levels[k_start:k_end].max())
    piece = wave[start:end].astype(np.float64)
    mean_square = float(np.dot(piece, piece)) / piece.shape[0]
    return 10.0 * math.log10(max(mean_square, 10.0 ** (FLOOR_DB / 10.0)))


def level_db(wave: np.ndarray, start: int, end: int, sample_rate: int = SAMPLE_RATE) -> float:
    """The level of the loudest 30 ms frame of `wave[start:end]`, dBFS (as `Segment.rms_db`)."""
    hop = max(1, round(HOP_SECONDS * sample_rate))
    piece = wave[start:end]
    return _segment_level_db(piece, _frame_levels_db(piece, hop), 0, len(piece), hop)

