"""Load: 400 short files through the real pipeline (local Ray, 2 CPUs, tiny checkpoint), against
a 40-file run. Every file is accounted exactly once; peak RSS must not grow with the corpus.

400 files take about 40-60 s here and 40 files about 15-20 s, the most `make test` can spend;
`bench/load.py --files 200 2000` runs the full-size comparison (same code, default budget).
The 400 clips decode to about 17 MB, less than the default in-flight budget (128 MiB), which
a queue would then never reach; the test gives the job an 8 MiB budget, which it does reach.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests import goldens
from tests.bench_modules import bench_module

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SMALL, LARGE = 40, 400
FLAT = 1.10  # peak memory of the 10x corpus within 10 % of the small one
INFLIGHT = 8 << 20  # the job's object-store budget for blocks in flight (JobSpec.inflight_bytes)


def test_every_file_once_and_peak_memory_flat_at_ten_times_the_files():
    """Every file is accounted exactly once, and neither the driver's peak RSS nor the largest
    Ray worker's (VmHWM: heap, libraries and the object store's shared pages it touched) grows
    by more than 10 % at 10x the files. Two bounds make it so: work units of at most
    `unit_rows` objects (whole 2,000-row plan shards as the unit doubled the front-end actor's
    peak), and a fixed object-store budget for the blocks in flight (`inflight_bytes`). Without
    the budget Ray Data let the decode stage run ahead by the whole corpus, and the shared pages
    the front-end actor touched (RssShmem) grew with it: 4.5 -> 40 MB at 100 -> 1,000 files,
    8.6 -> 78 MB at 200 -> 2,000. Now they stop below the budget (about 5 MB here)."""
    goldens.require()
    bench = bench_module("load")
    workdir = Path(tempfile.mkdtemp(prefix="kl-load-", dir="/tmp"))
    try:
        runs = {n: bench.run_size(n, workdir, goldens.CHECKPOINT, timeout_s=400,
                                  spec_overrides={"inflight_bytes": INFLIGHT})
                for n in (SMALL, LARGE)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for n, run in runs.items():
        assert run["all_accounted_once"], run
        assert run["rows"] == run["unique_rows"] == run["report_processed"] == n
        assert run["ok_rows"] == n
        assert run["samples"] > 20  # the sampler saw the run, not just its end
    small, large = runs[SMALL], runs[LARGE]
    assert large["driver_rss_mb"] <= FLAT * small["driver_rss_mb"], (small, large)
    assert small["worker_processes"] > 0 and large["worker_max_rss_mb"] > 100
    assert large["worker_max_rss_mb"] <= FLAT * small["worker_max_rss_mb"], (
        small["workers"], large["workers"])
    assert large["worker_max_shmem_mb"] <= INFLIGHT / 2**20, large["workers"]
