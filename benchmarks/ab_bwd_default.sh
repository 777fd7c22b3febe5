#!/usr/bin/env bash
# A/B of the default (non-deterministic) backward: this tree against a copy of an older cuflash in
# benchmarks/_old (git archive REV cuflash kernels_cu | tar -x -C benchmarks/_old), alternating twice.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-$PWD/.kcache}
for r in 1 2; do
  for tree in new old; do
    if [ $tree = new ]; then pp=$PWD; else pp=$PWD/benchmarks/_old; fi
    PYTHONPATH=$pp timeout 120 python3 benchmarks/bench_attention.py --mode bwd --headdims 64,128 --seqlens 2k,8k,16k \
      --impls cuflash --no-jax --no-plot --no-check --outdir "$OUT/ab_${tree}_$r" > "$OUT/ab_${tree}_$r.txt" 2>&1
    echo "== $tree run $r"; grep -A4 "mode causal  hd" "$OUT/ab_${tree}_$r.txt" | head -5
  done
done
