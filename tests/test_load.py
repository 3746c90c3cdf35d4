"""Load: 1,000 short files through the real pipeline (local Ray, 2 CPUs, tiny checkpoint), against
a 100-file run. Every file is accounted exactly once; peak RSS must not grow with the corpus.

1,000 files take about 75-100 s here and 100 files about 25 s, the most `make test` can spend;
`bench/load.py --files 200 2000` runs the full-size comparison (same code).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import pytest

from tests import goldens

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMALL, LARGE = 100, 1000
FLAT = 1.10  # peak memory of the 10x corpus within 10 % of the small one
WORKER_BOUND = 1.25  # what the workers meet today (x1.06-1.14); the target is FLAT


def _bench():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs():
    goldens.require()
    bench = _bench()
    workdir = Path(tempfile.mkdtemp(prefix="kl-load-", dir="/tmp"))
    try:
        yield {n: bench.run_size(n, workdir, goldens.CHECKPOINT, timeout_s=400)
               for n in (SMALL, LARGE)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_every_file_accounted_once_and_driver_memory_flat(runs):
    for n, run in runs.items():
        assert run["all_accounted_once"], run
        assert run["rows"] == run["unique_rows"] == run["report_processed"] == n
        assert run["ok_rows"] == n
        assert run["samples"] > 20  # the sampler saw the run, not just its end
    small, large = runs[SMALL], runs[LARGE]
    assert large["driver_rss_mb"] <= FLAT * small["driver_rss_mb"], (small, large)
    assert small["worker_processes"] > 0 and large["worker_max_rss_mb"] > 100


def test_ray_worker_peak_memory_bounded(runs):
    """Every stage gets work units of at most `unit_rows` objects (a slice of a plan shard), so
    what a worker holds at once does not grow with the corpus: with whole plan shards of up to
    2,000 rows as the unit the front-end actor's peak doubled at 10x. Measured since (VmHWM,
    see docs/reliability.md): x1.06-1.14, i.e. NOT yet within the 10 % target; this guards the
    bound that holds (a regression to corpus-sized units fails it)."""
    small, large = runs[SMALL], runs[LARGE]
    assert large["worker_max_rss_mb"] <= WORKER_BOUND * small["worker_max_rss_mb"], (
        small["workers"], large["workers"])
