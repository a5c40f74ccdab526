/*
 * bwd_dense.cuh -- the one-pass dkdv kernel of the CUDA backward (SPEC section 4) for the common calls: head dim
 * padded to 64 or 128, default (atomic dq) mode, no dropout, no softcap, no top-k window keys, no bias or a per-key
 * bias or a full bias with 16-byte rows (dense_eligible in bwd_common.cuh; bwd_common.cuh's dkdv/dq kernels run every
 * other call). Included by bwd_launch.cuh.
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
 *   - compile-time features (kFeat bits DENSE_BIAS, DENSE_KBIAS, DENSE_MASK): the plain instantiation carries no
 *     mask, bias or dbias code, the bias ones no mask code. DENSE_KBIAS, a bias whose rows broadcast (dim 2 == 1,
 *     the per-key bias): 2 values per thread and step (its keys gid, gid + 8; rows are keys in this layout), and
 *     dbias (ACC_ROWS, or DIRECT when Sq = 1) as 2 fp32 column sums per thread over the head's query loop, reduced
 *     over the row's 4 lanes and written by one owner lane per key once per head (key_dbias_flush). DENSE_BIAS, a
 *     full bias: its kBM x 128 tile is staged in shared memory with Q / dO (16-byte cp.async, double-buffered) and
 *     read by ldmatrix.trans straight into the C-fragment order (2 instructions per warp and 32 query rows); dbias
 *     DIRECT is written from the dS^T tile that dq_atomic stages anyway (dbias_from_sds, coalesced), ACC by
 *     dbias_tile at kDp = 64 (fp32 dS) and from that tile at kDp = 128 (registers), uniform runtime branches. Causal and the Sq / Sk edges stay runtime:
 *     their per-element tests run only in warps whose 16 x kBM tile crosses the diagonal or an edge (a warp-uniform
 *     branch);
 *   - 2 barriers per step: the one that publishes query tile t (cp.async, double-buffered) also frees the other
 *     buffer, whose load of tile t + 1 is issued right after it; the second publishes dS^T for dQ. The mask
 *     instantiations add the all-False tile probe (__syncthreads_or) and skip such tiles.
 * Per step and warp (5 products; 320 mma.sync m16n8k16 per 64 query rows at kDp = 128):
 *   S^T = K Q^T;  P^T = exp2(S^T scale log2e [+ bias log2e] - lse log2e), 0 where not visible
 *   dV += P^T dO;  dP^T = V dO^T;  dS^T = P^T (dP^T - Di) [-> dbias];  dK += dS^T Q;  dQ += dS K (dq_atomic)
 * All k steps of the products run (kDp / 16): the columns past D are zeros in shared memory, so a padded D only
 * costs work, not correctness.
 *
 * Occupancy: one CTA of 8 warps per SM (255 registers x 256 threads; ~107 KB shared memory at kDp = 128, + 17 KB for
 * a staged bias). Two CTAs of 64 keys x 4 warps would fit too, but halve the keys per loaded query tile (2x the
 * Q/dO/lse/Di loads) and double the dQ atomics (one set per 64 keys instead of 128), and need a different grid.
 */
#ifndef FDMA_CUDA_BWD_DENSE_CUH
#define FDMA_CUDA_BWD_DENSE_CUH

#include <type_traits>

#include "bwd_common.cuh"

namespace fdma_bwdk {

enum { DENSE_BIAS = 1, DENSE_MASK = 2, DENSE_KBIAS = 4 };
constexpr int kDenseBN = 128; /* keys per CTA: key_block(kDp) for kDp <= 128, the grid bwd.cu launches */
/* Query rows per step: 64 at kDp = 64; 32 at kDp = 128 (64 rows spill 12-32 bytes there, loop-invariant state
 * outside the step loop, but the build allows none). */
constexpr int dense_bm(int dp) { return dp <= 64 ? 64 : 32; }

/* Rows of the staged bias tile (kBias): kDenseBN keys + 8 (16-byte rows at a 272-byte pitch: the 8 rows that one
 * ldmatrix phase reads land in 8 different bank groups). */
constexpr int kBiasPitch = kDenseBN + 8;

/* bf16 / fp16 pair -> float2. */
template <typename T> __device__ __forceinline__ float2 pair_f2(uint32_t u);
template <> __device__ __forceinline__ float2 pair_f2<__nv_bfloat16>(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u));
}
template <> __device__ __forceinline__ float2 pair_f2<__half>(uint32_t u) {
    return __half22float2(*reinterpret_cast<const __half2 *>(&u));
}

/* S^T tile (raw q.k C fragments, 16 keys x 8kN queries) -> P^T in place. kTest: elements whose bit (4n + e) in vis
 * is clear get 0; otherwise every element is visible. lse_s: the tile's lse (per query column). sb (kBias): the
 * staged bias tile of the step, [query][kBiasPitch], at the warp's first key: ldmatrix.trans of its 8 x 8 blocks
 * (query rows 8n.., keys 8 kh..) hands each thread the C-fragment pair (key gid + 8 kh, queries 8n + 2 t4, + 1).
 * kb (kKBias): the per-key bias times log2 e of the thread's keys gid and gid + 8. */
template <typename T, int kN, bool kBias, bool kKBias, bool kTest>
__device__ __forceinline__ void dense_p(const Args &a, float (&s)[kN][4], uint32_t vis, const float *lse_s,
                                        const T *sb, const float (&kb)[2], int lane) {
    constexpr float kLog2e = 1.4426950408889634f;
    const float sl2 = a.scale * kLog2e;
    const int t4 = lane & 3;
#pragma unroll
    for (int np = 0; np < kN / 2; np++) {
        uint32_t bb[4]; /* blocks (n, kh) = (2np, 0), (2np, 1), (2np + 1, 0), (2np + 1, 1) */
        if (kBias)
            fdma_ldmatrix_x4_trans(bb, sb + (16 * np + ((lane >> 4) << 3) + (lane & 7)) * kBiasPitch +
                                           (((lane >> 3) & 1) << 3));
#pragma unroll
        for (int nn = 0; nn < 2; nn++) {
            const int n = 2 * np + nn;
            const float2 l = *reinterpret_cast<const float2 *>(lse_s + 8 * n + 2 * t4);
            /* an empty row (lse -inf) gets +inf, so that p = 0 */
            const float l2[2] = {(l.x == -INFINITY ? INFINITY : l.x) * kLog2e,
                                 (l.y == -INFINITY ? INFINITY : l.y) * kLog2e};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const bool v = !kTest || ((vis >> (4 * n + e)) & 1);
                float x = fmaf(s[n][e], sl2, -l2[e & 1]);
                if (kBias) {
                    const float2 bf = pair_f2<T>(bb[2 * nn + (e >> 1)]);
                    x = fmaf((e & 1) ? bf.y : bf.x, kLog2e, x);
                }
                if (kKBias) x += kb[e >> 1];
                s[n][e] = v ? exp2f(x) : 0.f;
            }
        }
    }
}

/* The bias tile of query rows [i0, i0 + kBM) x keys [n0, n0 + kDenseBN) of head h into sb ([kBM][kBiasPitch]) by
 * 16-byte cp.async (DENSE_BIAS_ROWS16 form); rows past Sq and keys past Sk: zeros. */
template <typename T, int kBM, int kThreads>
__device__ __forceinline__ void load_bias_tile(const Args &a, T *sb, int b, int h, int64_t i0, int64_t n0) {
    constexpr int kCh = kDenseBN / 8;
    const T *g = (const T *)a.bias + b * a.bs[0] + (int64_t)(h / a.bhdiv) * a.bs[1] + i0 * a.bs[2] + n0;
    const int keys = a.sk - (int)n0;
#pragma unroll
    for (int c = threadIdx.x; c < kBM * kCh; c += kThreads) {
        const int r = c / kCh, ch = c % kCh;
        const int nk = i0 + r < a.Sq ? min(8, keys - 8 * ch) : 0;
        fdma_cp_async16(sb + r * kBiasPitch + 8 * ch, nk > 0 ? g + r * a.bs[2] + 8 * ch : (const T *)a.bias,
                        nk > 0 ? 2 * nk : 0);
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

/* KEY-BIAS: the bias of the thread's keys j and j + 8 (j = the warp's first key + gid) for head h, times log2 e
 * (0 past Sk). */
template <typename T>
__device__ __forceinline__ void key_bias(const Args &a, float (&kb)[2], int b, int h, int j) {
    constexpr float kLog2e = 1.4426950408889634f;
    const T *p = (const T *)a.bias + b * a.bs[0] + (int64_t)(h / a.bhdiv) * a.bs[1] + (int64_t)j * a.bs[3];
    kb[0] = j < a.sk ? to_f(p[0]) * kLog2e : 0.f;
    kb[1] = j + 8 < a.sk ? to_f(p[8 * a.bs[3]]) * kLog2e : 0.f;
}

/* KEY-BIAS dbias of head h, once all its query tiles are done: db holds the thread's partial column sums of dS^T
 * (keys j, j + 8 over its query columns); summed over the 4 lanes of a row (fixed order), then one owner lane per
 * key adds it to the (batch, query head, key) partial (ACC_ROWS: its only writer, the workspace starts at 0) or
 * writes dbias (DIRECT: Sq == 1, the one row). */
template <typename T>
__device__ __forceinline__ void key_dbias_flush(const Args &a, float (&db)[2], int b, int h, int j, int lane) {
    if (a.dbias_mode == DBIAS_NONE) return;
#pragma unroll
    for (int x = 0; x < 2; x++) {
        db[x] += __shfl_xor_sync(0xffffffffu, db[x], 1);
        db[x] += __shfl_xor_sync(0xffffffffu, db[x], 2);
    }
    if ((lane & 3) == 0) {
        if (a.dbias_mode == DBIAS_ACC_ROWS) {
            float *base = a.dbacc + b * a.acs[0] + (int64_t)(h / a.achdiv) * a.acs[1];
            if (j < a.sk) base[j] += db[0];
            if (j + 8 < a.sk) base[j + 8] += db[1];
        } else {
            T *base = (T *)a.dbias + b * a.dbs[0] + (int64_t)h * a.dbs[1];
            if (j < a.sk) base[(int64_t)j * a.dbs[3]] = from_f<T>(db[0]);
            if (j + 8 < a.sk) base[(int64_t)(j + 8) * a.dbs[3]] = from_f<T>(db[1]);
        }
    }
    db[0] = db[1] = 0.f;
}

/* DIRECT dbias of a step (DENSE_BIAS) from the dS^T tile that dq_atomic left in shared memory ([key][kBM + 8], the
 * values dbias_tile would write: the same rounding to T), after its barrier and before the next step's first one:
 * thread x writes keys x % 32 + 32 k of query rows x / 32, x / 32 + kThreads / 32, ... (32 consecutive keys per
 * warp store: coalesced for a key-contiguous dbias). acc: ACC instead (kDp = 128), the tile added to the fp32
 * accumulator of the bias element (B, H and Sq broadcasts resolved by acs / achdiv); its only writer is this
 * thread of this CTA, which loops over the heads and batches that share it in order: no atomics, the same sum on
 * every run. */
template <typename T, int kBM, int kThreads>
__device__ __forceinline__ void dbias_from_sds(const Args &a, const T *sdS, int b, int h, int64_t i0, int64_t n0,
                                               bool acc) {
    const int jl0 = threadIdx.x & 31;
#pragma unroll 1
    for (int il = threadIdx.x >> 5; il < kBM && i0 + il < a.Sq; il += kThreads / 32) {
        const int64_t i = i0 + il;
        T *row = acc ? nullptr : (T *)a.dbias + b * a.dbs[0] + (int64_t)h * a.dbs[1] + i * a.dbs[2];
        float *arow = acc ? a.dbacc + b * a.acs[0] + (int64_t)(h / a.achdiv) * a.acs[1] + i * a.acs[2] + n0 : nullptr;
#pragma unroll
        for (int k = 0; k < kDenseBN / 32; k++) {
            const int jl = jl0 + 32 * k;
            if (n0 + jl >= a.Sk) continue;
            const T v = sdS[jl * (kBM + 8) + il];
            if (acc) arow[jl] += to_f(v);
            else row[(n0 + jl) * a.dbs[3]] = v;
        }
    }
}

template <typename T, int kDp, int kFeat, int kBM>
__global__ void __launch_bounds__(kDenseBN * 2, 1) dense_kernel(const Args a) {
#ifndef FDMA_BWD_NO_DEVICE_CODE
    constexpr bool kBias = (kFeat & DENSE_BIAS) != 0, kMask = (kFeat & DENSE_MASK) != 0;
    constexpr bool kKBias = (kFeat & DENSE_KBIAS) != 0;
    static_assert(!(kBias && kKBias), "one bias form per instantiation");
    constexpr int kBN = kDenseBN, kN = kBM / 8, kThreads = kBN * 2, kK = kDp / 16;
    extern __shared__ __align__(128) unsigned char smem[];
    const DkdvTiles<T, kDp, kBN, true, kBM> tl(smem);
    T *sBias = reinterpret_cast<T *>(tl.sDi + 2 * kBM); /* kBias: [2][kBM][kBiasPitch], past DkdvSmem's layout */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, row0 = warp * 16;
    const Lane L = make_lane(lane);
    const int64_t n0 = (int64_t)blockIdx.x * kBN;
    const int nM = (int)((a.Sq + kBM - 1) / kBM);
    const int m_first = first_q_block(a, n0, kBM);
    const int nm = nM - m_first;
    const int jw = (int)n0 + row0; /* the warp's first key */
    const bool key_edge = jw + 16 > a.sk;

    for_each_unit(a, [&](int b, int hkv, int h_lo, int nh) {
        begin_unit<T, kDp, kBN, kThreads, kBias || kKBias, true>(a, tl.sK, tl.sV, b, hkv, h_lo, nh,
                                                                 (int64_t)m_first * kBM, n0);
        auto load_tile = [&](int h, int64_t i0, int buf) {
            load_q_tile<T, kDp, kBN, true, kBM, kThreads, true>(a, tl, b, h, i0, buf);
            if (kBias) load_bias_tile<T, kBM, kThreads>(a, sBias + buf * kBM * kBiasPitch, b, h, i0, n0);
        };
        if (nm > 0) load_tile(h_lo, (int64_t)m_first * kBM, 0);
        fdma_cp_async_commit();
        float accV[kDp / 8][4], accK[kDp / 8][4];
        zero_acc(accV);
        zero_acc(accK);
        float db[2] = {0.f, 0.f}; /* KEY-BIAS dbias: partial column sums of dS^T (keys jk, jk + 8) of the head */
        const int jk = jw + (lane >> 2);
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
            if (kKBias && m == m_first && h != h_lo) key_dbias_flush<T>(a, db, b, h - 1, jk, lane);
            fdma_cp_async_wait<0>();
            __syncthreads(); /* tile (h, m) visible; every warp is done with the previous step (buf ^ 1, dS^T) */
            if (hn < h_end) load_tile(hn, (int64_t)mn * kBM, buf ^ 1);
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
            const T *sb = sBias + buf * kBM * kBiasPitch + row0;
            float kb[2] = {0.f, 0.f};
            if (kKBias) key_bias<T>(a, kb, b, h, jk);

            float s[kN][4];
            gemm_rows_bt<T, kDp, kN>(s, tl.sK, row0, sQb, kK, L); /* S^T = K Q^T */
            if (test) dense_p<T, kN, kBias, kKBias, true>(a, s, vis, tl.sLse + buf * kBM, sb, kb, lane);
            else dense_p<T, kN, kBias, kKBias, false>(a, s, vis, tl.sLse + buf * kBM, sb, kb, lane);
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
            if constexpr (kBias && kDp <= 64) /* ACC in fp32 from registers (kDp = 128: from dS^T, dbias_from_sds) */
                if (a.dbias_mode == DBIAS_ACC) dbias_tile<T, kN>(a, dp, b, h, i0, n0, row0, lane);
            if (kKBias)
#pragma unroll
                for (int n = 0; n < kN; n++) {
                    db[0] += dp[n][0] + dp[n][1];
                    db[1] += dp[n][2] + dp[n][3];
                }
            uint32_t da[kN / 2][4];
            to_afrag<T, kN>(da, dp, [](int, int) { return 1.f; });
            gemm_regs_b<T, kDp, kN>(accK, da, sQb, kK, L); /* dK += dS^T Q */
            dq_atomic<T, kDp, kBN, kBM, false>(a, tl.sdS, tl.sK, da, b, h, i0, row0, lane, L);
            if (kBias && (a.dbias_mode == DBIAS_DIRECT || (kDp > 64 && a.dbias_mode == DBIAS_ACC)))
                dbias_from_sds<T, kBM, kThreads>(a, tl.sdS, b, h, i0, n0, a.dbias_mode == DBIAS_ACC);
        }
        if (kKBias && nm > 0) key_dbias_flush<T>(a, db, b, h_end - 1, jk, lane);
        fdma_cp_async_wait<0>(); /* K / V when no query tile ran: nothing in flight into the next unit's tiles */
        const bool partial = a.hph == 1 && a.g > 1;
        write_kv<T, kDp, 0>(a, accV, 1.f, a.dv, a.dvs, partial ? a.dvpart : nullptr, b, hkv, h_lo, n0, row0, lane);
        write_kv<T, kDp, 0>(a, accK, a.scale, a.dk, a.dks, partial ? a.dkpart : nullptr, b, hkv, h_lo, n0, row0, lane);
    });
#endif
}

template <typename T, int kDp, int kFeat> cudaError_t launch_dense_feat(const Args &a, dim3 grid, cudaStream_t st) {
    constexpr int kBM = dense_bm(kDp);
    constexpr size_t kBiasBytes = (kFeat & DENSE_BIAS) ? 2 * sizeof(T) * kBM * kBiasPitch : 0;
    return launch_smem(dense_kernel<T, kDp, kFeat, kBM>, grid, kDenseBN * 2,
                       DkdvSmem<kDp, kDenseBN, true, kBM>::bytes_of(sizeof(T)) + kBiasBytes, st, a);
}

/* The dense kernel for a call that dense_eligible accepts; grid as bwd.cu computes it for key_block(kDp) keys. */
template <typename T, int kDp> cudaError_t launch_dense(const Args &a, dim3 grid, cudaStream_t st) {
    static_assert(kDp <= 128 && key_block(kDp) == kDenseBN, "the dense kernel uses the general kernel's grid");
    const int form = dense_bias_form(a.bias, a.bs, a.dbias_mode, a.Sq);
    if (form == DENSE_BIAS_KEY)
        return a.mask ? launch_dense_feat<T, kDp, DENSE_MASK | DENSE_KBIAS>(a, grid, st)
                      : launch_dense_feat<T, kDp, DENSE_KBIAS>(a, grid, st);
    if (form == DENSE_BIAS_ROWS16)
        return a.mask ? launch_dense_feat<T, kDp, DENSE_MASK | DENSE_BIAS>(a, grid, st)
                      : launch_dense_feat<T, kDp, DENSE_BIAS>(a, grid, st);
    return a.mask ? launch_dense_feat<T, kDp, DENSE_MASK>(a, grid, st) : launch_dense_feat<T, kDp, 0>(a, grid, st);
}

} /* namespace fdma_bwdk */

#endif /* FDMA_CUDA_BWD_DENSE_CUH */
