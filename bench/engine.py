"""Engine throughput: `generate_batch` vs a loop of single calls, on the `small` random checkpoint.

Both arms run the same conversations (ASR prompt + one clip of 1-25 s, mixed lengths) with
greedy decoding and a fixed token budget (random weights never stop early), end to end: audio
decode, front-end, prefill, decode loop. The batched tokens must equal the single-call tokens.
The sweep over budgets shows where the time goes: the front-end and prefill are compute-bound
and cost the same in both arms, batching pays off in the memory-bound decode loop, so the
end-to-end ratio climbs towards the decode-only ratio as outputs get longer.

    .venv/bin/python bench/engine.py [--conversations 32] [--max-new-tokens 16 64 256]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from kimi_ops.engine.api import KimiAudio, sampling_params
from kimi_ops.model.tiny_checkpoint import make_tiny_checkpoint

ASR_PROMPT = "请将音频内容转换为文字。"


def machine() -> dict:
    import os
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def write_clips(folder: Path, count: int, seed: int = 0, low: float = 1.0,
                high: float = 25.0) -> list[Path]:
    """Chirps with noise, `low`-`high` seconds, 16 kHz WAV."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        seconds = float(rng.uniform(low, high))
        t = np.arange(int(seconds * 16000)) / 16000
        f0 = rng.uniform(100, 400)
        wave = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.2 * np.sin(2 * np.pi * 0.5 * t)))
        wave += 0.05 * rng.standard_normal(t.shape)
        path = folder / f"clip{i:03d}.wav"
        sf.write(path, wave.astype(np.float32), 16000)
        paths.append(path)
    return paths


def machine_limits(repeats: int = 5) -> dict:
    """This machine's fp32 ceilings, measured: GEMM throughput on a prefill-shaped matmul and
    memory read bandwidth (a sum over 256 MiB, far beyond the caches)."""
    a, w = torch.randn(2048, 512), torch.randn(1408, 512)
    big = torch.randn(64 * 2**20)
    gemm = min(timed(lambda: a @ w.T)[1] for _ in range(repeats))
    read = min(timed(big.sum)[1] for _ in range(repeats))
    return {"gemm_flops": 2 * a.shape[0] * w.shape[0] * a.shape[1] / gemm,
            "read_bytes_s": big.numel() * big.element_size() / read}


def batched_floor(model, prompt_lengths: list[int], budget: int, limits: dict) -> dict:
    """Seconds the batched language model cannot beat on this machine, greedy text output, every
    row running the whole budget. Prefill: 2 x parameters FLOPs per prompt token at the GEMM
    ceiling. Each decode step does 2 x parameters FLOPs per row and reads the weights once plus
    every row's KV cache; it takes at least the larger of its compute and read times."""
    cfg = model.config
    params = sum(p.numel() for p in model.model.layers.parameters()) + model.lm_head.weight.numel()
    size = model.lm_head.weight.element_size()
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * size
    rows = len(prompt_lengths)
    prefill = 2 * params * sum(prompt_lengths) / limits["gemm_flops"]
    decode = 0.0
    for step in range(1, budget):
        keys = sum(prompt_lengths) + rows * step
        decode += max(2 * params * rows / limits["gemm_flops"],
                      (params * size + kv_per_token * keys) / limits["read_bytes_s"])
    return {"prefill_s": prefill, "decode_s": decode}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def single_calls(engine, convs, params: dict):
    """The loop of single calls, one `generate_batch([c])` each, done as its two parts (what
    `generate_batch` runs: the prompt with its audio front-end, then the language model) so
    that the language model's share is timed, not the difference of two runs.
    Returns (results, seconds, language-model seconds)."""
    results, total, llm = [], 0.0, 0.0
    for c in convs:
        start = time.perf_counter()
        prompts = engine.build_prompts([c])
        mid = time.perf_counter()
        results += engine.run_prompts(prompts, sampling_params(**params))
        end = time.perf_counter()
        total, llm = total + end - start, llm + end - mid
    return results, total, llm


def run(out: Path, conversations: int = 32, budgets=(16, 64, 256), preset: str = "small",
        device: str = "cpu") -> dict:
    checkpoint = make_tiny_checkpoint(out / f"{preset}_checkpoint", seed=0, preset=preset)
    clips = write_clips(out / "engine_clips", conversations)
    convs = [[{"role": "user", "message_type": "text", "content": ASR_PROMPT},
              {"role": "user", "message_type": "audio", "content": str(p)}] for p in clips]
    engine = KimiAudio(checkpoint, device=device)
    engine.generate_batch(convs[:2], max_new_tokens=4)  # warm-up (allocator, imports)
    # the front-end alone, per conversation and batched: equal work, the same in both arms
    # (the ceiling below counts the faster of the two)
    _, front_single = timed(lambda: [engine.build_prompts([c]) for c in convs])
    prompts, front_batch = timed(lambda: engine.build_prompts(convs))
    limits = machine_limits()
    runs = []
    for budget in budgets:
        params = {"max_new_tokens": budget}
        singles, t_single, t_single_llm = single_calls(engine, convs, params)
        batched, t_batch = timed(lambda p=params: engine.generate_batch(convs, **p))
        _, t_llm = timed(lambda p=params: engine.run_prompts(prompts, sampling_params(**p)))
        floor = batched_floor(engine.model, [len(p) for p in prompts], budget, limits)
        floor_llm = floor["prefill_s"] + floor["decode_s"]
        runs.append({
            "max_new_tokens": budget,
            "generated_tokens": sum(r.steps for r in batched),
            "single_s": t_single, "batch_s": t_batch, "speedup": t_single / t_batch,
            "identical_tokens": [a.text_token_ids for a in singles]
            == [b.text_token_ids for b in batched],
            "single_llm_s": t_single_llm, "batch_llm_s": t_llm,
            "llm_speedup": t_single_llm / t_llm,
            # the best ratio a batched arm could reach here against these singles: the
            # front-end's measured time (the same work in both arms) plus the floor above
            "batch_floor_s": floor, "ceiling_speedup":
                t_single / (min(front_single, front_batch) + floor_llm),
            "llm_ceiling_speedup": t_single_llm / floor_llm,
        })
    return {
        "preset": preset, "conversations": conversations, "device": device,
        "audio_s": sum(sf.info(p).duration for p in clips),
        "frontend_single_s": front_single, "frontend_batch_s": front_batch,
        "max_batch_size": engine.max_batch_size, "limits": limits, "runs": runs,
    }


# the workload of issue 21: the four reference prompts (ASR en, ASR zh, caption, emotion) over
# the six shared inputs, conversation i = prompt i % 4 x input i % 6 (inputs sorted by name)
REFERENCE_PROMPTS = ("Please transcribe the spoken content into written text.", ASR_PROMPT,
                     "Describe the audio in one or two sentences: who or what is heard "
                     "(speech, sounds, music) and the setting.",
                     "Identify the predominant emotion in this speech.")
SHARED_INPUTS = Path(__file__).resolve().parents[2] / "shared" / "kimi_tiny" / "inputs"


def reference_conversations(count: int, inputs: Path = SHARED_INPUTS) -> list[list[dict]]:
    clips = sorted(p for p in inputs.iterdir() if p.is_file())
    return [[{"role": "user", "message_type": "text", "content": REFERENCE_PROMPTS[i % 4]},
             {"role": "user", "message_type": "audio", "content": str(clips[i % len(clips)])}]
            for i in range(count)]


# output lengths drawn as a labelling job's come out (a random checkpoint's own stops are not
# realistic): ASR about 3.5 text tokens per second of audio (150 words a minute), a caption
# 12-32 tokens, a one-word answer 2 (the word and the EOS); all within the call's budget
ASR_TOKENS_PER_S = 3.5


def drawn_lengths(prompts: list[str], seconds: list[float], budget: int, seed: int = 0
                  ) -> list[int]:
    """One output length per conversation, from its prompt's kind and its audio's length."""
    rng = np.random.default_rng(seed)
    out = []
    for prompt, secs in zip(prompts, seconds):
        if "transcribe" in prompt.lower() or prompt == ASR_PROMPT:
            n = round(ASR_TOKENS_PER_S * secs * rng.uniform(0.8, 1.2))
        elif "emotion" in prompt.lower():
            n = 2
        else:
            n = int(rng.integers(12, 33))
        out.append(int(min(max(n, 1), budget)))
    return out


def workloads(out: Path, conversations: int, budget: int) -> dict[str, tuple]:
    """name -> (conversations, per-conversation lengths or None for the model's own stops).
    The reference workload (issue 21) with the model's own stops and with drawn lengths, and
    a labelling mix: the label stage's generative prompts (asr, caption) over clips of 1-30 s
    (its closed-set tasks, emotion among them, are scored in one forward each: no decode)."""
    from kimi_ops.tasks import get_task

    ref = reference_conversations(conversations)
    ref_text = [c[0]["content"] for c in ref]
    ref_secs = [sf.info(c[1]["content"]).duration for c in ref]
    clips = write_clips(out / "labelling_clips", max(conversations // 2, 1), low=1.0, high=30.0)
    tasks = [get_task("asr"), get_task("caption")]
    mix = [t.messages(str(c)) for c in clips for t in tasks]
    mix_text = [next(m["content"] for m in conv if m["message_type"] == "text") for conv in mix]
    mix_secs = [sf.info(c).duration for c in clips for _ in tasks]
    return {"reference": (ref, None),
            "reference, drawn lengths": (ref, drawn_lengths(ref_text, ref_secs, budget)),
            "labelling mix, drawn lengths": (mix, drawn_lengths(mix_text, mix_secs, budget))}


def occupancy(out: Path, conversations: int = 64, max_new_tokens: int = 32,
              max_batch_size: int = 8, preset: str = "small", device: str = "cpu",
              checkpoint: Path | None = None) -> dict:
    """Each workload's prompts run three ways on one checkpoint: one prompt at a time, static
    batches and continuous batching. Per arm: decode forwards, the rows they carried, the
    share of the batch's slots those rows filled (occupancy), wall time, and whether the tokens
    equal the single calls'. The prompts (and their audio front-end) are built once, outside
    the timings."""
    label = str(checkpoint) if checkpoint else preset
    checkpoint = checkpoint or make_tiny_checkpoint(out / f"{preset}_checkpoint", seed=0,
                                                    preset=preset)
    params = sampling_params(max_new_tokens=max_new_tokens)
    engines = {b: KimiAudio(checkpoint, device=device, max_batch_size=max_batch_size,
                            batching=b) for b in ("static", "continuous")}
    results = []
    for name, (convs, lengths) in workloads(out, conversations, max_new_tokens).items():
        prompts = engines["static"].build_prompts(convs)
        engines["static"].run_prompts(prompts[:2], params)  # warm-up
        arms = []
        for arm in ("single", "static", "continuous"):
            engine = engines["static" if arm == "single" else arm]
            engine.decode_counts = counts = type(engine.decode_counts)()
            if arm == "single":
                got, seconds = timed(lambda e=engine: [
                    e.run_prompts([p], params, None if lengths is None else [n])[0]
                    for p, n in zip(prompts, lengths or [None] * len(prompts))])
                singles = got
            else:
                got, seconds = timed(lambda e=engine: e.run_prompts(prompts, params, lengths))
            arms.append({"arm": arm, "decode_forwards": counts.forwards,
                         "decode_rows": counts.rows,
                         "occupancy": counts.occupancy(1 if arm == "single" else max_batch_size),
                         "seconds": seconds,
                         "identical_tokens": [a.text_token_ids for a in singles]
                         == [b.text_token_ids for b in got]})
        for a in arms:
            a["speedup_vs_single"] = arms[0]["seconds"] / a["seconds"]
        results.append({"workload": name, "conversations": len(convs),
                        "mean_steps": sum(r.steps for r in singles) / len(singles),
                        "arms": arms})
    return {"checkpoint": label,
            "conversations": conversations, "max_new_tokens": max_new_tokens,
            "max_batch_size": max_batch_size, "device": device, "workloads": results}


# issue 21's reference protocol: the official Kimi-Audio code took 8.4-9.6 s for it on 2 AMD
# EPYC cores (measured by the author; the official code does not install here)
OFFICIAL_REFERENCE_S = (8.4, 9.6)


class PhaseTimes:
    """Wall seconds by phase of `generate_batch` calls, while active: the audio front-end
    (decode + VQ tokens + Whisper features: `KimiAudio.encode_audio`), prefill (the engine's
    `prefill`) and the rest, which is the decode loop (sampling and bookkeeping included)."""

    def __init__(self, engine):
        import kimi_ops.engine.generate as generate

        self.engine, self.generate = engine, generate
        self.seconds = {"frontend_s": 0.0, "prefill_s": 0.0}

    def _timing(self, fn, key):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
        return run

    def __enter__(self):
        self._saved = self.engine.encode_audio, self.generate.prefill
        self.engine.encode_audio = self._timing(self.engine.encode_audio, "frontend_s")
        self.generate.prefill = self._timing(self.generate.prefill, "prefill_s")
        return self

    def __exit__(self, *exc):
        del self.engine.encode_audio  # the instance attribute: the method shows through again
        self.generate.prefill = self._saved[1]

    def split(self, total: float) -> dict:
        return {**self.seconds, "decode_s": total - sum(self.seconds.values()), "total_s": total}


def reference_protocol(out: Path, preset: str = "small", conversations: int = 16,
                       max_new_tokens: int = 32, checkpoint: Path | None = None) -> dict:
    """The reference protocol: `conversations` = prompt i % 4 x shared input i % 6, greedy,
    `max_new_tokens`, one warm-up call, on a generated `preset` checkpoint. Two arms, one
    `generate_batch` call per conversation and one call for all, each split into front-end,
    prefill and decode; tokens must agree."""
    checkpoint = checkpoint or make_tiny_checkpoint(out / f"{preset}_checkpoint", seed=0,
                                                    preset=preset)
    engine = KimiAudio(checkpoint, device="cpu")
    convs = reference_conversations(conversations)
    engine.generate_batch(convs[:1], max_new_tokens=max_new_tokens)  # the warm-up call
    arms = {}
    for arm in ("single", "batched"):
        with PhaseTimes(engine) as phases:
            if arm == "single":
                got, seconds = timed(lambda: [engine.generate_batch([c],
                                                                    max_new_tokens=max_new_tokens)[0]
                                              for c in convs])
            else:
                got, seconds = timed(lambda: engine.generate_batch(convs,
                                                                   max_new_tokens=max_new_tokens))
        arms[arm] = {**phases.split(seconds), "tokens": [r.text_token_ids for r in got],
                     "generated_tokens": sum(r.steps for r in got)}
    batched = arms["batched"]["total_s"]
    return {"preset": preset, "conversations": conversations, "max_new_tokens": max_new_tokens,
            "threads": torch.get_num_threads(), "max_batch_size": engine.max_batch_size,
            "identical_tokens": arms["single"].pop("tokens") == arms["batched"].pop("tokens"),
            "arms": arms, "official_reference_s": OFFICIAL_REFERENCE_S,
            "batched_vs_single": arms["single"]["total_s"] / batched,
            "batched_vs_official": [t / batched for t in OFFICIAL_REFERENCE_S]}


def print_reference(result: dict) -> None:
    low, high = result["official_reference_s"]
    print(f"reference protocol: {result['conversations']} conversations, preset "
          f"{result['preset']}, greedy, {result['max_new_tokens']} new tokens, "
          f"{result['threads']} threads; tokens identical: {result['identical_tokens']}")
    head = ("arm", "front-end s", "prefill s", "decode s", "total s")
    print("".join(f"{h:>13}" for h in head))
    for arm, a in result["arms"].items():
        cells = (arm, *(f"{a[k]:.2f}" for k in ("frontend_s", "prefill_s", "decode_s",
                                                  "total_s")))
        print("".join(f"{c:>13}" for c in cells))
    lo, hi = result["batched_vs_official"]
    print(f"one call: {result['batched_vs_single']:.1f}x the single calls; against the official "
          f"code's {low}-{high} s there: {lo:.1f}-{hi:.1f}x (target >= 5x)")


def print_occupancy(result: dict) -> None:
    print(f"decode-slot occupancy: max_batch_size {result['max_batch_size']}, "
          f"{result['max_new_tokens']} new tokens at most, device {result['device']}")
    head = ("workload", "arm", "occupancy", "forwards", "rows", "seconds", "vs single",
            "identical")
    print(f"{head[0]:<30}" + "".join(f"{h:>11}" for h in head[1:]))
    for w in result["workloads"]:
        for a in w["arms"]:
            cells = (a["arm"], f"{a['occupancy']:.2f}", a["decode_forwards"], a["decode_rows"],
                     f"{a['seconds']:.2f}", f"{a['speedup_vs_single']:.1f}x",
                     str(a["identical_tokens"]))
            print(f"{w['workload'] if a['arm'] == 'single' else '':<30}"
                  + "".join(f"{c:>11}" for c in cells))


def print_table(result: dict) -> None:
    print(f"\nengine: generate_batch vs a loop of single calls, preset={result['preset']}, "
          f"{result['conversations']} conversations ({result['audio_s']:.0f} s of audio), "
          f"device={result['device']}; front-end {result['frontend_batch_s']:.1f} s batched, "
          f"{result['frontend_single_s']:.1f} s one by one")
    limits = result["limits"]
    print(f"machine ceilings: fp32 GEMM {limits['gemm_flops'] / 1e9:.0f} GFLOP/s, "
          f"memory read {limits['read_bytes_s'] / 1e9:.1f} GB/s; 'ceiling' = the speed-up a "
          "batched arm at those limits would reach against the same singles")
    head = ("new tokens", "single s", "batch s", "speed-up", "ceiling", "tokens/s", "identical",
            "LLM speed-up", "LLM ceiling")
    print("".join(f"{h:>13}" for h in head))
    for r in result["runs"]:
        cells = (r["max_new_tokens"], f"{r['single_s']:.1f}", f"{r['batch_s']:.1f}",
                 f"{r['speedup']:.1f}x", f"{r['ceiling_speedup']:.1f}x",
                 f"{r['generated_tokens'] / r['batch_s']:.0f}",
                 str(r["identical_tokens"]), f"{r['llm_speedup']:.1f}x",
                 f"{r['llm_ceiling_speedup']:.1f}x")
        print("".join(f"{c:>13}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=None,
                        help="default 32; 64 with --occupancy, 16 with --reference")
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=None,
                        help="default 16 64 256; 32 with --occupancy or --reference")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_output")
    parser.add_argument("--occupancy", action="store_true",
                        help="the reference workload's decode-slot occupancy instead")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--reference", action="store_true",
                        help="issue 21's reference protocol instead (16 conversations, 32 new "
                             "tokens unless given): front-end / prefill / decode per arm")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="--occupancy on this checkpoint instead of a generated --preset")
    args = parser.parse_args()
    budgets = args.max_new_tokens or ([32] if args.occupancy or args.reference
                                      else [16, 64, 256])
    if args.reference:
        torch.set_num_threads(2)
        result = reference_protocol(Path(args.out), args.preset, args.conversations or 16,
                                    budgets[0], args.checkpoint)
        result["machine"] = machine()
        print_reference(result)
        path = Path(args.out) / "engine_reference.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
        return
    if args.occupancy:
        result = occupancy(Path(args.out), args.conversations or 64, budgets[0],
                           args.max_batch_size, args.preset, args.device, args.checkpoint)
        result["machine"] = machine()
        print_occupancy(result)
        path = Path(args.out) / "engine_occupancy.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
        return
    result = run(Path(args.out), args.conversations or 32, budgets, args.preset, args.device)
    result["machine"] = machine()
    print_table(result)
    path = Path(args.out) / "engine.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
