"""GPU benchmark: a Kimi-Audio-7B-shaped model with random bf16 weights, ASR-shaped prompts.

No download: the model, the Whisper-large-v3 encoder and the GLM-4-Voice VQ encoder are built
with their real shapes (`../shared/docs/kimi_audio_spec.md` §1.1, §2.4, §2.5) and random weights
directly on the device, then driven through the same code as production: the front-end
(`AudioFrontend.encode` on 30 s clips), the prompt builder (ASR instruction + one audio
message) and the batched engine (`generate_batch`, text-only path) with a fixed output length.

Reported per batch size: real-time factor (audio seconds labelled per wall second, front-end
+ prefill + decode), decode step time vs the memory-bandwidth roofline (text-path weights + KV
cache read once per step), prefill FLOP/s vs the measured bf16 matmul ceiling, and front-end
time. Then continuous against static batching on a labelling mix (ASR and caption prompts over
clips of 1-30 s, output lengths drawn as a labelling job's come out, `bench/engine.py`'s
`drawn_lengths`): decode-slot occupancy, decode forwards, generated tokens/s and whether the
tokens agree. Results go to `bench/results/gpu-<card>.json`.

    python bench/gpu.py [--batch-sizes 1 32 128] [--new-tokens 64] [--mix 128 --rows 32]
    python bench/gpu.py --shape tiny --device cpu --batch-sizes 2 --new-tokens 4  # smoke test
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine import ASR_PROMPT, drawn_lengths, machine  # noqa: E402

from kimi_ops.engine.generate import (DecodeCounts, GenerationParams, generate_batch,  # noqa: E402
                                      generate_continuous, prefill)
from kimi_ops.engine.prompt import build_prompt  # noqa: E402
from kimi_ops.frontend import AudioFrontend  # noqa: E402
from kimi_ops.frontend.encoder import AudioEncoder, EncoderConfig  # noqa: E402
from kimi_ops.frontend.glm_vq import GlmVqTokenizer  # noqa: E402
from kimi_ops.frontend.kimi_whisper import KimiWhisperEncoder  # noqa: E402
from kimi_ops.model.config import KimiAudioConfig  # noqa: E402
from kimi_ops.model.modeling import KimiAudioForCausalLM  # noqa: E402
from kimi_ops.model.text_tokenizer import SpecialIds  # noqa: E402

CLIP_SECONDS = 30.0
SAMPLE_RATE = 16000
INSTRUCTION_TOKENS = 8  # "请将音频内容转换为文字。" is about this long in the real tokenizer

# Kimi-Audio-7B-Instruct (spec §1.1); `tiny` keeps every structural feature at toy width
LLM = {
    "7b": dict(vocab_size=168448, hidden_size=3584, intermediate_size=18944,
               num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               kimia_mimo_layers=6, kimia_mimo_transformer_from_layer_index=21,
               kimia_adaptor_input_dim=5120, num_base_tokens=151643, kimia_token_offset=152064),
    "tiny": dict(vocab_size=1957, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, kimia_mimo_layers=1,
                 kimia_mimo_transformer_from_layer_index=0, kimia_adaptor_input_dim=64,
                 num_base_tokens=512, kimia_token_offset=933),
}
# Whisper-large-v3 encoder (spec §2.4) and the GLM-4-Voice VQ encoder up to its quantiser (§2.5)
WHISPER = {"7b": dict(d_model=1280, num_heads=20, ffn_dim=5120, num_layers=32),
           "tiny": dict(d_model=16, num_heads=2, ffn_dim=32, num_layers=1)}
GLM = {"7b": dict(d_model=1280, num_heads=20, ffn_dim=5120, num_layers=16, codebook_size=16384),
       "tiny": dict(d_model=16, num_heads=2, ffn_dim=32, num_layers=1, codebook_size=128)}


def llm_config(shape: str) -> KimiAudioConfig:
    llm = dict(LLM[shape])
    base = llm.pop("num_base_tokens")
    special = SpecialIds.from_base(base)
    return KimiAudioConfig(
        **llm, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=8192,
        kimia_media_begin=special.media_begin, kimia_media_end=special.media_end,
        pad_token_id=special.pad, kimia_text_output_vocab=llm["kimia_token_offset"])


def randomize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Materialise a meta-built module on `device` with small random weights (norms at 1)."""
    module = module.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias") or "norm" in name:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for _, b in module.named_buffers():
            if b.is_floating_point():
                b.zero_()
    return module.eval().requires_grad_(False)


def build(shape: str, device: torch.device, dtype: torch.dtype):
    config = llm_config(shape)
    with torch.device("meta"):
        model = KimiAudioForCausalLM(config)
        whisper = AudioEncoder(EncoderConfig(**WHISPER[shape]))
        glm_cfg = EncoderConfig(**GLM[shape], causal_conv=True, block_size=200,
                                pooling_kernel=4, quantize_position=GLM[shape]["num_layers"],
                                pooling_position=GLM[shape]["num_layers"],
                                codebook_positions=375, final_layer_norm=False)
        glm = AudioEncoder(glm_cfg)
    model = randomize(model, device, dtype)
    model.fuse_projections()  # as `load_state_dict` does for a real checkpoint
    frontend = AudioFrontend(GlmVqTokenizer(randomize(glm, device, dtype, seed=1)),
                             KimiWhisperEncoder(randomize(whisper, device, dtype, seed=2)))
    return config, model, frontend


class _Instruction:
    """The prompt builder's tokenizer interface for a fixed-length instruction."""

    def __init__(self, special: SpecialIds):
        self.special = special

    def encode(self, text: str) -> list[int]:
        return list(range(100, 100 + INSTRUCTION_TOKENS))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def peak_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large on-device copy (read + write)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 25)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _, seconds = timed(lambda: [dst.copy_(src) for _ in range(5)], device)
    return 2 * n * 5 / seconds


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _, seconds = timed(lambda: [a @ b for _ in range(10)], device)
    return 2 * n**3 * 10 / seconds


def text_path_bytes(config: KimiAudioConfig, model: KimiAudioForCausalLM) -> int:
    """Weights a text-only decode step reads: the backbone layers, final norm and lm_head."""
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    return sum(size(layer) for layer in model.model.layers) + size(model.model.norm) \
        + size(model.lm_head)


def prefill_flops(config: KimiAudioConfig, lengths: list[int]) -> float:
    """Matmul FLOPs of a text-path prefill: projections and MLP per token, causal attention,
    lm_head at the last position (the VQ adaptor is left out: small)."""
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    per_token = 2 * config.num_hidden_layers * (2 * h * h + 2 * h * kv
                                                + 3 * h * config.intermediate_size)
    attention = sum(2 * config.num_hidden_layers * n * n * h for n in lengths)  # QK^T + PV, /2
    return per_token * sum(lengths) + attention + 2 * h * config.vocab_size * len(lengths)


def run(shape: str, device: torch.device, dtype: torch.dtype, batch_sizes: list[int],
        new_tokens: int, mix: tuple[int, int, int] = (0, 0, 0)) -> dict:
    config, model, frontend = build(shape, device, dtype)
    special = SpecialIds.from_base(LLM[shape]["num_base_tokens"])
    tokenizer = _Instruction(special)
    messages = [{"role": "user", "message_type": "text", "content": "asr"},
                {"role": "user", "message_type": "audio", "content": "clip"}]
    rng = np.random.default_rng(0)
    bandwidth, ceiling = peak_bandwidth(device), matmul_ceiling(device, dtype)
    weights = text_path_bytes(config, model)
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads \
        * config.head_dim * torch.finfo(dtype).bits // 8
    params = GenerationParams(max_new_tokens=new_tokens).validate()
    one = GenerationParams(max_new_tokens=1)
    runs = []
    for batch in batch_sizes:
        waves = [(0.1 * rng.standard_normal(int(CLIP_SECONDS * SAMPLE_RATE))).astype(np.float32)
                 for _ in range(batch)]
        frontend.encode(waves[:1])  # warm-up
        encodings, front_s = timed(lambda w=waves: frontend.encode(w), device)
        prompts = [build_prompt(messages, [enc], tokenizer, config.kimia_token_offset)
                   for enc in encodings]
        generate_batch(model, prompts[:1], special, GenerationParams(max_new_tokens=2))
        _, prefill_s = timed(lambda p=prompts: prefill(model, p, special.pad, False, 1), device)
        # decode steps = the difference between a full run and a one-token run (same prefill)
        _, first_s = timed(lambda p=prompts: generate_batch(model, p, special, one), device)
        results, generate_s = timed(
            lambda p=prompts: generate_batch(model, p, special, params), device)
        steps = max(r.steps for r in results)
        decode_s = max(generate_s - first_s, 1e-9)
        step_s = decode_s / max(steps - 1, 1)
        mean_len = sum(len(p) for p in prompts) / batch + steps / 2
        roofline_s = (weights + batch * mean_len * kv_per_token) / bandwidth
        total_s = front_s + generate_s
        runs.append({
            "batch": batch, "prompt_tokens": len(prompts[0]), "new_tokens": steps,
            "frontend_s": front_s, "prefill_s": prefill_s, "decode_s": decode_s,
            "real_time_factor": batch * CLIP_SECONDS / total_s,
            "decode_step_ms": 1e3 * step_s, "roofline_step_ms": 1e3 * roofline_s,
            "decode_vs_roofline": roofline_s / step_s,
            "prefill_tflops": prefill_flops(config, [len(p) for p in prompts]) / prefill_s / 1e12,
        })
    conversations, rows, budget = mix
    return {"shape": shape, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "clip_seconds": CLIP_SECONDS, "peak_bandwidth_gbs": bandwidth / 1e9,
            "matmul_ceiling_tflops": ceiling / 1e12, "text_path_weight_gb": weights / 1e9,
            "runs": runs,
            "labelling_mix": labelling_mix(model, frontend, config, special, device,
                                           conversations, rows, budget)
            if conversations else None}


def labelling_mix(model, frontend, config, special, device, conversations: int, rows: int,
                  budget: int, seed: int = 0) -> dict:
    """Continuous against static batching (fixed batches of `rows`, longest prompt first, each
    run to its last row) on ASR and caption prompts over clips of 1-30 s, each row's output
    length drawn as a labelling job's (random weights never stop by themselves)."""
    rng = np.random.default_rng(seed)
    seconds = [float(s) for s in rng.uniform(1.0, CLIP_SECONDS, (conversations + 1) // 2)]
    waves = [(0.1 * rng.standard_normal(int(s * SAMPLE_RATE))).astype(np.float32)
             for s in seconds]
    encodings = frontend.encode(waves)
    kinds = [ASR_PROMPT, "Describe the audio: a caption."]
    messages = [{"role": "user", "message_type": "text", "content": "task"},
                {"role": "user", "message_type": "audio", "content": "clip"}]
    tokenizer = _Instruction(special)
    prompts = [build_prompt(messages, [enc], tokenizer, config.kimia_token_offset)
               for enc in encodings for _ in kinds][:conversations]
    texts = [k for _ in encodings for k in kinds][:conversations]
    lengths = drawn_lengths(texts, [s for s in seconds for _ in kinds][:conversations], budget)
    params = GenerationParams(max_new_tokens=budget).validate()
    generate_batch(model, prompts[:2], special, GenerationParams(max_new_tokens=2))  # warm-up
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))

    def static(counts):
        out = {}
        for start in range(0, len(order), rows):
            batch = order[start:start + rows]
            got = generate_batch(model, [prompts[i] for i in batch], special, params,
                                 seed_ids=batch, counts=counts,
                                 max_new_tokens=[lengths[i] for i in batch])
            out.update(zip(batch, got))
        return [out[i] for i in range(len(prompts))]

    def continuous(counts):
        return generate_continuous(model, prompts, special, params, rows, 1 << 40,
                                   seed_ids=range(len(prompts)), counts=counts,
                                   max_new_tokens=lengths)

    arms, tokens = [], {}
    for name, run in (("static", static), ("continuous", continuous)):
        counts = DecodeCounts()
        results, seconds_run = timed(lambda r=run, c=counts: r(c), device)
        tokens[name] = [r.text_token_ids for r in results]
        generated = sum(r.steps for r in results)
        arms.append({"arm": name, "occupancy": counts.occupancy(rows),
                     "decode_forwards": counts.forwards, "decode_rows": counts.rows,
                     "seconds": seconds_run, "generated_tokens": generated,
                     "tokens_per_s": generated / seconds_run})
    agree = sum(a == b for a, b in zip(tokens["static"], tokens["continuous"]))
    return {"conversations": len(prompts), "rows": rows, "max_new_tokens": budget,
            "mean_output_tokens": sum(lengths) / len(lengths),
            "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
            # in bf16 a row's rounding depends on its batch's shapes, so a long greedy output
            # can part at a near tie (fp32 keeps them equal: the CPU tests check that)
            "rows_with_equal_tokens": agree, "arms": arms}


def print_table(r: dict) -> None:
    print(f"\nKimi-Audio {r['shape']}-shaped, random {r['dtype']} weights, {r['device']}: "
          f"{r['clip_seconds']:.0f} s ASR clips; copy bandwidth {r['peak_bandwidth_gbs']:.0f} GB/s,"
          f" matmul ceiling {r['matmul_ceiling_tflops']:.1f} TFLOP/s")
    head = ("batch", "x real time", "front-end s", "prefill s", "decode s", "step ms",
            "roofline ms", "of roofline", "prefill TFLOP/s")
    print("".join(f"{h:>16}" for h in head))
    for x in r["runs"]:
        cells = (x["batch"], f"{x['real_time_factor']:.0f}x", f"{x['frontend_s']:.2f}",
                 f"{x['prefill_s']:.2f}", f"{x['decode_s']:.2f}", f"{x['decode_step_ms']:.1f}",
                 f"{x['roofline_step_ms']:.1f}", f"{x['decode_vs_roofline']:.0%}",
                 f"{x['prefill_tflops']:.1f}")
        print("".join(f"{c:>16}" for c in cells))
    mix = r.get("labelling_mix")
    if mix:
        print(f"\nlabelling mix: {mix['conversations']} conversations, {mix['rows']} rows, "
              f"{mix['mean_output_tokens']:.1f} output tokens on average; tokens equal in "
              f"{mix['rows_with_equal_tokens']} of {mix['conversations']} rows")
        head = ("batching", "occupancy", "forwards", "seconds", "tokens/s")
        print("".join(f"{h:>16}" for h in head))
        for a in mix["arms"]:
            cells = (a["arm"], f"{a['occupancy']:.2f}", a["decode_forwards"],
                     f"{a['seconds']:.2f}", f"{a['tokens_per_s']:.0f}")
            print("".join(f"{c:>16}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(LLM), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--mix", type=int, default=128, metavar="CONVERSATIONS",
                        help="labelling-mix conversations for continuous vs static (0: skip)")
    parser.add_argument("--rows", type=int, default=32, help="rows decoding at once in the mix")
    parser.add_argument("--mix-budget", type=int, default=160,
                        help="most output tokens per row in the mix (ASR of 30 s: about 105)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here (use --device cpu --shape tiny to smoke-test)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.inference_mode():
        result = run(args.shape, device, dtype, args.batch_sizes, args.new_tokens,
                     mix=(args.mix, args.rows, args.mix_budget))
    result["machine"] = machine()
    print_table(result)
    card = result["machine"]["cuda"] if device.type == "cuda" else f"cpu-{args.shape}"
    path = Path(args.out) / f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', card).strip('-').lower()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
