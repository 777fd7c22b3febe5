// fwd_sm90.cu: the Hopper FlashAttention forward (sm_90a) for fp16 / bf16: wgmma, TMA, mbarrier
// pipelines and warp specialisation.
//
// One block of 384 threads computes 128 query rows of one (batch, head), three warpgroups:
//
//   * Producer (warpgroup 0, one elected thread; setmaxnreg gives its registers away): TMA loads of
//     the Q tile (once) and of K and V tiles into a ring of STAGES shared-memory slots each. Every
//     slot has a "full" mbarrier (completed by the TMA bytes) and an "empty" one (8 arrivals: one per
//     consumer warp once its MMAs have read the slot). K and V have separate barriers, so that a K
//     slot is refilled as soon as S = Q K^T has read it, before P V is done with the V slot.
//   * Two consumers (warpgroups 1 and 2, 240 registers each), 64 query rows each. Per key tile j:
//       S(j) = Q K(j)^T   wgmma, A = Q and B = K from shared memory (K-major, 128-byte swizzle),
//       O += P(j-1) V(j-1) issued right behind it: P from registers as the A operand, V N-major,
//       then the softmax of S(j) (SCHED picks the order and waits, see kSched*); O is rescaled by the
//       new row maxima once P(j-1) V(j-1) has retired, or (the "late" schedules, the d64 / d128 / d256
//       default) in the next turn, between the issue of S(j+1) and that of P(j) V(j). Only schedule 5
//       (d64, d128) really runs the softmax beside the warpgroup's own P V (see kSchedOverlapPinned).
//     Under a causal mask or right window a warpgroup skips the block's leading key tiles that hold no
//     key for any of its rows (it takes its turns and releases their slots).
//     PINGPONG: the two consumers take turns issuing their MMAs (named barriers 1 and 2), so that one
//     warpgroup's softmax overlaps the other's MMAs.
//   * Shared memory: Q (128 x D) and the K / V slots (BN x D), each stored as D / 64 column blocks of
//     rows x 128 bytes in the 128-byte swizzle that TMA writes and wgmma reads. The output is staged
//     in the consumer's own rows of the Q tile and written by TMA (rows past seqlen_q and columns past
//     headdim are clipped by the tensor map); the LSE straight from registers.
//   * Masks, softcap, ALiBi, GQA as in the other paths (score transform as in fwd_sm80.cu: plain scores
//     stay raw with scale * log2(e) folded into exp2; softcap / ALiBi / non-positive scale turn them
//     into log2-domain values first). Key tiles are visited last to first; only tiles that cross a
//     row's window edge or seqlen_k run the mask. Head dims pad to the bucket D (TMA zero-fills the
//     columns past headdim; the store clips them).
//
//   * DROPOUT (the variants for Params::dropout_p > 0; false compiles it out): the keep bits of a tile
//     are drawn after its softmax (philox.cuh's DropoutFrag: the wgmma accumulator holds, per warp and
//     n8 tile, the same 16 x 8 C fragment as mma.sync m16n8, so the quad-shared Philox calls of the
//     sm80 path apply unchanged) and zero the dropped entries of the 16-bit P operand of O += P V; the
//     row sums and the LSE stay those of the undropped softmax, and 1 / (1 - p) joins 1 / l at the end.
//     The key tile must hold a multiple of 32 keys (BN = 128, 96, 64: the host picks such a tile).
//
// Not here (the host routes these to fwd_sm80.cu): split-KV, packed GQA for decoding.
//
// Probes, for measurements only (set through CUFLASH_NVRTC_DEFINES; the results are wrong): with
// CUFLASH_SM90_PROBE_NOKV the producer marks the K / V slots full without loading them (no L2 / HBM traffic
// for K and V); with CUFLASH_SM90_PROBE_NOSOFTMAX the softmax is skipped (the scores go to P as they are).
// benchmarks/probe_fwd_sm90.sh times them.
#include "mask.cuh"
#include "philox.cuh"
#include "mma.cuh"
#include "sm90.cuh"
#include "wgmma_ops.cuh"

namespace cuflash {
namespace sm90 {

// The tensor maps of one launch (cuflash/_tma.py encodes them; second kernel parameter).
struct TmaMaps {
    TmaDesc q, k, v, o;
};

// PERSIST: 0 one block per work tile; 1 or 2 persistent blocks with that many Q buffers asked for (see
// kQBufs).
template <int D, int BN, int STAGES, int NWG, int PERSIST>
struct Sm90FwdTraits {
    static constexpr int kBM = 64 * NWG;            // NWG consumer warpgroups x 64 rows
    static constexpr int kThreads = 128 * (NWG + 1);  // producer + consumers
    // setmaxnreg: the producer keeps 24 registers, the consumers share the rest of the 64K file.
    // (a persistent producer walks the tile schedule too: 24 registers would spill)
    static constexpr int kProducerRegs = NWG == 2 ? (PERSIST ? 40 : 24) : 32;
    static constexpr int kConsumerRegs = NWG == 2 ? (PERSIST ? 232 : 240) : 160;
    static constexpr int kChunks = D / 64;          // 64-column (128-byte) swizzle blocks
    static constexpr int kQBytes = kBM * D * 2;
    static constexpr int kKVBytes = BN * D * 2;
    static constexpr int kRingBytes = 2 * STAGES * kKVBytes;
    // Q buffers: a persistent block with two (when they fit beside an output buffer) has the producer
    // load the next work tile's Q as soon as it has claimed that tile, while this one still computes, so
    // that Q's latency does not fall between the tiles; with one, the next Q can only load once this
    // tile's last Q K^T has read the buffer.
    static constexpr int kQBufs = PERSIST >= 2 && 1024 + 3 * kQBytes + kRingBytes <= 227 * 1024 ? 2 : 1;
    // + 1024: the dynamic window is aligned up to 1024 bytes (swizzle atoms) at run time.
    static constexpr int kBaseBytes = 1024 + kQBufs * kQBytes + kRingBytes;
    // The output is staged in a buffer of its own when it fits (a persistent block then loads the next
    // Q tile while this one's output is stored), else in the Q tile.
    static constexpr bool kOwnO = kBaseBytes + kQBytes <= 227 * 1024;
    static constexpr int kSmemBytes = kBaseBytes + (kOwnO ? kQBytes : 0);
    // q_full[], q_empty[], k_full[], v_full[], k_empty[], v_empty[], tile_full[2], tile_empty[2]
    static constexpr int kBars = 2 * kQBufs + 4 * STAGES + 4;
    static_assert(NWG == 2 || NWG == 3, "two or three consumer warpgroups");
    static_assert(D % 64 == 0 && D >= 64 && D <= 256, "head-dim bucket must be 64, 128, 192 or 256");
    static_assert(BN % 16 == 0 && BN >= 16 && BN <= 256, "key tile must be a multiple of 16, at most 256");
    static_assert(STAGES >= 2, "at least two slots per ring");
    static_assert(PERSIST >= 0 && PERSIST <= 2, "PERSIST: 0, 1 or 2");
    // The pool setmaxnreg redistributes is what the launch allocated: the launch-bounds register count
    // (65536 / threads, rounded down to a multiple of 8) per thread; asking for more waits forever.
    static_assert(kProducerRegs * 128 + NWG * 128 * kConsumerRegs <= ((65536 / kThreads) & ~7) * kThreads,
                  "register pool");
    static_assert(kSmemBytes <= 227 * 1024, "shared memory above the sm90 per-block limit");
};

constexpr int kBarPingPong = 1;  // named barriers 1 .. NWG: consumer turns
// Consumer schedules (SCHED), for one key tile j of the steady state:
constexpr int kSchedSerial = 0;   // O += P(j-1) V(j-1); wait; S(j) = Q K(j)^T; wait; softmax(j)
constexpr int kSchedOverlap = 1;  // S(j), O += P(j-1) V(j-1); wait S(j); softmax(j) beside P V; wait
constexpr int kSchedBatched = 2;  // O += P(j-1) V(j-1), S(j) in one commit group; wait; softmax(j)
// 3, 4: overlap, batched with O's rescale by tile j - 1's maxima deferred to turn j, between the issue of
// S(j) and that of P(j-1) V(j-1) (while S(j) is in the tensor cores) instead of after the softmax.
constexpr int kSchedOverlapLate = 3;
constexpr int kSchedBatchedLate = 4;
// 5: 3 with the wait for P(j-1) V(j-1) held behind the softmax of S(j). Without it ptxas hoists that wait
// (wgmma.wait_group 0) to the top of the softmax, so that the softmax never runs beside the warpgroup's own
// P V (seen in the SASS of 3: WARPGROUP.DEPBAR.LE gsb0, 0x0 before the first MUFU.EX2; Nsight Compute put
// 10% of the d128 kernel's stall samples on it). It keeps P(j-1) and S(j) live together: d128 fits, d256
// (O alone is 128 registers) spills.
constexpr int kSchedOverlapPinned = 5;
constexpr int kBarEpilogue = 8;  // named barriers 8 .. 8 + NWG - 1: one per consumer warpgroup

// Key tiles visited for the query rows m0 .. m0 + bm - 1: nb_hi - 1 down to nb_lo (any row of the block
// keeps a key in them; first_key / last_key are non-decreasing in the query). The scalars come from the
// caller: the producer and the consumers read them differently (see there).
template <int BN>
__device__ __forceinline__ void key_tile_range(int m0, int bm, int sq, int sk, int wl, int wr, int& nb_lo, int& nb_hi) {
    const int shift = sk - sq;
    const int i_last = min(m0 + bm, sq) - 1;
    const int key_lo = wl < 0 ? 0 : max(0, m0 + shift - wl);
    const int key_hi = wr < 0 ? sk - 1 : min(sk - 1, i_last + shift + wr);  // inclusive
    nb_lo = key_lo / BN;
    nb_hi = key_hi < key_lo ? nb_lo : key_hi / BN + 1;
}

// Work tile t (0 .. num_tiles - 1) -> query block and (batch, head): head-major, and within a head
// the query blocks last to first (for causal masks the heaviest first). Consecutive tiles share K / V
// (L2 reuse), and the lightest tiles of the last head come last. The blocks are aligned to the end of
// the sequence, rounded up to 64 rows: block r (0 = the last) holds rows e - (r + 1) bm .. e - r bm - 1
// with e = seqlen_q rounded up to a multiple of 64. So when bm does not divide e, the partial block is
// the first one, the lightest under a causal mask, and the warpgroups of its rows before 0 (whole 64-row
// slices) load and compute nothing; no TMA copy has a negative coordinate.
struct TileCoord {
    int m0, h, b;
};
// (Unsigned arithmetic: shorter divisions, and the producer has few registers.)
__device__ __forceinline__ TileCoord tile_coord(int t, int num_m, int nheads, int bm, int sq) {
    const u32 bh = (u32)t / (u32)num_m;
    const int r = (int)((u32)t - bh * (u32)num_m);
    return TileCoord{(int)(((u32)sq + 63u) & ~63u) - (r + 1) * bm, (int)(bh % (u32)nheads), (int)(bh / (u32)nheads)};
}

}  // namespace sm90

// PERSIST (> 0): gridDim.x = min(tiles, SMs) blocks loop over work tiles; the first is blockIdx.x, the next
// ones come from an atomic counter (Params::counters[0], zeroed by the host before the launch), claimed
// by the producer once it has issued the current tile's loads and handed to the consumers through
// shared memory (tile_full / tile_empty mbarriers). The producer runs ahead into the next tile (its
// K / V and, once free, its Q) while the consumers finish the current one; the output of one tile is
// stored (TMA, asynchronous) while the next one computes; with two Q buffers (PERSIST = 2, where they
// fit) the next tile's Q is loaded as soon as the tile is claimed. PERSIST = 0: one block per tile.
template <typename T, int D, int BN, int STAGES, int NWG, bool PINGPONG, int SCHED, int PERSIST,
          bool DROPOUT = false>
__global__ void __launch_bounds__(128 * (NWG + 1), 1)
fwd_sm90(const __grid_constant__ Params p, const __grid_constant__ sm90::TmaMaps maps) {
    using namespace sm90;
    using sm80::ex2;
    using sm80::smem_addr;
    using Tr = Sm90FwdTraits<D, BN, STAGES, NWG, PERSIST>;
    constexpr int kBM = Tr::kBM;
    constexpr int kNT = BN / 8;   // n8 tiles of the score fragment
    constexpr int kKS = D / 16;   // k-steps of S = Q K^T
    constexpr int kPS = BN / 16;  // k-steps of O += P V
    constexpr int kConsumerWarps = 4 * NWG;
    constexpr bool kLate = SCHED == kSchedOverlapLate || SCHED == kSchedBatchedLate || SCHED == kSchedOverlapPinned;
    static_assert(!DROPOUT || kNT % 4 == 0, "dropout: the quad splits the n8 tiles four ways (BN % 32 == 0)");
    extern __shared__ __align__(1024) unsigned char smem[];
    __shared__ __align__(8) u64 bars[Tr::kBars];
    __shared__ int tile_slot[2];
    // seqlen_q, seqlen_k, nheads, nheads_k, batch, window_left, window_right: the producer re-reads them
    // from here per tile (see below).
    __shared__ int shape_s[7];

    require_dynamic_smem(Tr::kSmemBytes);  // (the window is aligned up to 1024 bytes below)
    const u32 sQ = (smem_addr(smem) + 1023u) & ~1023u;
    const u32 sK = sQ + Tr::kQBufs * Tr::kQBytes;
    const u32 sV = sK + STAGES * Tr::kKVBytes;
    const u32 sO = Tr::kOwnO ? sV + STAGES * Tr::kKVBytes : sQ;
    const u32 bar0 = smem_addr(bars);
    constexpr int kQB = Tr::kQBufs;
    auto q_full = [&](int i) { return bar0 + 8u * i; };
    auto q_empty = [&](int i) { return bar0 + 8u * (kQB + i); };
    auto k_full = [&](int s) { return bar0 + 8u * (2 * kQB + s); };
    auto v_full = [&](int s) { return bar0 + 8u * (2 * kQB + STAGES + s); };
    auto k_empty = [&](int s) { return bar0 + 8u * (2 * kQB + 2 * STAGES + s); };
    auto v_empty = [&](int s) { return bar0 + 8u * (2 * kQB + 3 * STAGES + s); };
    auto tile_full = [&](int s) { return bar0 + 8u * (2 * kQB + 4 * STAGES + s); };
    auto tile_empty = [&](int s) { return bar0 + 8u * (2 * kQB + 4 * STAGES + 2 + s); };

    // warp and warpgroup through a shuffle: provably warp-uniform for the compiler, which otherwise
    // treats every branch on them as divergent and serialises the wgmma inside.
    const int wg = __shfl_sync(0xffffffffu, (int)threadIdx.x >> 7, 0);
    if (threadIdx.x == 0) {
        store_shape(shape_s, p);
        for (int i = 0; i < kQB; ++i) {
            mbar_init(q_full(i), 1);
            mbar_init(q_empty(i), kConsumerWarps);  // one arrival per consumer warp once Q is no longer read
        }
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(k_full(s), 1);
            mbar_init(v_full(s), 1);
            mbar_init(k_empty(s), kConsumerWarps);
            mbar_init(v_empty(s), kConsumerWarps);
        }
        for (int s = 0; s < 2; ++s) {
            mbar_init(tile_full(s), 1);
            mbar_init(tile_empty(s), kConsumerWarps);
        }
        mbar_init_fence();
    }
    __syncthreads();

    if (wg == 0) {
        // ---- producer ---------------------------------------------------------------------------------
        setmaxnreg_dec<Tr::kProducerRegs>();
        if (sreg_tid() == 0) {
            // The producer keeps only its counters across tiles (32 - 40 registers): the problem
            // scalars are re-read per tile from a copy in shared memory (volatile, so that the
            // compiler neither hoists nor spills them; a volatile read of the __grid_constant__
            // parameter itself is lowered by NVRTC 13.0 to a generic load from the wrong address).
            auto fresh = [&](int i) { return *static_cast<const volatile int*>(&shape_s[i]); };
            prefetch_tma_desc(&maps.q);
            prefetch_tma_desc(&maps.k);
            prefetch_tma_desc(&maps.v);
            int g = 0;   // K / V tiles loaded so far (ring position and phase)
            int qt = 0;  // Q tiles loaded so far
            int tile = sreg_ctaid_x();
            for (int n = 0;; ++n) {
                if (PERSIST) {  // hand the tile to the consumers
                    if (n >= 2) mbar_wait(tile_empty(n & 1), ((n >> 1) - 1) & 1);
                    tile_slot[n & 1] = tile;
                    mbar_arrive(tile_full(n & 1));  // release: the slot write is visible to the waiters
                }
                const int sq = fresh(0), sk = fresh(1), nheads = fresh(2);
                const int num_m = (int)((u32)(sq + kBM - 1) / kBM);
                if ((u32)tile >= (u32)num_m * (u32)nheads * (u32)fresh(4)) break;
                const TileCoord tc = tile_coord(tile, num_m, nheads, kBM, sq);
                const int hk = (int)((u32)tc.h / (u32)(nheads / fresh(3)));
                int nb_lo, nb_hi;
                key_tile_range<BN>(tc.m0, kBM, sq, sk, fresh(5), fresh(6), nb_lo, nb_hi);
                auto load_q = [&]() {  // into buffer qt % kQB once the consumers are done with its last tile
                    const int qb = kQB == 1 ? 0 : qt & 1;
                    if (qt >= kQB) mbar_wait(q_empty(qb), ((qt / kQB) - 1) & 1);
                    // 64 rows per consumer warpgroup; a warpgroup before row 0 (it computes nothing) gets
                    // rows 0 .. 63 instead, never read (no negative coordinate; a fixed byte count)
                    mbar_arrive_expect_tx(q_full(qb), Tr::kQBytes);
#pragma unroll
                    for (int w = 0; w < NWG; ++w)
#pragma unroll
                        for (int c = 0; c < Tr::kChunks; ++c)
                            tma_load_4d(sQ + qb * Tr::kQBytes + c * (kBM * 128) + w * (64 * 128), &maps.q, c * 64,
                                        tc.h, max(tc.m0 + 64 * w, 0), tc.b, q_full(qb));
                    ++qt;
                };
                if (kQB > 1 && nb_hi > nb_lo) load_q();  // its buffer was freed a tile ago
                for (int it = 0; it < nb_hi - nb_lo; ++it, ++g) {
                    const int s = g % STAGES;
                    const u32 ph = (g / STAGES) & 1;
                    const int k0 = (nb_hi - 1 - it) * BN;
                    if (g >= STAGES) mbar_wait(k_empty(s), ph ^ 1);
#ifdef CUFLASH_SM90_PROBE_NOKV
                    mbar_arrive(k_full(s));
#else
                    mbar_arrive_expect_tx(k_full(s), Tr::kKVBytes);
#pragma unroll
                    for (int c = 0; c < Tr::kChunks; ++c)
                        tma_load_4d(sK + s * Tr::kKVBytes + c * (BN * 128), &maps.k, c * 64, hk, k0, tc.b, k_full(s));
#endif
                    // One Q buffer: Q behind the first K tile, which may already stream while Q frees up.
                    if (kQB == 1 && it == 0) load_q();
                    if (g >= STAGES) mbar_wait(v_empty(s), ph ^ 1);
#ifdef CUFLASH_SM90_PROBE_NOKV
                    mbar_arrive(v_full(s));
#else
                    mbar_arrive_expect_tx(v_full(s), Tr::kKVBytes);
#pragma unroll
                    for (int c = 0; c < Tr::kChunks; ++c)
                        tma_load_4d(sV + s * Tr::kKVBytes + c * (BN * 128), &maps.v, c * 64, hk, k0, tc.b, v_full(s));
#endif
                }
                if (!PERSIST) break;
                // The next tile is claimed only now, with this one's loads issued (the consumers are at
                // most STAGES key tiles behind): claimed earlier, the choice would run a whole tile
                // ahead of the work and hand out tiles round-robin, blind to how long each takes
                // (measured: causal 16k 5-10% slower that way than one block per tile).
                tile = atomicAdd(p.counters, 1) + sreg_nctaid_x();
            }
        }
        return;
    }

    // ---- consumers ---------------------------------------------------------------------------------
    setmaxnreg_inc<Tr::kConsumerRegs>();
    // Problem scalars, derived inside each role (after its setmaxnreg: a value live across the register
    // count change would be spilled).
    const int sq = p.seqlen_q, sk = p.seqlen_k;
    const int shift = sk - sq;  // query i sits at key position i + shift (bottom-right alignment)
    const int wl = p.window_left, wr = p.window_right;
    const int num_m = (sq + kBM - 1) / kBM;
    const int num_tiles = num_m * p.nheads * p.batch;
    const int tid = sreg_tid(), lane = tid & 31;  // re-derived: nothing stays live across setmaxnreg
    const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
    const int cw = (warp >> 2) - 1;                                // consumer index: rows 64 cw .. 64 cw + 63
    const int wrow = 16 * (warp & 3) + (lane >> 2);       // fragment row (half 0) within the 64
    const int tq = lane & 3;                              // fragment column pair
    const bool transform = p.softcap > 0.f || p.alibi != nullptr || !(p.scale_log2 > 0.f);
    const float mult = transform ? 1.f : p.scale_log2;
    // Rows of this warpgroup in the O tile (and, per work tile, in its Q buffer): column block c at
    // base + c * kBM * 128 + 64 cw * 128.
    const u32 o_base = sO + 64 * cw * 128;

    auto release = [&](u32 bar) {  // this warp is done reading a slot
        __syncwarp();
        if (lane == 0) mbar_arrive(bar);
    };
    // PINGPONG: the consumers issue their MMAs in turns, 0, 1, .., NWG - 1, 0, ... (named barrier
    // kBarPingPong + cw: my turn; then I hand it to the next). The last consumer opens the first turn;
    // the one extra hand-over this leaves on consumer 0's barrier is taken after the last tile.
    auto turn_begin = [&]() {
        if (PINGPONG) named_bar_sync(kBarPingPong + cw, 256);
    };
    auto turn_end = [&]() {
        if (PINGPONG) named_bar_arrive(kBarPingPong + (cw + 1) % NWG, 256);
    };
    if (PINGPONG && cw == NWG - 1) named_bar_arrive(kBarPingPong, 256);

    int g = 0;   // K / V tiles consumed so far (ring position and phase, as the producer counts)
    int qt = 0;  // Q tiles consumed so far
    int tile = sreg_ctaid_x();
    for (int n = 0;; ++n) {
        if (PERSIST) {
            mbar_wait(tile_full(n & 1), (n >> 1) & 1);
            tile = tile_slot[n & 1];
            release(tile_empty(n & 1));
        }
        if (tile >= num_tiles) break;
        const TileCoord tc = tile_coord(tile, num_m, p.nheads, kBM, sq);
        const int h = tc.h, b = tc.b;
        int nb_lo, nb_hi;
        key_tile_range<BN>(tc.m0, kBM, sq, sk, wl, wr, nb_lo, nb_hi);
        int n_iter = nb_hi - nb_lo;  // (this warpgroup's own range once leading masked tiles are cut, below)
        const int r0 = tc.m0 + 64 * cw;  // first query row of this warpgroup
        const int qb = kQB == 1 ? 0 : qt & 1;
        // (the window's base re-derived here, not kept live from the top: at 160 registers ptxas spills it)
        const u32 q_base = ((smem_addr(smem) + 1023u) & ~1023u) + qb * Tr::kQBytes + 64 * cw * 128;
        // A warpgroup whose 64 rows lie before row 0 (in the first, partial block of a head) computes
        // nothing: it takes its turns and releases its slots (the producer and the other warpgroups count
        // on both) and moves on. (Through a shuffle: warp-uniform for the compiler.)
        if (__shfl_sync(0xffffffffu, (int)(r0 < 0), 0)) {
            if (n_iter > 0) {
                mbar_wait(q_full(qb), (qt / kQB) & 1);
                for (int it = 0; it <= n_iter; ++it) {  // n_iter + 1 turns, as the computing path takes
                    const int s = (g + it) % STAGES, sp = (g + it - 1) % STAGES;
                    if (it < n_iter) mbar_wait(k_full(s), ((g + it) / STAGES) & 1);
                    if (it > 0) mbar_wait(v_full(sp), ((g + it - 1) / STAGES) & 1);
                    turn_begin();
                    turn_end();
                    if (it < n_iter) release(k_empty(s));
                    if (it > 0) release(v_empty(sp));
                }
                release(q_empty(qb));
                g += n_iter;
                ++qt;
            }
            if (!PERSIST) break;
            continue;
        }
        const int r_hi = min(r0 + 63, sq - 1);
        // Leading key tiles (the block's highest keys: they are visited first) that lie wholly past the
        // last key of every row of this warpgroup (a causal or right-window edge inside the block, e.g.
        // the top 64 rows of a 128-row block under an 80-key tile): the warpgroup takes one turn per such
        // tile, releases its K and V slots and computes the rest of the range (at least one tile, so
        // that rows without any key still get their zeros and -inf from the usual path).
        if (wr >= 0) {  // (no right edge: every row keeps the block's last key)
            const int key_hi_w = wr < 0 ? sk - 1 : min(sk - 1, r_hi + shift + wr);
            int skip = key_hi_w < 0 ? n_iter - 1 : nb_hi - 1 - key_hi_w / BN;
            skip = __shfl_sync(0xffffffffu, max(0, min(skip, n_iter - 1)), 0);  // (warp-uniform)
            for (int it = 0; it < skip; ++it) {
                const int s = (g + it) % STAGES;
                mbar_wait(k_full(s), ((g + it) / STAGES) & 1);
                mbar_wait(v_full(s), ((g + it) / STAGES) & 1);
                turn_begin();
                turn_end();
                release(k_empty(s));
                release(v_empty(s));
            }
            g += skip;
            nb_hi -= skip;
            n_iter -= skip;
        }
        // Tiles that need the mask for some row of this warpgroup: keys past the smallest last_key or
        // before the largest first_key of its rows.
        const int right_lim = wr < 0 ? sk - 1 : min(sk - 1, r0 + shift + wr);
        const int left_lim = wl < 0 ? 0 : r_hi + shift - wl;

        float o[D / 2];
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
        float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};
        u32 pf[kPS][4];  // P of the previous tile, 16-bit pairs: the A fragments of O += P V

        // S(j) = Q K(j)^T into sacc (issue only; the caller commits).
        auto issue_qk = [&](float (&sacc)[BN / 2], int s) {
            const u32 kb = sK + s * Tr::kKVBytes;
#pragma unroll
            for (int ks = 0; ks < kKS; ++ks) {
                const u32 off = (ks & 3) * 32;  // 16 columns = 32 bytes within a 128-byte row
                const u64 da = smem_desc_sw128(q_base + (ks >> 2) * (kBM * 128) + off, 16, 1024);
                const u64 db = smem_desc_sw128(kb + (ks >> 2) * (BN * 128) + off, 16, 1024);
                Wgmma<T, BN>::ss(sacc, da, db, ks > 0);
            }
        };
        // O += P V(slot s) with P in registers (issue only).
        auto issue_pv = [&](const u32 (&pa)[kPS][4], int s) {
            const u32 vb = sV + s * Tr::kKVBytes;
#pragma unroll
            for (int ks = 0; ks < kPS; ++ks) {
                // V is N-major: 8-key groups 1024 bytes apart (SBO), 64-column blocks BN * 128 apart (LBO).
                const u64 db = smem_desc_sw128(vb + ks * 16 * 128, BN * 128, 1024);
                Wgmma<T, D>::rs_nmajor_b(o, pa[ks][0], pa[ks][1], pa[ks][2], pa[ks][3], db, 1);
            }
        };
        // Scores of tile `it` (in sacc) -> probabilities (fp32, in place); row statistics updated,
        // corr = the factor by which O (still accumulating the previous tiles) must be rescaled.
        auto softmax = [&](float (&sacc)[BN / 2], int it, float (&corr)[2]) {
            const int k0 = (nb_hi - 1 - it) * BN;
#ifdef CUFLASH_SM90_PROBE_NOSOFTMAX
            corr[0] = corr[1] = 1.f;
            return;
#endif
            if (transform) {  // rare features: uniform branches
                if (p.softcap > 0.f) {
                    const float cap_in = p.scale / p.softcap, cap_out = p.softcap * CUFLASH_LOG2E;
#pragma unroll
                    for (int i = 0; i < BN / 2; ++i) sacc[i] = cap_out * sm80::tanh_abs_accurate(sacc[i] * cap_in);
                } else {
#pragma unroll
                    for (int i = 0; i < BN / 2; ++i) sacc[i] *= p.scale_log2;
                }
                if (p.alibi != nullptr) {
                    const float slope2 = p.alibi[(i64)b * p.alibi_batch_stride + h] * CUFLASH_LOG2E;
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const int rel = r0 + wrow + 8 * hh + shift - (k0 + 2 * tq);  // |i + shift - j|
#pragma unroll
                        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                            for (int e = 0; e < 2; ++e)
                                sacc[4 * nt + 2 * hh + e] =
                                    fmaf(-slope2, fabsf((float)(rel - (nt * 8 + e))), sacc[4 * nt + 2 * hh + e]);
                    }
                }
            }
            // Mask: only tiles crossing seqlen_k or a window / causal edge of some row of the warpgroup.
            if (k0 + BN - 1 > right_lim || k0 < left_lim) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int ipos = r0 + wrow + 8 * hh + shift;
                    const int c0 = k0 + 2 * tq;
                    const int lo = (wl < 0 ? 0 : ipos - wl) - c0;  // kept: lo <= c <= hi
                    const int hi = (wr < 0 ? sk - 1 : min(sk - 1, ipos + wr)) - c0;
#pragma unroll
                    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int c = nt * 8 + e;
                            if (c < lo || c > hi) sacc[4 * nt + 2 * hh + e] = -INFINITY;
                        }
                }
            }
            // Online softmax: a row lives in the 4 lanes of a quad.
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                float mx = row_m[hh];
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(sacc[4 * nt + 2 * hh], sacc[4 * nt + 2 * hh + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float base = mx == -INFINITY ? 0.f : mx * mult;
                corr[hh] = ex2(row_m[hh] * mult - base);  // 0 while nothing was kept (m = -inf)
                row_m[hh] = mx;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const float pe = ex2(fmaf(sacc[4 * nt + 2 * hh + e], mult, -base));
                        sacc[4 * nt + 2 * hh + e] = pe;
                        sum += pe;
                    }
                row_l[hh] = fmaf(row_l[hh], corr[hh], sum);
            }
        };
        // Probabilities of tile `it` -> 16-bit A fragments of O += P V: the C fragment of two adjacent
        // n8 tiles is the A fragment of one k16 step. DROPOUT: the dropped entries are zeroed here.
        auto pack_p = [&](const float (&sacc)[BN / 2], int it, u32 (&pa)[kPS][4]) {
            DropoutFrag<2, (DROPOUT ? kNT : 4)> keep;  // row ri = hh (rows wrow, wrow + 8), n8 tile nt
            if constexpr (DROPOUT) {
                dropout_frag_keep(p, b, (nb_hi - 1 - it) * BN, lane, [&](int ri, int& i, int& hd) {
                    i = r0 + wrow + 8 * ri;
                    hd = h;
                }, keep);
            }
#pragma unroll
            for (int ks = 0; ks < kPS; ++ks) {
                pa[ks][0] = pack2<T>(sacc[8 * ks + 0], sacc[8 * ks + 1]);
                pa[ks][1] = pack2<T>(sacc[8 * ks + 2], sacc[8 * ks + 3]);
                pa[ks][2] = pack2<T>(sacc[8 * ks + 4], sacc[8 * ks + 5]);
                pa[ks][3] = pack2<T>(sacc[8 * ks + 6], sacc[8 * ks + 7]);
                if constexpr (DROPOUT) {
                    pa[ks][0] &= keep.mask16(0, 2 * ks);
                    pa[ks][1] &= keep.mask16(1, 2 * ks);
                    pa[ks][2] &= keep.mask16(0, 2 * ks + 1);
                    pa[ks][3] &= keep.mask16(1, 2 * ks + 1);
                }
            }
        };
        // O *= corr per row, skipped when no row of the warp found a new maximum (corr is exactly 1
        // then: after the first tiles most do not).
        auto rescale_o = [&](const float (&corr)[2]) {
            if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
                for (int nt = 0; nt < D / 8; ++nt) {
                    o[4 * nt + 0] *= corr[0];
                    o[4 * nt + 1] *= corr[0];
                    o[4 * nt + 2] *= corr[1];
                    o[4 * nt + 3] *= corr[1];
                }
            }
        };
        // Q is no longer read by this warp (its own buffer for the output): the producer may reload it.
        auto release_q_after_qk = [&](int it) {
            if (Tr::kOwnO && it == n_iter - 1) release(q_empty(qb));
        };

        // kLate: the rescale of O still owed for the last softmax (1: none; tile 0 leaves O at 0).
        float corr_late[2] = {1.f, 1.f};
        // After the softmax of a tile: rescale O now, or (kLate) owe it to the next turn.
        auto settle_rescale = [&](const float (&corr)[2]) {
            if constexpr (kLate) {
                corr_late[0] = corr[0];
                corr_late[1] = corr[1];
            } else {
                rescale_o(corr);
            }
        };
        if (n_iter > 0) {
            mbar_wait(q_full(qb), (qt / kQB) & 1);
            {   // tile 0: S(0) and its softmax
                float sacc[BN / 2];
                float corr[2];
                const int s = g % STAGES;
                mbar_wait(k_full(s), (g / STAGES) & 1);
                turn_begin();
                wgmma_fence();
                issue_qk(sacc, s);
                wgmma_commit();
                turn_end();
                wgmma_wait<0>();
                fence_regs<BN / 2>(sacc);
                release(k_empty(s));
                release_q_after_qk(0);
                softmax(sacc, 0, corr);  // O is still 0: no rescale
                pack_p(sacc, 0, pf);
            }
            if constexpr (SCHED == kSchedSerial) {
                // O += P(it-1) V(it-1) retires before S(it) is issued; the softmax never runs beside an
                // MMA of its own warpgroup.
                for (int it = 1; it < n_iter; ++it) {
                    const int s = (g + it) % STAGES, sp = (g + it - 1) % STAGES;
                    float sacc[BN / 2];
                    float corr[2];
                    mbar_wait(v_full(sp), ((g + it - 1) / STAGES) & 1);
                    turn_begin();
                    wgmma_fence();
                    issue_pv(pf, sp);
                    wgmma_commit();
                    wgmma_wait<0>();
                    fence_regs<D / 2>(o);
                    fence_regs<kPS * 4>(&pf[0][0]);
                    release(v_empty(sp));
                    mbar_wait(k_full(s), ((g + it) / STAGES) & 1);
                    wgmma_fence();
                    issue_qk(sacc, s);
                    wgmma_commit();
                    turn_end();
                    wgmma_wait<0>();
                    fence_regs<BN / 2>(sacc);
                    release(k_empty(s));
                    release_q_after_qk(it);
                    softmax(sacc, it, corr);
                    pack_p(sacc, it, pf);
                    rescale_o(corr);
                }
            } else if constexpr (SCHED == kSchedBatched || SCHED == kSchedBatchedLate) {
                // Both MMAs issued back to back (one turn keeps the tensor cores busy for both), then one
                // wait, then the softmax (beside the other warpgroups' MMAs when PINGPONG).
                for (int it = 1; it < n_iter; ++it) {
                    const int s = (g + it) % STAGES, sp = (g + it - 1) % STAGES;
                    float sacc[BN / 2];
                    float corr[2];
                    mbar_wait(v_full(sp), ((g + it - 1) / STAGES) & 1);
                    mbar_wait(k_full(s), ((g + it) / STAGES) & 1);
                    turn_begin();
                    wgmma_fence();
                    if constexpr (kLate) {
                        issue_qk(sacc, s);
                        rescale_o(corr_late);
                        wgmma_fence();
                        issue_pv(pf, sp);
                    } else {
                        issue_pv(pf, sp);
                        issue_qk(sacc, s);
                    }
                    wgmma_commit();
                    turn_end();
                    wgmma_wait<0>();
                    fence_regs<BN / 2>(sacc);
                    fence_regs<D / 2>(o);
                    fence_regs<kPS * 4>(&pf[0][0]);
                    release(v_empty(sp));
                    release(k_empty(s));
                    release_q_after_qk(it);
                    softmax(sacc, it, corr);
                    pack_p(sacc, it, pf);
                    settle_rescale(corr);
                }
            } else {
                // kSchedOverlap (1, 3, 5): S(it) issued, then O += P(it-1) V(it-1); the softmax of S(it)
                // runs while the latter is still in the tensor cores (5 only: in 1 / 3 ptxas moves the
                // wait for it above the softmax). P(it) stays fp32 in sacc until P(it-1) V(it-1)
                // has retired and only then overwrites the A fragments (ptxas serialises every wgmma of
                // the kernel if registers an in-flight wgmma reads are written, e.g. by a second P
                // buffer it coalesces with the first).
                for (int it = 1; it < n_iter; ++it) {
                    const int s = (g + it) % STAGES, sp = (g + it - 1) % STAGES;
                    float sacc[BN / 2];
                    float corr[2];
                    mbar_wait(k_full(s), ((g + it) / STAGES) & 1);
                    mbar_wait(v_full(sp), ((g + it - 1) / STAGES) & 1);
                    turn_begin();
                    wgmma_fence();
                    issue_qk(sacc, s);
                    wgmma_commit();
                    if constexpr (kLate) {
                        rescale_o(corr_late);
                        wgmma_fence();
                    }
                    issue_pv(pf, sp);
                    wgmma_commit();
                    turn_end();
                    wgmma_wait<1>();  // S(it) is done; P V may still run
                    fence_regs<BN / 2>(sacc);
                    release(k_empty(s));
                    release_q_after_qk(it);
                    softmax(sacc, it, corr);
                    if constexpr (SCHED == kSchedOverlapPinned) block_boundary_after(row_l[0]);
                    wgmma_wait<0>();
                    fence_regs<D / 2>(o);
                    fence_regs<kPS * 4>(&pf[0][0]);
                    release(v_empty(sp));
                    settle_rescale(corr);
                    pack_p(sacc, it, pf);
                }
            }
            {   // drain: O += P(last) V(last)
                const int sp = (g + n_iter - 1) % STAGES;
                mbar_wait(v_full(sp), ((g + n_iter - 1) / STAGES) & 1);
                if constexpr (kLate) rescale_o(corr_late);
                turn_begin();
                wgmma_fence();
                issue_pv(pf, sp);
                wgmma_commit();
                turn_end();
                wgmma_wait<0>();
                fence_regs<D / 2>(o);
                fence_regs<kPS * 4>(&pf[0][0]);
                release(v_empty(sp));
            }
            g += n_iter;
        }

        // ---- epilogue: O / l staged in shared memory, TMA store; LSE from registers ------------------
        float inv_l[2];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float l = row_l[hh];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            inv_l[hh] = l > 0.f ? (DROPOUT ? p.dropout_scale : 1.f) / l : 0.f;  // 1 / (1 - p): dropout
            const int row = r0 + wrow + 8 * hh;
            if (tq == 0 && row < sq && p.lse != nullptr)
                p.lse[((i64)b * p.nheads + h) * sq + row] =
                    l > 0.f ? (row_m[hh] * mult + log2f(l)) * CUFLASH_LN2 : -INFINITY;
        }
        if (n_iter == 0) {
            // No key for any row of the block (e.g. causal with seqlen_q > seqlen_k): zeros, written
            // directly (no Q tile was loaded; a persistent block's Q / O buffer may be in use).
            const int r_end = min(r0 + 64, sq);
            const int ctid = tid & 127;
            for (int r = r0 + (ctid >> 4); r < r_end; r += 8) {
                T* orow = reinterpret_cast<T*>(p.o) + (i64)b * p.o_batch_stride + (i64)r * p.o_row_stride +
                          (i64)h * p.o_head_stride;
                for (int c = ctid & 15; c < p.headdim; c += 16) orow[c] = from_float<T>(0.f);
            }
        } else {
            const bool leader = (warp & 3) == 0 && lane == 0;
            if (PERSIST && Tr::kOwnO) {  // the previous tile's store must have read the buffer
                if (leader) tma_store_wait_read();
                named_bar_sync(kBarEpilogue + cw, 128);
            }
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                const int c = nt >> 3, u = nt & 7;
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int row = wrow + 8 * hh;
                    const u32 addr = o_base + c * (kBM * 128) + row * 128 + ((u ^ (row & 7)) << 4) + 4 * tq;
                    sm80::sts_u32(addr, pack2<T>(o[4 * nt + 2 * hh] * inv_l[hh], o[4 * nt + 2 * hh + 1] * inv_l[hh]));
                }
            }
            fence_proxy_async();
            named_bar_sync(kBarEpilogue + cw, 128);
            if (leader) {
#pragma unroll
                for (int c = 0; c < Tr::kChunks; ++c) tma_store_4d(&maps.o, c * 64, h, r0, b, o_base + c * (kBM * 128));
                tma_store_commit();
                if (!(PERSIST && Tr::kOwnO)) tma_store_wait_read();
            }
            if (!Tr::kOwnO) {  // the output sat in the Q tile: free it for the next one once read
                named_bar_sync(kBarEpilogue + cw, 128);
                release(q_empty(qb));
            }
            ++qt;
        }
        if (!PERSIST) break;
    }
    if (PINGPONG && cw == 0) named_bar_sync(kBarPingPong, 256);  // the last consumer's final hand-over
    if (PERSIST && Tr::kOwnO && (warp & 3) == 0 && lane == 0) tma_store_wait_read();
}

}  // namespace cuflash
