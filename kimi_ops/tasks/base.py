"""What a label task is: a prompt, a way to read the model's answer, and the fields it writes.

Two kinds:
* `GenerativeTask`: the model writes free text (transcript, caption, answer); `parse` turns the
  text and its generation result into output fields, never raising.
* `ChoiceTask`: a closed label set; every option's continuation is scored by log-likelihood after
  the prompt and the fields are the argmax label and a probability per label (softmax over the
  options' total log-probs), so there is nothing to parse and nothing can fail to parse.

Every task has a `name` and a `version` written to every output row; bump the version whenever
the prompt, the label set or the parser changes what a row would hold.

Quality signals. A generative task's segments also carry three numbers named after its first
text field (asr: `transcript_avg_logprob`, `transcript_min_logprob`,
`transcript_compression_ratio`; `GenerativeTask.signals`): the mean and the minimum of the
generated text tokens' log-probabilities as sampled, the text EOS included
(`GenerationResult.text_logprobs`), and the compression ratio of the cleaned text
(`compression_ratio`, Whisper's repetition signal). A segment without a model call has none
(null). Over a file (`merge_segments`), the means are weighted by the segments' durations and
the minimum is the segments' minimum, over the segments that have a value; so is the share of
speech (`SPEECH_RATIO`, the segmenter's `speech_ratio` of each segment, when the parts carry it).
"""

from __future__ import annotations

import string
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

AVG_LOGPROB, MIN_LOGPROB, COMPRESSION_RATIO = "_avg_logprob", "_min_logprob", "_compression_ratio"
SIGNAL_SUFFIXES = (AVG_LOGPROB, MIN_LOGPROB, COMPRESSION_RATIO)  # after a task's first text field
SPEECH_RATIO = "speech_ratio"  # a segment's share of speech; a file's, weighted by duration
OPTION_TAIL = ".Answer with the option's letter from the given choices directly and only give the best option."


def user_turn(instruction: str, audio: Any) -> list[dict]:
    """The evaluation's message order: instruction text, then the audio (one user turn)."""
    return [{"role": "user", "message_type": "text", "content": instruction},
            {"role": "user", "message_type": "audio", "content": audio}]


def compression_ratio(text: str) -> float | None:
    """The text's UTF-8 bytes over their zlib-compressed bytes, as Whisper computes it: about 1-2.5
    for ordinary text, higher for a text that repeats itself (Whisper takes > 2.4 for a loop).
    None for an empty text."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else None


def weighted_mean(values: Sequence[float | None], weights: Sequence[float]) -> float | None:
    """The mean of the values that are not None, weighted (equally when their weights sum to 0);
    None when every value is None."""
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None]
    if not pairs:
        return None
    total = sum(w for _, w in pairs)
    if total <= 0:
        return sum(v for v, _ in pairs) / len(pairs)
    return sum(v * w for v, w in pairs) / total


def minimum(values: Iterable[float | None]) -> float | None:
    """The least value that is not None; None when there is none."""
    return min((v for v in values if v is not None), default=None)


@dataclass(frozen=True)
class GenerativeTask:
    name: str
    version: str
    instruction: str
    parse: Callable[[str, Any], dict[str, Any]]  # (text, GenerationResult) -> fields
    text_fields: tuple[str, ...]  # string outputs, joined in order across a file's segments
    flags: tuple[str, ...] = ()  # boolean outputs, OR-ed across segments
    sampling: dict[str, Any] = field(default_factory=dict)  # KimiAudio.generate_batch kwargs
    skip_silent: bool = False  # segments marked silent get empty fields, no model call

    kind = "generate"

    def empty_fields(self) -> dict[str, Any]:
        """A segment's fields without a model call: empty text, no flag, no signal."""
        return {**{f: "" for f in self.text_fields}, **{f: False for f in self.flags},
                **{f: None for f in self.signals}}

    @property
    def fields(self) -> tuple[str, ...]:
        return self.text_fields + self.flags + self.signals

    @property
    def signals(self) -> tuple[str, str, str]:
        """The quality signals' names: the first text field + `_avg_logprob`, `_min_logprob`,
        `_compression_ratio` (module docstring)."""
        return tuple(self.text_fields[0] + suffix for suffix in SIGNAL_SUFFIXES)

    def segment_fields(self, result: Any) -> dict[str, Any]:
        """A segment's fields from its `GenerationResult`: the parsed ones and the signals."""
        fields = self.parse(result.text, result)
        logprobs = list(getattr(result, "text_logprobs", None) or [])
        avg, low, ratio = self.signals
        return {**fields, avg: sum(logprobs) / len(logprobs) if logprobs else None,
                low: minimum(logprobs), ratio: compression_ratio(fields[self.text_fields[0]])}

    def messages(self, audio: Any) -> list[dict]:
        return user_turn(self.instruction, audio)


@dataclass(frozen=True)
class ChoiceTask:
    """`labels` are the output values; `display` (default: the labels) is how each option is
    written in the prompt. The scored continuation of option k is `answer(k)`: by default its
    letter, as the evaluation's instruction asks ("Answer with the option's letter")."""

    name: str
    version: str
    question: str
    labels: tuple[str, ...]
    display: tuple[str, ...] | None = None
    answer_style: str = "letter"  # "letter" | "label" (label text followed by the text EOS)

    kind = "choice"

    def __post_init__(self):
        if len(self.labels) < 2:
            raise ValueError(f"task {self.name}: a closed set needs at least two labels")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"task {self.name}: labels must be distinct")
        if len(self.labels) > len(string.ascii_uppercase):
            raise ValueError(f"task {self.name}: at most 26 options")
        if self.display is not None and len(self.display) != len(self.labels):
            raise ValueError(f"task {self.name}: one display text per label")
        if self.answer_style not in ("letter", "label"):
            raise ValueError(f"task {self.name}: answer_style must be 'letter' or 'label'")

    @property
    def fields(self) -> tuple[str, ...]:
        return (self.name, f"{self.name}_scores")

    @property
    def prompt_text(self) -> str:
        shown = self.display or self.labels
        options = "\n".join(f"({string.ascii_uppercase[i]}) {text}" for i, text in enumerate(shown))
        return f"{self.question}\nOptions:\n{options}\n{OPTION_TAIL}"

    def messages(self, audio: Any) -> list[dict]:
        return user_turn(self.prompt_text, audio)

    def answers(self) -> list[str]:
        """The continuation text of each option (the EOS is added for the "label" style)."""
        if self.answer_style == "letter":
            return [string.ascii_uppercase[i] for i in range(len(self.labels))]
        return list(self.display or self.labels)

    def fields_from_probs(self, probs: Sequence[float]) -> dict[str, Any]:
        best = max(range(len(probs)), key=lambda i: probs[i])
        return {self.name: self.labels[best],
                f"{self.name}_scores": {label: float(p) for label, p in zip(self.labels, probs)}}


Task = GenerativeTask | ChoiceTask


def merge_segments(parts: list[dict[str, Any]], weights: Sequence[float], tasks: Sequence[Task]
                   ) -> dict[str, Any]:
    """One file's fields from its segments' (`parts`): choice scores averaged with `weights`
    (the segments' lengths) and the best label, text fields joined, flags or-ed, the quality
    signals and `SPEECH_RATIO` aggregated (module docstring). The one place a file's fields
    are made from its segments: the labelling API, the job's label stage and its driver, which
    stitches a long file's pieces, all call it; torch-free, so the driver does not load the
    model's stack."""
    speech = [None if p.get("status") == "error" else p.get(SPEECH_RATIO) for p in parts]
    merged: dict[str, Any] = {SPEECH_RATIO: weighted_mean(speech, weights)}
    total = float(sum(weights)) or 1.0
    for task in tasks:
        if isinstance(task, ChoiceTask):
            key = f"{task.name}_scores"
            avg = {label: sum(p[key][label] * w for p, w in zip(parts, weights)) / total
                   for label in task.labels} if parts else {}
            merged[key] = avg
            merged[task.name] = max(avg, key=avg.get) if avg else None
            continue
        for name in task.text_fields:
            merged[name] = " ".join(p[name] for p in parts if p.get(name))
        for flag in task.flags:
            merged[flag] = any(p.get(flag, False) for p in parts)
        avg, low, ratio = task.signals
        merged[avg] = weighted_mean([p.get(avg) for p in parts], weights)
        merged[low] = minimum(p.get(low) for p in parts)
        merged[ratio] = weighted_mean([p.get(ratio) for p in parts], weights)
    return merged
