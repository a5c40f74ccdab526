/*
 * topk.cuh -- CUDA top-k key selection (SPEC section 6) and the sparse "gathered keys" groundwork.
 *
 * Internal to src/cuda; not installed. Two parts:
 *
 * 1. fdma_cuda_topk_create_mask (topk.cu): the keep mask of SPEC section 6 for every row (b, hx, i), one
 *    thread block per row, equal bit for bit to the rule:
 *        candidates of row i: mask[j] && (j <= i + Sk - Sq if causal)
 *        keep all candidates if there are at most `window`, else the `window` largest by (bias[j], j):
 *        ties in bias go to the larger j, NaN is the smallest value, -0 equals +0.
 *    Each (bias, j) is mapped to a totally ordered key: a 16-bit order-preserving code of the fp16/bf16 bits
 *    (fdma_topk_ord: 0 = not a candidate, 1 = NaN, then every other value in order), then the index. A radix
 *    select (8-bit digits: two over the code, then up to four over the index among the ties at the threshold
 *    code) finds the threshold (T, jT); the row keeps j iff code > T, or code == T and j >= jT.
 *
 * 2. The per-key causal form without an (Sq, Sk) mask (topk_sparse.cu). For a per-key bias row
 *    (b, hx, 1, Sk) (and optional per-key base mask) with causal, row i sees the prefix j <= lim_i,
 *    lim_i = i + Sk - Sq. Key j is kept for row i iff
 *        j <= lim_i < e[j]                                             (the "expiry" e[j] in [j, Sk])
 *    e[j] = j for a key never kept, Sk for a key kept up to the last row. Non-causal: e[j] = Sk for the
 *    `window` kept keys, j otherwise, and every row uses lim_i = Sk - 1. Proof and algorithm: dev/sparse/NOTES.md.
 *    From e, per query tile [i0, i0 + M) the gathered key list: every j kept for some row of the tile,
 *        j <= lim_{i1} and e[j] > max(j, lim_{i0})          (i1 = min(i0 + M, Sq) - 1)
 *    as int32 indices in ascending j, padded with -1 to a multiple of 64. Its length is at most
 *    min(Sk, window + M - 1) (causal) or min(Sk, window) (non-causal), the list capacity `cap`.
 *
 * Workspace layout (caller memory, 256-byte aligned base; offsets from fdma_cuda_sparse_layout):
 *    expiry  int32 [R][Sk]            e[j] per row r = b * D1 + hx
 *    counts  int32 [R][ntiles]        real length of each list
 *    lists   int32 [R][ntiles][cap]   ascending key indices, then -1 up to round_up(count, 64) (rest unwritten)
 *    scratch (build only): sort keys, CUB temp, coarse tables, per-position thresholds, survivor lists
 *    ntiles = ceil(Sq / tile_m) if causal (Sq > 0), 1 if not causal (every query tile uses list 0).
 *
 * How a forward kernel consumes it (query tile t of row (b, hx), rows i0 .. i1):
 *    n = counts[r][t]; for each chunk of 64 entries of lists[r][t][:]: idx = list[c] (-1 = padding, skip:
 *    zero K/V/bias, mask the score), load k[b, idx, hk, :], v[b, idx, hk, :], bias[b, hx, 0, idx], e[r][idx];
 *    score of (i, idx) is visible iff idx >= 0 && idx <= lim_i && lim_i < e[r][idx] (&& base mask, already in e),
 *    with lim_i = i + Sk - Sq (causal) or Sk - 1 (not causal). Softmax and output as SPEC section 3 over the
 *    visible pairs; the cost is O(Sq * (window + M)) instead of O(Sq * Sk).
 */
#ifndef FDMA_CUDA_TOPK_CUH
#define FDMA_CUDA_TOPK_CUH

#include <stdint.h>
#include <stddef.h>

#include "flash_dma.h"
#include "backend.h"

/* 16-bit order-preserving code of an fp16 (is_bf16 = 0) or bf16 (is_bf16 = 1) value: larger value -> larger
 * code; every NaN -> 1 (below -inf); -0 and +0 -> 0x8000. Codes 0 is left free for "not a candidate". Non-NaN
 * codes are >= 0x03FF (fp16) or 0x007F (bf16). */
static __host__ __device__ __forceinline__ uint32_t fdma_topk_ord(uint32_t h, int is_bf16)
{
    const uint32_t exp_mask = is_bf16 ? 0x7F80u : 0x7C00u;
    const uint32_t man_mask = is_bf16 ? 0x007Fu : 0x03FFu;
    h &= 0xFFFFu;
    if ((h & exp_mask) == exp_mask && (h & man_mask) != 0) return 1u;
    if ((h & 0x7FFFu) == 0) h = 0;
    return (h & 0x8000u) ? (~h & 0xFFFFu) : (h | 0x8000u);
}

#ifdef __CUDACC__
#include <cuda_runtime.h>

/* ---- device code shared by topk.cu and topk_sparse.cu ---------------------------------------------------- */

/* One row of candidates: bias codes read through a stride, optional base mask (0 = not a candidate). */
typedef struct fdma_topk_row {
    const uint16_t *bias;
    int64_t bs;
    const uint8_t *mask;  /* NULL = no base mask */
    int64_t ms;
    int is_bf16;
} fdma_topk_row;

/* Codes of j0 .. j0+7 (0 for j >= n or masked out). 16-byte bias / 8-byte mask loads when contiguous and
 * aligned. */
static __device__ __forceinline__ void fdma_topk_load8(const fdma_topk_row &r, int64_t j0, int64_t n,
                                                       uint32_t k[8])
{
    const bool full = j0 + 8 <= n;
    if (full && r.bs == 1 && ((uintptr_t)(r.bias + j0) & 15) == 0) {
        const uint4 v = __ldg(reinterpret_cast<const uint4 *>(r.bias + j0));
        const uint32_t w4[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int q = 0; q < 4; q++) {
            k[2 * q] = fdma_topk_ord(w4[q] & 0xFFFFu, r.is_bf16);
            k[2 * q + 1] = fdma_topk_ord(w4[q] >> 16, r.is_bf16);
        }
    } else {
#pragma unroll
        for (int q = 0; q < 8; q++)
            k[q] = (j0 + q < n) ? fdma_topk_ord(__ldg(r.bias + (j0 + q) * r.bs), r.is_bf16) : 0u;
    }
    if (r.mask) {
        if (full && r.ms == 1 && ((uintptr_t)(r.mask + j0) & 7) == 0) {
            const uint2 m = __ldg(reinterpret_cast<const uint2 *>(r.mask + j0));
#pragma unroll
            for (int q = 0; q < 4; q++) {
                if (((m.x >> (8 * q)) & 0xFFu) == 0) k[q] = 0;
                if (((m.y >> (8 * q)) & 0xFFu) == 0) k[4 + q] = 0;
            }
        } else {
#pragma unroll
            for (int q = 0; q < 8; q++)
                if (j0 + q < n && __ldg(r.mask + (j0 + q) * r.ms) == 0) k[q] = 0;
        }
    }
}

typedef struct fdma_topk_smem {
    uint32_t hist[256];
    uint32_t digit, k, eq, all;
    uint32_t T;
    uint32_t nlist;
    int64_t jT;
} fdma_topk_smem;

/* Optional shared-memory list for rows without a code cache: pass 2 records the indices (and low code bytes) of
 * the candidates whose high code byte is the threshold's, when there are at most `cap` of them, so that the
 * index passes read that list instead of the whole row again. */
typedef struct fdma_topk_list {
    uint32_t *j;
    uint8_t *lo;
    uint32_t cap;  /* 0 = no list */
} fdma_topk_list;

/* Warp 0: the largest digit d with suffix(d) = sum_{u >= d} hist[u] >= k (suffix(0) >= k >= 1 holds).
 * Leaves digit = d, k = k - suffix(d + 1) (rank of the target inside bin d), eq = hist[d]. */
static __device__ __forceinline__ void fdma_topk_pick(fdma_topk_smem &s, uint32_t k)
{
    const int lane = threadIdx.x & 31;
    uint32_t h[8], sum = 0;
#pragma unroll
    for (int b = 0; b < 8; b++) { h[b] = s.hist[lane * 8 + b]; sum += h[b]; }
    uint32_t suf = sum;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const uint32_t t = __shfl_down_sync(0xFFFFFFFFu, suf, off);
        if (lane + off < 32) suf += t;
    }
    uint32_t above = __shfl_down_sync(0xFFFFFFFFu, suf, 1);
    if (lane == 31) above = 0;
    if (suf >= k && above < k) {
        uint32_t acc = above;
#pragma unroll
        for (int b = 7; b >= 0; b--) {
            if (acc + h[b] >= k) { s.digit = lane * 8 + b; s.k = k - acc; s.eq = h[b]; break; }
            acc += h[b];
        }
    }
}

/* Run-length histogram add: consecutive equal bins of one thread become one atomic. */
static __device__ __forceinline__ void fdma_topk_hadd(uint32_t *hist, uint32_t bin, uint32_t &cur, uint32_t &cnt)
{
    if (cnt != 0 && bin == cur) { cnt++; return; }
    if (cnt != 0) atomicAdd(&hist[cur], cnt);
    cur = bin;
    cnt = 1;
}

/* Codes of chunk c (entries 8c .. 8c+7) from the shared cache when present, else from memory. */
static __device__ __forceinline__ void fdma_topk_chunk(const fdma_topk_row &r, int64_t n, const uint16_t *cache,
                                                       int64_t c, uint32_t k[8])
{
    if (cache) {
        const uint4 v = reinterpret_cast<const uint4 *>(cache)[c];
        const uint32_t w4[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int q = 0; q < 4; q++) { k[2 * q] = w4[q] & 0xFFFFu; k[2 * q + 1] = w4[q] >> 16; }
    } else {
        fdma_topk_load8(r, 8 * c, n, k);
    }
}

/* Block radix select over the candidates j < n of one row (NT threads, all of them call it). Afterwards
 * s.all = 1 if there are at most w candidates (keep them all), else the row keeps j iff
 * code > s.T || (code == s.T && j >= s.jT). cache: NULL or shared memory for ceil(n/8)*8 codes (16-byte
 * aligned); it is filled by the first pass and holds the codes afterwards. lst: see fdma_topk_list (used only
 * without a cache). */
template <int NT>
static __device__ void fdma_topk_select(const fdma_topk_row &r, int64_t n, int64_t w, uint16_t *cache,
                                        fdma_topk_smem &s, const fdma_topk_list &lst)
{
    const int tid = threadIdx.x;
    const int64_t nch = (n + 7) / 8;
    uint32_t k[8];

    /* pass 1: high byte of the code, every candidate */
    for (int i = tid; i < 256; i += NT) s.hist[i] = 0;
    __syncthreads();
    {
        uint32_t cur = 0, cnt = 0;
        for (int64_t c = tid; c < nch; c += NT) {
            fdma_topk_load8(r, 8 * c, n, k);
            if (cache) {
                uint4 v;
                v.x = k[0] | (k[1] << 16); v.y = k[2] | (k[3] << 16);
                v.z = k[4] | (k[5] << 16); v.w = k[6] | (k[7] << 16);
                reinterpret_cast<uint4 *>(cache)[c] = v;
            }
#pragma unroll
            for (int q = 0; q < 8; q++)
                if (k[q] != 0) fdma_topk_hadd(s.hist, k[q] >> 8, cur, cnt);
        }
        if (cnt != 0) atomicAdd(&s.hist[cur], cnt);
    }
    __syncthreads();
    if (tid < 32) {
        uint32_t tot = 0;
        for (int b = tid; b < 256; b += 32) tot += s.hist[b];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) tot += __shfl_xor_sync(0xFFFFFFFFu, tot, off);
        const bool all = (int64_t)tot <= w;
        if (!all) fdma_topk_pick(s, (uint32_t)w);
        if (tid == 0) s.all = all ? 1u : 0u;
    }
    __syncthreads();
    if (s.all) return;
    const uint32_t hi = s.digit;
    uint32_t rem = s.k;
    const bool use_list = !cache && lst.cap != 0 && s.eq <= lst.cap;
    __syncthreads();

    /* pass 2: low byte of the code, among codes with that high byte (recorded in the list when it is used) */
    for (int i = tid; i < 256; i += NT) s.hist[i] = 0;
    if (tid == 0) s.nlist = 0;
    __syncthreads();
    {
        uint32_t cur = 0, cnt = 0;
        for (int64_t c = tid; c < nch; c += NT) {
            fdma_topk_chunk(r, n, cache, c, k);
#pragma unroll
            for (int q = 0; q < 8; q++) {
                if (k[q] != 0 && (k[q] >> 8) == hi) {
                    fdma_topk_hadd(s.hist, k[q] & 0xFFu, cur, cnt);
                    if (use_list) {
                        const uint32_t at = atomicAdd(&s.nlist, 1u);
                        lst.j[at] = (uint32_t)(8 * c + q);
                        lst.lo[at] = (uint8_t)(k[q] & 0xFFu);
                    }
                }
            }
        }
        if (cnt != 0) atomicAdd(&s.hist[cur], cnt);
    }
    __syncthreads();
    if (tid < 32) fdma_topk_pick(s, rem);
    __syncthreads();
    const uint32_t T = (hi << 8) | s.digit;
    rem = s.k;
    const uint32_t eq = s.eq;
    __syncthreads();
    if (rem == eq) {  /* every tie at T is kept */
        if (tid == 0) { s.T = T; s.jT = 0; }
        __syncthreads();
        return;
    }

    /* passes 3..: the rem-th largest index among codes == T, 8 bits at a time from the top */
    const int nbits = 64 - __clzll((unsigned long long)(n - 1));
    int64_t prefix = 0;
    for (int shift = ((nbits - 1) / 8) * 8; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += NT) s.hist[i] = 0;
        __syncthreads();
        if (use_list) {
            const uint32_t nl = s.nlist;
            for (uint32_t q = tid; q < nl; q += NT) {
                const int64_t j = lst.j[q];
                if (lst.lo[q] == (T & 0xFFu) && (j >> (shift + 8)) == (prefix >> (shift + 8)))
                    atomicAdd(&s.hist[(j >> shift) & 0xFF], 1u);
            }
        } else {
            uint32_t cur = 0, cnt = 0;
            for (int64_t c = tid; c < nch; c += NT) {
                fdma_topk_chunk(r, n, cache, c, k);
#pragma unroll
                for (int q = 0; q < 8; q++) {
                    const int64_t j = 8 * c + q;
                    if (k[q] == T && (j >> (shift + 8)) == (prefix >> (shift + 8)))
                        fdma_topk_hadd(s.hist, (uint32_t)((j >> shift) & 0xFF), cur, cnt);
                }
            }
            if (cnt != 0) atomicAdd(&s.hist[cur], cnt);
        }
        __syncthreads();
        if (tid < 32) fdma_topk_pick(s, rem);
        __syncthreads();
        prefix |= (int64_t)s.digit << shift;
        rem = s.k;
        __syncthreads();
    }
    if (tid == 0) { s.T = T; s.jT = prefix; }
    __syncthreads();
}

/* Non-causal per-key expiry (topk.cu): e[r * Sk + j] = Sk if j is kept by row r = b * D1 + hx, else j. Launch
 * on p->stream, returns the launch status. */
extern "C" cudaError_t fdma_cuda_topk_expiry_noncausal(const fdma_topk_params *p, int64_t D0, int64_t D1,
                                                       int32_t *expiry);

/* Keep bit of code kc at index j after fdma_topk_select. */
static __device__ __forceinline__ bool fdma_topk_kept(const fdma_topk_smem &s, uint32_t kc, int64_t j)
{
    return kc != 0 && (s.all || kc > s.T || (kc == s.T && j >= s.jT));
}
#endif /* __CUDACC__ */

#ifdef __cplusplus
extern "C" {
#endif

/* SPEC section 6 keep mask on the GPU: p validated by src/validate.c (dims, strides, window >= 1), pointers on
 * the current device. Launches on p->stream; no allocation, no synchronization. */
fdma_status fdma_cuda_topk_create_mask(const fdma_topk_params *p);

typedef struct fdma_sparse_layout {
    int64_t D0, D1;        /* rows of the expiry array: (b, hx) over (D0, D1) = max of bias and mask dims */
    int64_t R;             /* D0 * D1 */
    int64_t Sq, Sk, window;
    int32_t causal;
    int64_t tile_m;        /* query rows per tile (M) */
    int64_t ntiles;        /* lists per row */
    int64_t cap;           /* entries per list (multiple of 64) */
    size_t off_expiry;     /* int32 [R][Sk] */
    size_t off_counts;     /* int32 [R][ntiles] */
    size_t off_lists;      /* int32 [R][ntiles][cap] */
    size_t bytes;          /* workspace needed by fdma_cuda_sparse_build (outputs + scratch) */
    /* scratch, private to topk_sparse.cu */
    int64_t G, nb, ns, idx_bits, seg_bits, super_tiles, tiles_per_super, surv_cap;
    size_t off_keys, off_sorted, off_kfull, off_table, off_kg, off_pg, off_cnt, off_surv, off_cub;
    size_t cub_bytes;
} fdma_sparse_layout;

/* Fill the layout for a per-key bias p->bias (dims ({B|1}, {Hx|1}, 1, Sk)), optional per-key base mask p->mask
 * (dims ({B|1}, {Hx|1}, 1, Sk)), p->causal, p->window >= 1, p->Sq, p->Sk; p->out is not used. tile_m >= 1.
 * INVALID_ARGUMENT (message names the argument) if the bias or mask has Sq rows. Host only; queries CUB for its
 * temporary size (no launch). */
fdma_status fdma_cuda_sparse_layout(const fdma_topk_params *p, int64_t tile_m, fdma_sparse_layout *L);

/* Compute the expiry array and the per-tile lists into `workspace` (L->bytes, 256-byte aligned) on p->stream. */
fdma_status fdma_cuda_sparse_build(const fdma_topk_params *p, const fdma_sparse_layout *L, void *workspace,
                                   size_t workspace_bytes);

#ifdef __cplusplus
}
#endif

#endif /* FDMA_CUDA_TOPK_CUH */
