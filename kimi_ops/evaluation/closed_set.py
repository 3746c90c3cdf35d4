"""Closed-set label metrics: accuracy, macro-F1, a confusion matrix, and calibration.

Labels: the confusion matrix and macro-F1 run over the labels that occur as a reference or a
prediction (the union, as scikit-learn's default); `label_order` fixes their order (a task's
label set), labels outside it follow in sorted order. The matrix is [reference][predicted].

Per label, with TP/FP/FN counted from the matrix: precision = TP/(TP+FP), recall = TP/(TP+FN),
each 0.0 when its denominator is 0; F1 = 2TP/(2TP+FP+FN), which is their harmonic mean and 0.0
when TP is 0. Macro-F1 is the unweighted mean of F1 over the labels. With no items, accuracy and
macro-F1 are None.

Calibration is of the top label: each item's confidence is the score of the label it predicted,
and `correct` says whether that label was right. Confidences fall into `n_bins` equal-width bins
over [0, 1]; bin k holds [k/n, (k+1)/n), the last bin also holds 1.0. The expected calibration
error is ECE = sum over bins of (count_b / N) * |accuracy_b - mean_confidence_b|; empty bins
contribute nothing and report None for their means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

SCORE_TOLERANCE = 1e-4  # float32 probabilities may overshoot 1.0 by rounding


@dataclass(frozen=True)
class LabelScores:
    precision: float
    recall: float
    f1: float
    support: int  # reference items with this label


@dataclass(frozen=True)
class ClassificationReport:
    labels: tuple[str, ...]
    confusion: tuple[tuple[int, ...], ...]  # [reference index][predicted index]
    per_label: dict[str, LabelScores]
    count: int
    accuracy: float | None
    macro_f1: float | None

    def to_dict(self) -> dict:
        return {"count": self.count, "accuracy": self.accuracy, "macro_f1": self.macro_f1,
                "labels": list(self.labels),
                "confusion": [list(row) for row in self.confusion],
                "per_label": {k: asdict(v) for k, v in self.per_label.items()}}


def classification_report(references: Sequence[str], predictions: Sequence[str],
                          label_order: Sequence[str] = ()) -> ClassificationReport:
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    seen = set(references) | set(predictions)
    labels = tuple([x for x in dict.fromkeys(label_order) if x in seen]
                   + sorted(seen - set(label_order)))
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for ref, pred in zip(references, predictions):
        matrix[index[ref]][index[pred]] += 1
    per_label = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        support = sum(matrix[i])
        predicted = sum(row[i] for row in matrix)
        fp, fn = predicted - tp, support - tp
        per_label[label] = LabelScores(precision=tp / predicted if predicted else 0.0,
                                       recall=tp / support if support else 0.0,
                                       f1=2 * tp / (2 * tp + fp + fn), support=support)
    count = len(references)
    correct = sum(matrix[i][i] for i in range(len(labels)))
    return ClassificationReport(
        labels=labels, confusion=tuple(tuple(row) for row in matrix), per_label=per_label,
        count=count, accuracy=correct / count if count else None,
        macro_f1=sum(s.f1 for s in per_label.values()) / len(labels) if labels else None)


@dataclass(frozen=True)
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    mean_confidence: float | None
    accuracy: float | None


@dataclass(frozen=True)
class Calibration:
    ece: float | None
    count: int
    bins: tuple[ReliabilityBin, ...]

    def to_dict(self) -> dict:
        return {"ece": self.ece, "count": self.count, "n_bins": len(self.bins),
                "bins": [asdict(b) for b in self.bins]}


def calibration(confidences: Sequence[float], correct: Sequence[bool],
                n_bins: int = 10) -> Calibration:
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} outcomes")
    members: list[list[tuple[float, bool]]] = [[] for _ in range(n_bins)]
    for conf, ok in zip(confidences, correct):
        if math.isnan(conf) or not -SCORE_TOLERANCE <= conf <= 1 + SCORE_TOLERANCE:
            raise ValueError(f"confidence {conf} is not a probability in [0, 1]")
        conf = min(max(float(conf), 0.0), 1.0)
        members[min(int(conf * n_bins), n_bins - 1)].append((conf, bool(ok)))
    total = len(confidences)
    bins, ece = [], 0.0
    for k, items in enumerate(members):
        mean_conf = sum(c for c, _ in items) / len(items) if items else None
        accuracy = sum(ok for _, ok in items) / len(items) if items else None
        if items:
            ece += len(items) / total * abs(accuracy - mean_conf)
        bins.append(ReliabilityBin(lower=k / n_bins, upper=(k + 1) / n_bins, count=len(items),
                                   mean_confidence=mean_conf, accuracy=accuracy))
    return Calibration(ece=ece if total else None, count=total, bins=tuple(bins))
