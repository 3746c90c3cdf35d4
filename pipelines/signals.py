"""The per-segment quality signals as the output's readers use them: which column holds each.

A labelled output (schema version 3) carries, per segment, how far to trust its transcript and
how much of it is speech; `files/` carries their duration-weighted aggregates under the same
names. The readers (`pipelines.training_data`'s filters, `pipelines.evaluation`'s signals
section) name the columns through this one mapping, made from the tasks' own definition
(`kimi_ops.tasks.base`: `GenerativeTask.signals`, `SPEECH_RATIO`):

  avg_logprob        mean log-probability of the transcript's generated tokens, EOS included
                     (<= 0; nearer 0: surer)
  min_logprob        the lowest of them (<= avg_logprob)
  compression_ratio  gzip ratio of the cleaned transcript (> 0; high: repetition)
  speech_ratio       share of the segment that VAD calls speech, in [0, 1] (the energy
                     segmenter: 1.0 or 0.0)
"""

from __future__ import annotations

from kimi_ops.tasks.base import SIGNAL_SUFFIXES, SPEECH_RATIO, GenerativeTask


def _transcript_columns() -> dict[str, str]:
    """The asr task's signal columns, named as the task names them (`GenerativeTask.signals`,
    after its first text field: `transcript_avg_logprob`, ...)."""
    from kimi_ops.tasks import get_task

    asr: GenerativeTask = get_task("asr")
    return {suffix.lstrip("_"): column for suffix, column in zip(SIGNAL_SUFFIXES, asr.signals)}


# signal -> its column in `segments/` (and, aggregated, in `files/`)
SIGNAL_COLUMNS: dict[str, str] = {**_transcript_columns(), "speech_ratio": SPEECH_RATIO}
