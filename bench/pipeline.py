"""Pipeline overhead: `kimi-label run` end to end vs the engine alone on the same files.

The engine-only arm labels the corpus in this process with `kimi_ops` (decode, segmentation,
front-end, batched ASR), which is the floor for the work itself. The pipeline arm runs the real
console command (`kimi-label run`: a Prefect flow that plans, starts a local Ray and runs the
decode / front-end / label / write stages) in a subprocess. Reported: the command's wall time,
the Ray job's own wall time (from its run report: without Prefect's and the interpreter's
start-up), their ratios to the engine-only time, and each stage's busy share of the job.

    .venv/bin/python bench/pipeline.py [--files 256] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from engine import machine, timed, write_clips  # noqa: E402
from load import CpuSampler  # noqa: E402

from kimi_ops.engine.api import KimiAudio  # noqa: E402
from kimi_ops.model.tiny_checkpoint import make_tiny_checkpoint  # noqa: E402
from kimi_ops.tasks import get_task  # noqa: E402
from kimi_ops.tasks.runner import label_files  # noqa: E402

STAGES = {"decode": {"batch_size": 8}, "frontend": {"batch_size": 16},
          "label": {"batch_size": 32}, "write": {"batch_size": 32}}


def engine_only(checkpoint: Path, clips: list[Path], max_new_tokens: int):
    """(rows, seconds, CPU seconds) of labelling `clips` in this process, the model loaded and
    warmed up before; the model is freed on return."""
    engine = KimiAudio(checkpoint, device="cpu")
    tasks = [get_task("asr")]
    label_files(engine, clips[:2], tasks, max_new_tokens=4)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF)
    rows, seconds = timed(lambda: label_files(engine, clips, tasks, max_new_tokens))
    after = resource.getrusage(resource.RUSAGE_SELF)
    return rows, seconds, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def run(out: Path, files: int = 256, max_new_tokens: int = 32, preset: str = "small",
        one_file: bool = True) -> dict:
    checkpoint = make_tiny_checkpoint(out / f"{preset}_checkpoint", seed=0, preset=preset)
    corpus = out / "pipeline_corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    clips = write_clips(corpus, files, seed=1, low=2.0, high=28.0)

    rows, engine_s, engine_cpu_s = engine_only(checkpoint, clips, max_new_tokens)
    command_s, report = label_command(corpus, out / "pipeline_output", checkpoint, max_new_tokens)
    job_s = report["wall_s"]
    fixed_command_s, fixed_s = one_file_command(out, clips[0], checkpoint, max_new_tokens) \
        if one_file else (None, None)
    return {
        "preset": preset, "files": files, "max_new_tokens": max_new_tokens,
        "audio_s": sum(r.get("duration_s", 0) for r in rows),
        "engine_only_s": engine_s, "command_s": command_s, "job_s": job_s,
        "command_ratio": command_s / engine_s, "job_ratio": job_s / engine_s,
        "one_file_job_s": fixed_s, "one_file_command_s": fixed_command_s,
        # what each further file costs next to the engine: the job less its one-file time
        "marginal_job_ratio": None if fixed_s is None else (job_s - fixed_s) / engine_s,
        # CPU seconds by process over the whole command, against the engine-only arm's
        # (labelling only) and what the machine's CPUs could give
        "engine_only_cpu_s": engine_cpu_s, "command_cpu_s": report["cpu_s"],
        "command_cpu_capacity_s": (os.cpu_count() or 1) * command_s,
        "labelled": report["status"], "stage_busy_share": {
            stage: seconds / job_s for stage, seconds in report["stage_seconds"].items()},
        "stages": STAGES,
    }


def one_file_command(out: Path, clip: Path, checkpoint: Path, max_new_tokens: int):
    """(command seconds, job seconds) of the fixed part: the same command on one of the files
    (Ray start, actors, model loads)."""
    one = out / "pipeline_one_file"
    shutil.rmtree(one, ignore_errors=True)
    one.mkdir(parents=True)
    shutil.copy(clip, one / clip.name)
    command_s, report = label_command(one, out / "pipeline_one_output", checkpoint,
                                      max_new_tokens)
    return command_s, report["wall_s"]


def label_command(corpus: Path, output: Path, checkpoint: Path, max_new_tokens: int):
    """(seconds, run report) of `kimi-label run` over `corpus` in a subprocess."""
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "flows.console", "run", "--input", str(corpus),
               "--output", str(output), "--model", str(checkpoint), "--tasks", "asr",
               "--max-new-tokens", str(max_new_tokens), "--stages", json.dumps(STAGES)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    sampler = CpuSampler(proc.pid)
    sampler.start()
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    cpu = sampler.stop()
    if proc.returncode:
        sys.exit(f"kimi-label run failed ({proc.returncode}):\n{stderr[-4000:]}")
    report = json.loads(next((output / "_runs").glob("*/report.json")).read_text())
    return seconds, {**report, "cpu_s": cpu}


def print_table(r: dict) -> None:
    print(f"\npipeline: kimi-label run vs engine only, preset={r['preset']}, {r['files']} files "
          f"({r['audio_s']:.0f} s of audio), ASR, {r['max_new_tokens']} new tokens")
    print(f"{'engine only s':>15}{'job s':>10}{'job ratio':>11}{'command s':>11}"
          f"{'command ratio':>15}{'1-file job s':>14}{'marginal':>10}  stage busy share")
    share = ", ".join(f"{k} {v:.0%}" for k, v in r["stage_busy_share"].items())
    one, marginal = ((f"{r['one_file_job_s']:>14.1f}", f"{r['marginal_job_ratio']:>9.2f}x")
                     if r["one_file_job_s"] is not None else (f"{'-':>14}", f"{'-':>10}"))
    print(f"{r['engine_only_s']:>15.1f}{r['job_s']:>10.1f}{r['job_ratio']:>10.2f}x"
          f"{r['command_s']:>11.1f}{r['command_ratio']:>14.2f}x{one}{marginal}  {share}")
    print("(marginal: (job - 1-file job) / engine only, what the files cost beyond the fixed "
          "start-up of Ray, the actors and their model loads)")
    print(f"CPU seconds over the command (of {r['command_cpu_capacity_s']:.0f} the CPUs could "
          f"give; the engine-only arm used {r['engine_only_cpu_s']:.1f}):")
    for group, seconds in r["command_cpu_s"].items():
        print(f"{seconds:>10.1f}  {group}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--out", default="bench_output")
    parser.add_argument("--no-one-file", dest="one_file", action="store_false",
                        help="skip the one-file run (the fixed cost and the marginal ratio)")
    args = parser.parse_args()
    result = run(Path(args.out), args.files, args.max_new_tokens, args.preset, args.one_file)
    result["machine"] = machine()
    print_table(result)
    path = Path(args.out) / "pipeline.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    main()
