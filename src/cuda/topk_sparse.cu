/*
 * topk_sparse.cu -- per-key top-w selection without an (Sq, Sk) mask: the expiry array e and the per-query-tile
 * gathered key lists that a sparse forward kernel consumes (layout and contract: topk.cuh; proof: NOTES.md).
 *
 * Shapes: bias (D0|1, D1|1, 1, Sk) fp16/bf16, optional base mask (D0|1, D1|1, 1, Sk) uint8, through strides;
 * rows r = b * D1 + hx, R = D0 * D1. Outputs in the caller's workspace: e int32 [R][Sk], counts int32
 * [R][ntiles], lists int32 [R][ntiles][cap].
 *
 * Causal algorithm, per row (key[j] = (code_j << ib) | j, 0 where the base mask is false; code from
 * fdma_topk_ord; larger key = ranked higher; K_L = the window-th largest key among j <= L, 0 if fewer):
 *   1. keys:     one 64-bit sort key per (r, j): ((R-1-r) << (16+ib)) | key[j].
 *   2. sort:     cub::DeviceRadixSort descending over R*Sk keys -> each row's keys by rank, candidates first.
 *   3. table:    positions split in buckets of G = 1024 (bucket g ends at L_g = min(Sk, (g+1)G) - 1) and the
 *                sorted order in chunks of G; tab[s][g] = #{sorted pos in chunk s with index <= L_g}.
 *   4. coarse:   per bucket, K_{L_g} (the window-th sorted entry with index <= L_g, found from tab by a scan over
 *                chunks, then a scan inside one chunk), its sorted position, and #candidates <= L_g.
 *   5. bucket:   per bucket, V_g = {u <= L_g : K_{L_{g-1}} <= key[u] <= K_{L_g}} (|V_g| <= G+1; a contiguous
 *                range of sorted positions, filtered by index) and, per L in the bucket,
 *                K_L = the (z_L - window + 1)-th smallest of V_g restricted to u <= L, z_L = #{u <= L :
 *                key[u] >= K_{L_{g-1}}} (a block scan over the bucket). V_g is gathered into shared memory by
 *                block scans (8 sorted positions per thread per round); each warp then owns 32 consecutive L and
 *                reads V_g from its smallest entry up, 32 entries per step (one per lane), counting for every lane
 *                at once with a ballot and a warp OR of the entries' index offsets, until each lane's count is reached.
 *   6. expiry:   e[j] = first L >= j with K_L > key[j] (K_L is nondecreasing: binary search), Sk if none;
 *                e[j] = j for a key that is not a candidate.
 *   Work: the sort (O(R Sk) per digit pass), O(R Sk) for steps 1, 3, 4, 6 (plus log Sk per key in 6), and in 5
 *   the gather of each bucket's sorted range plus O(R Sk G / 32^2) warp steps of 32 entries (at most
 *   (G+1)/32 + 1 per warp, a warp stopping once all its lanes are resolved).
 * Non-causal: e[j] = Sk for the window kept keys (the block radix select of topk.cu), j otherwise.
 * Tile lists: list(t) = {j <= hi_t : e[j] > max(j, lo_t)}, lo_t = lim_{i0}, hi_t = lim_{i1}. Tiles are grouped
 *   by `tiles_per_super` (so that a group spans about max(window, sqrt(Sk M / 2)) query rows): the survivors
 *   S(x) = {j <= x : e[j] > x} at the first lim x of each group (at most window keys) are compacted once by a
 *   scan of [0, x]; each tile then scans S(x) plus the keys in (x, hi_t]. Both parts come out in ascending j.
 *
 * Build: nvcc -c -arch=sm_90 -Iinclude -Isrc src/cuda/topk_sparse.cu
 */
#include <math.h>
#include <string.h>

#include <cuda_runtime.h>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include "topk.cuh"

#define FDMA_SPARSE_G 1024   /* bucket width and block size of steps 3-5 */
#define FDMA_SPARSE_SURV_NT 1024  /* block size of the survivors kernel (few blocks, long scans) */
#define FDMA_SPARSE_TILE_NT 256   /* block size of the tile-list kernel (many blocks, short scans) */
#define FDMA_SPARSE_ITEMS 8       /* consecutive items per thread per compaction round */

static size_t fdma_sparse_align(size_t x) { return (x + 255) & ~(size_t)255; }

static int fdma_sparse_bits(int64_t x)  /* bits to hold 0 .. x (x >= 0), at least 1 for idx */
{
    int b = 0;
    while (b < 63 && (x >> b) != 0) b++;
    return b;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Kernels                                                                                                     */

typedef struct fdma_sparse_kargs {
    const uint16_t *bias; int64_t bdim[4]; int64_t bstr[4];
    const uint8_t *mask;  int64_t mdim[4]; int64_t mstr[4];
    int is_bf16;
    int64_t R, D1, Sq, Sk, window;
    int ib;                     /* index bits */
    uint64_t rk_mask, ix_mask;  /* (1 << (16+ib)) - 1, (1 << ib) - 1 */
    int64_t nb, ns;
    uint64_t *keys, *sorted, *kfull, *kg;
    int32_t *tab, *pg, *cnt;
    int32_t *expiry, *counts, *lists, *surv, *survcnt;
    int64_t tile_m, ntiles, cap, tps, nsup, surv_cap;
    int causal;
} fdma_sparse_kargs;

static __device__ __forceinline__ int64_t fdma_sparse_off(const int64_t dim[4], const int64_t str[4], int64_t D1,
                                                          int64_t b, int64_t hx)
{
    const int64_t bb = dim[0] == 1 ? 0 : b;
    const int64_t bh = dim[1] == 1 ? 0 : hx / (D1 / dim[1]);
    return bb * str[0] + bh * str[1];
}

/* 1. sort keys */
__global__ void fdma_sparse_keys_kernel(const fdma_sparse_kargs a)
{
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= a.R * a.Sk) return;
    const int64_t r = idx / a.Sk, j = idx % a.Sk;
    const int64_t b = r / a.D1, hx = r % a.D1;
    uint32_t code = fdma_topk_ord(a.bias[fdma_sparse_off(a.bdim, a.bstr, a.D1, b, hx) + j * a.bstr[3]], a.is_bf16);
    if (a.mask && a.mask[fdma_sparse_off(a.mdim, a.mstr, a.D1, b, hx) + j * a.mstr[3]] == 0) code = 0;
    const uint64_t key = code ? (((uint64_t)code << a.ib) | (uint64_t)j) : 0;
    a.keys[idx] = ((uint64_t)(a.R - 1 - r) << (16 + a.ib)) | key;
}

/* Inclusive scan in place of n ints in shared memory by NT threads (contiguous pieces per thread). */
template <int NT>
static __device__ void fdma_sparse_scan_smem(int32_t *v, int64_t n, typename cub::BlockScan<int32_t, NT>::TempStorage &ts)
{
    const int64_t per = (n + NT - 1) / NT;
    const int64_t beg = threadIdx.x * per;
    const int64_t end = beg + per < n ? beg + per : n;
    int32_t sum = 0;
    for (int64_t q = beg; q < end; q++) sum += v[q];
    int32_t excl;
    cub::BlockScan<int32_t, NT>(ts).ExclusiveSum(sum, excl);
    __syncthreads();
    for (int64_t q = beg; q < end; q++) { excl += v[q]; v[q] = excl; }
    __syncthreads();
}

/* 3. tab[r][s][g] = #{p in sorted chunk s : candidate, index <= L_g} (inclusive over g). grid (ns, R). */
__global__ void __launch_bounds__(FDMA_SPARSE_G) fdma_sparse_table_kernel(const fdma_sparse_kargs a)
{
    extern __shared__ int32_t fdma_sparse_h[];
    __shared__ typename cub::BlockScan<int32_t, FDMA_SPARSE_G>::TempStorage ts;
    const int64_t s = blockIdx.x, r = blockIdx.y;
    for (int64_t g = threadIdx.x; g < a.nb; g += FDMA_SPARSE_G) fdma_sparse_h[g] = 0;
    __syncthreads();
    const int64_t p = s * FDMA_SPARSE_G + threadIdx.x;
    if (p < a.Sk) {
        const uint64_t v = a.sorted[r * a.Sk + p] & a.rk_mask;
        if ((v >> a.ib) != 0) atomicAdd(&fdma_sparse_h[(int64_t)(v & a.ix_mask) / FDMA_SPARSE_G], 1);
    }
    __syncthreads();
    fdma_sparse_scan_smem<FDMA_SPARSE_G>(fdma_sparse_h, a.nb, ts);
    int32_t *row = a.tab + (r * a.ns + s) * a.nb;
    for (int64_t g = threadIdx.x; g < a.nb; g += FDMA_SPARSE_G) row[g] = fdma_sparse_h[g];
}

/* 4. coarse thresholds: kg[r][g] = K_{L_g} (0 if fewer than window candidates <= L_g), pg = its sorted position,
 *    cnt = #candidates <= L_g. grid (nb, R). */
__global__ void __launch_bounds__(FDMA_SPARSE_G) fdma_sparse_coarse_kernel(const fdma_sparse_kargs a)
{
    typedef cub::BlockScan<int32_t, FDMA_SPARSE_G> Scan;
    __shared__ typename Scan::TempStorage ts;
    __shared__ int64_t sh_s, sh_f;
    const int64_t g = blockIdx.x, r = blockIdx.y;
    const int64_t L = (g + 1) * FDMA_SPARSE_G - 1 < a.Sk - 1 ? (g + 1) * FDMA_SPARSE_G - 1 : a.Sk - 1;
    if (threadIdx.x == 0) { sh_s = -1; sh_f = 0; }
    __syncthreads();
    int64_t carry = 0;
    for (int64_t base = 0; base < a.ns; base += FDMA_SPARSE_G) {
        const int64_t s = base + threadIdx.x;
        const int32_t v = s < a.ns ? a.tab[(r * a.ns + s) * a.nb + g] : 0;
        int32_t excl, agg;
        Scan(ts).ExclusiveSum(v, excl, agg);
        if (s < a.ns && carry + excl < a.window && carry + excl + v >= a.window) { sh_s = s; sh_f = carry + excl; }
        carry += agg;
        __syncthreads();
    }
    const int64_t slot = r * a.nb + g;
    if (threadIdx.x == 0) a.cnt[slot] = (int32_t)carry;
    if (carry < a.window) {
        if (threadIdx.x == 0) { a.kg[slot] = 0; a.pg[slot] = -1; }
        return;
    }
    const int64_t need = a.window - sh_f;
    const int64_t p = sh_s * FDMA_SPARSE_G + threadIdx.x;  /* sh_s >= 0 here: the window-th entry exists */
    uint64_t v = 0;
    int32_t pred = 0;
    if (sh_s >= 0 && p < a.Sk) {
        v = a.sorted[r * a.Sk + p] & a.rk_mask;
        pred = (v >> a.ib) != 0 && (int64_t)(v & a.ix_mask) <= L;
    }
    int32_t incl;
    Scan(ts).InclusiveSum(pred, incl);
    if (pred && incl == need) { a.kg[slot] = v; a.pg[slot] = (int32_t)p; }
}

/* Ordered compaction of items beg .. end-1 (item q has the value load(q)): appends those with pred(value) to
 * out[n ..] (writes below cap only), in item order, and advances n by their count. Each round gives every thread
 * ITEMS consecutive items and does one block scan of the per-thread counts. The last round's writes are not
 * followed by a barrier. */
template <int NT, int ITEMS, typename T, typename Load, typename Pred>
static __device__ __forceinline__ void fdma_sparse_compact(int64_t beg, int64_t end, Load load, Pred pred, T *out,
                                                           int64_t cap, int64_t &n,
                                                           typename cub::BlockScan<int32_t, NT>::TempStorage &ts)
{
    for (int64_t base = beg; base < end; base += (int64_t)NT * ITEMS) {
        const int64_t q0 = base + (int64_t)threadIdx.x * ITEMS;
        T val[ITEMS];
        uint32_t bits = 0;
        int32_t cnt = 0;
#pragma unroll
        for (int u = 0; u < ITEMS; u++) {
            const int64_t q = q0 + u;
            val[u] = q < end ? load(q) : T(0);
            const bool p = q < end && pred(val[u]);
            bits |= (uint32_t)p << u;
            cnt += p;
        }
        int32_t excl, agg;
        cub::BlockScan<int32_t, NT>(ts).ExclusiveSum(cnt, excl, agg);
        __syncthreads();
        int64_t pos = n + excl;
#pragma unroll
        for (int u = 0; u < ITEMS; u++) {
            if ((bits >> u) & 1u) {
                if (pos < cap) out[pos] = val[u];
                pos++;
            }
        }
        n += agg;
    }
}

/* Position of the n-th set bit (1-based: 1 <= n <= popc(m)) of m, counted from bit 0. */
static __device__ __forceinline__ int fdma_sparse_nth_bit(uint32_t m, int n)
{
    int lo = 0, hi = 31;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (__popc(m & (0xFFFFFFFFu >> (31 - mid))) >= n) hi = mid; else lo = mid + 1;
    }
    return lo;
}

/* 5. per-position thresholds kfull[r][L] for the bucket g. grid (nb, R), G threads (thread t -> L = gG + t).
 *    Gather: V = the entries of the sorted range [pg[g], pend] with index <= L_g, in sorted (descending) order,
 *    |V| <= G+1 (NOTES.md), by fdma_sparse_compact (ITEMS consecutive positions per thread per round). K_L = the (rank+1)-th entry with index <= L counted from the end of V.
 *    Walk: the 32 lanes of a warp hold 32 consecutive L = w0 + lane and read V from the end in chunks of 32
 *    entries (lane k: V[q0 - k]). An entry with index i counts for the lanes >= e = i - w0: for all of them when
 *    e < 0 (a ballot), for lanes >= e when 0 <= e < 32 (an OR of 1 << e over the warp: V holds candidates only,
 *    whose indices are distinct), for none when e >= 32. In the chunk where a lane's count reaches rank+1,
 *    ballot(e <= lane) is its mask of counted entries in walk order and the answer is its (rank+1 - count
 *    before)-th set bit. Same order and result as walking V one entry at a time per thread; a warp stops when all
 *    its lanes are resolved. Min 1 block per SM in the launch bounds: 64 registers (ptxas aims at 32 for sm_80
 *    otherwise, and spills). */
__global__ void __launch_bounds__(FDMA_SPARSE_G, 1) fdma_sparse_bucket_kernel(const fdma_sparse_kargs a)
{
    typedef cub::BlockScan<int32_t, FDMA_SPARSE_G> Scan;
    __shared__ typename Scan::TempStorage ts;
    __shared__ uint64_t V[FDMA_SPARSE_G + 1];
    const int64_t g = blockIdx.x, r = blockIdx.y;
    const int64_t L = g * FDMA_SPARSE_G + threadIdx.x;
    const int64_t Lg = (g + 1) * FDMA_SPARSE_G - 1 < a.Sk - 1 ? (g + 1) * FDMA_SPARSE_G - 1 : a.Sk - 1;
    const uint64_t Kc = a.kg[r * a.nb + g];
    if (Kc == 0) {
        if (L < a.Sk) a.kfull[r * a.Sk + L] = 0;
        return;
    }
    const uint64_t Kp = g > 0 ? a.kg[r * a.nb + g - 1] : 0;
    const int64_t M = a.cnt[r * a.nb + a.nb - 1];
    const int64_t pstart = a.pg[r * a.nb + g];
    const int64_t pend = Kp != 0 ? a.pg[r * a.nb + g - 1] : M - 1;
    int32_t in = 0;
    if (L < a.Sk) {
        const uint64_t v = a.keys[r * a.Sk + L] & a.rk_mask;
        in = (v >> a.ib) != 0 && v >= Kp;
    }

    const uint64_t *srow = a.sorted + r * a.Sk;
    int64_t nV = 0;
    fdma_sparse_compact<FDMA_SPARSE_G, FDMA_SPARSE_ITEMS>(
        pstart, pend + 1, [&](int64_t p) { return srow[p] & a.rk_mask; },
        [&](uint64_t v) { return (int64_t)(v & a.ix_mask) <= Lg; }, V, FDMA_SPARSE_G + 1, nV, ts);
    __syncthreads();
    if (nV > FDMA_SPARSE_G + 1) nV = FDMA_SPARSE_G + 1;  /* cannot happen (NOTES.md); keeps the reads in bounds */

    const int64_t z0 = Kp != 0 ? a.window : (g > 0 ? a.cnt[r * a.nb + g - 1] : 0);
    int32_t incl;
    Scan(ts).InclusiveSum(in, incl);
    const int64_t need = z0 + incl - a.window + 1;  /* K_L = the need-th smallest of V restricted to u <= L */
    const int lane = (int)(threadIdx.x & 31);
    const int64_t w0 = L - lane;
    bool done = L >= a.Sk || need <= 0;
    int64_t c = 0;  /* entries counted so far (< need while not done) */
    uint64_t res = 0;
    for (int64_t q0 = nV - 1; q0 >= 0 && !__all_sync(0xFFFFFFFFu, done); q0 -= 32) {
        const int64_t q = q0 - lane;
        const int64_t d = q >= 0 ? (int64_t)(V[q] & a.ix_mask) - w0 : 32;
        const int e = d < 0 ? -1 : (d < 32 ? (int)d : 32);
        const uint32_t below = __ballot_sync(0xFFFFFFFFu, e < 0);
        const uint32_t at = __reduce_or_sync(0xFFFFFFFFu, e >= 0 && e < 32 ? 1u << e : 0u);
        const int n = __popc(below) + __popc(at & (0xFFFFFFFFu >> (31 - lane)));
        const bool hit = !done && c + n >= need;
        if (__any_sync(0xFFFFFFFFu, hit)) {
            uint32_t m = 0;
#pragma unroll
            for (int o = 0; o < 32; o++) {
                const uint32_t b = __ballot_sync(0xFFFFFFFFu, e <= o);
                if (o == lane) m = b;
            }
            if (hit) res = V[q0 - fdma_sparse_nth_bit(m, (int)(need - c))];
        }
        c += n;
        done = done || hit;
    }
    if (L < a.Sk) a.kfull[r * a.Sk + L] = res;
}

/* 6. e[r][j] = first L >= j with kfull[L] > key[j], Sk if none; j for a non-candidate. */
__global__ void fdma_sparse_expiry_kernel(const fdma_sparse_kargs a)
{
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= a.R * a.Sk) return;
    const int64_t r = idx / a.Sk, j = idx % a.Sk;
    const uint64_t v = a.keys[idx] & a.rk_mask;
    int64_t e = j;
    if ((v >> a.ib) != 0) {
        const uint64_t *K = a.kfull + r * a.Sk;
        int64_t lo = j, hi = a.Sk;
        while (lo < hi) {
            const int64_t mid = (lo + hi) / 2;
            if (K[mid] > v) hi = mid; else lo = mid + 1;
        }
        e = lo;
    }
    a.expiry[idx] = (int32_t)e;
}

static __device__ __forceinline__ int64_t fdma_sparse_lim(const fdma_sparse_kargs &a, int64_t i)
{
    return a.causal ? i + a.Sk - a.Sq : a.Sk - 1;
}

/* Survivors S(x) = {j <= x : e[j] > x} at x = lim of the first row of each tile group. grid (nsup, R). */
__global__ void __launch_bounds__(FDMA_SPARSE_SURV_NT) fdma_sparse_survivors_kernel(const fdma_sparse_kargs a)
{
    __shared__ typename cub::BlockScan<int32_t, FDMA_SPARSE_SURV_NT>::TempStorage ts;
    const int64_t T = blockIdx.x, r = blockIdx.y;
    const int64_t x = fdma_sparse_lim(a, T * a.tps * a.tile_m);
    const int32_t *e = a.expiry + r * a.Sk;
    int32_t *out = a.surv + (r * a.nsup + T) * a.surv_cap;
    int64_t n = 0;
    fdma_sparse_compact<FDMA_SPARSE_SURV_NT, FDMA_SPARSE_ITEMS>(
        0, x + 1, [](int64_t q) { return (int32_t)q; }, [&](int32_t j) { return e[j] > x; }, out, a.surv_cap, n, ts);
    if (threadIdx.x == 0) a.survcnt[r * a.nsup + T] = (int32_t)(n < a.surv_cap ? n : a.surv_cap);
}

/* Tile lists: list(t) = {j in S(x) : e[j] > lo} then {j in (x, hi] : e[j] > max(j, lo)}. grid (ntiles, R). */
__global__ void __launch_bounds__(FDMA_SPARSE_TILE_NT) fdma_sparse_tiles_kernel(const fdma_sparse_kargs a)
{
    __shared__ typename cub::BlockScan<int32_t, FDMA_SPARSE_TILE_NT>::TempStorage ts;
    const int64_t t = blockIdx.x, r = blockIdx.y;
    const int32_t *e = a.expiry + r * a.Sk;
    int32_t *out = a.lists + (r * a.ntiles + t) * a.cap;
    int64_t lo, hi, x;
    if (a.causal) {
        const int64_t i0 = t * a.tile_m;
        const int64_t i1 = (i0 + a.tile_m < a.Sq ? i0 + a.tile_m : a.Sq) - 1;
        lo = fdma_sparse_lim(a, i0);
        hi = fdma_sparse_lim(a, i1);
        x = fdma_sparse_lim(a, (t / a.tps) * a.tps * a.tile_m);
    } else {
        lo = hi = a.Sk - 1;
        x = -1;
    }
    int64_t n = 0;
    if (hi >= 0) {
        if (x >= 0) {
            const int32_t *S = a.surv + (r * a.nsup + t / a.tps) * a.surv_cap;
            const int64_t ns = a.survcnt[r * a.nsup + t / a.tps];
            fdma_sparse_compact<FDMA_SPARSE_TILE_NT, FDMA_SPARSE_ITEMS>(
                0, ns, [&](int64_t q) { return S[q]; }, [&](int32_t j) { return e[j] > lo; }, out, a.cap, n, ts);
        }
        fdma_sparse_compact<FDMA_SPARSE_TILE_NT, FDMA_SPARSE_ITEMS>(
            x + 1 > 0 ? x + 1 : 0, hi + 1, [](int64_t q) { return (int32_t)q; },
            [&](int32_t j) { return e[j] > (j > lo ? (int64_t)j : lo); }, out, a.cap, n, ts);
    }
    const int64_t nw = n < a.cap ? n : a.cap;
    const int64_t padded = (nw + 63) / 64 * 64;
    for (int64_t q = nw + threadIdx.x; q < padded; q += FDMA_SPARSE_TILE_NT) out[q] = -1;
    if (threadIdx.x == 0) a.counts[r * a.ntiles + t] = (int32_t)n;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Host                                                                                                        */

extern "C" fdma_status fdma_cuda_sparse_layout(const fdma_topk_params *p, int64_t tile_m, fdma_sparse_layout *L)
{
    memset(L, 0, sizeof(*L));
    if (p->dtype != FDMA_DTYPE_F16 && p->dtype != FDMA_DTYPE_BF16)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED, "sparse top-k: bias dtype must be F16 or BF16, got %d",
                              (int)p->dtype);
    if (!p->bias.ptr)
        return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "sparse top-k: bias is required");
    if (p->bias.dim[2] != 1)
        return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT,
                              "sparse top-k: bias.dim[2] must be 1 (per-key bias (B, Hx, 1, Sk)), got %lld",
                              (long long)p->bias.dim[2]);
    if (p->mask.ptr && p->mask.dim[2] != 1)
        return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT,
                              "sparse top-k: mask.dim[2] must be 1 (per-key mask (B, Hx, 1, Sk)), got %lld",
                              (long long)p->mask.dim[2]);
    if (tile_m < 1)
        return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "sparse top-k: tile_m must be >= 1, got %lld",
                              (long long)tile_m);
    if (p->window < 1)
        return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "sparse top-k: window must be >= 1, got %lld",
                              (long long)p->window);
    const int64_t mdim0 = p->mask.ptr ? p->mask.dim[0] : 1, mdim1 = p->mask.ptr ? p->mask.dim[1] : 1;
    L->D0 = p->bias.dim[0] > mdim0 ? p->bias.dim[0] : mdim0;
    L->D1 = p->bias.dim[1] > mdim1 ? p->bias.dim[1] : mdim1;
    if (L->D1 % p->bias.dim[1] != 0 || L->D1 % mdim1 != 0 || (p->bias.dim[0] != 1 && p->bias.dim[0] != L->D0) ||
        (mdim0 != 1 && mdim0 != L->D0))
        return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT,
                              "sparse top-k: bias dims (%lld, %lld) and mask dims (%lld, %lld) do not broadcast",
                              (long long)p->bias.dim[0], (long long)p->bias.dim[1], (long long)mdim0,
                              (long long)mdim1);
    L->R = L->D0 * L->D1;
    L->Sq = p->Sq;
    L->Sk = p->Sk;
    L->window = p->window;
    L->causal = p->causal != 0;
    L->tile_m = tile_m;
    const int64_t Sk = p->Sk, R = L->R;
    const int64_t weff = p->window < Sk ? p->window : Sk;
    if (R > 65535)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED, "sparse top-k: batch * bias heads must be <= 65535, got %lld",
                              (long long)R);
    if (Sk < 1 || Sk > 0x7FFFFFFF || R * Sk > 0x7FFFFFFF)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED,
                              "sparse top-k: rows * Sk must be below 2^31, got %lld * %lld", (long long)R,
                              (long long)Sk);
    L->ntiles = L->causal ? (p->Sq + tile_m - 1) / tile_m : 1;
    const int64_t cap_keys = L->causal ? (weff + tile_m - 1 < Sk ? weff + tile_m - 1 : Sk) : weff;
    L->cap = (cap_keys + 63) / 64 * 64;

    size_t off = 0;
    L->off_expiry = off; off = fdma_sparse_align(off + (size_t)(R * Sk) * 4);
    L->off_counts = off; off = fdma_sparse_align(off + (size_t)(R * L->ntiles) * 4);
    L->off_lists = off;  off = fdma_sparse_align(off + (size_t)(R * L->ntiles * L->cap) * 4);
    if (L->causal) {
        L->G = FDMA_SPARSE_G;
        L->nb = (Sk + FDMA_SPARSE_G - 1) / FDMA_SPARSE_G;
        L->ns = L->nb;
        L->idx_bits = fdma_sparse_bits(Sk - 1) > 0 ? fdma_sparse_bits(Sk - 1) : 1;
        L->seg_bits = fdma_sparse_bits(R - 1);
        if (16 + L->idx_bits + L->seg_bits > 64)
            return fdma_set_error(FDMA_STATUS_UNSUPPORTED, "sparse top-k: rows %lld x Sk %lld need more than 64 key bits",
                                  (long long)R, (long long)Sk);
        const double span = fmax((double)weff, sqrt((double)Sk * (double)tile_m / 2.0));
        L->tiles_per_super = (int64_t)ceil(span / (double)tile_m);
        if (L->tiles_per_super < 1) L->tiles_per_super = 1;
        L->super_tiles = (L->ntiles + L->tiles_per_super - 1) / L->tiles_per_super;
        L->surv_cap = weff;
        L->off_keys = off;   off = fdma_sparse_align(off + (size_t)(R * Sk) * 8);
        L->off_sorted = off; off = fdma_sparse_align(off + (size_t)(R * Sk) * 8);
        L->off_kfull = off;  off = fdma_sparse_align(off + (size_t)(R * Sk) * 8);
        L->off_table = off;  off = fdma_sparse_align(off + (size_t)(R * L->ns * L->nb) * 4);
        L->off_kg = off;     off = fdma_sparse_align(off + (size_t)(R * L->nb) * 8);
        L->off_pg = off;     off = fdma_sparse_align(off + (size_t)(R * L->nb) * 4);
        L->off_cnt = off;    off = fdma_sparse_align(off + (size_t)(R * L->nb) * 4);
        L->off_surv = off;   off = fdma_sparse_align(off + (size_t)(R * L->super_tiles * (L->surv_cap + 1)) * 4);
        size_t cub_bytes = 0;
        const cudaError_t err = cub::DeviceRadixSort::SortKeysDescending(
            (void *)NULL, cub_bytes, (const uint64_t *)NULL, (uint64_t *)NULL, (int)(R * Sk), 0,
            (int)(16 + L->idx_bits + L->seg_bits), (cudaStream_t)0);
        if (err != cudaSuccess)
            return fdma_set_error(FDMA_STATUS_CUDA_ERROR, "sparse top-k: CUB sort size query: %s",
                                  cudaGetErrorString(err));
        L->cub_bytes = cub_bytes;
        L->off_cub = off;    off = fdma_sparse_align(off + cub_bytes);
    }
    L->bytes = off;
    return FDMA_STATUS_OK;
}

static fdma_status fdma_sparse_check(cudaError_t err, const char *what)
{
    if (err == cudaSuccess) err = cudaGetLastError();
    if (err != cudaSuccess)
        return fdma_set_error(FDMA_STATUS_CUDA_ERROR, "sparse top-k: %s: %s", what, cudaGetErrorString(err));
    return FDMA_STATUS_OK;
}

extern "C" fdma_status fdma_cuda_sparse_build(const fdma_topk_params *p, const fdma_sparse_layout *L,
                                              void *workspace, size_t workspace_bytes)
{
    if (workspace_bytes < L->bytes || (L->bytes > 0 && workspace == NULL))
        return fdma_set_error(FDMA_STATUS_WORKSPACE_TOO_SMALL, "sparse top-k: workspace_bytes must be >= %zu, got %zu",
                              L->bytes, workspace_bytes);
    if (((uintptr_t)workspace & 255) != 0)
        return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "sparse top-k: workspace must be 256-byte aligned");
    cudaStream_t st = (cudaStream_t)p->stream;
    char *ws = (char *)workspace;
    fdma_sparse_kargs a;
    memset(&a, 0, sizeof(a));
    a.bias = (const uint16_t *)p->bias.ptr;
    a.mask = (const uint8_t *)p->mask.ptr;
    for (int d = 0; d < 4; d++) {
        a.bdim[d] = p->bias.dim[d];
        a.bstr[d] = p->bias.stride[d];
        a.mdim[d] = p->mask.ptr ? p->mask.dim[d] : 1;
        a.mstr[d] = p->mask.ptr ? p->mask.stride[d] : 0;
    }
    a.is_bf16 = p->dtype == FDMA_DTYPE_BF16;
    a.R = L->R; a.D1 = L->D1; a.Sq = L->Sq; a.Sk = L->Sk;
    a.window = L->window < L->Sk + 1 ? L->window : L->Sk + 1;
    a.causal = L->causal;
    a.tile_m = L->tile_m; a.ntiles = L->ntiles; a.cap = L->cap;
    a.expiry = (int32_t *)(ws + L->off_expiry);
    a.counts = (int32_t *)(ws + L->off_counts);
    a.lists = (int32_t *)(ws + L->off_lists);
    fdma_status stt;

    if (!L->causal) {
        stt = fdma_sparse_check(fdma_cuda_topk_expiry_noncausal(p, L->D0, L->D1, a.expiry), "expiry (non-causal)");
        if (stt != FDMA_STATUS_OK) return stt;
        fdma_sparse_tiles_kernel<<<dim3(1, (unsigned)L->R), FDMA_SPARSE_TILE_NT, 0, st>>>(a);
        return fdma_sparse_check(cudaSuccess, "tile lists");
    }

    a.ib = (int)L->idx_bits;
    a.ix_mask = ((uint64_t)1 << a.ib) - 1;
    a.rk_mask = ((uint64_t)1 << (16 + a.ib)) - 1;
    a.nb = L->nb; a.ns = L->ns;
    a.keys = (uint64_t *)(ws + L->off_keys);
    a.sorted = (uint64_t *)(ws + L->off_sorted);
    a.kfull = (uint64_t *)(ws + L->off_kfull);
    a.tab = (int32_t *)(ws + L->off_table);
    a.kg = (uint64_t *)(ws + L->off_kg);
    a.pg = (int32_t *)(ws + L->off_pg);
    a.cnt = (int32_t *)(ws + L->off_cnt);
    a.tps = L->tiles_per_super; a.nsup = L->super_tiles; a.surv_cap = L->surv_cap;
    a.surv = (int32_t *)(ws + L->off_surv);
    a.survcnt = a.surv + L->R * L->super_tiles * L->surv_cap;

    const int64_t total = L->R * L->Sk;
    const unsigned eb = (unsigned)((total + 255) / 256);
    fdma_sparse_keys_kernel<<<eb, 256, 0, st>>>(a);
    if ((stt = fdma_sparse_check(cudaSuccess, "keys")) != FDMA_STATUS_OK) return stt;
    size_t cub_bytes = L->cub_bytes;
    stt = fdma_sparse_check(cub::DeviceRadixSort::SortKeysDescending(ws + L->off_cub, cub_bytes, a.keys, a.sorted,
                                                                     (int)total, 0,
                                                                     (int)(16 + L->idx_bits + L->seg_bits), st),
                            "radix sort");
    if (stt != FDMA_STATUS_OK) return stt;
    const size_t tab_smem = (size_t)L->nb * 4;
    if (tab_smem > 48 * 1024) {
        stt = fdma_sparse_check(cudaFuncSetAttribute(fdma_sparse_table_kernel,
                                                     cudaFuncAttributeMaxDynamicSharedMemorySize, (int)tab_smem),
                                "table smem");
        if (stt != FDMA_STATUS_OK) return stt;
    }
    fdma_sparse_table_kernel<<<dim3((unsigned)L->ns, (unsigned)L->R), FDMA_SPARSE_G, tab_smem, st>>>(a);
    if ((stt = fdma_sparse_check(cudaSuccess, "table")) != FDMA_STATUS_OK) return stt;
    fdma_sparse_coarse_kernel<<<dim3((unsigned)L->nb, (unsigned)L->R), FDMA_SPARSE_G, 0, st>>>(a);
    if ((stt = fdma_sparse_check(cudaSuccess, "coarse thresholds")) != FDMA_STATUS_OK) return stt;
    fdma_sparse_bucket_kernel<<<dim3((unsigned)L->nb, (unsigned)L->R), FDMA_SPARSE_G, 0, st>>>(a);
    if ((stt = fdma_sparse_check(cudaSuccess, "bucket thresholds")) != FDMA_STATUS_OK) return stt;
    fdma_sparse_expiry_kernel<<<eb, 256, 0, st>>>(a);
    if ((stt = fdma_sparse_check(cudaSuccess, "expiry")) != FDMA_STATUS_OK) return stt;
    fdma_sparse_survivors_kernel<<<dim3((unsigned)L->super_tiles, (unsigned)L->R), FDMA_SPARSE_SURV_NT, 0, st>>>(a);
    if ((stt = fdma_sparse_check(cudaSuccess, "survivors")) != FDMA_STATUS_OK) return stt;
    fdma_sparse_tiles_kernel<<<dim3((unsigned)L->ntiles, (unsigned)L->R), FDMA_SPARSE_TILE_NT, 0, st>>>(a);
    return fdma_sparse_check(cudaSuccess, "tile lists");
}
