"""The per-segment quality signals as the output's readers use them: which column holds each.

A labelled output (schema version 3) carries, per segment, how far to trust its transcript and
how much of it is speech; `files/` carries their duration-weighted aggregates under the same
names. The readers (`pipelines.training_data`'s filters, `pipelines.evaluation`'s signals
section) name the columns through this one mapping and nowhere else:

  avg_logprob        mean log-probability of the transcript's generated tokens, EOS included
                     (<= 0; nearer 0: surer)
  min_logprob        the lowest of them (<= avg_logprob)
  compression_ratio  gzip ratio of the cleaned transcript (> 0; high: repetition)
  speech_ratio       share of the segment that VAD calls speech, in [0, 1] (the energy
                     segmenter: 1.0 or 0.0)
"""

from __future__ import annotations

# signal -> its column in `segments/` (and, aggregated, in `files/`)
SIGNAL_COLUMNS: dict[str, str] = {
    "avg_logprob": "transcript_avg_logprob",
    "min_logprob": "transcript_min_logprob",
    "compression_ratio": "transcript_compression_ratio",
    "speech_ratio": "speech_ratio",
}
