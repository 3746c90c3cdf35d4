"""Load: many short files through the whole pipeline on this machine, with peak memory per process.

    .venv/bin/python bench/load.py --files 200 2000

For each size: generate N clips of 0.3-1 s (16 kHz PCM WAV, local folder), run the labelling
job (tiny checkpoint, ASR, local Ray) in a fresh driver process, and sample /proc every 0.2 s
for the driver and every process it started (Ray's GCS, raylet and workers are its
descendants). Reports wall time, files/s, the rows in `files/` (each input must appear exactly
once), and peak RSS: the driver, the largest single Ray worker, all workers together and Ray's
system processes. Prints a table and writes `bench_output/load.json`.

Peak memory must not grow with the corpus: the plan is streamed into shards, audio is decoded
inside the stages, and the driver keeps only one small summary row per file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT.parent / "shared" / "kimi_tiny" / "checkpoint"
SAMPLE_EVERY_S = 0.2


def make_corpus(folder: Path, count: int, seed: int = 0) -> list[str]:
    """`count` WAV clips of 0.3-1 s (tones with a slow tremolo), 100 per subfolder."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        seconds = float(rng.uniform(0.3, 1.0))
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 900) * t) * (0.6 + 0.4 * np.sin(6 * t))
        path = folder / f"d{i // 100:03d}" / f"clip{i:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wave.astype(np.float32), 16000, subtype="PCM_16")
        paths.append(str(path))
    return paths


# -- /proc sampling -----------------------------------------------------------------------

def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "PPid"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def start_time(pid: int) -> int | None:
    """Clock ticks after boot: with the PID, names one process even if the PID is reused."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2:].split()[19])


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            ppid = _status(int(entry.name)).get("PPid")
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def role(pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    cmdline = _cmdline(pid)
    if not cmdline:
        return "gone"
    if cmdline.startswith("ray::") or "default_worker.py" in cmdline:
        return "worker"
    return "system"


class MemorySampler(threading.Thread):
    """Peak RSS (the kernel's high-water mark VmHWM, exact) and peak RssAnon (sampled) in kB
    of a process tree, until `stop()`."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root = root
        self.done = threading.Event()
        self.peak_by_pid: dict[int, dict] = {}
        self.peak_workers_total = 0
        self.samples = 0

    def run(self) -> None:
        while not self.done.is_set():
            workers_total = 0
            for pid in [self.root, *descendants(self.root)]:
                st = _status(pid)
                if "VmRSS" not in st:
                    continue
                rec = self.peak_by_pid.setdefault(pid, {"role": role(pid, self.root),
                                                        "rss": 0, "anon": 0,
                                                        "start": start_time(pid)})
                if rec["role"] == "gone":
                    rec["role"] = role(pid, self.root)
                if rec["role"] == "worker" and st["VmRSS"] > rec["rss"]:
                    rec["name"] = _cmdline(pid)[:60]  # Ray titles a worker by its current task
                rec["rss"] = max(rec["rss"], st.get("VmHWM", st["VmRSS"]))
                rec["anon"] = max(rec["anon"], st.get("RssAnon", 0))
                if rec["role"] == "worker":
                    workers_total += st["VmRSS"]
            self.peak_workers_total = max(self.peak_workers_total, workers_total)
            self.samples += 1
            self.done.wait(SAMPLE_EVERY_S)

    def stop(self) -> dict:
        self.done.set()
        self.join()
        by_role: dict[str, list[dict]] = {}
        for rec in self.peak_by_pid.values():
            by_role.setdefault(rec["role"], []).append(rec)
        mb = 1024.0
        workers = by_role.get("worker", [])
        return {
            "driver_rss_mb": max((r["rss"] for r in by_role.get("driver", [])), default=0) / mb,
            "driver_anon_mb": max((r["anon"] for r in by_role.get("driver", [])), default=0) / mb,
            "worker_max_rss_mb": max((r["rss"] for r in workers), default=0) / mb,
            "worker_max_anon_mb": max((r["anon"] for r in workers), default=0) / mb,
            "workers_total_rss_mb": self.peak_workers_total / mb,
            "worker_processes": len(workers),
            "workers": sorted(({"name": r.get("name", ""), "rss_mb": round(r["rss"] / mb, 1),
                                "anon_mb": round(r["anon"] / mb, 1)} for r in workers),
                              key=lambda w: -w["rss_mb"]),
            "system_rss_mb": sum(r["rss"] for r in by_role.get("system", [])) / mb,
            "samples": self.samples,
        }


# -- one run --------------------------------------------------------------------------------

DRIVER = """
import json, sys
from pipelines.job import JobSpec, run_job
spec = JobSpec(**json.loads(sys.argv[1]))
report = run_job(spec, ray_temp_dir=sys.argv[2])
print("REPORT " + json.dumps({k: report[k] for k in ("processed", "status", "errors_by_kind",
                                                     "wall_s", "planned")}))
"""


def run_size(count: int, workdir: Path, model: Path = CHECKPOINT, timeout_s: float = 900) -> dict:
    """Generate `count` clips, run the job in a fresh driver, return counts and peak memory."""
    import pyarrow.parquet as pq

    data = workdir / f"n{count}"
    inputs = make_corpus(data / "in", count)
    spec = {"input": str(data / "in"), "output": str(data / "out"), "model": str(model),
            "tasks": ["asr"], "max_new_tokens": 4, "no_progress_timeout_s": 300,
            "label": {"batch_size": 16, "num_cpus": 0.5},
            "frontend": {"batch_size": 16, "num_cpus": 0.5},
            "decode": {"batch_size": 16, "num_cpus": 0.5},
            "write": {"batch_size": 64, "num_cpus": 0.25}}
    ray_dir = tempfile.mkdtemp(prefix="kl-ray-", dir="/tmp")  # socket paths < 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT),
           "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    log = data / "driver.log"
    started = time.monotonic()
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(spec), ray_dir],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log_file,
                                text=True)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    try:
        stdout, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stdout = ""
    finally:
        memory = sampler.stop()
        _stop_tree(proc, [(pid, rec["start"]) for pid, rec in sampler.peak_by_pid.items()])
        shutil.rmtree(ray_dir, ignore_errors=True)
    wall = time.monotonic() - started
    report_line = [line for line in stdout.splitlines() if line.startswith("REPORT ")]
    if proc.returncode != 0 or not report_line:
        raise RuntimeError(f"driver for {count} files failed (rc={proc.returncode}):\n"
                           + log.read_text()[-4000:])
    report = json.loads(report_line[0][7:])
    rows = pq.read_table(data / "out" / "files", columns=["source_uri", "status"]).to_pylist()
    uris = [r["source_uri"] for r in rows]
    result = {
        "files": count, "wall_s": round(wall, 2), "files_per_s": round(count / wall, 2),
        "rows": len(rows), "unique_rows": len(set(uris)),
        "all_accounted_once": sorted(uris) == sorted(inputs),
        "ok_rows": sum(r["status"] == "ok" for r in rows),
        "report_processed": report["processed"],
        **{k: round(v, 1) if isinstance(v, float) else v for k, v in memory.items()},
    }
    shutil.rmtree(data, ignore_errors=True)
    return result


def _stop_tree(proc: subprocess.Popen, seen: list[tuple[int, int | None]]) -> None:
    """Normally the driver has shut Ray down and exited. Otherwise (a failure, a timeout) stop
    it and every process the sampler saw under it, by PID and start time, SIGTERM then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [pid for pid, start in seen if start is not None and start_time(pid) == start]
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:
            left = [pid for pid, start in seen if start is not None and start_time(pid) == start]
            time.sleep(0.1)
        if not left:
            return


def growth(small: dict, large: dict) -> dict[str, float]:
    """large / small peak ratios of the memory figures the flatness claim is about."""
    keys = ("driver_rss_mb", "worker_max_rss_mb", "driver_anon_mb", "worker_max_anon_mb")
    return {k: round(large[k] / small[k], 3) for k in keys if small[k]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--model", type=Path, default=CHECKPOINT)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_output",
                        help="folder for load.json")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="kl-load-"))
    results = []
    try:
        for count in args.files:
            results.append(run_size(count, workdir, args.model))
            print(f"done {count} files", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cols = ["files", "wall_s", "files_per_s", "rows", "all_accounted_once", "driver_rss_mb",
            "worker_max_rss_mb", "workers_total_rss_mb", "worker_processes", "system_rss_mb"]
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(str(r[c]) for c in cols))
    ratios = growth(results[0], results[-1]) if len(results) > 1 else {}
    if ratios:
        print("peak growth, largest/smallest: " + ", ".join(f"{k} x{v}" for k, v in
                                                            ratios.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps({"cpus": os.cpu_count(), "runs": results,
                                                    "growth": ratios}, indent=2))
    return 0 if all(r["all_accounted_once"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
