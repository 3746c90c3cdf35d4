"""Token selection, per sequence, with the reference sampler's semantics.

For each stream (text, audio): an optional repetition penalty over the sequence's own last
`window` tokens, applied only once its history is longer than the window (so with window 16 the
first penalised step is the 17th); then log-softmax in fp32; then greedy argmax when the
temperature is ~0, else temperature scaling and a draw from the top-k (or the full distribution
when top_k <= 0). Draws use one generator per sequence so a sequence's sample does not depend on
what else is in its batch. Each pick comes with its log-probability as sampled (`sample`).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kimi_ops.errors import InvalidArgumentError

GREEDY_BELOW = 1e-6


def checked_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """`value` as a Python int (numpy integers too, never a bool or a float), within bounds."""
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = (f">= {low}" if high is None else f"<= {high}" if low is None
                  else f"in [{low}, {high}]")
        raise InvalidArgumentError(f"{name} must be {bounds}, got {number}")
    return number


def checked_float(value, name: str) -> float:
    """`value` as a finite Python float (ints and numpy numbers too, never a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidArgumentError(f"{name} must be finite, got {number}")
    return number


@dataclass(frozen=True)
class StreamSampling:
    temperature: float = 0.0
    top_k: int = 5
    repetition_penalty: float = 1.0
    repetition_window: int = 16

    def validate(self, stream: str) -> None:
        """Check every setting; numpy numbers become Python ones (the object is frozen)."""
        temperature = checked_float(self.temperature, f"{stream}_temperature")
        if temperature < 0:
            raise InvalidArgumentError(f"{stream}_temperature must be >= 0, got {temperature}")
        penalty = checked_float(self.repetition_penalty, f"{stream}_repetition_penalty")
        if penalty <= 0:
            raise InvalidArgumentError(f"{stream}_repetition_penalty must be > 0, got {penalty}")
        settings = {
            "temperature": temperature, "repetition_penalty": penalty,
            "top_k": checked_int(self.top_k, f"{stream}_top_k"),
            "repetition_window": checked_int(self.repetition_window,
                                             f"{stream}_repetition_window_size", low=1)}
        for name, value in settings.items():
            object.__setattr__(self, name, value)

    @property
    def penalised(self) -> bool:
        """Whether the repetition penalty does anything (it needs the token history)."""
        return self.repetition_penalty > 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_BELOW


def apply_repetition_penalty(logits: torch.Tensor, history: Sequence[Sequence[int]] | None,
                             penalty: float, window: int) -> torch.Tensor:
    """logits [B, V]; history: one list of tokens per row, of any length (rows whose history is
    not longer than the window keep their logits)."""
    if penalty <= 1.0 or history is None:
        return logits
    rows = [j for j, h in enumerate(history) if len(h) > window]
    if not rows:
        return logits
    index = torch.tensor(rows, device=logits.device)
    recent = torch.tensor([history[j][-window:] for j in rows], device=logits.device)
    return logits.index_copy(0, index, _penalised(logits.index_select(0, index), recent,
                                                  penalty))


def _penalised(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    scores = logits.gather(1, recent)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, recent, scores)


def sample(logits: torch.Tensor, history: Sequence[Sequence[int]] | None,
           params: StreamSampling, generators: list[torch.Generator] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-probability as sampled: logits [B, V] (any float dtype) ->
    ([B] int64, [B] float32).

    The log-probability is the chosen token's under the distribution it was chosen from: greedy,
    the log-softmax of the (penalised) logits; sampled, the tempered distribution over the top-k
    candidates (or the whole vocabulary) that the draw came from, renormalised."""
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty,
                                      params.repetition_window)
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.greedy:
        picks = logprobs.argmax(dim=-1)
        return picks, logprobs.gather(1, picks[:, None])[:, 0]
    logprobs = logprobs / params.temperature
    if params.top_k > 0:
        probs, candidates = torch.topk(logprobs.exp(), min(params.top_k, logprobs.shape[-1]))
        drawn_from = torch.log_softmax(logprobs.gather(1, candidates), dim=-1)
    else:
        probs, candidates = logprobs.exp(), None
        drawn_from = torch.log_softmax(logprobs, dim=-1)
    picks = torch.stack([
        torch.multinomial(probs[row], 1, generator=generators[row] if generators else None)[0]
        for row in range(probs.shape[0])
    ])
    chosen = drawn_from.gather(1, picks[:, None])[:, 0]
    return (picks if candidates is None else candidates.gather(1, picks[:, None])[:, 0]), chosen
