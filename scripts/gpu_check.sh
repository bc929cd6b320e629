#!/usr/bin/env bash
# The GPU checks of the torch backend, as one short run on a lent GPU machine.
#
#   scripts/gpu_check.sh prepare        # here (internet): the wheels the GPU machine lacks, into .whl/
#   scripts/gpu_check.sh run OUT_DIR    # there: the CUDA tests, then the CUDA benchmark into OUT_DIR
#   scripts/gpu_check.sh core OUT_DIR   # the same without the 20k/300k sweep and the replay (~5 min)
#
# The GPU image has torch, numpy, pytest, pyyaml and rich but not omegaconf (the test fixtures
# import it); `prepare` downloads it for Python 3.12. `run` installs the wheels into /tmp/site,
# times a step at 100k voxels in fp32, TF32 and bf16 (bench/gpu_sweep.py: ms per step, when the
# host had issued its ops, the kernel maps alone, a profile of one step), runs
# tests/test_backbone_cuda.py (CUDA against the CPU, float64, and bf16 autocast), times
# Res16UNet34C at 20k, 100k and 300k voxels (bench/backbone.py --device cuda: ms per step, GEMM
# TFLOP/s against the GPU's matmul peak, peak GPU memory, when the host had issued all of a
# step's ops), sweeps 20k and 300k, then replays each GEMM and gather of a 100k step alone
# (bench/gpu_replay.py). Each part has its own time limit; at most 10 minutes.
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
run|core)
    out="${2:?usage: scripts/gpu_check.sh run|core OUT_DIR}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    exec > >(tee "$out/run.log") 2>&1  # one log: the lent machine gives back at most 8 files
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
    # each part runs even when one before it fails or times out: one lent session (15 minutes of
    # device time, start included) should bring back all of them
    status=0
    timeout 150 python3 -m bench.gpu_sweep --sizes 100000 --repeats 6 --out "$out/sweep-100k" || status=1
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_backbone_cuda.py || status=1
    timeout 180 python3 bench/backbone.py --device cuda --sizes 20000 100000 300000 --repeats 8 --warmup 2 \
        --out "$out/backbone-cuda.md" || status=1
    if [ "$1" = run ]; then
        timeout 90 python3 -m bench.gpu_sweep --sizes 20000 300000 --repeats 4 --out "$out/sweep-20k-300k" \
            || status=1
        timeout 60 python3 -m bench.gpu_replay --voxels 100000 --out "$out/gpu-replay.md" > /dev/null || status=1
    fi
    sleep 1  # let tee write the log out
    exit "$status"
    ;;
*)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
