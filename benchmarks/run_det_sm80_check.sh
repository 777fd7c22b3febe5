#!/usr/bin/env bash
# One device call for the ordered deterministic mode of the sm80 backward on the H100 (d > 128 runs there):
# the sm80 backward GPU tests, then the d256 backward with cuflash-det beside the default and FA2.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-$PWD/.kcache}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 benchmarks/precompile_files.py bwd_sm80.cu fwd_sm90.cu fwd_sm80.cu bwd_portable.cu 2>&1 | tail -3
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -rs -x tests/test_gpu_backward_sm80.py -k "${TESTS_K:-determin or ordered}" 2>&1 \
    | tee "$OUT/pytest.txt" | tail -6
timeout 200 python3 benchmarks/bench_attention.py --mode bwd --headdims 256 --impls cuflash,cuflash-det,torch-fa2 \
    --no-jax --no-plot --outdir "$OUT/bench" "$@" > "$OUT/bench.txt" 2>&1
grep -A8 "DETERMINISTIC COST" "$OUT/bench.txt" | head -8; grep -B1 -A3 "mode causal  hd" "$OUT/bench.txt" | head -6
