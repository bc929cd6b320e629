#!/usr/bin/env bash
# The GPU checks of the torch backend, as one short run on a lent GPU machine.
#
#   scripts/gpu_check.sh prepare        # here (internet): the wheels the GPU machine lacks, into .whl/
#   scripts/gpu_check.sh run OUT_DIR    # there: the CUDA tests, then the CUDA benchmark into OUT_DIR
#
# The GPU image has torch, numpy, pytest, pyyaml and rich but not omegaconf (the test fixtures
# import it); `prepare` downloads it for Python 3.12. `run` installs the wheels into /tmp/site,
# runs tests/test_backbone_cuda.py (CUDA against the CPU, float64, and bf16 autocast), then
# times Res16UNet34C at 20k, 100k and 300k voxels (bench/backbone.py --device cuda: ms per
# step, GEMM TFLOP/s against the GPU's matmul peak, peak GPU memory, when the host had issued
# all of a step's ops). Meant to take a few minutes on an H100 (not yet run on one).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    mkdir -p .whl
    for pkg in omegaconf==2.3.0 antlr4-python3-runtime==4.9.3; do
        python3 -m pip download -q --no-deps --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
            --only-binary=:all: -d .whl "$pkg" 2>/dev/null \
        || python3 -m pip wheel -q --no-deps -w .whl "$pkg"  # antlr4 4.9.3 ships an sdist only
    done
    ls .whl
    ;;
run)
    out="${2:?usage: scripts/gpu_check.sh run OUT_DIR}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt" || true
    # the benchmark runs even when a test fails: one lent session should bring back both
    status=0
    python3 -m pytest -q -p no:cacheprovider tests/test_backbone_cuda.py 2>&1 | tee "$out/tests.log" || status=1
    python3 bench/backbone.py --device cuda --sizes 20000 100000 300000 --repeats 10 --warmup 2 \
        --out "$out/backbone-cuda.md" 2>&1 | tee "$out/bench.log" || status=1
    exit "$status"
    ;;
*)
    sed -n '2,12p' "$0"
    exit 2
    ;;
esac
