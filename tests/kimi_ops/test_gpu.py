"""GPU checks (marker `gpu`): run where CUDA is present, e.g. on a lent device machine."""

import pytest
import torch

from kimi_ops.engine.api import KimiAudio
from tests import goldens

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GEN_CASES = list(goldens.load_json("generation.json"))


def golden_conversations():
    prompts = goldens.prompts()
    return [[{**m, "content": str(goldens.INPUTS / m["content"])} if m["message_type"] == "audio"
             else m for m in prompts[c]["messages"]] for c in GEN_CASES]


def test_cuda_fp32_greedy_tokens_match_reference():
    engine = KimiAudio(goldens.CHECKPOINT, device="cuda", dtype=torch.float32)
    results = engine.generate_batch(golden_conversations(), max_new_tokens=24)
    expected = goldens.load_json("generation.json")
    for case, res in zip(GEN_CASES, results):
        assert res.text_token_ids == expected[case]["text_tokens_from_generate_loop"], case


def test_cuda_defaults_to_bf16_and_runs_batched():
    engine = KimiAudio(goldens.CHECKPOINT, device="cuda")
    assert engine.dtype == torch.bfloat16
    conversations = golden_conversations()
    batched = engine.generate_batch(conversations, max_new_tokens=24)
    assert len(batched) == len(conversations)
    assert all(r.finish_reason in ("stop", "length") for r in batched)


def test_cuda_graph_decoder_equals_dynamic_decoder():
    """CUDA decodes through replayed CUDA graphs by default; same tokens as the eager path."""
    from kimi_ops.engine.generate import GenerationParams, generate_batch

    engine = KimiAudio(goldens.CHECKPOINT, device="cuda", dtype=torch.float32)
    prompts = engine.build_prompts(golden_conversations())
    params = GenerationParams(max_new_tokens=40).validate()
    special = engine.tokenizer.special
    graphs = generate_batch(engine.model, prompts, special, params)
    eager = generate_batch(engine.model, prompts, special, params, static_cache=False)
    assert [r.text_token_ids for r in graphs] == [r.text_token_ids for r in eager]


def test_cuda_continuous_batching_refills_graph_slots_with_the_single_calls_tokens():
    """Continuous batching on CUDA: newcomers take freed slots of the replayed graph; fp32
    tokens equal each prompt run alone, with fewer forwards than fixed batches."""
    from kimi_ops.engine.generate import (DecodeCounts, GenerationParams, generate_batch,
                                          generate_continuous)

    engine = KimiAudio(goldens.CHECKPOINT, device="cuda", dtype=torch.float32)
    prompts = engine.build_prompts(golden_conversations())
    params = GenerationParams(max_new_tokens=24).validate()
    special = engine.tokenizer.special
    singles = [generate_batch(engine.model, [p], special, params)[0] for p in prompts]
    counts = DecodeCounts()
    got = generate_continuous(engine.model, prompts, special, params, max_rows=3,
                              max_tokens=1 << 20, counts=counts)
    assert [r.text_token_ids for r in got] == [r.text_token_ids for r in singles]
    assert counts.rows == sum(r.steps - 1 for r in singles)
