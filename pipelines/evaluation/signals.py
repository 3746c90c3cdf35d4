"""How the quality signals relate to transcript errors: the report's `signals` section.

Does filtering on a signal pay? For each signal the output has (`pipelines.signals`:
transcript_avg_logprob, transcript_min_logprob, transcript_compression_ratio, speech_ratio),
over the scored `transcript` references:
  * `spearman`: the rank correlation between the signal and the item's error rate (WER, or CER
    for a Chinese reference, as `transcript` is scored); near -1 for a log-probability that
    ranks errors well, near +1 for a compression ratio that does;
  * `deciles`: the items in ten equal-count groups of ascending signal, each with its count,
    signal range and mean, and its pooled rate (summed errors over summed reference words or
    characters): what a threshold at that decile would drop (`kimi_ops.evaluation.signals`).

Granularity: references may name a segment (`segment_index`) or a whole file, and each is
related at its own level: a segment reference with its `segments/` row's signals and that
segment's error, a file reference with its `files/` row's duration-weighted aggregates of the
same names and the file's error. The two levels are reported apart (`segment`, `file`), never
pooled. An item is left out of a signal's entry when its value is null (`without_signal`), or
when its rate is undefined: an empty reference with a non-empty hypothesis (`undefined_rate`).
The section is None when no scored item has any signal (an output from before the signals, or
references without transcripts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from kimi_ops.evaluation import error_by_decile, spearman
from pipelines.signals import SIGNAL_COLUMNS

LEVELS = ("segment", "file")
DECILES = 10


def _level(row: Mapping[str, Any]) -> str:
    return "file" if row["segment_index"] is None else "segment"


def _relate(rows: Sequence[Mapping[str, Any]], column: str) -> dict[str, Any] | None:
    """One signal against the rows' error rates; None when no row has the signal."""
    with_signal = [r for r in rows if column in r["signals"]]
    if not with_signal:
        return None
    usable = [r for r in with_signal if r["rate"] is not None]
    values = [r["signals"][column] for r in usable]
    bins = error_by_decile(values, [r["errors"] for r in usable],
                           [r["reference_length"] for r in usable], DECILES) if usable else []
    return {"items": len(usable), "without_signal": len(rows) - len(with_signal),
            "undefined_rate": len(with_signal) - len(usable),
            "metrics": sorted({r["metric"] for r in usable}),
            "spearman": spearman(values, [r["rate"] for r in usable]),
            "deciles": [{"decile": k, **asdict(b)} for k, b in enumerate(bins, start=1)]}


def signals_section(asr: Mapping[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """level -> signal column -> its entry (module docstring), from the `transcript` result's
    rows; only levels and signals with items; None without any."""
    if not asr:
        return None
    section = {}
    for level in LEVELS:
        rows = [r for r in asr["rows"] if _level(r) == level]
        entries = {column: _relate(rows, column) for column in SIGNAL_COLUMNS.values()}
        entries = {column: entry for column, entry in entries.items() if entry is not None}
        if entries:
            section[level] = entries
    return section or None


def _rates(entry: Mapping[str, Any]) -> str:
    return " ".join("-" if d["rate"] is None else f"{d['rate']:.2f}" for d in entry["deciles"])


def signal_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per level and signal: what the console prints and the flow's table shows."""
    rows = []
    for level, entries in (report.get("signals") or {}).items():
        for column, entry in entries.items():
            rho = entry["spearman"]
            rows.append({"signal": column, "level": level, "items": entry["items"],
                         "spearman": None if rho is None else round(rho, 3),
                         "error by decile (low -> high signal)": _rates(entry)})
    return rows
