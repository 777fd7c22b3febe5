// bwd_sm90.cu: the Hopper FlashAttention backward main kernel (sm_90a) for fp16 / bf16: wgmma, TMA,
// mbarrier rings and warp specialisation.
//
// The launcher (cuflash/_launch_bwd_sm90.py) runs bwd_sm80.cu's preprocess (D = rowsum(dO * O), L = lse
// log2(e) or +inf, padded to sq_pad rows) and dq_convert around this kernel, with the contract of the sm80
// backward: dK, dV written once in T (dK times the softmax scale), dQ added in fp32 (without the scale)
// into dq_accum (splits, batch, nheads, sq_pad, D) with red.add. Deterministic mode, ordered (the
// dispatcher's; Params::counters set; MODE kModeOrdered): one block per key block as in the default mode,
// and every query block's dQ rows receive their additions in a fixed order, the order in which the key
// blocks arrive when they run side by side, so that a block seldom waits:
//   * block x of the grid takes key block nb = N - 1 - x (N key blocks): the last key block is
//     scheduled first;
//   * key block nb walks its query blocks m_first .. M - 1 (no left window here) from its pivot
//     max(m_first, nb M / N) up to M - 1 (its "upper" part), then m_first .. pivot - 1 ("lower" part). Both
//     bounds rise with nb, so on any query block m the upper visitors arrive in descending key-block
//     order (block nb reaches m after m - pivot(nb) steps), and so do the lower ones;
//   * counter (b, h, m, part) counts the additions done; block nb adds when it reads the number of
//     visitors of that part above nb (closed forms: bwd_common.cuh's ordered_turn), then raises it
//     (release).
//     With two parts (Params::num_splits = 2, the host's choice when a lower part exists) the parts add
//     into dq_accum planes 0 and 1 (dq_convert sums them) and a block only ever waits on key block
//     nb + 1, scheduled before it: no deadlock and no wait on a block scheduled late. With one plane the
//     lower visitors follow the upper ones (key block N - 1 waits on block 0: the host takes this only for
//     a few key blocks, which run side by side). Causal (square) has no lower part.
//   * without dropout, the hand-overs are not the consumers' work: one thread of the producer warpgroup
//     (warp 1) waits for each step's turn and releases the step's additions (mbarriers turn / done), so
//     that the consumers never wait on global memory (with dropout, warps 1 - 3 draw the keep bits and
//     consumer thread 128 does both, on the consumers' path).
// Split mode (explicit splits, or a left window; counters null): gridDim.x = splits, block x walks key
// blocks x, x + splits, ... and adds into split x (one writer thread per address, its reductions in
// program order). The math is bwd_common.cuh's (P from the forward's LSE, dS = P (dP - D)
// [* (1 - tanh^2) with softcap]).
//
// One block of 384 threads owns BN = 128 keys of one (kv head, batch) (traits_bwd_sm90.cuh; d256, kSplitD:
// BN = 64 keys, and the consumers split the head dim instead of the keys: each computes S^T / dP^T for
// all 64 keys and half the queries, both stage P^T and dS^T in shared memory, then each runs dV, dK
// (wgmma ss, A K-major from those buffers) and dQ on its 128 columns; no dropout variant):
//
//   * Producer (warpgroup 0, one thread; setmaxnreg 24): K and V of the key block once (TMA, kv_full;
//     refilled for the next key block of a deterministic split after kv_empty), then per step (query block
//     of BM rows of one head of the GQA group) Q and dO by TMA and the BM values of L and D by bulk copies,
//     into a ring of STAGES slots (q_full / q_empty).
//   * Two consumers (warpgroups 1 and 2, 240 registers), 64 keys each. Per step:
//       S^T  = K_w Q^T, dP^T = V_w dO^T           wgmma ss, both operands K-major (64 keys x BM queries)
//       P^T  = exp2(S^T scale log2(e) - L), dS^T = P^T (dP^T - D)   (masks only on boundary blocks)
//       dV  += P^T dO, dK += dS^T Q               wgmma rs: P^T / dS^T from registers, dO / Q N-major
//       dS^T -> shared memory (buffer of the step's parity); named barrier between the two consumers
//       dQ   = dS K                               wgmma ss_mnmajor: dS^T read M-major, K N-major; split
//                                                 between the consumers by rows (BM 128) or columns (BM 64)
//       wait; release the slot; dQ -> dq_accum by red.global.add.v4.f32
//     Epilogue per key block: dK * scale and dV from registers to global memory (32-bit stores).
//   * DROPOUT (the variants for Params::dropout_p > 0; false compiles it out): warps 1 - 3 of the
//     producer warpgroup (setmaxnreg 40; the consumers 232) draw the keep bits of every step, in the
//     consumers' order, into a ring of STAGES slots of BN x BM bits (keep_full: every RNG thread arrives;
//     the slot is reused after q_empty), laid out so that a consumer thread loads its own BM / 2 bits as
//     one or two words (one Philox call per query and 8 keys gives a byte that spans 8 lanes: an RNG
//     thread makes 8 calls and transposes the 8 x 8 bit block). The consumer folds Z r into dP^T before
//     the softmax loop (dS = P (Z r dP - D), r = 1 / (1 - p)) and Z into the 16-bit P^T operand after
//     it (dV += P Z dO; r in the epilogue). The mask is philox.cuh's, bit for bit. The d64 variant has no
//     softcap / ALiBi code (ptxas spills with it): the host sends those runs to bwd_sm80.cu.
//   * Out-of-range rows: TMA zero-fills Q / dO rows past seqlen_q (their L is +inf: P = 0) and K / V rows
//     past seqlen_k (masked); head dims pad to the bucket (zero columns).
//
// MODE (debugging and timing only; the dispatcher uses 0): bit 0 skips dQ (the dS store, the barrier, the
// dQ GEMM and its reductions; kSplitD keeps the store and the barrier), bit 4 only dQ's additions into
// dq_accum, bit 1 skips the dK / dV GEMMs (results are then wrong); bit 2 takes an
// experimental overlapped schedule (correct results; P = exp2 while dP^T runs, dS while dV runs, dS from the
// 16-bit P). It does not fit the registers yet: ptxas serialises its wgmma (C7512, NVRTC 13.0) and spills
// at d64 (NVRTC 13.5), so the default (bit 2 clear) is the serial schedule: wait for S^T and dP^T, all of P
// and dS, then dV and dK issued together.
#include "bwd_common.cuh"
#include "mma.cuh"
#include "sm90.cuh"
#include "traits_bwd_sm90.cuh"
#include "wgmma_ops.cuh"

namespace cuflash {
namespace sm90bwd {

// The tensor maps of one launch (cuflash/_tma.py encodes them; second kernel parameter).
struct TmaMaps {
    sm90::TmaDesc q, k, v, dout;
};

constexpr int kModeNoDQ = 1;
constexpr int kModeNoDKV = 2;
constexpr int kModeOverlap = 4;  // experimental schedule (see the main loop)
constexpr int kModeOrdered = 8;  // the ordered deterministic mode: reversed key blocks, rotated walk
constexpr int kModeNoRed = 16;   // timing only: the dQ GEMM runs, its additions into dq_accum do not
constexpr int kBarDS = 1;   // named barrier: both consumers have written their dS^T rows
constexpr int kBarSem = 2;  // named barrier: ordered deterministic mode, the consumers' turn on a dQ block
constexpr int kOrderedAcyclic = 1;  // Params::flags, ordered mode: no block waits on a lower key block

__device__ __forceinline__ float2 lds_f32x2(u32 addr) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
    return v;
}

template <bool B> struct BoolC { static constexpr bool value = B; };

}  // namespace sm90bwd

template <typename T, int D, int BM, int STAGES, int MODE = 0, bool DROPOUT = false>
__global__ void __launch_bounds__(384, 1)
bwd_sm90(const __grid_constant__ Params p, const __grid_constant__ sm90bwd::TmaMaps maps) {
    using namespace sm90;
    using namespace sm90bwd;
    using sm80::ex2;
    using sm80::smem_addr;
    using Tr = Sm90BwdTraits<D, BM, STAGES, DROPOUT>;
    static_assert(!(DROPOUT && (MODE & kModeOverlap)), "dropout takes the serial schedule");
    constexpr int BN = Tr::kBN;
    // kSplitD (D = 256): the consumers split dK / dV by head-dim halves and S^T / dP^T by query halves
    // (traits_bwd_sm90.cuh); else by keys.
    constexpr bool kSplitD = Tr::kSplitD;
    constexpr int kQC = Tr::kQPerConsumer;  // query columns of this consumer's S^T / dP^T
    constexpr int kDC = Tr::kDPerConsumer;  // dK / dV columns of this consumer
    static_assert(!(kSplitD && (MODE & kModeOverlap)), "d256 takes the serial schedule");
    constexpr int kNT = kQC / 8;   // n8 tiles of the S^T / dP^T fragments (queries)
    constexpr int kKSD = D / 16;   // k-steps over the head dim (S^T, dP^T)
    constexpr int kKSM = BM / 16;  // k-steps over the queries (dV, dK)
    constexpr int kKSP = kQC / 16; // 16-bit A fragments of P^T / dS^T held in registers (not kSplitD)
    constexpr int kKSN = BN / 16;  // k-steps over the keys (dQ)
    constexpr int kNQ = Tr::kNQ;
    extern __shared__ __align__(1024) unsigned char smem[];
    // kHelper (the ordered mode without dropout): warp 1 of the producer warpgroup takes the hand-overs of
    // the dQ additions off the consumers (below); it needs the dropout variants' register split.
    constexpr bool kHelper = (MODE & kModeOrdered) && !DROPOUT;
    constexpr int kProducerRegs = kHelper ? 40 : Tr::kProducerRegs;
    constexpr int kConsumerRegs = kHelper ? 232 : Tr::kConsumerRegs;
    __shared__ __align__(8) u64 bars[Tr::kBars + (kHelper ? 4 : 0)];
    // seqlen_q, seqlen_k, nheads, nheads_k, batch, window_left, window_right: the producer re-reads them
    // from here (volatile) instead of holding them (see fwd_sm90.cu).
    __shared__ int shape_s[7];
    __shared__ u32 seed_s[2];
    __shared__ int rng_s[DROPOUT ? 8 * 96 : 1];  // DROPOUT: the RNG warps' loop state (below)  // DROPOUT: the Philox key words, re-read per call by the RNG warps (below)

    require_dynamic_smem(Tr::kSmemBytes);  // (the window is aligned up to 1024 bytes below)
    const u32 s0 = (smem_addr(smem) + 1023u) & ~1023u;
    const u32 sK = s0 + Tr::kOffK, sV = s0 + Tr::kOffV, sQ = s0 + Tr::kOffQ, sdO = s0 + Tr::kOffdO;
    const u32 sdS = s0 + Tr::kOffdS, sP = s0 + Tr::kOffP, sVec = s0 + Tr::kOffVec, sKeep = s0 + Tr::kOffKeep;
    const u32 bar0 = smem_addr(bars);
    const u32 kv_full = bar0, kv_empty = bar0 + 8u;
    auto q_full = [&](int s) { return bar0 + 8u * (2 + s); };
    auto q_empty = [&](int s) { return bar0 + 8u * (2 + STAGES + s); };
    auto keep_full = [&](int s) { return bar0 + 8u * (2 + 2 * STAGES + s); };  // DROPOUT only
    // kHelper: turn(t) completes when the step of parity t may add its dQ (the helper saw the counter),
    // done(t) when the 8 consumer warps have issued their additions of that step
    auto turn = [&](int t) { return bar0 + 8u * (Tr::kBars + t); };
    auto done = [&](int t) { return bar0 + 8u * (Tr::kBars + 2 + t); };

    // The first key block of this block (kModeOrdered: the last key block first) and the walk's pivot.
    auto first_kb = [] {
        return (MODE & kModeOrdered) ? (int)sreg_nctaid_x() - 1 - (int)sreg_ctaid_x() : (int)sreg_ctaid_x();
    };
    auto pivot_of = [](int nb, int sq, int sk, int wr, int m_first) {
        return (MODE & kModeOrdered) ? ordered_pivot<BM, Tr::kBN>(nb, sreg_nctaid_x(), sq, sk, wr) : m_first;
    };
    // the walk's step mi: query block m_first + mi, or (kModeOrdered) from the pivot, wrapping around
    auto step_m = [](int mi, int m_first, int n_m, int pivot) {
        return (MODE & kModeOrdered) ? walk_m(mi, m_first, n_m, pivot) : m_first + mi;
    };

    const int wg = __shfl_sync(0xffffffffu, (int)threadIdx.x >> 7, 0);
    if (threadIdx.x == 0) {
        store_shape(shape_s, p);
        if (DROPOUT) {
            seed_s[0] = (u32)p.seed;
            seed_s[1] = (u32)(p.seed >> 32) ^ (u32)(p.rng_offset >> 32);
        }
        mbar_init(kv_full, 1);
        mbar_init(kv_empty, 8);  // one arrival per consumer warp
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(q_full(s), 1);
            mbar_init(q_empty(s), 8);
            if (DROPOUT) mbar_init(keep_full(s), 96);  // every thread of the three RNG warps
        }
        if (kHelper) {
            for (int t = 0; t < 2; ++t) {
                mbar_init(turn(t), 1);
                mbar_init(done(t), 8);
            }
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        // ---- producer ---------------------------------------------------------------------------------
        setmaxnreg_dec<kProducerRegs>();
        if (sreg_tid() == 0) {
            auto fresh = [&](int i) { return *static_cast<const volatile int*>(&shape_s[i]); };
            prefetch_tma_desc(&maps.q);
            prefetch_tma_desc(&maps.k);
            prefetch_tma_desc(&maps.v);
            prefetch_tma_desc(&maps.dout);
            int g = 0;    // steps loaded so far (ring position and phase)
            int kbl = 0;  // key blocks loaded so far (K / V phase)
            for (int nb = first_kb();; nb += sreg_nctaid_x()) {
                const int n0 = nb * BN;
                if (n0 >= fresh(1)) break;
                int m_first, n_m;
                query_block_range<BM, BN>(n0, fresh(0), fresh(1), fresh(5), fresh(6), m_first, n_m);
                if (n_m == 0) continue;  // the consumers write zeros for this key block
                const int3 c = sreg_ctaid();
                const int hk = c.y, b = c.z;
                if (kbl > 0) mbar_wait(kv_empty, (kbl - 1) & 1);
                mbar_arrive_expect_tx(kv_full, 2 * Tr::kKBytes);
#pragma unroll
                for (int ch = 0; ch < Tr::kChunks; ++ch) {
                    tma_load_4d(sK + ch * (BN * 128), &maps.k, ch * 64, hk, n0, b, kv_full);
                    tma_load_4d(sV + ch * (BN * 128), &maps.v, ch * 64, hk, n0, b, kv_full);
                }
                ++kbl;
                const int group = fresh(2) / fresh(3);
                for (int hi = 0; hi < group; ++hi) {
                    for (int mi = 0; mi < n_m; ++mi, ++g) {
                        const int s = g % STAGES;
                        if (g >= STAGES) mbar_wait(q_empty(s), ((g / STAGES) & 1) ^ 1);
                        const int h = hk * group + hi;
                        const int m0 = ((MODE & kModeOrdered)
                                            ? walk_m(mi, m_first, n_m, pivot_of(nb, fresh(0), fresh(1), fresh(6), m_first))
                                            : m_first + mi) * BM;
                        mbar_arrive_expect_tx(q_full(s), 2 * Tr::kQBytes + Tr::kVecBytes);
#pragma unroll
                        for (int ch = 0; ch < Tr::kChunks; ++ch) {
                            tma_load_4d(sQ + s * Tr::kQBytes + ch * (BM * 128), &maps.q, ch * 64, h, m0, b, q_full(s));
                            tma_load_4d(sdO + s * Tr::kQBytes + ch * (BM * 128), &maps.dout, ch * 64, h, m0, b,
                                        q_full(s));
                        }
                        const int sq = fresh(0);
                        const i64 sq_pad = (i64)((sq + 127) / 128 * 128);
                        const i64 row = ((i64)b * fresh(2) + h) * sq_pad + m0;
                        const i64 plane = (i64)fresh(4) * fresh(2) * sq_pad;
                        bulk_load(sVec + s * Tr::kVecBytes, p.dsum + plane + row, BM * 4, q_full(s));       // L
                        bulk_load(sVec + s * Tr::kVecBytes + BM * 4, p.dsum + row, BM * 4, q_full(s));      // D
                    }
                }
            }
        } else if (kHelper && sreg_tid() == 32) {
            // ---- the hand-over thread (ordered mode): per step, in the consumers' order, wait for this
            // block's turn on the step's counter, open turn(), wait for done() (the consumers' additions,
            // ordered before it at CTA scope), then raise the counter with a GPU-scope release (cumulative:
            // it covers the consumers' additions). The consumers never wait on global memory.
            auto fresh = [&](int i) { return *static_cast<const volatile int*>(&shape_s[i]); };
            const int nb = first_kb();  // one key block per block in ordered mode
            int m_first, n_m;
            query_block_range<BM, BN>(nb * BN, fresh(0), fresh(1), fresh(5), fresh(6), m_first, n_m);
            const int pivot = pivot_of(nb, fresh(0), fresh(1), fresh(6), m_first);
            const int group = fresh(2) / fresh(3);
            // the counter and this block's turn of step g (head hi = g / n_m, walk step g % n_m)
            auto target = [&](int g, int& rank) {
                const int hi = g / n_m, m = walk_m(g - hi * n_m, m_first, n_m, pivot);
                int part;
                ordered_turn<BM, BN>(nb, m, sreg_nctaid_x(), fresh(0), fresh(1), fresh(6), p.num_splits == 2, part, rank);
                return p.counters
                     + (((i64)sreg_ctaid().z * fresh(2) + sreg_ctaid().y * group + hi) * ((fresh(0) + BM - 1) / BM) + m)
                           * p.num_splits
                     + part;
            };
            // kOrderedAcyclic: every wait is on key block nb + 1 (two planes, or no lower part), so the next
            // step's turn may be awaited before this step's release; else (the one-plane wrap, where block
            // N - 1 waits on block 0) strictly in order
            const bool ahead = p.flags & kOrderedAcyclic;
            const int total = group * n_m;
            int* c = nullptr;  // the counter of step g - 1 (turn given, not yet released)
            for (int g = 0; g <= total; ++g) {
                int rank = 0;
                int* const cn = g < total ? target(g, rank) : nullptr;
                if (ahead && cn != nullptr) {
                    sem_wait(cn, rank);
                    mbar_arrive(turn(g & 1));
                }
                if (c != nullptr) {
                    mbar_wait(done((g - 1) & 1), ((g - 1) >> 1) & 1);
                    red_release_add(c, 1);
                }
                if (!ahead && cn != nullptr) {
                    sem_wait(cn, rank);
                    mbar_arrive(turn(g & 1));
                }
                c = cn;
            }
        } else if (DROPOUT && sreg_tid() >= 32) {
            // ---- RNG warps (1 - 3): the keep bits of every step, in the consumers' order ------------------
            // Consumer thread u = 32 cwv + lane (cwv = 4 cw + (warp & 3), lane = 4 c + tq) finds the keep bit
            // of its score element x = 4 nt + 2 hh + e (key n0 + 16 cwv + 8 hh + c, query
            // m0 + 8 nt + 2 tq + e) at bit x % 32 of word u kKeepWords + x / 32. A task (cwv, tq, byte
            // kb of the x range) makes the 8 Philox calls x = 8 kb .. 8 kb + 7 (each: the 8 keys c = 0..7
            // of one query), transposes the 8 x 8 bit block (rows x, columns c) and stores byte kb of the
            // eight lanes c. The slot is free again with q_empty.
            auto fresh = [&](int i) { return *static_cast<const volatile int*>(&shape_s[i]); };
            constexpr int kBytesPerLane = BM / 16;
            // Philox calls in flight per thread: all 8 of a task at d128 (BM 64: 0.61-0.65 -> 0.69-0.74 of
            // p = 0, session 11), 2 at d64 (BM 128: 8 measured 2-6% slower there, 4 slower at both).
            // (CUFLASH_BWD_RNG_NPAR overrides: A / B runs.)
#ifdef CUFLASH_BWD_RNG_NPAR
            constexpr int NPAR = CUFLASH_BWD_RNG_NPAR;
#else
            constexpr int NPAR = BM == 64 ? 8 : 2;
#endif
            // The walk's state lives in shared memory, a slot of 8 ints per thread (volatile: re-read where
            // used, never held): the loop counters in registers beside the Philox chains would spill.
            // st: 0 key block nb, 1 step g, 2 step of the key block it, 3 steps of the key block, 4 m0,
            // 5 Philox counter word 2 (b nheads + h), 6 slot s.
            volatile int* st = &rng_s[8 * (sreg_tid() - 32)];
            st[0] = first_kb();
            st[1] = 0;
            for (;; st[0] = st[0] + sreg_nctaid_x()) {
                if (st[0] * BN >= fresh(1)) break;
                {
                    int m_first, n_m;
                    query_block_range<BM, BN>(st[0] * BN, fresh(0), fresh(1), fresh(5), fresh(6), m_first, n_m);
                    st[3] = n_m * (fresh(2) / fresh(3));
                }
                for (st[2] = 0; st[2] < st[3]; st[2] = st[2] + 1, st[1] = st[1] + 1) {
                    {
                        const int g = st[1], s = g % STAGES;
                        if (g >= STAGES) mbar_wait(q_empty(s), ((g / STAGES) & 1) ^ 1);
                        int m_first, n_m;
                        query_block_range<BM, BN>(st[0] * BN, fresh(0), fresh(1), fresh(5), fresh(6), m_first, n_m);
                        const int it = st[2], hi = it / n_m, mi = it - hi * n_m;
                        const int3 c = sreg_ctaid();
                        st[4] = ((MODE & kModeOrdered)
                                     ? walk_m(mi, m_first, n_m, pivot_of(st[0], fresh(0), fresh(1), fresh(6), m_first))
                                     : m_first + mi) * BM;
                        st[5] = c.z * p.nheads + c.y * (fresh(2) / fresh(3)) + hi;
                        st[6] = s;
                    }
                    {
                        for (int tk = sreg_tid() - 32; tk < 32 * kBytesPerLane; tk += 96) {
                            const int kb = tk % kBytesPerLane, tq = (tk / kBytesPerLane) & 3, cwv = tk / (4 * kBytesPerLane);
                            const u32 cz = (u32)st[5];
                            const u32 jw = (u32)((st[0] * BN + 16 * cwv) >> 3), iw = (u32)(st[4] + 16 * kb + 2 * tq);
                            u64 blk = 0;  // byte t: the keep bits (bit c: key c) of element x = 8 kb + t
#pragma unroll 1
                            for (int t = 0; t < 8; t += NPAR) {  // NPAR independent calls at a time (latency)
                                // (the key words re-read per round of calls: hoisted out of the loop, the 20
                                // round keys would stay live)
                                const u32 k0 = *static_cast<const volatile u32*>(&seed_s[0]);
                                const u32 k1 = *static_cast<const volatile u32*>(&seed_s[1]);
                                Philox4 r[NPAR];
#pragma unroll
                                for (int u = 0; u < NPAR; ++u) {
                                    // element x = 8 kb + tt: n8 tile 2 kb + tt / 4, hh = (tt / 2) % 2, e = tt % 2
                                    const int tt = t + u;
                                    r[u] = Philox4{jw + (u32)((tt >> 1) & 1), iw + (u32)(8 * (tt >> 2) + (tt & 1)), cz,
                                                   (u32)p.rng_offset};
                                }
                                philox4x32_10_n<NPAR>(r, k0, k1);
#pragma unroll
                                for (int u = 0; u < NPAR; ++u) blk |= (u64)dropout_keep_bits8(p, r[u]) << (8 * (t + u));
                            }
                            // 8 x 8 bit transpose (three exchanges of bit pairs, 2 x 2 and 4 x 4 blocks):
                            // byte c, bit t <- byte t, bit c
                            u64 d = (blk ^ (blk >> 7)) & 0x00AA00AA00AA00AAull;
                            blk ^= d ^ (d << 7);
                            d = (blk ^ (blk >> 14)) & 0x0000CCCC0000CCCCull;
                            blk ^= d ^ (d << 14);
                            d = (blk ^ (blk >> 28)) & 0x00000000F0F0F0F0ull;
                            blk ^= d ^ (d << 28);
                            const u32 base = sKeep + st[6] * Tr::kKeepBytes + (u32)((32 * cwv + tq) * (4 * Tr::kKeepWords) + kb);
#pragma unroll
                            for (int cc = 0; cc < 8; ++cc)
                                asm volatile("st.shared.u8 [%0], %1;" ::"r"(base + cc * 16 * Tr::kKeepWords),
                                             "r"((u32)(blk >> (8 * cc)) & 0xffu) : "memory");
                        }
                        mbar_arrive(keep_full(st[6]));
                    }
                }
            }
        }
        return;
    }

    // ---- consumers ---------------------------------------------------------------------------------
    setmaxnreg_inc<kConsumerRegs>();
    // Problem scalars, derived after the register change (nothing stays live across it).
    const int tid = sreg_tid(), lane = tid & 31;
    const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
    const int cw = (warp >> 2) - 1;  // consumer: keys 64 cw .. 64 cw + 63 of the block (kSplitD: all 64 keys,
                                     // queries kQC cw .. + kQC - 1, dK / dV columns kDC cw .. + kDC - 1)
    const int qc0 = kSplitD ? kQC * cw : 0;            // first query column of this consumer's S^T
    const int wrow = 16 * (warp & 3) + (lane >> 2);    // fragment row (half 0) within the 64
    const int tq = lane & 3;                           // fragment column pair
    const int sq = p.seqlen_q, sk = p.seqlen_k;
    const int shift = sk - sq;
    const int wl = p.window_left, wr = p.window_right;
    const int group = p.nheads / p.nheads_k;
    const int sq_pad = (sq + 127) / 128 * 128;
    // (the d64 dropout variants have no softcap / ALiBi, the host routes those runs to bwd_sm80.cu:
    // ptxas spills otherwise)
    const bool transform = !(DROPOUT && D == 64) && (p.softcap > 0.f || p.alibi != nullptr);

    auto release = [&](u32 bar) {  // this warp is done reading a slot
        __syncwarp();
        if ((sm80::opaque(tid) & 31) == 0) mbar_arrive(bar);
    };

    int g = 0;    // steps consumed so far (ring position and phase; dS buffer parity)
    int kbl = 0;  // key blocks consumed so far
    for (int nb = first_kb(); nb * BN < sk; nb += sreg_nctaid_x()) {
        const int n0 = nb * BN;
        const int kw0 = n0 + (kSplitD ? 0 : 64 * cw);  // first key of this consumer
        const int3 cta = sreg_ctaid();
        const int hk = cta.y, b = cta.z;
        int m_first, n_m;
        query_block_range<BM, BN>(n0, sq, sk, wl, wr, m_first, n_m);
        const int n_iter = n_m * group;
        // Ordered deterministic mode: counter (b, h, query block m, part) = additions done on m's rows of
        // that part (p.num_splits parts: 1 or 2; see the header). (Re-read from the parameters and special
        // registers where used: no registers to spare.)
        auto sem_at = [&](int h, int m, int part) {
            return p.counters + (((i64)sreg_ctaid().z * p.nheads + h) * ((p.seqlen_q + BM - 1) / BM) + m) * p.num_splits
                 + part;
        };
        const int pivot = pivot_of(nb, sq, sk, wr, m_first);  // the walk's first query block

        float dv[kDC / 2], dk[kDC / 2];
#pragma unroll
        for (int i = 0; i < kDC / 2; ++i) {
            dv[i] = 0.f;
            dk[i] = 0.f;
        }

        if (n_iter > 0) {
            mbar_wait(kv_full, kbl & 1);
            int hi = 0, mi = 0;
            for (int it = 0; it < n_iter; ++it, ++g) {
                const int h = hk * group + hi;
                const int m0 = step_m(mi, m_first, n_m, pivot) * BM;
                if (++mi == n_m) {
                    mi = 0;
                    ++hi;
                }
                const int s = g % STAGES;
                const u32 sQs = sQ + s * Tr::kQBytes, sdOs = sdO + s * Tr::kQBytes, vec = sVec + s * Tr::kVecBytes;
                mbar_wait(q_full(s), (g / STAGES) & 1);

                // ---- S^T = K_w Q^T, dP^T = V_w dO^T (64 keys x BM queries) ----------------------------
                float sacc[kQC / 2], dpacc[kQC / 2];
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < kKSD; ++ks) {
                    const u32 off = (ks >> 2) * (BN * 128) + (kw0 - n0) * 128 + (ks & 3) * 32;
                    const u32 boff = (ks >> 2) * (BM * 128) + qc0 * 128 + (ks & 3) * 32;
                    Wgmma<T, kQC>::ss(sacc, smem_desc_sw128(sK + off, 16, 1024), smem_desc_sw128(sQs + boff, 16, 1024),
                                     ks > 0);
                }
                wgmma_commit();  // S^T: one group, dP^T the next
#pragma unroll
                for (int ks = 0; ks < kKSD; ++ks) {
                    const u32 off = (ks >> 2) * (BN * 128) + (kw0 - n0) * 128 + (ks & 3) * 32;
                    const u32 boff = (ks >> 2) * (BM * 128) + qc0 * 128 + (ks & 3) * 32;
                    Wgmma<T, kQC>::ss(dpacc, smem_desc_sw128(sV + off, 16, 1024),
                                     smem_desc_sw128(sdOs + boff, 16, 1024), ks > 0);
                }
                wgmma_commit();

                // ---- P^T and dS^T in place (sacc <- P, dpacc <- dS) -----------------------------------
                // Element 4 nt + 2 hh + e: key kw0 + wrow + 8 hh, query m0 + qc0 + 8 nt + 2 tq + e.
                // Masking only where the consumer's keys cross seqlen_k or a causal / window edge of the
                // block's rows (rows past seqlen_q need none: their L is +inf).
                const int right_lim = wr < 0 ? sk - 1 : min(sk - 1, m0 + shift + wr);
                const bool need_mask = kw0 + 63 > right_lim || (wl >= 0 && kw0 < m0 + BM - 1 + shift - wl);
                auto keep = [&](int nt, int hh, int e) {
                    const int ipos = m0 + qc0 + 8 * nt + 2 * tq + e + shift;
                    const int j = kw0 + wrow + 8 * hh;
                    return (wl < 0 || j >= ipos - wl) && j <= (wr < 0 ? sk - 1 : min(sk - 1, ipos + wr));
                };
                u32 pa[kKSP][4], da[kKSP][4];  // 16-bit A fragments of P^T and dS^T
                // The C fragment of two adjacent n8 tiles is the A fragment of one k16 step.
                auto pack = [&](const float (&acc)[kQC / 2], u32 (&frag)[kKSP][4]) {
#pragma unroll
                    for (int ks = 0; ks < kKSP; ++ks)
#pragma unroll
                        for (int j = 0; j < 4; ++j) frag[ks][j] = pack2<T>(acc[8 * ks + 2 * j], acc[8 * ks + 2 * j + 1]);
                };
                auto issue_dv = [&]() {  // dV += P^T dO (64 keys x D, k = BM)
                    if (!(MODE & kModeNoDKV)) {
#pragma unroll
                        for (int ks = 0; ks < kKSP; ++ks)
                            Wgmma<T, kDC>::rs_nmajor_b(dv, pa[ks][0], pa[ks][1], pa[ks][2], pa[ks][3],
                                                     smem_desc_sw128(sdOs + ks * 2048, BM * 128, 1024), 1);
                    }
                };
                auto issue_dk = [&]() {  // dK += dS^T Q
                    if (!(MODE & kModeNoDKV)) {
#pragma unroll
                        for (int ks = 0; ks < kKSP; ++ks)
                            Wgmma<T, kDC>::rs_nmajor_b(dk, da[ks][0], da[ks][1], da[ks][2], da[ks][3],
                                                     smem_desc_sw128(sQs + ks * 2048, BM * 128, 1024), 1);
                    }
                };
                if (!transform && (MODE & kModeOverlap)) {
                    // Overlapped: P = exp2(..) as soon as S^T is done (dP^T may still run), dV issued;
                    // dS once dP^T is done (dV may still run), dK issued.
                    wgmma_wait<1>();
                    fence_regs<kQC / 2>(sacc);
                    auto probs = [&](auto masked) {
                        constexpr bool M = decltype(masked)::value;
                        const float sl2 = p.scale_log2;
#pragma unroll
                        for (int nt = 0; nt < kNT; ++nt) {
                            const float2 l2 = lds_f32x2(vec + 4 * (qc0 + 8 * nt + 2 * tq));
#pragma unroll
                            for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                                for (int e = 0; e < 2; ++e) {
                                    const int x = 4 * nt + 2 * hh + e;
                                    float arg = fmaf(sacc[x], sl2, -(e ? l2.y : l2.x));
                                    if (M) arg = keep(nt, hh, e) ? arg : -INFINITY;
                                    sacc[x] = ex2(arg);
                                }
                        }
                    };
                    if (need_mask) probs(BoolC<true>{});
                    else probs(BoolC<false>{});
                    pack(sacc, pa);
                    wgmma_fence();
                    issue_dv();
                    wgmma_commit();
                    wgmma_wait<1>();  // dP^T (older than dV) is done
                    fence_regs<kQC / 2>(dpacc);
#pragma unroll
                    for (int nt = 0; nt < kNT; ++nt) {
                        const float2 d2 = lds_f32x2(vec + 4 * BM + 4 * (qc0 + 8 * nt + 2 * tq));
#pragma unroll
                        for (int hh = 0; hh < 2; ++hh) {
                            {
                                // P from its 16-bit A fragment (as bwd_sm80 reads it back): sacc is dead
                                // here, which keeps the registers of this phase within the budget
                                float p0, p1;
                                unpack2<T>(pa[nt >> 1][2 * (nt & 1) + hh], p0, p1);
                                const int x = 4 * nt + 2 * hh;
                                dpacc[x] = p0 * (dpacc[x] - d2.x);
                                dpacc[x + 1] = p1 * (dpacc[x + 1] - d2.y);
                            }
                        }
                    }
                    pack(dpacc, da);
                    wgmma_fence();
                    issue_dk();
                    wgmma_commit();
                } else {
                    wgmma_wait<0>();
                    fence_regs<kQC / 2>(sacc);
                    fence_regs<kQC / 2>(dpacc);
                    // Dropout (Z: keep mask, r = 1 / (1 - p)): dS = P (Z r dP - D), dV += P Z dO (r applied in
                    // the epilogue). Z r folds into dP before the softmax loop (unchanged, so that its
                    // register budget is that of p = 0) and Z into the 16-bit P operand after it. The keep
                    // bits: this thread's words of the slot (RNG warps; bit x: element x), address re-derived
                    // from the thread index at each load (nothing held across the loops).
                    auto keep_words = [&](u32 (&w)[Tr::kKeepWords]) {
                        const u32 a = sKeep + s * Tr::kKeepBytes + (u32)(sm80::opaque(tid) - 128) * (4 * Tr::kKeepWords);
                        if constexpr (Tr::kKeepWords == 2) {
                            asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];" : "=r"(w[0]), "=r"(w[Tr::kKeepWords - 1]) : "r"(a) : "memory");
                        } else {
                            w[0] = sm80::lds_u32(a);
                        }
                    };
                    if constexpr (DROPOUT) {
                        mbar_wait(keep_full(s), (g / STAGES) & 1);
                        u32 w[Tr::kKeepWords];
                        keep_words(w);
                        const float r = p.dropout_scale;
#pragma unroll
                        for (int x = 0; x < kQC / 2; ++x) dpacc[x] = (w[x >> 5] >> (x & 31)) & 1u ? dpacc[x] * r : 0.f;
                    }
                    if (!transform) {
                        auto plain = [&](auto masked) {
                            constexpr bool M = decltype(masked)::value;
                            const float sl2 = p.scale_log2;
#pragma unroll
                            for (int nt = 0; nt < kNT; ++nt) {
                                const float2 l2 = lds_f32x2(vec + 4 * (qc0 + 8 * nt + 2 * tq));
                                const float2 d2 = lds_f32x2(vec + 4 * BM + 4 * (qc0 + 8 * nt + 2 * tq));
#pragma unroll
                                for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                                    for (int e = 0; e < 2; ++e) {
                                        const int x = 4 * nt + 2 * hh + e;
                                        float arg = fmaf(sacc[x], sl2, -(e ? l2.y : l2.x));
                                        if (M) arg = keep(nt, hh, e) ? arg : -INFINITY;
                                        const float pr = ex2(arg);
                                        sacc[x] = pr;
                                        dpacc[x] = pr * (dpacc[x] - (e ? d2.y : d2.x));
                                    }
                            }
                        };
                        if (need_mask) plain(BoolC<true>{});
                        else plain(BoolC<false>{});
                    } else {  // softcap and / or ALiBi (uniform branches); the mask is always evaluated
                        // (opaque: recomputed per step rather than hoisted and held across the loop)
                        const float softcap = __int_as_float(sm80::opaque(__float_as_int(p.softcap)));
                        const bool cap = softcap > 0.f;
                        const float cap_in = cap ? p.scale / softcap : 0.f, cap_out = softcap * CUFLASH_LOG2E;
                        const float slope2 =
                            p.alibi == nullptr ? 0.f : p.alibi[(i64)b * p.alibi_batch_stride + h] * CUFLASH_LOG2E;
#pragma unroll
                        for (int nt = 0; nt < kNT; ++nt) {
                            const float2 l2 = lds_f32x2(vec + 4 * (qc0 + 8 * nt + 2 * tq));
                            const float2 d2 = lds_f32x2(vec + 4 * BM + 4 * (qc0 + 8 * nt + 2 * tq));
#pragma unroll
                            for (int hh = 0; hh < 2; ++hh)
#pragma unroll
                                for (int e = 0; e < 2; ++e) {
                                    const int x = 4 * nt + 2 * hh + e;
                                    const float raw = sacc[x];
                                    float t = 0.f, sc;
                                    if (cap) {
                                        t = sm80::tanh_abs_accurate(raw * cap_in);
                                        sc = cap_out * t;
                                    } else {
                                        sc = raw * p.scale_log2;
                                    }
                                    // |i + shift - j|
                                    const int rel = m0 + qc0 + 8 * nt + 2 * tq + e + shift - (kw0 + wrow + 8 * hh);
                                    sc = fmaf(-slope2, fabsf((float)rel), sc);
                                    const float pr = ex2(keep(nt, hh, e) ? sc - (e ? l2.y : l2.x) : -INFINITY);
                                    sacc[x] = pr;
                                    dpacc[x] = pr * (dpacc[x] - (e ? d2.y : d2.x)) * fmaf(-t, t, 1.f);
                                }
                        }
                    }
                    if constexpr (kSplitD) {
                        // P^T and dS^T -> shared memory: this consumer's query columns of the step's buffers
                        // (row = key wrow + 8 hh, 16-byte unit qc0 / 8 + nt, 128-byte swizzle); once both
                        // consumers' halves are there, dV += P^T dO and dK += dS^T Q on this consumer's
                        // kDC columns, A K-major from the buffers
                        const u32 dsb = sdS + (g & 1) * Tr::kDSBytes, pb = sP + (g & 1) * Tr::kDSBytes;
#pragma unroll
                        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                            for (int hh = 0; hh < 2; ++hh) {
                                const u32 o = (wrow + 8 * hh) * 128 + ((((qc0 >> 3) + nt) ^ (lane >> 2)) << 4) + 4 * tq;
                                sm80::sts_u32(pb + o, pack2<T>(sacc[4 * nt + 2 * hh], sacc[4 * nt + 2 * hh + 1]));
                                sm80::sts_u32(dsb + o, pack2<T>(dpacc[4 * nt + 2 * hh], dpacc[4 * nt + 2 * hh + 1]));
                            }
                        fence_proxy_async();
                        named_bar_sync(kBarDS, 256);
                        if (!(MODE & kModeNoDKV)) {
                            const u32 half = cw * (kDC / 64) * (BM * 128);  // this consumer's 64-column blocks
                            wgmma_fence();
#pragma unroll
                            for (int ks = 0; ks < kKSM; ++ks)
                                Wgmma<T, kDC>::ss_nmajor_b(dv, smem_desc_sw128(pb + ks * 32, 16, 1024),
                                                           smem_desc_sw128(sdOs + half + ks * 2048, BM * 128, 1024), 1);
#pragma unroll
                            for (int ks = 0; ks < kKSM; ++ks)
                                Wgmma<T, kDC>::ss_nmajor_b(dk, smem_desc_sw128(dsb + ks * 32, 16, 1024),
                                                           smem_desc_sw128(sQs + half + ks * 2048, BM * 128, 1024), 1);
                            wgmma_commit();
                        }
                    } else {
                    pack(sacc, pa);
                    pack(dpacc, da);
                    if constexpr (DROPOUT) {  // dV's operand P Z: the dropped halves of the pairs zeroed
                        u32 w[Tr::kKeepWords];
                        keep_words(w);
#pragma unroll
                        for (int ks = 0; ks < kKSP; ++ks)
#pragma unroll
                            for (int j = 0; j < 4; ++j) {  // the pair x, x + 1 (x = 8 ks + 2 j, even)
                                const int x = 8 * ks + 2 * j;
                                const u32 b2 = w[x >> 5] >> (x & 31);
                                pa[ks][j] &= ((b2 & 1u) ? 0x0000ffffu : 0u) | ((b2 & 2u) ? 0xffff0000u : 0u);
                            }
                    }
                    wgmma_fence();
                    issue_dv();
                    issue_dk();
                    wgmma_commit();
                    }
                }

                float dq[kNQ / 2];
                if (!(MODE & kModeNoDQ)) {
                    // ---- dS^T -> shared memory: row = key (64 cw + wrow + 8 hh), 64-query blocks ------------
                    // (kSplitD: stored above, before dK)
                    const u32 dsb = sdS + (g & 1) * Tr::kDSBytes;
                    if constexpr (!kSplitD) {
#pragma unroll
                    for (int ks = 0; ks < kKSP; ++ks)
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            const int nt = 2 * ks + (j >> 1), hh = j & 1;
                            const int r = 64 * cw + wrow + 8 * hh;
                            const u32 addr = dsb + (nt >> 3) * (BN * 128) + r * 128 + (((nt & 7) ^ (lane >> 2)) << 4) + 4 * tq;
                            sm80::sts_u32(addr, da[ks][j]);
                        }
                    fence_proxy_async();
                    named_bar_sync(kBarDS, 256);
                    }
                    // ---- dQ = dS K (64 query rows x kNQ columns of this consumer, k = BN keys) ------------
                    const u32 abase = dsb + (Tr::kDQByRows ? cw * (BN * 128) : 0);
                    const u32 bbase = sK + (Tr::kDQByRows ? 0 : cw * (kNQ / 64) * (BN * 128));
                    wgmma_fence();
#pragma unroll
                    for (int ks = 0; ks < kKSN; ++ks)
                        Wgmma<T, kNQ>::ss_mnmajor(dq, smem_desc_sw128(abase + ks * 2048, BN * 128, 1024),
                                                  smem_desc_sw128(bbase + ks * 2048, BN * 128, 1024), ks > 0);
                    wgmma_commit();
                }
                wgmma_wait<0>();
                fence_regs<kDC / 2>(dv);
                fence_regs<kDC / 2>(dk);
                if constexpr (!kSplitD) {
                    fence_regs<kKSP * 4>(&pa[0][0]);
                    fence_regs<kKSP * 4>(&da[0][0]);
                }
                if (!(MODE & kModeNoDQ)) fence_regs<kNQ / 2>(dq);
                release(q_empty(s));

                // Ordered deterministic mode (the host passes counters with kModeOrdered only). A run-time
                // test: as a compile-time one (the code gone from MODE 0), ptxas (NVRTC 13.0) spills 8 - 12
                // bytes in the MODE 0 dropout variants.
                const bool ordered = p.deterministic && p.counters != nullptr;
                // ordered: the dq_accum plane of this step (1: a lower-part visit with two planes)
                const int part = ordered && p.num_splits == 2 && m0 < pivot * BM ? 1 : 0;
                if (kHelper) {
                    mbar_wait(turn(g & 1), (g >> 1) & 1);  // the hand-over thread saw this block's turn
                } else if (ordered) {  // ordered deterministic mode: this key block's turn on these rows
                    if (sreg_tid() == 128) {
                        int pt, rank;
                        ordered_turn<BM, BN>(nb, m0 / BM, sreg_nctaid_x(), sq, sk, wr, p.num_splits == 2, pt, rank);
                        sem_wait(sem_at(h, m0 / BM, pt), rank);
                    }
                    named_bar_sync(kBarSem, 256);
                }
                if (!(MODE & (kModeNoDQ | kModeNoRed))) {
                    // ---- dQ -> dq_accum: lane pairs (tq, tq ^ 1) swap halves for 16-byte reductions ---------
                    // even tq: row wrow, columns 4 (tq / 2) .. + 3 of each n8 tile; odd tq: row wrow + 8.
                    const int ft = sm80::opaque(tid);  // lane math recomputed here, not held across the loop
                    const bool odd = ft & 1;
                    const int row = m0 + (Tr::kDQByRows ? 64 * cw : 0) + 16 * (warp & 3) + ((ft & 31) >> 2) + (odd ? 8 : 0);
                    float* dst = p.dq_accum + (ordered ? part * (i64)p.batch * p.nheads * sq_pad * D
                                                       : p.num_splits > 1 ? (i64)sreg_ctaid_x() * p.batch * p.nheads * sq_pad * D : (i64)0)
                               + (((i64)b * p.nheads + h) * sq_pad + row) * D + (Tr::kDQByRows ? 0 : kNQ * cw) + 4 * ((ft & 3) >> 1);
#pragma unroll
                    for (int nt = 0; nt < kNQ / 8; ++nt) {
                        const float x0 = odd ? dq[4 * nt + 0] : dq[4 * nt + 2];
                        const float x1 = odd ? dq[4 * nt + 1] : dq[4 * nt + 3];
                        const float y0 = __shfl_xor_sync(0xffffffffu, x0, 1);
                        const float y1 = __shfl_xor_sync(0xffffffffu, x1, 1);
                        if (odd) red_add_v4(dst + 8 * nt, y0, y1, dq[4 * nt + 2], dq[4 * nt + 3]);
                        else red_add_v4(dst + 8 * nt, dq[4 * nt + 0], dq[4 * nt + 1], y0, y1);
                    }
                }
                if (kHelper) {  // this warp's additions are issued: the hand-over thread releases them
                    __syncwarp();
                    if ((sm80::opaque(tid) & 31) == 0) mbar_arrive(done(g & 1));
                } else if (ordered) {  // the hand-over: every consumer thread's reductions, then one release
                    named_bar_sync(kBarSem, 256);
                    if (sreg_tid() == 128) red_release_add(sem_at(h, m0 / BM, part), 1);
                }
            }
            release(kv_empty);  // the last step's MMAs (the last to read K and V) have retired
            ++kbl;
        }

        // ---- epilogue: dK * scale and dV in T, straight from the fragments ------------------------------
        {
            const float sc = p.scale, dvs = DROPOUT ? p.dropout_scale : 1.f;  // dV = r sum P Z dO
            const int hd = p.headdim;
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int j = kw0 + wrow + 8 * hh;
                if (j < sk) {
                    T* dkr = (T*)p.dk + (i64)b * p.dk_batch_stride + (i64)hk * p.dk_head_stride + (i64)j * p.dk_row_stride;
                    T* dvr = (T*)p.dv + (i64)b * p.dv_batch_stride + (i64)hk * p.dv_head_stride + (i64)j * p.dv_row_stride;
#pragma unroll
                    for (int nt = 0; nt < kDC / 8; ++nt) {
                        const int col = (kSplitD ? kDC * cw : 0) + 8 * nt + 2 * tq;
                        if (col < hd) {  // head dims are multiples of 8 here: the pair is whole
                            stg_u32(dkr + col, pack2<T>(dk[4 * nt + 2 * hh] * sc, dk[4 * nt + 2 * hh + 1] * sc));
                            stg_u32(dvr + col, pack2<T>(dv[4 * nt + 2 * hh] * dvs, dv[4 * nt + 2 * hh + 1] * dvs));
                        }
                    }
                }
            }
        }
    }
}

}  // namespace cuflash
