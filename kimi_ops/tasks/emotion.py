"""emotion: speech emotion, the 7 MELD labels, asked in the evaluation's option format."""

from __future__ import annotations

from kimi_ops.tasks.base import ChoiceTask

VERSION = "emotion-1"
QUESTION = "Identify the predominant emotion in this speech."
LABELS = ("neutral", "joy", "sadness", "anger", "surprise", "fear", "disgust")


def make() -> ChoiceTask:
    return ChoiceTask(name="emotion", version=VERSION, question=QUESTION, labels=LABELS)
