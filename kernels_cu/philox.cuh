// philox.cuh: Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// the counter-based generator behind dropout.
//
// The mask. The keep decision of element (batch b, head h, query i, key j) is a pure function of
// (seed, offset, b, h, i, j): one Philox-4x32-10 call per 8 consecutive keys j0 = j - j % 8 of a row,
//     counter = (j / 8, i, b * nheads + h, offset mod 2^32),  key = (seed mod 2^32, (seed >> 32) ^ (offset >> 32)),
// gives 4 words = 8 16-bit draws; key j takes word (j % 8) / 2, its low half when j is even, its high
// half when j is odd, and is kept iff
//     draw >= threshold,  threshold = min(round(p * 65536), 65535)   (Params::dropout_threshold),
// i.e. with probability 1 - threshold / 65536, within 2^-17 of 1 - p for p < 1 - 2^-17 (beyond, 2^-16 of
// the entries are kept). Kept entries are scaled by 1 / (1 - p), not by 65536 / (65536 - threshold): the
// expected value of a dropped-and-scaled entry is off by at most 2^-17 / (1 - p) relative (8.5e-6 at
// p = 0.1), far below 16-bit resolution; FlashAttention-2 draws 8 bits (threshold error up to 2^-9).
// The backward regenerates the forward's mask without storing it, and the mask depends neither on tile
// sizes nor launch order nor the GPU. cuflash.reference.dropout_mask is the bit-exact NumPy twin (tests
// compare them element by element).
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

// N calls in lockstep (independent chains for a warp with nothing else to hide their latency behind; the
// RNG warps of bwd_sm90.cu), the round keys advanced one round at a time through an opaque move (left
// alone, ptxas computes all twenty up front and holds them: more registers than those warps have).
template <int N>
__device__ __forceinline__ void philox4x32_10_n(Philox4 (&c)[N], u32 k0, u32 k1) {
    const u32 M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r > 0) {
            k0 += W0;
            k1 += W1;
            asm volatile("" : "+r"(k0), "+r"(k1));
        }
#pragma unroll
        for (int n = 0; n < N; ++n) {
            const u32 hi0 = __umulhi(M0, c[n].x), lo0 = M0 * c[n].x;
            const u32 hi1 = __umulhi(M1, c[n].z), lo1 = M1 * c[n].z;
            c[n] = Philox4{hi1 ^ c[n].y ^ k0, lo1, hi0 ^ c[n].w ^ k1, lo0};
        }
    }
}

// The four words (eight 16-bit draws) of keys j0..j0+7 (j0 a multiple of 8) for row i of (b, h).
__device__ __forceinline__ Philox4 dropout_draws(const Params& p, int b, int h, int i, int j0) {
    Philox4 c{(u32)(j0 >> 3), (u32)i, (u32)(b * p.nheads + h), (u32)p.rng_offset};
    return philox4x32_10(c, (u32)p.seed, (u32)(p.seed >> 32) ^ (u32)(p.rng_offset >> 32));
}

// Keep bits of the 8 keys j0..j0+7 of one call (bit t: key j0 + t is kept; the portable kernels).
__device__ __forceinline__ u32 dropout_keep_bits8(const Params& p, const Philox4& r) {
    const u32 t = p.dropout_threshold;
    const u32 w[4] = {r.x, r.y, r.z, r.w};
    u32 bits = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k)
        bits |= ((u32)((w[k] & 0xffffu) >= t) << (2 * k)) | ((u32)((w[k] >> 16) >= t) << (2 * k + 1));
    return bits;
}

// prmt.b32 in its default mode: result byte n = byte sel[4n+2:4n] of {b, a} (a: bytes 0-3, b: 4-7), or,
// when sel bit 4n+3 is set, that byte's sign bit replicated over the result byte (0x00 or 0xff).
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

// ---- keep bits of mma.sync m16n8 accumulator fragments (the tensor-core kernels) --------------------
//
// In the m16n8 C fragment lane l holds, per n8 tile, the keys 8 nt + 2 (l % 4) + {0, 1} of its rows, and
// the Philox call of that tile and row (keys 8 nt .. 8 nt + 7 from a multiple of 8) serves exactly the
// quad l / 4: word d holds the draws of lane 4 (l / 4) + d. So that every call is made once, the quad
// splits the n8 tiles: lane s = l % 4 draws the tiles nt = 4 q + s of all its R rows (R NT / 4 calls),
// turns each word into two keep bits and the quad exchanges them (a 4 x 4 transpose of bit blocks: two
// shuffles per tile, not per call).
//
// Keep bits of a word (draws lo = w & 0xffff, hi = w >> 16, threshold t <= 65535), two at once (SWAR):
// a = (w | H) - (Y & ~H) with H = 0x80008000, Y = t * 0x10001 compares the low 15 bits of each half (no
// borrow crosses halves), and bit 15 / 31 of maj(w, ~Y, a) is then lo >= t / hi >= t (the top bits
// decide unless equal, then the low 15 bits do).
//
// DropoutFrag<R, NT> holds the result: for row ri < R and n8 tile nt < NT (nt = 4 q + s), item
// t = ri NT / 4 + q, the key pair (e = 0, 1) of this lane is kept iff bit 8 (s % 2) + b + 16 e of word
// w[kWords == 2 ? s / 2 : 0] is set, with b = t (kWords == 2) or t + (R NT / 4) (s / 2) (kWords == 1).
template <int R, int NT>
struct DropoutFrag {
    static_assert(NT % 4 == 0, "the quad's lanes split the n8 tiles four ways");
    static constexpr int kCalls = R * NT / 4;             // Philox calls per lane
    static_assert(kCalls >= 1 && kCalls <= 8, "at most 8 items per bit block (one byte)");
    static constexpr int kWords = kCalls > 4 ? 2 : 1;     // 2 R NT keep bits per lane
    u32 w[kWords];

    __device__ static constexpr int word(int nt) { return kWords == 2 ? (nt & 3) >> 1 : 0; }
    __device__ static constexpr int bit(int ri, int nt) {
        return ri * (NT / 4) + (nt >> 2) + (kWords == 2 ? 0 : kCalls * ((nt & 3) >> 1));
    }
    // AND mask of the packed 16-bit pair (e = 0 low, e = 1 high) of row ri, tile nt: 0xffff where kept.
    __device__ __forceinline__ u32 mask16(int ri, int nt) const {
        // the pair's bits to the sign bits of bytes (s % 2) and 2 + (s % 2), replicated over 16 bits
        return prmt(w[word(nt)] << (7 - bit(ri, nt)), 0u, (nt & 1) ? 0xBB99u : 0xAA88u);
    }
    // Bits 15 (e = 0) and 31 (e = 1) set where the pair of row ri, tile nt is dropped.
    __device__ __forceinline__ u32 drop_sign(int ri, int nt) const {
        return ~(w[word(nt)] << (15 - bit(ri, nt) - 8 * (nt & 1))) & 0x80008000u;
    }
};

// Draws a thread's DropoutFrag<R, NT>: R rows of the thread (rowinfo(ri, i, h): query index i and head h
// of row ri, the same for the four lanes of a quad), NT n8 tiles from key k0 (a multiple of 8). Every lane
// of the warp must call it (full-warp shuffles). SWAR: compare the two draws of a word at once (above;
// fewer instructions), or one by one (the caller's choice where the former makes ptxas spill).
template <bool SWAR = true, int R, int NT, class RowInfo>
__device__ __forceinline__ void dropout_frag_keep(const Params& p, int b, int k0, int lane, const RowInfo& rowinfo,
                                                  DropoutFrag<R, NT>& out) {
    using F = DropoutFrag<R, NT>;
    const int s = lane & 3;
    const u32 key0 = (u32)p.seed, key1 = (u32)(p.seed >> 32) ^ (u32)(p.rng_offset >> 32);
    const u32 H = 0x80008000u, Y = p.dropout_threshold * 0x10001u, Ylo = Y & ~H, nY = ~Y;

    // x[m]: bit blocks for the destination lanes d = 2 m + c (c = 0, 1): bit t of byte c is the e = 0 keep
    // bit of lane d's key pair in this lane's item t, bit t of byte 2 + c the e = 1 one.
    u32 x[2] = {0u, 0u};
#pragma unroll
    for (int ri = 0; ri < R; ++ri) {
        int i, h;
        rowinfo(ri, i, h);
        const u32 cz = (u32)(b * p.nheads + h);
#pragma unroll
        for (int q = 0; q < NT / 4; ++q) {
            // keys k0 + 8 (4 q + s) .. + 7: counter word 0 = k0 / 8 + 4 q + s
            const Philox4 r = philox4x32_10(Philox4{(u32)(k0 >> 3) + (u32)(4 * q + s), (u32)i, cz, (u32)p.rng_offset},
                                            key0, key1);
            const u32 wd[4] = {r.x, r.y, r.z, r.w};
            const int t = ri * (NT / 4) + q;
            if constexpr (SWAR) {
                u32 ge[4];
#pragma unroll
                for (int d = 0; d < 4; ++d) {
                    const u32 a = (wd[d] | H) - Ylo;
                    ge[d] = (wd[d] & nY) | (wd[d] & a) | (nY & a);  // maj(w, ~Y, a): bits 15 and 31
                }
#pragma unroll
                for (int m = 0; m < 2; ++m)  // bytes (ge[2m].b1, ge[2m+1].b1, ge[2m].b3, ge[2m+1].b3), sign-replicated
                    x[m] |= prmt(ge[2 * m], ge[2 * m + 1], 0xFBD9u) & (0x01010101u << t);
            } else {  // (the threshold straight from the parameter bank: ptxas spills otherwise, see bwd_sm80.cu)
#pragma unroll
                for (int d = 0; d < 4; ++d)
                    x[d >> 1] |= ((u32)((wd[d] & 0xffffu) >= p.dropout_threshold) << (8 * (d & 1) + t)) |
                                 ((u32)((wd[d] >> 16) >= p.dropout_threshold) << (8 * (d & 1) + t + 16));
            }
        }
    }
    // Transpose the quad's blocks (source s, destination d) so that lane d ends with the block of source s
    // at byte pair (s % 2) of f[s / 2]. 1: the lanes s, s ^ 2 swap the blocks of each other's pair of
    // destinations; k holds (source s, destinations s, s ^ 1), tr (source s ^ 2, the same destinations).
    const bool hi2 = (s & 2) != 0, c = (s & 1) != 0;
    const u32 k = hi2 ? x[1] : x[0];
    const u32 tr = __shfl_xor_sync(0xffffffffu, hi2 ? x[0] : x[1], 2);
    // 2: the lanes s, s ^ 1 swap their blocks for each other in one word: (source s, destination s ^ 1)
    // from k at byte pair c, where the partner keeps it, and (source s ^ 2, destination s ^ 1) from tr at
    // pair c ^ 1, which the partner moves to pair c of hh. Then f[s / 2] = g, f[s / 2 ^ 1] = hh.
    const u32 rv = __shfl_xor_sync(0xffffffffu, prmt(k, tr, c ? 0x2604u : 0x7351u), 1);
    const u32 mine = c ? 0xff00ff00u : 0x00ff00ffu;
    const u32 g = (k & mine) | (rv & ~mine);             // sources s (pair c), s ^ 1 (pair c ^ 1)
    const u32 hh = prmt(tr, rv, c ? 0x3715u : 0x6240u);  // sources s ^ 2 (pair c), s ^ 3 (pair c ^ 1)
    const u32 f0 = hi2 ? hh : g, f1 = hi2 ? g : hh;
    if constexpr (F::kWords == 2) {
        out.w[0] = f0;
        out.w[1] = f1;
    } else {
        out.w[0] = f0 | (f1 << F::kCalls);  // items < kCalls <= 4 per byte: both halves in one word
    }
}

}  // namespace cuflash
