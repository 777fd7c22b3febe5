#!/usr/bin/env bash
# One device call for dropout (issue 6): precompile, the dropout GPU tests (TEST_FILES, at most TESTS_S
# seconds), then bench_attention.py --dropout-compare over HEADDIMS x SEQLENS (MODE fwd / bwd / both), and
# for each "LABEL:DEFINES[:ENV=V+ENV=V]" in AB (space separated; DEFINES as CUFLASH_NVRTC_DEFINES takes
# them) the same grid of cuflash alone with those compile-time switches (and environment). Logs and CSVs
# under $OUT; the tables last.
# Usage: MODE=bwd AB='n2:CUFLASH_BWD_RNG_NPAR=2' bash benchmarks/run_dropout_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-$PWD/.kcache}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 benchmarks/precompile_files.py ${PRECOMPILE:-fwd_sm90.cu bwd_sm90.cu} 2>&1 | tail -2
TEST_FILES=${TEST_FILES-tests/test_gpu_dropout_sm90.py}
if [ -n "$TEST_FILES" ]; then
    timeout ${TESTS_S:-200} python3 -m pytest -q -rs -x $TEST_FILES -k "${TESTS_K:-not 64bit}" 2>&1 \
        | tee "$OUT/pytest.txt" | tail -6
fi
grid=(--mode ${MODE:-fwd} --headdims ${HEADDIMS:-64,128} --seqlens ${SEQLENS:-2k,4k,8k,16k} --no-jax --no-plot)
timeout ${BENCH_S:-240} python3 benchmarks/bench_attention.py "${grid[@]}" --dropout-compare 0.1 \
    --impls cuflash,cuflash-drop,torch-fa2,torch-fa2-drop --outdir "$OUT/bench" > "$OUT/bench.txt" 2>&1
for ab in ${AB:-}; do
    IFS=: read -r label defs envs <<< "$ab"
    env ${envs//+/ } CUFLASH_NVRTC_DEFINES=$defs timeout ${AB_S:-150} python3 benchmarks/bench_attention.py "${grid[@]}" \
        --dropout-compare 0.1 --impls cuflash,cuflash-drop --outdir "$OUT/ab_$label" > "$OUT/ab_$label.txt" 2>&1
    echo "== A/B $label ($defs; $envs) =="; grep -A12 "DROPOUT COMPARE" "$OUT/ab_$label.txt"
done
echo "== bench =="; grep "CHECK FAILED\|rror" "$OUT/bench.txt" | head -5; tail -45 "$OUT/bench.txt"
