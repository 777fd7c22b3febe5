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

}  // namespace cuflash
