#!/usr/bin/env bash
# Ceilings of the Hopper forward: the same cells timed with the kernel's probes compiled in (fwd_sm90.cu,
# CUFLASH_SM90_PROBE_*: no K / V loads, no softmax, both), each beside the torch SDPA peers. The outputs
# of the probe runs are wrong by design (their "bad" line is expected).
# Usage: CELLS=128:0:4k,256:0:4k [PROBES="NOKV NOSOFTMAX NOKV,NOSOFTMAX"] bash benchmarks/probe_fwd_sm90.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-$PWD/.kcache}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
for probe in none ${PROBES:-NOKV NOSOFTMAX NOKV,NOSOFTMAX}; do
    defs=""
    [ "$probe" != none ] && defs=$(echo "$probe" | sed 's/\([A-Z]*\)/CUFLASH_SM90_PROBE_\1/g')
    echo "== probe $probe"
    CUFLASH_NVRTC_DEFINES="$defs" timeout ${BENCH_S:-200} python3 benchmarks/ab_fwd_sm90.py --cells "$CELLS" \
        --rounds ${ROUNDS:-2} 2>&1 | grep -v "^cuflash: compiled" | tee "$OUT/probe_$probe.txt" | tail -12
done
