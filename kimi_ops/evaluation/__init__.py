"""Label-quality metrics against reference labels: pure functions over plain values.

    counts = transcript_errors("Hello, world!", "hello word", "en")   # WER counts
    report = classification_report(["joy", "anger"], ["joy", "joy"])   # accuracy, macro-F1
    cal = calibration([0.9, 0.6], [True, False], n_bins=10)            # ECE, reliability bins
    rho = spearman([-0.1, -0.5, -2.0], [0.0, 0.2, 0.9])                # -1.0: ranks errors

`text` normalises transcripts (Whisper's English normaliser; Chinese without whitespace and
punctuation) and decides which of the two a reference is; `asr` aligns token sequences into
substitution/deletion/insertion counts; `closed_set` scores labels against a closed set;
`signals` relates a per-item signal (a confidence) to per-item errors. Reading
tables and joining them to references is `pipelines.evaluation`'s job, not this package's.
"""

from __future__ import annotations

from kimi_ops.evaluation.asr import ErrorCounts, align, error_rate, transcript_errors
from kimi_ops.evaluation.closed_set import (
    Calibration,
    ClassificationReport,
    calibration,
    classification_report,
)
from kimi_ops.evaluation.signals import SignalBin, average_ranks, error_by_decile, spearman
from kimi_ops.evaluation.text import (
    LANGUAGES,
    asr_language,
    normalize_chinese,
    normalize_english,
    tokens,
)

__all__ = ["LANGUAGES", "Calibration", "ClassificationReport", "ErrorCounts", "SignalBin",
           "align", "asr_language", "average_ranks", "calibration", "classification_report",
           "error_by_decile", "error_rate", "normalize_chinese", "normalize_english",
           "spearman", "tokens", "transcript_errors"]
