/*
 * bwd.cu -- the CUDA backward of flash-dmattn (SPEC section 4): the selector fdma_cuda_bwd_plan, the runner
 * fdma_cuda_bwd_run, and the small kernels around the attention kernels of bwd_common.cuh.
 *
 * One call runs, on p->stream, with no allocation and no synchronization:
 *   1. di_kernel:       Di[b,h,i] = dout[b,i,h,:] . out[b,i,h,:]                    (fp32, workspace)
 *   2. memset           dq accumulator (default mode) to 0; dbacc_zero: the dbias accumulator (broadcast bias; a
 *                       causal call's query rows only up to their last visible key)
 *   0. top-k window     the selection (window.cuh): the keep mask, or the SPARSE expiry and key lists
 *   3. dkdv kernel      dk, dv (or per-query-head fp32 partials), dbias, dq atomics (bwd_common.cuh; the calls
 *                       without dropout, softcap or window in the default mode: bwd_dense.cuh's one-pass kernel;
 *                       at D in (64, 128] on a 9.0 device, without a per-key bias or a per-element mask: bwd_wgmma.cu's
 *                       wgmma kernel, plan suffix "_wgmma")
 *      dq kernel        deterministic mode only: dq rows owned by one CTA each
 *      sparse kernel    instead of both, for a SPARSE window in the default mode (D <= 128): query tiles over their gathered
 *                       keys, dq in registers, dk/dv/dbias by fp32 atomics (O(Sq * w) work); at D in (64, 128]
 *                       without dropout or softcap on a 9.0 device bwd_wgmma_sparse.cu's wgmma kernel ("_wgmma")
 *   4. dq_convert       dq = scale * accumulator                                     (default mode)
 *      kv_reduce        dk, dv = sum of the g per-query-head partials                 (GQA, CTA per query head)
 *      dbias_finalize   dbias = sum of the fp32 accumulator over the partial dims     (broadcast bias; 0 past a
 *                       causal row's last visible key without reading)
 *
 * Devices: compute capability 9.0 (the plan refuses others with UNSUPPORTED; bwd_common.cuh says why).
 *
 * Workspace (each region 256-byte aligned): the window's selection; then fp32 Di (B*H*Sq), dq accumulator
 * (B*Sq*H*D, default mode), dk/dv partials (2*B*H*Sk*D, GQA split by query head; sparse kernel: 2*B*Hkv*Sk*D),
 * dbias accumulator (bias elements, or B*H*Sk for a row-broadcast bias; rows padded to a multiple of 4 floats, so
 * that the dense kernel's 16-byte reductions stay aligned and inside their row). Never a (B, H, Sq, Sk) buffer unless
 * the caller's bias or mask has Sq rows and a window is asked (MASK mode: Sq*Sk bytes per selection row).
 */
#include <cuda_runtime.h>
#include <math.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "backend.h"
#include "bwd_common.cuh"
#include "window.cuh"

namespace fdma_bwdk {

struct Config {
    int Dp, kBN;
    int dbias_mode;
    int per_head;     /* one CTA per query head, GQA reduction of fp32 partials afterwards */
    int b_per_cta, hkv_per_cta;
    int64_t AB, AH, A2;  /* dbias accumulator dims (with Sk) */
    int sparse;       /* the sparse kernel (SPARSE window or row-broadcast mask, default mode, D <= 128): dk/dv fp32
                         (B, Hkv, Sk, D) accumulators */
    int gather_rows;  /* sparse kernel over a row-broadcast mask: its kept-key lists (fdma_cuda_gather_launch) */
    int dense;        /* bwd_dense.cuh's one-pass kernel (dense_eligible; the dkdv kernel's workspace and grid, but a
                         CTA per query head for ACC dbias too: atomics instead of owner loops) */
    int key_bias;     /* a bias whose rows broadcast (dim 2 == 1): the dense kernel's KEY-BIAS instantiations */
    int smask;        /* the dense kernel stages the mask in shared memory (dense_mask_staged) */
    int wgmma;        /* Dp = 128 on a 9.0 device: a dense call without a per-key bias or a per-element mask runs
                         bwd_wgmma.cu's kernel, a sparse one without dropout or softcap bwd_wgmma_sparse.cu's */
    int64_t Skp;      /* dbias accumulator row pitch: Sk rounded up to a multiple of 4 */
    size_t off_gl, off_di, off_dq, off_dk, off_dv, off_db, total;
};

static size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

static int dims_equal_full(const fdma_params *p) {
    const int64_t *d = p->bias.dim;
    return (d[0] == p->B || p->B == 1) && (d[1] == p->H || p->H == 1) && (d[2] == p->Sq || p->Sq == 1);
}

/* A mask that broadcasts over query rows (the W1 form) with a bias absent or row-broadcast too: the backward
 * walks each row's kept keys only (sparse kernel), as the forward does. */
static int use_gather_rows(const fdma_params *p) {
    return p->mask.ptr && p->mask.dim[2] == 1 && (!p->bias.ptr || p->bias.dim[2] == 1) && !p->deterministic &&
           p->D <= 128;
}

/* Whether bwd_wgmma.cu's kernel can run here: the build has its sm_90a code (FDMA_HAVE_WGMMA), the current device is
 * compute capability 9.0 exactly (sm_90a code runs nowhere else), and FDMA_BWD_WGMMA is not "0" in the environment
 * (the switch that compares it with the mma.sync kernel in one process). */
static int wgmma_available(void) {
#ifdef FDMA_HAVE_WGMMA
    const char *env = getenv("FDMA_BWD_WGMMA");
    if (env && strcmp(env, "0") == 0) return 0;
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
        return 0;
    return major == 9 && minor == 0;
#else
    return 0;
#endif
}

/* sparse_window: the call has a SPARSE window selection (p is then the call's params after the selection:
 * per-key bias, no mask). The sparse kernel runs for it, or for a row-broadcast mask, in the default mode. */
static void make_config(const fdma_params *p, int sparse_window, Config *c) {
    memset(c, 0, sizeof(*c));
    const int sparse = (sparse_window && !p->deterministic && p->D <= 128) || use_gather_rows(p);
    c->sparse = sparse;
    c->gather_rows = sparse && !sparse_window;
    c->Dp = p->D <= 64 ? 64 : p->D <= 128 ? 128 : 256;
    c->kBN = key_block(c->Dp);
    const int64_t g = p->H / p->Hkv;
    c->b_per_cta = 1;
    c->hkv_per_cta = 1;
    c->dbias_mode = DBIAS_NONE;
    if (p->bias.ptr && p->dbias) {
        const int64_t *d = p->bias.dim;
        if (dims_equal_full(p) && !sparse) {
            c->dbias_mode = DBIAS_DIRECT;
        } else if (d[2] == 1) {
            c->dbias_mode = DBIAS_ACC_ROWS; /* per (batch, query head, key) partials, reduced afterwards */
            c->AB = p->B;
            c->AH = p->H;
            c->A2 = 1;
        } else {
            c->dbias_mode = DBIAS_ACC; /* one fp32 element per bias element */
            c->AB = d[0];
            c->AH = d[1];
            c->A2 = d[2];
        }
    }
    c->Skp = (p->Sk + 3) & ~(int64_t)3;
    int64_t bs[4], ms[4]; /* the bias and mask strides as the kernels see them (Args::bs, ms: 0 for a broadcast dim) */
    for (int x = 0; x < 4; x++) {
        bs[x] = p->bias.dim[x] == 1 ? 0 : p->bias.stride[x];
        ms[x] = p->mask.dim[x] == 1 ? 0 : p->mask.stride[x];
    }
    const int bias_form = dense_bias_form(p->bias.ptr, bs, c->dbias_mode, p->Sq);
    c->key_bias = bias_form == DENSE_BIAS_KEY;
    c->dense = !sparse && dense_eligible(c->Dp, p->deterministic, p->p_drop > 0.f, p->softcap, sparse_window != 0,
                                        bias_form);
    c->smask = c->dense && dense_mask_staged((const uint8_t *)p->mask.ptr, ms);
    /* wgmma: the dense calls with no bias or a full bias with 16-byte rows and no mask or a staged one; the sparse calls
       without dropout or softcap */
    const int dense_wg = c->dense && bias_form != DENSE_BIAS_KEY && (!p->mask.ptr || c->smask);
    c->wgmma = (dense_wg || (sparse && !(p->p_drop > 0.f) && !(p->softcap > 0.f))) && c->Dp == 128 && wgmma_available();
    /* ACC in the dkdv kernel: each accumulator element has one owner thread, so one CTA loops over the batches and
       kv heads that share it (every query head of a kv head, or all heads, in one CTA). The dense kernel adds with
       atomics instead and keeps a CTA per query head. */
    int heads_together = 0;
    if (c->dbias_mode == DBIAS_ACC && !c->dense) {
        const int64_t *d = p->bias.dim;
        if (d[0] == 1 && p->B > 1) c->b_per_cta = (int)p->B;
        if (d[1] < p->H) heads_together = 1;
        if (d[1] == 1 && p->H > 1) c->hkv_per_cta = (int)p->Hkv;
    }
    c->per_head = g > 1 && !heads_together && !sparse;
    const int64_t rows = p->B * p->H * p->Sq;
    size_t off = 0;
    c->off_di = off;
    off += align256((size_t)rows * 4);
    c->off_dq = off;
    if (!p->deterministic && !sparse) off += align256((size_t)rows * p->D * 4);
    c->off_dk = off;
    c->off_dv = off;
    if (sparse) {
        const size_t acc = align256((size_t)(p->B * p->Hkv * p->Sk * p->D) * 4);
        c->off_dv = off + acc;
        off += 2 * acc;
    } else if (c->per_head) {
        const size_t part = align256((size_t)(p->B * p->H * p->Sk * p->D) * 4);
        c->off_dv = off + part;
        off += 2 * part;
    }
    c->off_db = off;
    if (c->dbias_mode == DBIAS_ACC || c->dbias_mode == DBIAS_ACC_ROWS)
        off += align256((size_t)(c->AB * c->AH * c->A2 * c->Skp) * 4);
    c->off_gl = off;
    if (c->gather_rows) off += align256((size_t)(p->mask.dim[0] * p->mask.dim[1] * (p->Sk + 16)) * 4);
    c->total = off;
}

/* ---- small kernels ------------------------------------------------------------------------------------ */

template <typename T> __device__ __forceinline__ void load8(const T *p, float (&f)[8]) {
    const uint4 u = *reinterpret_cast<const uint4 *>(p);
    const T *h = reinterpret_cast<const T *>(&u);
#pragma unroll
    for (int e = 0; e < 8; e++) f[e] = to_f(h[e]);
}

template <typename T> __device__ __forceinline__ void store8(T *p, const float (&f)[8]) {
    uint4 u;
    T *h = reinterpret_cast<T *>(&u);
#pragma unroll
    for (int e = 0; e < 8; e++) h[e] = from_f<T>(f[e]);
    *reinterpret_cast<uint4 *>(p) = u;
}

/* The three element-wise kernels below walk a (B, S, Hx, D) tensor one (b, s) pair per block (grid-stride over the
 * B * S pairs, one 64-bit division per pair), the Hx * D / 8 chunks of 8 elements of the pair over the block's
 * threads (a 32-bit division per chunk): no per-element 64-bit index arithmetic, which dominated their run time. */
static unsigned pair_blocks(int64_t pairs) { return (unsigned)(pairs < 0x7FFFFFFF ? pairs : 0x7FFFFFFF); }
static unsigned pair_threads(int64_t work) { return (unsigned)(work >= 256 ? 256 : (work + 31) / 32 * 32); }

/* Di (B, H, Sq) = rowsum(dout * out): lpr lanes per head row (a power of two with 8 lpr >= D, one 16-byte chunk of
 * out and of dout per lane), blockDim / lpr head rows of one (b, i) at a time. */
template <typename T>
__global__ void di_kernel(const T *out, const T *dout, int64_t os0, int64_t os1, int64_t os2, int64_t ds0,
                          int64_t ds1, int64_t ds2, float *Di, int H, int64_t Sq, int D, int64_t pairs, int lpr) {
    const int sub = threadIdx.x & (lpr - 1), d = sub * 8, per = blockDim.x / lpr;
    for (int64_t bi = blockIdx.x; bi < pairs; bi += gridDim.x) {
        const int64_t b = bi / Sq, i = bi - b * Sq;
        for (int h0 = 0; h0 < H; h0 += per) { /* every lane the same trips: the shuffles below take the whole warp */
            const int h = h0 + threadIdx.x / lpr;
            float x[8], y[8], acc = 0.f;
            if (h < H && d < D) {
                load8(out + b * os0 + i * os1 + h * os2 + d, x);
                load8(dout + b * ds0 + i * ds1 + h * ds2 + d, y);
#pragma unroll
                for (int e = 0; e < 8; e++) acc += x[e] * y[e];
            }
            for (int o = lpr >> 1; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o, lpr);
            if (sub == 0 && h < H) Di[(b * H + h) * Sq + i] = acc;
        }
    }
}

/* dq (B, Sq, H, D) = scale * acc (B, Sq, H, D) fp32 contiguous. */
template <typename T>
__global__ void dq_convert(const float *acc, T *dq, int64_t s0, int64_t s1, int64_t s2, float scale, int64_t Sq,
                           int H, int D, int64_t pairs) {
    const int c8 = D >> 3;
    for (int64_t bi = blockIdx.x; bi < pairs; bi += gridDim.x) {
        const int64_t b = bi / Sq, i = bi - b * Sq;
        const float *src = acc + bi * H * D;
        T *row = dq + b * s0 + i * s1;
        for (int c = threadIdx.x; c < H * c8; c += blockDim.x) {
            const int h = c / c8, d = (c - h * c8) * 8;
            const float4 u = reinterpret_cast<const float4 *>(src)[2 * c], w = reinterpret_cast<const float4 *>(src)[2 * c + 1];
            const float f[8] = {u.x * scale, u.y * scale, u.z * scale, u.w * scale,
                                w.x * scale, w.y * scale, w.z * scale, w.w * scale};
            store8(row + h * s2 + d, f);
        }
    }
}

/* dk or dv (B, Sk, Hkv, D) = mul * sum over the g query heads of part (B, Hkv, g, Sk, D) fp32, in head order. */
template <typename T>
__global__ void kv_reduce(const float *part, T *dst, int64_t s0, int64_t s1, int64_t s2, float mul, int64_t Sk,
                          int Hkv, int g, int D, int64_t pairs) {
    const int c8 = D >> 3;
    for (int64_t bj = blockIdx.x; bj < pairs; bj += gridDim.x) {
        const int64_t b = bj / Sk, j = bj - b * Sk;
        T *row = dst + b * s0 + j * s1;
        for (int c = threadIdx.x; c < Hkv * c8; c += blockDim.x) {
            const int hkv = c / c8, d = (c - hkv * c8) * 8;
            float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            for (int hh = 0; hh < g; hh++) {
                const float4 *src =
                    reinterpret_cast<const float4 *>(part + (((b * Hkv + hkv) * g + hh) * Sk + j) * D + d);
                const float4 u = src[0], w = src[1];
                f[0] += u.x; f[1] += u.y; f[2] += u.z; f[3] += u.w;
                f[4] += w.x; f[5] += w.y; f[6] += w.z; f[7] += w.w;
            }
#pragma unroll
            for (int k = 0; k < 8; k++) f[k] *= mul;
            store8(row + hkv * s2 + d, f);
        }
    }
}

/* ---- dbias accumulator: zeroing and finalisation ------------------------------------------------------------
 * Both walk rows of Sk keys as 2-D grids: x = chunks of 8 keys (blockDim.x threads of 8 keys each), y = the d2 rows
 * of a group (blockDim.y rows per block, grid-stride), z = the groups (grid-stride): no division per element, one per
 * group. causal_rows: the d2 rows are the query rows of a causal call, so row e2 has no visible key past
 * e2 + shift (shift = Sk - Sq): no kernel adds anything there, the zeroing skips those keys and the finalisation
 * writes 0 there without reading them. */
__device__ __forceinline__ int64_t acc_row_limit(int64_t e2, int64_t Sk, int causal_rows, int64_t shift) {
    if (!causal_rows) return Sk;
    const int64_t l = e2 + shift + 1;
    return l < 0 ? 0 : l < Sk ? l : Sk;
}

/* The accumulator (groups x d2 rows of Skp floats) = 0 on keys [0, row limit) rounded up to 4 (float4 stores). */
__global__ void dbacc_zero(float *acc, int64_t groups, int64_t d2, int64_t Sk, int64_t Skp, int causal_rows,
                           int64_t shift) {
    const int64_t j0 = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (j0 >= Sk) return;
    const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int64_t gr = blockIdx.z; gr < groups; gr += gridDim.z)
        for (int64_t e2 = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; e2 < d2;
             e2 += (int64_t)gridDim.y * blockDim.y) {
            const int64_t lim = acc_row_limit(e2, Sk, causal_rows, shift);
            float4 *row = reinterpret_cast<float4 *>(acc + (gr * d2 + e2) * Skp + j0);
            if (j0 < lim) row[0] = z;
            if (j0 + 4 < lim) row[1] = z; /* j0 + 8 <= Skp */
        }
}

/* dbias (d0, d1, d2, Sk), strides st (0 for broadcast dims) = the sum of the accumulator rows that map to each of
 * its rows: nb_sum batches x nh_sum heads (the partial dims; AH heads of d2 rows of Skp floats per accumulator batch),
 * in a fixed order; groups = d0 * d1. 8 keys per thread: two float4 loads per summed row, one 16-byte store where vec
 * (unit key stride, 16-byte aligned rows) and all 8 keys are inside Sk, else scalar stores. */
template <typename T>
__global__ void dbias_finalize(const float *__restrict__ acc, T *__restrict__ dbias, int64_t st0, int64_t st1,
                               int64_t st2, int64_t st3, int vec, int64_t groups, int64_t d1, int64_t d2, int64_t Sk,
                               int64_t Skp, int64_t AH, int64_t nb_sum, int64_t nh_sum, int causal_rows,
                               int64_t shift) {
    const int64_t j0 = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (j0 >= Sk) return;
    const int64_t hstep = d2 * Skp, bstep = AH * hstep;
    for (int64_t gr = blockIdx.z; gr < groups; gr += gridDim.z) {
        const int64_t e0 = gr / d1, e1 = gr - e0 * d1;
        const float *src0 = acc + e0 * nb_sum * bstep + e1 * nh_sum * hstep + j0;
        T *dst0 = dbias + e0 * st0 + e1 * st1 + j0 * st3;
        for (int64_t e2 = (int64_t)blockIdx.y * blockDim.y + threadIdx.y; e2 < d2;
             e2 += (int64_t)gridDim.y * blockDim.y) {
            const int64_t lim = acc_row_limit(e2, Sk, causal_rows, shift);
            float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            if (j0 < lim) {
                const float *src = src0 + e2 * Skp;
                for (int64_t rb = 0; rb < nb_sum; rb++)
                    for (int64_t rh = 0; rh < nh_sum; rh++) {
                        const float4 *x = reinterpret_cast<const float4 *>(src + rb * bstep + rh * hstep);
                        const float4 u = x[0], w = j0 + 4 < lim ? x[1] : make_float4(0.f, 0.f, 0.f, 0.f);
                        f[0] += u.x; f[1] += u.y; f[2] += u.z; f[3] += u.w;
                        f[4] += w.x; f[5] += w.y; f[6] += w.z; f[7] += w.w;
                    }
#pragma unroll
                for (int k = 0; k < 8; k++)
                    if (j0 + k >= lim) f[k] = 0.f;
            }
            T *dst = dst0 + e2 * st2;
            if (vec && j0 + 8 <= Sk) {
                store8(dst, f);
            } else {
#pragma unroll
                for (int k = 0; k < 8; k++)
                    if (j0 + k < Sk) dst[k * st3] = from_f<T>(f[k]);
            }
        }
    }
}

/* Block and grid of the row kernels above for rows of Sk keys, d2 rows per group, groups: 256 threads, as many along
 * the keys as 8 keys each need (32 .. 256), the rest along the rows; about 4096 blocks, the y and z strides cover
 * the rest. */
static void rows_launch_dims(int64_t Sk, int64_t d2, int64_t groups, dim3 *grid, dim3 *block) {
    unsigned tx = 32;
    while (tx < 256 && (int64_t)tx * 8 < Sk) tx *= 2;
    const unsigned ty = 256 / tx;
    const int64_t gx = (Sk + 8 * tx - 1) / (8 * tx), gz = groups < 65535 ? groups : 65535;
    int64_t gy = (d2 + ty - 1) / ty, cap = 4096 / (gx * gz);
    if (cap < 1) cap = 1;
    if (cap > 65535) cap = 65535;
    if (gy > cap) gy = cap;
    *block = dim3(tx, ty);
    *grid = dim3((unsigned)gx, (unsigned)gy, (unsigned)gz);
}

/* 16-byte aligned pointer and batch/seq/head (or the first three dims') strides that are multiples of 8 elements. */
static int aligned16(const void *ptr, const int64_t *st) {
    return ((uintptr_t)ptr % 16 == 0) && st[0] % 8 == 0 && st[1] % 8 == 0 && st[2] % 8 == 0;
}

/* The dbias accumulator's rows are the query rows of a causal call (dbacc_zero, dbias_finalize). */
static int acc_causal_rows(const fdma_params *p, const Config &c) { return p->causal && c.A2 > 1; }

template <typename T>
static cudaError_t run_small_pre(const fdma_params *p, float *Di, cudaStream_t st) {
    const int64_t pairs = p->B * p->Sq;
    int lpr = 1;
    while (lpr * 8 < p->D) lpr *= 2; /* D <= 256: lpr <= 32 */
    di_kernel<T><<<pair_blocks(pairs), pair_threads(p->H * lpr), 0, st>>>(
        (const T *)p->out, (const T *)p->dout, p->out_stride[0], p->out_stride[1], p->out_stride[2],
        p->dout_stride[0], p->dout_stride[1], p->dout_stride[2], Di, (int)p->H, p->Sq, (int)p->D, pairs, lpr);
    return cudaGetLastError();
}

template <typename T>
static cudaError_t run_small_post(const fdma_params *p, const Config &c, const Args &a, cudaStream_t st) {
    cudaError_t err;
    if (c.sparse) { /* (B, Hkv, Sk, D) fp32 accumulators -> dk (times scale), dv */
        const int64_t pairs = p->B * p->Sk;
        const unsigned nb = pair_blocks(pairs), nt = pair_threads(p->Hkv * p->D / 8);
        kv_reduce<T><<<nb, nt, 0, st>>>(a.dkacc, (T *)p->dk, p->dk_stride[0], p->dk_stride[1], p->dk_stride[2],
                                        a.scale, p->Sk, (int)p->Hkv, 1, (int)p->D, pairs);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
        kv_reduce<T><<<nb, nt, 0, st>>>(a.dvacc, (T *)p->dv, p->dv_stride[0], p->dv_stride[1], p->dv_stride[2], 1.f,
                                        p->Sk, (int)p->Hkv, 1, (int)p->D, pairs);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
    } else if (!p->deterministic) {
        const int64_t pairs = p->B * p->Sq;
        dq_convert<T><<<pair_blocks(pairs), pair_threads(p->H * p->D / 8), 0, st>>>(
            a.dqacc, (T *)p->dq, p->dq_stride[0], p->dq_stride[1], p->dq_stride[2], a.scale, p->Sq, (int)p->H,
            (int)p->D, pairs);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if (c.per_head) {
        const int64_t pairs = p->B * p->Sk;
        const unsigned nb = pair_blocks(pairs), nt = pair_threads(p->Hkv * p->D / 8);
        /* the partials already carry the scale of dk */
        kv_reduce<T><<<nb, nt, 0, st>>>(a.dkpart, (T *)p->dk, p->dk_stride[0], p->dk_stride[1], p->dk_stride[2], 1.f,
                                        p->Sk, (int)p->Hkv, (int)a.g, (int)p->D, pairs);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
        kv_reduce<T><<<nb, nt, 0, st>>>(a.dvpart, (T *)p->dv, p->dv_stride[0], p->dv_stride[1], p->dv_stride[2], 1.f,
                                        p->Sk, (int)p->Hkv, (int)a.g, (int)p->D, pairs);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if (c.dbias_mode == DBIAS_ACC || c.dbias_mode == DBIAS_ACC_ROWS) {
        const int64_t *d = p->bias.dim; /* d[2] == c.A2 */
        int64_t st_[4];
        for (int k = 0; k < 4; k++) st_[k] = d[k] == 1 ? 0 : p->dbias_stride[k];
        const int vec = st_[3] == 1 && aligned16(p->dbias, st_);
        dim3 grid, block;
        rows_launch_dims(p->Sk, d[2], d[0] * d[1], &grid, &block);
        dbias_finalize<T><<<grid, block, 0, st>>>(a.dbacc, (T *)p->dbias, st_[0], st_[1], st_[2], st_[3], vec,
                                                  d[0] * d[1], d[1], d[2], p->Sk, c.Skp, c.AH, c.AB / d[0],
                                                  c.AH / d[1], acc_causal_rows(p, c), p->Sk - p->Sq);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    return cudaSuccess;
}

} /* namespace fdma_bwdk */

using namespace fdma_bwdk;

extern "C" fdma_status fdma_cuda_bwd_plan(const fdma_params *p, fdma_plan *plan) {
    if (p->dtype != FDMA_DTYPE_F16 && p->dtype != FDMA_DTYPE_BF16)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED,
                              "fdma_bwd: dtype: the CUDA backend supports fp16 and bf16, got fp32 (use the CPU "
                              "backend for fp32)");
    if (p->D % 8 != 0 || p->D > 256)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED,
                              "fdma_bwd: D: the CUDA backend needs a multiple of 8 up to 256, got %lld",
                              (long long)p->D);
    if (p->Sq >= INT32_MAX - 256 || p->Sk >= INT32_MAX - 256)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED,
                              "fdma_bwd: Sq and Sk must be below 2^31 - 256 on the CUDA backend, got Sq=%lld Sk=%lld",
                              (long long)p->Sq, (long long)p->Sk);
    if (p->H > 65535 || p->B > 65535)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED,
                              "fdma_bwd: H and B must be at most 65535 on the CUDA backend, got H=%lld B=%lld",
                              (long long)p->H, (long long)p->B);
    const struct {
        const char *name;
        const void *ptr;
        const int64_t *st;
    } t[] = {{"q", p->q, p->q_stride},    {"k", p->k, p->k_stride},       {"v", p->v, p->v_stride},
             {"out", p->out, p->out_stride}, {"dout", p->dout, p->dout_stride}, {"dq", p->dq, p->dq_stride},
             {"dk", p->dk, p->dk_stride}, {"dv", p->dv, p->dv_stride}};
    for (size_t x = 0; x < sizeof(t) / sizeof(t[0]); x++)
        if (!aligned16(t[x].ptr, t[x].st))
            return fdma_set_error(FDMA_STATUS_UNSUPPORTED,
                                  "fdma_bwd: %s: the CUDA backward needs a 16-byte aligned pointer and batch/seq/head "
                                  "strides that are multiples of 8 elements, got ptr=%p strides=(%lld, %lld, %lld)",
                                  t[x].name, t[x].ptr, (long long)t[x].st[0], (long long)t[x].st[1],
                                  (long long)t[x].st[2]);
    int dev = 0, major = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    if (err != cudaSuccess)
        return fdma_set_error(FDMA_STATUS_CUDA_ERROR, "fdma_bwd: %s", cudaGetErrorString(err));
    if (major < 9)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED,
                              "fdma_bwd: the CUDA backward kernels of this build run on compute capability 9.0 (H100, "
                              "H200) only; device %d has %d.x (use the CPU or Triton backend there)",
                              dev, major);
    /* top-k window: the selection first (window.cuh), then the backward with what it produced */
    fdma_cuda_window w;
    fdma_status wst = fdma_cuda_window_plan(p, kBwdSparseTileM, 0, &w);
    if (wst != FDMA_STATUS_OK) return wst;
    fdma_params pa;
    fdma_cuda_window_params(&w, p, (void *)(uintptr_t)256, &pa);
    Config c;
    make_config(&pa, w.mode == FDMA_WIN_SPARSE, &c);
    snprintf(plan->name, sizeof(plan->name), "cuda_bwd_%s_d%d%s%s%s%s", p->dtype == FDMA_DTYPE_BF16 ? "bf16" : "f16",
             c.Dp, w.mode == FDMA_WIN_SPARSE ? "_sparse" : w.mode == FDMA_WIN_MASK ? "_window" : "",
             p->deterministic ? "_det"
             : c.gather_rows  ? "_gather"
             : !c.dense       ? ""
             : c.key_bias     ? (c.smask ? "_dense_kbias_smask" : "_dense_kbias")
             : c.smask        ? "_dense_smask"
                              : "_dense",
             c.wgmma ? "_wgmma" : "", c.per_head ? "_gqasplit" : "");
    plan->workspace_bytes = w.bytes + c.total;
    plan->variant = c.Dp;
    plan->flags = c.dbias_mode;
    return FDMA_STATUS_OK;
}

/* The backward after the selection: p has window 0 (and the keep mask as its mask in MASK mode); ws = the workspace
 * after the selection's part; sv = the SPARSE selection or zeros. */
static fdma_status bwd_run_attention(const fdma_params *p, const fdma_plan *plan, char *ws, size_t ws_bytes,
                                     const fdma_cuda_sparse_view *sv) {
    Config c;
    make_config(p, sv->lists != nullptr, &c);
    if (ws_bytes < c.total || (c.total > 0 && ws == NULL))
        return fdma_set_error(FDMA_STATUS_WORKSPACE_TOO_SMALL, "fdma_bwd: workspace: need %zu bytes, got %zu",
                              c.total, ws_bytes);
    cudaStream_t st = (cudaStream_t)p->stream;
    const int bf16 = p->dtype == FDMA_DTYPE_BF16;

    Args a;
    memset(&a, 0, sizeof(a));
    a.q = p->q;
    a.k = p->k;
    a.v = p->v;
    a.out = p->out;
    a.dout = p->dout;
    for (int x = 0; x < 3; x++) {
        a.qs[x] = p->q_stride[x];
        a.ks[x] = p->k_stride[x];
        a.vs[x] = p->v_stride[x];
        a.dos[x] = p->dout_stride[x];
        a.dqs[x] = p->dq_stride[x];
        a.dks[x] = p->dk_stride[x];
        a.dvs[x] = p->dv_stride[x];
    }
    a.dq = p->dq;
    a.dk = p->dk;
    a.dv = p->dv;
    a.B = (int)p->B;
    a.H = (int)p->H;
    a.Hkv = (int)p->Hkv;
    a.g = (int)(p->H / p->Hkv);
    a.D = (int)p->D;
    a.Sq = p->Sq;
    a.Sk = p->Sk;
    a.sq = (int)p->Sq;
    a.sk = (int)p->Sk;
    a.scale = p->scale;
    a.softcap = p->softcap;
    a.inv_softcap = p->softcap > 0.f ? 1.f / p->softcap : 0.f;
    a.causal = p->causal != 0;
    a.dropout = p->p_drop > 0.f;
    a.drop_thr = fdma_dropout_threshold(p->p_drop);
    a.drop_scale = 1.f / (1.f - p->p_drop);
    a.seed = p->seed;
    a.offset = p->offset;
    a.rng_state = p->rng_state;
    /* broadcast views: a dim of size 1 gets stride 0; head index = h / div */
    auto view = [&](const fdma_view4 &vw, int64_t s[4], int *div) {
        for (int x = 0; x < 4; x++) s[x] = vw.dim[x] == 1 ? 0 : vw.stride[x];
        *div = (vw.dim[1] == p->H || vw.dim[1] == 1) ? 1 : a.g;
    };
    if (p->mask.ptr) {
        a.mask = (const uint8_t *)p->mask.ptr;
        view(p->mask, a.ms, &a.mhdiv);
    } else {
        a.mhdiv = 1;
    }
    a.ex_hdiv = 1;
    if (sv->expiry) {
        a.expiry = sv->expiry;
        a.ex_rb = sv->rb;
        a.ex_hdiv = sv->hdiv;
        a.ex_hmul = sv->hmul;
    }
    if (c.sparse && !c.gather_rows) {
        a.ex_lists = sv->lists;
        a.ex_counts = sv->counts;
        a.ex_elists = sv->elists;
        a.ex_cstride = 1;
        a.ex_cap = sv->cap;
        a.ex_ntiles = sv->ntiles;
    } else if (c.gather_rows) { /* lists of (b, mask head) rows: [count, 15 unused, keys] every Sk + 16 entries */
        const fdma_view4 *m = &p->mask;
        int32_t *gl = (int32_t *)(ws + c.off_gl);
        a.ex_lists = gl + 16;
        a.ex_counts = gl;
        a.ex_cstride = p->Sk + 16;
        a.ex_cap = p->Sk + 16;
        a.ex_ntiles = 1;
        a.ex_rb = m->dim[0] > 1 ? m->dim[1] : 0;
        a.ex_hmul = m->dim[1] > 1 ? 1 : 0;
        a.ex_hdiv = (m->dim[1] > 1 && m->dim[1] != p->H) ? (int)(p->H / m->dim[1]) : 1;
    }
    if (c.sparse) {
        a.dkacc = (float *)(ws + c.off_dk);
        a.dvacc = (float *)(ws + c.off_dv);
    }
    if (p->bias.ptr) {
        a.bias = p->bias.ptr;
        view(p->bias, a.bs, &a.bhdiv);
    } else {
        a.bhdiv = 1;
    }
    a.achdiv = 1;
    a.dbias_mode = c.dbias_mode;
    if (c.dbias_mode == DBIAS_DIRECT) {
        a.dbias = p->dbias;
        for (int x = 0; x < 4; x++) a.dbs[x] = p->bias.dim[x] == 1 ? 0 : p->dbias_stride[x];
    } else if (c.dbias_mode != DBIAS_NONE) {
        a.dbacc = (float *)(ws + c.off_db);
        a.acs[2] = c.A2 == 1 ? 0 : c.Skp;
        a.acs[1] = c.AH == 1 ? 0 : c.A2 * c.Skp;
        a.acs[0] = c.AB == 1 ? 0 : c.AH * c.A2 * c.Skp;
        a.achdiv = (c.AH == p->H || c.AH == 1) ? 1 : a.g;
    }
    a.lse = p->lse;
    a.Di = (const float *)(ws + c.off_di);
    a.dqacc = (p->deterministic || c.sparse) ? nullptr : (float *)(ws + c.off_dq);
    a.dkpart = c.per_head ? (float *)(ws + c.off_dk) : nullptr;
    a.dvpart = c.per_head ? (float *)(ws + c.off_dv) : nullptr;
    a.b_per_cta = c.b_per_cta;
    a.hkv_per_cta = c.hkv_per_cta;
    a.hph = c.per_head ? 1 : a.g;
    a.wgmma = c.wgmma;

    cudaError_t err = bf16 ? run_small_pre<__nv_bfloat16>(p, (float *)(ws + c.off_di), st)
                           : run_small_pre<__half>(p, (float *)(ws + c.off_di), st);
    if (err == cudaSuccess && a.dqacc)
        err = cudaMemsetAsync(a.dqacc, 0, (size_t)(p->B * p->Sq * p->H * p->D) * 4, st);
    if (err == cudaSuccess && c.sparse)
        err = cudaMemsetAsync(ws + c.off_dk, 0, c.off_db - c.off_dk, st);
    if (err == cudaSuccess && c.gather_rows) {
        FdmaFwdParams kp;
        memset(&kp, 0, sizeof(kp));
        fdma_status gs = fdma_cuda_gather_launch(kp, p, (int32_t *)(ws + c.off_gl), st);
        if (gs != FDMA_STATUS_OK) return gs;
    }
    if (err == cudaSuccess && a.dbacc) {
        dim3 grid, block;
        rows_launch_dims(p->Sk, c.A2, c.AB * c.AH, &grid, &block);
        dbacc_zero<<<grid, block, 0, st>>>(a.dbacc, c.AB * c.AH, c.A2, p->Sk, c.Skp, acc_causal_rows(p, c),
                                           p->Sk - p->Sq);
        err = cudaGetLastError();
    }
    if (err == cudaSuccess) {
        const dim3 grid((unsigned)((p->Sk + c.kBN - 1) / c.kBN),
                        (unsigned)(c.per_head ? p->H : p->Hkv / c.hkv_per_cta), (unsigned)(p->B / c.b_per_cta));
        err = c.Dp == 64    ? launch_d64(a, bf16, p->deterministic, grid, st)
              : c.Dp == 128 ? launch_d128(a, bf16, p->deterministic, grid, st)
                            : launch_d256(a, bf16, p->deterministic, grid, st);
    }
    if (err == cudaSuccess)
        err = bf16 ? run_small_post<__nv_bfloat16>(p, c, a, st) : run_small_post<__half>(p, c, a, st);
    if (err != cudaSuccess)
        return fdma_set_error(FDMA_STATUS_CUDA_ERROR, "fdma_bwd (%s): %s", plan ? plan->name : "cuda_bwd",
                              cudaGetErrorString(err));
    return FDMA_STATUS_OK;
}

extern "C" fdma_status fdma_cuda_bwd_run(const fdma_params *p, const fdma_plan *plan) {
    fdma_cuda_window w;
    fdma_cuda_sparse_view view;
    fdma_params pa;
    fdma_status st = fdma_cuda_window_prepare(p, kBwdSparseTileM, 0, &w, &view, &pa);
    if (st != FDMA_STATUS_OK) return st;
    return bwd_run_attention(&pa, plan, static_cast<char *>(p->workspace) + w.bytes, p->workspace_bytes - w.bytes,
                             &view);
}
