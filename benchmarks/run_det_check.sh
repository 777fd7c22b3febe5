#!/usr/bin/env bash
# One device call for the ordered deterministic backward (bwd_sm90.cu, kModeOrdered): its GPU tests, then the
# backward benchmark with cuflash-det (deterministic=True) beside the default, and the non-causal cells
# again with one dq_accum plane (CUFLASH_BWD_ORDERED_PLANES=1). Logs and CSVs under $OUT.
# Usage: bash benchmarks/run_det_check.sh [extra bench_attention args]
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-$PWD/.kcache}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# warm the kernel cache in parallel: the variants of the files these tests use
python3 benchmarks/precompile_files.py bwd_sm90.cu bwd_sm80.cu fwd_sm90.cu fwd_sm80.cu 2>&1 | tail -3
timeout 300 python3 -m pytest -q -rs -x tests/test_gpu_backward_sm90.py tests/test_gpu_dropout_backward_sm90.py \
    -k "${TESTS_K:-determin or ordered or gqa or strided}" 2>&1 | tee "$OUT/pytest.txt" | tail -6
timeout 200 python3 benchmarks/bench_attention.py --mode bwd --headdims 64,128 --impls cuflash,cuflash-det,torch-fa2 \
    --no-jax --no-plot --outdir "$OUT/bench" "$@" > "$OUT/bench.txt" 2>&1
CUFLASH_BWD_ORDERED_PLANES=1 timeout 120 python3 benchmarks/bench_attention.py --mode bwd --headdims 64,128 \
    --causal false --impls cuflash,cuflash-det --no-jax --no-plot --outdir "$OUT/bench1" "$@" > "$OUT/bench1.txt" 2>&1
echo "== two planes (default) =="; grep -A30 "DETERMINISTIC COST" "$OUT/bench.txt" | head -30
echo "== one plane, non-causal =="; grep -A16 "DETERMINISTIC COST" "$OUT/bench1.txt" | head -16
