"""sound_event: non-speech vocal/sound events, VocalSound's 6 (default) or Nonspeech7k's 7."""

from __future__ import annotations

from kimi_ops.tasks.base import ChoiceTask

QUESTION = "Identify the human vocal sound in the audio."  # the evaluation uses it for both sets
LABEL_SETS = {
    "vocalsound": ("Laughter", "Sigh", "Cough", "Throat clearing", "Sneeze", "Sniff"),
    "nonspeech7k": ("Breath", "Cough", "Cry", "Laugh", "Scream", "Sneeze", "Yawn"),
}


def make(label_set: str = "vocalsound") -> ChoiceTask:
    if label_set not in LABEL_SETS:
        raise ValueError(f"sound_event: label set must be one of {sorted(LABEL_SETS)}")
    return ChoiceTask(name="sound_event", version=f"sound_event-1-{label_set}",
                      question=QUESTION, labels=LABEL_SETS[label_set])
