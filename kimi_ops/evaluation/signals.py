"""How well a per-item signal ranks per-item errors: a rank correlation and errors by decile.

`spearman(signal, error)` is Spearman's rank correlation: the Pearson correlation of the two
sides' ranks, tied values sharing the mean of the ranks they span (as `scipy.stats.spearmanr`
ranks them). It is None with fewer than 3 items, or when either side is constant (no ranking
to compare). For a signal that should fall as errors rise (a log-probability), a useful signal
gives a value near -1; for one that should rise with them (a compression ratio), near +1.

`error_by_decile(signal, errors, lengths)` sorts the items by signal (ascending; equal values
in their given order) and cuts them into `n_bins` groups of equal size (the first groups one
larger when the count does not divide), fewer groups when there are fewer items. Each group's
rate is pooled: its summed errors over its summed reference length, as a corpus WER/CER is
(`kimi_ops.evaluation.asr.error_rate`), not a mean of the items' rates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kimi_ops.evaluation.asr import error_rate


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of `values`, ties given the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new = np.r_[True, ordered[1:] != ordered[:-1]]  # where a group of equal values starts
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(values)]
    group = np.cumsum(new) - 1  # each sorted position's group
    ranks = np.empty(len(values))
    ranks[order] = ((starts + ends - 1) / 2 + 1)[group]
    return ranks


def spearman(signal: Sequence[float], error: Sequence[float]) -> float | None:
    """Spearman's rank correlation of the two sequences (module docstring)."""
    if len(signal) != len(error):
        raise ValueError(f"{len(signal)} signal values but {len(error)} errors")
    if len(signal) < 3:
        return None
    a, b = average_ranks(signal), average_ranks(error)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    if denominator == 0:
        return None
    return float(np.clip((a * b).sum() / denominator, -1.0, 1.0))


@dataclass(frozen=True)
class SignalBin:
    """One group of items by signal: its range, mean and pooled error rate."""

    count: int
    signal_min: float
    signal_max: float
    mean_signal: float
    errors: int
    reference_length: int
    rate: float | None


def error_by_decile(signal: Sequence[float], errors: Sequence[int],
                    lengths: Sequence[int], n_bins: int = 10) -> list[SignalBin]:
    """The items in `n_bins` equal-count groups of ascending signal (module docstring)."""
    if not len(signal) == len(errors) == len(lengths):
        raise ValueError(f"{len(signal)} signal values, {len(errors)} error counts and "
                         f"{len(lengths)} reference lengths")
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    values = np.asarray(signal, dtype=np.float64)
    errs, lens = np.asarray(errors, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    order = np.argsort(values, kind="stable")
    bins = []
    for part in np.array_split(order, min(n_bins, len(values))):
        e, n = int(errs[part].sum()), int(lens[part].sum())
        bins.append(SignalBin(count=len(part), signal_min=float(values[part].min()),
                              signal_max=float(values[part].max()),
                              mean_signal=float(values[part].mean()), errors=e,
                              reference_length=n, rate=error_rate(e, n)))
    return bins

