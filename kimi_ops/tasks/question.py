"""question: the answer to a user-supplied question about the audio (audio QA), free text."""

from __future__ import annotations

from typing import Any

from kimi_ops.tasks.base import GenerativeTask
from kimi_ops.tasks.text_cleanup import clean_text

VERSION = "question-1"


def parse(text: str, result: Any) -> dict[str, Any]:
    return {"answer": clean_text(text)}


def make(question: str | None = None) -> GenerativeTask:
    if not question or not question.strip():
        raise ValueError("question: the task needs the question text (--question)")
    return GenerativeTask(name="question", version=VERSION, instruction=question.strip(),
                          parse=parse, text_fields=("answer",))
