"""Throughput of `generate_batch` vs a loop of single calls, on the `small` random checkpoint.

Both sides run the same conversations (ASR prompt + one clip of 1-25 s, mixed lengths) with
greedy decoding and a fixed token budget (random weights never stop early), end to end: decode,
front-end, prefill, decode loop. The batched tokens must equal the single-call tokens. The sweep
over budgets shows where the time goes: the front-end and prefill are compute-bound and cost the
same either way; batching pays off in the memory-bound decode loop. Prints a table, writes JSON.

    .venv/bin/python benchmarks/bench_engine.py [--conversations 24] [--max-new-tokens 16 64 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from kimi_ops.engine.api import KimiAudio, sampling_params
from kimi_ops.model.tiny_checkpoint import make_tiny_checkpoint

ASR_PROMPT = "请将音频内容转换为文字。"


def write_clips(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        seconds = float(rng.uniform(1.0, 25.0))
        t = np.arange(int(seconds * 16000)) / 16000
        f0 = rng.uniform(100, 400)
        wave = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.2 * np.sin(2 * np.pi * 0.5 * t)))
        wave += 0.05 * rng.standard_normal(t.shape)
        path = folder / f"clip{i:02d}.wav"
        sf.write(path, wave.astype(np.float32), 16000)
        paths.append(path)
    return paths


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_output")
    args = parser.parse_args()

    out = Path(args.out)
    checkpoint = make_tiny_checkpoint(out / f"{args.preset}_checkpoint", seed=0, preset=args.preset)
    clips = write_clips(out / "clips", args.conversations)
    conversations = [[{"role": "user", "message_type": "text", "content": ASR_PROMPT},
                      {"role": "user", "message_type": "audio", "content": str(p)}]
                     for p in clips]
    engine = KimiAudio(checkpoint, device=args.device)
    engine.generate_batch(conversations[:2], max_new_tokens=4)  # warm-up (allocator, imports)
    audio_s = sum(sf.info(p).duration for p in clips)

    runs = []
    for budget in args.max_new_tokens:
        params = dict(max_new_tokens=budget)
        singles, t_single = timed(lambda p=params: [engine.generate_batch([c], **p)[0]
                                                    for c in conversations])
        batched, t_batch = timed(lambda p=params: engine.generate_batch(conversations, **p))
        prompts, t_front = timed(lambda: engine.build_prompts(conversations))
        _, t_llm = timed(lambda q=prompts, p=params: engine.run_prompts(q, sampling_params(**p)))
        runs.append({
            "max_new_tokens": budget,
            "generated_tokens": sum(r.steps for r in batched),
            "single_seconds": t_single, "batch_seconds": t_batch,
            "speedup": t_single / t_batch,
            "identical_tokens": [a.text_token_ids for a in singles]
            == [b.text_token_ids for b in batched],
            "batch_frontend_seconds": t_front, "batch_llm_seconds": t_llm,
        })

    print(f"\nKimi-Audio engine, preset={args.preset}, {args.conversations} conversations "
          f"({audio_s:.0f} s of audio, 1-25 s each), device={args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'new tokens':>10}{'single s':>10}{'batch s':>10}{'speed-up':>10}{'tokens/s':>10}"
          f"{'identical':>10}{'front-end s':>12}{'LLM s':>8}")
    for r in runs:
        print(f"{r['max_new_tokens']:>10}{r['single_seconds']:>10.2f}{r['batch_seconds']:>10.2f}"
              f"{r['speedup']:>9.1f}x{r['generated_tokens'] / r['batch_seconds']:>10.1f}"
              f"{r['identical_tokens']!s:>10}{r['batch_frontend_seconds']:>12.2f}"
              f"{r['batch_llm_seconds']:>8.2f}")

    report = {
        "benchmark": "engine_batch_vs_single",
        "preset": args.preset, "conversations": args.conversations, "audio_seconds": audio_s,
        "device": args.device,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "runs": runs,
    }
    (out / "bench_engine.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'bench_engine.json'}")


if __name__ == "__main__":
    main()
