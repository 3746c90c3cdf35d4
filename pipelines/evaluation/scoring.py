"""Metrics of one output's outcomes, and two outputs compared item by item.

Coverage counts every reference row by its outcome (`pipelines.evaluation.outputs`). Per task, a
scored row whose value is null (the task did not run for it) is `unlabelled`. Only scored,
labelled rows enter the metrics: word or character error rates per language for `transcript`
(`kimi_ops.evaluation`), accuracy, macro-F1, the confusion matrix and calibration for a closed
set.

A closed-set reference label outside the output's label set (the keys of its `<task>_scores`),
say `happy` where the task says `joy`, could never be predicted: such rows are left out of that
task's metrics, whatever their coverage, and reported as the task's `excluded` count with
`unknown_reference_labels` ({label as written: rows}) and the task's `known_labels`. Without
scores in the output the label set is unknown and every label counts.

Comparison (`compare`): both outputs are scored against the same references; each summary
metric gets `delta = output - compare`, and every reference item whose outcome differs is
listed: another closed-set label, another normalised transcript, or another coverage state.
The tasks scored are those of the input; a task the compared output lacks is scored for the
input alone and listed in the comparison's `unavailable_tasks` (its metrics have no compare
value or delta, and its items are not compared).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from kimi_ops.evaluation import (LANGUAGES, ErrorCounts, align, calibration,
                                 classification_report, tokens)
from pipelines.evaluation.outputs import ERRORED, MISSING, SCORED, Outcome, Outcomes
from pipelines.evaluation.references import ASR_COLUMN, Reference

EXAMPLES = 20  # URIs listed per coverage state in the report


def coverage(refs: Sequence[Reference], outcomes: Outcomes) -> dict[str, Any]:
    """How many reference items are scored, missing or errored (errors by kind), with
    examples of the last two."""
    states = Counter(outcomes[r.key].state for r in refs)
    kinds = Counter(outcomes[r.key].error_kind or "unknown" for r in refs
                    if outcomes[r.key].state == ERRORED)

    def examples(state):
        return [{"source_uri": r.source_uri, "segment_index": r.segment_index,
                 **({"error_kind": outcomes[r.key].error_kind} if state == ERRORED else {})}
                for r in refs if outcomes[r.key].state == state][:EXAMPLES]

    return {"references": len(refs), SCORED: states[SCORED], MISSING: states[MISSING],
            ERRORED: states[ERRORED], "errors_by_kind": dict(sorted(kinds.items())),
            "missing_examples": examples(MISSING), "errored_examples": examples(ERRORED)}


def _scored_values(task: str, refs: Sequence[Reference], outcomes: Outcomes,
                   counts: Counter, skip=lambda ref: False):
    """(reference, outcome, value) of each scored, labelled item of `task`; counts the task's
    `references` and `unlabelled` items, and `scored` ones, on the way. `skip(ref)` leaves a
    reference out of the metrics after it is counted as a reference."""
    for ref in refs:
        if task not in ref.values:
            continue
        counts["references"] += 1
        if skip(ref):
            continue
        outcome = outcomes[ref.key]
        if outcome.state != SCORED:
            continue
        value = outcome.values.get(task)
        if value is None:
            counts["unlabelled"] += 1
            continue
        counts["scored"] += 1
        yield ref, outcome, value


def _asr_report(refs: Sequence[Reference], outcomes: Outcomes) -> dict[str, Any]:
    rows, totals = [], {lang: ErrorCounts() for lang in LANGUAGES}
    utterances, counts = Counter(), Counter()
    for ref, outcome, hypothesis in _scored_values(ASR_COLUMN, refs, outcomes, counts):
        ref_tokens = tokens(ref.values[ASR_COLUMN], ref.language)
        hyp_tokens = tokens(hypothesis, ref.language)
        errors = align(ref_tokens, hyp_tokens)
        totals[ref.language] += errors
        utterances[ref.language] += 1
        joiner = "" if ref.language == "zh" else " "
        rows.append({"source_uri": ref.source_uri, "segment_index": ref.segment_index,
                     "language": ref.language, "metric": LANGUAGES[ref.language],
                     **errors.to_dict(), "reference": joiner.join(ref_tokens),
                     "hypothesis": joiner.join(hyp_tokens), "signals": outcome.signals})
    by_language = {lang: {"metric": LANGUAGES[lang], "utterances": utterances[lang],
                          **totals[lang].to_dict()}
                   for lang in LANGUAGES if utterances[lang]}
    return {"kind": "asr", "references": counts["references"], "scored": counts["scored"],
            "unlabelled": counts["unlabelled"], "by_language": by_language, "rows": rows}


def _closed_set_report(task: str, refs: Sequence[Reference], outcomes: Outcomes,
                       label_order: Sequence[str], n_bins: int) -> dict[str, Any]:
    canonical = {label.casefold(): label for label in label_order}
    counts, unknown = Counter(), Counter()

    def unpredictable(ref: Reference) -> bool:  # it would only lower the scores
        if canonical and ref.values[task].casefold() not in canonical:
            unknown[ref.values[task]] += 1
            return True
        return False

    rows = []
    for ref, outcome, predicted in _scored_values(task, refs, outcomes, counts, unpredictable):
        reference = canonical.get(ref.values[task].casefold(), ref.values[task])
        rows.append({"source_uri": ref.source_uri, "segment_index": ref.segment_index,
                     "reference": reference, "predicted": predicted,
                     "confidence": outcome.confidence.get(task),
                     "correct": reference == predicted})
    report = classification_report([r["reference"] for r in rows],
                                   [r["predicted"] for r in rows], label_order)
    with_conf = [r for r in rows if r["confidence"] is not None]
    cal = calibration([r["confidence"] for r in with_conf], [r["correct"] for r in with_conf],
                      n_bins) if with_conf else None
    return {"kind": "closed_set", "references": counts["references"], "scored": counts["scored"],
            "unlabelled": counts["unlabelled"], "excluded": sum(unknown.values()),
            **report.to_dict(), "calibration": cal.to_dict() if cal else None,
            "calibration_items": len(with_conf), "known_labels": list(label_order),
            "unknown_reference_labels": dict(sorted(unknown.items())), "rows": rows}


def score(refs: Sequence[Reference], tasks: Sequence[str], outcomes: Outcomes,
          label_order: Mapping[str, Sequence[str]], n_bins: int = 10) -> dict[str, Any]:
    """Coverage and per-task metrics of one output's outcomes."""
    results = {task: (_asr_report(refs, outcomes) if task == ASR_COLUMN
                      else _closed_set_report(task, refs, outcomes, label_order.get(task, []),
                                              n_bins))
               for task in tasks}
    return {"coverage": coverage(refs, outcomes), "tasks": results}


def summary_metrics(scored: Mapping[str, Any]) -> dict[str, float | int | None]:
    """The headline numbers of one output's scores, flat: what a comparison takes deltas of."""
    cov = scored["coverage"]
    flat: dict[str, float | int | None] = {f"coverage.{k}": cov[k]
                                           for k in (SCORED, MISSING, ERRORED)}
    for task, rep in scored["tasks"].items():
        if rep["kind"] == "asr":
            for lang, agg in rep["by_language"].items():
                prefix = f"asr.{agg['metric']}.{lang}"
                flat[prefix] = agg["rate"]
                for k in ("substitutions", "deletions", "insertions", "reference_length"):
                    flat[f"{prefix}.{k}"] = agg[k]
        else:
            flat[f"{task}.accuracy"] = rep["accuracy"]
            flat[f"{task}.macro_f1"] = rep["macro_f1"]
            flat[f"{task}.ece"] = rep["calibration"]["ece"] if rep["calibration"] else None
    return flat


# -- comparison ------------------------------------------------------------------------------

def _hypothesis(ref: Reference, task: str, outcome: Outcome) -> Any:
    """What a comparison compares: the label, the normalised transcript, or the state."""
    if outcome.state != SCORED:
        return f"<{outcome.state}{': ' + outcome.error_kind if outcome.error_kind else ''}>"
    value = outcome.values.get(task)
    if value is None:
        return "<unlabelled>"
    if task == ASR_COLUMN:
        return ("" if ref.language == "zh" else " ").join(tokens(value, ref.language))
    return value


def _deltas(metrics: Mapping[str, Any], other_metrics: Mapping[str, Any]) -> list[dict]:
    deltas = []
    for name in dict.fromkeys([*metrics, *other_metrics]):
        a, b = metrics.get(name), other_metrics.get(name)
        deltas.append({"metric": name, "output": a, "compare": b,
                       "delta": a - b if a is not None and b is not None else None})
    return deltas


def compare_outcomes(refs: Sequence[Reference], tasks: Sequence[str], outcomes: Outcomes,
                     other_outcomes: Outcomes, metrics: Mapping[str, Any],
                     other_metrics: Mapping[str, Any], other_uri: str) -> dict[str, Any]:
    """Each metric's delta (output - compare) and every reference item of `tasks` whose
    outcome differs between the two outputs."""
    changed, per_task = [], Counter()
    for ref in refs:
        for task in tasks:
            if task not in ref.values:
                continue
            mine = _hypothesis(ref, task, outcomes[ref.key])
            theirs = _hypothesis(ref, task, other_outcomes[ref.key])
            if mine != theirs:
                per_task[task] += 1
                changed.append({"source_uri": ref.source_uri, "segment_index": ref.segment_index,
                                "task": task, "output": mine, "compare": theirs})
    return {"compare": other_uri, "deltas": _deltas(metrics, other_metrics),
            "changed_by_task": {t: per_task[t] for t in tasks},
            "changed_files": sorted({c["source_uri"] for c in changed}), "changed": changed}
