// bwd_sm80.cu: the tensor-core FlashAttention backward for fp16 / bf16 on sm80 and later
// (FlashAttention-2's algorithm; mma.sync m16n8k16, ldmatrix, cp.async).
//
// The math and the numerics are those of bwd_common.cuh: P = exp2(s log2(e) - lse log2(e)) is
// recomputed from the forward's LSE, D = rowsum(dO * O), dS = P (dP - D) [* (1 - tanh^2) with softcap],
// dV = P^T dO, dK = scale dS^T Q, dQ = scale dS K; rows without keys (lse = -inf) and padding rows
// carry lse log2(e) = +inf, so their P, dS and gradients are exactly 0.
//
// Kernels, in launch order (cuflash/_launch_bwd_sm80.py):
//
//   bwd_sm80_preprocess<T>   one pass over O and dO: D_i = rowsum(dO_i * O_i) and L_i = lse_i log2(e)
//                            (+inf where lse = -inf or i >= seqlen_q), into the scratch `vec`
//                            (Params::dsum) laid out (2, batch, nheads, sq_pad): [0] D, [1] L, rows
//                            padded to sq_pad = seqlen_q rounded up to 128 (D = 0, L = +inf there), so
//                            the main kernel loads them with 16-byte cp.async and no bounds checks.
//   bwd_sm80<T, D, STAGES>   one block of 8 warps per (key block of BN keys, kv head, batch):
//                            K and V tiles in shared memory, dK and dV accumulated in registers (fp32
//                            mma accumulators) over every query block of every query head of the kv
//                            head's group (GQA / MQA sums stay in registers: no scratch, no atomics).
//                            Per query block of BM rows (Q, dO, D, L in cp.async stages; with 2 stages
//                            the next block's loads are issued at the top of the current one):
//                              S = Q K^T; P = exp2(S scale log2(e) - L) -> shared memory (16-bit)
//                                (masking only on blocks that cross seqlen_k or a causal / window edge)
//                              dP = dO V^T; dS = P (dP - D), P read back by the thread that wrote it
//                                -> shared memory (16-bit); only one fp32 score tile is ever live
//                              barrier
//                              dQ = dS K -> fp32 red.add into dq_accum      (vector red on sm90)
//                              dV += P^T dO, dK += dS^T Q                   (ldmatrix.trans)
//                            Query blocks that see none of the block's keys are skipped.
//                            Epilogue: dK * scale and dV converted to T, staged in shared memory,
//                            written with 16-byte stores and the output strides.
//   bwd_sm80_dq_convert<T>   dq = scale * sum over splits of dq_accum, in T, with dq's strides.
//
// dq_accum is fp32 (splits, batch, nheads, sq_pad, ld) with ld = headdim rounded up to 32 (the
// kernel's head-dim bucket): padding rows and columns receive only zeros, so the red.add needs no
// predicates. Default mode: 1 split, every key block adds into it (order of the fp32 additions
// varies from run to run). Deterministic mode (Params::deterministic): gridDim.x = splits, block x
// walks the key blocks x, x + splits, ... in order and adds into its own split; one thread is the
// only writer of each address of its split, and its reds are applied in program order, so every
// split, and the convert's fixed-order sum over splits, is bitwise reproducible.
//
// Dropout (bwd_sm80<T, D, STAGES, DROPOUT = true>; false compiles it out), with the notation of
// bwd_common.cuh (keep mask Z, r = 1 / (1 - p)): the keep bits of a thread's score fragments are drawn
// from Philox (philox.cuh: the forward's mask bit for bit; one call per 8 keys of a row, i.e. per row and
// n8 tile, made by one lane of the quad and spread by two shuffles per tile) and carried into the P tile
// as sign bits: P is stored with the sign bit set where dropped (P >= 0, so the sign bit is free). The
// dS step reads its P back, takes |P| for dS = P (Z r dP - D) (the undropped P; dropped pairs get -P D),
// and rewrites its P entries with the dropped ones zeroed: the dV GEMM then sums P Z dO, and r is applied
// to dV once in the epilogue.
// The DROPOUT kernels use Sm80BwdTraits<D, STAGES, true>: the regular shape, or a dropout-only one where
// that spills (traits_bwd_sm80.cuh).
#include "bwd_common.cuh"
#include "mma.cuh"
#include "traits_bwd_sm80.cuh"

namespace cuflash {
namespace sm80bwd {

using sm80::cp_async_16;
using sm80::cp_async_commit;
using sm80::cp_async_wait;
using sm80::ldsm_x4;
using sm80::ldsm_x4_trans;
using sm80::lds_u32;
using sm80::lds_u32x4;
using sm80::opaque;
using sm80::smem_addr;
using sm80::stg_u32x4;
using sm80::sts_u32;

// fp32 x 2 reduction into global memory (adjacent, 8-byte aligned): one vector red on sm90.
__device__ __forceinline__ void red_add2(float* a, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(a), "f"(x), "f"(y) : "memory");
#else
    atomicAdd(a, x);
    atomicAdd(a + 1, y);
#endif
}

__device__ __forceinline__ u32 pick4(u32 a, u32 b, u32 c, u32 d, int i) {
    return i == 0 ? a : i == 1 ? b : i == 2 ? c : d;
}

// cp.async of rows [0, R) of a tile (R rows x C columns, layout of traits_bwd_sm80.cuh) whose row rr
// starts at base + rr * rstride; rows >= nvalid and columns >= headdim are zero-filled (a chunk
// straddling headdim copies only its real bytes, nothing past a row's headdim elements is read).
// Thread t copies chunk t % 8 of each 64-column block of rows t / 8 + pass * NT / 8 (8 lanes read 128
// contiguous bytes of one row), and chunk t % 4 of the trailing 32-column block of rows t / 4 + ....
// `base` must be readable (it is the unread source of zero-filled chunks).
template <int R, int C, int NT, typename T>
__device__ __forceinline__ void load_tile(u32 sdst, const T* base, i64 rstride, int nvalid, int headdim,
                                          int tid) {
    constexpr int kFull = C / 64;
    if constexpr (kFull > 0) {
        constexpr int RP = NT / 8;
        const int c = tid & 7;
#pragma unroll 1
        for (int pass = 0; pass < (R + RP - 1) / RP; ++pass) {
            const int rr = (tid >> 3) + pass * RP;
            if (R % RP == 0 || rr < R) {
                const bool ok = rr < nvalid;
                const T* rp = base + (i64)rr * rstride;
#pragma unroll
                for (int blk = 0; blk < kFull; ++blk) {
                    const int col = blk * 64 + c * 8;
                    const int bytes = ok ? 2 * min(max(headdim - col, 0), 8) : 0;
                    cp_async_16(sdst + (u32)(blk * R * 128 + rr * 128 + ((c ^ (rr & 7)) << 4)),
                                bytes > 0 ? rp + col : base, bytes);
                }
            }
        }
    }
    if constexpr (C % 64 != 0) {
        constexpr int RP = NT / 4;
        const int c = tid & 3;
#pragma unroll 1
        for (int pass = 0; pass < (R + RP - 1) / RP; ++pass) {
            const int rr = (tid >> 2) + pass * RP;
            if (R % RP == 0 || rr < R) {
                const int col = kFull * 64 + c * 8;
                const int bytes = rr < nvalid ? 2 * min(max(headdim - col, 0), 8) : 0;
                cp_async_16(sdst + (u32)(kFull * R * 128 + rr * 64 + ((c ^ ((rr >> 1) & 3)) << 4)),
                            bytes > 0 ? base + (i64)rr * rstride + col : base, bytes);
            }
        }
    }
}

// Copy rows [0, R) of a staged tile (same layout) to global memory: row rr to base + rr * rstride,
// rows >= nvalid and columns >= headdim skipped; 16-byte stores, element stores for a chunk that
// straddles headdim.
template <int R, int C, int NT, typename T>
__device__ __forceinline__ void store_tile(u32 ssrc, T* base, i64 rstride, int nvalid, int headdim, int tid) {
    constexpr int kChunks = C / 8;
    for (int e = tid; e < R * kChunks; e += NT) {
        const int rr = e / kChunks, c = e % kChunks;
        const int col = c * 8;
        if (rr < nvalid && col < headdim) {
            u32 w0, w1, w2, w3;
            lds_u32x4(ssrc + chunk_off<R, C>(rr, c), w0, w1, w2, w3);
            T* dst = base + (i64)rr * rstride + col;
            if (col + 8 <= headdim) {
                stg_u32x4(dst, w0, w1, w2, w3);
            } else {
                for (int x = 0; x < headdim - col; ++x)
                    dst[x].bits = (unsigned short)(pick4(w0, w1, w2, w3, x >> 1) >> (16 * (x & 1)));
            }
        }
    }
}

}  // namespace sm80bwd

// ---- 1. preprocess: D and L per row (padded to 128 rows) ---------------------------------------------

constexpr int kBwdSm80RowThreads = 256;  // preprocess and convert: 8 threads per row, 32 rows per block
constexpr int kBwdSm80Rows = 32;
constexpr int kBwdSm80Pad = 128;         // sq_pad = seqlen_q rounded up to this

template <typename T>
__global__ void __launch_bounds__(kBwdSm80RowThreads)
bwd_sm80_preprocess(const Params p) {
    const int t = threadIdx.x & 7;
    const int i = blockIdx.x * kBwdSm80Rows + (threadIdx.x >> 3);
    const int h = blockIdx.y, b = blockIdx.z;
    const int sq_pad = (p.seqlen_q + kBwdSm80Pad - 1) / kBwdSm80Pad * kBwdSm80Pad;
    const bool valid = i < p.seqlen_q;
    float acc = 0.f;
    if (valid) {
        const T* o_row = (const T*)p.o + (i64)b * p.o_batch_stride + (i64)h * p.o_head_stride + (i64)i * p.o_row_stride;
        const T* do_row = (const T*)p.dout + (i64)b * p.do_batch_stride + (i64)h * p.do_head_stride
                        + (i64)i * p.do_row_stride;
        for (int col = 8 * t; col < p.headdim; col += 64) {
            if (col + 8 <= p.headdim) {
                const uint4 ov = *reinterpret_cast<const uint4*>(o_row + col);
                const uint4 dv = *reinterpret_cast<const uint4*>(do_row + col);
                const u32 ow[4] = {ov.x, ov.y, ov.z, ov.w}, dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
                for (int x = 0; x < 4; ++x) {
                    float o0, o1, d0, d1;
                    unpack2<T>(ow[x], o0, o1);
                    unpack2<T>(dw[x], d0, d1);
                    acc = fmaf(o0, d0, acc);
                    acc = fmaf(o1, d1, acc);
                }
            } else {
                for (int d = col; d < p.headdim; ++d) acc = fmaf(to_float(o_row[d]), to_float(do_row[d]), acc);
            }
        }
    }
    acc = group_sum<8>(acc);  // fixed-order butterfly: deterministic
    if (t == 0) {
        const i64 row = ((i64)b * p.nheads + h) * sq_pad + i;
        const i64 plane = (i64)p.batch * p.nheads * sq_pad;
        p.dsum[row] = valid ? acc : 0.f;
        p.dsum[plane + row] = lse_log2_or_flag(valid ? p.lse[((i64)b * p.nheads + h) * p.seqlen_q + i] : 0.f, valid);
    }
}

// ---- 2. main kernel ----------------------------------------------------------------------------------

namespace sm80bwd {
template <bool B> struct BoolC { static constexpr bool value = B; };

}

template <typename T, int D, int STAGES, bool DROPOUT = false>
__global__ void __launch_bounds__(Sm80BwdTraits<D, STAGES, DROPOUT>::kThreads, 1)
bwd_sm80(const Params p) {
    using namespace sm80bwd;
    using Tr = Sm80BwdTraits<D, STAGES, DROPOUT>;
    constexpr int BM = Tr::kBM, BN = Tr::kBN, NT = Tr::kThreads, ST = Tr::kStages;
    constexpr int MTS = Tr::kMTS, NTS = Tr::kNTS, MTKV = Tr::kMTKV, SKV = Tr::kSKV, MTQ = Tr::kMTQ, SQ = Tr::kSQ;
    constexpr bool kDropWide = 2 * MTS * NTS > 16;  // dropout: see the keep bits in the main loop
    extern __shared__ __align__(1024) unsigned char smem[];

    const u32 s0 = smem_addr(smem);
    require_dynamic_smem(Tr::kSmemBytes, s0, 128);

    const int tid = threadIdx.x;
    const int hk = blockIdx.y, b = blockIdx.z;
    const int sq = p.seqlen_q, sk = p.seqlen_k, hd = p.headdim;
    const int group = p.nheads / p.nheads_k;
    const int sq_pad = (sq + kBwdSm80Pad - 1) / kBwdSm80Pad * kBwdSm80Pad;
    const int shift = sk - sq;  // query i sits at key position i + shift
    const int wl = p.window_left, wr = p.window_right;
    const int n_blocks = (sk + BN - 1) / BN;

    const u32 sQ0 = s0 + Tr::kOffQ, sdO0 = s0 + Tr::kOffdO, sK = s0 + Tr::kOffK, sV = s0 + Tr::kOffV;
    const u32 sP = s0 + Tr::kOffP, sdS = s0 + Tr::kOffdS, sVec0 = s0 + Tr::kOffVec;

    // ---- per-lane roles ---------------------------------------------------------------------------------
    // ldmatrix lane roles: "A" (rows 0-7 / 8-15 of k-lo, then of k-hi: A operands, and B operands read
    // with .trans) and "B" (rows 0-7 of k-lo / k-hi, then rows 8-15: B operands, and A operands read
    // with .trans). Lane offsets are recomputed where they are used from an opaque copy of the thread
    // index (a few integer operations per GEMM), so that neither the offsets nor the many constant
    // variants ptxas would derive from them are held in registers across the loops.
    auto rowA = [](int ft) { return (ft & 7) + ((ft >> 3) & 1) * 8; };
    auto bitA = [](int ft) { return (ft >> 4) & 1; };
    auto rowB = [](int ft) { return (ft & 7) + ((ft >> 4) & 1) * 8; };
    auto bitB = [](int ft) { return (ft >> 3) & 1; };
    auto fg = [](int ft) { return (ft & 31) >> 2; };   // mma fragment row group
    auto ftq = [](int ft) { return ft & 3; };          // mma fragment column pair
    auto wm_s = [](int ft) { return (ft >> 5) % Tr::kWMS; };
    auto wn_s = [](int ft) { return (ft >> 5) / Tr::kWMS; };
    auto wn_kv = [](int ft) { return (ft >> 5) % Tr::kWNKV; };
    auto wd_kv = [](int ft) { return (ft >> 5) / Tr::kWNKV; };
    auto wm_q = [](int ft) { return (ft >> 5) % Tr::kWMQ; };
    auto wd_q = [](int ft) { return (ft >> 5) / Tr::kWMQ; };

    // Scratch rows: D at vec_d(), L = lse log2(e) or +inf at vec_l(), this block's dQ split at dq_acc()
    // (recomputed where used rather than held across the loops).
    auto vec_d = [&]() { return p.dsum; };
    auto vec_l = [&]() { return p.dsum + (i64)p.batch * p.nheads * opaque(sq_pad); };
    // Ordered deterministic mode (Params::counters set; bwd_common.cuh, bwd_sm90.cu's header): one block per
    // key block, taken last to first; the block walks its query blocks from its pivot; before a step's dQ
    // reductions thread 0 waits for the block's turn on the step's counter, and it releases the counter
    // after the next barrier (the top of the next step, or before the epilogue), when the reductions have
    // long been issued. Params::num_splits = dq_accum planes (1 or 2: the lower part's own plane).
    const bool ordered = p.counters != nullptr;
    auto dq_acc = [&](int part) {
        return p.dq_accum + (ordered || p.deterministic ? (i64)(ordered ? part : (int)blockIdx.x) * p.batch * p.nheads
                                                              * opaque(sq_pad) * D
                                                        : (i64)0);
    };
    const bool transform = p.softcap > 0.f || p.alibi != nullptr;

    for (int nb = ordered ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x; nb < n_blocks; nb += gridDim.x) {
        const int n0 = nb * BN;
        // Query rows that keep at least one key of [n0, n1] (both window bounds are non-decreasing in
        // the row): [i_lo, i_hi]; query blocks outside are fully masked and skipped.
        const int n1 = min(n0 + BN, sk) - 1;
        i64 i_lo = 0, i_hi = (i64)sq - 1;
        if (wr >= 0) i_lo = max(i_lo, (i64)n0 - shift - wr);
        if (wl >= 0) i_hi = min(i_hi, (i64)n1 - shift + wl);
        const int m_first = (int)(i_lo / BM);
        const int n_m = i_lo <= i_hi ? (int)(i_hi / BM) - m_first + 1 : 0;  // query blocks per head
        const int n_iter = n_m * group;
        const int pivot = ordered ? ordered_pivot<BM, BN>(nb, n_blocks, sq, sk, wr) : m_first;
        auto step_m0 = [&](int mi) { return (ordered ? walk_m(mi, m_first, n_m, pivot) : m_first + mi) * BM; };
        // ordered: the counter of step it (head hk group + it / n_m, query block step_m0(it % n_m) / BM)
        auto step_counter = [&](int it) {
            const int hi = it / n_m, m = step_m0(it - hi * n_m) / BM;
            const int part = p.num_splits == 2 && m < pivot ? 1 : 0;
            return p.counters + (((i64)opaque(b) * p.nheads + hk * group + hi) * ((sq + BM - 1) / BM) + m) * p.num_splits
                 + part;
        };

        {   // K, V of this key block: one commit group
            const int ft = opaque(tid);
            const T* kb = (const T*)p.k + (i64)opaque(b) * p.k_batch_stride + (i64)opaque(hk) * p.k_head_stride
                        + (i64)n0 * p.k_row_stride;
            const T* vb = (const T*)p.v + (i64)opaque(b) * p.v_batch_stride + (i64)opaque(hk) * p.v_head_stride
                        + (i64)n0 * p.v_row_stride;
            load_tile<BN, D, NT>(sK, kb, p.k_row_stride, sk - n0, hd, ft);
            load_tile<BN, D, NT>(sV, vb, p.v_row_stride, sk - n0, hd, ft);
            cp_async_commit();
        }
        // Q, dO, D, L of query block m0 of head h into stage st: one commit group.
        auto issue_q = [&](int h, int m0, int st) {
            const int ft = opaque(tid);
            const T* qb = (const T*)p.q + (i64)opaque(b) * p.q_batch_stride + (i64)h * p.q_head_stride
                        + (i64)m0 * p.q_row_stride;
            const T* ob = (const T*)p.dout + (i64)opaque(b) * p.do_batch_stride + (i64)h * p.do_head_stride
                        + (i64)m0 * p.do_row_stride;
            load_tile<BM, D, NT>(sQ0 + (u32)(st * Tr::kQBytes), qb, p.q_row_stride, sq - m0, hd, ft);
            load_tile<BM, D, NT>(sdO0 + (u32)(st * Tr::kQBytes), ob, p.do_row_stride, sq - m0, hd, ft);
            if (ft < BM / 2) {  // BM / 4 chunks of D, then BM / 4 of L
                const int which = ft / (BM / 4), c = ft % (BM / 4);
                const i64 row = ((i64)opaque(b) * p.nheads + h) * sq_pad + m0 + 4 * c;
                cp_async_16(sVec0 + (u32)(st * Tr::kVecBytes + which * BM * 4 + 16 * c),
                            (which ? vec_l() : vec_d()) + row, 16);
            }
            cp_async_commit();
        };
        if (n_iter > 0) issue_q(hk * group, step_m0(0), 0);

        float acc_dk[MTKV][2 * SKV][4], acc_dv[MTKV][2 * SKV][4];
#pragma unroll
        for (int i = 0; i < MTKV; ++i)
#pragma unroll
            for (int n = 0; n < 2 * SKV; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    acc_dk[i][n][e] = 0.f;
                    acc_dv[i][n][e] = 0.f;
                }

        int hi_ = 0, mi_ = 0;  // head index in the group and query block index of the next step
        for (int it = 0; it < n_iter; ++it) {
            const int h = hk * group + hi_;
            const int m0 = step_m0(mi_);
            const int st = ST == 2 ? (it & 1) : 0;
            if (++mi_ == n_m) { mi_ = 0; ++hi_; }

            // Dropout: the keep bits of this thread's score fragments (rows rbase + 16 mt + 8 hh of head h,
            // keys n0 + wn_s TN_S + 8 nt + 2 tq + e) as DropoutFrag rows ri = 2 mt + hh, n8 tiles nt (see
            // dropout_frag_keep), drawn first thing in the step (while this step's Q / dO may still be
            // landing). Only the wide score tiles (32 (row, n8 tile) items per thread: d 32, 64; kDropWide)
            // compare two draws per word and take the shorter dS code below; the others (d >= 96, their
            // registers at 255) compare the draws one by one and keep the older dS code: otherwise ptxas
            // spills 4-8 bytes in some d 128 / 192 / 224 / 256 kernel (sm_80 or sm_90a, NVRTC 13.0 or
            // 13.5), as it does when these draws sit just before or just after S = Q K^T.
            DropoutFrag<2 * MTS, NTS> keep;
            if constexpr (DROPOUT) {
                const int ft = opaque(tid);
                const int row0 = m0 + wm_s(ft) * Tr::kTMS + fg(ft);
                dropout_frag_keep<kDropWide>(p, opaque(b), n0 + wn_s(ft) * Tr::kTNS, ft & 31,
                                             [&](int ri, int& i, int& hq) {
                                                 i = row0 + 16 * (ri >> 1) + 8 * (ri & 1);
                                                 hq = h;
                                             }, keep);
            }

            cp_async_wait<0>();  // this step's Q, dO, D, L (and K, V) have landed
            __syncthreads();     // ... for every thread; every warp is done with the previous step
            if (ordered && it > 0 && tid == 0) red_release_add(step_counter(it - 1), 1);  // its dQ additions
            if (ST == 2 && it + 1 < n_iter) issue_q(hk * group + hi_, step_m0(mi_), st ^ 1);

            const u32 sQ = sQ0 + (u32)(st * Tr::kQBytes), sdO = sdO0 + (u32)(st * Tr::kQBytes);
            const u32 sVec = sVec0 + (u32)(st * Tr::kVecBytes);

            // ---- S = Q K^T, then P; dP = dO V^T, then dS (BM x BN; this warp: TM_S rows x TN_S keys) ------
            // Only one fp32 score tile is live at a time: P goes to shared memory (16-bit) before dP is
            // computed and each thread reads its own P elements back for dS = P (dP - D). With softcap
            // the factor 1 - tanh^2 is folded into a second 16-bit copy, P (1 - tanh^2), parked in the
            // dS tile (overwritten in place by dS).
            auto gemm_nt = [&](float (&acc)[MTS][NTS][4], u32 sa, u32 sb) {
#pragma unroll
                for (int mt = 0; mt < MTS; ++mt)
#pragma unroll
                    for (int nt = 0; nt < NTS; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
                const int ft = opaque(tid);
                const int ra = wm_s(ft) * Tr::kTMS + rowA(ft), rb = wn_s(ft) * Tr::kTNS + rowB(ft);
                const u32 a64 = sa + lane_off64<BM, D>(ra, bitA(ft)), a32 = sa + lane_off32<BM, D>(ra, bitA(ft));
                const u32 b64 = sb + lane_off64<BN, D>(rb, bitB(ft)), b32 = sb + lane_off32<BN, D>(rb, bitB(ft));
#pragma unroll
                for (int ks = 0; ks < Tr::kKSD; ++ks) {
                    u32 a[MTS][4];
#pragma unroll
                    for (int mt = 0; mt < MTS; ++mt)
                        ldsm_x4(step_addr<BM, D, 1>(a64, a32, ks, mt), a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
#pragma unroll
                    for (int np = 0; np < NTS / 2; ++np) {
                        u32 b0, b1, b2, b3;
                        ldsm_x4(step_addr<BN, D, 1>(b64, b32, ks, np), b0, b1, b2, b3);
#pragma unroll
                        for (int mt = 0; mt < MTS; ++mt) {
                            sm80::Mma<T>::run(acc[mt][2 * np], a[mt], b0, b1);
                            sm80::Mma<T>::run(acc[mt][2 * np + 1], a[mt], b2, b3);
                        }
                    }
                }
            };
            // Element (mt, nt, x) of a thread's score tile: row rbase + 16 mt + 8 (x / 2), key
            // n0 + kc + 8 nt + x % 2. Its 16-bit pair (x, x + 1) lives in the P / dS tiles at
            // (ost ^ (nt << 4)) + (16 mt + 8 hh) 128: chunk wn_s NT_S + nt of the row (row % 8 = g).
            auto tile_pos = [&](int ft, int& rbase, int& kc, u32& ost) {
                rbase = wm_s(ft) * Tr::kTMS + fg(ft);
                kc = wn_s(ft) * Tr::kTNS + 2 * ftq(ft);
                const int pchunk = wn_s(ft) * NTS;
                ost = (u32)((pchunk >> 3) * BM * 128 + rbase * 128 + (((pchunk & 7) ^ fg(ft)) << 4) + 4 * ftq(ft));
            };
            // drop_sign: the sign bits of the dropped entries of a packed pair (e = 0 low, e = 1 high).
            auto drop_sign = [&](int mt, int hh, int nt) -> u32 { return keep.drop_sign(2 * mt + hh, nt); };
            {
                float s[MTS][NTS][4];
                gemm_nt(s, sQ, sK);
                const int ft = opaque(tid);
                int rbase, kc;
                u32 ost;
                tile_pos(ft, rbase, kc, ost);
                // Key j = n0 + kc + c is kept for row r iff lo(r) <= c <= hi(r).
                auto lo_hi = [&](int mt, int hh, int& lo, int& hi) {
                    const int ipos = m0 + rbase + 16 * mt + 8 * hh + shift;
                    lo = (wl < 0 ? 0 : ipos - wl) - (n0 + kc);
                    hi = (wr < 0 ? sk - 1 : min(sk - 1, ipos + wr)) - (n0 + kc);
                };
                // Masking is needed only on blocks that cross seqlen_k or the causal / right window edge
                // (smallest last key of the block's rows: row m0) or the left edge (largest first key).
                const int right_lim = wr < 0 ? sk - 1 : min(sk - 1, m0 + shift + wr);
                const bool need_mask = n0 + BN - 1 > right_lim || (wl >= 0 && n0 < m0 + BM - 1 + shift - wl);
                if (!transform) {
                    auto plain = [&](auto masked) {
                        constexpr bool M = decltype(masked)::value;
                        const float sl2 = p.scale_log2;
#pragma unroll
                        for (int mt = 0; mt < MTS; ++mt)
#pragma unroll
                            for (int hh = 0; hh < 2; ++hh) {
                                int lo = 0, hi = 0;
                                if (M) lo_hi(mt, hh, lo, hi);
                                const float l =
                                    __uint_as_float(lds_u32(sVec + (u32)(4 * BM + 4 * (rbase + 16 * mt + 8 * hh))));
#pragma unroll
                                for (int nt = 0; nt < NTS; ++nt) {
                                    float pr[2];
#pragma unroll
                                    for (int e = 0; e < 2; ++e) {
                                        float arg = fmaf(s[mt][nt][2 * hh + e], sl2, -l);
                                        if (M) arg = (8 * nt + e >= lo && 8 * nt + e <= hi) ? arg : -INFINITY;
                                        pr[e] = sm80::ex2(arg);
                                    }
                                    if constexpr (DROPOUT)
                                        sts_u32(sP + (ost ^ (u32)(nt << 4)) + (u32)((16 * mt + 8 * hh) * 128),
                                                pack2<T>(pr[0], pr[1]) | drop_sign(mt, hh, nt));
                                    else
                                        sts_u32(sP + (ost ^ (u32)(nt << 4)) + (u32)((16 * mt + 8 * hh) * 128),
                                                pack2<T>(pr[0], pr[1]));
                                }
                            }
                    };
                    if (need_mask) plain(BoolC<true>{});
                    else plain(BoolC<false>{});
                } else {  // softcap and / or ALiBi (uniform branches, straight-line code inside)
                    const bool cap = p.softcap > 0.f;
                    const float cap_in = cap ? p.scale / p.softcap : 0.f, cap_out = p.softcap * CUFLASH_LOG2E;
                    const float slope2 =
                        p.alibi == nullptr ? 0.f : p.alibi[(i64)opaque(b) * p.alibi_batch_stride + h] * CUFLASH_LOG2E;
#pragma unroll
                    for (int mt = 0; mt < MTS; ++mt)
#pragma unroll
                        for (int hh = 0; hh < 2; ++hh) {
                            int lo, hi;
                            lo_hi(mt, hh, lo, hi);
                            if (!need_mask) { lo = 0; hi = BN; }
                            // |i + shift - j| = |rel - c| with rel = ipos - (n0 + kc)
                            const int rel = m0 + rbase + 16 * mt + 8 * hh + shift - (n0 + kc);
                            const float l =
                                __uint_as_float(lds_u32(sVec + (u32)(4 * BM + 4 * (rbase + 16 * mt + 8 * hh))));
#pragma unroll
                            for (int nt = 0; nt < NTS; ++nt) {
                                float pr[2], pc[2];
#pragma unroll
                                for (int e = 0; e < 2; ++e) {
                                    const int c = 8 * nt + e;
                                    const float raw = s[mt][nt][2 * hh + e];
                                    float t = 0.f, sc;
                                    if (cap) {
                                        t = sm80::tanh_abs_accurate(raw * cap_in);
                                        sc = cap_out * t;
                                    } else {
                                        sc = raw * p.scale_log2;
                                    }
                                    sc = fmaf(-slope2, fabsf((float)(rel - c)), sc);
                                    pr[e] = sm80::ex2((c >= lo && c <= hi) ? sc - l : -INFINITY);
                                    pc[e] = pr[e] * fmaf(-t, t, 1.f);
                                }
                                const u32 off = (ost ^ (u32)(nt << 4)) + (u32)((16 * mt + 8 * hh) * 128);
                                if constexpr (DROPOUT) sts_u32(sP + off, pack2<T>(pr[0], pr[1]) | drop_sign(mt, hh, nt));
                                else sts_u32(sP + off, pack2<T>(pr[0], pr[1]));
                                sts_u32(sdS + off, pack2<T>(pc[0], pc[1]));
                            }
                        }
                }
            }
            {
                float dp[MTS][NTS][4];
                gemm_nt(dp, sdO, sV);
                const int ft = opaque(tid);
                int rbase, kc;
                u32 ost;
                tile_pos(ft, rbase, kc, ost);
                const u32 src = transform ? sdS : sP;  // P (1 - tanh^2) or P, written by this thread above
#pragma unroll
                for (int mt = 0; mt < MTS; ++mt)
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const float dd = __uint_as_float(lds_u32(sVec + (u32)(4 * (rbase + 16 * mt + 8 * hh))));
#pragma unroll
                        for (int nt = 0; nt < NTS; ++nt) {
                            const u32 off = (ost ^ (u32)(nt << 4)) + (u32)((16 * mt + 8 * hh) * 128);
                            float p0, p1;
                            if constexpr (DROPOUT) {
                                // P with the sign bits of the dropped entries (see the header); with softcap
                                // the factor P (1 - tanh^2) comes from the dS tile as without dropout.
                                const u32 pw = lds_u32(sP + off);
                                const float r = p.dropout_scale;
                                if constexpr (kDropWide) {
                                    // |P| is P; dS = |P| (Z r dP - D) with Z r = 0 where the sign bit is set
                                    if (transform) unpack2<T>(lds_u32(sdS + off), p0, p1);
                                    else unpack2<T>(pw, p0, p1);
                                    const float zr0 = (pw & 0x8000u) ? 0.f : r, zr1 = (pw & 0x80000000u) ? 0.f : r;
                                    sts_u32(sdS + off, pack2<T>(fabsf(p0) * fmaf(zr0, dp[mt][nt][2 * hh], -dd),
                                                                fabsf(p1) * fmaf(zr1, dp[mt][nt][2 * hh + 1], -dd)));
                                    // dV's operand P Z: the dropped halves zeroed (their sign bits replicated)
                                    sts_u32(sP + off, pw & ~prmt(pw, 0u, 0xBB99u));
                                } else {  // the same, in the form ptxas keeps spill-free at d >= 96
                                    const u32 dropped = (pw >> 15) & 0x10001u;  // bit 0: e = 0, bit 16: e = 1
                                    if (transform) unpack2<T>(lds_u32(sdS + off), p0, p1);
                                    else unpack2<T>(pw & 0x7fff7fffu, p0, p1);
                                    const float g0 = (dropped & 1u) ? -dd : dp[mt][nt][2 * hh] * r - dd;
                                    const float g1 = (dropped >> 16) ? -dd : dp[mt][nt][2 * hh + 1] * r - dd;
                                    sts_u32(sdS + off, pack2<T>(p0 * g0, p1 * g1));
                                    sts_u32(sP + off, pw & ~(dropped * 0xffffu));  // dV's operand: P Z
                                }
                            } else {
                                unpack2<T>(lds_u32(src + off), p0, p1);
                                sts_u32(sdS + off,
                                        pack2<T>(p0 * (dp[mt][nt][2 * hh] - dd), p1 * (dp[mt][nt][2 * hh + 1] - dd)));
                            }
                        }
                    }
            }
            __syncthreads();  // P and dS are complete

            // ---- dQ (this step's rows) = dS K -> dq_accum ----------------------------------------------
            auto dq_step = [&]() {
                float acc[MTQ][2 * SQ][4];
#pragma unroll
                for (int mt = 0; mt < MTQ; ++mt)
#pragma unroll
                    for (int n = 0; n < 2 * SQ; ++n)
#pragma unroll
                        for (int e = 0; e < 4; ++e) acc[mt][n][e] = 0.f;
                {
                    const int ft = opaque(tid);
                    const u32 a64 = sdS + lane_off64<BM, BN>(wm_q(ft) * Tr::kTMQ + rowA(ft), bitA(ft));
                    const int cl = 2 * wd_q(ft) + bitA(ft);
                    const u32 b64 = sK + lane_off64<BN, D>(rowA(ft), cl), b32 = sK + lane_off32<BN, D>(rowA(ft), cl);
#pragma unroll
                    for (int ks = 0; ks < Tr::kKSN; ++ks) {
                        u32 a[MTQ][4];
#pragma unroll
                        for (int mt = 0; mt < MTQ; ++mt)
                            ldsm_x4(step_addr<BM, BN, 1>(a64, a64, ks, mt), a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
#pragma unroll
                        for (int k = 0; k < SQ; ++k) {
                            u32 b0, b1, b2, b3;
                            ldsm_x4_trans(step_addr<BN, D, Tr::kWDQ>(b64, b32, k, ks), b0, b1, b2, b3);
#pragma unroll
                            for (int mt = 0; mt < MTQ; ++mt) {
                                sm80::Mma<T>::run(acc[mt][2 * k], a[mt], b0, b1);
                                sm80::Mma<T>::run(acc[mt][2 * k + 1], a[mt], b2, b3);
                            }
                        }
                    }
                }
                int part = 0;
                if (ordered) {  // this key block's turn on the step's rows
                    if (tid == 0) {
                        int rank;
                        ordered_turn<BM, BN>(nb, m0 / BM, n_blocks, sq, sk, wr, p.num_splits == 2, part, rank);
                        sem_wait(step_counter(it), rank);
                    }
                    __syncthreads();
                    part = p.num_splits == 2 && m0 < pivot * BM ? 1 : 0;
                }
                // element (row wm_q TM_Q + 16 mt + 8 hh + g, column 16 (wd_q + WD_Q k) + 8 (n % 2) + 2 tq + e)
                const int ft = opaque(tid);
                float* dst = dq_acc(part)
                           + (((i64)opaque(b) * p.nheads + h) * sq_pad + m0 + wm_q(ft) * Tr::kTMQ + fg(ft)) * D
                           + 16 * wd_q(ft) + 2 * ftq(ft);
#pragma unroll
                for (int mt = 0; mt < MTQ; ++mt)
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                        for (int n = 0; n < 2 * SQ; ++n)
                            red_add2(dst + (16 * mt + 8 * hh) * D + 16 * Tr::kWDQ * (n >> 1) + 8 * (n & 1),
                                     acc[mt][n][2 * hh], acc[mt][n][2 * hh + 1]);
            };

            // ---- dV += P^T dO, dK += dS^T Q (BN x D; this warp: its key groups x column groups) ----------
            auto gemm_tn = [&](float (&acc)[MTKV][2 * SKV][4], u32 sa, u32 sb) {
                const int ft = opaque(tid);
                const u32 a64 = sa + lane_off64<BM, BN>(rowB(ft), 2 * wn_kv(ft) + bitB(ft));
                const int cl = 2 * wd_kv(ft) + bitA(ft);
                const u32 b64 = sb + lane_off64<BM, D>(rowA(ft), cl), b32 = sb + lane_off32<BM, D>(rowA(ft), cl);
#pragma unroll
                for (int kk = 0; kk < Tr::kKSM; ++kk) {
                    u32 a[MTKV][4];
#pragma unroll
                    for (int i = 0; i < MTKV; ++i)
                        ldsm_x4_trans(step_addr<BM, BN, Tr::kWNKV>(a64, a64, i, kk), a[i][0], a[i][1], a[i][2],
                                      a[i][3]);
#pragma unroll
                    for (int k = 0; k < SKV; ++k) {
                        u32 b0, b1, b2, b3;
                        ldsm_x4_trans(step_addr<BM, D, Tr::kWDKV>(b64, b32, k, kk), b0, b1, b2, b3);
#pragma unroll
                        for (int i = 0; i < MTKV; ++i) {
                            sm80::Mma<T>::run(acc[i][2 * k], a[i], b0, b1);
                            sm80::Mma<T>::run(acc[i][2 * k + 1], a[i], b2, b3);
                        }
                    }
                }
            };
            // Two stages: dQ first (its reds drain while dV and dK run); the next step's loads were issued
            // at the top. One stage: dV and dK first, then the next step's loads (Q and dO are free
            // once every warp is done with them) overlap the dQ GEMM and its reds.
            if (ST == 2) {
                dq_step();
                gemm_tn(acc_dv, sP, sdO);
                gemm_tn(acc_dk, sdS, sQ);
            } else {
                gemm_tn(acc_dv, sP, sdO);
                gemm_tn(acc_dk, sdS, sQ);
                if (it + 1 < n_iter) {
                    __syncthreads();  // every warp is done with this step's Q, dO, D, L
                    issue_q(hk * group + hi_, step_m0(mi_), 0);
                }
                dq_step();
            }
        }

        // ---- epilogue: dK * scale and dV in T, staged in the K and V tiles, 16-byte stores ------------------
        cp_async_wait<0>();  // nothing may still land in shared memory (n_iter == 0 leaves K, V in flight)
        __syncthreads();     // every warp is done with K and V
        if (ordered && n_iter > 0 && tid == 0) red_release_add(step_counter(n_iter - 1), 1);  // the last step's
        {
            const int ft = opaque(tid);
            const float sc = p.scale;
            const float dvs = DROPOUT ? p.dropout_scale : 1.f;  // dV = r sum P Z dO
#pragma unroll
            for (int i = 0; i < MTKV; ++i)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                    for (int n = 0; n < 2 * SKV; ++n) {
                        const int row = 16 * (wn_kv(ft) + Tr::kWNKV * i) + 8 * hh + fg(ft);
                        const int chunk = 2 * (wd_kv(ft) + Tr::kWDKV * (n >> 1)) + (n & 1);
                        const u32 off = chunk_off<BN, D>(row, chunk) + 4 * ftq(ft);
                        sts_u32(sK + off, pack2<T>(acc_dk[i][n][2 * hh] * sc, acc_dk[i][n][2 * hh + 1] * sc));
                        if constexpr (DROPOUT)
                            sts_u32(sV + off, pack2<T>(acc_dv[i][n][2 * hh] * dvs, acc_dv[i][n][2 * hh + 1] * dvs));
                        else
                            sts_u32(sV + off, pack2<T>(acc_dv[i][n][2 * hh], acc_dv[i][n][2 * hh + 1]));
                    }
        }
        __syncthreads();
        {
            const int ft = opaque(tid);
            T* dkb = (T*)p.dk + (i64)opaque(b) * p.dk_batch_stride + (i64)opaque(hk) * p.dk_head_stride
                   + (i64)n0 * p.dk_row_stride;
            T* dvb = (T*)p.dv + (i64)opaque(b) * p.dv_batch_stride + (i64)opaque(hk) * p.dv_head_stride
                   + (i64)n0 * p.dv_row_stride;
            store_tile<BN, D, NT>(sK, dkb, p.dk_row_stride, sk - n0, hd, ft);
            store_tile<BN, D, NT>(sV, dvb, p.dv_row_stride, sk - n0, hd, ft);
        }
        __syncthreads();  // the staging is read before the next key block's K and V land there
    }
}

// ---- 3. dq = scale * sum over splits of dq_accum --------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kBwdSm80RowThreads)
bwd_sm80_dq_convert(const Params p) {
    const int t = threadIdx.x & 7;
    const int i = blockIdx.x * kBwdSm80Rows + (threadIdx.x >> 3);
    const int h = blockIdx.y, b = blockIdx.z;
    if (i >= p.seqlen_q) return;
    const int sq_pad = (p.seqlen_q + kBwdSm80Pad - 1) / kBwdSm80Pad * kBwdSm80Pad;
    const int ld = (p.headdim + 31) & ~31;
    const i64 split_stride = (i64)p.batch * p.nheads * sq_pad * ld;
    const float* src = p.dq_accum + (((i64)b * p.nheads + h) * sq_pad + i) * ld;
    T* dst = (T*)p.dq + (i64)b * p.dq_batch_stride + (i64)h * p.dq_head_stride + (i64)i * p.dq_row_stride;
    const int splits = max(p.num_splits, 1);
    for (int col = 8 * t; col < p.headdim; col += 64) {
        float v[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) v[x] = 0.f;
        for (int s = 0; s < splits; ++s) {  // fixed order: deterministic
            const float4 a = *reinterpret_cast<const float4*>(src + s * split_stride + col);
            const float4 c = *reinterpret_cast<const float4*>(src + s * split_stride + col + 4);
            v[0] += a.x; v[1] += a.y; v[2] += a.z; v[3] += a.w;
            v[4] += c.x; v[5] += c.y; v[6] += c.z; v[7] += c.w;
        }
        u32 w[4];
#pragma unroll
        for (int x = 0; x < 4; ++x) w[x] = pack2<T>(v[2 * x] * p.scale, v[2 * x + 1] * p.scale);
        if (col + 8 <= p.headdim) {
            sm80::stg_u32x4(dst + col, w[0], w[1], w[2], w[3]);
        } else {
            for (int x = 0; x < p.headdim - col; ++x)
                dst[col + x].bits = (unsigned short)(w[x >> 1] >> (16 * (x & 1)));
        }
    }
}

}  // namespace cuflash
