#!/usr/bin/env bash
# The GPU checks of this project in one command, for a session that is lent a device machine
# (the `device` tool: one NVIDIA GPU, Python 3.12 with CUDA torch, no network).
#
#   bash bench/device_check.sh prepare   # here, with network: fills .device/ (git-ignored)
#   device run, carry [".device"], command:
#     bash bench/device_check.sh run     # there: GPU tests, then bench/gpu.py, into $OUT
#
# `prepare` downloads the wheels the device image lacks (soundfile, soxr and cffi, for Python
# 3.12) and copies the golden tiny checkpoint (tests read it at ../shared/kimi_tiny, which does
# not travel). `run` installs them under /tmp, puts the goldens back where the tests look,
# runs `pytest -m gpu` and the GPU benchmark, and leaves the logs and the benchmark's JSON in
# $OUT (the benchmark's result then goes to bench/results/gpu-<card>.json here, by hand).
# GPU_BENCH_ARGS replaces the benchmark's arguments (default: its own, the 7B shape).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE_DIR=.device

prepare() {
    rm -rf "$DEVICE_DIR"
    mkdir -p "$DEVICE_DIR/whl"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$DEVICE_DIR/whl" \
        soundfile==0.14.0 soxr==1.1.0 cffi==2.1.1 pycparser==3.12
    cp -r ../shared/kimi_tiny "$DEVICE_DIR/kimi_tiny"
    du -sh "$DEVICE_DIR"
}

run() {
    out=${OUT:-/tmp/device_out}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$DEVICE_DIR"/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    if [ ! -d ../shared/kimi_tiny ]; then
        mkdir -p ../shared && cp -r "$DEVICE_DIR/kimi_tiny" ../shared/kimi_tiny
    fi
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
      python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"
    } 2>&1 | tee "$out/device.txt"
    status=0
    timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kimi_ops/test_gpu.py 2>&1 \
        | tee "$out/gpu_tests.log" || status=1
    # shellcheck disable=SC2086
    timeout 330 python3 bench/gpu.py --out "$out" ${GPU_BENCH_ARGS:-} 2>&1 \
        | tee "$out/gpu_bench.log" || status=1
    return $status
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash bench/device_check.sh prepare|run" >&2; exit 2 ;;
esac
