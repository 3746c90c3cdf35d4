"""`KimiAudio`: the reference-compatible Python API, batched.

`generate(messages, ...)` mirrors MoonshotAI's `KimiAudio.generate` and returns `(wav_or_None,
text)`; `generate_batch(list_of_message_lists, ...)` returns one `GenerationResult` per
conversation, in order. Audio in every conversation of a call is decoded and run through the
front-end together, then prompts are grouped by length into batches for the engine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kimi_ops.audio import load_audio
from kimi_ops.engine.generate import (DecodeCounts, GenerationParams, GenerationResult,
                                      check_per_prompt, generate_batch, generate_continuous)
from kimi_ops.engine.prompt import Prompt, audio_contents, build_prompt, validate_messages
from kimi_ops.engine.sampling import StreamSampling, checked_int
from kimi_ops.engine.scoring import score_continuations
from kimi_ops.errors import CheckpointError, InvalidArgumentError, PromptError
from kimi_ops.frontend import AudioEncoding, AudioFrontend
from kimi_ops.model.checkpoint import resolve_checkpoint
from kimi_ops.model.config import KimiAudioConfig
from kimi_ops.model.empty import uninitialised
from kimi_ops.model.modeling import KimiAudioForCausalLM
from kimi_ops.model.text_tokenizer import TextTokenizer
from kimi_ops.model.weights import load_state_dict


log = logging.getLogger(__name__)


def oom_reason(exc: BaseException) -> str:
    """The first line of an out-of-memory error (CUDA's goes on about allocator settings)."""
    return str(exc).splitlines()[0] if str(exc) else "out of memory"


def halve_on_oom(run: Callable[[list], list], items: list, what: str) -> list:
    """`run(items)`, one result per item, in order. When the device runs out of memory, what
    the failed attempt held is freed and each half of `items` runs on its own, recursively; one
    item that still does not fit raises the error. How the engine's inputs are batched changes
    its numbers only by fp32 rounding (per-row positions, masks, stops and seeded generators;
    greedy and sampled tokens equal those of the rows run alone), so a split costs time, not a
    different answer."""
    try:
        return run(items)
    except torch.OutOfMemoryError as exc:
        if len(items) == 1:
            raise
        reason = oom_reason(exc)
    # out of the handler: the failed attempt's frames, and the tensors they held, are gone
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.warning("%s: out of memory with %d at once (%s); running them in two halves", what,
                len(items), reason)
    half = len(items) // 2
    return halve_on_oom(run, items[:half], what) + halve_on_oom(run, items[half:], what)


@dataclass
class OptionScores:
    options: list[str]
    logprobs: list[float]  # total log-probability of each option's continuation
    probs: list[float]  # softmax over `logprobs`: sums to 1
    best: str

    @classmethod
    def from_logprobs(cls, options: list[str], logprobs: list[float]) -> OptionScores:
        probs = torch.softmax(torch.tensor(logprobs, dtype=torch.float64), dim=0).tolist()
        return cls(options, list(logprobs), probs, options[max(range(len(probs)),
                                                            key=probs.__getitem__)])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def checked_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch.device this machine has (default: cuda if present, else cpu)."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(f"device {device!r} is not a device name (cpu, cuda, "
                                   "cuda:1, ...)") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"device {device!r}: CUDA is not available here (torch {torch.__version__}"
                f"{', a CPU-only build' if torch.version.cuda is None else ''}); use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"device {device!r}: this machine has "
                                       f"{torch.cuda.device_count()} CUDA device(s)")
        return parsed
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError) as exc:
        raise InvalidArgumentError(f"device {device!r} is not available here: {exc}") from None
    return parsed


def checked_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A floating dtype for the weights: a torch dtype or its name (`bfloat16`, `bf16`, ...)."""
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, str):
        if dtype.lower().removeprefix("torch.") not in DTYPES:
            raise InvalidArgumentError(f"dtype {dtype!r}: use one of "
                                       f"{', '.join(sorted(set(DTYPES)))}")
        return DTYPES[dtype.lower().removeprefix("torch.")]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InvalidArgumentError(f"dtype {dtype}: the weights run in torch.float32, "
                                   "torch.bfloat16 or torch.float16")
    return dtype


def sampling_params(
    output_type: str = "text",
    audio_temperature: float = 0.0,
    audio_top_k: int = 5,
    text_temperature: float = 0.0,
    text_top_k: int = 5,
    audio_repetition_penalty: float = 1.0,
    audio_repetition_window_size: int = 64,
    text_repetition_penalty: float = 1.0,
    text_repetition_window_size: int = 16,
    max_new_tokens: int = -1,
    seed: int = 0,
) -> GenerationParams:
    """The reference `generate` keyword arguments (same names, same defaults) as one object."""
    return GenerationParams(
        text=StreamSampling(text_temperature, text_top_k, text_repetition_penalty,
                            text_repetition_window_size),
        audio=StreamSampling(audio_temperature, audio_top_k, audio_repetition_penalty,
                             audio_repetition_window_size),
        max_new_tokens=max_new_tokens, output_type=output_type, seed=seed,
    ).validate()


def _pick(values: Sequence | None, indices: Sequence[int]) -> list | None:
    return None if values is None else [values[i] for i in indices]


def _audio_kind(content: Any) -> str:
    if isinstance(content, (bytes, bytearray, memoryview)):
        return "bytes"
    if isinstance(content, (tuple, list)) or hasattr(content, "__array__"):
        return "waveform"
    return "empty path" if content == "" else type(content).__name__


class KimiAudio:
    def __init__(self, model_path: str | os.PathLike, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, glm_tokenizer: str | os.PathLike | None = None,
                 max_batch_size: int = 32, max_batch_tokens: int = 65536,
                 load_frontend: bool = True, *, load_detokenizer: bool = False,
                 batching: str = "continuous"):
        """`model_path`: a checkpoint folder or a hub id, as in the reference
        (`KimiAudio(model_path=..., load_detokenizer=False)`). `load_frontend=False` loads only
        the language model: prompts must then carry `AudioEncoding`s computed elsewhere (e.g.
        by a front-end worker). `load_detokenizer` is the reference's keyword: this package
        has no audio detokenizer (no waveform output), so only False is accepted; audio token
        ids still come back from `generate_batch(..., output_type="both")`."""
        if load_detokenizer:
            raise InvalidArgumentError(
                "load_detokenizer=True: kimi_ops has no audio detokenizer and writes no waveform "
                "(it labels and transcribes); pass load_detokenizer=False. "
                "generate_batch(..., output_type='both') still returns the audio token ids")
        if batching not in ("continuous", "static"):
            raise InvalidArgumentError(f"batching must be 'continuous' or 'static', got "
                                       f"{batching!r}")
        self.batching = batching  # static: fixed batches, each run until its last row ends
        self.max_batch_size = checked_int(max_batch_size, "max_batch_size", low=1)
        self.max_batch_tokens = checked_int(max_batch_tokens, "max_batch_tokens", low=1)
        self.device = checked_device(device)
        self.dtype = checked_dtype(dtype, self.device)
        paths = resolve_checkpoint(model_path, glm_tokenizer)
        self.config = KimiAudioConfig.from_file(paths.config)
        self.tokenizer = TextTokenizer(paths.tiktoken)
        if self.tokenizer.vocab_size != self.config.kimia_token_offset:
            raise CheckpointError(
                f"{paths.tiktoken}: {self.tokenizer.num_base_tokens} ranks + specials give "
                f"{self.tokenizer.vocab_size} text ids, config.json says kimia_token_offset="
                f"{self.config.kimia_token_offset}")
        with uninitialised():
            model = KimiAudioForCausalLM(self.config)
        load_state_dict(model, paths.root, self.dtype, self.device)
        self.model = model.eval().requires_grad_(False)
        self.frontend = (AudioFrontend.from_checkpoint(paths.root, glm_dir=paths.glm,
                                                       device=self.device, dtype=self.dtype)
                         if load_frontend else None)
        self.paths = paths
        self.decode_counts = DecodeCounts()  # what generation's decode loop ran, summed

    # -- audio -----------------------------------------------------------------------------

    def encode_audio(self, sources: Sequence[Any],
                     names: Sequence[str | None] | None = None) -> list[AudioEncoding]:
        """Decode and run the front-end once per distinct source; encodings pass through.
        `names[i]` labels source i in errors (default: its path, or `<bytes>`/`<waveform>`)."""
        encodings: list[AudioEncoding | None] = [None] * len(sources)
        pending: dict[Any, list[int]] = {}
        waves = []
        for i, src in enumerate(sources):
            if isinstance(src, AudioEncoding):
                encodings[i] = src
                continue
            key = str(src) if isinstance(src, (str, Path)) else id(src)
            if key not in pending:
                pending[key] = []
                waves.append(load_audio(src, name=names[i] if names else None))
            pending[key].append(i)
        if waves:
            if self.frontend is None:
                raise PromptError("this KimiAudio was loaded without its audio front-end: "
                                  "pass AudioEncoding contents, not raw audio")
            encoded = halve_on_oom(self.frontend.encode, waves, "audio front-end")
            for positions, enc in zip(pending.values(), encoded):
                for i in positions:
                    encodings[i] = enc
        return encodings

    # -- prompts ---------------------------------------------------------------------------

    def build_prompts(self, conversations: Sequence[Sequence[dict]],
                      output_type: str = "text") -> list[Prompt]:
        conversations = [validate_messages(m, f"conversations[{i}]")
                         for i, m in enumerate(conversations)]
        contents = [audio_contents(m) for m in conversations]
        # audio given as bytes or a waveform has no name of its own: errors say where it sits
        names = [None if isinstance(m["content"], (str, os.PathLike)) and m["content"] else
                 f"conversations[{i}][{j}] ({_audio_kind(m['content'])})"
                 for i, messages in enumerate(conversations)
                 for j, m in enumerate(messages) if m["message_type"] == "audio"]
        flat = self.encode_audio([c for per in contents for c in per], names)
        prompts, start = [], 0
        for messages, per in zip(conversations, contents):
            encs = flat[start: start + len(per)]
            start += len(per)
            prompts.append(build_prompt(messages, encs, self.tokenizer,
                                        self.config.kimia_token_offset, output_type))
        return prompts

    # -- generation ------------------------------------------------------------------------

    def run_prompts(self, prompts: Sequence[Prompt], params: GenerationParams,
                    max_new_tokens: Sequence[int] | None = None) -> list[GenerationResult]:
        """Run the prompts, at most `max_batch_size` rows at a time, and return results in
        order. `max_new_tokens`, when given, is each prompt's own budget instead of
        `params.max_new_tokens` (a benchmark's fixed output lengths on random weights)."""
        check_per_prompt(max_new_tokens, len(prompts))
        self._warn_about_lengths(prompts, params)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[GenerationResult | None] = [None] * len(prompts)
        if self.batching == "continuous":
            out = halve_on_oom(
                lambda rows: generate_continuous(
                    self.model, [prompts[i] for i in rows], self.tokenizer.special, params,
                    self.max_batch_size, self.max_batch_tokens,
                    seed_ids=[prompts[i].seed_id() for i in rows], counts=self.decode_counts,
                    max_new_tokens=_pick(max_new_tokens, rows)),
                order, "generation")
            return self._with_text(order, out, results)
        batch: list[int] = []

        def flush():
            out = halve_on_oom(
                lambda rows: generate_batch(self.model, [prompts[i] for i in rows],
                                            self.tokenizer.special, params,
                                            seed_ids=[prompts[i].seed_id() for i in rows],
                                            counts=self.decode_counts,
                                            max_new_tokens=_pick(max_new_tokens, rows)),
                batch, "generation")
            self._with_text(batch, out, results)

        for i in order:
            width = len(prompts[batch[0]]) if batch else len(prompts[i])
            if batch and (len(batch) >= self.max_batch_size
                          or width * (len(batch) + 1) > self.max_batch_tokens):
                flush()
                batch = []
            batch.append(i)
        if batch:
            flush()
        return results

    def _with_text(self, indices: Sequence[int], out: Sequence[GenerationResult],
                   results: list) -> list:
        """`out[k]`, its text decoded, into `results[indices[k]]`; returns `results`."""
        for i, res in zip(indices, out):
            res.text = self.decode_text(res.text_token_ids)
            results[i] = res
        return results

    def _warn_about_lengths(self, prompts: Sequence[Prompt], params: GenerationParams) -> None:
        """Say so when a prompt leaves no room in the reference's default budget (it then ends
        at once, empty, `finish_reason="length"`) or runs past the positions the model knows."""
        lengths = [len(p) for p in prompts]
        exhausted = [i for i, n in enumerate(lengths) if params.budget(n) <= 0]
        if exhausted:
            log.warning("conversation(s) %s: prompts of %s tokens leave no room in the default "
                        "budget (%d - prompt tokens) and end at once with no output; pass "
                        "max_new_tokens, or split the audio (12.5 tokens per second)",
                        exhausted[:8], [lengths[i] for i in exhausted[:8]],
                        params.budget(0))
        limit = self.config.max_position_embeddings
        beyond = [i for i, n in enumerate(lengths) if n >= limit]
        if beyond:
            log.warning("conversation(s) %s: prompts of %s tokens reach past the model's %d "
                        "positions (max_position_embeddings): its output there is unreliable; "
                        "split the audio", beyond[:8], [lengths[i] for i in beyond[:8]], limit)

    def decode_text(self, token_ids: Sequence[int]) -> str:
        """As the reference: drop ids outside the text vocabulary, stop at text EOS, detokenize."""
        kept = []
        for t in token_ids:
            if t == self.tokenizer.special.text_eos:
                break
            if t < self.config.kimia_token_offset:
                kept.append(t)
        return self.tokenizer.decode(kept)

    def generate_batch(self, conversations: Sequence[Sequence[dict]], output_type: str = "text",
                       **sampling: Any) -> list[GenerationResult]:
        params = sampling_params(output_type=output_type, **sampling)
        return self.run_prompts(self.build_prompts(conversations, output_type), params)

    def score_options(self, conversations: Sequence[Sequence[dict]],
                      options: Sequence[str] | Sequence[Sequence[str]],
                      append_eos: bool = False) -> list[OptionScores]:
        """Closed-set scoring: for each conversation, the probability of each option text being
        the reply (softmax over the options' total log-probs), computed in batched forwards that
        share each prompt's KV cache. `options` is one list for all conversations or one list per
        conversation. With `append_eos` an option must also end the reply (the text EOS follows).
        """
        per_conversation = (list(options) if options and not isinstance(options[0], str)
                            else [list(options)] * len(conversations))
        if len(per_conversation) != len(conversations):
            raise ValueError("options: one list for all conversations or one per conversation")
        eos = [self.tokenizer.special.text_eos] if append_eos else []
        continuations = []
        for i, opts in enumerate(per_conversation):
            if len(opts) < 2 or any(not isinstance(o, str) or not o for o in opts):
                raise ValueError(f"conversations[{i}]: options must be two or more non-empty "
                                 "strings")
            continuations.append([self.tokenizer.encode(o) + eos for o in opts])
        prompts = self.build_prompts(conversations)
        totals = halve_on_oom(
            lambda rows: score_continuations(self.model, [prompts[i] for i in rows],
                                             [continuations[i] for i in rows],
                                             self.tokenizer.special),
            list(range(len(prompts))), "option scoring")
        return [OptionScores.from_logprobs(list(opts), t)
                for opts, t in zip(per_conversation, totals)]

    def generate(self, messages: Sequence[dict], output_type: str = "text", **sampling: Any):
        """Reference-compatible: returns `(None, text)` (no waveform detokenizer is loaded)."""
        result = self.generate_batch([messages], output_type=output_type, **sampling)[0]
        return None, result.text
