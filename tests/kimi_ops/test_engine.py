"""The batched engine against the reference's greedy goldens, and batch == single invariants."""

import numpy as np
import pytest
import torch

from kimi_ops.engine.generate import (DecodeCounts, GenerationParams, generate_batch,
                                      generate_continuous)
from kimi_ops.engine.sampling import StreamSampling, apply_repetition_penalty
from kimi_ops.errors import InvalidArgumentError
from tests import goldens

GENERATION_CASES = list(goldens.load_json("generation.json"))


@pytest.fixture(scope="module")
def golden_prompts():
    return {case: goldens.golden_prompt(case) for case in GENERATION_CASES}


def run(model, tokenizer, prompts, **params):
    return generate_batch(model, prompts, tokenizer.special, GenerationParams(**params).validate())


def check_text_logprobs(res, single, tolerance: float) -> None:
    """`text_logprobs`: one per generated text token and the EOS that ended the text, <= 0,
    and a batch's row has its single run's to fp32 rounding."""
    assert len(res.text_logprobs) == len(res.text_token_ids) + (res.finish_reason == "stop")
    assert all(lp <= 0 for lp in res.text_logprobs)
    np.testing.assert_allclose(res.text_logprobs, single.text_logprobs, rtol=0, atol=tolerance)


@pytest.mark.parametrize("golden_file", ["generation.json", "pure_fp32/generation.json"])
def test_greedy_tokens_match_reference_single_and_batched(tiny_model, tokenizer, golden_prompts,
                                                          golden_file):
    """The reference's greedy tokens, batched and alone; the text log-probs are the
    log-softmax of the reference's step logits (row i chose token i), a batch's its singles'."""
    expected = goldens.load_json(golden_file)
    steps = goldens.load_npz("generation_step_logits.npz")  # the main goldens' logits
    prompts = [golden_prompts[c] for c in GENERATION_CASES]
    batched = run(tiny_model, tokenizer, prompts, max_new_tokens=24)
    for case, prompt, res in zip(GENERATION_CASES, prompts, batched):
        want = expected[case]["text_tokens_from_generate_loop"]
        single = run(tiny_model, tokenizer, [prompt], max_new_tokens=24)[0]
        assert single.text_token_ids == want, case
        assert res.text_token_ids == want, case
        assert res.steps == expected[case]["steps_run"], case
        stopped = expected[case]["per_step_text_argmax"][-1] == tokenizer.special.text_eos
        assert res.finish_reason == ("stop" if stopped else "length"), case
        check_text_logprobs(res, single, goldens.fp32_logprob_tolerance())
        chosen = expected[case]["per_step_text_argmax"]
        logits = torch.from_numpy(steps[f"gen_step_text_logits__{case}"]).double()
        reference = torch.log_softmax(logits, dim=-1)[torch.arange(len(chosen)), chosen]
        np.testing.assert_allclose(res.text_logprobs, reference.numpy(), rtol=0, err_msg=case,
                                   atol=goldens.logprob_tolerance(goldens.LOGIT_TOLERANCE))


def test_decoded_text_matches_reference(engine, golden_prompts):
    expected = goldens.load_json("generation.json")
    results = engine.run_prompts([golden_prompts[c] for c in GENERATION_CASES],
                                 GenerationParams(max_new_tokens=24))
    for case, res in zip(GENERATION_CASES, results):
        assert res.text == expected[case]["decoded_text"], case


def test_batch_equals_single_with_repetition_penalty(tiny_model, tokenizer, golden_prompts):
    """Penalty windows are per sequence; the first penalised step is the 17th (window 16)."""
    prompts = [golden_prompts[c] for c in GENERATION_CASES]
    params = dict(max_new_tokens=40,
                  text=StreamSampling(repetition_penalty=1.3, repetition_window=16))
    batched = run(tiny_model, tokenizer, prompts, **params)
    for prompt, res in zip(prompts, batched):
        assert res.text_token_ids == run(tiny_model, tokenizer, [prompt], **params)[0].text_token_ids
    plain = run(tiny_model, tokenizer, prompts, max_new_tokens=40)
    changed = [a.text_token_ids != b.text_token_ids for a, b in zip(batched, plain)]
    assert any(changed), "a 1.3 penalty should change some greedy continuation"
    for a, b in zip(batched, plain):  # identical until the penalty starts at step 17
        assert a.text_token_ids[:16] == b.text_token_ids[:16]


def test_repetition_penalty_window_boundary():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    history16 = [[0] * 16]
    assert torch.equal(apply_repetition_penalty(logits, history16, 2.0, 16), logits)
    history17 = [[3] + [0] * 15 + [1]]  # window = last 16 = fifteen 0s and one 1
    out = apply_repetition_penalty(logits, history17, 2.0, 16)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_sampling_is_per_sequence_and_reproducible(tiny_model, tokenizer, golden_prompts):
    prompts = [golden_prompts[c] for c in GENERATION_CASES]
    params = dict(max_new_tokens=12, seed=7,
                  text=StreamSampling(temperature=1.0, top_k=50))
    first = run(tiny_model, tokenizer, prompts, **params)
    again = run(tiny_model, tokenizer, prompts, **params)
    assert [r.text_token_ids for r in first] == [r.text_token_ids for r in again]
    greedy = run(tiny_model, tokenizer, prompts, max_new_tokens=12)
    assert [r.text_token_ids for r in first] != [r.text_token_ids for r in greedy]
    # A row's draws come from its own generator: rerunning one row alone with its id reproduces it.
    alone = generate_batch(tiny_model, [prompts[3]], tokenizer.special,
                           GenerationParams(**params), seed_ids=[3])[0]
    assert alone.text_token_ids == first[3].text_token_ids
    # its log-probs are of the tempered top-k distribution it was drawn from (at temperature
    # 1 the logits' own rounding)
    check_text_logprobs(first[3], alone, goldens.fp32_logprob_tolerance())
    assert first[3].text_logprobs != greedy[3].text_logprobs


def test_output_both_returns_audio_stream(tiny_model, tokenizer, golden_prompts):
    prompts = [golden_prompts[c] for c in GENERATION_CASES[:4]]
    sp = tokenizer.special
    batched = run(tiny_model, tokenizer, prompts, max_new_tokens=30, output_type="both")
    for prompt, res in zip(prompts, batched):
        single = run(tiny_model, tokenizer, [prompt], max_new_tokens=30, output_type="both")[0]
        assert (res.text_token_ids, res.audio_token_ids) == (single.text_token_ids,
                                                             single.audio_token_ids)
        # the 6-step delay: at most steps - 6 audio tokens; text ends before EOS
        assert len(res.audio_token_ids) == max(res.steps - 6, 0)
        if res.finish_reason == "stop":
            assert res.audio_token_ids[-1] in (sp.msg_end, sp.media_end)
        assert sp.text_eos not in res.text_token_ids


def test_budget_and_validation(tiny_model, tokenizer, golden_prompts):
    res = run(tiny_model, tokenizer, [golden_prompts["asr_a02_chirp_3s_16k"]], max_new_tokens=3)[0]
    assert res.finish_reason == "length" and res.steps == 3
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationParams(max_new_tokens=0).validate()
    with pytest.raises(ValueError, match="output_type"):
        GenerationParams(output_type="audio").validate()


@pytest.mark.parametrize("kwargs, message", [
    ({"text_temperature": float("nan")}, "text_temperature must be finite, got nan"),
    ({"audio_temperature": float("inf")}, "audio_temperature must be finite, got inf"),
    ({"text_repetition_penalty": float("nan")}, "text_repetition_penalty must be finite"),
    ({"text_top_k": 2.5}, "text_top_k must be an integer, got 2.5"),
    ({"text_top_k": "5"}, "text_top_k must be an integer, got '5'"),
    ({"audio_repetition_window_size": 2.5}, "audio_repetition_window_size must be an integer"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer, got 2.5"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer, got True"),
    ({"max_new_tokens": -2}, r"max_new_tokens must be -1 \(model default\) or > 0, got -2"),
    ({"seed": 2**70}, r"seed must be in \[0, \d+\], got 1180591620717411303424"),
    ({"seed": -1}, r"seed must be in \[0, \d+\], got -1"),
])
def test_bad_generation_arguments_are_named_before_any_work(kwargs, message):
    """NaN, infinities and wrong types are refused with the argument's name: a KimiError that is
    also a ValueError (before, NaN failed in torch.multinomial and inf drew uniformly)."""
    from kimi_ops.engine.api import sampling_params
    from kimi_ops.errors import KimiError

    with pytest.raises(InvalidArgumentError, match=message) as info:
        sampling_params(**kwargs)
    assert isinstance(info.value, KimiError) and isinstance(info.value, ValueError)


def test_numpy_numbers_are_taken_as_python_numbers():
    from kimi_ops.engine.api import sampling_params

    params = sampling_params(seed=np.int64(3), max_new_tokens=np.int32(4),
                             text_top_k=np.int64(7), text_temperature=np.float32(0.5))
    assert (params.seed, params.max_new_tokens, params.text.top_k) == (3, 4, 7)
    assert type(params.seed) is int and type(params.text.top_k) is int
    assert type(params.text.temperature) is float


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "cuda"}, "device 'cuda': CUDA is not available here"),
    ({"device": "tpu"}, r"device 'tpu' is not a device name \(cpu, cuda, cuda:1, ...\)"),
    ({"device": "cpu", "dtype": "int8"}, "dtype 'int8': use one of bf16, bfloat16"),
    ({"device": "cpu", "dtype": torch.int8}, "dtype torch.int8: the weights run in"),
    ({"max_batch_size": 0}, "max_batch_size must be >= 1, got 0"),
    # the reference's keyword: no waveform output here (load_detokenizer=False is the engine
    # fixture's, so every test on it loads the model that way)
    ({"load_detokenizer": True}, r"load_detokenizer=True: kimi_ops has no audio detokenizer"),
])
def test_bad_device_or_dtype_is_refused_before_loading(kwargs, message):
    from kimi_ops.engine.api import KimiAudio

    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InvalidArgumentError, match=message):
        KimiAudio(model_path=goldens.CHECKPOINT, **kwargs)


def test_dtype_by_name():
    from kimi_ops.engine.api import checked_dtype

    cpu = torch.device("cpu")
    assert checked_dtype("bfloat16", cpu) is torch.bfloat16 and checked_dtype("fp32", cpu) is (
        torch.float32)
    assert checked_dtype("torch.float16", cpu) is torch.float16
    assert checked_dtype(None, cpu) is torch.float32


def test_prefill_groups_bound_padding():
    from kimi_ops.engine.generate import prefill_groups

    assert prefill_groups([10, 9, 3, 2], max_padding=1.25, max_tokens=1000) == [[0, 1], [2, 3]]
    assert prefill_groups([5, 5, 5], max_padding=1.25, max_tokens=10) == [[0, 1], [2]]
    groups = prefill_groups([40, 300, 41, 299, 120], max_padding=1.25, max_tokens=10_000)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]


def test_key_spans_blocks_skip_left_padding():
    from kimi_ops.model.modeling import key_spans

    # keys end at column 100; rows start at 0, 5, 10, 40, 45, 60, 61, 90 (longest first)
    spans = key_spans([0, 5, 10, 40, 45, 60, 61, 90], 100, min_rows=2, shrink=0.8)
    assert spans == [(0, 3, 0), (3, 5, 40), (5, 7, 60), (7, 8, 90)]
    assert key_spans([0, 0, 0], 10) == [(0, 3, 0)]  # equal lengths: one block
    # rows out of order: 50, 100, 80, 90 keys stay one block read from its smallest first
    # column (0, not row 0's 50); 30 keys < 0.8 * 50 starts the next
    assert key_spans([50, 0, 20, 10, 70], 100, min_rows=1) == [(0, 4, 0), (4, 5, 70)]


def test_decode_attention_blocks_equal_the_full_padded_read():
    from kimi_ops.model.modeling import decode_attention, key_spans, mask_bias

    torch.manual_seed(0)
    starts = [0, 3, 9, 20, 21, 30]
    k, v = torch.randn(6, 2, 32, 8), torch.randn(6, 2, 32, 8)
    q = torch.randn(6, 4, 1, 8)
    mask = (torch.arange(32)[None] >= torch.tensor(starts)[:, None])[:, None, None]
    bias = mask_bias(mask, torch.float32)
    spans = key_spans(starts, 32, min_rows=2)
    assert len(spans) > 1
    full = decode_attention(q, k, v, bias)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                               enable_gqa=True)
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decode_attention(q, k, v, bias, spans), full, rtol=1e-5, atol=1e-6)


def test_many_mixed_length_rows_decode_in_blocks_equal_to_single(tiny_model, tokenizer,
                                                                   golden_prompts):
    """Enough rows of spread lengths that decode attention runs in several row blocks, and
    that the CPU decode steps take `Linear`'s transposed product (16-48 rows)."""
    from kimi_ops.model.modeling import key_spans, small_gemm_rows

    base = sorted((golden_prompts[c] for c in GENERATION_CASES), key=len)
    prompts = base * 2  # duplicates in one batch, shuffled order on purpose
    prompts = prompts[::2] + prompts[1::2]
    width = max(len(p) for p in prompts)
    first_key = sorted(width - len(p) for p in prompts)
    assert len(key_spans(first_key, width)) > 1, "the batch should split into row blocks"
    assert small_gemm_rows(torch.zeros(len(prompts), 1, 8)), "the batch should be 16-48 rows"
    batched = run(tiny_model, tokenizer, prompts, max_new_tokens=12)
    for prompt, res in zip(prompts, batched):
        assert res.text_token_ids == run(tiny_model, tokenizer, [prompt],
                                         max_new_tokens=12)[0].text_token_ids


@pytest.fixture
def small_chunks(monkeypatch):
    """Static caches that grow every 8 columns, so short runs cross several regrowths."""
    from kimi_ops.engine.decoders import StaticDecoder

    monkeypatch.setattr(StaticDecoder, "CHUNK", 8)


def test_static_decoder_matches_reference_and_dynamic(tiny_model, tokenizer, golden_prompts,
                                                      small_chunks):
    """The fixed-shape (CUDA-graph) decoder, run eagerly here: same greedy tokens as the
    reference and as the dynamic decoder, with rows finishing at different times (slots idle,
    then compaction) and the cache regrown mid-run."""
    expected = goldens.load_json("generation.json")
    prompts = [golden_prompts[c] for c in GENERATION_CASES]
    static = generate_batch(tiny_model, prompts, tokenizer.special,
                            GenerationParams(max_new_tokens=24), static_cache=True)
    for case, res in zip(GENERATION_CASES, static):
        assert res.text_token_ids == expected[case]["text_tokens_from_generate_loop"], case
        assert res.steps == expected[case]["steps_run"], case
    assert len({r.steps for r in static}) > 1, "rows should stop at different steps"


@pytest.mark.parametrize("params", [
    {"max_new_tokens": 30, "output_type": "both"},
    {"max_new_tokens": 20, "seed": 3, "text": StreamSampling(temperature=1.0, top_k=20)},
    {"max_new_tokens": 30, "text": StreamSampling(repetition_penalty=1.3, repetition_window=4)},
], ids=["both", "sampled", "penalty"])
def test_static_decoder_equals_dynamic(tiny_model, tokenizer, golden_prompts, small_chunks,
                                       params):
    prompts = [golden_prompts[c] for c in GENERATION_CASES]
    gen = GenerationParams(**params).validate()
    dynamic = generate_batch(tiny_model, prompts, tokenizer.special, gen, static_cache=False)
    static = generate_batch(tiny_model, prompts, tokenizer.special, gen, static_cache=True)
    for d, s in zip(dynamic, static):
        assert (s.text_token_ids, s.audio_token_ids, s.finish_reason, s.steps) == \
            (d.text_token_ids, d.audio_token_ids, d.finish_reason, d.steps)
        np.testing.assert_allclose(s.text_logprobs, d.text_logprobs, rtol=0,
                                   atol=goldens.fp32_logprob_tolerance())


def test_static_decoder_is_the_cuda_default_and_can_be_turned_off(monkeypatch):
    from kimi_ops.engine.decoders import CUDA_GRAPHS_ENV, use_static_decoder

    assert use_static_decoder(torch.device("cuda")) and not use_static_decoder(torch.device("cpu"))
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "0")
    assert not use_static_decoder(torch.device("cuda"))


def running_out_of_memory_above(limit: int, real, calls: list[int]):
    """`real` that raises the device's out-of-memory error for more than `limit` items."""

    def run(first, *args, **kwargs):
        items = args[0] if not isinstance(first, list) else first
        calls.append(len(items))
        if len(items) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(first, *args, **kwargs)

    return run


@pytest.mark.parametrize("decoder", ["dynamic", "static"])
@pytest.mark.parametrize("params", [
    dict(max_new_tokens=12),
    dict(max_new_tokens=12, seed=5, text=StreamSampling(temperature=0.9, top_k=20)),
    dict(max_new_tokens=12, text=StreamSampling(repetition_penalty=1.3, repetition_window=3)),
    dict(max_new_tokens=14, output_type="both"),
], ids=["greedy", "sampled", "penalised", "both"])
def test_continuous_batching_fills_freed_slots_with_the_single_calls_tokens(
        tiny_model, tokenizer, golden_prompts, small_chunks, params, decoder):
    """Three slots for eight prompts of different lengths: rows that end are replaced by queued
    prompts at once, so the decode forwards carry more rows than fixed batches of three run
    to their longest row, and every row's tokens (and audio tokens, and sampled draws, by
    their per-row seeds) are those of the prompt run alone. With either decoder: the
    fixed-shape one (CUDA graphs, run eagerly here) writes a newcomer into a freed slot, and
    its cache grows every 8 columns here, so newcomers also land across regrowths."""
    prompts = list(golden_prompts.values())
    generation = GenerationParams(**params).validate()
    singles = [generate_batch(tiny_model, [p], tokenizer.special, generation, seed_ids=[i])[0]
               for i, p in enumerate(prompts)]
    continuous = DecodeCounts()
    got = generate_continuous(tiny_model, prompts, tokenizer.special, generation, max_rows=3,
                              max_tokens=1 << 20, seed_ids=range(len(prompts)),
                              counts=continuous, static_cache=decoder == "static")
    for res, single in zip(got, singles):
        assert (res.text_token_ids, res.audio_token_ids, res.finish_reason, res.steps) == (
            single.text_token_ids, single.audio_token_ids, single.finish_reason, single.steps)
    # today's static batches of three, longest first, for comparison
    static = DecodeCounts()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), 3):
        rows = order[start:start + 3]
        generate_batch(tiny_model, [prompts[i] for i in rows], tokenizer.special, generation,
                       seed_ids=rows, counts=static)
    assert continuous.rows == static.rows == sum(r.steps - 1 for r in singles)
    if len({r.steps for r in singles}) > 1:  # (with output "both" here every row runs 14)
        assert continuous.forwards < static.forwards
        assert continuous.occupancy(3) > static.occupancy(3)
    else:
        assert continuous.forwards == static.forwards


def test_a_newcomer_takes_a_freed_static_slot_in_place(tiny_model, tokenizer, golden_prompts):
    """The fixed-shape decoder keeps a captured CUDA graph valid across admissions: a newcomer
    no longer than the cursor goes into a freed slot of the same tensors (no reallocation),
    and one longer than the cursor moves the live rows right into a larger state instead."""
    from kimi_ops.engine.decoders import StaticDecoder
    from kimi_ops.engine.generate import prefill

    special = tokenizer.special
    prompts = sorted(golden_prompts.values(), key=len)
    short, mid, long = prompts[0], prompts[len(prompts) // 2], prompts[-1]
    cache, valid, _, _ = prefill(tiny_model, [mid, mid], special.pad, False, 4)
    positions = torch.tensor([[len(mid) - 1]] * 2)
    decoder = StaticDecoder(tiny_model, cache, valid, positions, False, special.text_blank,
                            budget=64, cuda_graph=False)
    decoder.step([special.text_blank] * 2, [special.text_blank] * 2)
    decoder.refilling = True
    decoder.keep([1])  # slot 0 frees, and is kept for a newcomer
    tensors = [t.data_ptr() for t in decoder.cache.keys + [decoder.valid, decoder.positions]]
    cache, valid, _, _ = prefill(tiny_model, [short], special.pad, False, 4)
    decoder.add(cache, valid, torch.tensor([[len(short) - 1]]), [0])
    assert decoder.slots == [1, 0] and decoder.width == len(mid) + 1
    assert [t.data_ptr() for t in decoder.cache.keys + [decoder.valid, decoder.positions]] \
        == tensors
    assert decoder.valid[0].sum() == len(short) and decoder.valid[0, -1] == 0
    assert decoder.valid[0, decoder.width - len(short):decoder.width].all()
    cache, valid, _, _ = prefill(tiny_model, [long], special.pad, False, 4)
    decoder.add(cache, valid, torch.tensor([[len(long) - 1]]), [0])
    assert decoder.width == len(long) and decoder.valid.shape[0] == 3
    assert decoder.valid.sum(1).tolist() == [len(mid) + 1, len(short), len(long)]


def test_continuous_batching_admits_no_row_past_the_token_bound(tiny_model, tokenizer,
                                                                golden_prompts):
    """`max_tokens` bounds rows x the widest row's keys: below two of the shortest prompts the
    rows run one by one (a lone row always runs), still with the single calls' tokens."""
    prompts = list(golden_prompts.values())[:4]
    generation = GenerationParams(max_new_tokens=5).validate()
    counts = DecodeCounts()
    got = generate_continuous(tiny_model, prompts, tokenizer.special, generation, max_rows=4,
                              max_tokens=2 * min(len(p) for p in prompts) - 1, counts=counts)
    assert counts.rows == counts.forwards  # one row per forward
    for prompt, res in zip(prompts, got):
        single = generate_batch(tiny_model, [prompt], tokenizer.special, generation)[0]
        assert res.text_token_ids == single.text_token_ids


def test_each_prompt_can_have_its_own_budget_in_either_batching(tiny_model, tokenizer,
                                                                golden_prompts):
    """`max_new_tokens` per prompt (a benchmark's fixed output lengths): each row stops at its
    own budget, or earlier at its EOS as it would alone, with the single call's tokens."""
    prompts = list(golden_prompts.values())
    generation = GenerationParams(max_new_tokens=12).validate()
    budgets = [1 + (3 * i) % 11 for i in range(len(prompts))]
    for run in (
            lambda: generate_continuous(tiny_model, prompts, tokenizer.special, generation,
                                        max_rows=3, max_tokens=1 << 20, max_new_tokens=budgets),
            lambda: generate_batch(tiny_model, prompts, tokenizer.special, generation,
                                   max_new_tokens=budgets)):
        for prompt, budget, res in zip(prompts, budgets, run()):
            alone = generate_batch(tiny_model, [prompt], tokenizer.special,
                                   GenerationParams(max_new_tokens=budget).validate())[0]
            assert res.steps <= budget
            assert (res.text_token_ids, res.steps, res.finish_reason) == (
                alone.text_token_ids, alone.steps, alone.finish_reason)
    with pytest.raises(InvalidArgumentError, match="2 values for 8 prompts"):
        generate_batch(tiny_model, prompts, tokenizer.special, generation,
                       max_new_tokens=[3, 4])


GENERATE_BY_BATCHING = {"continuous": "generate_continuous", "static": "generate_batch"}


@pytest.mark.parametrize("batching", list(GENERATE_BY_BATCHING))
def test_out_of_memory_halves_the_generation_and_changes_no_token(engine, golden_prompts,
                                                                  monkeypatch, caplog, batching):
    """The device running out of memory on a batch re-runs it in halves, in either batching:
    the same tokens (sampled ones too: per-row seeds)."""
    import kimi_ops.engine.api as api
    from kimi_ops.engine.api import sampling_params

    monkeypatch.setattr(engine, "batching", batching)
    prompts = list(golden_prompts.values())
    params = sampling_params(text_temperature=0.8, text_top_k=5, max_new_tokens=6)
    expected = [r.text_token_ids for r in engine.run_prompts(prompts, params)]
    calls: list[int] = []
    name = GENERATE_BY_BATCHING[batching]
    monkeypatch.setattr(api, name, running_out_of_memory_above(2, getattr(api, name), calls))
    with caplog.at_level("WARNING", logger="kimi_ops.engine.api"):
        got = engine.run_prompts(prompts, params)
    assert [r.text_token_ids for r in got] == expected
    assert calls == [8, 4, 2, 2, 4, 2, 2]
    assert "generation: out of memory with 8 at once" in caplog.text


def test_out_of_memory_halves_scoring_and_encoding_and_changes_no_result(engine, monkeypatch):
    """Option scoring and the front-end: the device running out of memory on a batch re-runs
    it in halves, with the scores and features of the halves' own shapes."""
    import kimi_ops.engine.api as api
    from kimi_ops.tasks import get_task

    clips = [str(goldens.INPUTS / n) for n in ("a01_tone_0p5s_16k.wav", "a02_chirp_3s_16k.wav",
                                               "a06_speech_2p37s_16k.flac")]
    emotion = get_task("emotion")
    conversations = [emotion.messages(c) for c in clips]
    labels = list(emotion.labels)
    # Halving ends with one item per call here; a batch of another shape would differ from it
    # by fp32 rounding (the GEMMs' reduction order depends on the batch's shape, and by how
    # much depends on the CPU's kernels: 7e-6 relative on AMD EPYC). So the halves are compared
    # with the same items run one at a time, directly: the same shapes, bitwise the same.
    expected_probs = [engine.score_options([c], labels)[0].probs for c in conversations]
    expected_features = [engine.encode_audio([c])[0].features for c in clips]
    monkeypatch.setattr(api, "score_continuations",
                        running_out_of_memory_above(1, api.score_continuations, calls := []))
    monkeypatch.setattr(engine.frontend, "encode",
                        running_out_of_memory_above(1, engine.frontend.encode, encoded := []))
    scores = engine.score_options(conversations, labels)
    assert calls[0] == 3 and max(calls[1:]) < 3 and calls.count(1) >= 3
    for got_probs, want in zip([s.probs for s in scores], expected_probs):
        np.testing.assert_array_equal(got_probs, want)
    for enc, features in zip(engine.encode_audio(clips), expected_features):
        torch.testing.assert_close(enc.features, features, rtol=0, atol=0)
    assert encoded[0] == 3 and encoded.count(1) >= 3


@pytest.mark.parametrize("batching", list(GENERATE_BY_BATCHING))
def test_out_of_memory_on_a_single_item_is_raised(engine, golden_prompts, monkeypatch,
                                                  batching):
    import kimi_ops.engine.api as api
    from kimi_ops.engine.api import sampling_params

    monkeypatch.setattr(engine, "batching", batching)
    name = GENERATE_BY_BATCHING[batching]
    monkeypatch.setattr(api, name, running_out_of_memory_above(0, getattr(api, name),
                                                               calls := []))
    with pytest.raises(torch.OutOfMemoryError):
        engine.run_prompts(list(golden_prompts.values())[:2], sampling_params(max_new_tokens=2))
    assert calls == [2, 1]  # halved once, then the lone prompt's error is the caller's


def test_bf16_the_gpu_default_dtype_runs_the_same_paths_on_cpu(golden_prompts):
    """bf16 is what a GPU gets by default; here it runs on CPU through the same code: the
    fixed-shape (CUDA-graph) decoder equals the dynamic one and the first tokens are fp32's.
    (A batch is not bitwise its singles in bf16: a row's rounding depends on the batch's
    shapes, so long greedy runs can part at a near tie; fp32 keeps them equal.)"""
    from kimi_ops.engine.api import KimiAudio
    from kimi_ops.model.modeling import KimiAudioForCausalLM

    engine = KimiAudio(goldens.CHECKPOINT, device="cpu", dtype=torch.bfloat16)
    model: KimiAudioForCausalLM = engine.model
    assert model.lm_head.weight.dtype == torch.bfloat16
    special = engine.tokenizer.special
    prompts = [golden_prompts[c] for c in GENERATION_CASES]
    for params in ({"max_new_tokens": 24}, {"max_new_tokens": 24, "output_type": "both"}):
        gen = GenerationParams(**params).validate()
        dynamic = generate_batch(model, prompts, special, gen, static_cache=False)
        static = generate_batch(model, prompts, special, gen, static_cache=True)
        assert [(r.text_token_ids, r.audio_token_ids, r.steps) for r in static] == \
            [(r.text_token_ids, r.audio_token_ids, r.steps) for r in dynamic]
    assert any(r.audio_token_ids for r in dynamic)

    expected = goldens.load_json("pure_fp32/generation.json")
    first = generate_batch(model, prompts, special, GenerationParams(max_new_tokens=1))
    agree = sum(r.text_token_ids[:1] == expected[c]["text_tokens_from_generate_loop"][:1]
                for c, r in zip(GENERATION_CASES, first))
    assert agree >= len(prompts) - 1  # bf16 rounding may flip a near tie, not the first tokens


@pytest.mark.parametrize("content, message", [
    (5, r"conversations\[1\]\[1\] \(int\): audio must be a file path, bytes or a \(waveform, "
        r"sample_rate\) pair, got int"),
    ([0.1, 0.2], r"conversations\[1\]\[1\] \(waveform\): a bare waveform has no sample rate: "
                 r"pass \(waveform, sample_rate\)"),
    ("", r"conversations\[1\]\[1\] \(empty path\): the audio path is empty"),
    (b"junk" * 10, r"conversations\[1\]\[1\] \(bytes\): cannot decode audio"),
])
def test_audio_without_a_name_is_located_in_the_call(engine, content, message):
    """Bytes and waveforms have no path to name them: the error says which conversation and
    message hold them."""
    from kimi_ops.errors import AudioError

    ok = [{"role": "user", "message_type": "audio",
           "content": str(goldens.INPUTS / "a01_tone_0p5s_16k.wav")}]
    bad = [{"role": "user", "message_type": "text", "content": "hi"},
           {"role": "user", "message_type": "audio", "content": content}]
    with pytest.raises(AudioError, match=message):
        engine.generate_batch([ok, bad], max_new_tokens=2)


def test_a_prompt_past_the_default_budget_is_said_not_silent(engine, caplog):
    """The reference's default budget is 7500 - prompt tokens: a 610 s clip (about 7,630 prompt
    tokens) gets no output at all, which the call now says, as it does for prompts past the
    model's positions."""
    import logging

    wave = np.zeros(16000 * 610, np.float32)
    wave[::50] = 0.1
    (encoding,) = engine.encode_audio([(wave, 16000)])  # once for both calls: 21 windows
    conversation = [{"role": "user", "message_type": "audio", "content": encoding}]
    with caplog.at_level(logging.WARNING, logger="kimi_ops.engine.api"):
        result = engine.generate_batch([conversation])[0]
    assert result.steps == 0 and result.finish_reason == "length" and result.text == ""
    assert "leave no room in the default budget (7500 - prompt tokens)" in caplog.text
    assert f"[{result.prompt_tokens}]" in caplog.text
    assert "reach past the model's" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kimi_ops.engine.api"):
        engine.generate_batch([conversation], max_new_tokens=1)
    assert "leave no room" not in caplog.text
