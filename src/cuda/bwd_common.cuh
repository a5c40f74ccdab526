/*
 * bwd_common.cuh -- the CUDA backward kernels of flash-dmattn (SPEC section 4), as templates that the
 * per-head-dim translation units bwd_d64.cu, bwd_d128.cu, bwd_d256.cu instantiate. Hand-written code
 * (mma.sync m16n8k16 with fp32 accumulate, ldmatrix, cp.async, through the small PTX wrappers below); built
 * for sm90 only for now (see kDkdvBM for why sm80 is refused).
 *
 * Shapes: q, out, dout, dq (B, Sq, H, D); k, v, dk, dv (B, Sk, Hkv, D); lse, Di (B, H, Sq) fp32;
 * mask, bias, dbias 4-D views ({B|1}, {H|Hkv|1}, {Sq|1}, Sk). D is padded to kDp (64, 128, 256) in shared
 * memory with zeros; g = H / Hkv query heads share one kv head.
 *
 * Algorithm (FlashAttention-2 backward, transposed so that every warp owns 16 keys):
 *   dkdv kernel, one CTA per (key block of kBN keys, kv head or query head, batch), kBN/16 warps:
 *     for each query head h it owns, for each query block of 32 rows (causal and all-False mask tiles
 *     skipped; Q, dO, lse, Di double-buffered with cp.async):
 *       S^T  = K Q^T                          (warp: 16 keys x 32 queries, registers)
 *       P^T  = exp(softcap/bias/scale(S^T) - lse), 0 where not visible
 *       dV  += (P^T * z / (1 - p_drop)) dO      (A operand straight from the S^T registers)
 *       dP^T = V dO^T;  dS^T = P^T * (dP^T * z / (1 - p_drop) - Di)   -> dbias (written or reduced)
 *       dSc  = dS * (1 - tanh^2(s_pre / softcap))  (softcap only; S^T recomputed, no extra registers)
 *       dK  += dSc^T Q
 *       dQ  += dSc K  -> fp32 atomics into a workspace accumulator (default), or nothing (deterministic)
 *     For kDp > 64 the dV and dK accumulators (16 x kDp fp32 per warp each) do not both fit in registers:
 *     the query loop runs once per 128-column slice of dV, then once per slice of dK (the first dK pass also
 *     does dQ and dbias), recomputing S^T each time (kDp = 128: 6 matrix products instead of 5).
 *   The common calls (dense_eligible: no dropout, softcap or window, default mode, kDp <= 128, no bias, a per-key
 *   bias or a full bias with 16-byte rows) run bwd_dense.cuh's one-pass kernel instead, with the same CTA ownership
 *   (except ACC dbias: a CTA per query head there, see below) and the shared pieces below (DkdvTiles, load_q_tile,
 *   for_each_unit, begin_unit, dq_atomic, dbias_zero, write_kv).
 *   dq kernel (deterministic=1 only), one CTA per (64 query rows, query head, batch), 4 warps of 16 rows:
 *     recomputes S, P, dP, dS over the visible key blocks and owns dq rows: no atomics.
 *   Small kernels in bwd.cu: Di = rowsum(dout * out), dq/dk/dv conversion and GQA reduction of per-head
 *   partials, dbias finalisation. The query-major kernel over gathered key lists (top-k window, row-broadcast
 *   masks) is bwd_sparse.cuh's; the per-head-dim launch template is bwd_launch.cuh's.
 *
 * dbias: a bias without broadcast dims gets dS written in place (mode DIRECT). Every broadcast form is
 * accumulated in fp32 in the workspace (mode ACC: one fp32 element per bias element, or ACC_ROWS: one per
 * (batch, query head, key) partial for row-broadcast biases; rows of a multiple of 4 floats), then summed and
 * rounded by bwd.cu's dbias_finalize. Who adds to an ACC element:
 *   - the kernels of this file (deterministic mode, and the default-mode calls that bwd_dense.cuh does not take):
 *     exactly one thread of one CTA per element (the host makes a CTA loop over the batches or kv heads that
 *     share it), so the result is the same bit for bit on every run;
 *   - bwd_dense.cuh's kernel (default mode only): ACC from a CTA per query head, by fp32 atomic reductions
 *     (vector red.add on sm90) from the CTAs that share an element, so its last bits may vary from run to run, as
 *     dq's do; its ACC_ROWS partials (per query head) have one owner lane. bwd_sparse.cuh's kernel (default mode)
 *     adds its ACC_ROWS column sums by atomics.
 */
#ifndef FDMA_CUDA_BWD_COMMON_CUH
#define FDMA_CUDA_BWD_COMMON_CUH

#include <climits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "common.cuh"
#include "philox.h"

namespace fdma_bwdk {

/* ---- kernel arguments (host fills, kernels read by value) -------------------------------------------- */

enum { DBIAS_NONE = 0, DBIAS_DIRECT = 1, DBIAS_ACC = 2, DBIAS_ACC_ROWS = 3 };

struct Args {
    const void *q, *k, *v, *out, *dout;
    int64_t qs[3], ks[3], vs[3], dos[3]; /* (batch, seq, head) strides in elements; dim stride is 1 */
    void *dq, *dk, *dv;
    int64_t dqs[3], dks[3], dvs[3];
    const uint8_t *mask; /* element (b,h,i,j) at b*ms[0] + (h/mhdiv)*ms[1] + i*ms[2] + j*ms[3] */
    int64_t ms[4];
    int mhdiv;
    const int32_t *expiry; /* top-k window, SPARSE mode (window.cuh): row r = b*ex_rb + (h/ex_hdiv)*ex_hmul, (i, j)
                              visible iff j <= lim_i < expiry[r*Sk + j]; NULL = none */
    int64_t ex_rb;
    int ex_hdiv, ex_hmul;
    const int32_t *ex_lists, *ex_counts; /* sparse kernel: the key list of query tile t of row r at
                                            ex_lists + (r*ex_ntiles + t)*ex_cap, length ex_counts[r*ex_ntiles + t] */
    const int32_t *ex_elists;            /* the expiry of each list entry, same layout as ex_lists; NULL: the lists
                                            of a row-broadcast mask (every listed key visible up to causality) */
    int64_t ex_cstride;                  /* counts of list lt at ex_counts[lt * ex_cstride] */
    int64_t ex_cap, ex_ntiles;
    float *dkacc, *dvacc; /* sparse kernel: fp32 (B, Hkv, Sk, D) accumulators of dk / scale and dv */
    const void *bias;
    int64_t bs[4];
    int bhdiv;
    int dbias_mode;      /* DBIAS_* */
    void *dbias;         /* DIRECT: dbias[b*dbs[0] + h*dbs[1] + i*dbs[2] + j*dbs[3]] */
    int64_t dbs[4];
    float *dbacc;        /* ACC: dbacc[b*acs[0] + (h/achdiv)*acs[1] + i*acs[2] + j], rows of Sk rounded up to 4 */
    int64_t acs[3];
    int achdiv;
    const float *lse;    /* (B, H, Sq) */
    const float *Di;     /* (B, H, Sq) */
    float *dqacc;        /* (B, Sq, H, D) fp32, default mode */
    float *dkpart, *dvpart; /* (B, H, Sk, D) fp32 per-query-head partials when hph == 1 and g > 1 */
    int B, H, Hkv, g, D;
    int64_t Sq, Sk;
    int sq, sk; /* the same as 32-bit ints (the plan refuses Sq, Sk >= 2^31 - 256) for per-element tests */
    float scale, softcap, inv_softcap;
    int causal;
    int dropout;
    uint32_t drop_thr;
    float drop_scale;
    uint64_t seed, offset;
    const uint64_t *rng_state; /* NULL = seed/offset; else device {seed, offset}, read by keep_bits (graphs) */
    int b_per_cta, hkv_per_cta, hph; /* CTA ownership: batches, kv heads, query heads per kv head; hph == 1
                                        with g > 1 means one CTA per query head (grid.y = H) */
    int wgmma; /* kDp = 128 on a 9.0 device: bwd_wgmma.cu's (dense) or bwd_wgmma_sparse.cu's kernel runs (bwd.cu) */
};

/* ---- PTX wrappers ------------------------------------------------------------------------------------- */

/* The cp.async / ldmatrix / mma.sync wrappers are common.cuh's (fdma_*); this file adds the 4-byte copy the
 * unaligned paths need. pred false writes zeros (src-size 0, nothing read). */
__device__ __forceinline__ void cp_async4(void *dst, const void *src, bool pred) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(fdma_smem_u32(dst)), "l"(src),
                 "r"(pred ? 4 : 0));
}

__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

/* ---- shared-memory tiles --------------------------------------------------------------------------------
 * A tile of R rows x C elements (C a multiple of 64), 16-byte chunk ch of row r stored at chunk ch ^ (r & 7):
 * the 8 rows that one ldmatrix phase reads land in 8 different bank groups. */
template <int C> __device__ __forceinline__ int swz(int r, int ch) { return r * C + ((ch ^ (r & 7)) << 3); }

/* Rows [0, R) of a global (rows, D) slab with row stride `rs` into a swizzled R x C tile; rows >= nvalid and
 * columns >= D become zeros. */
template <typename T, int R, int C, int kThreads, bool kBump = false>
__device__ __forceinline__ void load_rows(T *s, const T *g, int64_t rs, int64_t nvalid, int D) {
    constexpr int kCh = C / 8;
    if constexpr (kBump) {
        /* thread x copies chunk x % kCh of rows x / kCh, x / kCh + kRowStep, ...: one pointer bumped per row step
           (no per-row 64-bit offsets for the compiler to keep across the caller's loop: the dense kernel) */
        constexpr int kRowStep = kThreads / kCh;
        static_assert(kThreads % kCh == 0, "a thread keeps its chunk column");
        const int r0 = threadIdx.x / kCh, ch = threadIdx.x % kCh;
        const bool col_ok = ch * 8 < D;
        const T *p = g + r0 * rs + ch * 8;
#pragma unroll
        for (int it = 0; it < (R + kRowStep - 1) / kRowStep; it++) {
            const int r = r0 + it * kRowStep;
            if (R % kRowStep == 0 || r < R) {
                const bool pred = col_ok && r < nvalid;
                fdma_cp_async16(s + swz<C>(r, ch), pred ? p : g, pred ? 16 : 0);
            }
            p += kRowStep * rs;
        }
    } else {
#pragma unroll
        for (int c = threadIdx.x; c < R * kCh; c += kThreads) {
            const int r = c / kCh, ch = c % kCh;
            const bool pred = r < nvalid && ch * 8 < D;
            fdma_cp_async16(s + swz<C>(r, ch), pred ? g + r * rs + ch * 8 : g, pred ? 16 : 0);
        }
    }
}

/* ldmatrix addresses, split into a per-lane part computed once and compile-time constants, so that the
 * compiler folds them into the instructions' immediate offsets instead of keeping one register per address.
 * A 16x16 operand spans 16-byte chunks 2q and 2q+1 (q = 16-column step); with the swizzle above, chunk
 * 2q + c of a row r (r % 8 == lane % 8) sits at 8*(q>>2) + ((2*(q&3)) ^ y), y = c ^ (lane & 7).
 *   A  non-trans: A (m16 x k16) at rows r0.., k step q of a [m][k] tile
 *   B  non-trans: two n8 tiles at rows n0.., k step q of a [n][k] tile
 *   Bt trans:     two n8 tiles, n step q, at rows k0.. of a [k][n] tile
 *   At trans:     A (m16 x k16), m step q, at rows k0.. of a [k][m] tile */
struct Lane {
    int yA, yB;     /* swizzle selectors */
    int rA, rB, rT; /* row inside the 16-row group for the A, B/At and Bt patterns */
};
__device__ __forceinline__ Lane make_lane(int lane) {
    Lane L;
    L.yA = (lane >> 4) ^ (lane & 7);
    L.yB = ((lane >> 3) & 1) ^ (lane & 7);
    L.rA = lane & 15;
    L.rB = (lane & 7) + ((lane >> 4) << 3);
    L.rT = (lane & 7) + (((lane >> 3) & 1) << 3);
    return L;
}
__device__ __forceinline__ int chunk_off(int q, int y) { return ((q >> 2) << 6) + (((2 * (q & 3)) ^ y) << 3); }
template <int C> __device__ __forceinline__ int a_off(const Lane &L, int r0, int q) {
    return (r0 + L.rA) * C + chunk_off(q, L.yA);
}
template <int C> __device__ __forceinline__ int b_off(const Lane &L, int n0, int q) {
    return (n0 + L.rB) * C + chunk_off(q, L.yB);
}
template <int C> __device__ __forceinline__ int bt_off(const Lane &L, int k0, int q) {
    return (k0 + L.rT) * C + chunk_off(q, L.yA);
}
template <int C> __device__ __forceinline__ int at_off(const Lane &L, int k0, int q) {
    return (k0 + L.rB) * C + chunk_off(q, L.yB);
}

/* c (16 x 8kN) = A[r0 .. r0+16)[0, kDp) . B[0 .. 8kN)[0, kDp)^T, both [row][kDp] tiles; k steps past D
 * skipped. */
template <typename T, int kDp, int kN>
__device__ __forceinline__ void gemm_rows_bt(float (&c)[kN][4], const T *sA, int r0, const T *sB, int ksteps,
                                             const Lane &L) {
#pragma unroll
    for (int n = 0; n < kN; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) c[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kDp / 16; kk++) {
        if (kk < ksteps) {
            uint32_t a[4];
            fdma_ldmatrix_x4(a, sA + a_off<kDp>(L, r0, kk));
#pragma unroll
            for (int np = 0; np < kN / 2; np++) {
                uint32_t b[4];
                fdma_ldmatrix_x4(b, sB + b_off<kDp>(L, np * 16, kk));
                fdma_mma16816<T>(c[2 * np], a, b[0], b[1]);
                fdma_mma16816<T>(c[2 * np + 1], a, b[2], b[3]);
            }
        }
    }
}

/* acc (16 x kAcc) += A (16 x 8kN, registers, A-fragment layout) . B (8kN x [kC0, kC0 + kAcc)) of a [k][kDp]
 * tile; column steps past D skipped. */
template <typename T, int kDp, int kN, int kAcc = kDp, int kC0 = 0>
__device__ __forceinline__ void gemm_regs_b(float (&acc)[kAcc / 8][4], const uint32_t (&a)[kN / 2][4], const T *sB,
                                            int nsteps, const Lane &L) {
#pragma unroll
    for (int np = 0; np < kAcc / 16; np++) {
        if (kC0 / 16 + np < nsteps) {
#pragma unroll
            for (int kq = 0; kq < kN / 2; kq++) {
                uint32_t b[4];
                fdma_ldmatrix_x4_trans(b, sB + bt_off<kDp>(L, kq * 16, kC0 / 16 + np));
                fdma_mma16816<T>(acc[2 * np], a[kq], b[0], b[1]);
                fdma_mma16816<T>(acc[2 * np + 1], a[kq], b[2], b[3]);
            }
        }
    }
}

/* C fragments (16 x 8kN) -> A fragments (16 x k 8kN), scaled elementwise by f(n, e). */
template <typename T, int kN, typename F>
__device__ __forceinline__ void to_afrag(uint32_t (&a)[kN / 2][4], const float (&c)[kN][4], F f) {
#pragma unroll
    for (int kq = 0; kq < kN / 2; kq++) {
        a[kq][0] = fdma_pack2<T>(c[2 * kq][0] * f(2 * kq, 0), c[2 * kq][1] * f(2 * kq, 1));
        a[kq][1] = fdma_pack2<T>(c[2 * kq][2] * f(2 * kq, 2), c[2 * kq][3] * f(2 * kq, 3));
        a[kq][2] = fdma_pack2<T>(c[2 * kq + 1][0] * f(2 * kq + 1, 0), c[2 * kq + 1][1] * f(2 * kq + 1, 1));
        a[kq][3] = fdma_pack2<T>(c[2 * kq + 1][2] * f(2 * kq + 1, 2), c[2 * kq + 1][3] * f(2 * kq + 1, 3));
    }
}

/* ---- per-element pieces shared by both kernels -------------------------------------------------------
 * A 16 x 8kN C-fragment tile: element (n, e) of a thread is at tile row gid + 8*(e>>1), column
 * 8n + 2*t4 + (e&1). In the dkdv kernel rows are keys and columns queries (kTr = true); in the dq kernel
 * rows are queries and columns keys. */
template <bool kTr>
__device__ __forceinline__ void elem_ij(int n, int e, int row0, int lane, int &il, int &jl) {
    const int r = row0 + (lane >> 2) + ((e >> 1) << 3);
    const int c = n * 8 + ((lane & 3) << 1) + (e & 1);
    if (kTr) {
        il = c;
        jl = r;
    } else {
        il = r;
        jl = c;
    }
}

/* Visible bits (bit 4n+e) of the thread's 32 elements: in range, causal, mask, window expiry. kidx (gathered
 * keys, kTr = false only): the key of local column jl is kidx[jl] (>= Sk for padding), else j0 + jl. kMask /
 * kExpiry false: the mask / expiry test is compiled out (the dense kernel's instantiations without them). */
template <bool kTr, int kN, bool kMask = true, bool kExpiry = true>
__device__ __forceinline__ uint32_t visible_bits(const Args &a, int b, int h, int64_t i0, int64_t j0, int row0,
                                                 int lane, const int *kidx = nullptr) {
    uint32_t bits = 0;
    const uint8_t *mrow = kMask && a.mask ? a.mask + b * a.ms[0] + (int64_t)(h / a.mhdiv) * a.ms[1] : nullptr;
    const int32_t *erow = kExpiry && a.expiry
                              ? a.expiry + ((int64_t)b * a.ex_rb + (int64_t)(h / a.ex_hdiv) * a.ex_hmul) * a.Sk
                              : nullptr;
    const int shift = a.sk - a.sq;
#pragma unroll 1
    for (int n = 0; n < kN; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int il, jl;
            elem_ij<kTr>(n, e, row0, lane, il, jl);
            const int i = (int)i0 + il, j = kidx ? kidx[jl] : (int)j0 + jl;
            bool ok = i < a.sq && j < a.sk && (!a.causal || j - i <= shift);
            if (ok && mrow) ok = __ldg(mrow + (int64_t)i * a.ms[2] + (int64_t)j * a.ms[3]) != 0;
            if (ok && erow) ok = (a.causal ? i + shift : a.sk - 1) < __ldg(erow + j);
            bits |= (uint32_t)ok << (4 * n + e);
        }
    return bits;
}

/* Dropout keep bits (SPEC section 5) of the thread's 32 elements. */
template <bool kTr, int kN>
__device__ __forceinline__ uint32_t keep_bits(const Args &a, int b, int h, int64_t i0, int64_t j0, int row0,
                                              int lane, const int *kidx = nullptr) {
    uint32_t bits = 0;
    const uint64_t row_base = ((uint64_t)b * a.H + h) * (uint64_t)a.Sq;
#pragma unroll 1
    for (int n = 0; n < kN; n++)
#pragma unroll 1
        for (int e = 0; e < 4; e++) {
            if (!kTr && (e & 1)) continue;
            int il, jl;
            elem_ij<kTr>(n, e, row0, lane, il, jl);
            const uint64_t i = (uint64_t)(i0 + il), j = kidx ? (uint64_t)kidx[jl] : (uint64_t)(j0 + jl);
            /* a device rng_state (refilled by a captured RNG op on every CUDA-graph replay) overrides the
               by-value pair; re-read per element (an L1 hit) so that it holds no registers across the loop */
            uint64_t seed = a.seed, offset = a.offset;
            if (a.rng_state) fdma_load_rng(a.rng_state, seed, offset);
            uint32_t w[4];
            fdma_dropout_words(seed, offset, row_base + i, j, w);
            bits |= (uint32_t)(w[j & 3] >= a.drop_thr) << (4 * n + e);
            if (kidx) { /* gathered: the next column's key need not be j + 1 */
                const uint64_t j1 = (uint64_t)kidx[jl + 1];
                fdma_dropout_words(seed, offset, row_base + i, j1, w);
                bits |= (uint32_t)(w[j1 & 3] >= a.drop_thr) << (4 * n + e + 1);
            } else if (!kTr) {
                bits |= (uint32_t)(w[(j + 1) & 3] >= a.drop_thr) << (4 * n + e + 1);
            }
        }
    return bits;
}

/* s (raw q.k) -> p = exp(s' - lse) where visible, 0 elsewhere; s' = scale/softcap/bias as in the forward.
 * lse(il) returns the row's lse (+inf for an empty row, so that p = 0). */
template <typename T, bool kTr, int kN, typename L>
__device__ __forceinline__ void scores_to_p(const Args &a, float (&s)[kN][4], uint32_t vis, int b, int h, int64_t i0,
                                            int64_t j0, int row0, int lane, L lse, const int *kidx = nullptr) {
    const T *brow = a.bias ? (const T *)a.bias + b * a.bs[0] + (int64_t)(h / a.bhdiv) * a.bs[1] : nullptr;
    constexpr float kLog2e = 1.4426950408889634f;
#pragma unroll
    for (int n = 0; n < kN; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int il, jl;
            elem_ij<kTr>(n, e, row0, lane, il, jl);
            float x = s[n][e] * a.scale;
            if (a.softcap > 0.f) x = a.softcap * tanhf(x * a.inv_softcap);
            const bool v = (vis >> (4 * n + e)) & 1;
            if (brow && v)
                x += to_f(brow[(int64_t)((int)i0 + il) * a.bs[2] + (int64_t)(kidx ? kidx[jl] : (int)j0 + jl) * a.bs[3]]);
            s[n][e] = v ? exp2f((x - lse(il)) * kLog2e) : 0.f;
        }
}

/* dp -> ds = p * (dp * z / (1 - p_drop) - Di) in place. */
template <bool kTr, int kN, typename F>
__device__ __forceinline__ void dp_to_ds(const Args &a, float (&dp)[kN][4], const float (&p)[kN][4], uint32_t keep,
                                         int row0, int lane, F di) {
#pragma unroll
    for (int n = 0; n < kN; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int il, jl;
            elem_ij<kTr>(n, e, row0, lane, il, jl);
            const float z = ((keep >> (4 * n + e)) & 1) ? a.drop_scale : 0.f;
            dp[n][e] = p[n][e] * (dp[n][e] * z - di(il));
        }
}

/* ds -> ds * (1 - tanh^2(s_pre / softcap)), s_pre = scale * s (s recomputed raw q.k). */
template <int kN>
__device__ __forceinline__ void softcap_grad(const Args &a, float (&ds)[kN][4], const float (&s)[kN][4]) {
#pragma unroll
    for (int n = 0; n < kN; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float t = tanhf(s[n][e] * a.scale * a.inv_softcap);
            ds[n][e] *= 1.f - t * t;
        }
}

/* ---- dkdv kernel ------------------------------------------------------------------------------------------ */

/* Query rows per step of the dkdv kernel: 32 keeps the 16 x 128 accumulator, S^T, dP^T and the per-element
 * work inside 255 registers on sm90 (64 spilled). dS^T is kept [key][kBM + 8] (dq_atomic).
 * sm80: ptxas spills a few bytes in most variants of these kernels at 255 registers (tried: 16-row steps,
 * 64-column passes, rolled k loops), and the library builds with spills as errors, so fdma_cuda_bwd_plan refuses
 * devices below sm90 and the kernels carry no sm80 code. */
constexpr int kDkdvBM = 32;
/* Query rows per tile of the SPARSE window's key lists that the backward builds (window.cuh): one CTA of the
 * sparse kernel (bwd_sparse.cuh) each. */
constexpr int kBwdSparseTileM = 128;
constexpr int kDqChunkMax = 64;
constexpr int kDkdvBMMax = 32;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define FDMA_BWD_NO_DEVICE_CODE 1
#endif

/* Shared memory of a dkdv CTA (this file's kernel, kBM = kDkdvBM, and bwd_dense.cuh's): K, V [kBN][kDp]; Q, dO
 * [2][kBM][kDp] (double-buffered query tiles); dS^T [kBN][kBM + 8] (kDQ); lse, Di [2][kBM] fp32. */
template <int kDp, int kBN, bool kDQ, int kBM = kDkdvBMMax> struct DkdvSmem {
    static constexpr size_t bytes_of(size_t esz) {
        return esz * (2 * (size_t)kBN * kDp + 4 * (size_t)kBM * kDp + (kDQ ? (size_t)kBN * (kBM + 8) : 0)) +
               4 * sizeof(float) * kBM;
    }
};
template <typename T, int kDp, int kBN, bool kDQ, int kBM> struct DkdvTiles {
    T *sK, *sV, *sQ, *sdO, *sdS;
    float *sLse, *sDi;
    __device__ __forceinline__ explicit DkdvTiles(unsigned char *smem) {
        sK = reinterpret_cast<T *>(smem);
        sV = sK + kBN * kDp;
        sQ = sV + kBN * kDp;
        sdO = sQ + 2 * kBM * kDp;
        sdS = sdO + 2 * kBM * kDp;
        sLse = reinterpret_cast<float *>(sdS + (kDQ ? kBN * (kBM + 8) : 0));
        sDi = sLse + 2 * kBM;
    }
};

/* Query rows [i0, i0 + kBM) of head h, batch b into buffer buf: Q and dO (rows past Sq: zeros), lse and Di. kBump:
 * load_rows' pointer-bump form (the dense kernel's register budget). */
template <typename T, int kDp, int kBN, bool kDQ, int kBM, int kThreads, bool kBump = false>
__device__ __forceinline__ void load_q_tile(const Args &a, const DkdvTiles<T, kDp, kBN, kDQ, kBM> &s, int b, int h,
                                            int64_t i0, int buf) {
    const T *gq = (const T *)a.q + b * a.qs[0] + (int64_t)h * a.qs[2] + i0 * a.qs[1];
    const T *gdo = (const T *)a.dout + b * a.dos[0] + (int64_t)h * a.dos[2] + i0 * a.dos[1];
    load_rows<T, kBM, kDp, kThreads, kBump>(s.sQ + buf * kBM * kDp, gq, a.qs[1], a.Sq - i0, a.D);
    load_rows<T, kBM, kDp, kThreads, kBump>(s.sdO + buf * kBM * kDp, gdo, a.dos[1], a.Sq - i0, a.D);
    const int r = threadIdx.x & (kBM - 1);
    const int64_t off = ((int64_t)b * a.H + h) * a.Sq + i0 + r;
    const bool ok = i0 + r < a.Sq;
    if (threadIdx.x < kBM) cp_async4(s.sLse + buf * kBM + r, ok ? a.lse + off : a.lse, ok);
    else if (threadIdx.x < 2 * kBM) cp_async4(s.sDi + buf * kBM + r, ok ? a.Di + off : a.Di, ok);
}

/* First query block (of kBM rows) that a causal key block starting at n0 sees; 0 without causality. */
__device__ __forceinline__ int first_q_block(const Args &a, int64_t n0, int kBM) {
    if (!a.causal) return 0;
    const int64_t r = n0 - (a.Sk - a.Sq);
    return r > 0 ? (int)(r / kBM) : 0;
}

/* The work units of a dkdv CTA, in order: f(b, hkv, h_lo, nh) for its batches and kv heads (query heads h_lo ..
 * h_lo + nh - 1 of kv head hkv; one query head per CTA when hph == 1 and g > 1). */
template <typename F> __device__ __forceinline__ void for_each_unit(const Args &a, F f) {
    for (int u = 0; u < a.b_per_cta * a.hkv_per_cta; u++) { /* batch-major, kv heads inner */
        const int b = blockIdx.z * a.b_per_cta + u / a.hkv_per_cta, ki = u % a.hkv_per_cta;
        const bool per_head = a.hph == 1 && a.g > 1;
        const int hkv = per_head ? (int)blockIdx.y / a.g : (int)blockIdx.y * a.hkv_per_cta + ki;
        f(b, hkv, per_head ? (int)blockIdx.y : hkv * a.g, per_head ? 1 : a.g);
    }
}

/* DIRECT dbias: zeros over rows [r_lo, r_hi) x keys [j0, j0 + kBN) of head h (tiles the kernel skips). */
template <typename T, int kBN, int kThreads>
__device__ void dbias_zero(const Args &a, int b, int h, int64_t r_lo, int64_t r_hi, int64_t j0) {
    if (r_hi > a.Sq) r_hi = a.Sq;
    if (r_hi <= r_lo) return;
    T *base = (T *)a.dbias + b * a.dbs[0] + (int64_t)h * a.dbs[1];
    const int64_t n = (r_hi - r_lo) * kBN;
    for (int64_t x = threadIdx.x; x < n; x += kThreads) {
        const int64_t i = r_lo + x / kBN, j = j0 + x % kBN;
        if (j < a.Sk) base[i * a.dbs[2] + j * a.dbs[3]] = from_f<T>(0.f);
    }
}

/* dS tile (kTr layout, fp32, masked entries already 0) -> dbias. Every element of the tile has one owner
 * thread, and the same thread owns it for every head and batch the CTA loops over. */
template <typename T, int kN>
__device__ __forceinline__ void dbias_tile(const Args &a, const float (&ds)[kN][4], int b, int h, int64_t i0,
                                           int64_t j0, int row0, int lane) {
    if (a.dbias_mode == DBIAS_DIRECT) {
        T *base = (T *)a.dbias + b * a.dbs[0] + (int64_t)h * a.dbs[1];
#pragma unroll
        for (int n = 0; n < kN; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int il, jl;
                elem_ij<true>(n, e, row0, lane, il, jl);
                const int64_t i = i0 + il, j = j0 + jl;
                if (i < a.Sq && j < a.Sk) base[i * a.dbs[2] + j * a.dbs[3]] = from_f<T>(ds[n][e]);
            }
    } else if (a.dbias_mode == DBIAS_ACC) {
        float *base = a.dbacc + b * a.acs[0] + (int64_t)(h / a.achdiv) * a.acs[1];
#pragma unroll
        for (int n = 0; n < kN; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int il, jl;
                elem_ij<true>(n, e, row0, lane, il, jl);
                const int64_t i = i0 + il, j = j0 + jl;
                if (i < a.Sq && j < a.Sk) base[i * a.acs[2] + j] += ds[n][e];
            }
    } else if (a.dbias_mode == DBIAS_ACC_ROWS) {
        float r0 = 0.f, r1 = 0.f; /* keys row0 + gid and row0 + gid + 8, summed over the tile's queries */
#pragma unroll
        for (int n = 0; n < kN; n++) {
            r0 += ds[n][0] + ds[n][1];
            r1 += ds[n][2] + ds[n][3];
        }
        r0 += __shfl_xor_sync(0xffffffffu, r0, 1);
        r1 += __shfl_xor_sync(0xffffffffu, r1, 1);
        r0 += __shfl_xor_sync(0xffffffffu, r0, 2);
        r1 += __shfl_xor_sync(0xffffffffu, r1, 2);
        if ((lane & 3) == 0) {
            float *base = a.dbacc + b * a.acs[0] + (int64_t)(h / a.achdiv) * a.acs[1];
            const int64_t j = j0 + row0 + (lane >> 2);
            if (j < a.Sk) base[j] += r0;
            if (j + 8 < a.Sk) base[j + 8] += r1;
        }
    }
}

/* The sparse kernels' per-row data of a gathered key tile (row rr of buffer buf, kBN rows): key index j (INT_MAX for
 * padding, j < 0), its expiry (the window's elist entry at list position pos, else INT_MAX; 0 for padding) and its
 * bias x log2 e (brow: the bias row of the head, NULL = none). */
template <typename T, int kBN>
__device__ __forceinline__ void store_key_meta(const Args &a, int *sIdx, int *sExp, float *sBv, int buf, int rr, int j,
                                               int pos, const int32_t *elist, const T *brow) {
    sIdx[buf * kBN + rr] = j >= 0 ? j : INT_MAX;
    sExp[buf * kBN + rr] = j < 0 ? 0 : elist ? __ldg(elist + pos) : INT_MAX;
    sBv[buf * kBN + rr] = (brow && j >= 0) ? to_f(brow[(int64_t)j * a.bs[3]]) * 1.4426950408889634f : 0.f;
}

/* fp32 reductions (red.global.add.v2.f32: relaxed, device scope, no value returned) of the column pairs n < kN of
 * two C fragment rows (a lane's columns 8 n + 2 t4, + 1 of rows gid and gid + 8: acc[n][0..1] to ra + 8 n,
 * acc[n][2..3] to rb + 8 n; ra, rb already include 2 t4); bit n of ma / mb: that pair exists (row inside the tensor,
 * column below D). Immediate offsets from the two bases and predicated reds:
 * nothing is computed between the reds, so no register a red still reads is rewritten under it (compiled address
 * arithmetic reused the freed accumulator registers and made every red wait for the one before it). sm90 only. */
template <int N, int kN> struct RedRowsF32x2 {
    static __device__ __forceinline__ void run(float *ra, float *rb, uint32_t ma, uint32_t mb,
                                               const float (&acc)[kN][4]) {
        asm volatile("{\n\t.reg .pred p;\n\t.reg .b32 t;\n\tand.b32 t, %3, %5;\n\tsetp.ne.b32 p, t, 0;\n\t"
                     "@p red.global.add.v2.f32 [%0+%4], {%1, %2};\n\t}\n"
                     ::"l"(ra), "f"(acc[N][0]), "f"(acc[N][1]), "r"(ma), "n"(N * 32), "n"(1 << N) : "memory");
        asm volatile("{\n\t.reg .pred p;\n\t.reg .b32 t;\n\tand.b32 t, %3, %5;\n\tsetp.ne.b32 p, t, 0;\n\t"
                     "@p red.global.add.v2.f32 [%0+%4], {%1, %2};\n\t}\n"
                     ::"l"(rb), "f"(acc[N][2]), "f"(acc[N][3]), "r"(mb), "n"(N * 32), "n"(1 << N) : "memory");
        RedRowsF32x2<N + 1, kN>::run(ra, rb, ma, mb, acc);
    }
};
template <int kN> struct RedRowsF32x2<kN, kN> {
    static __device__ __forceinline__ void run(float *, float *, uint32_t, uint32_t, const float (&)[kN][4]) {}
};
/* Bit n set for the column pairs 8 n + c0 (n < kN) below D. */
template <int kN> __device__ __forceinline__ uint32_t col_pair_mask(int c0, int D) {
    uint32_t m = 0;
#pragma unroll
    for (int n = 0; n < kN; n++) m |= (uint32_t)(8 * n + c0 < D) << n;
    return m;
}

/* The sparse kernels' query tile and key count. Causal calls take the tiles last-first (the longest lists start
 * first). A whole-row list (ntiles == 1: a row-broadcast mask's kept keys, ascending) is cut at the entries the
 * tile's last row can see (j <= lim = i + Sk - Sq); per-tile lists (the window's) hold only those already. The cut
 * is a 32-way ballot search by each warp over the list in global memory (every warp finds the same count). */
__device__ __forceinline__ int64_t sparse_tile_index(const Args &a) {
    return a.causal ? (int64_t)(gridDim.x - 1 - blockIdx.x) : (int64_t)blockIdx.x;
}
__device__ __forceinline__ int sparse_visible_count(const Args &a, const int32_t *list, int nkeys, int64_t i0,
                                                    int bm, int lane) {
    if (!a.causal || a.ex_ntiles > 1) return nkeys;
    const int64_t lim = (i0 + bm < a.Sq ? i0 + bm : a.Sq) - 1 + a.Sk - a.Sq;
    if (lim < 0) return 0;
    int lo = 0, hi = nkeys; /* the count lies in [lo, hi] */
    while (hi - lo > 32) {
        const int step = (hi - lo + 31) >> 5, q = lo + lane * step;
        const int c = __popc(__ballot_sync(0xffffffffu, q < hi && __ldg(list + q) <= lim));
        const int nlo = c ? lo + (c - 1) * step + 1 : lo;
        hi = hi < lo + c * step ? hi : lo + c * step;
        lo = nlo;
    }
    const int q = lo + lane;
    return lo + __popc(__ballot_sync(0xffffffffu, q < hi && __ldg(list + q) <= lim));
}

/* The sparse kernels' accumulator rows of (batch b, query head h, kv head hkv): fp32 dk / dv (B, Hkv, Sk, D) and the
 * ACC_ROWS dbias partial row (NULL unless that mode). */
__device__ __forceinline__ void sparse_acc_rows(const Args &a, int b, int h, int hkv, float *&dkrow, float *&dvrow,
                                                float *&dbrow) {
    dkrow = a.dkacc + ((int64_t)b * a.Hkv + hkv) * a.Sk * a.D;
    dvrow = a.dvacc + ((int64_t)b * a.Hkv + hkv) * a.Sk * a.D;
    dbrow = a.dbias_mode == DBIAS_ACC_ROWS ? a.dbacc + b * a.acs[0] + (int64_t)(h / a.achdiv) * a.acs[1] : nullptr;
}

/* ACC_ROWS dbias of a query-major tile (the sparse kernels): the column sums of dS (C fragments, this warp's 16
 * rows x 64 keys) over the warp's rows; dbias_col_pair gives every lane those of its columns 8 n + 2 t4 (+ 1). */
__device__ __forceinline__ void dbias_col_pair(const float (&ds)[8][4], int n, float &c0, float &c1) {
    c0 = ds[n][0] + ds[n][2];
    c1 = ds[n][1] + ds[n][3];
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
        c0 += __shfl_xor_sync(0xffffffffu, c0, o);
        c1 += __shfl_xor_sync(0xffffffffu, c1, o);
    }
}

/* The warp's sums added by the lanes with gid 0 to dbrow[key] (kidx: the tile's key indices, >= Sk for padding;
 * zero sums skipped). */
__device__ __forceinline__ void dbias_key_sums(const Args &a, const float (&ds)[8][4], float *dbrow, const int *kidx,
                                               int lane) {
    const int gid = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int n = 0; n < 8; n++) {
        float c0, c1;
        dbias_col_pair(ds, n, c0, c1);
        if (gid == 0) {
            const int ja = kidx[n * 8 + 2 * t4], jb = kidx[n * 8 + 2 * t4 + 1];
            if (ja < a.sk && c0 != 0.f) atomicAdd(dbrow + ja, c0);
            if (jb < a.sk && c1 != 0.f) atomicAdd(dbrow + jb, c1);
        }
    }
}

/* The same sums staged instead: the warp's 64 column sums to sw[0 .. 63] (shared), for dbias_flush. */
__device__ __forceinline__ void dbias_warp_sums(const float (&ds)[8][4], float *sw, int lane) {
    const int gid = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int n = 0; n < 8; n++) {
        float c0, c1;
        dbias_col_pair(ds, n, c0, c1);
        if (gid == 0) *reinterpret_cast<float2 *>(sw + n * 8 + 2 * t4) = make_float2(c0, c1);
    }
}

/* After a barrier: key column c (< 64) of the tile, summed over the nw warps' staged sums (sw [nw][64]) in warp
 * order, one atomic into dbrow[kidx[c]] (skipped for padding and zero sums): one atomic per key and tile rather
 * than one per key and warp. */
__device__ __forceinline__ void dbias_flush(const Args &a, const float *sw, int nw, float *dbrow, const int *kidx,
                                            int c) {
    float v = 0.f;
    for (int w = 0; w < nw; w++) v += sw[w * 64 + c];
    const int j = kidx[c];
    if (j < a.sk && v != 0.f) atomicAdd(dbrow + j, v);
}

/* dQ rows [i0, i0 + kBM) of query head h += dS K, fp32 atomics into dqacc (float2 on sm90): the warp's dS^T A
 * fragments (keys row0 .. row0 + 15 x kBM queries) go to shared [key][query] (rows of kBM + 8 elements:
 * conflict-free for these stores and for ldmatrix), then, after a barrier, the warps split dQ (kBM x kDp) =
 * dS (kBM x kBN) K (kBN x kDp) into 16-row x column groups. kPadSkip: skip the column steps past D (zero columns
 * of K) rather than computing them (their results are never written either way). */
template <typename T, int kDp, int kBN, int kBM, bool kPadSkip, int kChunkMax = kDqChunkMax>
__device__ __forceinline__ void dq_atomic(const Args &a, T *sdS, const T *sK, const uint32_t (&da)[kBM / 16][4], int b,
                                          int h, int64_t i0, int row0, int lane, const Lane &L) {
    constexpr int kStride = kBM + 8;
    const int warp = threadIdx.x >> 5, gid = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int kq = 0; kq < kBM / 16; kq++) {
        T *r = sdS + (row0 + gid) * kStride + kq * 16 + 2 * t4;
        *reinterpret_cast<uint32_t *>(r) = da[kq][0];
        *reinterpret_cast<uint32_t *>(r + 8 * kStride) = da[kq][1];
        *reinterpret_cast<uint32_t *>(r + 8) = da[kq][2];
        *reinterpret_cast<uint32_t *>(r + 8 * kStride + 8) = da[kq][3];
    }
    __syncthreads();
    constexpr int kWarpGroups = (kBN / 16) / (kBM / 16);
    constexpr int kColGroups = kWarpGroups < kDp / 16 ? kWarpGroups : kDp / 16;
    constexpr int kColsPerWarp = kDp / kColGroups;
    constexpr int kChunk = kColsPerWarp < kChunkMax ? kColsPerWarp : kChunkMax;
    const int rg = warp % (kBM / 16), cg = warp / (kBM / 16); /* warps with cg >= kColGroups idle */
    float *dqrow = a.dqacc + ((int64_t)b * a.Sq * a.H + h) * a.D;
#pragma unroll
    for (int cc = 0; cc < kColsPerWarp / kChunk; cc++) {
        const int c0 = cg * kColsPerWarp + cc * kChunk;
        if (cg < kColGroups && (!kPadSkip || c0 < a.D)) {
            float qa[kChunk / 8][4];
#pragma unroll
            for (int n = 0; n < kChunk / 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) qa[n][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < kBN / 16; kk++) {
                uint32_t af[4];
                fdma_ldmatrix_x4_trans(af, sdS + (kk * 16 + L.rB) * kStride + rg * 16 + (((lane >> 3) & 1) << 3));
#pragma unroll
                for (int np = 0; np < kChunk / 16; np++) {
                    if (!kPadSkip || c0 + np * 16 < a.D) {
                        uint32_t bf[4];
                        fdma_ldmatrix_x4_trans(bf, sK + bt_off<kDp>(L, kk * 16, (c0 >> 4) + np));
                        fdma_mma16816<T>(qa[2 * np], af, bf[0], bf[1]);
                        fdma_mma16816<T>(qa[2 * np + 1], af, bf[2], bf[3]);
                    }
                }
            }
#pragma unroll
            for (int n = 0; n < kChunk / 8; n++)
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    const int64_t i = i0 + rg * 16 + gid + 8 * hf;
                    const int d = c0 + n * 8 + 2 * t4;
                    if (i < a.Sq && d < a.D) {
                        float *p = dqrow + i * a.H * a.D + d;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
                        atomicAdd(reinterpret_cast<float2 *>(p), make_float2(qa[n][2 * hf], qa[n][2 * hf + 1]));
#else
                        atomicAdd(p, qa[n][2 * hf]);
                        atomicAdd(p + 1, qa[n][2 * hf + 1]);
#endif
                    }
                }
        }
    }
}

/* Start of a dkdv work unit: DIRECT dbias zeros for the query rows [0, zero_rows) that no query block visits (kDbias:
 * the instantiation has dbias code), then, after a barrier (the previous unit is done with shared memory), K and V of
 * the key block at n0 into shared memory by cp.async (not committed). */
template <typename T, int kDp, int kBN, int kThreads, bool kDbias, bool kBump = false>
__device__ __forceinline__ void begin_unit(const Args &a, T *sK, T *sV, int b, int hkv, int h_lo, int nh,
                                           int64_t zero_rows, int64_t n0) {
    if (kDbias && a.dbias_mode == DBIAS_DIRECT && zero_rows > 0)
        for (int h = h_lo; h < h_lo + nh; h++) dbias_zero<T, kBN, kThreads>(a, b, h, 0, zero_rows, n0);
    __syncthreads();
    load_rows<T, kBN, kDp, kThreads, kBump>(sK, (const T *)a.k + b * a.ks[0] + (int64_t)hkv * a.ks[2] + n0 * a.ks[1],
                                            a.ks[1], a.Sk - n0, a.D);
    load_rows<T, kBN, kDp, kThreads, kBump>(sV, (const T *)a.v + b * a.vs[0] + (int64_t)hkv * a.vs[2] + n0 * a.vs[1],
                                            a.vs[1], a.Sk - n0, a.D);
}

/* One pass of the query loop of a dkdv CTA over heads [h_lo, h_lo + nh) of kv head hkv, batch b: accumulates
 * columns [kC0, kC0 + kAcc) of dV (kDoDV) and/or dK (kDoDK); the first dK pass also does dbias and dQ. */
template <typename T, int kDp, int kBN, bool kDQ, bool kDoDV, bool kDoDK, int kAcc, int kC0>
__device__ __forceinline__ void dkdv_pass(const Args &a, unsigned char *smem, int b, int hkv, int h_lo, int nh,
                                          int m_first, int nm, int64_t n0, float (&accV)[kAcc / 8][4],
                                          float (&accK)[kAcc / 8][4]) {
    constexpr bool kFirstDK = kDoDK && kC0 == 0;
    constexpr int kBM = kDkdvBM, kN = kBM / 8, kThreads = kBN * 2;
    const DkdvTiles<T, kDp, kBN, kDQ, kBM> tl(smem);
    T *sK = tl.sK, *sV = tl.sV, *sQ = tl.sQ, *sdO = tl.sdO;
    const float *sLse = tl.sLse, *sDi = tl.sDi;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = warp * 16;
    const int ksteps = (a.D + 15) >> 4;
    const int ntiles = nh * nm;
    const Lane L = make_lane(lane);

    auto load_tile = [&](int t, int buf) {
        load_q_tile<T, kDp, kBN, kDQ, kBM, kThreads>(a, tl, b, h_lo + t / nm, (int64_t)(m_first + t % nm) * kBM, buf);
    };

    load_tile(0, 0);
    fdma_cp_async_commit();
    for (int t = 0; t < ntiles; t++) {
        const int buf = t & 1;
        __syncthreads();
        if (t + 1 < ntiles) load_tile(t + 1, buf ^ 1);
        fdma_cp_async_commit();
        fdma_cp_async_wait<1>();
        __syncthreads();

        const int h = h_lo + t / nm;
        const int64_t i0 = (int64_t)(m_first + t % nm) * kBM;
        const uint32_t vis = visible_bits<true, kN>(a, b, h, i0, n0, row0, lane);
        if (!__syncthreads_or(vis != 0)) {
            if (kFirstDK && a.dbias_mode == DBIAS_DIRECT) dbias_zero<T, kBN, kThreads>(a, b, h, i0, i0 + kBM, n0);
            continue;
        }
        const uint32_t keep = a.dropout ? keep_bits<true, kN>(a, b, h, i0, n0, row0, lane) : 0xffffffffu;
        const T *sQb = sQ + buf * kBM * kDp, *sdOb = sdO + buf * kBM * kDp;
        const float *lse_s = sLse + buf * kBM, *di_s = sDi + buf * kBM;

        /* S^T = K Q^T, then P^T */
        float s[kN][4];
        gemm_rows_bt<T, kDp, kN>(s, sK, row0, sQb, ksteps, L);
        scores_to_p<T, true, kN>(a, s, vis, b, h, i0, n0, row0, lane, [&](int il) {
            const float l = lse_s[il];
            return l == -INFINITY ? INFINITY : l;
        });
        auto zf = [&](int n, int e) { return ((keep >> (4 * n + e)) & 1) ? a.drop_scale : 0.f; };

        if (kDoDV) { /* dV += (P^T z / (1 - p_drop)) dO */
            uint32_t pa[kN / 2][4];
            to_afrag<T, kN>(pa, s, zf);
            gemm_regs_b<T, kDp, kN, kAcc, kC0>(accV, pa, sdOb, ksteps, L);
        }
        if (kDoDK) {
            float dp[kN][4]; /* dP^T = V dO^T, then dS^T in place */
            gemm_rows_bt<T, kDp, kN>(dp, sV, row0, sdOb, ksteps, L);
            dp_to_ds<true, kN>(a, dp, s, keep, row0, lane, [&](int il) { return di_s[il]; });
            if (kFirstDK) dbias_tile<T, kN>(a, dp, b, h, i0, n0, row0, lane);
            if (a.softcap > 0.f) {
                gemm_rows_bt<T, kDp, kN>(s, sK, row0, sQb, ksteps, L);
                softcap_grad<kN>(a, dp, s);
            }
            uint32_t da[kN / 2][4];
            to_afrag<T, kN>(da, dp, [](int, int) { return 1.f; });
            gemm_regs_b<T, kDp, kN, kAcc, kC0>(accK, da, sQb, ksteps, L); /* dK += dS^T Q */
            if (kDQ && kFirstDK) dq_atomic<T, kDp, kBN, kBM, true>(a, tl.sdS, sK, da, b, h, i0, row0, lane, L);
        }
    }
    fdma_cp_async_wait<0>();
    __syncthreads();
}

/* Write a 16 x kDp accumulator (rows = keys of this warp) times `mul`: to (B, Sk, Hkv, D) dtype, or to the
 * fp32 (B, H, Sk, D) partial of query head h. */
template <typename T, int kAcc, int kC0>
__device__ __forceinline__ void write_kv(const Args &a, const float (&acc)[kAcc / 8][4], float mul, void *dst,
                                         const int64_t *st, float *part, int b, int hkv, int h, int64_t n0,
                                         int row0, int lane) {
    const int gid = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int n = 0; n < kAcc / 8; n++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int64_t j = n0 + row0 + gid + 8 * hf;
            const int d = kC0 + n * 8 + 2 * t4;
            if (j < a.Sk && d < a.D) {
                const float x = acc[n][2 * hf] * mul, y = acc[n][2 * hf + 1] * mul;
                if (part) {
                    *reinterpret_cast<float2 *>(part + (((int64_t)b * a.H + h) * a.Sk + j) * a.D + d) =
                        make_float2(x, y);
                } else {
                    T *p = (T *)dst + b * st[0] + j * st[1] + (int64_t)hkv * st[2] + d;
                    *reinterpret_cast<uint32_t *>(p) = fdma_pack2<T>(x, y);
                }
            }
        }
}

template <int N> __device__ __forceinline__ void zero_acc(float (&c)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) c[n][e] = 0.f;
}

/* Columns per accumulator pass for kDp > 64. */
constexpr int kDkdvAcc = 128;

/* Passes over column slices [kC0, kC0 + kAcc), [kC0 + kAcc, ...) of dV (kDV) or dK, each written when done. */
template <typename T, int kDp, int kBN, bool kDQ, bool kDV, int kAcc, int kC0>
__device__ __forceinline__ void dkdv_slices(const Args &a, unsigned char *smem, int b, int hkv, int h_lo, int nh,
                                            int m_first, int nm, int64_t n0, float *part) {
    float acc[kAcc / 8][4];
    zero_acc(acc);
    dkdv_pass<T, kDp, kBN, kDQ, kDV, !kDV, kAcc, kC0>(a, smem, b, hkv, h_lo, nh, m_first, nm, n0, acc, acc);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (kDV) write_kv<T, kAcc, kC0>(a, acc, 1.f, a.dv, a.dvs, part, b, hkv, h_lo, n0, warp * 16, lane);
    else write_kv<T, kAcc, kC0>(a, acc, a.scale, a.dk, a.dks, part, b, hkv, h_lo, n0, warp * 16, lane);
    if constexpr (kC0 + kAcc < kDp)
        dkdv_slices<T, kDp, kBN, kDQ, kDV, kAcc, kC0 + kAcc>(a, smem, b, hkv, h_lo, nh, m_first, nm, n0, part);
}

template <typename T, int kDp, int kBN, bool kDQ>
__global__ void __launch_bounds__(kBN * 2, 1) dkdv_kernel(const Args a) {
#ifndef FDMA_BWD_NO_DEVICE_CODE
    constexpr int kBM = kDkdvBM, kThreads = kBN * 2;
    extern __shared__ __align__(128) unsigned char smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t n0 = (int64_t)blockIdx.x * kBN;
    const int nM = (int)((a.Sq + kBM - 1) / kBM);
    const int m_first = first_q_block(a, n0, kBM);
    const int nm = nM - m_first;
    T *sK = reinterpret_cast<T *>(smem);
    T *sV = sK + kBN * kDp;

    for_each_unit(a, [&](int b, int hkv, int h_lo, int nh) {
        begin_unit<T, kDp, kBN, kThreads, true>(a, sK, sV, b, hkv, h_lo, nh, (int64_t)m_first * kBM, n0);
        fdma_cp_async_commit();
        const bool partial = a.hph == 1 && a.g > 1;
        float *dvp = partial ? a.dvpart : nullptr, *dkp = partial ? a.dkpart : nullptr;
        if constexpr (kDp == 64 && kDkdvAcc > 64) {
            float accV[8][4], accK[8][4];
            zero_acc(accV);
            zero_acc(accK);
            dkdv_pass<T, kDp, kBN, kDQ, true, true, 64, 0>(a, smem, b, hkv, h_lo, nh, m_first, nm, n0, accV, accK);
            write_kv<T, 64, 0>(a, accV, 1.f, a.dv, a.dvs, dvp, b, hkv, h_lo, n0, warp * 16, lane);
            write_kv<T, 64, 0>(a, accK, a.scale, a.dk, a.dks, dkp, b, hkv, h_lo, n0, warp * 16, lane);
        } else {
            /* one accumulator of kDkdvAcc columns per pass: dV slices first, then dK slices (the first also
               does dbias and dQ) */
            dkdv_slices<T, kDp, kBN, kDQ, true, kDkdvAcc, 0>(a, smem, b, hkv, h_lo, nh, m_first, nm, n0, dvp);
            dkdv_slices<T, kDp, kBN, kDQ, false, kDkdvAcc, 0>(a, smem, b, hkv, h_lo, nh, m_first, nm, n0, dkp);
        }
    });
#endif
}

/* ---- dq kernel (deterministic mode) ----------------------------------------------------------------------- */

/* The two rows i and i + 8 of a thread in the query-major kernels: lse (+inf for an empty or padded row, so that
 * p = 0) and Di. */
__device__ __forceinline__ void row_stats(const Args &a, int b, int h, int64_t i, float (&lse_r)[2], float (&di_r)[2]) {
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int64_t off = ((int64_t)b * a.H + h) * a.Sq + i + 8 * hf;
        const float l = i + 8 * hf < a.Sq ? a.lse[off] : -INFINITY;
        lse_r[hf] = l == -INFINITY ? INFINITY : l;
        di_r[hf] = i + 8 * hf < a.Sq ? a.Di[off] : 0.f;
    }
}

/* dq rows r0 .. r0 + 15 (a warp's 16 x kDp fp32 C fragments) = scale * acc, in q's dtype. */
template <typename T, int kDp>
__device__ __forceinline__ void write_dq(const Args &a, const float (&acc)[kDp / 8][4], int b, int h, int64_t r0,
                                         int lane) {
    const int gid = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int n = 0; n < kDp / 8; n++)
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const int64_t i = r0 + gid + 8 * hf;
            const int d = n * 8 + 2 * t4;
            if (i < a.Sq && d < a.D) {
                T *p = (T *)a.dq + b * a.dqs[0] + i * a.dqs[1] + (int64_t)h * a.dqs[2] + d;
                *reinterpret_cast<uint32_t *>(p) = fdma_pack2<T>(acc[n][2 * hf] * a.scale, acc[n][2 * hf + 1] * a.scale);
            }
        }
}

template <int kDp> struct DqSmem {
    static constexpr size_t bytes_of(size_t esz) { return esz * 6 * 64 * (size_t)kDp; }
};

template <typename T, int kDp>
__global__ void __launch_bounds__(128, 1) dq_kernel(const Args a) {
#ifndef FDMA_BWD_NO_DEVICE_CODE
    constexpr int kBM = 64, kBN = 64, kThreads = 128;
    extern __shared__ __align__(128) unsigned char smem[];
    T *sQ = reinterpret_cast<T *>(smem);
    T *sdO = sQ + kBM * kDp;
    T *sK = sdO + kBM * kDp; /* [2][kBN][kDp] */
    T *sV = sK + 2 * kBN * kDp;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2;
    const int row0 = warp * 16;
    const Lane L = make_lane(lane);
    const int64_t i0 = (int64_t)blockIdx.x * kBM;
    const int h = blockIdx.y, b = blockIdx.z, hkv = h / a.g;
    const int ksteps = (a.D + 15) >> 4;
    int64_t j_end = a.Sk;
    if (a.causal) {
        const int64_t e = i0 + kBM + a.Sk - a.Sq;
        j_end = e < j_end ? e : j_end;
    }
    const int nN = j_end > 0 ? (int)((j_end + kBN - 1) / kBN) : 0;

    const T *gk = (const T *)a.k + b * a.ks[0] + (int64_t)hkv * a.ks[2];
    const T *gv = (const T *)a.v + b * a.vs[0] + (int64_t)hkv * a.vs[2];
    load_rows<T, kBM, kDp, kThreads>(sQ, (const T *)a.q + b * a.qs[0] + (int64_t)h * a.qs[2] + i0 * a.qs[1], a.qs[1],
                                     a.Sq - i0, a.D);
    load_rows<T, kBM, kDp, kThreads>(sdO, (const T *)a.dout + b * a.dos[0] + (int64_t)h * a.dos[2] + i0 * a.dos[1],
                                     a.dos[1], a.Sq - i0, a.D);
    auto load_kv = [&](int nb, int buf) {
        const int64_t j0 = (int64_t)nb * kBN;
        load_rows<T, kBN, kDp, kThreads>(sK + buf * kBN * kDp, gk + j0 * a.ks[1], a.ks[1], a.Sk - j0, a.D);
        load_rows<T, kBN, kDp, kThreads>(sV + buf * kBN * kDp, gv + j0 * a.vs[1], a.vs[1], a.Sk - j0, a.D);
    };
    if (nN > 0) load_kv(0, 0);
    fdma_cp_async_commit();

    float lse_r[2], di_r[2];
    row_stats(a, b, h, i0 + row0 + gid, lse_r, di_r);

    float acc[kDp / 8][4];
#pragma unroll
    for (int n = 0; n < kDp / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[n][e] = 0.f;

    for (int nb = 0; nb < nN; nb++) {
        const int buf = nb & 1;
        __syncthreads();
        if (nb + 1 < nN) load_kv(nb + 1, buf ^ 1);
        fdma_cp_async_commit();
        fdma_cp_async_wait<1>();
        __syncthreads();
        const int64_t j0 = (int64_t)nb * kBN;
        const uint32_t vis = visible_bits<false, 8>(a, b, h, i0, j0, row0, lane);
        if (!__syncthreads_or(vis != 0)) continue;
        const T *sKb = sK + buf * kBN * kDp, *sVb = sV + buf * kBN * kDp;

        float s[8][4];
        gemm_rows_bt<T, kDp, 8>(s, sQ, row0, sKb, ksteps, L); /* S = Q K^T */
        scores_to_p<T, false, 8>(a, s, vis, b, h, i0, j0, row0, lane,
                              [&](int il) { return lse_r[(il - row0) >> 3]; });
        const uint32_t keep = a.dropout ? keep_bits<false, 8>(a, b, h, i0, j0, row0, lane) : 0xffffffffu;
        float dp[8][4];
        gemm_rows_bt<T, kDp, 8>(dp, sdO, row0, sVb, ksteps, L); /* dP = dO V^T */
        dp_to_ds<false, 8>(a, dp, s, keep, row0, lane, [&](int il) { return di_r[(il - row0) >> 3]; });
        if (a.softcap > 0.f) {
            gemm_rows_bt<T, kDp, 8>(s, sQ, row0, sKb, ksteps, L);
            softcap_grad<8>(a, dp, s);
        }
        uint32_t da[4][4];
        to_afrag<T, 8>(da, dp, [](int, int) { return 1.f; });
        gemm_regs_b<T, kDp, 8>(acc, da, sKb, ksteps, L); /* dQ += dS K */
    }
    fdma_cp_async_wait<0>();

    write_dq<T, kDp>(a, acc, b, h, i0 + row0, lane);
#endif
}

/* ---- per-head-dim launchers (bwd_d64.cu, bwd_d128.cu, bwd_d256.cu; template in bwd_launch.cuh) ---------- */

/* Launch the dkdv kernel (grid as given) and, when deterministic, the dq kernel. Returns cudaGetLastError. */
cudaError_t launch_d64(const Args &a, int bf16, int deterministic, dim3 grid, cudaStream_t st);
cudaError_t launch_d128(const Args &a, int bf16, int deterministic, dim3 grid, cudaStream_t st);
cudaError_t launch_d256(const Args &a, int bf16, int deterministic, dim3 grid, cudaStream_t st);

constexpr int key_block(int dp) { return dp > 128 ? 64 : 128; }

/* bwd_wgmma.cu (sm_90a object, present when FDMA_HAVE_WGMMA is defined): the dense kernel on wgmma, kDp = 128, no bias
 * or a full one with 16-byte rows, no mask or a staged one; the dense kernel's grid. */
cudaError_t launch_wgmma_d128(const Args &a, int bf16, dim3 grid, cudaStream_t st);
/* bwd_wgmma_sparse.cu (the same object): the sparse kernel on wgmma, kDp = 128, no dropout / softcap. */
cudaError_t launch_wgmma_sparse_d128(const Args &a, int bf16, cudaStream_t st);

/* Bias forms of a call, for dense_eligible: none; per-key (rows broadcast: bias dim 2 == 1, stride 0; bwd_dense.cuh's
 * KEY-BIAS instantiations); full with 16-byte rows (contiguous keys, 16-byte aligned pointer and strides: staged in
 * shared memory by 16-byte copies; dbias DIRECT, ACC or NONE); any other full bias (the general kernels). s: the
 * bias strides with 0 for the broadcast dims (Args::bs); sq: the query rows. */
enum { DENSE_BIAS_NONE = 0, DENSE_BIAS_KEY = 1, DENSE_BIAS_ROWS16 = 2, DENSE_BIAS_OTHER = 3 };
inline int dense_bias_form(const void *bias, const int64_t (&s)[4], int dbias_mode, int64_t sq) {
    if (!bias) return DENSE_BIAS_NONE;
    /* per-key values; the KEY-BIAS dbias is one sum per key: right for no dbias, the row-broadcast partials
       (ACC_ROWS) and DIRECT with one query row, not for a bias view with Sq rows of stride 0 (ACC / DIRECT) */
    if (s[2] == 0)
        return dbias_mode == DBIAS_NONE || dbias_mode == DBIAS_ACC_ROWS || (dbias_mode == DBIAS_DIRECT && sq == 1)
                   ? DENSE_BIAS_KEY
                   : DENSE_BIAS_OTHER;
    const bool rows16 = (uintptr_t)bias % 16 == 0 && s[3] == 1 && s[2] % 8 == 0 && s[1] % 8 == 0 && s[0] % 8 == 0;
    return rows16 ? DENSE_BIAS_ROWS16 : DENSE_BIAS_OTHER;
}

/* A mask that bwd_dense.cuh stages in shared memory by 16-byte copies (its STAGED MASK instantiations): Sq rows (not
 * row-broadcast) of contiguous keys, 16-byte aligned pointer and strides (the rows16 rule above, for bytes). s: the
 * mask strides with 0 for the broadcast dims (Args::ms). Other masks are read per element. */
inline bool dense_mask_staged(const uint8_t *mask, const int64_t (&s)[4]) {
    return mask && s[2] != 0 && s[3] == 1 && (uintptr_t)mask % 16 == 0 && s[2] % 16 == 0 && s[1] % 16 == 0 &&
           s[0] % 16 == 0;
}

/* The calls that bwd_dense.cuh's kernel runs (launch_dp; "_dense" in the plan name): head dim padded to 64 or 128,
 * default (atomic dq) mode, no dropout, no softcap, no top-k window keys (SPARSE lists or expiry), a bias of the
 * first three forms above. The dkdv and dq kernels above run the others. */
inline bool dense_eligible(int dp, int deterministic, bool dropout, float softcap, bool window_keys, int bias_form) {
    return dp <= 128 && !deterministic && !dropout && !(softcap > 0.f) && !window_keys &&
           bias_form != DENSE_BIAS_OTHER;
}

/* Launch kernel k (one Args by value) with sm bytes of dynamic shared memory. */
template <typename K>
cudaError_t launch_smem(K k, dim3 grid, int threads, size_t sm, cudaStream_t st, const Args &a) {
    cudaError_t err = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    if (err != cudaSuccess) return err;
    k<<<grid, threads, sm, st>>>(a);
    return cudaGetLastError();
}

} /* namespace fdma_bwdk */

#endif /* FDMA_CUDA_BWD_COMMON_CUH */
