"""The decoding forward path (``kernels_cu/fwd_decode.cu``): few query rows per kv head, many keys.

``supports(run)`` says whether a run takes this path: fp16/bf16 on sm_80 or newer, no dropout, at most
``DISPATCH_MAX_ROWS`` = 16 packed rows per kv head (seqlen_q x nheads / nheads_k: one m16 tile, e.g.
seqlen_q = 1 with a GQA group of up to 16, or up to 16 queries without GQA), 16-byte aligned rows (the
sm80 path's rule), and ``CUFLASH_DISABLE_DECODE`` unset (``=1`` falls back to the sm90 / sm80 paths, for
benchmarks). ``forward_decode(run)`` launches it; ``variants(arch)`` lists its kernels for precompile
and the compile tests; ``plan(run)`` exposes the launch plan.

Every warp of a block owns the same 16 rows and a share of the keys; blocks are (key slice, kv head x
16-row block, batch). Split-KV: the key tiles of every (batch, kv head) are cut into ``splits`` slices
(``num_splits_heuristic``: about one block per SM), each slice writes fp32 partial outputs and LSEs in
the layout ``combine.cu`` reads, and the sm80 path's ``fwd_combine`` merges them. On sm_90+ up to 16
slices run as one thread-block cluster instead and merge in the decode kernel through distributed shared
memory (``fwd_decode_cluster``; ``cluster_for``; ``CUFLASH_DECODE_CLUSTER=0`` turns it off).
``run.num_splits``: 0 = heuristic, >= 1 forced (capped at the tile count; a forced count of 2, 4, 8 or
16 runs as a cluster on sm_90+).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from . import _config
from ._launch import CTYPES, launch

FILE = "fwd_decode.cu"
ROWS = 16                 # rows of a block (DecodeTraits::kRows): one m16 tile
DISPATCH_MAX_ROWS = 16    # the dispatcher sends runs with at most this many rows per kv head here
MAX_SPLITS = 128
HEADDIM_BUCKETS = (64, 128, 192, 256)
_DTYPES = ("float16", "bfloat16")
_GRID_YZ_MAX = 65535
SMEM_PER_SM_H100 = 228 * 1024


@dataclass(frozen=True)
class DecodeTile:
    headdim_bucket: int
    warps: int
    stages: int               # ring of `stages` (K, V) tiles, stages - 1 loading ahead of the compute
    warp_keys: int = 16       # keys per warp and tile
    q_in_regs: bool = True    # Q fragments held in registers (else re-read from shared memory each tile)

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def block_n(self) -> int:
        """Keys per tile (all warps)."""
        return self.warps * self.warp_keys

    @property
    def tile_bytes(self) -> int:
        """K plus V bytes of one tile (DecodeTraits::kStageBytes)."""
        return 4 * self.block_n * self.headdim_bucket

    @property
    def smem(self) -> int:
        """Dynamic shared memory (DecodeTraits::kSmemBytes): Q (16 rows), the ring, the merge statistics."""
        return 2 * ROWS * self.headdim_bucket + self.stages * self.tile_bytes + 8 * ROWS * self.warps

    @property
    def min_blocks(self) -> int:
        """Blocks per SM the H100's 228 KB allow (at most 4): DecodeTraits::kMinBlocks, the kernel's
        __launch_bounds__ minimum (ptxas keeps the registers within it)."""
        return max(1, min(4, SMEM_PER_SM_H100 // (self.smem + 1024)))


# Candidates per head-dim bucket, in order of preference: the first whose shared memory fits the
# device's per-block limit is used (227 KB on H100/H200/B200, 163 KB on A100, 99 KB on sm86/89/120).
# Every tile keeps stages - 2 tiles loading while a block waits for its next one, so stages >= 3.
# Registers (NVRTC 13.0 and 13.5, sm_80 / sm_90a): d64 106 / 116, d128 177 / 189, d192 204 / 214 (Q re-read
# from shared memory), d256 255 / 255; no spills, no stack (tests/test_decode_compile.py). NOT YET MEASURED
# on a GPU: the choices below follow from shared memory and bytes in flight only (H100 blocks per SM /
# bytes still loading per SM while its blocks wait):
#   d64:  4 warps x 16 keys, 4 stages (66.5 KB): 3 blocks, 96 KB
#   d128: 4 warps x 16 keys, 3 stages (100.5 KB): 2 blocks, 64 KB; A100: 1 block, 32 KB;
#         sm86: 2 warps, 4 stages (68.3 KB)
#   d192: 4 warps x 16 keys, 4 stages (198.5 KB): 1 block, 96 KB; A100: 3 stages; sm86: 2 warps, 3 stages
#   d256: 4 warps x 16 keys, 3 stages (200.5 KB): 1 block, 64 KB; A100: 2 warps, 4 stages (136.3 KB);
#         sm86: 1 warp, 5 stages (88.1 KB)
DECODE_TILES = {
    64: (DecodeTile(64, 4, 4),),
    128: (DecodeTile(128, 4, 3), DecodeTile(128, 2, 4)),
    192: (DecodeTile(192, 4, 4, q_in_regs=False), DecodeTile(192, 4, 3, q_in_regs=False),
          DecodeTile(192, 2, 3, q_in_regs=False)),
    256: (DecodeTile(256, 4, 3, q_in_regs=False), DecodeTile(256, 2, 4, q_in_regs=False),
          DecodeTile(256, 1, 5, q_in_regs=False)),
}


def tile_for(headdim: int, smem_limit: int | None = None) -> DecodeTile | None:
    """The decode tile of a head dim (1..256) within a per-block shared-memory limit (bytes; None: no
    limit); None when none fits. ``CUFLASH_DECODE_TILE=WARPSxSTAGES[xKEYS]`` (e.g. ``4x3`` or ``2x4x32``)
    overrides it, for tuning (such a variant is compiled on first use: it is not in ``variants``)."""
    d = _config.bucket(headdim, HEADDIM_BUCKETS)
    env = os.environ.get("CUFLASH_DECODE_TILE")
    if env:
        parts = [int(x) for x in env.lower().split("x")]
        first = DECODE_TILES[d][0]
        return DecodeTile(d, parts[0], parts[1], parts[2] if len(parts) > 2 else 16, first.q_in_regs)
    return _choose_default(d, smem_limit)


def kernel_name(dtype: str, tile: DecodeTile, cluster: int = 1) -> str:
    """The kernel's name expression; ``cluster`` > 1: the variant whose ``cluster`` key slices merge in
    the kernel through distributed shared memory (``fwd_decode_cluster``, sm_90+)."""
    args = (f"{CTYPES[dtype]}, {tile.headdim_bucket}, {tile.warps}, {tile.warp_keys}, {tile.stages}, "
            f"{'true' if tile.q_in_regs else 'false'}")
    if cluster > 1:
        return f"cuflash::fwd_decode_cluster<{args}, {cluster}>"
    return f"cuflash::fwd_decode<{args}>"


def _tiles(arch: str | None = None) -> list[DecodeTile]:
    """Every tile the dispatcher can pick on GPUs of ``arch`` (None: on any GPU); none below sm_80."""
    if arch is not None and _config.arch_number(arch) < 80:
        return []
    every = [t for cands in DECODE_TILES.values() for t in cands]
    return _config.pickable(every, _choose_default, HEADDIM_BUCKETS, arch)


def _choose_default(d: int, limit: int | None) -> DecodeTile | None:
    for tile in DECODE_TILES[d]:
        if limit is None or tile.smem <= limit:
            return tile
    return None


def variants(arch: str | None = None) -> list[tuple[str, str]]:
    """Every (file, name expression) this path can launch on GPUs of ``arch`` (e.g. ``"sm_90a"``; None:
    on any GPU). The combine it launches is ``_launch_sm80``'s (listed there)."""
    out = [(FILE, kernel_name(dt, t)) for dt in _DTYPES for t in _tiles(arch)]
    return out + [(FILE, kernel_name(dt, t, c)) for dt in _DTYPES for t in _cluster_tiles(arch)
                  for c in cluster_sizes(t)]


def _cluster_tiles(arch: str | None) -> list[DecodeTile]:
    """The tiles that run as clusters on ``arch``'s GPUs (None: on any GPU)."""
    return _tiles(arch) if arch is None or cluster_arch(arch) else []


# ---- support ---------------------------------------------------------------------------------------

def rows_per_kv_head(run) -> int:
    return run.seqlen_q * (run.nheads // run.nheads_k)


def _device_limits(device_id: int) -> tuple[int, int, int]:
    """(SMs, shared memory per block, shared memory per SM) of a device; H100 numbers without one."""
    from . import _launch_sm80

    try:
        return (_launch_sm80.num_sms(device_id), _launch_sm80.smem_per_block_optin(device_id),
                _launch_sm80._device_attr(device_id, "cudaDevAttrMaxSharedMemoryPerMultiprocessor"))
    except Exception:  # no device query possible
        return 132, 227 * 1024, SMEM_PER_SM_H100


def _tile(run) -> DecodeTile | None:
    return tile_for(run.headdim, _device_limits(run.device_id)[1])


def supports(run) -> bool:
    """True when this path runs ``run`` (else the sm90 / sm80 / portable paths)."""
    if os.environ.get("CUFLASH_DISABLE_DECODE") == "1":
        return False
    if run.dtype not in _DTYPES or _config.arch_number(run.arch) < 80 or run.dropout_p > 0:
        return False
    if not 1 <= run.headdim <= 256:
        return False
    if min(run.batch, run.seqlen_q, run.seqlen_k, run.nheads, run.nheads_k) < 1:
        return False
    if rows_per_kv_head(run) > DISPATCH_MAX_ROWS:
        return False
    m_blocks = -(-rows_per_kv_head(run) // ROWS)
    if run.batch > _GRID_YZ_MAX or run.nheads_k * m_blocks > _GRID_YZ_MAX:
        return False
    from ._launch_sm80 import _rows_16b_aligned

    if not all(_rows_16b_aligned(a) for a in (run.q, run.k, run.v, run.out)):
        return False
    return _tile(run) is not None


# ---- split-KV heuristic ----------------------------------------------------------------------------

# The fewest key slices whose blocks cover this fraction of the SMs. Measured on the H100 (d128 bf16,
# L2 flushed; benchmarks/NOTES.md "Decode, session 6"): the decode kernel's time stays flat from about
# one block per SM up (batch 1 x 4k keys: 11.6-11.7 us for 128 or 256 blocks, 12.3 us for 64), while
# the merge of the slices grows with their count, so one block per SM is the target.
SPLIT_SM_FILL = 0.95


@functools.lru_cache(maxsize=4096)
def num_splits_heuristic(ctas: int, sms: int, n_tiles: int, max_splits: int = MAX_SPLITS) -> int:
    """Key slices per (batch, kv head, row block): the fewest that give about one block per SM.

    ``ctas``: blocks without splitting; ``sms``: the device's SMs; ``n_tiles``: key tiles of a block.
    Returns the smallest count s with ctas x s >= SPLIT_SM_FILL x sms among those whose slices all hold
    tiles (ceil(n / ceil(n / s)) == s), else the largest such count within n_tiles and max_splits.
    Decoding is memory-bound: once every SM streams, more blocks do not read faster, and each slice
    adds fp32 partials for the merge to write and read back.
    """
    if n_tiles <= 1 or ctas < 1:
        return 1
    want = SPLIT_SM_FILL * sms
    best = 1
    for s in range(1, min(max_splits, n_tiles) + 1):
        if -(-n_tiles // -(-n_tiles // s)) != s:
            continue
        best = s
        if ctas * s >= want:
            break
    return best


# ---- split-KV merged in the kernel (clusters, sm_90+) -------------------------------------------------

# On sm_90+ the key slices of one (batch, kv head, row block) can run as one thread-block cluster and
# merge through distributed shared memory at the end of the decode kernel, so that no o_partial round
# trip through memory, no fwd_combine and no launch gap between the two kernels remain. Cluster sizes
# are compile-time (__cluster_dims__): one kernel per size. 16 is above the portable 8 (the kernel is
# given the non-portable attribute); it is used only where two blocks fit an SM, so that its 16 blocks
# fit in the SMs of one GPC with room to spare.
#
# Measured on the H100 (d128 bf16, seqlen_q 1, 32 / 8 heads, L2 flushed, GPU span per call;
# benchmarks/NOTES.md "Decode, session 10"), cluster vs the same slices through fwd_combine:
#   * with the driver's default cluster placement: b1 4k 14.0 vs 17.8 us, b2 4k 20.6 vs 24.0, b4 4k 36.1
#     vs 38.4, but b1 128k 206 vs 190 and b4 128k 736 vs 694 (the placement costs bandwidth);
#   * with the load-balancing policy (CU_CLUSTER_SCHEDULING_POLICY_LOAD_BALANCING, used here): b1 4k 13.2,
#     b1 16k 36.0 vs 39.2, b1 128k 186.5 vs 189.3, b4 4k 35.0, b4 16k 101.6 vs 104.7, b4 128k 706 vs 692;
#   * with one block per SM forced (the shared memory padded to 120 KB): 1.4-1.5x slower everywhere.
# Long slices gain nothing from the merge (the combine is a few us) and can lose ~2%, so slices of more
# than CLUSTER_MAX_SLICE_TILES key tiles keep fwd_combine.
CLUSTER_SIZES = (2, 4, 8, 16)
CLUSTER_MAX_SLICE_TILES = 256


def cluster_arch(arch: str) -> bool:
    """Whether GPUs of ``arch`` run the cluster variants (compute capability 9.0 and newer)."""
    return _config.arch_number(arch) >= 90


def cluster_sizes(tile: DecodeTile, blocks_per_sm: int | None = None) -> tuple[int, ...]:
    """The cluster sizes a tile runs with: up to 16 where two of its blocks fit an SM (``blocks_per_sm``,
    by default the H100's), else up to 8."""
    per_sm = tile.min_blocks if blocks_per_sm is None else blocks_per_sm
    return tuple(c for c in CLUSTER_SIZES if c <= (16 if per_sm >= 2 else 8))


def cluster_for(splits: int, sizes: tuple[int, ...], forced: bool, n_tiles: int = 0) -> int:
    """The cluster size (one of ``sizes``) that runs ``splits`` key slices merged in the kernel, or 1
    (split-KV through fwd_combine). Forced splits run as a cluster only when their count is one of the
    sizes; the heuristic's count is rounded up to the next size (slices past the tiles are empty), unless
    its slices would hold more than CLUSTER_MAX_SLICE_TILES of the ``n_tiles`` key tiles."""
    if splits <= 1 or os.environ.get("CUFLASH_DECODE_CLUSTER") == "0":
        return 1
    if forced:
        return splits if splits in sizes else 1
    c = next((c for c in sizes if c >= splits), 1)
    return c if -(-n_tiles // c) <= CLUSTER_MAX_SLICE_TILES else 1


def key_tiles(run, block_n: int) -> int:
    """Key tiles some row keeps (the window clips the range: sliding-window decoding splits only the
    window). The kernel derives each block's range the same way (fwd_decode.cu)."""
    sq, sk = run.seqlen_q, run.seqlen_k
    left, right = run.window
    shift = sk - sq
    lo = 0 if left < 0 or left >= sk else max(0, shift - left)
    hi = sk - 1 if right < 0 or right >= sq else min(sk - 1, sq - 1 + shift + right)
    if hi < lo:
        return 0
    return hi // block_n - lo // block_n + 1


def plan_blocks_per_sm(tile: DecodeTile, device_id: int) -> int:
    """Blocks of ``tile`` that fit an SM of the device (at most the kernel's __launch_bounds__ minimum)."""
    return max(1, min(tile.min_blocks, _device_limits(device_id)[2] // (tile.smem + 1024)))


def plan(run, tile: DecodeTile | None = None) -> dict:
    """Launch plan: tile, row blocks, grid, splits, blocks per SM (exposed for tests and benchmarks)."""
    tile = tile or _tile(run)
    m_blocks = -(-rows_per_kv_head(run) // ROWS)
    n_tiles = key_tiles(run, tile.block_n)
    sms = _device_limits(run.device_id)[0]
    per_sm = plan_blocks_per_sm(tile, run.device_id)
    ctas = run.batch * run.nheads_k * m_blocks
    if run.num_splits >= 1:
        splits = run.num_splits
    else:
        splits = num_splits_heuristic(ctas, sms, n_tiles)
    splits = max(1, min(splits, n_tiles, MAX_SPLITS))
    cluster = (cluster_for(splits, cluster_sizes(tile, per_sm), run.num_splits >= 1, n_tiles)
               if cluster_arch(run.arch) else 1)
    if cluster > 1:
        splits = cluster
    return {"tile": tile, "m_blocks": m_blocks, "n_tiles": n_tiles, "splits": splits, "blocks_per_sm": per_sm,
            "cluster": cluster, "grid": (splits, run.nheads_k * m_blocks, run.batch)}


# ---- launch ----------------------------------------------------------------------------------------

def forward_decode(run, tile: DecodeTile | None = None) -> None:
    """Launch the decoding forward (and the split-KV combine when it splits)."""
    from ._launch_sm80 import launch_combine, split_partials

    pl = plan(run, tile)
    tile, splits, cluster = pl["tile"], pl["splits"], pl["cluster"]
    extra = {"num_splits": splits, "flags": 0}
    if cluster > 1:  # merged in the kernel: no partials, no combine
        from ._compile import FUNC_ATTR_CLUSTER_SCHEDULING, FUNC_ATTR_NON_PORTABLE_CLUSTER

        # CU_CLUSTER_SCHEDULING_POLICY: 2 (load balancing) measured best (see CLUSTER_SIZES); tuning knob
        policy = int(os.environ.get("CUFLASH_DECODE_CLUSTER_POLICY", "2"))
        attrs = ((FUNC_ATTR_CLUSTER_SCHEDULING, policy),) + (((FUNC_ATTR_NON_PORTABLE_CLUSTER, 1),) if cluster > 8 else ())
        params = run.params(**extra)
        launch(run, FILE, kernel_name(run.dtype, tile, cluster), pl["grid"], (tile.threads,), params, tile.smem,
               attributes=attrs)
        return
    if splits > 1:
        extra.update(split_partials(run, splits))
    params = run.params(**extra)
    launch(run, FILE, kernel_name(run.dtype, tile), pl["grid"], (tile.threads,), params, tile.smem)
    if splits > 1:
        launch_combine(run, params)

