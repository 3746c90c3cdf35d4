"""Batched generation over prompts of different lengths, faithful to the reference loop.

The reference (`KimiAudio._generate_loop`) runs one conversation at a time. Here a batch of
prompts is left-padded into one tensor, each row keeps its own positions, history, sampler state
and stop condition, and finished rows are dropped from the batch (and its KV cache) as they stop,
so the remaining rows decode faster. Per row the loop does what the reference does:

* step 0 forwards the whole prompt; each later step feeds one position per stream: the text
  stream gets the previous text token (blank once text has ended), the audio stream gets blank
  (output "text", and during the first 6 steps of "both") or the previous audio token;
* output "text" stops when the text EOS is sampled (not returned); output "both" stops when the
  audio stream produces `msg_end` or `media_end`;
* the budget is `max_new_tokens` steps, by default 7500 - prompt length ("text") or
  1500 - prompt length ("both");
* each generated text token keeps its log-probability as sampled (`GenerationResult`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kimi_ops.engine.decoders import DynamicDecoder, StaticDecoder, use_static_decoder
from kimi_ops.engine.prompt import Prompt
from kimi_ops.engine.sampling import StreamSampling, checked_int, sample
from kimi_ops.errors import InvalidArgumentError
from kimi_ops.model.modeling import KimiAudioForCausalLM
from kimi_ops.model.text_tokenizer import SpecialIds

AUDIO_DELAY_TOKENS = 6  # hard-coded in the reference loop, whatever config.json says
TEXT_TOKEN_BUDGET = 7500
BOTH_TOKEN_BUDGET = int(12.5 * 120)
# seeds feed torch.Generator.manual_seed after `seed * 1_000_003 + row id`: keep that in int64
MAX_SEED = (2**63 - 1) // 1_000_003 - 2**32


@dataclass(frozen=True)
class GenerationParams:
    text: StreamSampling = field(default_factory=StreamSampling)
    audio: StreamSampling = field(default_factory=lambda: StreamSampling(repetition_window=64))
    max_new_tokens: int = -1
    output_type: str = "text"
    seed: int = 0

    def validate(self) -> GenerationParams:
        if self.output_type not in ("text", "both"):
            raise InvalidArgumentError(
                f"output_type must be 'text' or 'both', got {self.output_type!r}")
        budget = checked_int(self.max_new_tokens, "max_new_tokens")
        if budget == 0 or budget < -1:
            raise InvalidArgumentError(
                f"max_new_tokens must be -1 (model default) or > 0, got {budget}")
        try:
            seed = checked_int(self.seed, "seed", low=0, high=MAX_SEED)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{exc} (sampled draws are reproducible: vary the seed "
                                       "for other samples)") from None
        object.__setattr__(self, "max_new_tokens", budget)
        object.__setattr__(self, "seed", seed)
        self.text.validate("text")
        self.audio.validate("audio")
        return self

    def budget(self, prompt_len: int) -> int:
        default = (TEXT_TOKEN_BUDGET if self.output_type == "text" else BOTH_TOKEN_BUDGET)
        default -= prompt_len
        if self.max_new_tokens == -1:
            return max(default, 0)
        return self.max_new_tokens


@dataclass
class GenerationResult:
    """One prompt's generation. `text_logprobs` holds one log-probability (<= 0) per generated
    text token, the text EOS included when the text ended by it (so len(text_token_ids) + 1
    entries then, else len(text_token_ids)): the chosen token's log-probability as sampled, i.e.
    under the distribution the sampler chose it from (after the repetition penalty; greedy: the
    log-softmax of the logits; sampled: the tempered top-k distribution the draw came from,
    `kimi_ops.engine.sampling.sample`). It comes from the decoding steps' own logits, no extra
    forward pass; the audio stream has none."""

    text_token_ids: list[int]  # generated text-stream ids before EOS, unfiltered (as the loop returns)
    audio_token_ids: list[int]  # audio-stream ids after the 6-step delay ("both" only), unfiltered
    finish_reason: str  # "stop" (EOS / end of audio) or "length" (budget exhausted)
    prompt_tokens: int
    steps: int  # forward passes run for this sequence
    text: str = ""
    text_logprobs: list[float] = field(default_factory=list)

    def audio_codes(self, token_offset: int) -> list[int]:
        """The semantic (GLM-4 VQ) codes among the audio tokens, as the reference detokenizes."""
        return [t - token_offset for t in self.audio_token_ids if t >= token_offset]


@dataclass
class DecodeCounts:
    """What the decode loop ran, summed over calls: forwards after prefill and the rows they
    carried. `occupancy(width)` is the share of `width` batch slots that those forwards filled
    (rows / (forwards * width)): 1.0 when every step ran a full batch."""

    forwards: int = 0
    rows: int = 0

    def occupancy(self, width: int) -> float:
        return self.rows / (self.forwards * width) if self.forwards else 0.0


@dataclass
class _Row:
    index: int  # position in the caller's list
    budget: int
    text: list[int] = field(default_factory=list)  # every sampled text token (incl. after end)
    text_logprobs: list[float] = field(default_factory=list)  # the valid ones' and the EOS's
    audio: list[int] = field(default_factory=list)
    valid_text: int = 0
    valid_audio: int = 0
    text_done: bool = False


def check_per_prompt(max_new_tokens: Sequence[int] | None, prompts: int) -> None:
    if max_new_tokens is not None and len(max_new_tokens) != prompts:
        raise InvalidArgumentError(f"max_new_tokens per prompt: {len(max_new_tokens)} values "
                                   f"for {prompts} prompts")


def _rows(prompts: Sequence[Prompt], params: GenerationParams,
          max_new_tokens: Sequence[int] | None) -> list[_Row]:
    """One row per prompt, its budget from `params`, or from `max_new_tokens[i]` (the same
    meaning as `params.max_new_tokens`, per prompt) where that is given."""
    check_per_prompt(max_new_tokens, len(prompts))
    own = [params if max_new_tokens is None else
           GenerationParams(max_new_tokens=n, output_type=params.output_type).validate()
           for n in (max_new_tokens or [None] * len(prompts))]
    return [_Row(i, own[i].budget(len(p))) for i, p in enumerate(prompts)]


def _start(prompts: Sequence[Prompt], params: GenerationParams,
           max_new_tokens: Sequence[int] | None) -> tuple[list[_Row], list]:
    """The rows to run, longest prompt first, and the results list, where a prompt with no
    budget left already has its empty "length" result."""
    rows = _rows(prompts, params, max_new_tokens)
    results: list[GenerationResult | None] = [None] * len(prompts)
    for row in rows:
        if row.budget <= 0:
            results[row.index] = _result(row, prompts[row.index], "length")
    return (sorted((row for row in rows if row.budget > 0),
                   key=lambda r: -len(prompts[r.index])), results)


def _sampled(params: GenerationParams) -> bool:
    return not (params.text.greedy and (params.output_type != "both" or params.audio.greedy))


def _generator(params: GenerationParams, seed_ids: Sequence[int] | None, index: int,
               device: torch.device) -> torch.Generator:
    """Row `index`'s own generator: seeded from the call's seed and the row's seed id (its
    position when no ids are given), so its draws do not depend on its batch."""
    g = torch.Generator(device=device)
    g.manual_seed(params.seed * 1_000_003 + (seed_ids[index] if seed_ids is not None
                                             else index))
    return g


def pad_batch(prompts: Sequence[Prompt], pad_id: int, device: torch.device):
    """Left-pad prompts into [B, P] tensors, per-row positions, masks and feature rows."""
    width = max(len(p) for p in prompts)
    b = len(prompts)
    audio = torch.full((b, width), pad_id, dtype=torch.long)
    text = torch.full((b, width), pad_id, dtype=torch.long)
    valid = torch.zeros((b, width), dtype=torch.bool)
    continuous = torch.zeros((b, width), dtype=torch.bool)
    positions = torch.zeros((b, width), dtype=torch.long)
    for row, p in enumerate(prompts):
        start = width - len(p)
        audio[row, start:] = torch.tensor(p.audio_ids)
        text[row, start:] = torch.tensor(p.text_ids)
        continuous[row, start:] = torch.tensor(p.continuous_mask, dtype=torch.bool)
        valid[row, start:] = True
        positions[row, start:] = torch.arange(len(p))
    features = torch.cat([p.features for p in prompts if p.features.shape[0]] or [torch.zeros(0)])
    to = dict(device=device)
    return (audio.to(**to), text.to(**to), positions.to(**to), valid.to(**to),
            continuous.to(**to), features.to(**to))


def prefill_groups(lengths: Sequence[int], max_padding: float, max_tokens: int) -> list[list[int]]:
    """Rows grouped by similar length so a group's padded size stays within `max_padding` times
    its real tokens (and under `max_tokens`): prefill is compute-bound, padding is wasted work."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups:
            group = groups[-1]
            head = lengths[group[0]]
            size = (len(group) + 1) * head
            if size <= max_padding * (real + lengths[i]) and size <= max_tokens:
                group.append(i)
                real += lengths[i]
                continue
        groups.append([i])
        real = lengths[i]
    return groups


def prefill_group_tokens(device: torch.device) -> int:
    """Tokens per prefill forward. On CPU a group's activations should stay cache-sized (32 ASR
    prompts, `small` preset: 1024 prefilled 1.5x faster than 16384); a GPU wants large groups."""
    return 1024 if device.type == "cpu" else 16384


def prefill(model: KimiAudioForCausalLM, prompts: Sequence[Prompt], pad_id: int, with_mimo: bool,
            extra_capacity: int, max_padding: float = 1.25, max_tokens: int | None = None):
    """Forward every prompt, in length groups, into one left-padded KV cache.

    Returns (cache, key_valid [B, P], text logits [B, V], audio logits [B, V] or None).
    """
    device = model.lm_head.weight.device
    max_tokens = max_tokens or prefill_group_tokens(device)
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    cache = model.new_cache(len(prompts), width + extra_capacity, with_mimo)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    text_logits: list[torch.Tensor | None] = [None] * len(prompts)
    audio_logits: list[torch.Tensor | None] = [None] * len(prompts)
    for group in prefill_groups(lengths, max_padding, max_tokens):
        audio, text, positions, group_valid, continuous, features = pad_batch(
            [prompts[i] for i in group], pad_id, device)
        part = model.new_cache(len(group), audio.shape[1], with_mimo)
        out = model(audio, text, positions, group_valid, part, continuous, features,
                    with_mimo=with_mimo, last_only=True)
        rows = torch.tensor(group, device=device)
        cache.put_rows(rows, part, width)
        valid[rows, width - audio.shape[1]:] = group_valid
        for j, i in enumerate(group):
            text_logits[i] = out.text_logits[j, -1]
            if with_mimo:
                audio_logits[i] = out.audio_logits[j, -1]
    cache.length = width
    return (cache, valid, torch.stack(text_logits),
            torch.stack(audio_logits) if with_mimo else None)


@torch.inference_mode()
def generate_batch(model: KimiAudioForCausalLM, prompts: Sequence[Prompt], special: SpecialIds,
                   params: GenerationParams, seed_ids: Sequence[int] | None = None,
                   static_cache: bool | None = None, counts: DecodeCounts | None = None,
                   max_new_tokens: Sequence[int] | None = None) -> list[GenerationResult]:
    """Run one batch to completion; results in the order of `prompts`.

    `seed_ids` (default 0..B-1; the API passes `Prompt.seed_id`, from the content) number the
    rows for their per-sequence random generators, so a sampled sequence does not depend on
    which batch it lands in. `static_cache` picks the fixed-shape decoder (default: on CUDA,
    where its steps are replayed as CUDA graphs, unless KIMI_CUDA_GRAPHS=0). `counts`, when
    given, adds this call's decode forwards and rows. `max_new_tokens`, when given, is each
    prompt's own budget instead of `params.max_new_tokens` (fixed output lengths, for a
    benchmark of random weights).
    """
    device = model.lm_head.weight.device
    both = params.output_type == "both"
    # longest prompts first: decode attention then reads each block of rows from where its
    # longest row starts, skipping most of the left padding (`key_spans`)
    live, results = _start(prompts, params, max_new_tokens)
    if not live:
        return results
    generators = ([_generator(params, seed_ids, r.index, device) for r in live]
                  if _sampled(params) else None)

    cache, valid, text_logits, audio_logits = prefill(
        model, [prompts[r.index] for r in live], special.pad, both,
        extra_capacity=min(64, max(r.budget for r in live)))
    decoder = _decoder(model, prompts, live, cache, valid, both, special, static_cache)
    del cache, valid  # owned by the decoder from here
    while True:
        ended, keep, next_text, next_audio = _sample_rows(live, text_logits, audio_logits,
                                                          params, generators, special)
        for row, reason in ended:
            results[row.index] = _result(row, prompts[row.index], reason)
        if not keep:
            return results
        live, generators, text_logits, audio_logits = _step(
            decoder, live, generators, keep, next_text, next_audio, counts)


def _row_state(prompts: Sequence[Prompt], rows: list[_Row], valid: torch.Tensor
               ) -> tuple[torch.Tensor, list[int]]:
    """Rows just prefilled into a left-padded cache with key mask `valid`: each row's last
    prompt position ([rows, 1]) and first key column."""
    lengths = [len(prompts[r.index]) for r in rows]
    return (torch.tensor([[n - 1] for n in lengths], device=valid.device),
            [valid.shape[1] - n for n in lengths])


def _decoder(model: KimiAudioForCausalLM, prompts: Sequence[Prompt], rows: list[_Row],
             cache, valid: torch.Tensor, both: bool, special: SpecialIds,
             static_cache: bool | None) -> DynamicDecoder | StaticDecoder:
    """A decoder for `rows`, just prefilled into `cache` / `valid`: the fixed-shape one where
    `static_cache` says so (default: on CUDA, where its steps replay as CUDA graphs)."""
    device = valid.device
    positions, first_key = _row_state(prompts, rows, valid)
    if static_cache is None:
        static_cache = use_static_decoder(device)
    if static_cache:
        return StaticDecoder(model, cache, valid, positions, both, special.text_blank,
                             budget=max(r.budget for r in rows), cuda_graph=device.type == "cuda")
    return DynamicDecoder(model, cache, valid, positions, first_key, both)


def _sample_rows(live: list[_Row], text_logits: torch.Tensor, audio_logits: torch.Tensor | None,
                 params: GenerationParams, generators: list[torch.Generator] | None,
                 special: SpecialIds) -> tuple[list[tuple[_Row, str]], list[int], list[int],
                                               list[int]]:
    """One step's sampling for the live rows, recorded in each row (`_take`): the rows that
    ended with their finish reasons, the indices of the rows that go on, and the text and audio
    ids those rows feed back. A row's repetition history is its own tokens so far."""
    both = audio_logits is not None
    next_text, text_logprobs = sample(text_logits, [r.text for r in live]
                                      if params.text.penalised else None, params.text,
                                      generators or None)
    texts, logprobs = next_text.tolist(), text_logprobs.tolist()
    audios = [special.text_blank] * len(live)
    if both:
        next_audio, _ = sample(audio_logits, [r.audio for r in live]
                               if params.audio.penalised else None, params.audio,
                               generators or None)
        audios = next_audio.tolist()
    ended, keep = [], []
    for j, row in enumerate(live):
        reason = _take(row, j, texts, audios, logprobs, special, both)
        if reason:
            ended.append((row, reason))
        else:
            keep.append(j)
    return ended, keep, [texts[j] for j in keep], [audios[j] for j in keep]


def _step(decoder: DynamicDecoder | StaticDecoder, live: list[_Row],
          generators: list[torch.Generator] | None, keep: list[int], next_text: list[int],
          next_audio: list[int], counts: DecodeCounts | None):
    """The rows in `keep` go on (the decoder drops the others) and take one decode step,
    fed the ids they sampled: the live rows, their generators, and the step's last logits."""
    if len(keep) < len(live):
        decoder.keep(keep)
        live = [live[j] for j in keep]
        generators = [generators[j] for j in keep] if generators else []
    out = decoder.step(next_audio, next_text)
    if counts is not None:
        counts.forwards += 1
        counts.rows += len(live)
    audio_logits = out.audio_logits[:, -1] if out.audio_logits is not None else None
    return live, generators, out.text_logits[:, -1], audio_logits


def _take(row: _Row, j: int, texts: list[int], audios: list[int], logprobs: list[float],
          special: SpecialIds, both: bool) -> str | None:
    """Record row `row`'s sampled tokens (entry `j` of the lists, which are set to what the row
    feeds back); the finish reason when it has ended, else None. The row's own step count
    (its tokens so far) decides the audio delay and the budget."""
    step = len(row.text)
    t = texts[j]
    if row.text_done:
        t = special.text_blank
    else:
        row.text_logprobs.append(logprobs[j])
        if t == special.text_eos:
            row.text_done = True
        else:
            row.valid_text += 1
    row.text.append(t)
    a = audios[j]
    if step < AUDIO_DELAY_TOKENS or not both:
        a = special.text_blank
    else:
        row.valid_audio += 1
    row.audio.append(a)
    texts[j], audios[j] = t, a
    stopped = (both and a in (special.msg_end, special.media_end)) or (
        not both and row.text_done)
    if stopped or step + 1 >= row.budget:
        return "stop" if stopped else "length"
    return None


@torch.inference_mode()
def generate_continuous(model: KimiAudioForCausalLM, prompts: Sequence[Prompt],
                        special: SpecialIds, params: GenerationParams, max_rows: int,
                        max_tokens: int, seed_ids: Sequence[int] | None = None,
                        counts: DecodeCounts | None = None,
                        max_new_tokens: Sequence[int] | None = None,
                        static_cache: bool | None = None) -> list[GenerationResult]:
    """Every prompt to completion with at most `max_rows` rows decoding at once: when rows
    end, queued prompts (longest first) are prefilled together and join the running decode
    with their own positions, history, sampler state and stop condition, so no slot idles
    while work is queued. A newcomer joins only while the batch's padded size (rows x the
    widest row's keys) stays within `max_tokens`. Results in the order of `prompts`.

    The KV layout is the dynamic decoder's left-padded cache: joining newcomers re-pads the
    narrower side to the common width and stacks the rows (one copy per admission). Each row's
    keys stay contiguous and end at the last column, so decode attention reads them as before
    and no attention kernel changes. Chosen by measurement: on the labelling mix of
    `bench/engine.py --occupancy` (`small` preset, 64 conversations, 8 rows, CPU) the
    admissions' copies took 0.5 s of 22 s (2 %): that is all a paged or slot-local cache (and
    the attention paths they need) could save there.
    A workload whose rows nearly all run the whole budget gains nothing: rows admitted last
    decode on after the others end (the `tiny` reference workload there: 228 forwards against
    static's 222).

    `static_cache` (default: on CUDA, as in `generate_batch`) runs the fixed-shape decoder
    instead: a newcomer takes a freed slot and its keys go into that slot's columns, so the
    captured CUDA graph keeps replaying (`StaticDecoder.add`).
    """
    device = model.lm_head.weight.device
    both = params.output_type == "both"
    queue, results = _start(prompts, params, max_new_tokens)
    queue.reverse()  # popped from the end: longest first
    sampled = _sampled(params)
    live: list[_Row] = []
    generators: list[torch.Generator] = []
    decoder: DynamicDecoder | StaticDecoder | None = None
    text_logits = audio_logits = None
    while True:
        width = decoder.width if decoder is not None else 0
        joining = []
        while queue and len(live) + len(joining) < max_rows:
            size = max(width, len(prompts[queue[-1].index])) * (len(live) + len(joining) + 1)
            if (live or joining) and size > max_tokens:
                break
            joining.append(queue.pop())
        if joining:
            cache, valid, tl, al = prefill(
                model, [prompts[r.index] for r in joining], special.pad, both,
                extra_capacity=min(64, max(r.budget for r in joining)))
            if decoder is None:
                decoder = _decoder(model, prompts, joining, cache, valid, both, special,
                                   static_cache)
            else:
                decoder.add(cache, valid, *_row_state(prompts, joining, valid))
            text_logits = tl if text_logits is None else torch.cat([text_logits, tl])
            if both:
                audio_logits = al if audio_logits is None else torch.cat([audio_logits, al])
            if sampled:
                generators += [_generator(params, seed_ids, r.index, device) for r in joining]
            live += joining
        if not live:
            return results
        ended, keep, next_text, next_audio = _sample_rows(live, text_logits, audio_logits,
                                                          params, generators, special)
        for row, reason in ended:
            results[row.index] = _result(row, prompts[row.index], reason)
        if not keep:
            live, generators, decoder, text_logits, audio_logits = [], [], None, None, None
            continue
        decoder.refilling = bool(queue)
        live, generators, text_logits, audio_logits = _step(
            decoder, live, generators, keep, next_text, next_audio, counts)


def _result(row: _Row, prompt: Prompt, reason: str) -> GenerationResult:
    delay = AUDIO_DELAY_TOKENS
    return GenerationResult(
        text_token_ids=row.text[: row.valid_text],
        audio_token_ids=row.audio[delay: delay + row.valid_audio],
        finish_reason=reason,
        prompt_tokens=len(prompt),
        steps=len(row.text),
        text_logprobs=row.text_logprobs,
    )
