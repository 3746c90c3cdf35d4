"""Token selection, per sequence, with the reference sampler's semantics.

For each stream (text, audio): an optional repetition penalty over the sequence's own last
`window` tokens, applied only once its history is longer than the window (so with window 16 the
first penalised step is the 17th); then log-softmax in fp32; then greedy argmax when the
temperature is ~0, else temperature scaling and a draw from the top-k (or the full distribution
when top_k <= 0). Draws use one generator per sequence so a sequence's sample does not depend on
what else is in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-6


@dataclass(frozen=True)
class StreamSampling:
    temperature: float = 0.0
    top_k: int = 5
    repetition_penalty: float = 1.0
    repetition_window: int = 16

    def validate(self, stream: str) -> None:
        if self.temperature < 0:
            raise ValueError(f"{stream}_temperature must be >= 0, got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"{stream}_repetition_penalty must be > 0")
        if self.repetition_window < 1:
            raise ValueError(f"{stream}_repetition_window_size must be >= 1")

    @property
    def penalised(self) -> bool:
        """Whether the repetition penalty does anything (it needs the token history)."""
        return self.repetition_penalty > 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_BELOW


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor | None,
                             penalty: float, window: int) -> torch.Tensor:
    """logits [B, V]; history [B, L] of the same length L for every row."""
    if penalty <= 1.0 or history is None or history.shape[1] <= window:
        return logits
    recent = history[:, -window:].long()
    scores = logits.gather(1, recent)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, recent, scores)


def sample(logits: torch.Tensor, history: torch.Tensor | None, params: StreamSampling,
           generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """One token per row. logits [B, V] (any float dtype) -> [B] int64."""
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty,
                                      params.repetition_window)
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.greedy:
        return logprobs.argmax(dim=-1)
    logprobs = logprobs / params.temperature
    if params.top_k > 0:
        probs, candidates = torch.topk(logprobs.exp(), min(params.top_k, logprobs.shape[-1]))
    else:
        probs, candidates = logprobs.exp(), None
    picks = torch.stack([
        torch.multinomial(probs[row], 1, generator=generators[row] if generators else None)[0]
        for row in range(probs.shape[0])
    ])
    return picks if candidates is None else candidates.gather(1, picks[:, None])[:, 0]
