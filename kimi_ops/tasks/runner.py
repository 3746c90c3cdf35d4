"""Label audio with several tasks at once: one front-end pass per segment, one engine pass per kind.

Per call: every source is decoded (a source that cannot be used becomes a row with `error` and
`error_kind`, the others go on); each waveform is cut into <= 30 s segments (fixed cuts for now;
the pipeline brings low-energy segmentation); all segments of all sources go through the audio
front-end once, and the resulting encodings are reused by every task's prompt. Generative tasks
run through `generate_batch` together (grouped only by their sampling settings), closed-set tasks
through `score_options` together. Per file, text fields are joined in segment order, flags are
OR-ed and closed-set probabilities are averaged over segments weighted by duration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kimi_ops.audio import CHUNK_SAMPLES, SAMPLE_RATE, load_audio, split_chunks
from kimi_ops.errors import KimiError
from kimi_ops.tasks.base import ChoiceTask, GenerativeTask, Task


def label_waveforms(engine, waves: Sequence[np.ndarray], tasks: Sequence[Task],
                    max_new_tokens: int = -1, segment_samples: int = CHUNK_SAMPLES
                    ) -> list[dict[str, Any]]:
    """Label 16 kHz mono waveforms; one dict of task fields per waveform, in order."""
    segments, owners, weights = [], [], []
    for w, wave in enumerate(waves):
        for piece in split_chunks(wave, segment_samples):
            segments.append(piece)
            owners.append(w)
            weights.append(len(piece))
    encodings = engine.frontend.encode(segments) if segments else []
    per_segment: list[dict[str, Any]] = [{} for _ in segments]

    generative = [t for t in tasks if isinstance(t, GenerativeTask)]
    groups: dict[tuple, list[GenerativeTask]] = {}
    for task in generative:
        groups.setdefault(tuple(sorted(task.sampling.items())), []).append(task)
    for sampling, group in groups.items():
        jobs = [(s, t) for s in range(len(segments)) for t in group]
        results = engine.generate_batch([t.messages(encodings[s]) for s, t in jobs],
                                        max_new_tokens=max_new_tokens, **dict(sampling))
        for (s, task), res in zip(jobs, results):
            per_segment[s].update(task.parse(res.text, res))

    for style in ("letter", "label"):  # a label answer must also end the reply (EOS appended)
        choice = [t for t in tasks if isinstance(t, ChoiceTask) and t.answer_style == style]
        jobs = [(s, t) for s in range(len(segments)) for t in choice]
        if not jobs:
            continue
        scores = engine.score_options([t.messages(encodings[s]) for s, t in jobs],
                                      [t.answers() for _, t in jobs],
                                      append_eos=style == "label")
        for (s, task), sc in zip(jobs, scores):
            per_segment[s].update(task.fields_from_probs(sc.probs))

    rows: list[dict[str, Any]] = [{} for _ in waves]
    for w in range(len(waves)):
        mine = [s for s in range(len(segments)) if owners[s] == w]
        rows[w] = merge_segments([per_segment[s] for s in mine], [weights[s] for s in mine], tasks)
        rows[w]["num_segments"] = len(mine)
    return rows


def merge_segments(parts: list[dict[str, Any]], weights: list[int], tasks: Sequence[Task]
                   ) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    total = float(sum(weights)) or 1.0
    for task in tasks:
        if isinstance(task, ChoiceTask):
            key = f"{task.name}_scores"
            avg = {label: sum(p[key][label] * w for p, w in zip(parts, weights)) / total
                   for label in task.labels} if parts else {}
            merged[key] = avg
            merged[task.name] = max(avg, key=avg.get) if avg else None
            continue
        for field in task.fields:
            values = [p[field] for p in parts if field in p]
            if values and isinstance(values[0], bool):
                merged[field] = any(values)
            else:
                merged[field] = " ".join(v for v in values if v)
    return merged


def label_files(engine, sources: Sequence[Any], tasks: Sequence[Task],
                max_new_tokens: int = -1) -> list[dict[str, Any]]:
    """One row per source, in order: `path`, `duration_s`, the tasks' fields, `task_versions`;
    or `path`, `error`, `error_kind` for a source that cannot be decoded."""
    rows: list[dict[str, Any]] = []
    waves, index = [], []
    for i, src in enumerate(sources):
        rows.append({"path": str(src)})
        try:
            waves.append(load_audio(src))
        except KimiError as exc:
            rows[i].update(error=str(exc), error_kind=exc.kind)
            continue
        index.append(i)
    versions = {t.name: t.version for t in tasks}
    for i, wave, fields in zip(index, waves, label_waveforms(engine, waves, tasks,
                                                             max_new_tokens)):
        rows[i]["duration_s"] = round(len(wave) / SAMPLE_RATE, 3)
        rows[i].update(fields)
        rows[i]["task_versions"] = versions
    return rows
