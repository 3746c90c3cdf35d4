"""The benchmark scripts run (small sizes): their numbers are for bench/results, not for tests,
but a benchmark that no longer runs or mislabels its output is a bug."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_gpu_benchmark_runs_its_path_on_a_tiny_shape(tmp_path):
    out = run_script("bench/gpu.py", "--shape", "tiny", "--device", "cpu", "--batch-sizes", "1",
                     "3", "--new-tokens", "5", "--out", str(tmp_path))
    result = json.loads((tmp_path / "gpu-cpu-tiny.json").read_text())
    assert [r["batch"] for r in result["runs"]] == [1, 3]
    for r in result["runs"]:
        assert r["new_tokens"] >= 2 and r["prompt_tokens"] > 375  # 30 s of 12.5 Hz tokens
        assert r["frontend_s"] > 0 and r["prefill_s"] > 0 and r["real_time_factor"] > 0
        assert r["roofline_step_ms"] > 0
    assert result["text_path_weight_gb"] > 0 and "x real time" in out


def test_engine_benchmark_compares_identical_tokens(tmp_path):
    run_script("bench/engine.py", "--preset", "tiny", "--conversations", "3", "--max-new-tokens", "3",
               "--out", str(tmp_path))
    result = json.loads((tmp_path / "engine.json").read_text())
    (run,) = result["runs"]
    assert run["identical_tokens"] is True
    assert run["generated_tokens"] == 3 * 3
    # the machine's measured limits turn into a floor for the batched arm and a ceiling ratio
    assert result["limits"]["gemm_flops"] > 1e8 and result["limits"]["read_bytes_s"] > 1e8
    assert run["batch_floor_s"]["prefill_s"] > 0 and run["batch_floor_s"]["decode_s"] > 0
    assert run["ceiling_speedup"] > 0 and run["llm_ceiling_speedup"] > 0
    assert result["machine"]["torch"]
