"""`make bench`: the CPU benchmarks, side by side in one run, on this machine.

Runs each section in its own process (fresh memory, no shared warm state), prints their
tables, and writes `bench/results/cpu.json` and `bench/results/cpu.png`:

* engine   (bench/engine.py): `generate_batch` vs a loop of single calls, `small` preset,
  32 mixed-length conversations; throughput ratio and whether the tokens are identical.
* pipeline (bench/pipeline.py): `kimi-label run` end to end vs the engine alone on the same
  files; stage busy shares.
* memory   (bench/load.py): peak RSS of the driver and the Ray workers at N and 10 N files,
  and two 2-hour recordings run as pieces and whole (`JobSpec.piece_seconds`).

    .venv/bin/python bench/cpu.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
ENGINE_TARGET = 10.0
PIPELINE_TARGET = 1.15
MEMORY_TARGET = 1.10


def section(script: str, out: Path, *args: str) -> dict:
    """Run one benchmark script (its table goes to our stdout) and return its JSON."""
    name = Path(script).stem
    print(f"\n=== {name} ===", flush=True)
    subprocess.run([sys.executable, str(HERE / script), "--out", str(out), *args], check=True)
    return json.loads((out / f"{name}.json").read_text())


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    engine = result["engine"]
    budgets = [r["max_new_tokens"] for r in engine["runs"]]
    ax1.plot(budgets, [r["speedup"] for r in engine["runs"]], "o-", label="end to end")
    ax1.plot(budgets, [r["ceiling_speedup"] for r in engine["runs"]], "^:",
             label="ceiling (roofline of this machine)")
    ax1.plot(budgets, [r["llm_speedup"] for r in engine["runs"]], "s--",
             label="language model only")
    ax1.axhline(ENGINE_TARGET, color="grey", lw=0.8, ls=":", label=f"target {ENGINE_TARGET:.0f}x")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("new tokens per conversation")
    ax1.set_ylabel("batched / loop of singles")
    ax1.set_title(f"engine, {engine['conversations']} conversations ({engine['preset']})")
    ax1.legend()

    pipe = result["pipeline"]
    names = ["engine only", "Ray job", "kimi-label run"]
    values = [pipe["engine_only_s"], pipe["job_s"], pipe["command_s"]]
    ax2.bar(names, values, color=["#4c72b0", "#55a868", "#c44e52"])
    ax2.axhline(pipe["engine_only_s"] * PIPELINE_TARGET, color="grey", lw=0.8, ls=":",
                label=f"target {PIPELINE_TARGET}x engine only")
    ax2.set_ylabel("seconds")
    ax2.set_title(f"pipeline, {pipe['files']} files")
    ax2.legend()

    memory = result["memory"]
    sizes = [str(r["files"]) for r in memory["runs"]]
    width = 0.35
    xs = range(len(sizes))
    ax3.bar([x - width / 2 for x in xs], [r["driver_rss_mb"] for r in memory["runs"]], width,
            label="driver")
    ax3.bar([x + width / 2 for x in xs], [r["worker_max_rss_mb"] for r in memory["runs"]], width,
            label="largest Ray worker")
    ax3.set_xticks(list(xs), sizes)
    ax3.set_xlabel("files")
    ax3.set_ylabel("peak RSS, MB")
    ax3.set_title("memory")
    peak = max(max(r["driver_rss_mb"], r["worker_max_rss_mb"]) for r in memory["runs"])
    ax3.set_ylim(0, 1.3 * peak)
    ax3.legend(loc="upper left", ncol=2)
    fig.suptitle(f"kimi-label CPU benchmarks: {result['machine']['cpu']}, "
                 f"{result['machine']['cpu_count']} cores, torch {result['machine']['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, to check the benchmark itself (numbers not meaningful)")
    parser.add_argument("--out", default="bench_output")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        engine_args = ["--conversations", "4", "--max-new-tokens", "4", "8"]
        pipeline_args = ["--files", "4", "--max-new-tokens", "4"]
        load_args = ["--files", "20", "200", "--long", "1", "120", "--piece-seconds", "40"]
    else:
        engine_args = ["--conversations", "32", "--max-new-tokens", "16", "64", "256", "512"]
        pipeline_args = ["--files", "256", "--max-new-tokens", "32"]
        # and two 2-hour recordings, as pieces and whole
        load_args = ["--files", "200", "2000", "--long", "2", "7200"]
    started = time.time()
    result = {"engine": section("engine.py", out, *engine_args),
              "pipeline": section("pipeline.py", out, *pipeline_args),
              "memory": section("load.py", out, *load_args)}
    result["machine"] = result["engine"].pop("machine")
    result["pipeline"].pop("machine", None)
    result["memory"].pop("machine", None)
    best = max(result["engine"]["runs"], key=lambda r: r["speedup"])
    mem = result["memory"]["runs"]
    result["targets"] = {
        "engine_speedup": {"target": ENGINE_TARGET, "best": best["speedup"],
                           "at_new_tokens": best["max_new_tokens"],
                           "ceiling_there": best["ceiling_speedup"],
                           "best_ceiling": max(r["ceiling_speedup"]
                                               for r in result["engine"]["runs"]),
                           "identical_tokens": all(r["identical_tokens"]
                                                   for r in result["engine"]["runs"])},
        "pipeline_job_ratio": {"target": PIPELINE_TARGET,
                               "measured": result["pipeline"]["job_ratio"],
                               "files": result["pipeline"]["files"],
                               "marginal": result["pipeline"]["marginal_job_ratio"]},
        "memory_growth": {"target": MEMORY_TARGET, "measured": max(
            mem[-1][k] / mem[0][k] for k in ("driver_rss_mb", "worker_max_rss_mb"))},
    }
    result["quick"] = args.quick
    result["seconds"] = time.time() - started
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "cpu.json").write_text(json.dumps(result, indent=2))
    plot(result, results / "cpu.png")
    print("\n=== targets ===")
    for name, t in result["targets"].items():
        print(f"{name:>20}: {json.dumps(t)}")
    print(f"wrote {results / 'cpu.json'} and {results / 'cpu.png'}")


if __name__ == "__main__":
    main()
