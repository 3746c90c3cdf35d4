"""Access to the parity goldens in ../shared/kimi_tiny (produced by the official reference code).

Tests only: the implementation never reads these. A missing folder is a test failure.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import torch

KIMI_TINY = Path(__file__).resolve().parents[1].parent / "shared" / "kimi_tiny"
CHECKPOINT = KIMI_TINY / "checkpoint"
GOLDEN = KIMI_TINY / "golden"
INPUTS = KIMI_TINY / "inputs"


def require() -> None:
    assert GOLDEN.is_dir(), f"parity goldens not found at {KIMI_TINY} (expected ../shared/kimi_tiny)"


@cache
def load_json(name: str) -> dict:
    require()
    return json.loads((GOLDEN / name).read_text())


@cache
def load_npz(name: str) -> dict:
    require()
    with np.load(GOLDEN / name) as data:
        return {k: data[k] for k in data.files}


def prompts() -> dict:
    return load_json("prompts.json")["prompts"]


def stem(filename: str) -> str:
    return filename.rsplit(".", 1)[0]


def golden_prompt(name: str):
    """The reference's prompt streams with the reference's whisper features, as a `Prompt`."""
    from kimi_ops.engine.prompt import Prompt

    p = prompts()[name]
    feats = load_npz("whisper_features.npz")
    ids = p["audio_ids"]
    extra = load_json("prompts.json")["extra_tokens"]
    starts = [i for i, t in enumerate(ids) if t == extra["media_begin"]]
    ends = [i for i, t in enumerate(ids) if t == extra["media_end"]]
    audio = [m["content"] for m in p["messages"] if m["message_type"] == "audio"]
    rows = torch.cat([torch.from_numpy(feats[stem(a)][0][: e - s - 1])
                      for a, s, e in zip(audio, starts, ends)])
    return Prompt(list(ids), list(p["text_ids"]), [bool(x) for x in p["is_continuous_mask"]], rows)


# Logits against the main goldens (the reference rounds q/k/v to fp16 in fp32 runs: README.md).
LOGIT_TOLERANCE = 5e-2
# fp32 results of other shapes (a batch and its rows alone, row blocks, Linear's transposed
# product at 16-48 rows) sum in other orders: the tests hold them within this relative
# difference (test_engine's decode attention blocks, test_model's products at every row count).
FP32_ROUNDING = 1e-5


def logprob_tolerance(logit_tolerance: float) -> float:
    """A log-probability is a logit minus the log-sum-exp of all logits, which moves by at most
    the largest logit change: so it moves at most twice as far as the logits do."""
    return 2 * logit_tolerance


@cache
def fp32_logprob_tolerance() -> float:
    """How far the tiny checkpoint's log-probabilities of one row may differ between fp32 runs
    of other shapes: FP32_ROUNDING relative to the largest text logit of its goldens."""
    steps = load_npz("generation_step_logits.npz")
    largest = max(float(np.abs(v).max()) for k, v in steps.items() if "_text_" in k)
    return logprob_tolerance(FP32_ROUNDING * largest)
