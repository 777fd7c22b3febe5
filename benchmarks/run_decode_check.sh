#!/usr/bin/env bash
# Decode-path GPU check and measurement in one device call (issue 4): the decode / merge / split-KV
# GPU tests, then the per-kernel profile and the benchmark's decode table. Logs under $OUT.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OUT=${OUT:-/tmp/decode_out}
mkdir -p "$OUT"
timeout ${TESTS_S:-240} python3 -m pytest -q tests/test_gpu_decode.py tests/test_merge.py tests/test_fastpath.py \
  "tests/test_gpu_sm80.py" -k "decode or merge or split or fastpath or replay or Fast" > "$OUT/tests.log" 2>&1
echo "tests rc=$?: $(tail -1 "$OUT/tests.log")"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
timeout ${PROFILE_S:-200} python3 benchmarks/profile_decode.py --outdir "$OUT" --batches ${BATCHES:-1,2,4,8} \
  --seqlens ${SEQLENS:-4k,8k,16k,128k} --splits 0 --clusters ${CLUSTERS:-default,0} --flush memset ${PROFILE_ARGS:-} \
  > "$OUT/profile.log" 2>&1
echo "profile rc=$?"
if [ -z "${NO_BENCH:-}" ]; then
  timeout 200 python3 benchmarks/bench_attention.py --decode --outdir "$OUT" > "$OUT/bench_decode.log" 2>&1
  echo "bench rc=$?"
fi
grep "^| b" "$OUT/profile.log"; grep "^b" "$OUT/profile.log" | sed 's/void cuflash::fwd_decode<cuflash::bf16_t/dec/; s/cudnn_generated_fort_native_sdpa_sm80_fl/cudnn/; s/void pytorch_flash::flash_fwd_splitkv_ke/fa2/; s/void pytorch_flash::flash_fwd_splitkv_co/fa2c/; s/void cudnn::fusion::lean_reduction_kerne/red/' | cut -c1-170
tail -40 "$OUT/bench_decode.log"
