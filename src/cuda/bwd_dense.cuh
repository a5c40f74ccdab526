/*
 * bwd_dense.cuh -- the one-pass dkdv kernel of the CUDA backward (SPEC section 4) for the common calls: head dim
 * padded to 64 or 128, default (atomic dq) mode, no dropout, no softcap, no top-k window keys (dense_eligible in
 * bwd_common.cuh; bwd_common.cuh's dkdv/dq kernels run every other call). Included by bwd_launch.cuh.
 *
 * Shapes as in bwd_common.cuh: q, dout (B, Sq, H, D); k, v, dk, dv (B, Sk, Hkv, D); lse, Di (B, H, Sq) fp32.
 *
 * Same CTA ownership, grid and workspace as the general dkdv kernel (bwd.cu's make_config: one CTA per (128 keys,
 * kv head or query head, batch), loops over batches / kv heads for ACC dbias), 8 warps of 16 keys, and the same
 * transposed layout (S^T = K Q^T, so that P^T and dS^T are already A operands of dV += P^T dO and dK += dS^T Q),
 * but:
 *   - one pass over the query blocks: the dV and dK accumulators (16 x kDp fp32 per warp each, 128 registers at
 *     kDp = 128) live in registers together; kBM query rows per step (dense_bm: 64 at kDp = 64, 32 at kDp = 128),
 *     S^T and dP^T are 16 x kBM per warp; P^T is kept for dS^T as fp16 pairs (half the registers of fp32);
 *   - compile-time features (kFeat bits DENSE_BIAS, DENSE_MASK): the plain instantiation carries no mask, bias or
 *     dbias code, the bias one no mask code (its dbias mode, DIRECT / ACC / ACC_ROWS / NONE, is a uniform runtime
 *     branch in dbias_tile). Causal and the Sq / Sk edges stay runtime: their per-element tests run only in warps
 *     whose 16 x 64 tile crosses the diagonal or an edge (a warp-uniform branch);
 *   - 2 barriers per step: the one that publishes query tile t (cp.async, double-buffered) also frees the other
 *     buffer, whose load of tile t + 1 is issued right after it; the second publishes dS^T for dQ. The mask
 *     instantiations add the all-False tile probe (__syncthreads_or) and skip such tiles.
 * Per step and warp (5 products; 320 mma.sync m16n8k16 per 64 query rows at kDp = 128):
 *   S^T = K Q^T;  P^T = exp2(S^T scale log2e [+ bias log2e] - lse log2e), 0 where not visible
 *   dV += P^T dO;  dP^T = V dO^T;  dS^T = P^T (dP^T - Di) [-> dbias];  dK += dS^T Q;  dQ += dS K (dq_atomic)
 * All k steps of the products run (kDp / 16): the columns past D are zeros in shared memory, so a padded D only
 * costs work, not correctness.
 *
 * Occupancy: one CTA of 8 warps per SM (255 registers x 256 threads; ~107 KB shared memory at kDp = 128). Two CTAs
 * of 64 keys x 4 warps would fit too, but halve the keys per loaded query tile (2x the Q/dO/lse/Di loads) and
 * double the dQ atomics (one set per 64 keys instead of 128), and need a different grid.
 */
#ifndef FDMA_CUDA_BWD_DENSE_CUH
#define FDMA_CUDA_BWD_DENSE_CUH

#include <type_traits>

#include "bwd_common.cuh"

namespace fdma_bwdk {

enum { DENSE_BIAS = 1, DENSE_MASK = 2 };
constexpr int kDenseBN = 128; /* keys per CTA: key_block(kDp) for kDp <= 128, the grid bwd.cu launches */
/* Query rows per step: 64 at kDp = 64; 32 at kDp = 128 (64 rows spill 12-32 bytes there, loop-invariant state
 * outside the step loop, but the build allows none). */
constexpr int dense_bm(int dp) { return dp <= 64 ? 64 : 32; }

/* S^T tile (raw q.k C fragments, 16 keys x 8kN queries) -> P^T in place. kTest: elements whose bit (4n + e) in vis
 * is clear get 0 and read no bias; otherwise every element is visible. lse_s: the tile's lse (per query column);
 * bt (kBias): the bias element of the thread's first (key, query) pair, row gid, column 2 t4. */
template <typename T, int kN, bool kBias, bool kTest>
__device__ __forceinline__ void dense_p(const Args &a, float (&s)[kN][4], uint32_t vis, const float *lse_s,
                                        const T *bt, int lane) {
    constexpr float kLog2e = 1.4426950408889634f;
    const float sl2 = a.scale * kLog2e;
    const int t4 = lane & 3;
#pragma unroll
    for (int n = 0; n < kN; n++) {
        const float2 l = *reinterpret_cast<const float2 *>(lse_s + 8 * n + 2 * t4);
        /* an empty row (lse -inf) gets +inf, so that p = 0 */
        const float l2[2] = {(l.x == -INFINITY ? INFINITY : l.x) * kLog2e, (l.y == -INFINITY ? INFINITY : l.y) * kLog2e};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const bool v = !kTest || ((vis >> (4 * n + e)) & 1);
            float x = fmaf(s[n][e], sl2, -l2[e & 1]);
            if (kBias && v)
                x = fmaf(to_f(bt[(int64_t)(8 * n + (e & 1)) * a.bs[2] + (int64_t)(8 * (e >> 1)) * a.bs[3]]), kLog2e, x);
            s[n][e] = v ? exp2f(x) : 0.f;
        }
    }
}

/* dP^T -> dS^T = P^T (dP^T - Di) in place; ph: P^T as fp16 pairs in A-fragment order (to_afrag: elements (n, 0..1)
 * and (n, 2..3) at ph[n / 2][2 (n & 1)] and [2 (n & 1) + 1]); di_s: the tile's Di (per query column). */
template <int kN>
__device__ __forceinline__ void dense_ds(float (&dp)[kN][4], const uint32_t (&ph)[kN / 2][4], const float *di_s,
                                         int lane) {
    const int t4 = lane & 3;
#pragma unroll
    for (int n = 0; n < kN; n++) {
        const float2 d = *reinterpret_cast<const float2 *>(di_s + 8 * n + 2 * t4);
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const float2 p = __half22float2(*reinterpret_cast<const __half2 *>(&ph[n >> 1][2 * (n & 1) + hf]));
            dp[n][2 * hf] = p.x * (dp[n][2 * hf] - d.x);
            dp[n][2 * hf + 1] = p.y * (dp[n][2 * hf + 1] - d.y);
        }
    }
}

template <typename T, int kDp, int kFeat, int kBM>
__global__ void __launch_bounds__(kDenseBN * 2, 1) dense_kernel(const Args a) {
#ifndef FDMA_BWD_NO_DEVICE_CODE
    constexpr bool kBias = (kFeat & DENSE_BIAS) != 0, kMask = (kFeat & DENSE_MASK) != 0;
    constexpr int kBN = kDenseBN, kN = kBM / 8, kThreads = kBN * 2, kK = kDp / 16;
    extern __shared__ __align__(128) unsigned char smem[];
    const DkdvTiles<T, kDp, kBN, true, kBM> tl(smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, row0 = warp * 16;
    const Lane L = make_lane(lane);
    const int64_t n0 = (int64_t)blockIdx.x * kBN;
    const int nM = (int)((a.Sq + kBM - 1) / kBM);
    const int m_first = first_q_block(a, n0, kBM);
    const int nm = nM - m_first;
    const int jw = (int)n0 + row0; /* the warp's first key */
    const bool key_edge = jw + 16 > a.sk;

    for_each_unit(a, [&](int b, int hkv, int h_lo, int nh) {
        begin_unit<T, kDp, kBN, kThreads, kBias, true>(a, tl.sK, tl.sV, b, hkv, h_lo, nh, (int64_t)m_first * kBM, n0);
        if (nm > 0) load_q_tile<T, kDp, kBN, true, kBM, kThreads, true>(a, tl, b, h_lo, (int64_t)m_first * kBM, 0);
        fdma_cp_async_commit();
        float accV[kDp / 8][4], accK[kDp / 8][4];
        zero_acc(accV);
        zero_acc(accK);
        /* query tiles (head h_lo .. h_end - 1) x (block m_first .. m_first + nm - 1), head-major; (hn, mn) is the
           next tile, buf the buffer of the current one */
        const int h_end = nm > 0 ? h_lo + nh : h_lo;
        for (int hn = h_lo, mn = m_first, buf = 1; hn < h_end;) {
            const int h = hn, m = mn;
            buf ^= 1;
            if (++mn == m_first + nm) {
                mn = m_first;
                hn++;
            }
            fdma_cp_async_wait<0>();
            __syncthreads(); /* tile (h, m) visible; every warp is done with the previous step (buf ^ 1, dS^T) */
            if (hn < h_end) load_q_tile<T, kDp, kBN, true, kBM, kThreads, true>(a, tl, b, hn, (int64_t)mn * kBM, buf ^ 1);
            fdma_cp_async_commit();
            const int64_t i0 = (int64_t)m * kBM;
            /* per-element tests only where the warp's tile crosses the causal diagonal or an Sq / Sk edge */
            const bool test = kMask || key_edge || (int)i0 + kBM > a.sq ||
                              (a.causal && jw + 15 - (int)i0 > a.sk - a.sq);
            static_assert(kN <= 8, "visible bits: 32 per thread");
            uint32_t vis = 0xffffffffu;
            if (kMask) {
                vis = visible_bits<true, kN, true, false>(a, b, h, i0, n0, row0, lane);
                if (!__syncthreads_or(vis != 0)) {
                    if (kBias && a.dbias_mode == DBIAS_DIRECT) dbias_zero<T, kBN, kThreads>(a, b, h, i0, i0 + kBM, n0);
                    continue;
                }
            } else if (test) {
                vis = visible_bits<true, kN, false, false>(a, b, h, i0, n0, row0, lane);
            }
            const T *sQb = tl.sQ + buf * kBM * kDp, *sdOb = tl.sdO + buf * kBM * kDp;
            const T *bt = nullptr;
            if (kBias)
                bt = (const T *)a.bias + b * a.bs[0] + (int64_t)(h / a.bhdiv) * a.bs[1] +
                     (i0 + 2 * (lane & 3)) * a.bs[2] + (n0 + row0 + (lane >> 2)) * a.bs[3];

            float s[kN][4];
            gemm_rows_bt<T, kDp, kN>(s, tl.sK, row0, sQb, kK, L); /* S^T = K Q^T */
            if (test) dense_p<T, kN, kBias, true>(a, s, vis, tl.sLse + buf * kBM, bt, lane);
            else dense_p<T, kN, kBias, false>(a, s, vis, tl.sLse + buf * kBM, bt, lane);
            /* P^T kept for dS^T as fp16 pairs (16 registers instead of 32 across the dP^T product; P <= 1) */
            uint32_t ph[kN / 2][4];
            to_afrag<__half, kN>(ph, s, [](int, int) { return 1.f; });
            if constexpr (std::is_same<T, __half>::value) {
                gemm_regs_b<T, kDp, kN>(accV, ph, sdOb, kK, L); /* dV += P^T dO */
            } else {
                uint32_t pa[kN / 2][4];
                to_afrag<T, kN>(pa, s, [](int, int) { return 1.f; });
                gemm_regs_b<T, kDp, kN>(accV, pa, sdOb, kK, L);
            }
            float dp[kN][4];
            gemm_rows_bt<T, kDp, kN>(dp, tl.sV, row0, sdOb, kK, L); /* dP^T = V dO^T */
            dense_ds<kN>(dp, ph, tl.sDi + buf * kBM, lane);
            if (kBias) dbias_tile<T, kN>(a, dp, b, h, i0, n0, row0, lane);
            uint32_t da[kN / 2][4];
            to_afrag<T, kN>(da, dp, [](int, int) { return 1.f; });
            gemm_regs_b<T, kDp, kN>(accK, da, sQb, kK, L); /* dK += dS^T Q */
            dq_atomic<T, kDp, kBN, kBM, false>(a, tl.sdS, tl.sK, da, b, h, i0, row0, lane, L);
        }
        fdma_cp_async_wait<0>(); /* K / V when no query tile ran: nothing in flight into the next unit's tiles */
        const bool partial = a.hph == 1 && a.g > 1;
        write_kv<T, kDp, 0>(a, accV, 1.f, a.dv, a.dvs, partial ? a.dvpart : nullptr, b, hkv, h_lo, n0, row0, lane);
        write_kv<T, kDp, 0>(a, accK, a.scale, a.dk, a.dks, partial ? a.dkpart : nullptr, b, hkv, h_lo, n0, row0, lane);
    });
#endif
}

template <typename T, int kDp, int kFeat> cudaError_t launch_dense_feat(const Args &a, dim3 grid, cudaStream_t st) {
    constexpr int kBM = dense_bm(kDp);
    return launch_smem(dense_kernel<T, kDp, kFeat, kBM>, grid, kDenseBN * 2,
                       DkdvSmem<kDp, kDenseBN, true, kBM>::bytes_of(sizeof(T)), st, a);
}

/* The dense kernel for a call that dense_eligible accepts; grid as bwd.cu computes it for key_block(kDp) keys. */
template <typename T, int kDp> cudaError_t launch_dense(const Args &a, dim3 grid, cudaStream_t st) {
    static_assert(kDp <= 128 && key_block(kDp) == kDenseBN, "the dense kernel uses the general kernel's grid");
    if constexpr (dense_bias_ok(kDp))
        if (a.bias) return a.mask ? launch_dense_feat<T, kDp, DENSE_MASK | DENSE_BIAS>(a, grid, st)
                                  : launch_dense_feat<T, kDp, DENSE_BIAS>(a, grid, st);
    return a.mask ? launch_dense_feat<T, kDp, DENSE_MASK>(a, grid, st) : launch_dense_feat<T, kDp, 0>(a, grid, st);
}

} /* namespace fdma_bwdk */

#endif /* FDMA_CUDA_BWD_DENSE_CUH */
