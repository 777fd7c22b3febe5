# Sourced by the Hopper-forward device scripts (run_ab_sm90.sh, run_fwd_sm90_check.sh): the environment,
# the GPU's name into $OUT/gpu.txt, every forward variant the tests build compiled in parallel (else they
# compile one by one), then the GPU tests TEST_FILES (default tests/test_gpu_sm90.py; empty: none), -k
# TESTS_K, at most TESTS_S seconds.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-$PWD/.kcache}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 benchmarks/precompile_files.py --sm90-test-variants fwd_sm90.cu fwd_sm80.cu 2>&1 | tail -2
TEST_FILES=${TEST_FILES-tests/test_gpu_sm90.py}
if [ -n "$TEST_FILES" ]; then
    timeout ${TESTS_S:-240} python3 -m pytest -q -rs -x $TEST_FILES -k "${TESTS_K:-not 64bit}" \
        2>&1 | tee "$OUT/pytest.txt" | tail -8
fi
