// traits_bwd_sm90.cuh: the compile-time shape of the Hopper backward (bwd_sm90.cu) and its few extra
// PTX helpers.
//
// A block of 384 threads owns BN = 128 keys of one (kv head, batch): warpgroup 0 is the producer (TMA),
// warpgroups 1 and 2 the consumers, 64 keys each. Query blocks of BM rows stream through a ring of
// STAGES slots. Shared memory (every tile 16-bit, 64-column blocks of rows x 128 bytes in the 128-byte
// swizzle that TMA writes and wgmma reads):
//
//   K, V          BN x D each, loaded once per key block
//   Q, dO         STAGES slots of BM x D each
//   dS^T          2 buffers (step parity) of BN keys x BM queries: BM / 64 query blocks of BN rows x
//                 128 bytes, i.e. stored transposed ([key][query]); the dQ GEMM reads it M-major
//   L, D          STAGES slots of BM floats each (lse * log2(e) or +inf, and rowsum(dO * O))
//   keep bits     DROPOUT only: STAGES slots of BN x BM bits, written by the producer's RNG warps
//                 (layout in bwd_sm90.cu)
//
// dQ = dS K (BM x D, k = BN) is split between the two consumers: by rows when BM = 128 (each 64 query
// rows, all D columns), by columns when BM = 64 (each D / 2 columns, which must be whole 64-column
// blocks: D = 128 or 256).
//
// D = 256 (kSplitD): dK + dV of 64 keys x 256 columns would take 256 registers per consumer thread, so
// the block owns BN = 64 keys and the consumers split the head dim instead of the keys: consumer w holds
// dK, dV columns 128 w .. 128 w + 127 of all 64 keys, computes S^T / dP^T for all 64 keys and query
// columns BM / 2 w .. + BM / 2 - 1, and both consumers' P^T and dS^T meet in shared memory (P^T in
// 2 more buffers of the dS^T layout), from where dV += P^T dO and dK += dS^T Q read them (wgmma ss,
// A K-major).
#pragma once
#include "types.cuh"

namespace cuflash {

template <int D_, int BM_, int STAGES_, bool DROPOUT_ = false>
struct Sm90BwdTraits {
    static constexpr int kD = D_;
    static constexpr int kBM = BM_;
    static constexpr bool kSplitD = D_ == 256;        // consumers split the head dim (see above)
    static constexpr int kBN = kSplitD ? 64 : 128;
    static constexpr int kDPerConsumer = kSplitD ? D_ / 2 : D_;  // dK / dV columns of one consumer
    static constexpr int kQPerConsumer = kSplitD ? BM_ / 2 : BM_;  // S^T / dP^T query columns
    static constexpr int kStages = STAGES_;
    static constexpr int kThreads = 384;
    // setmaxnreg: the producer keeps 24 registers, the two consumers 240 each; with dropout the producer's
    // RNG warps run Philox and keep 40, the consumers 232.
    static constexpr bool kDropout = DROPOUT_;
    static constexpr int kProducerRegs = kDropout ? 40 : 24;
    static constexpr int kConsumerRegs = kDropout ? 232 : 240;
    static constexpr int kChunks = kD / 64;
    static constexpr bool kDQByRows = kBM == 128;         // dQ split between the consumers by rows
    static constexpr int kNQ = kDQByRows ? kD : kD / 2;   // dQ columns per consumer
    static constexpr int kQBytes = kBM * kD * 2;          // Q or dO slot
    static constexpr int kKBytes = kBN * kD * 2;          // K or V
    static constexpr int kDSBytes = kBN * kBM * 2;        // one dS^T buffer
    static constexpr int kVecBytes = 2 * kBM * 4;         // L then D of one slot
    static constexpr int kOffK = 0;
    static constexpr int kOffV = kOffK + kKBytes;
    static constexpr int kOffQ = kOffV + kKBytes;
    static constexpr int kOffdO = kOffQ + kStages * kQBytes;
    static constexpr int kOffdS = kOffdO + kStages * kQBytes;
    static constexpr int kOffP = kOffdS + 2 * kDSBytes;   // kSplitD: 2 P^T buffers (dS^T layout)
    static constexpr int kOffVec = kOffP + (kSplitD ? 2 * kDSBytes : 0);
    // Keep bits: kKeepWords 32-bit words per consumer thread (bit x: its score element x), consecutive.
    static constexpr int kKeepWords = kBM / 64;
    static constexpr int kKeepBytes = kDropout ? 256 * kKeepWords * 4 : 0;
    static constexpr int kOffKeep = kOffVec + kStages * kVecBytes;
    // + 1024: the dynamic window is aligned up to 1024 bytes (swizzle atoms) at run time.
    static constexpr int kSmemBytes = 1024 + kOffKeep + kStages * kKeepBytes;
    // kv_full, kv_empty, q_full[STAGES], q_empty[STAGES], (dropout) keep_full[STAGES]
    static constexpr int kBars = 2 + 2 * kStages + (kDropout ? kStages : 0);
    // fp32 accumulators per consumer thread: dK, dV live through the loop; S^T, dP^T per step.
    static constexpr int kAccRegs = 2 * (kDPerConsumer / 2) + 2 * (kQPerConsumer / 2);

    static_assert(kD == 64 || kD == 128 || kD == 256, "head-dim bucket 64, 128 or 256");
    static_assert(!kSplitD || (kBM == 64 && !kDropout), "d256: BM 64, no dropout variant");
    static_assert(kBM == 64 || kBM == 128, "query block 64 or 128");
    static_assert(kDQByRows || kD % 128 == 0, "dQ split by columns needs whole 64-column blocks per consumer");
    static_assert(kStages >= 2, "at least two slots");
    // The pool setmaxnreg redistributes is what the launch allocated (168 registers x 384 threads, the
    // launch bounds); asking for more than it holds waits forever.
    static_assert(kProducerRegs * 128 + 2 * 128 * kConsumerRegs <= ((65536 / kThreads) & ~7) * kThreads,
                  "register pool");
    static_assert(kAccRegs <= 192, "accumulators must leave room in 232 - 240 registers");
    static_assert(kSmemBytes <= 227 * 1024, "shared memory above the sm90 per-block limit");
};

namespace sm90bwd {

// 1-D bulk copy global -> shared (16-byte aligned, size a multiple of 16) completing on an mbarrier.
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}

// fp32 reductions into global memory: 2 or 4 adjacent floats (8- / 16-byte aligned), one vector red.
__device__ __forceinline__ void red_add_v2(float* a, float x, float y) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(a), "f"(x), "f"(y) : "memory");
}
__device__ __forceinline__ void red_add_v4(float* a, float x, float y, float z, float w) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(a), "f"(x), "f"(y), "f"(z), "f"(w)
                 : "memory");
}
__device__ __forceinline__ void stg_u32(void* a, u32 v) {
    asm volatile("st.global.b32 [%0], %1;" ::"l"(a), "r"(v) : "memory");
}

}  // namespace sm90bwd
}  // namespace cuflash
