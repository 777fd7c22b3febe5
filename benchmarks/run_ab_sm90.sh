#!/usr/bin/env bash
# One device call for a Hopper forward A / B: precompile, the GPU tests (TEST_FILES, -k TESTS_K, at most
# TESTS_S seconds), then ab_fwd_sm90.py over CELLS with the variants VARIANT_n=LABEL=Sm90Tile(...)
# interleaved with the table's choice and the torch SDPA peers; the table last.
# Usage: CELLS=64:1:1k,128:0:2k VARIANT_1='q1=Sm90Tile(64, 128, 3, q_bufs=1)' bash benchmarks/run_ab_sm90.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-$PWD/.kcache}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
# (with the kernel variants tests/test_gpu_sm90.py builds: else they compile one by one)
python3 benchmarks/precompile_files.py --sm90-test-variants fwd_sm90.cu fwd_sm80.cu 2>&1 | tail -2
TEST_FILES=${TEST_FILES-tests/test_gpu_sm90.py}  # TEST_FILES= (empty): no tests
if [ -n "$TEST_FILES" ]; then
    timeout ${TESTS_S:-240} python3 -m pytest -q -rs -x $TEST_FILES -k "${TESTS_K:-not 64bit}" \
        2>&1 | tee "$OUT/pytest.txt" | tail -8
fi
variants=()
for v in $(compgen -v VARIANT_ | sort); do variants+=(--variant "${!v}"); done
timeout ${BENCH_S:-300} python3 benchmarks/ab_fwd_sm90.py --cells "$CELLS" --rounds ${ROUNDS:-5} "${variants[@]}" \
    2>&1 | grep -v "^cuflash: compiled" | tee "$OUT/ab.txt" | tail -40
