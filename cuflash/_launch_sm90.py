"""The Hopper forward path (``kernels_cu/fwd_sm90.cu``): wgmma + TMA + warp specialisation, sm_90a.

``supports(run)`` says whether a run takes this path: fp16/bf16 on a compute-capability-9.0 GPU (the
kernels are built for sm_90a), head dim <= 256, operands the copy engine can address
(16-byte aligned base and strides), and not a decoding shape that the sm80 path splits across the key
range or packs by GQA group (``_launch_sm80.plan``). Everything else falls back to the sm80 path.
``CUFLASH_DISABLE_SM90=1`` turns this path off (benchmarks compare the two paths with it).
``forward_sm90(run)`` launches it; ``variants()`` lists the kernels for precompile and compile tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from . import _tma
from ._launch import CTYPES, empty, launch, memset, ptr

FILE = "fwd_sm90.cu"
_DTYPES = ("float16", "bfloat16")
_SMEM_MAX = 227 * 1024
_GRID_X_MAX = 2**31 - 1


@dataclass(frozen=True)
class Sm90Tile:
    headdim_bucket: int
    block_n: int
    stages: int
    consumers: int = 2       # consumer warpgroups of 64 query rows each (2 or 3)
    pingpong: bool = True    # consumers take turns issuing MMAs (named barriers)
    sched: int = 2           # consumer order per tile: 0 serial, 1 overlap, 2 batched, 3 / 4 = 1 / 2 with
                             # O's rescale deferred to the next turn, 5 = 3 with P V's wait held behind
                             # the softmax (fwd_sm90.cu kSched*)
    persist: bool = True     # min(tiles, SMs) blocks loop over work tiles (atomic tile counter)
    q_bufs: int = 2          # persistent: Q buffers asked for (2: the next tile's Q loads as soon as the
                             # tile is claimed), granted where they fit beside the output buffer
    dropout: bool = False    # the DROPOUT variant (Params::dropout_p > 0); needs block_n % 32 == 0

    @property
    def block_m(self) -> int:
        return 64 * self.consumers

    @property
    def threads(self) -> int:
        return 128 * (self.consumers + 1)

    @property
    def q_buffers(self) -> int:
        """Sm90FwdTraits::kQBufs: 2 for a persistent tile that asked for 2, where they fit beside an output
        buffer; else 1."""
        two = 1024 + 3 * self._q_bytes + self._ring_bytes <= _SMEM_MAX
        return 2 if self.persist and self.q_bufs >= 2 and two else 1

    @property
    def own_o(self) -> bool:
        """Sm90FwdTraits::kOwnO: the output has a staging buffer of its own (else it reuses Q's)."""
        return self._base_smem + self._q_bytes <= _SMEM_MAX

    @property
    def _q_bytes(self) -> int:
        return self.block_m * self.headdim_bucket * 2

    @property
    def _ring_bytes(self) -> int:
        return 2 * self.stages * self.block_n * self.headdim_bucket * 2

    @property
    def _base_smem(self) -> int:
        # alignment slack + Q buffers (block_m x D each) + K and V rings (stages x BN x D)
        return 1024 + self.q_buffers * self._q_bytes + self._ring_bytes

    @property
    def smem(self) -> int:
        """Sm90FwdTraits::kSmemBytes."""
        return self._base_smem + (self._q_bytes if self.own_o else 0)


# One tile per head-dim bucket (head dims pad up to the bucket inside the kernel: TMA zero-fills).
# Registers per consumer thread (setmaxnreg: 240, or 232 when persistent, whose producer needs 40): O
# takes D / 2, the score tile BN / 2, P BN / 4; shared memory 227 KB at most. Persistent kernels (d64,
# d128) stage the output in a buffer of its own; d192 / d256 would spill at 232 registers and run one
# block per tile. Measured on the H100 (bf16, 16k tokens, hidden 2048, TFLOP/s at seqlen 4k / 16k
# non-causal; benchmarks/NOTES.md "Hopper forward" has every variant):
#   d64:  BN 128, 3 stages, ping-pong, batched: 423 / 437 (serial order 394 / 429; BN 192: 404 / 407)
#   d128: BN 128, 2 stages, ping-pong, batched: 580 / 662 (serial 559 / 605; BN 176: 581 / 513); the
#         overlap schedule +2-6% (session 3); its O rescale deferred to the next turn (sched 3) another
#         +1.5% median over 6 cells, 5 interleaved rounds (session 9: 604 vs 590 at 4k)
#   d256: BN 80, 2 stages, ping-pong, batched: 638 / 604 (serial 604 / 633; BN 64: 624 / 600); late
#         rescale (sched 4) +1.3% median over 6 cells (session 9: 651 vs 630 at 4k)
#   d192: not measured (BN 96 fits the same registers and 193 KB).
# Session 13: the schedules 1 / 3 never overlapped the softmax with the warpgroup's own P V (ptxas hoisted
# the wait for it to the top of the softmax); sched 5 holds it back. d128 and d64 (three consumers) take
# it: median +1.5% over 15 / 8 cells (interleaved rounds, an A / A control beside). d256 spills with it.
SM90_FORWARD_TILES = {
    64: Sm90Tile(64, 128, 3),                    # 145 KB (two Q buffers); the table takes the wide tile
    # two Q buffers (225 KB): +0-3% over one (session 12, 3 cells, 6 rounds in turned order)
    128: Sm90Tile(128, 128, 2, sched=5),         # 225 KB; intra-warpgroup overlap, late O rescale
    192: Sm90Tile(192, 96, 2, persist=False),    # 193 KB
    # overlap order + late rescale (sched 3): +2.6-3.5% over the batched one (sched 4) in 3 cells (session 12)
    256: Sm90Tile(256, 80, 2, sched=3, persist=False),  # 225 KB
}
# Three consumer warpgroups (192 query rows, 160 registers each): at d64 the softmax takes longer than
# the two GEMMs, so two warpgroups' softmax must hide behind the third's MMAs. Measured (same run,
# TFLOP/s, two -> three): non-causal 512..16k 341 -> 359, 380 -> 406, 397 -> 481, 413 -> 501, 421 -> 500,
# 435 -> 540; causal 2k..16k 342 -> 369, 381 -> 417, 400 -> 448, 432 -> 437, but causal 512 / 1k lose
# (220 -> 153, 287 -> 265: 192-row blocks fit short causal sequences badly while they started at row 0 and
# the partial block, the last and heaviest, computed all its rows). Since the blocks are aligned to the
# sequence's end and warpgroups before row 0 compute nothing (session 12), three consumers win there too:
# causal 512 / 1k 223 / 309 vs two consumers' 216 / 291, 2k 386 vs 347 (5 interleaved rounds).
SM90_WIDE_TILES = {
    64: Sm90Tile(64, 128, 3, consumers=3, sched=5),  # 169 KB (two Q buffers)
}
# Dropout: the keep bits are drawn per 32 keys (philox.cuh's DropoutFrag: the four lanes of a quad split
# the n8 tiles), so the key tile must be a multiple of 32; d256's BN 80 tile takes BN 64 then (1 block per
# tile, 2 stages: 193 KB).
DROPOUT_BLOCK_N = {256: 64}
HEADDIM_BUCKETS_SM90 = tuple(sorted(SM90_FORWARD_TILES))


def tile_for(headdim: int) -> Sm90Tile:
    for d in HEADDIM_BUCKETS_SM90:
        if headdim <= d:
            return SM90_FORWARD_TILES[d]
    raise ValueError(f"headdim {headdim} is above the largest sm90 bucket {HEADDIM_BUCKETS_SM90[-1]}")


# The three-consumer DROPOUT kernel (160 registers) spills 12 bytes under NVRTC 13.5 since the session-12
# changes (end-aligned blocks, two Q buffers); d64 dropout runs on two consumers (spill-free in 13.0 / 13.5).
DROPOUT_CONSUMERS = {64: 2}
# The dropout kernels keep the schedules they were measured with (sessions 11 / 12): sched 5 (session 13)
# was timed without dropout only.
DROPOUT_SCHED = {64: 2, 128: 3}


def dropout_tile(tile: Sm90Tile) -> Sm90Tile:
    """The DROPOUT variant of ``tile`` (with a key tile of a multiple of 32 keys)."""
    bn = DROPOUT_BLOCK_N.get(tile.headdim_bucket, tile.block_n)
    nwg = min(tile.consumers, DROPOUT_CONSUMERS.get(tile.headdim_bucket, tile.consumers))
    sched = DROPOUT_SCHED.get(tile.headdim_bucket, tile.sched)
    return replace(tile, block_n=bn, consumers=nwg, sched=sched, dropout=True)


def choose(run) -> Sm90Tile:
    """The tile of ``run``: the head-dim bucket's, or its three-consumer tile where that was faster."""
    base = tile_for(run.headdim)
    base = SM90_WIDE_TILES.get(base.headdim_bucket, base)
    return dropout_tile(base) if run.dropout_p > 0 else base


def kernel_name(dtype: str, tile: Sm90Tile) -> str:
    pp = "true" if tile.pingpong else "false"
    ps = tile.q_buffers if tile.persist else 0  # PERSIST: 0 one block per tile, else the Q buffers
    drop = ", true" if tile.dropout else ""
    return (f"cuflash::fwd_sm90<{CTYPES[dtype]}, {tile.headdim_bucket}, {tile.block_n}, {tile.stages}, "
            f"{tile.consumers}, {pp}, {tile.sched}, {ps}{drop}>")


def variants(arch: str | None = None) -> list[tuple[str, str]]:
    """Every (file, name expression) this path can launch (sm_90a only: empty for other archs)."""
    if arch is not None and arch != "sm_90a":
        return []
    tiles = list(SM90_FORWARD_TILES.values()) + list(SM90_WIDE_TILES.values())
    tiles += [dropout_tile(t) for t in tiles]
    return [(FILE, kernel_name(dt, t)) for dt in _DTYPES for t in dict.fromkeys(tiles)]


def _specs(run, tile: Sm90Tile):
    # Q and the output: 64-row boxes, one per consumer warpgroup
    return (_tma.spec_for("q", run.q, 64), _tma.spec_for("k", run.k, tile.block_n),
            _tma.spec_for("v", run.v, tile.block_n), _tma.spec_for("out", run.out, 64))


def supports(run) -> bool:
    """True when this path can run ``run`` (else the sm80 path, then the portable one)."""
    if run.arch != "sm_90a" or run.dtype not in _DTYPES or os.environ.get("CUFLASH_DISABLE_SM90") == "1":
        return False
    if not 1 <= run.headdim <= 256 or run.num_splits > 1:
        return False
    if min(run.batch, run.seqlen_q, run.seqlen_k, run.nheads, run.nheads_k) < 1:
        return False
    tile = choose(run)
    if num_tiles(run, tile) > _GRID_X_MAX:
        return False
    from . import _launch_sm80

    if not _launch_sm80.supports(run):  # alignment rules are the same (16-byte rows); and the fallback exists
        return False
    pl = _launch_sm80.plan(run)
    if pl["splits"] > 1 or pl["pack"] > 1:  # decoding shapes: the sm80 path splits / packs them
        return False
    try:
        for spec, a in zip(_specs(run, tile), (run.q, run.k, run.v, run.out)):
            _tma.encode(spec, int(a.data.ptr))
    except (_tma.TmaError, OSError):
        return False
    return True


def num_tiles(run, tile: Sm90Tile) -> int:
    """Work tiles of a launch: query blocks x heads x batch."""
    return -(-run.seqlen_q // tile.block_m) * run.nheads * run.batch


def forward_sm90(run, tile: Sm90Tile | None = None) -> None:
    """Launch the Hopper forward (``tile`` overrides the table: tests and benchmarks)."""
    tile = tile or choose(run)
    tiles = num_tiles(run, tile)
    extra = {}
    if tile.persist:
        from ._launch_sm80 import num_sms

        try:
            sms = num_sms(run.device_id)
        except Exception:
            sms = 132
        grid = (min(tiles, sms), 1, 1)
        counter = empty(run, (1,), "int32")
        run.scratch["sm90_tile_counter"] = counter  # alive until the launch is enqueued
        memset(run, counter)  # through the launch layer: the plan cache replays it
        extra["counters"] = ptr(counter)
    else:
        grid = (tiles, 1, 1)
    launch(run, FILE, kernel_name(run.dtype, tile), grid, (tile.threads,), run.params(**extra), tile.smem,
           maps=_specs(run, tile))

