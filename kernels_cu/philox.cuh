// philox.cuh: Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// the counter-based generator behind dropout.
//
// The keep decision of element (batch b, head h, query i, key j) is a pure function of
// (seed, offset, b, h, i, j): counter = (j / 4, i, b * nheads + h, offset_lo), key = (seed_lo,
// seed_hi ^ offset_hi), and word j % 4 of the output. So the backward regenerates the forward's mask
// without storing it, and the mask does not depend on tile sizes, launch order or the GPU.
// cuflash.reference.dropout_mask is the bit-exact NumPy twin (tests compare them element by element).
#pragma once
#include "params.cuh"

namespace cuflash {

struct Philox4 { u32 x, y, z, w; };

__device__ __forceinline__ Philox4 philox4x32_10(Philox4 c, u32 k0, u32 k1) {
    const u32 M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r > 0) { k0 += W0; k1 += W1; }
        const u32 hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        const u32 hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        c = Philox4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    }
    return c;
}

// The four 32-bit draws of keys j0..j0+3 (j0 a multiple of 4) for row i of (b, h).
__device__ __forceinline__ Philox4 dropout_draws(const Params& p, int b, int h, int i, int j0) {
    Philox4 c{(u32)(j0 >> 2), (u32)i, (u32)(b * p.nheads + h), (u32)p.rng_offset};
    return philox4x32_10(c, (u32)p.seed, (u32)(p.seed >> 32) ^ (u32)(p.rng_offset >> 32));
}

__device__ __forceinline__ u32 philox_word(const Philox4& r, int k) {
    return k == 0 ? r.x : k == 1 ? r.y : k == 2 ? r.z : r.w;
}

// Keep iff the draw is at or above threshold = round(p * 2^32): probability 1 - p.
__device__ __forceinline__ bool dropout_keep(const Params& p, u32 draw) { return draw >= p.dropout_threshold; }

// ---- keep bits of mma.sync m16n8 accumulator fragments (the tensor-core kernels) --------------------
//
// In the m16n8 C fragment lane l holds, per n8 tile, the keys 8 nt + 2 (l % 4) + {0, 1} of its rows: the
// Philox call of keys j0..j0+3 (j0 = key & ~3) serves the lane pair l % 4 = 2k, 2k + 1 (words 0, 1 for the
// even lane, 2, 3 for the odd one). So that every call is made once, the pair splits the n8 tiles: for the
// tile pair (2 q, 2 q + 1) of a row the even lane draws for tile 2 q, the odd lane for tile 2 q + 1, and
// the two swap the bits the other needs with one shuffle for all rows and tile pairs.
//
// R rows of the thread (rowinfo(ri, i, h): query index i and head h of row ri), 2 NP n8 tiles from key
// k0 (a multiple of 8). Result: bit u and bit u + 16 (u = ri NP + q) of `even` are the keep bits of the
// thread's keys (e = 0, e = 1) of row ri in n8 tile 2 q, those of `odd` of tile 2 q + 1 (see
// dropout_mask16). Every lane of the warp must call it (full-warp shuffle).
template <int R, int NP, class RowInfo>
__device__ __forceinline__ void dropout_frag_keep(const Params& p, int b, int k0, int lane, const RowInfo& rowinfo,
                                                  u32& even, u32& odd) {
    static_assert(R * NP <= 16, "two bits per (row, n8 tile pair) in one 32-bit word");
    const int tq = lane & 3;
    const bool par = (tq & 1) != 0;
    // counter word 0 = j0 / 4 of this lane's own tile 2 q + par: (k0 + 16 q + 8 par + 4 (tq / 2)) / 4
    const u32 cx0 = (u32)(k0 >> 2) + (u32)(2 * (tq & 1) + (tq >> 1));
    const u32 key0 = (u32)p.seed, key1 = (u32)(p.seed >> 32) ^ (u32)(p.rng_offset >> 32);
    u32 a = 0, c = 0;  // keep bits of words (0, 1) and (2, 3) of this lane's draws
#pragma unroll
    for (int ri = 0; ri < R; ++ri) {
        int i, h;
        rowinfo(ri, i, h);
        const u32 cz = (u32)(b * p.nheads + h);
#pragma unroll
        for (int q = 0; q < NP; ++q) {
            const Philox4 r = philox4x32_10(Philox4{cx0 + 4u * q, (u32)i, cz, (u32)p.rng_offset}, key0, key1);
            const int u = ri * NP + q;
            a |= ((u32)dropout_keep(p, r.x) << u) | ((u32)dropout_keep(p, r.y) << (u + 16));
            c |= ((u32)dropout_keep(p, r.z) << u) | ((u32)dropout_keep(p, r.w) << (u + 16));
        }
    }
    // even lane: keeps words 0, 1 of its own draws (tile 2 q), sends words 2, 3 (the odd lane's keys of
    // tile 2 q); odd lane: keeps words 2, 3 (tile 2 q + 1), sends words 0, 1 (the even lane's of 2 q + 1).
    const u32 recv = __shfl_xor_sync(0xffffffffu, par ? a : c, 1);
    even = par ? recv : a;
    odd = par ? c : recv;
}

// The 16-bit lanes of a packed pair (key e = 0 low, e = 1 high) that are kept, as an AND mask: from
// bits u and u + 16 of a word of dropout_frag_keep.
__device__ __forceinline__ u32 dropout_mask16(u32 w, int u) { return ((w >> u) & 0x10001u) * 0xffffu; }

}  // namespace cuflash
