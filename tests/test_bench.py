"""The benchmark scripts run (small sizes): their numbers are for bench/results, not for tests,
but a benchmark that no longer runs or mislabels its output is a bug."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_gpu_benchmark_runs_its_path_on_a_tiny_shape(tmp_path):
    out = run_script("bench/gpu.py", "--shape", "tiny", "--device", "cpu", "--batch-sizes", "1",
                     "3", "--new-tokens", "5", "--mix", "10", "--rows", "3", "--mix-budget",
                     "12", "--out", str(tmp_path))
    result = json.loads((tmp_path / "gpu-cpu-tiny.json").read_text())
    assert [r["batch"] for r in result["runs"]] == [1, 3]
    for r in result["runs"]:
        assert r["new_tokens"] >= 2 and r["prompt_tokens"] > 375  # 30 s of 12.5 Hz tokens
        assert r["frontend_s"] > 0 and r["prefill_s"] > 0 and r["real_time_factor"] > 0
        assert r["roofline_step_ms"] > 0
    assert result["text_path_weight_gb"] > 0 and "x real time" in out
    # continuous vs static on the labelling mix: the same rows in fewer forwards (fp32 here:
    # the same tokens too)
    mix = result["labelling_mix"]
    static, continuous = mix["arms"]
    assert (static["arm"], continuous["arm"]) == ("static", "continuous")
    assert mix["conversations"] == 10 and mix["rows_with_equal_tokens"] == 10
    assert static["decode_rows"] == continuous["decode_rows"] > 0
    assert continuous["decode_forwards"] < static["decode_forwards"]
    assert 0 < static["occupancy"] < continuous["occupancy"] <= 1
    assert continuous["tokens_per_s"] > 0 and "labelling mix" in out


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
    # the reference protocol on the same checkpoint: each arm split into its phases
    out = run_script("bench/engine.py", "--reference", "--preset", "tiny", "--conversations",
                     "4", "--max-new-tokens", "3", "--out", str(tmp_path))
    result = json.loads((tmp_path / "engine_reference.json").read_text())
    assert result["identical_tokens"] is True and result["conversations"] == 4
    for arm in result["arms"].values():
        assert arm["frontend_s"] > 0 and arm["prefill_s"] > 0 and arm["decode_s"] > 0
        assert arm["total_s"] >= arm["frontend_s"] + arm["prefill_s"]
        assert arm["generated_tokens"] == 4 * 3
    assert "against the official code" in out


def test_engine_benchmark_measures_decode_slot_occupancy(tmp_path):
    out = run_script("bench/engine.py", "--occupancy", "--preset", "tiny", "--conversations",
                     "16", "--max-new-tokens", "32", "--max-batch-size", "4",
                     "--out", str(tmp_path))
    result = json.loads((tmp_path / "engine_occupancy.json").read_text())
    assert result["checkpoint"] == "tiny"
    assert [w["workload"] for w in result["workloads"]] == [
        "reference", "reference, drawn lengths", "labelling mix, drawn lengths"]
    for w in result["workloads"]:
        arms = {a["arm"]: a for a in w["arms"]}
        assert list(arms) == ["single", "static", "continuous"]
        assert all(a["identical_tokens"] for a in arms.values()), w
        # every arm decodes the same rows; batching only packs them into fewer forwards
        rows = {a["decode_rows"] for a in arms.values()}
        assert len(rows) == 1 and arms["single"]["decode_forwards"] == rows.pop()
        if "drawn lengths" in w["workload"]:  # lengths that vary: freed slots get refilled
            assert arms["continuous"]["decode_forwards"] < arms["static"]["decode_forwards"], w
        assert 0 < arms["static"]["occupancy"] <= 1 and 0 < arms["continuous"]["occupancy"] <= 1
    assert "decode-slot occupancy" in out


def test_pipeline_benchmark_accounts_the_command_cpu_by_process(harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    # its commands use the session's Prefect server (a temporary one each: ten seconds more)
    out = run_script("bench/pipeline.py", "--preset", "tiny", "--files", "3", "--no-one-file",
                     "--max-new-tokens", "2", "--out", str(tmp_path),
                     env={"PREFECT_API_URL": PREFECT_API_URL.value()})
    result = json.loads((tmp_path / "pipeline.json").read_text())
    assert result["labelled"] == {"ok": 3}
    assert result["engine_only_s"] > 0 and result["job_s"] > 0
    assert result["one_file_job_s"] is None and result["marginal_job_ratio"] is None
    assert result["engine_only_cpu_s"] > 0
    cpu = result["command_cpu_s"]
    # the stage actors are told apart by their Ray titles; the flow's own process is the driver
    assert {"FrontendStage actor", "LabelStage actor"} <= set(cpu), cpu
    assert all(seconds >= 0 for seconds in cpu.values())
    assert cpu["driver (flow, Ray Data's executor)"] > 0 and cpu["LabelStage actor"] > 0
    assert sum(cpu.values()) <= result["command_cpu_capacity_s"]
    assert "CPU seconds over the command" in out


def test_load_benchmark_runs_long_recordings_as_pieces_and_whole(tmp_path):
    # the short-clip runs are tests/pipelines/test_load.py's (through the same run_size)
    out = run_script("bench/load.py", "--files", "--long", "1", "65", "--piece-seconds", "30",
                     "--out", str(tmp_path))
    result = json.loads((tmp_path / "load.json").read_text())
    assert result["runs"] == [] and "(no short-clip runs)" in out
    assert [r["arm"] for r in result["long_files"]] == ["pieces", "whole"]
    pieces, whole = result["long_files"]
    assert pieces["in_pieces"]["files"] == 1 and pieces["in_pieces"]["pieces"] >= 3
    assert whole["in_pieces"] == {"files": 0, "pieces": 0}
    for arm in result["long_files"]:
        assert arm["all_accounted_once"] and arm["seconds_each"] == 65
        assert {"FrontendStage actor", "LabelStage actor"} <= set(arm["actors_rss_mb"]), arm
    assert "long files | arm" in out


def test_segmentation_benchmark_compares_both_segmenters_on_known_speech(tmp_path):
    out = run_script("bench/segmentation.py", "--recordings", "1", "--seconds", "40",
                     "--out", str(tmp_path))
    result = json.loads((tmp_path / "segmentation.json").read_text())
    rows = {(r["material"], r["segmenter"]): r for r in result["rows"]}
    assert len(rows) == 2 * 6  # five materials and all, by each segmenter
    vad, energy = rows[("all", "vad")], rows[("all", "energy")]
    # the targets on this material, and the loudness cutter's failure they answer
    assert vad["speech_recall"] >= 0.95 and vad["noise_sent"] <= 0.20, vad
    assert energy["noise_sent"] > 0.9 and energy["model_s_per_s"] == 1.0
    assert vad["model_s_per_s"] < 0.6 and vad["cpu_s_per_audio_hour"] > 0
    assert "speech recall" in out and "noise sent" in out
