#!/usr/bin/env bash
# One device call for the Hopper d256 backward (bwd_sm90.cu, kSplitD): the simplest GPU tests first, the
# d256 backward benchmark against FA2 / cuDNN (default and deterministic), then the whole sm90 backward GPU
# suite. Logs and CSVs under $OUT; the tables last.
# Usage: [HEADDIMS=64,128,256] [TEST_FILES=...] [TESTS_K=...] bash benchmarks/run_d256_check.sh [extra bench_attention args]
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-$PWD/.kcache}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 benchmarks/precompile_files.py bwd_sm90.cu bwd_sm80.cu fwd_sm90.cu 2>&1 | tail -2
timeout 120 python3 -m pytest -q -rs -x tests/test_gpu_backward_sm90.py -k "basic or matches_reference" 2>&1 \
    | tee "$OUT/pytest_basic.txt" | tail -4
timeout ${BENCH_S:-200} python3 benchmarks/bench_attention.py --mode bwd --headdims ${HEADDIMS:-256} \
    --impls cuflash,cuflash-det,torch-fa2,torch-cudnn --no-jax --no-plot --outdir "$OUT/bench" "$@" > "$OUT/bench.txt" 2>&1
timeout ${TESTS_S:-240} python3 -m pytest -q -rs ${TEST_FILES:-tests/test_gpu_backward_sm90.py tests/test_gpu_backward_sm80.py} \
    -k "${TESTS_K:-not basic and not matches_reference and not 64bit}" 2>&1 | tee "$OUT/pytest.txt" | tail -8
echo "== bench =="; grep "CHECK FAILED\|error" "$OUT/bench.txt" | head -5; tail -40 "$OUT/bench.txt"
