#!/usr/bin/env bash
# One device call for a Hopper forward A / B: precompile, the GPU tests (TEST_FILES, -k TESTS_K, at most
# TESTS_S seconds), then ab_fwd_sm90.py over CELLS with the variants VARIANT_n=LABEL=Sm90Tile(...)
# interleaved with the table's choice and the torch SDPA peers; the table last.
# Usage: CELLS=64:1:1k,128:0:2k VARIANT_1='q1=Sm90Tile(64, 128, 3, q_bufs=1)' bash benchmarks/run_ab_sm90.sh
source "$(dirname "$0")/sm90_device_setup.sh"
variants=()
for v in $(compgen -v VARIANT_ | sort); do variants+=(--variant "${!v}"); done
timeout ${BENCH_S:-300} python3 benchmarks/ab_fwd_sm90.py --cells "$CELLS" --rounds ${ROUNDS:-5} "${variants[@]}" \
    2>&1 | grep -v "^cuflash: compiled" | tee "$OUT/ab.txt" | tail -40
