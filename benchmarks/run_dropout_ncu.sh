#!/usr/bin/env bash
# Nsight Compute on the dropout kernels (issue 6): per CELLS entry "HD:SEQ:P:fwd|bwd", the first Hopper
# kernel of that cell with the pipe utilisation, scheduler and warp-state sections; text under $OUT/ncu_*.txt
# and the key lines printed. Usage: CELLS="64:4096:0:fwd 64:4096:0.1:fwd" bash benchmarks/run_dropout_ncu.sh
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-$PWD/.kcache}
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
for cell in ${CELLS:-64:4096:0:fwd 64:4096:0.1:fwd}; do
    IFS=: read -r hd seq p dir <<< "$cell"
    kern=fwd_sm90; extra=()
    if [ "$dir" = bwd ]; then kern=bwd_sm90; extra=(--bwd); fi
    f="$OUT/ncu_${dir}_d${hd}_${seq}_p${p}.txt"
    timeout ${NCU_S:-120} "$NCU" -k "regex:$kern" -s 1 -c 1 --section SpeedOfLight --section ComputeWorkloadAnalysis \
        --section SchedulerStats --section WarpStateStats --section InstructionStats \
        --metrics sm__inst_executed_pipe_fmaheavy.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fmalite.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_uniform.avg.pct_of_peak_sustained_active \
        python3 benchmarks/ncu_dropout.py --headdim "$hd" --seqlen "$seq" --p "$p" "${extra[@]}" > "$f" 2>&1
    echo "== $cell"; grep -E "Duration|Issue Slots Busy|Issued Warp Per Scheduler|No Eligible|pipe_|gmma|Stall|Warp Cycles Per Issued|ERR|rror" "$f" | head -30
done
