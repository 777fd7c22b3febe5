"""The tile table: (path, dtype, head dim, features) -> block sizes, threads, shared memory.

Each entry says why it was chosen (the measurement behind it, once there is one). The kernels'
traits templates derive and ``static_assert`` the same numbers; the compile test checks that the
shared memory the host asks for is what the kernel declares.
"""

from __future__ import annotations

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
    def smem(self) -> int:
        """Dynamic shared memory: the Q tile plus the K and V rings (Sm80FwdTraits::kSmemBytes)."""
        return 2 * self.headdim_bucket * (self.block_m + 2 * self.stages * self.block_n)


SM80_FORWARD_TILES = {
    # to measure: FA2's H100 choice (128 x 128, 4 warps); Q fits in registers at this head dim
    # (16 regs) next to O (32) and S (128); 40 KB smem.
    32: Sm80Tile(32, 128, 128, 4, 2, True),
    # to measure: FA2's H100 choice (128 x 128, 4 warps, Q re-read from smem: O 64 + S 128 regs);
    # 80 KB smem with 2 stages, 2 blocks per SM.
    64: Sm80Tile(64, 128, 128, 4, 2, False),
    # to measure: FA2's choice (128 x 64, 4 warps); 72 KB, 2 blocks per SM.
    96: Sm80Tile(96, 128, 64, 4, 2, False),
    # to measure: FA2's H100 choice (128 x 64, 4 warps): O 128 + S 64 regs, 255 used, 0 spills;
    # 96 KB with 2 stages: 2 blocks per SM on H100 (1 on A100, where 1 stage would give 2).
    128: Sm80Tile(128, 128, 64, 4, 2, False),
    # to measure: FA2's A100/H100 choice (128 x 32, 4 warps): O 160 + S 32 regs; 80 KB.
    160: Sm80Tile(160, 128, 32, 4, 2, False),
    # to measure: FA2's choice (128 x 64, 8 warps: 16 rows per warp, O 96 + S 32 regs); 144 KB,
    # 1 block of 8 warps per SM.
    192: Sm80Tile(192, 128, 64, 8, 2, False),
    # to measure: as 192 (128 x 64, 8 warps); 168 KB, 1 block per SM.
    224: Sm80Tile(224, 128, 64, 8, 2, False),
    # to measure: FA2's H100 choice (64 x 64, 4 warps, 16 rows per warp: O 128 + S 32 regs);
    # 1 stage = 96 KB so that 2 blocks fit per SM.
    256: Sm80Tile(256, 64, 64, 4, 1, False),
}


# GPUs with less shared memory per block (A100: 163 KB, sm86/sm89 and sm120: 99 KB) take these
# where the tile above does not fit.
SM80_FORWARD_TILES_SMALL_SMEM = {
    # to measure: 64 x 64, 4 warps, 1 stage: 72 KB (fits 99 KB).
    192: Sm80Tile(192, 64, 64, 4, 1, False),
    # to measure: 64 x 64, 4 warps, 1 stage: 84 KB (fits 99 KB).
    224: Sm80Tile(224, 64, 64, 4, 1, False),
}


def sm80_forward(headdim: int, smem_limit: int | None = None) -> Sm80Tile | None:
    """The sm80 forward tile for a head dim (1..256) within a per-block shared-memory limit (bytes);
    None when no tile fits."""
    d = bucket(headdim, HEADDIM_BUCKETS_SM80)
    for table in (SM80_FORWARD_TILES, SM80_FORWARD_TILES_SMALL_SMEM):
        tile = table.get(d)
        if tile is not None and (smem_limit is None or tile.smem <= smem_limit):
            return tile
    return None


def sm80_forward_tiles() -> list[Sm80Tile]:
    """Every tile the sm80 forward can pick (for variants(): precompile and compile tests)."""
    return list(SM80_FORWARD_TILES.values()) + list(SM80_FORWARD_TILES_SMALL_SMEM.values())
# ==== end sm80 tensor-core forward =====================================================================
