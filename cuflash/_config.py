"""The tile table: (path, dtype, head dim, features) -> block sizes, threads, shared memory.

Each entry says why it was chosen (the measurement behind it, once there is one). The kernels'
traits templates derive and ``static_assert`` the same numbers; the compile test checks that the
shared memory the host asks for is what the kernel declares.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HEADDIM_BUCKETS_PORTABLE = (32, 64, 128, 256)


@dataclass(frozen=True)
class TileConfig:
    headdim_bucket: int
    block_m: int
    block_n: int
    threads: int
    smem: int          # dynamic shared memory bytes asked at launch (0: static only)


def bucket(headdim: int, buckets) -> int:
    for b in buckets:
        if headdim <= b:
            return b
    raise ValueError(f"headdim {headdim} is above the largest bucket {buckets[-1]}")


def portable_forward(headdim: int) -> TileConfig:
    # Portable fallback: a quad of threads per query row, 32 rows per 128-thread block, K/V tiles
    # in static shared memory (PortableFwdTraits in fwd_portable.cu). 32 keys per tile up to head
    # dim 64, 16 above (the per-thread score array would otherwise push past 255 registers).
    d = bucket(headdim, HEADDIM_BUCKETS_PORTABLE)
    return TileConfig(d, 32, 32 if d <= 64 else 16, 128, 0)


def portable_forward_variants():
    """Every (dtype, bucket) name expression of the portable forward, for precompile and tests."""
    from ._launch import CTYPES

    return [("fwd_portable.cu", f"cuflash::fwd_portable<{c}, {d}, {drop}>")
            for c in CTYPES.values() for d in HEADDIM_BUCKETS_PORTABLE for drop in ("false", "true")]


# ==== sm80 tensor-core forward (fwd_sm80.cu, cuflash/_launch_sm80.py) ====================================
# One tile per head-dim bucket, used from sm_80 on (the H100 runs this path too until an sm90 one
# exists). Sm80FwdTraits in kernels_cu/traits_sm80.cuh derives the same shared memory and
# static_asserts the limits; the kernel traps if it is given less shared memory than it needs.
# Registers: each warp owns block_m / warps rows (16 or 32); per thread the O accumulator takes
# rows * bucket / 32 fp32 registers and the score tile rows * block_n / 32, so these two decide
# what fits in 255 registers without spills (tests/test_sm80_compile.py checks every variant).

HEADDIM_BUCKETS_SM80 = (32, 64, 96, 128, 160, 192, 224, 256)


@dataclass(frozen=True)
class Sm80Tile:
    headdim_bucket: int
    block_m: int
    block_n: int
    warps: int
    stages: int        # K/V tiles in flight (a ring of `stages` K and `stages` V buffers)
    q_in_regs: bool    # Q fragments held in registers (else re-read from shared memory each tile)

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def m_tiles(self) -> int:
        """m16 tiles per warp (each warp owns block_m / warps query rows)."""
        return self.block_m // (16 * self.warps)

    @property
    def acc_regs(self) -> int:
        """Accumulator registers per thread held across the main loop (O, S and Q if in registers)."""
        mt = self.m_tiles
        d, bn = self.headdim_bucket, self.block_n
        return mt * d // 2 + mt * bn // 2 + (mt * d // 4 if self.q_in_regs else 0)

    @property
    def smem(self) -> int:
        """Dynamic shared memory (Sm80FwdTraits::kSmemBytes): the Q tile, the K and V rings, the row
        statistics when the accumulators take 192+ registers (128+ of them for O), and 16 bytes of
        block scalars."""
        o_regs = self.m_tiles * self.headdim_bucket // 2
        stats = 16 * self.m_tiles * self.threads if (self.acc_regs >= 192 and o_regs >= 128) else 0
        return 2 * self.headdim_bucket * (self.block_m + 2 * self.stages * self.block_n) + stats + 16


SM80_FORWARD_TILES = {
    # Measured on the H100 SXM (bf16, batch x seqlen = 16k tokens, hidden 2048, TFLOP/s at seqlen 16k,
    # non-causal / causal; FA2 = torch SDPA's FlashAttention-2 in the same run). benchmarks/NOTES_sm80.md.
    # 128 x 64, 4 warps, Q in registers (16 regs), 2 stages (24 KB): 229 / 220 (FA2 226 / 212);
    # 128 x 128 (FA2's tile): 214 / 204.
    32: Sm80Tile(32, 128, 64, 4, 2, True),
    # 128 x 64, 4 warps, Q in registers (32 regs), 2 stages (48 KB): 302 / 279 (FA2 310 / 289);
    # FA2's 128 x 128 with Q re-read from smem: 278 / 249.
    64: Sm80Tile(64, 128, 64, 4, 2, True),
    # 128 x 64, 4 warps, 1 stage (48 KB): 317 / 298 (FA2 335 / 255..313); 2 stages: 276 / 259.
    96: Sm80Tile(96, 128, 64, 4, 1, False),
    # 128 x 64, 4 warps (FA2's H100 tile), 2 stages (100 KB: O 128 + S 64 regs, row statistics in smem):
    # 356 / 330 (FA2 349 / 312); 128 x 32: 282 / 257; 64 x 64 with Q in registers: 245 / 261.
    128: Sm80Tile(128, 128, 64, 4, 2, False),
    # 128 x 32, 4 warps, 2 stages (84 KB: O 160 + S 32 regs): 323 / 283 (FA2 245 / 222).
    160: Sm80Tile(160, 128, 32, 4, 2, False),
    # 64 x 64, 4 warps (16 rows per warp), 1 stage (72 KB): 292 / 289 (FA2 324 / 265..288); FA2's
    # 128 x 64 with 8 warps: 246 / 235.
    192: Sm80Tile(192, 64, 64, 4, 1, False),
    # 64 x 64, 4 warps, 1 stage (84 KB): 283 / 254 (FA2 239 / 225); 128 x 64 with 8 warps: 250 / 226.
    224: Sm80Tile(224, 64, 64, 4, 1, False),
    # 64 x 64, 4 warps (FA2's H100 tile), 1 stage (96 KB, 2 blocks per SM): 308 / 312 (FA2 316..326 /
    # 249..283); 2 stages: 210 / 211; 128 x 64 with 8 warps: 260 / 260.
    256: Sm80Tile(256, 64, 64, 4, 1, False),
}


# GPUs with less shared memory per block (A100: 163 KB, sm86/sm89 and sm120: 99 KB) take these
# where the tile above does not fit.
SM80_FORWARD_TILES_SMALL_SMEM = {
    # to measure: 128 x 32, 4 warps (FA2's sm86/sm89 choice): 64 KB (fits 99 KB). 282 TFLOP/s on the
    # H100 (bf16, 16k tokens, non-causal; the main tile: 334), so only where the main one cannot run.
    128: Sm80Tile(128, 128, 32, 4, 2, False),
}


# Dropout variants whose regular tile spills with some NVRTC: the Philox keep bits add registers to a tile
# already at 255. d160's 128 x 32 tile spilled 8 bytes on sm_90a with NVRTC 13.0 (36 bytes with 1 stage);
# 64 x 64 with 1 stage (60 KB, the d 192-256 shape) compiles to 214-229 registers, no spills, with NVRTC
# 13.0 and 13.5 on sm_80 and sm_90a. To measure against the regular tile's speed.
SM80_FORWARD_TILES_DROPOUT = {
    160: Sm80Tile(160, 64, 64, 4, 1, False),
}


def sm80_forward(headdim: int, smem_limit: int | None = None, dropout: bool = False) -> Sm80Tile | None:
    """The sm80 forward tile for a head dim (1..256) within a per-block shared-memory limit (bytes);
    None when no tile fits. ``dropout`` (dropout_p > 0) looks in SM80_FORWARD_TILES_DROPOUT first."""
    d = bucket(headdim, HEADDIM_BUCKETS_SM80)
    tables = (SM80_FORWARD_TILES_DROPOUT,) if dropout else ()
    for table in tables + (SM80_FORWARD_TILES, SM80_FORWARD_TILES_SMALL_SMEM):
        tile = table.get(d)
        if tile is not None and (smem_limit is None or tile.smem <= smem_limit):
            return tile
    return None


def sm80_forward_tiles(dropout: bool = False, arch: str | None = None) -> list[Sm80Tile]:
    """Every tile the sm80 forward can pick (for variants(): precompile and compile tests), with or
    without dropout, on GPUs of ``arch`` (None: on any GPU). Empty below sm_80."""
    if arch is not None and arch_number(arch) < 80:
        return []
    tables = ((SM80_FORWARD_TILES_DROPOUT,) if dropout else ()) + (SM80_FORWARD_TILES, SM80_FORWARD_TILES_SMALL_SMEM)
    every = [t for table in tables for t in table.values()]
    return pickable(every, lambda d, limit: sm80_forward(d, limit, dropout), HEADDIM_BUCKETS_SM80, arch)
# ==== end sm80 tensor-core forward =====================================================================


# ==== which tiles an architecture's GPUs can get =========================================================
# Tile choice depends on the device's per-block shared memory (cudaDevAttrMaxSharedMemoryPerBlockOptin),
# which is the same for every GPU of these architectures (bytes):
SMEM_PER_BLOCK_BY_ARCH = {
    80: 163 * 1024,    # A100, A30
    86: 99 * 1024,     # RTX 30xx, A10, A40
    87: 163 * 1024,    # Jetson Orin
    89: 99 * 1024,     # RTX 40xx, L4, L40
    90: 227 * 1024,    # H100, H200, H20, GH200
    100: 227 * 1024,   # B200, GB200
    120: 99 * 1024,    # RTX 50xx
}


def arch_number(arch: str) -> int:
    """``sm_90a`` / ``compute_80`` / ``90`` -> 90 / 80 / 90 (0 when there is no number)."""
    m = re.search(r"(\d+)", str(arch or ""))
    return int(m.group(1)) if m else 0


def smem_limit_of_arch(arch: str) -> int | None:
    """Per-block shared memory of ``arch``'s GPUs, or None where this table does not know it (also for
    ``compute_XY``: PTX that the driver compiles for a newer GPU, see ``_compile.arch_for_capability``)."""
    if str(arch).startswith("compute_"):
        return None
    return SMEM_PER_BLOCK_BY_ARCH.get(arch_number(arch))


def pickable(tiles, choose, buckets, arch: str | None = None) -> list:
    """The members of ``tiles`` (in order, once each) that ``choose(bucket, smem_limit)`` returns for some
    bucket on ``arch``'s GPUs: at its known shared-memory limit, else (arch None or unknown) at any limit.
    A tile's choice only depends on which tiles fit, so trying every tile's size as the limit (and no
    limit) covers every GPU."""
    limit = None if arch is None else smem_limit_of_arch(arch)
    limits = [limit] if limit is not None else sorted({t.smem for t in tiles}) + [None]
    chosen = {choose(d, lim) for d in buckets for lim in limits}
    out = []
    for t in tiles:
        if t in chosen and t not in out:
            out.append(t)
    return out
