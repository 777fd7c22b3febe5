// bwd_portable.cu: the portable FlashAttention backward (no tensor cores, fp32 math).
//
// The correct fallback for every dtype (fp32 included), head dim 1..256 and GPU from sm_80 on. The math
// and the numerics (lse in the log2 domain, P = 0 for rows without keys) are explained in bwd_common.cuh.
// Nothing of size seqlen_q x seqlen_k is ever stored: P and dS are recomputed tile by tile.
//
// Kernels, in launch order (cuflash/_launch_bwd.py):
//
//   bwd_preprocess_portable<T>     D_i = rowsum(dO_i * O_i) into dsum; zeroes the fp32 dQ accumulator
//                                  rows when there is one. A warp per row, 8 warps per block.
//   bwd_dkdv_portable<T, D, DROP>  one block of 128 threads per (key block of kBN keys, kv head, batch).
//                                  A group of kTPR threads per key row; thread t of the group owns kCols
//                                  head-dim columns, the float4 chunks t, t + kTPR, ... (col_of in
//                                  bwd_common.cuh): the row's K and V slices and its dK, dV accumulators
//                                  live in registers. Q and dO tiles of kBQ query rows stream through
//                                  shared memory (fp32), with lse*log2(e) and D of those rows; per (query
//                                  row, key) two group reductions (xor shuffles) give q.k and dO.v.
//                                  With GQA the block walks every query head of its kv group, so dK and
//                                  dV are sums kept in registers (deterministic, no scratch) and are
//                                  written once, in T, with their strides.
//                                  Default (deterministic = 0): dS (times the scale) of each tile goes to
//                                  shared memory, the tile's dQ contribution dS @ K is formed there against
//                                  an fp32 copy of the block's K, and added to dq_accum with fp32 atomics.
//                                  deterministic = 1: that part is skipped.
//   bwd_dq_convert_portable<T>     (default) dq = dq_accum, converted to T, written with dq's strides.
//   bwd_dq_portable<T, D, DROP>    (deterministic) one block per (query block, head, batch), a group of
//                                  kTPR threads per query row holding Q, dO and dQ slices in registers;
//                                  K and V tiles stream through shared memory in a fixed order, P and dS
//                                  are recomputed, and dQ is summed in registers: no atomics, so results
//                                  are bitwise identical from run to run.
//
// Dropout (DROP = true; false compiles it out): the keep mask of each (query row, key) pair is regenerated
// from Philox exactly as the forward drew it (philox.cuh: one call gives the 8 keys j0..j0+7, j0 % 8 == 0;
// tiles start at multiples of 8 keys). Each call is made once per tile, not once per thread that needs it:
// the dK/dV kernel spreads a tile's kBQ x kBN/8 calls over the block and keeps one 32-bit mask per query
// row in shared memory (bit = key of the block, kBN <= 32); in the dQ kernel the kTPR threads of a row
// split the row's kDqBN/8 calls and OR their bits together (one register). Math: bwd_common.cuh.
//
// Global offsets are 64-bit (i64) everywhere: batch/row/head strides times indices can exceed 2^31.
#include "bwd_common.cuh"

namespace cuflash {

// Tile shapes per head-dim bucket D. 128 threads; kTPR (threads per row) is chosen so that every thread
// owns kCols <= 16 columns (4 float4 chunks): the dK/dV kernel keeps 4 * kCols floats of state per thread
// (K, V, dK, dV slices) and the dQ kernel 3 * kCols (Q, dO, dQ). With the row's shared-memory operands
// in flight ptxas uses about 100-160 registers; __launch_bounds__(128, 3) caps them at 168 (3 blocks, 12 warps
// per SM) with no spills. (256-thread blocks would need <= 128 registers for 2 blocks per SM, which
// spills at D >= 128 on sm_80.)
template <int D>
struct PortableBwdTraits {
    static_assert(D == 32 || D == 64 || D == 128 || D == 256, "head dim bucket must be 32, 64, 128 or 256");
    static constexpr int kThreads = 128;
    static constexpr int kMinBlocks = 3;                            // register cap 65536 / (3 * 128) -> 168
    static constexpr int kTPR = D <= 64 ? 4 : (D == 128 ? 8 : 16);  // threads per key (or query) row
    static constexpr int kCols = D / kTPR;                          // head-dim columns per thread: 8 or 16
    // dK/dV kernel
    static constexpr int kBN = kThreads / kTPR;                     // keys per block: 32, 32, 16, 8
    static constexpr int kBQ = D <= 32 ? 32 : 16;                   // query rows per shared-memory tile
    // dQ phase of the dK/dV kernel (default path): thread -> kDqColsPerThread columns d = tid % D + kThreads * c
    // and the rows rg + kDqGroups * x (x < kDqRows) of the tile, rg = tid / D.
    static constexpr int kDqGroups = kThreads >= D ? kThreads / D : 1;
    static constexpr int kDqColsPerThread = kThreads >= D ? 1 : D / kThreads;
    static constexpr int kDqRows = kBQ / kDqGroups;
    static constexpr int kSmemDkdv = (kBN * D + 2 * kBQ * D + kBQ * kBN + 2 * kBQ) * (int)sizeof(float);
    // dQ kernel (deterministic path)
    static constexpr int kDqBM = kThreads / kTPR;                   // query rows per block: 32, 32, 16, 8
    static constexpr int kDqBN = D <= 128 ? 32 : 16;                // keys per shared-memory tile
    static constexpr int kSmemDq = 2 * kDqBN * D * (int)sizeof(float);

    static_assert(32 % kTPR == 0, "a row group must not straddle warps");
    static_assert(kCols % 4 == 0 && kCols <= 16, "float4 chunks, bounded registers");
    static_assert((kThreads % D == 0 || D % kThreads == 0) && kBQ % kDqGroups == 0, "dQ phase mapping");
    static constexpr int kSmemKeep = kBQ * (int)sizeof(u32);       // dK/dV kernel with dropout: keep bits
    static_assert(kSmemDkdv + kSmemKeep <= 48 * 1024 && kSmemDq <= 48 * 1024, "must fit the default shared memory");
    // Dropout: Philox calls cover 8 keys from a multiple of 8; a row's keys of a block fit one u32; when a
    // row takes several calls (kBN / 8 > 1), the tile's calls (kBQ * kBN / 8) fill whole warps so that the
    // OR over a row's lanes (shuffles) is warp-uniform.
    static_assert(kBN % 8 == 0 && kBN <= 32 && kDqBN % 8 == 0 && kDqBN <= 32, "dropout bit masks");
    static_assert(kBN == 8 || ((kBQ * (kBN / 8)) % 32 == 0 && 32 % (kBN / 8) == 0),
                  "dropout: warp-uniform Philox loop");
};

// ---- 1. preprocess: D = rowsum(dO * O), zero dq_accum --------------------------------------------

constexpr int kPrepThreads = 256;
constexpr int kPrepRows = 32;  // rows per block (8 warps x 4 rows)

template <typename T>
__global__ void __launch_bounds__(kPrepThreads)
bwd_preprocess_portable(const Params p) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.y, b = blockIdx.z;
    const T* op = (const T*)p.o + (i64)b * p.o_batch_stride + (i64)h * p.o_head_stride;
    const T* dop = (const T*)p.dout + (i64)b * p.do_batch_stride + (i64)h * p.do_head_stride;
    const i64 row0 = ((i64)b * p.nheads + h) * p.seqlen_q;  // (b, h, 0) in dsum / lse / dq_accum rows
    for (int r = warp; r < kPrepRows; r += kPrepThreads / 32) {
        const int i = blockIdx.x * kPrepRows + r;
        if (i >= p.seqlen_q) break;  // uniform over the warp
        const T* o_row = op + (i64)i * p.o_row_stride;
        const T* do_row = dop + (i64)i * p.do_row_stride;
        float acc = 0.f;
        for (int d = lane; d < p.headdim; d += 32) acc = fmaf(to_float(do_row[d]), to_float(o_row[d]), acc);
        acc = group_sum<32>(acc);  // fixed-order butterfly: deterministic
        if (lane == 0) p.dsum[row0 + i] = acc;
        if (p.dq_accum != nullptr) {
            float* acc_row = p.dq_accum + (row0 + i) * p.headdim;
            for (int d = lane; d < p.headdim; d += 32) acc_row[d] = 0.f;
        }
    }
}

// ---- 2. dK, dV (and the atomic dQ) per key block ---------------------------------------------------

template <typename T, int D, bool DROPOUT>
__global__ void __launch_bounds__(PortableBwdTraits<D>::kThreads, PortableBwdTraits<D>::kMinBlocks)
bwd_dkdv_portable(const Params p) {
    using Tr = PortableBwdTraits<D>;
    constexpr int NT = Tr::kThreads, TPR = Tr::kTPR, C = Tr::kCols, BN = Tr::kBN, BQ = Tr::kBQ;
    __shared__ __align__(16) float sK[BN][D];  // the block's keys (fp32), for the dQ phase and the K registers
    __shared__ __align__(16) float sQ[BQ][D];  // query tile
    __shared__ __align__(16) float sdO[BQ][D]; // dO tile
    __shared__ float sdS[BQ][BN];     // dS * scale of the tile, for dQ
    __shared__ float sLse[BQ];        // lse * log2(e), or +inf for flagged rows
    __shared__ float sDsum[BQ];       // D of the tile's rows
    __shared__ u32 sKeep[BQ];         // DROPOUT only (unreferenced, hence not allocated, otherwise):
                                      // bit jj of sKeep[r] = key n0 + jj is kept for query row m0 + r

    const int tid = threadIdx.x;
    const int t = tid % TPR;          // position in the row group
    const int jj = tid / TPR;         // key row of the block
    const int n0 = blockIdx.x * BN;
    const int j = n0 + jj;            // this group's key
    const int hk = blockIdx.y, b = blockIdx.z;
    const int group = p.nheads / p.nheads_k;
    const bool with_dq = p.deterministic == 0;
    const int hd = p.headdim;

    const T* kp = (const T*)p.k + (i64)b * p.k_batch_stride + (i64)hk * p.k_head_stride;
    const T* vp = (const T*)p.v + (i64)b * p.v_batch_stride + (i64)hk * p.v_head_stride;

    // K block -> shared memory (coalesced), then each thread's K slice -> registers; V slice straight
    // from global memory (read once per block). Columns past headdim and keys past seqlen_k are 0.
    for (int e = tid; e < BN * D; e += NT) {
        const int r = e / D, d = e % D;
        const int jr = n0 + r;
        sK[r][d] = (jr < p.seqlen_k && d < hd) ? to_float(kp[(i64)jr * p.k_row_stride + d]) : 0.f;
    }
    __syncthreads();
    float kr[C], vr[C], dk[C], dv[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int d = col_of<TPR>(t, c);
        kr[c] = sK[jj][d];
        vr[c] = (j < p.seqlen_k && d < hd) ? to_float(vp[(i64)j * p.v_row_stride + d]) : 0.f;
        dk[c] = 0.f;
        dv[c] = 0.f;
    }

    // Query rows that see at least one key of [n0, n1]: first_key(i) <= n1 and last_key(i) >= n0. Both
    // bounds are non-decreasing in i, so these rows form one range [i_lo, i_hi]; tiles outside it are
    // fully masked and skipped. 64-bit: the window sizes can be as large as INT_MAX.
    const int n1 = min(n0 + BN, p.seqlen_k) - 1;
    const i64 shift = (i64)p.seqlen_k - p.seqlen_q;  // query i sits at key position i + shift
    i64 i_lo = 0, i_hi = (i64)p.seqlen_q - 1;
    if (p.window_right >= 0) i_lo = max(i_lo, (i64)n0 - shift - p.window_right);
    if (p.window_left >= 0) i_hi = min(i_hi, (i64)n1 - shift + p.window_left);
    const int m_begin = i_lo <= i_hi ? (int)(i_lo / BQ) * BQ : p.seqlen_q;  // empty range: no tile
    const int m_end = (int)i_hi;                                             // inclusive

    for (int h = hk * group; h < (hk + 1) * group; ++h) {
        const T* qp = (const T*)p.q + (i64)b * p.q_batch_stride + (i64)h * p.q_head_stride;
        const T* dop = (const T*)p.dout + (i64)b * p.do_batch_stride + (i64)h * p.do_head_stride;
        const i64 row0 = ((i64)b * p.nheads + h) * p.seqlen_q;
        const float slope = alibi_slope(p, b, h);

        for (int m0 = m_begin; m0 <= m_end; m0 += BQ) {
            __syncthreads();  // the previous tile (and its dQ phase) is consumed
            #pragma unroll 1
            for (int e = tid; e < BQ * D; e += NT) {
                const int r = e / D, d = e % D;
                const int i = m0 + r;
                const bool ok = i < p.seqlen_q && d < hd;
                sQ[r][d] = ok ? to_float(qp[(i64)i * p.q_row_stride + d]) : 0.f;
                sdO[r][d] = ok ? to_float(dop[(i64)i * p.do_row_stride + d]) : 0.f;
            }
            for (int r = tid; r < BQ; r += NT) {
                const int i = m0 + r;
                const bool ok = i < p.seqlen_q;
                sLse[r] = lse_log2_or_flag(ok ? p.lse[row0 + i] : 0.f, ok);
                sDsum[r] = ok ? p.dsum[row0 + i] : 0.f;
            }
            if (DROPOUT) {
                // The tile's keep bits: call e -> (row r, keys n0 + 8g .. n0 + 8g + 7); the G8 calls of a row
                // are consecutive lanes of one warp, whose bytes are ORed into the row's mask.
                constexpr int G8 = BN / 8;
#pragma unroll 1
                for (int e = tid; e < BQ * G8; e += NT) {  // whole warps when G8 > 1 (static_assert in the traits)
                    const int r = e / G8, g = e % G8;
                    const u32 bits = group_or<G8>(
                        dropout_keep_bits8(p, dropout_draws(p, b, h, m0 + r, n0 + 8 * g)) << (8 * g));
                    if (g == 0) sKeep[r] = bits;
                }
            }
            __syncthreads();

#pragma unroll 1
            for (int r = 0; r < BQ; ++r) {
                const float4* q4 = reinterpret_cast<const float4*>(&sQ[r][0]);
                const float4* do4 = reinterpret_cast<const float4*>(&sdO[r][0]);
                float dot = dot4<C, TPR>(q4, kr, t);
                float dp = dot4<C, TPR>(do4, vr, t);
                dot = group_sum<TPR>(dot);
                dp = group_sum<TPR>(dp);
                const bool kept = DROPOUT && ((sKeep[r] >> jj) & 1u);
                float pv;
                const float ds = bwd_ds<DROPOUT>(p, dot, dp, m0 + r, j, slope, sLse[r], sDsum[r], kept, pv);
                axpy4<C, TPR>(pv, do4, dv, t);
                axpy4<C, TPR>(ds, q4, dk, t);
                if (with_dq && t == 0) sdS[r][jj] = ds * p.scale;
            }

            if (with_dq) {
                // dQ of the tile += (dS * scale) @ K_block, from shared memory. Thread -> column d and row
                // group; a warp shares its row group, so sdS reads are broadcasts and sK reads are
                // consecutive. Zero contributions (masked pairs) are not added.
                __syncthreads();
                constexpr int G = Tr::kDqGroups, R = Tr::kDqRows, CC = Tr::kDqColsPerThread;
                const int d0 = tid % D, rg = tid / D;
                float acc[CC][R];
#pragma unroll
                for (int cc = 0; cc < CC; ++cc)
#pragma unroll
                    for (int x = 0; x < R; ++x) acc[cc][x] = 0.f;
#pragma unroll 1
                for (int n = 0; n < BN; ++n) {
#pragma unroll
                    for (int cc = 0; cc < CC; ++cc) {
                        const float kv = sK[n][d0 + NT * cc];
#pragma unroll
                        for (int x = 0; x < R; ++x) acc[cc][x] = fmaf(sdS[rg + G * x][n], kv, acc[cc][x]);
                    }
                }
#pragma unroll
                for (int cc = 0; cc < CC; ++cc) {
                    const int d = d0 + NT * cc;
                    if (d >= hd) continue;
#pragma unroll
                    for (int x = 0; x < R; ++x) {
                        const int i = m0 + rg + G * x;
                        if (i < p.seqlen_q && acc[cc][x] != 0.f)
                            atomicAdd(p.dq_accum + (row0 + i) * hd + d, acc[cc][x]);
                    }
                }
            }
        }
    }

    // dK = scale * sum_i dS_ij q_i, dV = sum_i P_ij (Z_ij / (1 - p)) dO_i; keys that no query sees get 0.
    if (j < p.seqlen_k) {
        T* dkp = (T*)p.dk + (i64)b * p.dk_batch_stride + (i64)hk * p.dk_head_stride + (i64)j * p.dk_row_stride;
        T* dvp = (T*)p.dv + (i64)b * p.dv_batch_stride + (i64)hk * p.dv_head_stride + (i64)j * p.dv_row_stride;
#pragma unroll
        for (int c = 0; c < C; ++c) {
            const int d = col_of<TPR>(t, c);
            if (d < hd) {
                dkp[d] = from_float<T>(dk[c] * p.scale);
                dvp[d] = from_float<T>(dv[c]);
            }
        }
    }
}

// ---- 3a. dq = dq_accum in T (default path) ---------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kPrepThreads)
bwd_dq_convert_portable(const Params p) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.y, b = blockIdx.z;
    T* dqp = (T*)p.dq + (i64)b * p.dq_batch_stride + (i64)h * p.dq_head_stride;
    const i64 row0 = ((i64)b * p.nheads + h) * p.seqlen_q;
    for (int r = warp; r < kPrepRows; r += kPrepThreads / 32) {
        const int i = blockIdx.x * kPrepRows + r;
        if (i >= p.seqlen_q) break;
        const float* acc_row = p.dq_accum + (row0 + i) * p.headdim;
        T* dq_row = dqp + (i64)i * p.dq_row_stride;
        for (int d = lane; d < p.headdim; d += 32) dq_row[d] = from_float<T>(acc_row[d]);
    }
}

// ---- 3b. dQ per query block, fixed order, no atomics (deterministic path) --------------------------

template <typename T, int D, bool DROPOUT>
__global__ void __launch_bounds__(PortableBwdTraits<D>::kThreads, PortableBwdTraits<D>::kMinBlocks)
bwd_dq_portable(const Params p) {
    using Tr = PortableBwdTraits<D>;
    constexpr int NT = Tr::kThreads, TPR = Tr::kTPR, C = Tr::kCols, BM = Tr::kDqBM, BN = Tr::kDqBN;
    __shared__ __align__(16) float sK[BN][D];
    __shared__ __align__(16) float sV[BN][D];

    const int tid = threadIdx.x;
    const int t = tid % TPR;
    const int row = tid / TPR;
    const int m0 = blockIdx.x * BM;
    const int h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (p.nheads / p.nheads_k);
    const int i = m0 + row;
    const bool row_valid = i < p.seqlen_q;
    const int hd = p.headdim;

    const T* qp = (const T*)p.q + (i64)b * p.q_batch_stride + (i64)h * p.q_head_stride;
    const T* dop = (const T*)p.dout + (i64)b * p.do_batch_stride + (i64)h * p.do_head_stride;
    const T* kp = (const T*)p.k + (i64)b * p.k_batch_stride + (i64)hk * p.k_head_stride;
    const T* vp = (const T*)p.v + (i64)b * p.v_batch_stride + (i64)hk * p.v_head_stride;
    const i64 row0 = ((i64)b * p.nheads + h) * p.seqlen_q;

    float qr[C], dor[C], dq[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int d = col_of<TPR>(t, c);
        const bool ok = row_valid && d < hd;
        qr[c] = ok ? to_float(qp[(i64)i * p.q_row_stride + d]) : 0.f;
        dor[c] = ok ? to_float(dop[(i64)i * p.do_row_stride + d]) : 0.f;
        dq[c] = 0.f;
    }
    const float lse_l2 = lse_log2_or_flag(row_valid ? p.lse[row0 + i] : 0.f, row_valid);
    const float dsum = row_valid ? p.dsum[row0 + i] : 0.f;
    const float slope = alibi_slope(p, b, h);

    // Keys any row of this block may see (the bounds are non-decreasing in i); tiles outside are skipped.
    const int last_row = min(m0 + BM, p.seqlen_q) - 1;
    const int n_lo = first_key(p, m0);
    const int n_hi = last_key(p, last_row);  // inclusive; < n_lo when nothing is kept
    const int n_begin = (n_lo / BN) * BN;

    for (int n0 = n_begin; n0 <= n_hi; n0 += BN) {  // fixed order: bitwise reproducible
        // Dropout: bit n of keep = key n0 + n is kept for row i. The row's BN/8 Philox calls are split over
        // its TPR threads and ORed together (every thread of the warp takes part in the shuffles).
        u32 keep = 0u;
        if (DROPOUT) {
#pragma unroll 1
            for (int g = t; g < BN / 8; g += TPR)
                keep |= dropout_keep_bits8(p, dropout_draws(p, b, h, i, n0 + 8 * g)) << (8 * g);
            keep = group_or<TPR>(keep);
        }
        __syncthreads();
        for (int e = tid; e < BN * D; e += NT) {
            const int r = e / D, d = e % D;
            const int jr = n0 + r;
            const bool ok = jr < p.seqlen_k && d < hd;
            sK[r][d] = ok ? to_float(kp[(i64)jr * p.k_row_stride + d]) : 0.f;
            sV[r][d] = ok ? to_float(vp[(i64)jr * p.v_row_stride + d]) : 0.f;
        }
        __syncthreads();
#pragma unroll 1
        for (int n = 0; n < BN; ++n) {
            const float4* k4 = reinterpret_cast<const float4*>(&sK[n][0]);
            const float4* v4 = reinterpret_cast<const float4*>(&sV[n][0]);
            float dot = dot4<C, TPR>(k4, qr, t);
            float dp = dot4<C, TPR>(v4, dor, t);
            dot = group_sum<TPR>(dot);
            dp = group_sum<TPR>(dp);
            const bool kept = DROPOUT && ((keep >> n) & 1u);
            float pv;  // dV weight, unused here
            const float ds = bwd_ds<DROPOUT>(p, dot, dp, i, n0 + n, slope, lse_l2, dsum, kept, pv);
            axpy4<C, TPR>(ds, k4, dq, t);
        }
    }

    if (!row_valid) return;
    T* dqp = (T*)p.dq + (i64)b * p.dq_batch_stride + (i64)h * p.dq_head_stride + (i64)i * p.dq_row_stride;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int d = col_of<TPR>(t, c);
        if (d < hd) dqp[d] = from_float<T>(dq[c] * p.scale);
    }
}

}  // namespace cuflash
