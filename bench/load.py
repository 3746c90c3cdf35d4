"""Load: many short files through the whole pipeline on this machine, with peak memory per process.

    .venv/bin/python bench/load.py --files 200 2000

For each size: generate N clips of 0.3-1 s (16 kHz PCM WAV, local folder), run the labelling
job (tiny checkpoint, ASR, local Ray) in a fresh driver process, and sample /proc every 0.2 s
for the driver and every process it started (Ray's GCS, raylet and workers are its
descendants). Reports wall time, files/s, the rows in `files/` (each input must appear exactly
once), and peak RSS: the driver, the largest single Ray worker, all workers together and Ray's
system processes. Prints a table and writes `bench_output/load.json`.

Per process it reports the peaks (MB) of:
  rss      VmHWM, the kernel's exact high-water mark of the resident set: the headline figure
  rss_now  VmRSS as sampled (the high-water mark can fall between two samples)
  anon     RssAnon: the private heap (Python, torch, oneDNN, arrow buffers)
  shmem    RssShmem: shared memory the process touched, here Ray's object store (a /dev/shm
           file every Ray process maps; a block a stage reads or writes lands in its RSS)
  file     RssFile: mapped files (shared libraries, the checkpoint)
  own      VmRSS - RssShmem: the process's own memory without the object store's pages
`worker_max_<x>` is the largest of each over the workers (they may come from different
workers; the per-worker list names them). `object_store_touched_mb` is the peak growth of the
machine's Shmem (/proc/meminfo) over the run: the object store's pages touched by anyone,
counted once (machine-wide, so another program's shared memory would show too).

Peak memory must not grow with the corpus: the plan is streamed into shards, audio is decoded
inside the stages, and the driver keeps only one small summary row per file. The object store
is bounded by configuration: the blocks in flight between the stages by the job's in-flight
budget (`JobSpec.inflight_bytes`, 128 MiB per node on CPUs), the job's local object store by
twice that. Before the budget, Ray Data let the decode stage run ahead by the whole corpus (its
default budget is half the object store, 30 % of RAM): the front-end actor's shmem grew 8.6 ->
78 MB at 200 -> 2,000 files and its VmHWM x1.08-1.11. With the budget the shmem stops below it
(28-32 MB at 2,000 and 4,000 files), so at 200 files, whose 8.6 MB of audio never fill it, the
shmem ratio is large while the bytes stay bounded; the figures to hold flat are rss, anon and
own.
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

import psutil

from pipelines.processes import identify

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


def make_long_corpus(folder: Path, count: int, seconds: float) -> list[str]:
    """`count` recordings of `seconds` each (a tone with a 0.6 s pause every 9 s), 16 kHz WAV."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * 16000)) / 16000
    paths = []
    for i in range(count):
        wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) * (0.6 + 0.4 * np.sin(6 * t))
        for start in range(7, int(seconds), 9):
            wave[start * 16000: int((start + 0.6) * 16000)] = 0.0
        path = folder / f"long{i:03d}.wav"
        sf.write(path, wave.astype(np.float32), 16000, subtype="PCM_16")
        paths.append(str(path))
    return paths


# -- /proc sampling -----------------------------------------------------------------------

def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "PPid"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def shmem_kb() -> int:
    """The machine's shared memory in use (/proc/meminfo Shmem, kB): tmpfs pages, of which Ray's
    object store (a file in /dev/shm that every Ray process maps) is the part that moves."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1])
    return 0


def start_time(pid: int) -> float | None:
    """With the PID, names one process even if the PID is reused (`pipelines.processes`)."""
    process = identify(pid)
    return None if process is None else process.start


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


# per process, in kB: rss = VmHWM (the kernel's exact high-water mark of VmRSS); the others are
# the peaks of the samples: rss_now = VmRSS, anon = RssAnon (private heap), shmem = RssShmem
# (shared memory touched: Ray's object store), file = RssFile (mapped files: libraries),
# own = VmRSS - RssShmem
PEAKS = ("rss", "rss_now", "anon", "shmem", "file", "own")


class MemorySampler(threading.Thread):
    """Per-process peaks (see PEAKS) of a process tree, until `stop()`."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root = root
        self.done = threading.Event()
        self.peak_by_pid: dict[int, dict] = {}
        self.peak_workers_total = 0
        self.shmem_base = shmem_kb()
        self.peak_shmem = 0
        self.samples = 0

    def run(self) -> None:
        while not self.done.is_set():
            self.peak_shmem = max(self.peak_shmem, shmem_kb() - self.shmem_base)
            workers_total = 0
            for pid in [self.root, *descendants(self.root)]:
                st = _status(pid)
                if "VmRSS" not in st:
                    continue
                rec = self.peak_by_pid.setdefault(pid, {"role": role(pid, self.root),
                                                        "start": start_time(pid),
                                                        **dict.fromkeys(PEAKS, 0)})
                if rec["role"] == "gone":
                    rec["role"] = role(pid, self.root)
                if rec["role"] == "worker" and st["VmRSS"] > rec["rss_now"]:
                    rec["name"] = _cmdline(pid)[:60]  # Ray titles a worker by its current task
                rec["rss"] = max(rec["rss"], st.get("VmHWM", st["VmRSS"]))
                rec["rss_now"] = max(rec["rss_now"], st["VmRSS"])
                rec["anon"] = max(rec["anon"], st.get("RssAnon", 0))
                rec["shmem"] = max(rec["shmem"], st.get("RssShmem", 0))
                rec["file"] = max(rec["file"], st.get("RssFile", 0))
                rec["own"] = max(rec["own"], st["VmRSS"] - st.get("RssShmem", 0))
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
        out = {}
        for who, recs in (("driver", by_role.get("driver", [])), ("worker_max", workers)):
            for key in PEAKS:
                out[f"{who}_{key}_mb"] = max((r[key] for r in recs), default=0) / mb
        return {
            **out,
            "workers_total_rss_mb": self.peak_workers_total / mb,
            "worker_processes": len(workers),
            "workers": sorted(({"name": r.get("name", ""),
                                **{f"{k}_mb": round(r[k] / mb, 1) for k in PEAKS}}
                               for r in workers), key=lambda w: -w["rss_mb"]),
            "system_rss_mb": sum(r["rss"] for r in by_role.get("system", [])) / mb,
            "object_store_touched_mb": self.peak_shmem / mb,
            "samples": self.samples,
        }


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def cpu_group(cmdline: str) -> str:
    """What a process of a `kimi-label run` tree is, from its command line (Ray titles a worker
    by what it runs: "ray::MapWorker(MapBatches(LabelStage))", "ray::IDLE", ...)."""
    if "uvicorn" in cmdline and "prefect" in cmdline:
        return "Prefect server"
    if cmdline.startswith("ray::MapWorker(MapBatches("):
        return cmdline[len("ray::MapWorker(MapBatches("):].split(")")[0] + " actor"
    if cmdline.startswith(("ray::_", "ray::ActorLocationTracker", "ray::DashboardAgent",
                           "ray::RuntimeEnvAgent")):
        return "Ray's own actors"
    if cmdline.startswith("ray::") or "default_worker.py" in cmdline:
        return "task workers (plan, decode, write)"
    return "Ray daemons (GCS, raylet, ...)"


class CpuSampler(threading.Thread):
    """CPU seconds of a process tree by `cpu_group`, until `stop()`: the root is the driver.
    A process's last 0.2 s before it exits can be missed."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root = root
        self.done = threading.Event()
        self.by_process: dict[tuple[int, float | None], dict] = {}

    def run(self) -> None:
        while not self.done.is_set():
            for pid in [self.root, *descendants(self.root)]:
                seconds = cpu_seconds(pid)
                if seconds is None:
                    continue
                rec = self.by_process.setdefault((pid, start_time(pid)), {"group": None})
                rec["cpu_s"] = seconds
                title = _cmdline(pid)
                if pid == self.root:
                    rec["group"] = "driver (flow, Ray Data's executor)"
                elif title and rec["group"] in (None, cpu_group("ray::IDLE")):
                    rec["group"] = cpu_group(title)  # a worker may become an actor later
            self.done.wait(SAMPLE_EVERY_S)

    def stop(self) -> dict[str, float]:
        self.done.set()
        self.join()
        groups: dict[str, float] = {}
        for rec in self.by_process.values():
            group = rec["group"] or "Ray daemons (GCS, raylet, ...)"
            groups[group] = groups.get(group, 0.0) + rec["cpu_s"]
        return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


# -- one run --------------------------------------------------------------------------------

DRIVER = """
import json, sys
from pipelines.job import JobSpec, run_job
spec = JobSpec(**json.loads(sys.argv[1]))
report = run_job(spec, ray_temp_dir=sys.argv[2])
print("REPORT " + json.dumps({k: report[k] for k in ("processed", "status", "errors_by_kind",
                                                     "wall_s", "planned",
                                                     "long_files_in_pieces")}))
"""


def run_size(count: int, workdir: Path, model: Path = CHECKPOINT, timeout_s: float = 900,
             spec_overrides: dict | None = None, long_seconds: float | None = None) -> dict:
    """Generate `count` clips (or, with `long_seconds`, recordings that long), run the job in a
    fresh driver, return counts and peak memory.
    `spec_overrides`: JobSpec fields that replace the defaults below."""
    import pyarrow.parquet as pq

    data = Path(tempfile.mkdtemp(prefix=f"n{count}-", dir=workdir))
    inputs = (make_long_corpus(data / "in", count, long_seconds) if long_seconds
              else make_corpus(data / "in", count))
    spec = {"input": str(data / "in"), "output": str(data / "out"), "model": str(model),
            "tasks": ["asr"], "max_new_tokens": 4, "no_progress_timeout_s": 300,
            "stages": {"label": {"batch_size": 16, "num_cpus": 0.5},
                       "frontend": {"batch_size": 16, "num_cpus": 0.5},
                       "decode": {"batch_size": 16, "num_cpus": 0.5},
                       "write": {"batch_size": 64, "num_cpus": 0.25}},
            **(spec_overrides or {})}
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
    from pipelines.job import JobSpec
    from pipelines.job.placement import inflight_budget, local_object_store_bytes
    from pipelines.job.ray_cluster import local_gpus

    job, gpus = JobSpec(**spec), local_gpus()
    result = {
        "files": count, "wall_s": round(wall, 2), "files_per_s": round(count / wall, 2),
        "rows": len(rows), "unique_rows": len(set(uris)),
        "all_accounted_once": sorted(uris) == sorted(inputs),
        "ok_rows": sum(r["status"] == "ok" for r in rows),
        "report_processed": report["processed"],
        "long_files_in_pieces": report["long_files_in_pieces"],
        "inflight_budget_mb": round(inflight_budget(job, gpus) / 2**20, 1),
        "object_store_mb": round(local_object_store_bytes(job, gpus) / 2**20, 1),
        **{k: round(v, 1) if isinstance(v, float) else v for k, v in memory.items()},
    }
    shutil.rmtree(data, ignore_errors=True)
    return result


def _stop_tree(proc: subprocess.Popen, seen: list[tuple[int, float | None]]) -> None:
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


def long_files(count: int, seconds: float, workdir: Path, model: Path, spec: dict,
               piece_seconds: float | None = None) -> list[dict]:
    """The same long recordings twice, side by side: as pieces (of `piece_seconds`, default
    JobSpec's) and whole (`piece_seconds` past their length). Per arm: wall time, rows, pieces,
    and the peak RSS of the driver and of each model actor."""
    arms = []
    pieces = {"piece_seconds": piece_seconds} if piece_seconds else {}
    for arm, overrides in (("pieces", pieces), ("whole", {"piece_seconds": 2 * seconds})):
        r = run_size(count, workdir, model, spec_overrides={**spec, **overrides},
                     long_seconds=seconds)
        actors = {}
        for w in r["workers"]:
            group = cpu_group(w["name"])
            if group.endswith(" actor"):
                actors[group] = max(actors.get(group, 0.0), w["rss_mb"])
        arms.append({"arm": arm, "files": count, "seconds_each": seconds,
                     "wall_s": r["wall_s"], "all_accounted_once": r["all_accounted_once"],
                     "in_pieces": r["long_files_in_pieces"],
                     "driver_rss_mb": r["driver_rss_mb"],
                     "worker_max_rss_mb": r["worker_max_rss_mb"],
                     "workers_total_rss_mb": r["workers_total_rss_mb"], "actors_rss_mb": actors})
        print(f"done {arm}", file=sys.stderr, flush=True)
    return arms


def growth(small: dict, large: dict) -> dict[str, float]:
    """large / small peak ratios of the memory figures the flatness claim is about."""
    keys = [f"{who}_{k}_mb" for who in ("driver", "worker_max") for k in PEAKS]
    return {k: round(large[k] / small[k], 3) for k in keys if small[k]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, nargs="*", default=[200, 2000],
                        help="corpus sizes of short clips (none: only the --long run)")
    parser.add_argument("--model", type=Path, default=CHECKPOINT)
    parser.add_argument("--long", type=float, nargs=2, metavar=("FILES", "SECONDS"),
                        help="also run this many recordings of this length, as pieces and "
                             "whole, side by side")
    parser.add_argument("--piece-seconds", type=float, default=None,
                        help="the pieces' length in the --long run (default: JobSpec's)")
    parser.add_argument("--spec", type=json.loads, default={},
                        help="JobSpec fields as JSON, over the defaults (experiments)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_output",
                        help="folder for load.json")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="kl-load-"))
    results, long = [], []
    try:
        for count in args.files:
            results.append(run_size(count, workdir, args.model, spec_overrides=args.spec))
            print(f"done {count} files", file=sys.stderr, flush=True)
        if args.long:
            long = long_files(int(args.long[0]), args.long[1], workdir, args.model, args.spec,
                              args.piece_seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    cols = ["files", "wall_s", "files_per_s", "rows", "all_accounted_once", "driver_rss_mb",
            "worker_max_rss_mb", "workers_total_rss_mb", "worker_processes", "system_rss_mb",
            "object_store_touched_mb", "inflight_budget_mb", "object_store_mb"]
    print(" | ".join(cols) if results else "(no short-clip runs)")
    for r in results:
        print(" | ".join(str(r[c]) for c in cols))
    for r in results:
        print(f"{r['files']} files, per process peaks (MB): " + " | ".join(PEAKS))
        print("  driver: " + " | ".join(f"{r[f'driver_{k}_mb']}" for k in PEAKS))
        for w in r["workers"][:4]:
            print(f"  {w['name'][:50]}: " + " | ".join(str(w[f'{k}_mb']) for k in PEAKS))
    ratios = growth(results[0], results[-1]) if len(results) > 1 else {}
    if ratios:
        print("peak growth, largest/smallest: " + ", ".join(f"{k} x{v}" for k, v in
                                                            ratios.items()))
        print("(shmem is the object store's pages: bounded by inflight_budget_mb, not by its "
              "ratio; the figures that must stay flat are rss, anon and own)")
    if long:
        print("long files | arm | pieces | wall_s | all_accounted_once | driver_rss_mb | "
              "worker_max_rss_mb | workers_total_rss_mb | model actors' rss_mb")
        for r in long:
            print(f"{r['files']} x {r['seconds_each']:.0f} s | {r['arm']} | "
                  f"{r['in_pieces']['pieces'] or r['files']} | {r['wall_s']} | "
                  f"{r['all_accounted_once']} | {r['driver_rss_mb']:.0f} | "
                  f"{r['worker_max_rss_mb']:.0f} | {r['workers_total_rss_mb']:.0f} | "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["actors_rss_mb"].items())))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps({"cpus": os.cpu_count(), "runs": results,
                                                    "growth": ratios, "long_files": long},
                                                   indent=2))
    return 0 if all(r["all_accounted_once"] for r in results + long) else 1


if __name__ == "__main__":
    sys.exit(main())
