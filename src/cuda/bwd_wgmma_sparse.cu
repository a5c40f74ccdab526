/*
 * bwd_wgmma_sparse.cu -- the query-major backward over gathered key lists (top-k window SPARSE mode, row-broadcast
 * masks; bwd_sparse.cuh's kernel) on Hopper's warpgroup MMA (wgmma, sm_90a), for head dims padded to 128 without
 * dropout or softcap, on compute capability 9.0 exactly (bwd.cu's plan, "_wgmma" in its name; FDMA_BWD_WGMMA=0 turns
 * it off). Built for sm_90a only, like bwd_wgmma.cu.
 *
 * Shapes as in bwd_common.cuh: q, dout (B, Sq, H, D); k, v (B, Sk, Hkv, D); dkacc, dvacc fp32 (B, Hkv, Sk, D)
 * accumulators (bwd.cu scales and converts them); lse, Di (B, H, Sq).
 *
 * Grid and lists as bwd_sparse.cuh's kernel: one CTA per (128 query rows = one tile of the window's key lists, query
 * head, batch); 256 threads = 2 warpgroups, warpgroup g owns query rows 64 g .. 64 g + 63 (warp w: rows 16 w ..),
 * so the per-warp register layouts are the mma.sync kernel's and its visibility / dbias / write_dq code applies.
 * Per key tile of 64 gathered keys (K and V rows loaded by index, double-buffered: the next tile's copy is issued
 * right after this tile's S / dP products, its list indices read a tile earlier and its rows' key data (index, expiry,
 * bias) held in registers until the end of the tile, so that no thread waits on a global load; one barrier per tile
 * before the products and one for P / dS):
 *   S  (64 q x 64 keys) = Q_g K^T            SS wgmma, K-major;  dP = dO_g V^T  the same, overlapping P's math
 *   P (visible: j <= lim_i < expiry[j]), dS = P (dP - Di); per-key bias: each warp's dS column sums staged, summed
 *   over the 8 warps by 64 threads under the key-side products, one atomic per key and tile
 *   P, dS -> shared [q][key] (128-byte rows, swizzled)
 *   dQ_g (64 x 128) += dS K                  RS wgmma (dS from registers), K N-major; in registers to the end
 *   barrier; key side over the CTA's 128 queries: warpgroup 0 dV_t = P^T dO, warpgroup 1 dK_t = dS^T Q
 *   (64 keys x 128, SS wgmma, both operands MN-major), added to the fp32 accumulators by 8-byte reductions
 *   (one per key element per 128 queries).
 * Registers per thread: dQ 64 fp32, S / dP 32 each, the key side 64 (live after S / dP are gone).
 *
 * Shared memory (1024-byte aligned tiles, see wgmma.cuh), 166 KB: Q, dO [2 halves][128][64] (32 KB each); K, V
 * [2 buffers][2 halves][64][64] (32 KB each); P, dS [128 q][64 keys] (16 KB each); key index, expiry, bias x log2 e
 * [2][64] each; dbias sums [8 warps][64].
 */
#include <climits>

#include "bwd_common.cuh"
#include "wgmma.cuh"

namespace fdma_bwdk {

using namespace fdma_wg;

constexpr int kSwBM = kBwdSparseTileM, kSwBN = 64, kSwThreads = 256;
constexpr uint32_t kSwHalfQ = kSwBM * 128, kSwHalfK = kSwBN * 128; /* one 64-column half of a Q / K tile */
constexpr uint32_t kSwOffdO = 2 * kSwHalfQ, kSwOffK = 4 * kSwHalfQ, kSwOffV = kSwOffK + 4 * kSwHalfK;
constexpr uint32_t kSwOffP = kSwOffV + 4 * kSwHalfK, kSwOffdS = kSwOffP + kSwBM * 128, kSwOffIdx = kSwOffdS + kSwBM * 128;
constexpr uint32_t kSwOffDb = kSwOffIdx + 3 * 2 * kSwBN * 4;
constexpr uint32_t kSwSmem = kSwOffDb + (kSwThreads / 32) * kSwBN * 4 + 1024; /* + 1024: the base is aligned up at run time */

/* acc (16 key rows of this warp x 128) -> the fp32 accumulator rows kidx[...] by 8-byte reductions (lane: rows gid,
 * gid + 8, columns 8 n + 2 t4, + 1; RedRowsF32x2). */
__device__ __forceinline__ void key_rows_red(const Args &a, const float (&acc)[16][4], float *dst, const int *kidx,
                                             int r0, int lane) {
    const int gid = lane >> 2, t4 = lane & 3;
    const int ja = kidx[r0 + gid], jb = kidx[r0 + gid + 8];
    const uint32_t cols = col_pair_mask<16>(2 * t4, a.D);
    RedRowsF32x2<0, 16>::run(dst + (int64_t)(ja < a.sk ? ja : 0) * a.D + 2 * t4,
                             dst + (int64_t)(jb < a.sk ? jb : 0) * a.D + 2 * t4, ja < a.sk ? cols : 0u,
                             jb < a.sk ? cols : 0u, acc);
}

/* C fragments (16 rows x 64 keys) -> a [row][key] tile of 128-byte swizzled rows at smem + row0 * 128. */
template <typename T>
__device__ __forceinline__ void store_ptile(unsigned char *s, const float (&c)[8][4], int row0, int lane) {
    const int gid = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int r = row0 + gid + 8 * hf;
            *reinterpret_cast<uint32_t *>(s + r * 128 + ((n ^ (r & 7)) << 4) + 4 * t4) =
                fdma_pack2<T>(c[n][2 * hf], c[n][2 * hf + 1]);
        }
}

template <typename T> __global__ void __launch_bounds__(kSwThreads, 1) wgmma_sparse_kernel(const Args a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const uint32_t raw = fdma_smem_u32(smem_raw);
    const uint32_t sb = (raw + 1023u) & ~1023u;
    unsigned char *smem = smem_raw + (sb - raw);
    int *sIdx = reinterpret_cast<int *>(smem + kSwOffIdx); /* [2][kSwBN] key index (>= Sk: none) */
    int *sExp = sIdx + 2 * kSwBN;                           /* [2][kSwBN] its expiry */
    float *sBv = reinterpret_cast<float *>(sExp + 2 * kSwBN); /* [2][kSwBN] its bias x log2 e */
    float *sDb = reinterpret_cast<float *>(smem + kSwOffDb);  /* [8 warps][kSwBN] dbias column sums of the tile */
    constexpr float kLog2e = 1.4426950408889634f;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, t4 = lane & 3, wg = warp >> 2;
    const int row0 = warp * 16;
    const int64_t mt = sparse_tile_index(a), i0 = mt * kSwBM;
    const int h = blockIdx.y, b = blockIdx.z, hkv = h / a.g;
    const int64_t r = (int64_t)b * a.ex_rb + (int64_t)(h / a.ex_hdiv) * a.ex_hmul;
    const int64_t lt = r * a.ex_ntiles + (a.ex_ntiles > 1 ? mt : 0);
    const int32_t *list = a.ex_lists + lt * a.ex_cap;
    const int nkeys = sparse_visible_count(a, list, a.ex_counts[lt * a.ex_cstride], i0, kSwBM, lane);
    const int nN = (nkeys + kSwBN - 1) / kSwBN;
    const int32_t *elist = a.ex_elists ? a.ex_elists + lt * a.ex_cap : nullptr;
    const T *brow = a.bias ? (const T *)a.bias + b * a.bs[0] + (int64_t)(h / a.bhdiv) * a.bs[1] : nullptr;
    const T *gk = (const T *)a.k + b * a.ks[0] + (int64_t)hkv * a.ks[2];
    const T *gv = (const T *)a.v + b * a.vs[0] + (int64_t)hkv * a.vs[2];
    const uint32_t sQ = sb, sdO = sb + kSwOffdO, sP = sb + kSwOffP, sdS = sb + kSwOffdS;

    wg_load_rows<T, kSwBM, kSwThreads>(sQ, (const T *)a.q + b * a.qs[0] + (int64_t)h * a.qs[2] + i0 * a.qs[1],
                                       a.qs[1], a.Sq - i0, a.D);
    wg_load_rows<T, kSwBM, kSwThreads>(sdO, (const T *)a.dout + b * a.dos[0] + (int64_t)h * a.dos[2] + i0 * a.dos[1],
                                       a.dos[1], a.Sq - i0, a.D);
    /* The gathered loads, software-pipelined so that no thread waits on a global load in the loop: each thread's 4
       rows (threadIdx.x / 16 + 16 k, 16-byte chunk threadIdx.x % 16) take their key index from jn, read one tile
       ahead; threads t < 64 keep row t's key data (index, expiry, bias) in registers from the copy's issue and
       store it to shared memory at the end of the iteration. */
    const int crow = threadIdx.x >> 4, cc = threadIdx.x & 15;
    int jn[4];    /* key index of row crow + 16 k of the next tile to copy (-1: past the list) */
    int jmn = -1; /* threads t < 64: key index of row t of that tile */
    auto read_idx = [&](int nb) {
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int pos = nb * kSwBN + crow + 16 * k;
            jn[k] = pos < nkeys ? __ldg(list + pos) : -1;
        }
        if (threadIdx.x < kSwBN) {
            const int pos = nb * kSwBN + threadIdx.x;
            jmn = pos < nkeys ? __ldg(list + pos) : -1;
        }
    };
    int jm = -1, em = 0;
    float bm = 0.f;
    /* K and V rows of tile nb into buffer buf by the indices in jn; the key data of row t into registers */
    auto copy_kv = [&](int nb, int buf) {
        const uint32_t dk_ = sb + kSwOffK + buf * 2 * kSwHalfK, dv_ = sb + kSwOffV + buf * 2 * kSwHalfK;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int rr = crow + 16 * k, j = jn[k];
            const bool pred = j >= 0 && cc * 8 < a.D;
            const uint32_t off = (cc >> 3) * kSwHalfK + rr * 128 + (((cc & 7) ^ (rr & 7)) << 4);
            fdma_cp_async16_s(dk_ + off, pred ? gk + (int64_t)j * a.ks[1] + cc * 8 : gk, pred ? 16 : 0);
            fdma_cp_async16_s(dv_ + off, pred ? gv + (int64_t)j * a.vs[1] + cc * 8 : gv, pred ? 16 : 0);
        }
        if (threadIdx.x < kSwBN) {
            jm = jmn;
            em = jm < 0 ? 0 : elist ? __ldg(elist + nb * kSwBN + threadIdx.x) : INT_MAX;
            bm = (brow && jm >= 0) ? to_f(brow[(int64_t)jm * a.bs[3]]) * 1.4426950408889634f : 0.f;
        }
    };
    auto store_meta = [&](int buf) {
        if (threadIdx.x < kSwBN) {
            sIdx[buf * kSwBN + threadIdx.x] = jm >= 0 ? jm : INT_MAX;
            sExp[buf * kSwBN + threadIdx.x] = em;
            sBv[buf * kSwBN + threadIdx.x] = bm;
        }
    };
    if (nN > 0) {
        read_idx(0);
        copy_kv(0, 0);
        store_meta(0);
    }
    fdma_cp_async_commit();
    if (nN > 1) read_idx(1);

    float lse_r[2], di_r[2];
    row_stats(a, b, h, i0 + row0 + gid, lse_r, di_r);
    const float lse2[2] = {lse_r[0] * kLog2e, lse_r[1] * kLog2e}, scale2 = a.scale * kLog2e;
    float *dkrow, *dvrow, *dbrow;
    sparse_acc_rows(a, b, h, hkv, dkrow, dvrow, dbrow);
    /* descriptor words (wgmma.cuh): this warpgroup's query rows (K-major A of S / dP), the staged P / dS (M-major A of
       the key side) and Q / dO (its N-major B, LBO = the stride of the 64-column halves); k steps add constants */
    constexpr uint32_t kHi = desc_hi(1024);
    const uint32_t qAlo = desc_lo(sQ + wg * 64 * 128, 16), doAlo = desc_lo(sdO + wg * 64 * 128, 16);
    const uint32_t kAmlo = desc_lo(wg == 0 ? sP : sdS, 8192), kBnlo = desc_lo(wg == 0 ? sdO : sQ, kSwHalfQ);

    float acc[16][4]; /* dQ rows row0 + gid (+8) x 128 */
    zero_acc(acc);

    for (int nb = 0; nb < nN; nb++) {
        const int buf = nb & 1;
        fdma_cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads(); /* tile nb visible; every warp is done with tile nb - 1 (its K / V buffer, P, dS) */
        const int *sI = sIdx + buf * kSwBN, *sEb = sExp + buf * kSwBN;
        const float *sBb = sBv + buf * kSwBN;
        const uint32_t sK = sb + kSwOffK + buf * 2 * kSwHalfK, sV = sb + kSwOffV + buf * 2 * kSwHalfK;
        const uint32_t klo = desc_lo(sK, kSwHalfK), vlo = desc_lo(sV, kSwHalfK);

        float s[8][4], dp[8][4];
        wg_fence();
        wg_ss64_k128<T>(s, qAlo, kSwHalfQ, klo, kSwHalfK, kHi);
        wg_commit();
        wg_ss64_k128<T>(dp, doAlo, kSwHalfQ, vlo, kSwHalfK, kHi);
        wg_commit();
        /* the next tile's rows under the products (their indices were read one tile ahead), then the indices of the
           tile after it */
        if (nb + 1 < nN) copy_kv(nb + 1, buf ^ 1);
        fdma_cp_async_commit();
        if (nb + 2 < nN) read_idx(nb + 2);
        wg_wait<1>();
        wg_reg_fence(s);
        /* P from the tile's key data: visible iff row in range, j <= lim < e[j] (causal limit lim = i + Sk - Sq,
           else Sk - 1; padding has j = INT_MAX, e = 0) */
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int i = (int)i0 + row0 + gid + 8 * hf;
            const int lim = i >= a.sq ? -1 : a.causal ? i + a.sk - a.sq : a.sk - 1;
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    const int c = n * 8 + 2 * t4 + u;
                    const bool v = sI[c] <= lim && lim < sEb[c];
                    s[n][2 * hf + u] = v ? exp2f(fmaf(s[n][2 * hf + u], scale2, sBb[c]) - lse2[hf]) : 0.f;
                }
        }
        store_ptile<T>(smem + kSwOffP, s, row0, lane);
        wg_wait<0>();
        wg_reg_fence(dp);
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) dp[n][e] = s[n][e] * (dp[n][e] - di_r[e >> 1]);
        if (dbrow) dbias_warp_sums(dp, sDb + warp * kSwBN, lane);
        store_ptile<T>(smem + kSwOffdS, dp, row0, lane);
        uint32_t da[4][4];
        to_afrag<T, 8>(da, dp, [](int, int) { return 1.f; });
        wg_fence();
#pragma unroll
        for (int kq = 0; kq < 4; kq++) /* dQ += dS K: K [key][d] N-major, 16 keys per k step */
            WgRS128<T, 1>::run(acc, da[kq], desc_of(klo + kq * 128, kHi));
        wg_commit();
        fence_proxy_async();
        __syncthreads(); /* P and dS of both warpgroups complete */
        float kacc[16][4];
        /* warpgroup 0: dV_t = P^T dO; 1: dK_t = dS^T Q (A [q][key] M-major, B [q][d] N-major, 16 queries a step) */
        WgSS128<T, 1, 1>::first(kacc, desc_of(kAmlo, kHi), desc_of(kBnlo, kHi));
#pragma unroll
        for (int kq = 1; kq < kSwBM / 16; kq++)
            WgSS128<T, 1, 1>::run(kacc, desc_of(kAmlo + kq * 128, kHi), desc_of(kBnlo + kq * 128, kHi));
        wg_commit();
        /* the tile's dbias sums (staged before the barrier above; read before the next tile's top barrier) */
        if (dbrow && threadIdx.x < kSwBN) dbias_flush(a, sDb, kSwThreads / 32, dbrow, sI, threadIdx.x);
        wg_wait<0>();
        wg_reg_fence(acc);
        wg_reg_fence(kacc);
        key_rows_red(a, kacc, wg == 0 ? dvrow : dkrow, sI, (warp & 3) * 16, lane);
        if (nb + 1 < nN) store_meta(buf ^ 1); /* tile nb + 1's key data, read after the next top barrier */
    }
    fdma_cp_async_wait<0>();
    write_dq<T, 128>(a, acc, b, h, i0 + row0, lane);
#endif
}

cudaError_t launch_wgmma_sparse_d128(const Args &a, int bf16, cudaStream_t st) {
    const dim3 grid((unsigned)((a.Sq + kSwBM - 1) / kSwBM), (unsigned)a.H, (unsigned)a.B);
    return bf16 ? launch_smem(wgmma_sparse_kernel<__nv_bfloat16>, grid, kSwThreads, kSwSmem, st, a)
                : launch_smem(wgmma_sparse_kernel<__half>, grid, kSwThreads, kSwSmem, st, a);
}

} /* namespace fdma_bwdk */
