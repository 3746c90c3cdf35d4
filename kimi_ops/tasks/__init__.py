"""The label-task registry: a plain dict from task name to a factory that builds the task.

    get_task("asr", language="en"); get_task("scene:tut2017"); get_task("question", question=...)

A spec `name:variant` passes the variant as the factory's first argument (a label set, a
language). Users add their own task without editing ours:

    register_task("speaker_gender", lambda: ChoiceTask(name="speaker_gender", version="1",
                  question="What is the speaker's gender?", labels=("female", "male")))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from kimi_ops.tasks import asr, caption, emotion, question, scene, sound_event
from kimi_ops.tasks.base import ChoiceTask, GenerativeTask, Task

__all__ = ["TASKS", "ChoiceTask", "GenerativeTask", "Task", "get_task", "register_task",
           "task_parameters"]

TASKS: dict[str, Callable[..., Task]] = {
    "asr": asr.make,
    "caption": caption.make,
    "emotion": emotion.make,
    "scene": scene.make,
    "sound_event": sound_event.make,
    "question": question.make,
}


def register_task(name: str, factory: Callable[..., Task], replace: bool = False) -> None:
    if not replace and name in TASKS:
        raise ValueError(f"task {name!r} is already registered (pass replace=True to override)")
    TASKS[name] = factory


def task_parameters(name: str) -> frozenset[str]:
    """The keyword parameters task `name`'s factory takes (`language` for asr, ...)."""
    factory = TASKS[name]
    return frozenset(p.name for p in inspect.signature(factory).parameters.values()
                     if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def get_task(spec: str, **params: Any) -> Task:
    """Build a task from `name[:variant]`; keyword params the factory does not take are ignored
    (so one set of CLI options can serve every task)."""
    name, _, variant = spec.partition(":")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    factory = TASKS[name]
    accepted = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in params.items() if k in accepted and v is not None}
    args = [variant] if variant else []
    if args and not accepted:
        raise ValueError(f"task {name!r} has no variants (got {spec!r})")
    task = factory(*args, **kwargs)
    if task.name != name:
        raise ValueError(f"task factory {name!r} built a task named {task.name!r}")
    return task
