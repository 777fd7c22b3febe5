#!/usr/bin/env bash
# One device call: GPU tests, then (optionally) the benchmark. Logs go to $OUT (or ./gpu_out).
# Usage: bash tests/run_gpu.sh [pytest args...]      env BENCH="--quick" to also benchmark.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUFLASH_CACHE_DIR=${CUFLASH_CACHE_DIR:-$PWD/.kcache}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m cuflash info | tee "$OUT/info.txt"
# warm the kernel cache in parallel (16 cores) so tests do not compile one by one
python3 - <<'PY' 2>&1 | tail -2
import os
from concurrent.futures import ProcessPoolExecutor
from cuflash import _compile
from cuflash._precompile import all_variants
import cupy
arch = _compile.device_arch(0)
def one(v):
    try:
        _compile.compile_cubin(v[0], (v[1],), arch); return None
    except Exception as e:
        return f"{v}: {str(e)[:300]}"
with ProcessPoolExecutor(16) as ex:
    res = list(ex.map(one, all_variants(arch)))
for r in res:
    if r: print("COMPILE FAILED", r)
print(f"precompiled {len(res)} variants for {arch}")
PY
python3 -m cuflash demo --dtype bf16 --causal 2>&1 | tee "$OUT/demo.txt"
python3 -m pytest -q -rs --durations=10 --maxfail=25 "${@:-tests}" 2>&1 | tee "$OUT/pytest.txt" | tail -40
rc=${PIPESTATUS[0]}
if [ -n "${BENCH:-}" ]; then
  python3 benchmarks/bench_attention.py $BENCH --outdir "$OUT" 2>&1 | tee "$OUT/bench.txt" | tail -60
fi
exit $rc
