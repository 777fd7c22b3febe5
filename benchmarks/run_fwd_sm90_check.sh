#!/usr/bin/env bash
# One device call for the Hopper forward: precompile, the GPU tests (TEST_FILES, -k TESTS_K, at most
# TESTS_S seconds), then bench_paths.py (cuflash's paths, variants given as EXTRA_n=LABEL=DICT, and the
# torch SDPA peers in one process) over HEADDIMS x SEQLENS; the table last.
# Usage: HEADDIMS=64,128,256 EXTRA_1='late={128: ...}' bash benchmarks/run_fwd_sm90_check.sh
source "$(dirname "$0")/sm90_device_setup.sh"
extras=()
for v in $(compgen -v EXTRA_ | sort); do extras+=(--extra "${!v}"); done
timeout ${BENCH_S:-300} python3 benchmarks/bench_paths.py --headdims ${HEADDIMS:-64,128,256} \
    --seqlens ${SEQLENS:-512,1k,2k,4k,8k,16k} --rep ${REP:-60} "${extras[@]}" --outdir "$OUT" 2>&1 \
    | grep -v "^cuflash: compiled" | tee "$OUT/bench.txt" | tail -60
