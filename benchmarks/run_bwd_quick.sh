#!/usr/bin/env bash
# One device call: the Hopper backward's quick GPU checks (simplest shapes, the reference grid, the
# deterministic / ordered cases), then probe_bwd_sm90_modes.py (MODES, default 0) at d64 / d128 / d256.
# Usage: bash benchmarks/run_bwd_quick.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-$PWD/.kcache}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 benchmarks/precompile_files.py bwd_sm90.cu bwd_sm80.cu fwd_sm90.cu 2>&1 | tail -2
timeout ${TESTS_S:-240} python3 -m pytest -q -rs -x tests/test_gpu_backward_sm90.py \
    -k "${TESTS_K:-basic or matches_reference or determin or ordered or gqa}" 2>&1 | tee "$OUT/pytest.txt" | tail -6
MODES=${MODES:-0} timeout 200 python3 benchmarks/probe_bwd_sm90_modes.py ${DIMS:-64,128,256} ${LENS:-2048,16384} 2>&1 \
    | grep -v "^cuflash: compiled" | tee "$OUT/probe.txt"
