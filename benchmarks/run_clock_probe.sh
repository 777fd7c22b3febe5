#!/usr/bin/env bash
# One device call: SM clock / power per implementation (clock_fwd.py), the same for the kernel's probes,
# and Nsight Compute sections of cuflash vs cuDNN on one cell (ncu_fwd.py). Logs under $OUT.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-$PWD/.kcache}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
CELLS=${CELLS:-128:0:4k,128:0:16k,256:0:4k,64:0:4k,128:1:8k}
python3 benchmarks/clock_fwd.py --cells "$CELLS" --seconds ${SECS:-3} 2>&1 | grep -v "^cuflash: compiled" | tee "$OUT/clock.txt"
for probe in ${PROBES:-}; do
    CUFLASH_NVRTC_DEFINES=CUFLASH_SM90_PROBE_$probe python3 benchmarks/clock_fwd.py --cells "${PROBE_CELLS:-128:0:4k}" \
        --seconds ${SECS:-3} --impls cuflash 2>&1 | grep -v "^cuflash: compiled" | tee "$OUT/clock_$probe.txt"
done
if [ -n "${NCU_HD:-}" ] && command -v ncu >/dev/null; then
    timeout 300 ncu --profile-from-start off --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy \
        python3 benchmarks/ncu_fwd.py --headdim "$NCU_HD" --seqlen ${NCU_S:-4096} > "$OUT/ncu.txt" 2>&1
    grep -E "^  [a-zA-Z_]|Duration|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Executed Ipc A|L2 Cache Throughput|Pipe|Registers" "$OUT/ncu.txt" | head -60
fi
