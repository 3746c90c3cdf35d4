"""Closed-set scoring: the log-likelihood of each option's continuation after a prompt.

A continuation is scored as the generation loop would produce it: after the prompt, each step
feeds one position per stream (audio = blank, text = the previous continuation token), and the
score is the sum of the text head's log-probabilities of the continuation tokens. The prompt is
run once (prefill, in length groups) and its KV cache is shared by all of its options: each
prompt's cache rows are repeated once per option and the options' tokens go through one batched
forward (right-padded; padding sits after the real tokens, so causal attention keeps it out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kimi_ops.engine.generate import prefill
from kimi_ops.engine.prompt import Prompt
from kimi_ops.model.modeling import KimiAudioForCausalLM
from kimi_ops.model.text_tokenizer import SpecialIds


@torch.inference_mode()
def score_continuations(
    model: KimiAudioForCausalLM,
    prompts: Sequence[Prompt],
    continuations: Sequence[Sequence[Sequence[int]]],
    special: SpecialIds,
    max_rows: int = 256,
) -> list[list[float]]:
    """`continuations[i]` are the options of prompt i (token id lists, each non-empty).

    Returns the total log-probability (fp32 log-softmax of the text logits) of every option.
    Prompts are processed in chunks whose option rows stay under `max_rows`.
    """
    if len(prompts) != len(continuations):
        raise ValueError("one list of continuations per prompt is required")
    for i, options in enumerate(continuations):
        if not options or any(len(o) == 0 for o in options):
            raise ValueError(f"prompt {i}: every option needs at least one token")
    scores: list[list[float]] = []
    chunk: list[int] = []
    rows = 0
    for i in range(len(prompts)):
        n = len(continuations[i])
        if chunk and rows + n > max_rows:
            scores.extend(_score_chunk(model, [prompts[j] for j in chunk],
                                       [continuations[j] for j in chunk], special))
            chunk, rows = [], 0
        chunk.append(i)
        rows += n
    if chunk:
        scores.extend(_score_chunk(model, [prompts[j] for j in chunk],
                                   [continuations[j] for j in chunk], special))
    return scores


def _score_chunk(model, prompts, continuations, special) -> list[list[float]]:
    device = model.lm_head.weight.device
    longest = max(len(o) for options in continuations for o in options)
    cache, valid, last_logits, _ = prefill(model, prompts, special.pad, with_mimo=False,
                                           extra_capacity=longest)
    owner = torch.tensor([i for i, options in enumerate(continuations) for _ in options],
                         device=device)
    options = [o for opts in continuations for o in opts]
    cache.select_rows(owner)
    valid = valid.index_select(0, owner)
    first_logprobs = torch.log_softmax(last_logits.float(), dim=-1).index_select(0, owner)

    tokens = torch.zeros(len(options), longest, dtype=torch.long, device=device)
    real = torch.zeros(len(options), longest, dtype=torch.bool, device=device)
    for r, option in enumerate(options):
        tokens[r, : len(option)] = torch.tensor(option, device=device)
        real[r, : len(option)] = True
    # log p(first token | prompt) from the prompt's last position
    total = first_logprobs.gather(1, tokens[:, :1])[:, 0]
    if longest > 1:
        lengths = torch.tensor([len(prompts[i]) for i in owner.tolist()], device=device)
        positions = lengths[:, None] + torch.arange(longest - 1, device=device)[None]
        step_valid = torch.cat([valid, real[:, :-1]], dim=1)
        out = model(
            torch.full((len(options), longest - 1), special.text_blank, device=device),
            tokens[:, :-1], positions, step_valid, cache, with_mimo=False, last_only=False,
            text_embedding="per_position",
        )
        logprobs = torch.log_softmax(out.text_logits.float(), dim=-1)  # [R, L-1, V]
        picked = logprobs.gather(2, tokens[:, 1:, None])[..., 0]
        total = total + (picked * real[:, 1:]).sum(dim=1)
    flat = total.tolist()
    result, start = [], 0
    for opts in continuations:
        result.append(flat[start: start + len(opts)])
        start += len(opts)
    return result
