#!/usr/bin/env bash
# One device call for the Hopper forward: precompile, the GPU tests (TEST_FILES, -k TESTS_K, at most
# TESTS_S seconds), then bench_paths.py (cuflash's paths, variants given as EXTRA_n=LABEL=DICT, and the
# torch SDPA peers in one process) over HEADDIMS x SEQLENS; the table last.
# Usage: HEADDIMS=64,128,256 EXTRA_1='late={128: ...}' bash benchmarks/run_fwd_sm90_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-$PWD/.kcache}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 benchmarks/precompile_files.py --sm90-test-variants fwd_sm90.cu fwd_sm80.cu 2>&1 | tail -2
TEST_FILES=${TEST_FILES-tests/test_gpu_sm90.py}  # TEST_FILES= (empty): no tests
if [ -n "$TEST_FILES" ]; then
    timeout ${TESTS_S:-240} python3 -m pytest -q -rs -x $TEST_FILES -k "${TESTS_K:-not 64bit}" \
        2>&1 | tee "$OUT/pytest.txt" | tail -8
fi
extras=()
for v in $(compgen -v EXTRA_ | sort); do extras+=(--extra "${!v}"); done
timeout ${BENCH_S:-300} python3 benchmarks/bench_paths.py --headdims ${HEADDIMS:-64,128,256} \
    --seqlens ${SEQLENS:-512,1k,2k,4k,8k,16k} --rep ${REP:-60} "${extras[@]}" --outdir "$OUT" 2>&1 \
    | grep -v "^cuflash: compiled" | tee "$OUT/bench.txt" | tail -60
