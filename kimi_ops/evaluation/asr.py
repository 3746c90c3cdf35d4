"""Word/character error counts from a minimum edit alignment.

`align(reference, hypothesis)` is a Levenshtein alignment of two token sequences with unit
costs (rapidfuzz's `editops`), counted as substitutions S, deletions D (reference tokens with no
counterpart) and insertions I (hypothesis tokens with no counterpart); hits H = N - S - D, where
N is the reference length. Counts add up, so a corpus rate is summed edits over summed
reference length, not a mean of per-utterance rates.

Empty sides, by that rule: an empty hypothesis is N deletions (rate 1.0); an empty reference
with a non-empty hypothesis is all insertions, whose rate is undefined (`None`), yet the
insertions still count in the corpus totals; both empty is a rate of 0.0. The same holds for a
corpus: zero reference tokens in total give 0.0 without edits and `None` with any.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass

from kimi_ops.evaluation.text import LANGUAGES, tokens


def error_rate(errors: int, reference_length: int) -> float | None:
    if reference_length:
        return errors / reference_length
    return 0.0 if errors == 0 else None


@dataclass(frozen=True)
class ErrorCounts:
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_length: int = 0
    hypothesis_length: int = 0

    @property
    def hits(self) -> int:
        return self.reference_length - self.substitutions - self.deletions

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float | None:
        return error_rate(self.errors, self.reference_length)

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        return ErrorCounts(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def to_dict(self) -> dict:
        return {**asdict(self), "hits": self.hits, "errors": self.errors, "rate": self.rate}


def align(reference: Sequence[str], hypothesis: Sequence[str]) -> ErrorCounts:
    from rapidfuzz.distance import Levenshtein

    ops = Levenshtein.editops(list(reference), list(hypothesis))
    kinds = {"replace": 0, "delete": 0, "insert": 0}
    for op in ops:
        kinds[op.tag] += 1
    return ErrorCounts(substitutions=kinds["replace"], deletions=kinds["delete"],
                       insertions=kinds["insert"], reference_length=len(reference),
                       hypothesis_length=len(hypothesis))


def transcript_errors(reference: str, hypothesis: str, language: str) -> ErrorCounts:
    """Both texts normalised for `language` ('en': words, WER; 'zh': characters, CER)."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown ASR language {language!r} (expected one of {sorted(LANGUAGES)})")
    return align(tokens(reference, language), tokens(hypothesis, language))
