/*
 * bwd_sparse.cuh -- the query-major backward kernel over gathered key lists (top-k window SPARSE mode and
 * row-broadcast masks; window.cuh builds the lists). Included by bwd_launch.cuh; the shared pieces (Args,
 * tiles, per-element code, row_stats, write_dq) are bwd_common.cuh's.
 */
#ifndef FDMA_CUDA_BWD_SPARSE_CUH
#define FDMA_CUDA_BWD_SPARSE_CUH

#include "bwd_common.cuh"

namespace fdma_bwdk {

/* ---- sparse kernel (top-k window, SPARSE mode, default mode, D <= 128) -----------------------------------
 * One CTA per (kBM = 128 query rows = one tile of the window's key lists, query head, batch), 8 warps of 16
 * rows, like the dq kernel, but its key tiles are the tile's gathered list (64 keys each; K/V rows loaded by
 * index) and it also produces the key side. Per key tile:
 *   S = Q K^T, P (visible: causal and j <= lim_i < e[j]), dP = dO V^T, dS = P (dP z / (1 - p_drop) - Di)
 *   P z / (1 - p_drop) and dS (after the softcap factor) -> shared memory [query][key]
 *   dQ += dS K                                    (registers; written once at the end: no atomics)
 *   dbias: column sums of dS -> fp32 atomics into the (B, H, Sk) accumulator (per-key bias)
 *   warp w owns keys 16 (w % 4) .. + 15 and columns [kDp/2 (w / 4), + kDp/2) of the key side:
 *   dV_t = (P z / (1 - p_drop))^T dO and dK_t = dS^T Q summed over the 128 queries, added with 16-byte
 *   atomics into the fp32 (B, Hkv, Sk, D) accumulators (one atomic per key element per 128 queries).
 * Pipeline: K and V (with the tile's key index, expiry and bias) double-buffered, issued one tile ahead (one
 * CTA per SM: the registers allow no second one, so shared memory is spent on buffers).
 * Work O(Sq * (w + 128)) instead of O(Sq * Sk); the atomics make it non-deterministic (deterministic=1 runs the
 * dkdv and dq kernels with the expiry visibility instead). */
template <int kDp> struct SparseSmem {
    static constexpr int kBM = kBwdSparseTileM, kBN = 64, kWarps = kBM / 16;
    static constexpr int kPS = kBN + 8; /* row stride (elements) of the P and dS tiles: ldmatrix conflict-free */
    static constexpr size_t bytes_of(size_t esz) {
        return esz * ((2 * (size_t)kBM + 4 * kBN) * kDp + 2 * (size_t)kBM * kPS) +
               2 * kBN * (2 * sizeof(int) + sizeof(float));
    }
};

/* acc (16 keys x kAcc) = A^T B over the kQ16 * 16 queries of the tile: A a [query][key] tile (row stride kPS),
 * this warp's keys k0 .. k0+15; B a swizzled [query][kDp] tile, columns [kC0, kC0 + kAcc); then added to dst
 * rows (key index from kidx) with 16-byte atomics (sm90), times mul. */
template <typename T, int kDp, int kQ16, int kAcc, int kC0, int kPS>
__device__ __forceinline__ void sparse_key_side(const Args &a, const T *sA, const T *sB, int k0, const int *kidx,
                                                float *dst, float mul, const Lane &L, int lane) {
    float acc[kAcc / 8][4];
    zero_acc(acc);
    const int nsteps = (a.D + 15) >> 4;
#pragma unroll
    for (int kq = 0; kq < kQ16; kq++) {
        uint32_t af[4];
        fdma_ldmatrix_x4_trans(af, sA + (kq * 16 + L.rB) * kPS + k0 + (((lane >> 3) & 1) << 3));
#pragma unroll
        for (int np = 0; np < kAcc / 16; np++) {
            if (kC0 / 16 + np < nsteps) {
                uint32_t bf[4];
                fdma_ldmatrix_x4_trans(bf, sB + bt_off<kDp>(L, kq * 16, kC0 / 16 + np));
                fdma_mma16816<T>(acc[2 * np], af, bf[0], bf[1]);
                fdma_mma16816<T>(acc[2 * np + 1], af, bf[2], bf[3]);
            }
        }
    }
    /* lanes t4 and t4 ^ 1 swap halves so that each holds 4 consecutive columns of one row: even t4 row gid,
       odd t4 row gid + 8, columns 8n + 4 (t4 >> 1) .. + 3; one 16-byte atomic (sm90) per (n, lane) */
    const int gid = lane >> 2, t4 = lane & 3, odd = t4 & 1;
    const int j = kidx[k0 + gid + 8 * odd];
    float *row = dst + (int64_t)(j < a.sk ? j : 0) * a.D;
#pragma unroll
    for (int n = 0; n < kAcc / 8; n++) {
        const float give0 = odd ? acc[n][0] : acc[n][2], give1 = odd ? acc[n][1] : acc[n][3];
        const float got0 = __shfl_xor_sync(0xffffffffu, give0, 1), got1 = __shfl_xor_sync(0xffffffffu, give1, 1);
        float4 v; /* even: row gid, columns of lane t4 then t4 + 1; odd: row gid + 8, columns of t4 - 1 then t4 */
        if (odd) v = make_float4(got0, got1, acc[n][2], acc[n][3]);
        else v = make_float4(acc[n][0], acc[n][1], got0, got1);
        const int d = kC0 + n * 8 + 4 * (t4 >> 1);
        if (j < a.sk && d < a.D) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
            atomicAdd(reinterpret_cast<float4 *>(row + d), make_float4(v.x * mul, v.y * mul, v.z * mul, v.w * mul));
#else
            atomicAdd(row + d, v.x * mul);
            atomicAdd(row + d + 1, v.y * mul);
            atomicAdd(row + d + 2, v.z * mul);
            atomicAdd(row + d + 3, v.w * mul);
#endif
        }
    }
}

/* The key side of one key tile for warp `warp`: dV (from sP and dO) and dK / scale (from sdS and Q) over the
 * warp's 16 keys and half of the columns. */
template <typename T, int kDp, int kQ16, int kPS>
__device__ __forceinline__ void sparse_key_tile(const Args &a, const T *sP, const T *sdS, const T *sQ, const T *sdO,
                                                const int *kidx, float *dvrow, float *dkrow, int warp,
                                                const Lane &L, int lane) {
    constexpr int kHalf = kDp / 2;
    const int k0 = (warp & 3) * 16;
    if (warp < 4) {
        sparse_key_side<T, kDp, kQ16, kHalf, 0, kPS>(a, sP, sdO, k0, kidx, dvrow, 1.f, L, lane);
        sparse_key_side<T, kDp, kQ16, kHalf, 0, kPS>(a, sdS, sQ, k0, kidx, dkrow, 1.f, L, lane);
    } else {
        sparse_key_side<T, kDp, kQ16, kHalf, kHalf, kPS>(a, sP, sdO, k0, kidx, dvrow, 1.f, L, lane);
        sparse_key_side<T, kDp, kQ16, kHalf, kHalf, kPS>(a, sdS, sQ, k0, kidx, dkrow, 1.f, L, lane);
    }
}

/* C fragments (16 rows x 64 keys, fp32) times f(n, e) -> a [row][key] tile of T (row stride kPS). */
template <typename T, int kPS, typename F>
__device__ __forceinline__ void store_ctile(T *s, const float (&c)[8][4], int row0, int lane, F f) {
    const int gid = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++)
            *reinterpret_cast<uint32_t *>(s + (row0 + gid + 8 * hf) * kPS + n * 8 + 2 * t4) =
                fdma_pack2<T>(c[n][2 * hf] * f(n, 2 * hf), c[n][2 * hf + 1] * f(n, 2 * hf + 1));
}

/* kGen: dropout and softcap compiled in (the launcher picks kGen = false when the call has neither). Scores are
 * taken to the exp2 domain once: bias staged times log2 e, p = 2^(s scale log2 e + bias log2 e - lse log2 e). */
template <typename T, int kDp, bool kGen>
__global__ void __launch_bounds__(32 * SparseSmem<kDp>::kWarps, 1) sparse_kernel(const Args a) {
#ifndef FDMA_BWD_NO_DEVICE_CODE
    using Sm = SparseSmem<kDp>;
    constexpr int kBM = Sm::kBM, kBN = Sm::kBN, kThreads = 32 * Sm::kWarps, kPS = Sm::kPS;
    static_assert(Sm::kWarps == 8 && kDp <= 128, "the key side splits 64 keys x kDp over 4 x 2 warps");
    extern __shared__ __align__(128) unsigned char smem[];
    T *sQ = reinterpret_cast<T *>(smem);
    T *sdO = sQ + kBM * kDp;
    T *sK = sdO + kBM * kDp; /* [2][kBN][kDp] */
    T *sV = sK + 2 * kBN * kDp; /* [2][kBN][kDp] */
    T *sP = sV + 2 * kBN * kDp; /* [kBM][kPS]: P z / (1 - p_drop) */
    T *sdS = sP + kBM * kPS;    /* [kBM][kPS]: dS (softcap factor applied) */
    int *sIdx = reinterpret_cast<int *>(sdS + kBM * kPS); /* [2][kBN] key index of each tile row (>= Sk: none) */
    int *sExp = sIdx + 2 * kBN;                                    /* [2][kBN] its expiry */
    float *sBv = reinterpret_cast<float *>(sExp + 2 * kBN);       /* [2][kBN] its bias (per-key bias) x log2 e */
    constexpr float kLog2e = 1.4426950408889634f;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, t4 = lane & 3;
    const int row0 = warp * 16;
    const Lane L = make_lane(lane);
    const int64_t mt = sparse_tile_index(a), i0 = mt * kBM;
    const int h = blockIdx.y, b = blockIdx.z, hkv = h / a.g;
    const int ksteps = (a.D + 15) >> 4;
    const int64_t r = (int64_t)b * a.ex_rb + (int64_t)(h / a.ex_hdiv) * a.ex_hmul;
    const int64_t lt = r * a.ex_ntiles + (a.ex_ntiles > 1 ? mt : 0);
    const int32_t *list = a.ex_lists + lt * a.ex_cap;
    const int nkeys = sparse_visible_count(a, list, a.ex_counts[lt * a.ex_cstride], i0, kBM, lane);
    const int nN = (nkeys + kBN - 1) / kBN;
    const int32_t *elist = a.ex_elists ? a.ex_elists + lt * a.ex_cap : nullptr;
    const T *brow = a.bias ? (const T *)a.bias + b * a.bs[0] + (int64_t)(h / a.bhdiv) * a.bs[1] : nullptr;

    const T *gk = (const T *)a.k + b * a.ks[0] + (int64_t)hkv * a.ks[2];
    const T *gv = (const T *)a.v + b * a.vs[0] + (int64_t)hkv * a.vs[2];
    load_rows<T, kBM, kDp, kThreads>(sQ, (const T *)a.q + b * a.qs[0] + (int64_t)h * a.qs[2] + i0 * a.qs[1], a.qs[1],
                                     a.Sq - i0, a.D);
    load_rows<T, kBM, kDp, kThreads>(sdO, (const T *)a.dout + b * a.dos[0] + (int64_t)h * a.dos[2] + i0 * a.dos[1],
                                     a.dos[1], a.Sq - i0, a.D);
    constexpr int kCh = kDp / 8;
    /* rows of key tile nb: K and V by list index into buffer buf, plus index, expiry and bias */
    auto load_kv = [&](int nb, int buf) {
        T *dk_ = sK + buf * kBN * kDp, *dv_ = sV + buf * kBN * kDp;
#pragma unroll 4
        for (int c = threadIdx.x; c < kBN * kCh; c += kThreads) {
            const int rr = c / kCh, ch = c % kCh, pos = nb * kBN + rr;
            const int j = pos < nkeys ? __ldg(list + pos) : -1;
            const bool pred = j >= 0 && ch * 8 < a.D;
            fdma_cp_async16(dk_ + swz<kDp>(rr, ch), pred ? gk + (int64_t)j * a.ks[1] + ch * 8 : gk, pred ? 16 : 0);
            fdma_cp_async16(dv_ + swz<kDp>(rr, ch), pred ? gv + (int64_t)j * a.vs[1] + ch * 8 : gv, pred ? 16 : 0);
            if (ch == 0) store_key_meta<T, kBN>(a, sIdx, sExp, sBv, buf, rr, j, pos, elist, brow);
        }
    };
    if (nN > 0) load_kv(0, 0);
    fdma_cp_async_commit();

    float lse_r[2], di_r[2];
    row_stats(a, b, h, i0 + row0 + gid, lse_r, di_r);
    const float lse2[2] = {lse_r[0] * kLog2e, lse_r[1] * kLog2e}, scale2 = a.scale * kLog2e;
    float *dkrow, *dvrow, *dbrow;
    sparse_acc_rows(a, b, h, hkv, dkrow, dvrow, dbrow);

    float acc[kDp / 8][4];
    zero_acc(acc);

    for (int nb = 0; nb < nN; nb++) {
        const int buf = nb & 1;
        __syncthreads(); /* every warp is done with tile nb - 1 (its K buffer, sP, sdS) */
        if (nb + 1 < nN) load_kv(nb + 1, buf ^ 1);
        fdma_cp_async_commit();
        fdma_cp_async_wait<1>();
        __syncthreads();
        const int *sI = sIdx + buf * kBN;
        const T *sKb = sK + buf * kBN * kDp, *sVb = sV + buf * kBN * kDp;
        const int *sEb = sExp + buf * kBN;
        const float *sBb = sBv + buf * kBN;

        float s[8][4];
        gemm_rows_bt<T, kDp, 8>(s, sQ, row0, sKb, ksteps, L); /* S = Q K^T */
        /* P from the tile's key data in shared memory: visible iff row in range, j <= lim < e[j] (causal limit
           lim = i + Sk - Sq, else Sk - 1; padding has j = INT_MAX, e = 0) */
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int i = (int)i0 + row0 + gid + 8 * hf;
            const int lim = i >= a.sq ? -1 : a.causal ? i + a.sk - a.sq : a.sk - 1;
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    const int c = n * 8 + 2 * t4 + u;
                    const float x = kGen && a.softcap > 0.f
                                        ? a.softcap * kLog2e * tanhf(s[n][2 * hf + u] * a.scale * a.inv_softcap) + sBb[c]
                                        : fmaf(s[n][2 * hf + u], scale2, sBb[c]);
                    const bool v = sI[c] <= lim && lim < sEb[c];
                    s[n][2 * hf + u] = v ? exp2f(x - lse2[hf]) : 0.f;
                }
        }
        const uint32_t keep = kGen && a.dropout ? keep_bits<false, 8>(a, b, h, i0, 0, row0, lane, sI) : 0xffffffffu;
        store_ctile<T, kPS>(sP, s, row0, lane, [&](int n, int e) {
            return !kGen ? 1.f : ((keep >> (4 * n + e)) & 1) ? a.drop_scale : 0.f;
        });
        float dp[8][4];
        gemm_rows_bt<T, kDp, 8>(dp, sdO, row0, sVb, ksteps, L); /* dP = dO V^T */
        if constexpr (kGen) {
            dp_to_ds<false, 8>(a, dp, s, keep, row0, lane, [&](int il) { return di_r[(il - row0) >> 3]; });
        } else {
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) dp[n][e] = s[n][e] * (dp[n][e] - di_r[e >> 1]);
        }
        if (dbrow) dbias_key_sums(a, dp, dbrow, sI, lane);
        if (kGen && a.softcap > 0.f) {
            gemm_rows_bt<T, kDp, 8>(s, sQ, row0, sKb, ksteps, L);
            softcap_grad<8>(a, dp, s);
        }
        store_ctile<T, kPS>(sdS, dp, row0, lane, [](int, int) { return 1.f; });
        uint32_t da[4][4];
        to_afrag<T, 8>(da, dp, [](int, int) { return 1.f; });
        gemm_regs_b<T, kDp, 8>(acc, da, sKb, ksteps, L); /* dQ += dS K */
        __syncthreads();                                  /* P and dS tiles complete */
        sparse_key_tile<T, kDp, kBM / 16, kPS>(a, sP, sdS, sQ, sdO, sI, dvrow, dkrow, warp, L, lane);
    }
    fdma_cp_async_wait<0>();

    write_dq<T, kDp>(a, acc, b, h, i0 + row0, lane);
#endif
}

/* Launch the sparse kernel: grid (query tiles of kBM rows, H, B). */
template <typename T, int kDp>
cudaError_t launch_sparse(const Args &a, cudaStream_t st) {
    using Sm = SparseSmem<kDp>;
    const size_t sm = Sm::bytes_of(sizeof(T));
    auto k = a.dropout || a.softcap > 0.f ? sparse_kernel<T, kDp, true> : sparse_kernel<T, kDp, false>;
    cudaError_t err = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    if (err != cudaSuccess) return err;
    k<<<dim3((unsigned)((a.Sq + Sm::kBM - 1) / Sm::kBM), (unsigned)a.H, (unsigned)a.B), 32 * Sm::kWarps, sm, st>>>(a);
    return cudaGetLastError();
}

} /* namespace fdma_bwdk */

#endif /* FDMA_CUDA_BWD_SPARSE_CUH */
