"""Label audio with several tasks at once: one front-end pass per segment, one engine pass per kind.

Per call: every source is decoded (a source that cannot be used becomes a row with `error` and
`error_kind`, the others go on); each waveform is cut into <= 30 s segments (by voice activity
by default, `kimi_ops.audio.segmenters.cut`); all segments of all sources go through the audio
front-end once, and the resulting encodings are reused by every task's prompt. Generative tasks
run through `generate_batch` together (grouped only by their sampling settings), closed-set tasks
through `score_options` together. Per file, text fields are joined in segment order, flags are
OR-ed, closed-set probabilities and the quality signals' means are averaged over segments
weighted by duration (`kimi_ops.tasks.base.merge_segments`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from kimi_ops.audio import SAMPLE_RATE, load_audio
from kimi_ops.audio.segment import Segment
from kimi_ops.audio.segmenters import DEFAULT_SEGMENTER, cut
from kimi_ops.errors import KimiError
from kimi_ops.frontend import AudioEncoding
from kimi_ops.tasks.base import SPEECH_RATIO, ChoiceTask, GenerativeTask, Task, merge_segments


def label_segments(engine, encodings: Sequence[AudioEncoding], tasks: Sequence[Task],
                   max_new_tokens: int = -1, silent: Sequence[bool] | None = None
                   ) -> list[dict[str, Any]]:
    """Task fields for each segment's front-end output, in order. Generative tasks run through
    one `generate_batch` per sampling setting, closed-set tasks through `score_options`; a task
    with `skip_silent` gets empty fields on segments marked silent instead of a model call."""
    silent = list(silent) if silent is not None else [False] * len(encodings)
    per_segment: list[dict[str, Any]] = [{} for _ in encodings]
    groups: dict[tuple, list[GenerativeTask]] = {}
    for task in tasks:
        if isinstance(task, GenerativeTask):
            groups.setdefault(tuple(sorted(task.sampling.items())), []).append(task)
    for sampling, group in groups.items():
        jobs = []
        for s in range(len(encodings)):
            for task in group:
                if silent[s] and task.skip_silent:
                    per_segment[s].update(task.empty_fields())
                else:
                    jobs.append((s, task))
        if not jobs:
            continue
        results = engine.generate_batch([t.messages(encodings[s]) for s, t in jobs],
                                        max_new_tokens=max_new_tokens, **dict(sampling))
        for (s, task), res in zip(jobs, results):
            per_segment[s].update(task.segment_fields(res))
            per_segment[s].setdefault("finish_reason", {})[task.name] = res.finish_reason

    for style in ("letter", "label"):  # a label answer must also end the reply (EOS appended)
        choice = [t for t in tasks if isinstance(t, ChoiceTask) and t.answer_style == style]
        jobs = [(s, t) for s in range(len(encodings)) for t in choice]
        if not jobs:
            continue
        scores = engine.score_options([t.messages(encodings[s]) for s, t in jobs],
                                      [t.answers() for _, t in jobs],
                                      append_eos=style == "label")
        for (s, task), sc in zip(jobs, scores):
            per_segment[s].update(task.fields_from_probs(sc.probs))
    return per_segment


def label_waveforms(engine, waves: Sequence[np.ndarray], tasks: Sequence[Task],
                    max_new_tokens: int = -1, max_segment_seconds: float = 30.0,
                    segmenter: str = DEFAULT_SEGMENTER) -> list[dict[str, Any]]:
    """Label 16 kHz mono waveforms; one dict of task fields per waveform, in order. Each is
    cut into segments by `segmenter` (`kimi_ops.audio.segmenters.cut`)."""
    segments: list[Segment] = []
    pieces, owners = [], []
    for w, wave in enumerate(waves):
        for seg in cut(wave, segmenter, SAMPLE_RATE, max_segment_seconds):
            segments.append(seg)
            pieces.append(seg.slice(wave))
            owners.append(w)
    encodings = engine.frontend.encode(pieces) if pieces else []
    per_segment = label_segments(engine, encodings, tasks, max_new_tokens,
                                 silent=[s.silent for s in segments])
    rows = []
    for w in range(len(waves)):
        mine = [i for i in range(len(segments)) if owners[i] == w]
        parts = [{**per_segment[i], SPEECH_RATIO: segments[i].speech_ratio} for i in mine]
        row = merge_segments(parts, [segments[i].num_samples for i in mine], tasks)
        row["num_segments"] = len(mine)
        rows.append(row)
    return rows


def label_files(engine, sources: Sequence[Any], tasks: Sequence[Task | str],
                max_new_tokens: int = -1, segmenter: str = DEFAULT_SEGMENTER,
                **task_params: Any) -> list[dict[str, Any]]:
    """Label audio files with tasks in one call; one row (a plain dict) per source, in order.

        from kimi_ops import KimiAudio, label_files
        engine = KimiAudio(model_path="moonshotai/Kimi-Audio-7B-Instruct", load_detokenizer=False)
        rows = label_files(engine, ["a.wav", "b.flac"], ["asr", "emotion"], language="en")

    `sources`: what `kimi_ops.audio.load_audio` takes: paths (any container libsndfile reads:
    wav, flac, ogg/opus, mp3, aiff, ...), encoded bytes, or `(waveform, sample_rate)` tuples.
    `tasks`: task objects (`kimi_ops.tasks.get_task`, or your own `ChoiceTask` /
    `GenerativeTask`) or task specs such as "asr", "scene:tut2017", "question"; a spec is
    built with `task_params` (`language` for asr, `question` for question), which a task's
    factory ignores when it does not take them. `max_new_tokens` bounds each generated text
    (-1: the model's context). `segmenter`: "vad" (speech regions; the rest is silent and
    not sent to tasks that skip silence) or "energy" (cut at quiet points).

    A row holds `path` (the source as given when it is a path, else None), then either
    `duration_s` (seconds of audio), `num_segments` (the <= 30 s segments it was cut into), every task's fields and `task_versions` (task -> version); or, for a source that
    cannot be decoded, `error` (the message) and `error_kind` (a stable kind, e.g.
    `undecodable`, `not_found`, `empty_audio`). A task's fields over a file: text fields (e.g.
    `transcript`) joined over its segments, flags (e.g. `transcript_truncated`) or-ed, a
    closed-set task's `<task>` (the best label) and `<task>_scores` (label -> probability, in
    the label set's order) averaged over the segments by duration. A generative task's
    quality signals over the file (`kimi_ops.tasks.base`; asr: `transcript_avg_logprob` and
    `transcript_compression_ratio`, averaged over the segments with a value by duration,
    `transcript_min_logprob`, their minimum; None when no segment went to the model).
    """
    from kimi_ops.tasks import get_task

    tasks = [get_task(t, **task_params) if isinstance(t, str) else t for t in tasks]
    rows: list[dict[str, Any]] = []
    waves, index = [], []
    for i, src in enumerate(sources):
        rows.append({"path": os.fspath(src) if isinstance(src, (str, os.PathLike)) else None})
        try:
            waves.append(load_audio(src))
        except KimiError as exc:
            rows[i].update(error=str(exc), error_kind=exc.kind)
            continue
        index.append(i)
    versions = {t.name: t.version for t in tasks}
    for i, wave, fields in zip(index, waves, label_waveforms(engine, waves, tasks,
                                                             max_new_tokens,
                                                             segmenter=segmenter)):
        rows[i]["duration_s"] = round(len(wave) / SAMPLE_RATE, 3)
        rows[i].update(fields)
        rows[i]["task_versions"] = versions
    return rows
