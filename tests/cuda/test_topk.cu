/*
 * test_topk.cu -- standalone test and timing harness for the CUDA top-k selection (src/cuda/topk.cu) and the
 * sparse expiry / tile lists (src/cuda/topk_sparse.cu). Needs none of the C sources in src: provides fdma_set_error itself.
 *
 * Checks, each against a plain CPU implementation of SPEC section 6 written here (comparator on the float
 * values: NaN lowest, -0 == +0, ties to the larger index; std::nth_element per row):
 *   1. fdma_cuda_topk_create_mask: bit-for-bit keep mask (output poisoned with 0xAB first) over fp16/bf16,
 *      random normal / constant (all ties) / NaN, +-inf, +-0 / four distinct values, per-key and full bias,
 *      broadcast dims and strided bias, base masks, causal with Sq != Sk, windows {1, 7, 64, 1000, Sk-1, Sk,
 *      Sk+3}, Sk in {1, 31, 257, 4095, 65536, 100003} (the last too long for the shared-memory code cache).
 *   2. fdma_cuda_sparse_build: the expiry array equals a sequential CPU reference (streaming top-w with a heap:
 *      e[j] = the L at which j leaves the kept set), the rows it implies (j <= lim_i < e[j]) equal the per-row
 *      selection (every row when small, sampled rows when large, and the GPU create_mask mask when it fits), and
 *      each tile list equals {j <= hi : e[j] > max(j, lo)} in ascending order, -1 padded to 64, count <= cap,
 *      and holds every key kept by a row of its tile.
 *   3. Timing (cudaEvents, median of 20 after 3 warm-ups): create_mask for the W1 form (B=1, Hkv=4, per-key
 *      bias, non-causal: 4 rows), the W1c build (causal, Sq = Sk, tile_m 128), and the materialised causal mask
 *      at 4K and 16K, Sk in {4K, 16K, 64K, 128K}, w in {1024, 2048}, bf16 random normal.
 *
 * Build and run (GPU machine):
 *   nvcc -O3 -gencode arch=compute_90,code=sm_90 -Iinclude -Isrc -Xcompiler -fopenmp \
 *        src/cuda/topk*.cu tests/cuda/test_topk.cu -o /tmp/t -lgomp
 *   /tmp/t [--quick | --tiny] [--min-sk N] [--few] [--no-timing | --timing-only]   (--selftest-ref: CPU references only;
 *   --profile Sk w: one W1 mask and one W1c build, for ncu)
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include <algorithm>
#include <queue>
#include <vector>

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "cuda/topk.cuh"

#include "harness.cuh"

static int g_fail = 0, g_pass = 0;

/* ---- random numbers (splitmix64 + Box-Muller) ---- */
static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint64_t rnd_u64(void)
{
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double rnd_unif(void) { return (double)(rnd_u64() >> 11) * (1.0 / 9007199254740992.0); }
static double rnd_normal(void)
{
    double u1 = rnd_unif(), u2 = rnd_unif();
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ---- fp16 / bf16 <-> float on the host ---- */
static uint16_t f2bits(float f, int bf16)
{
    uint16_t b;
    if (bf16) { __nv_bfloat16_raw r = __float2bfloat16_rn(f); b = r.x; }
    else { __half_raw r = __float2half_rn(f); b = r.x; }
    return b;
}
static float bits2f(uint16_t b, int bf16)
{
    if (bf16) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
    __half_raw r;
    r.x = b;
    return __half2float(__half(r));
}

/* value distributions */
enum { DIST_NORMAL = 0, DIST_CONST, DIST_SPECIAL, DIST_FEW, DIST_COUNT };
static const char *dist_name[] = {"normal", "const", "nan/inf/0", "few"};

static uint16_t draw(int dist, int bf16)
{
    switch (dist) {
    case DIST_CONST: return f2bits(0.5f, bf16);
    case DIST_FEW: return f2bits((float)(rnd_u64() % 4) - 1.5f, bf16);
    case DIST_SPECIAL: {
        const double u = rnd_unif();
        if (u < 0.04) return bf16 ? 0x7FC0 : 0x7E00;  /* +NaN */
        if (u < 0.08) return bf16 ? 0xFFC1 : 0xFE01;  /* -NaN, other payload */
        if (u < 0.10) return bf16 ? 0x7F81 : 0x7C01;  /* signalling NaN */
        if (u < 0.18) return bf16 ? 0xFF80 : 0xFC00;  /* -inf */
        if (u < 0.22) return bf16 ? 0x7F80 : 0x7C00;  /* +inf */
        if (u < 0.28) return 0x8000;                  /* -0 */
        if (u < 0.34) return 0x0000;                  /* +0 */
        return f2bits((float)rnd_normal(), bf16);
    }
    default: return f2bits((float)rnd_normal(), bf16);
    }
}

/* SPEC section 6 order: does (va, a) rank above (vb, b)? NaN lowest, -0 == +0, ties to the larger index. */
struct RankAbove {
    const float *v;
    bool operator()(int64_t a, int64_t b) const
    {
        const float x = v[a], y = v[b];
        const bool nx = x != x, ny = y != y;
        if (nx != ny) return ny;
        if (!nx && x != y) return x > y;
        return a > b;
    }
};

/* Keep set of one row: vals (Sk floats), cand (Sk flags); keep[j] = 0/1. */
static void ref_row(const float *vals, const uint8_t *cand, int64_t Sk, int64_t w, uint8_t *keep,
                    std::vector<int64_t> &tmp)
{
    tmp.clear();
    for (int64_t j = 0; j < Sk; j++) {
        keep[j] = 0;
        if (cand[j]) tmp.push_back(j);
    }
    if ((int64_t)tmp.size() > w) {
        RankAbove ra = {vals};
        std::nth_element(tmp.begin(), tmp.begin() + w, tmp.end(), ra);
        tmp.resize(w);
    }
    for (int64_t j : tmp) keep[j] = 1;
}

/* Expiry reference for one per-key row: stream L = 0 .. Sk-1 keeping the top-w with a heap (worst on top). */
static void ref_expiry(const float *vals, const uint8_t *m, int64_t Sk, int64_t w, int32_t *e)
{
    RankAbove ra = {vals};
    std::priority_queue<int64_t, std::vector<int64_t>, RankAbove> heap(ra); /* top() = lowest ranked */
    for (int64_t L = 0; L < Sk; L++) {
        e[L] = (int32_t)L;
        if (!m[L]) continue;
        if ((int64_t)heap.size() < w) { heap.push(L); continue; }
        const int64_t worst = heap.top();
        if (ra(L, worst)) { heap.pop(); e[worst] = (int32_t)L; heap.push(L); }
    }
    while (!heap.empty()) { e[heap.top()] = (int32_t)Sk; heap.pop(); }
}

/* ---- a strided 4-D tensor on the host and the device ---- */
struct Tensor4 {
    int64_t dim[4], stride[4];
    size_t elems;   /* allocation in elements */
    std::vector<uint8_t> host;
    void *dev = NULL;
    int esize;
};

static void tensor_make(Tensor4 &t, const int64_t dim[4], int esize, int last_stride)
{
    t.esize = esize;
    for (int d = 0; d < 4; d++) t.dim[d] = dim[d];
    t.stride[3] = last_stride;
    t.stride[2] = dim[3] * last_stride + (last_stride > 1 ? 3 : 0);
    t.stride[1] = t.stride[2] * dim[2];
    t.stride[0] = t.stride[1] * dim[1];
    t.elems = (size_t)(t.stride[0] * dim[0]);
    t.host.assign(t.elems * esize, 0);
    CK(cudaMalloc(&t.dev, t.elems * esize + 16));
}
static void tensor_free(Tensor4 &t) { if (t.dev) cudaFree(t.dev); t.dev = NULL; }
static size_t tensor_at(const Tensor4 &t, int64_t D1, int64_t b, int64_t hx, int64_t i, int64_t j)
{
    const int64_t bb = t.dim[0] == 1 ? 0 : b, bh = t.dim[1] == 1 ? 0 : hx / (D1 / t.dim[1]);
    const int64_t bi = t.dim[2] == 1 ? 0 : i;
    return (size_t)(bb * t.stride[0] + bh * t.stride[1] + bi * t.stride[2] + j * t.stride[3]);
}

struct Case {
    int bf16;
    int64_t Sq, Sk, w;
    int64_t bdim[4];
    int has_mask;
    int64_t mdim[4];
    int causal;
    int dist;
    int bias_stride;   /* 1 contiguous, 2 strided last dim */
    double mask_p;     /* probability of True */
};

static void fill_inputs(const Case &c, Tensor4 &bias, Tensor4 &mask)
{
    tensor_make(bias, c.bdim, 2, c.bias_stride);
    uint16_t *bh = (uint16_t *)bias.host.data();
    for (size_t q = 0; q < bias.elems; q++) bh[q] = draw(c.dist, c.bf16);
    CK(cudaMemcpy(bias.dev, bh, bias.elems * 2, cudaMemcpyHostToDevice));
    if (c.has_mask) {
        tensor_make(mask, c.mdim, 1, 1);
        for (size_t q = 0; q < mask.elems; q++) mask.host[q] = rnd_unif() < c.mask_p ? (uint8_t)(1 + rnd_u64() % 3) : 0;
        CK(cudaMemcpy(mask.dev, mask.host.data(), mask.elems, cudaMemcpyHostToDevice));
    }
}

static void set_params(const Case &c, const Tensor4 &bias, const Tensor4 &mask, fdma_topk_params *p)
{
    memset(p, 0, sizeof(*p));
    p->device = FDMA_DEVICE_CUDA;
    p->dtype = c.bf16 ? FDMA_DTYPE_BF16 : FDMA_DTYPE_F16;
    p->Sq = c.Sq;
    p->Sk = c.Sk;
    p->bias.ptr = bias.dev;
    for (int d = 0; d < 4; d++) { p->bias.dim[d] = bias.dim[d]; p->bias.stride[d] = bias.stride[d]; }
    if (c.has_mask) {
        p->mask.ptr = mask.dev;
        for (int d = 0; d < 4; d++) { p->mask.dim[d] = mask.dim[d]; p->mask.stride[d] = mask.stride[d]; }
    }
    p->causal = c.causal;
    p->window = c.w;
}

static void case_str(const Case &c, char *s, size_t n)
{
    snprintf(s, n, "%s Sq=%lld Sk=%lld w=%lld bias=(%lld,%lld,%lld,%lld)x%d mask=%s causal=%d %s",
             c.bf16 ? "bf16" : "fp16", (long long)c.Sq, (long long)c.Sk, (long long)c.w, (long long)c.bdim[0],
             (long long)c.bdim[1], (long long)c.bdim[2], (long long)c.bdim[3], c.bias_stride,
             c.has_mask ? (c.mdim[2] == 1 ? "per-key" : "full") : "none", c.causal, dist_name[c.dist]);
}

/* Values and candidates of row (b, hx, i) into vals/cand (Sk each). */
static void row_inputs(const Case &c, const Tensor4 &bias, const Tensor4 &mask, int64_t D1, int64_t b, int64_t hx,
                       int64_t i, float *vals, uint8_t *cand)
{
    const uint16_t *bh = (const uint16_t *)bias.host.data();
    int64_t lim = c.Sk - 1;
    if (c.causal) lim = i + c.Sk - c.Sq;
    for (int64_t j = 0; j < c.Sk; j++) {
        vals[j] = bits2f(bh[tensor_at(bias, D1, b, hx, i, j)], c.bf16);
        uint8_t ok = j <= lim;
        if (c.has_mask && mask.host[tensor_at(mask, D1, b, hx, i, j)] == 0) ok = 0;
        cand[j] = ok;
    }
}

/* ---- 1. create_mask vs the CPU reference ---- */
static void test_create_mask(const Case &c, int out_pad)
{
    char desc[256];
    case_str(c, desc, sizeof desc);
    Tensor4 bias, mask;
    fill_inputs(c, bias, mask);
    const int64_t D0 = std::max(c.bdim[0], c.has_mask ? c.mdim[0] : 1);
    const int64_t D1 = std::max(c.bdim[1], c.has_mask ? c.mdim[1] : 1);
    const int64_t R = (c.causal || c.bdim[2] == c.Sq || (c.has_mask && c.mdim[2] == c.Sq)) ? c.Sq : 1;
    fdma_topk_params p;
    set_params(c, bias, mask, &p);
    const int64_t ostr3 = 1, ostr2 = c.Sk + out_pad;
    const size_t obytes = (size_t)(D0 * D1 * R * ostr2);
    uint8_t *dout;
    CK(cudaMalloc(&dout, obytes + 8));
    CK(cudaMemset(dout, 0xAB, obytes + 8));
    p.out = dout;
    p.out_dim[0] = D0; p.out_dim[1] = D1; p.out_dim[2] = R; p.out_dim[3] = c.Sk;
    p.out_stride[3] = ostr3; p.out_stride[2] = ostr2; p.out_stride[1] = ostr2 * R; p.out_stride[0] = ostr2 * R * D1;
    fdma_status st = fdma_cuda_topk_create_mask(&p);
    CK(cudaDeviceSynchronize());
    if (st != FDMA_STATUS_OK) {
        printf("FAIL create_mask %s: status %d %s\n", desc, (int)st, g_err);
        g_fail++;
        tensor_free(bias); tensor_free(mask); cudaFree(dout);
        return;
    }
    std::vector<uint8_t> out(obytes + 8);
    CK(cudaMemcpy(out.data(), dout, obytes + 8, cudaMemcpyDeviceToHost));
    int64_t bad = 0, first_row = -1, first_j = -1;
    int bad_pad = 0;
    const int64_t nrows = D0 * D1 * R;
#pragma omp parallel
    {
        std::vector<float> vals(c.Sk);
        std::vector<uint8_t> cand(c.Sk), keep(c.Sk);
        std::vector<int64_t> tmp;
        int64_t lbad = 0, lrow = -1, lj = -1;
#pragma omp for schedule(dynamic, 4)
        for (int64_t row = 0; row < nrows; row++) {
            const int64_t i = row % R, hx = (row / R) % D1, b = row / (R * D1);
            row_inputs(c, bias, mask, D1, b, hx, i, vals.data(), cand.data());
            ref_row(vals.data(), cand.data(), c.Sk, c.w, keep.data(), tmp);
            const uint8_t *o = out.data() + row * ostr2;
            for (int64_t j = 0; j < c.Sk; j++)
                if (o[j] != keep[j]) { if (lbad++ == 0) { lrow = row; lj = j; } }
        }
#pragma omp critical
        {
            if (lbad && (first_row < 0 || lrow < first_row)) { first_row = lrow; first_j = lj; }
            bad += lbad;
        }
    }
    for (int64_t row = 0; row < nrows && out_pad; row++)
        for (int64_t q = c.Sk; q < ostr2; q++)
            if (out[row * ostr2 + q] != 0xAB) bad_pad++;
    if (bad || bad_pad) {
        printf("FAIL create_mask %s: %lld wrong (first row %lld j %lld: got %d), %d pad bytes touched\n", desc,
               (long long)bad, (long long)first_row, (long long)first_j,
               first_row >= 0 ? out[first_row * ostr2 + first_j] : -1, bad_pad);
        g_fail++;
    } else {
        g_pass++;
    }
    tensor_free(bias); tensor_free(mask); cudaFree(dout);
}

/* ---- 2. sparse build (expiry + tile lists) vs references ---- */
static void test_sparse(const Case &c, int64_t tile_m, int64_t max_check_rows)
{
    char desc[256];
    case_str(c, desc, sizeof desc);
    Tensor4 bias, mask;
    fill_inputs(c, bias, mask);
    fdma_topk_params p;
    set_params(c, bias, mask, &p);
    fdma_sparse_layout L;
    fdma_status st = fdma_cuda_sparse_layout(&p, tile_m, &L);
    if (st != FDMA_STATUS_OK) {
        printf("FAIL sparse layout %s: %s\n", desc, g_err);
        g_fail++;
        tensor_free(bias); tensor_free(mask);
        return;
    }
    void *ws;
    CK(cudaMalloc(&ws, L.bytes));
    CK(cudaMemset(ws, 0xAB, L.bytes));
    st = fdma_cuda_sparse_build(&p, &L, ws, L.bytes);
    CK(cudaDeviceSynchronize());
    if (st != FDMA_STATUS_OK) {
        printf("FAIL sparse build %s: %s\n", desc, g_err);
        g_fail++;
        cudaFree(ws); tensor_free(bias); tensor_free(mask);
        return;
    }
    const int64_t R = L.R, Sk = c.Sk, nt = L.ntiles, cap = L.cap;
    std::vector<int32_t> e((size_t)(R * Sk)), counts((size_t)(R * nt)), lists((size_t)(R * nt * cap));
    CK(cudaMemcpy(e.data(), (char *)ws + L.off_expiry, e.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(counts.data(), (char *)ws + L.off_counts, counts.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(lists.data(), (char *)ws + L.off_lists, lists.size() * 4, cudaMemcpyDeviceToHost));

    int64_t bad_e = 0, bad_rows = 0, bad_lists = 0, rows_checked = 0;
    char first[256] = "";
    std::vector<float> vals(Sk);
    std::vector<uint8_t> cand(Sk), keep(Sk), m(Sk);
    std::vector<int32_t> eref(Sk);
    std::vector<int64_t> tmp;
    for (int64_t r = 0; r < R; r++) {
        const int64_t b = r / L.D1, hx = r % L.D1;
        const int32_t *er = e.data() + r * Sk;
        /* expiry reference */
        Case cn = c;
        cn.causal = 0;
        row_inputs(cn, bias, mask, L.D1, b, hx, 0, vals.data(), m.data());
        if (c.causal) {
            ref_expiry(vals.data(), m.data(), Sk, c.w, eref.data());
        } else {
            ref_row(vals.data(), m.data(), Sk, c.w, keep.data(), tmp);
            for (int64_t j = 0; j < Sk; j++) eref[j] = keep[j] ? (int32_t)Sk : (int32_t)j;
        }
        for (int64_t j = 0; j < Sk; j++)
            if (er[j] != eref[j] && bad_e++ == 0)
                snprintf(first, sizeof first, "e[r=%lld][j=%lld] = %d, want %d", (long long)r, (long long)j, er[j],
                         eref[j]);
        /* rows implied by e vs the per-row selection */
        const int64_t nrows = c.causal ? c.Sq : 1;
        const int64_t step = nrows <= max_check_rows ? 1 : nrows / max_check_rows + 1;
        std::vector<int64_t> rows;
        for (int64_t i0 = 0; i0 < nrows; i0 += step)
            rows.push_back((i0 == 0 || step == 1) ? i0 : std::min(nrows - 1, i0 + (int64_t)(rnd_u64() % step)));
        rows_checked += (int64_t)rows.size();
#pragma omp parallel
        {
            std::vector<float> pv(Sk);
            std::vector<uint8_t> pc(Sk), pk(Sk);
            std::vector<int64_t> ptmp;
#pragma omp for schedule(dynamic, 8)
            for (size_t q = 0; q < rows.size(); q++) {
                const int64_t i = rows[q];
                const int64_t lim = c.causal ? i + Sk - c.Sq : Sk - 1;
                row_inputs(c, bias, mask, L.D1, b, hx, i, pv.data(), pc.data());
                ref_row(pv.data(), pc.data(), Sk, c.w, pk.data(), ptmp);
                for (int64_t j = 0; j < Sk; j++) {
                    const uint8_t k = j <= lim && lim < er[j];
                    if (k != pk[j]) {
#pragma omp critical
                        {
                            if (bad_rows++ == 0)
                                snprintf(first, sizeof first, "row i=%lld j=%lld: from e %d, want %d (e=%d)",
                                         (long long)i, (long long)j, k, pk[j], er[j]);
                        }
                        break;
                    }
                }
            }
        }
        /* tile lists */
        for (int64_t t = 0; t < nt; t++) {
            int64_t lo, hi;
            if (c.causal) {
                const int64_t i0 = t * tile_m, i1 = std::min(i0 + tile_m, c.Sq) - 1;
                lo = i0 + Sk - c.Sq;
                hi = i1 + Sk - c.Sq;
            } else {
                lo = hi = Sk - 1;
            }
            std::vector<int32_t> want;
            for (int64_t j = 0; j <= hi && j < Sk; j++)
                if (eref[j] > std::max(j, lo)) want.push_back((int32_t)j);
            const int32_t *lst = lists.data() + (r * nt + t) * cap;
            const int64_t n = counts[r * nt + t];
            bool ok = n == (int64_t)want.size() && n <= cap;
            for (int64_t q = 0; ok && q < n; q++) ok = lst[q] == want[q];
            for (int64_t q = n; ok && q < (n + 63) / 64 * 64; q++) ok = lst[q] == -1;
            if (!ok && bad_lists++ == 0)
                snprintf(first, sizeof first, "list r=%lld t=%lld: count %lld want %lld (cap %lld)", (long long)r,
                         (long long)t, (long long)n, (long long)want.size(), (long long)cap);
        }
    }
    /* every key kept by a row of a tile is in its list (rows sampled as above, first row r = 0) */
    int64_t missing = 0;
    if (c.causal && bad_e == 0) {
        const int64_t b = 0, hx = 0;
        for (int64_t t = 0; t < nt; t += (nt > 64 ? nt / 64 : 1)) {
            const int64_t n = counts[t];
            const int32_t *lst = lists.data() + t * cap;
            std::vector<uint8_t> in(Sk, 0);
            for (int64_t q = 0; q < n && q < cap; q++) if (lst[q] >= 0 && lst[q] < Sk) in[lst[q]] = 1;
            const int64_t iend = std::min((t + 1) * tile_m, c.Sq);
            const int64_t istep = tile_m > 8 ? tile_m / 8 : 1;
            for (int64_t i = t * tile_m; i < iend; i = (i + istep < iend || i == iend - 1) ? i + istep : iend - 1) {
                row_inputs(c, bias, mask, L.D1, b, hx, i, vals.data(), cand.data());
                ref_row(vals.data(), cand.data(), Sk, c.w, keep.data(), tmp);
                for (int64_t j = 0; j < Sk; j++) if (keep[j] && !in[j]) missing++;
                if (Sk > 8192) break;
            }
        }
    }
    if (bad_e || bad_rows || bad_lists || missing) {
        printf("FAIL sparse %s tile_m=%lld: %lld wrong e, %lld wrong rows of %lld, %lld wrong lists, %lld missing; "
               "first: %s\n", desc, (long long)tile_m, (long long)bad_e, (long long)bad_rows,
               (long long)rows_checked, (long long)bad_lists, (long long)missing, first);
        g_fail++;
    } else {
        g_pass++;
    }

    /* cross-check against the GPU create_mask when the (Sq, Sk) mask is small */
    if (c.causal && R * c.Sq * Sk <= (int64_t)64 << 20) {
        const size_t ob = (size_t)(R * c.Sq * Sk);
        uint8_t *dout;
        CK(cudaMalloc(&dout, ob));
        fdma_topk_params q = p;
        q.out = dout;
        q.out_dim[0] = L.D0; q.out_dim[1] = L.D1; q.out_dim[2] = c.Sq; q.out_dim[3] = Sk;
        q.out_stride[3] = 1; q.out_stride[2] = Sk; q.out_stride[1] = Sk * c.Sq; q.out_stride[0] = Sk * c.Sq * L.D1;
        st = fdma_cuda_topk_create_mask(&q);
        CK(cudaDeviceSynchronize());
        std::vector<uint8_t> out(ob);
        CK(cudaMemcpy(out.data(), dout, ob, cudaMemcpyDeviceToHost));
        int64_t bad = 0;
#pragma omp parallel for collapse(2) reduction(+ : bad)
        for (int64_t r = 0; r < R; r++)
            for (int64_t i = 0; i < c.Sq; i++) {
                const int64_t lim = i + Sk - c.Sq;
                for (int64_t j = 0; j < Sk; j++)
                    bad += out[(r * c.Sq + i) * Sk + j] != (uint8_t)(j <= lim && lim < e[r * Sk + j]);
            }
        if (st != FDMA_STATUS_OK || bad) {
            printf("FAIL sparse-vs-create_mask %s: %lld entries differ (status %d)\n", desc, (long long)bad, (int)st);
            g_fail++;
        } else {
            g_pass++;
        }
        cudaFree(dout);
    }
    cudaFree(ws);
    tensor_free(bias);
    tensor_free(mask);
}

/* ---- 3. timing ---- */
template <typename F>
static double time_median_ms(F fn, int reps)
{
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int q = 0; q < 3; q++) fn();
    CK(cudaDeviceSynchronize());
    std::vector<float> t(reps);
    for (int q = 0; q < reps; q++) {
        CK(cudaEventRecord(a));
        fn();
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        CK(cudaEventElapsedTime(&t[q], a, b));
    }
    std::sort(t.begin(), t.end());
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return t[reps / 2];
}

static void timing(void)
{
    printf("\ntiming (bf16 random normal, B=1, Hkv=4, per-key bias (1, 4, 1, Sk); median of 20, ms)\n");
    printf("%8s %6s | %12s | %12s %10s | %14s\n", "Sk", "w", "W1 mask", "W1c build", "ws MB", "causal mask");
    const int64_t sks[] = {4096, 16384, 65536, 131072};
    const int64_t ws_[] = {1024, 2048};
    for (int64_t Sk : sks) {
        for (int64_t w : ws_) {
            Case c;
            memset(&c, 0, sizeof c);
            c.bf16 = 1; c.Sq = Sk; c.Sk = Sk; c.w = w;
            c.bdim[0] = 1; c.bdim[1] = 4; c.bdim[2] = 1; c.bdim[3] = Sk;
            c.dist = DIST_NORMAL; c.bias_stride = 1;
            Tensor4 bias, mask;
            fill_inputs(c, bias, mask);
            fdma_topk_params p;
            set_params(c, bias, mask, &p);
            /* W1: one kept set per (b, hx) */
            uint8_t *dout;
            CK(cudaMalloc(&dout, (size_t)(4 * Sk)));
            p.causal = 0;
            p.out = dout;
            p.out_dim[0] = 1; p.out_dim[1] = 4; p.out_dim[2] = 1; p.out_dim[3] = Sk;
            p.out_stride[3] = 1; p.out_stride[2] = Sk; p.out_stride[1] = Sk; p.out_stride[0] = 4 * Sk;
            const double t_w1 = time_median_ms([&] { fdma_cuda_topk_create_mask(&p); }, 20);
            CK(cudaGetLastError());
            cudaFree(dout);
            /* W1c: expiry + tile lists */
            p.causal = 1;
            fdma_sparse_layout L;
            if (fdma_cuda_sparse_layout(&p, 128, &L) != FDMA_STATUS_OK) { printf("layout: %s\n", g_err); exit(2); }
            void *ws;
            CK(cudaMalloc(&ws, L.bytes));
            const double t_w1c = time_median_ms([&] { fdma_cuda_sparse_build(&p, &L, ws, L.bytes); }, 20);
            CK(cudaGetLastError());
            cudaFree(ws);
            /* materialised causal mask (4, Sk, Sk) */
            double t_full = -1;
            if (Sk <= 16384) {
                CK(cudaMalloc(&dout, (size_t)(4 * Sk * Sk)));
                p.out = dout;
                p.out_dim[2] = Sk;
                p.out_stride[2] = Sk; p.out_stride[1] = Sk * Sk; p.out_stride[0] = 4 * Sk * Sk;
                t_full = time_median_ms([&] { fdma_cuda_topk_create_mask(&p); }, Sk <= 4096 ? 20 : 5);
                CK(cudaGetLastError());
                cudaFree(dout);
            }
            printf("%8lld %6lld | %12.4f | %12.4f %10.1f | ", (long long)Sk, (long long)w, t_w1, t_w1c,
                   (double)L.bytes / 1048576.0);
            if (t_full >= 0) printf("%14.3f\n", t_full); else printf("%14s\n", "-");
            tensor_free(bias);
        }
    }
}

/* One W1 create_mask and one W1c build at (Sk, w), for a per-kernel profile (ncu). */
static int profile_once(int64_t Sk, int64_t w)
{
    Case c;
    memset(&c, 0, sizeof c);
    c.bf16 = 1; c.Sq = Sk; c.Sk = Sk; c.w = w;
    c.bdim[0] = 1; c.bdim[1] = 4; c.bdim[2] = 1; c.bdim[3] = Sk;
    c.dist = DIST_NORMAL; c.bias_stride = 1;
    Tensor4 bias, mask;
    fill_inputs(c, bias, mask);
    fdma_topk_params p;
    set_params(c, bias, mask, &p);
    uint8_t *dout;
    CK(cudaMalloc(&dout, (size_t)(4 * Sk)));
    p.causal = 0;
    p.out = dout;
    p.out_dim[0] = 1; p.out_dim[1] = 4; p.out_dim[2] = 1; p.out_dim[3] = Sk;
    p.out_stride[3] = 1; p.out_stride[2] = Sk; p.out_stride[1] = Sk; p.out_stride[0] = 4 * Sk;
    if (fdma_cuda_topk_create_mask(&p) != FDMA_STATUS_OK) { printf("create_mask: %s\n", g_err); return 2; }
    p.causal = 1;
    fdma_sparse_layout L;
    if (fdma_cuda_sparse_layout(&p, 128, &L) != FDMA_STATUS_OK) { printf("layout: %s\n", g_err); return 2; }
    void *ws;
    CK(cudaMalloc(&ws, L.bytes));
    if (fdma_cuda_sparse_build(&p, &L, ws, L.bytes) != FDMA_STATUS_OK) { printf("build: %s\n", g_err); return 2; }
    CK(cudaDeviceSynchronize());
    printf("profiled Sk=%lld w=%lld: ntiles %lld cap %lld groups %lld x %lld tiles\n", (long long)Sk, (long long)w,
           (long long)L.ntiles, (long long)L.cap, (long long)L.super_tiles, (long long)L.tiles_per_super);
    cudaFree(ws);
    cudaFree(dout);
    tensor_free(bias);
    return 0;
}

static Case mk(int bf16, int64_t Sq, int64_t Sk, int64_t w, int64_t b0, int64_t b1, int64_t b2, int mask_kind,
               int causal, int dist, int stride)
{
    Case c;
    memset(&c, 0, sizeof c);
    c.bf16 = bf16; c.Sq = Sq; c.Sk = Sk; c.w = w;
    c.bdim[0] = b0; c.bdim[1] = b1; c.bdim[2] = b2; c.bdim[3] = Sk;
    c.causal = causal; c.dist = dist; c.bias_stride = stride;
    c.mask_p = 0.7;
    if (mask_kind == 3) {  /* per-key with twice the bias heads: bias head = hx / 2 */
        c.has_mask = 1;
        c.mdim[0] = 1; c.mdim[1] = 2 * b1; c.mdim[2] = 1; c.mdim[3] = Sk;
    } else if (mask_kind) {   /* 1: per-key (b0 or 2, 1, 1, Sk); 2: full (1, b1, Sq, Sk) */
        c.has_mask = 1;
        c.mdim[0] = mask_kind == 1 ? 2 : 1;
        c.mdim[1] = mask_kind == 1 ? 1 : b1;
        c.mdim[2] = mask_kind == 1 ? 1 : Sq;
        c.mdim[3] = Sk;
        if (mask_kind == 1 && b0 != 1 && b0 != 2) c.mdim[0] = 1;
    }
    return c;
}

/* CPU-only check of the two references against each other (no GPU needed): for per-key rows, the expiry from
 * the streaming heap reproduces the per-row selection of every causal prefix. */
static int selftest_ref(void)
{
    int bad = 0, n = 0;
    for (int trial = 0; trial < 3000; trial++) {
        const int64_t Sk = 1 + (int64_t)(rnd_u64() % 300);
        const int64_t w = 1 + (int64_t)(rnd_u64() % (Sk + 3));
        const int dist = (int)(rnd_u64() % DIST_COUNT), bf16 = (int)(rnd_u64() & 1);
        std::vector<float> v(Sk);
        std::vector<uint8_t> m(Sk), cand(Sk), keep(Sk);
        std::vector<int32_t> e(Sk);
        std::vector<int64_t> tmp;
        for (int64_t j = 0; j < Sk; j++) {
            v[j] = bits2f(draw(dist, bf16), bf16);
            m[j] = (trial & 1) ? (rnd_unif() < 0.7) : 1;
        }
        ref_expiry(v.data(), m.data(), Sk, w, e.data());
        for (int64_t L = 0; L < Sk; L++) {
            for (int64_t j = 0; j < Sk; j++) cand[j] = m[j] && j <= L;
            ref_row(v.data(), cand.data(), Sk, w, keep.data(), tmp);
            n++;
            for (int64_t j = 0; j < Sk; j++)
                if (keep[j] != (uint8_t)(j <= L && L < e[j])) { bad++; break; }
        }
    }
    printf("selftest: %d prefixes, %d disagree\n", n, bad);
    return bad != 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "--selftest-ref")) return selftest_ref();
    if (argc > 3 && !strcmp(argv[1], "--profile")) return profile_once(atoll(argv[2]), atoll(argv[3]));
    int64_t max_sk = 1 << 30, min_sk = 0;
    int do_timing = 1, do_tests = 1, few = 0;
    for (int q = 1; q < argc; q++) {
        if (!strcmp(argv[q], "--quick")) max_sk = 4095;
        if (!strcmp(argv[q], "--tiny")) max_sk = 257;
        if (!strcmp(argv[q], "--no-timing")) do_timing = 0;
        if (!strcmp(argv[q], "--timing-only")) do_tests = 0;
        if (!strcmp(argv[q], "--min-sk") && q + 1 < argc) min_sk = atoll(argv[++q]);
        if (!strcmp(argv[q], "--few")) few = 1;  /* two windows, one value distribution (for the sanitizers) */
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);

    const int64_t sks[] = {1, 31, 257, 4095, 65536, 100003};  /* 100003: rows too long for the smem cache */
    int nd = 0;
    for (int64_t Sk : sks) {
        if (!do_tests || Sk > max_sk || Sk < min_sk) continue;
        const int64_t wl[] = {1, 7, 64, 1000, Sk - 1, Sk, Sk + 3};
        std::vector<int64_t> wins;
        for (int64_t w : wl) if (w >= 1 && std::find(wins.begin(), wins.end(), w) == wins.end()) wins.push_back(w);
        const bool big = Sk > 4095;
        for (size_t wi = 0; wi < wins.size(); wi++) {
            const int64_t w = wins[wi];
            if (few && wi != 1 && wi != wins.size() - 2) continue;
            for (int dist = 0; dist < DIST_COUNT; dist++) {
                if (few && dist != DIST_SPECIAL) continue;
                const int bf16 = (nd++) & 1;
                /* per-key, non-causal, broadcast mask over batch */
                test_create_mask(mk(bf16, 5, Sk, w, 1, 3, 1, 1, 0, dist, 1), 0);
                /* per-key causal, Sq < Sk (and Sq > Sk when small) */
                test_create_mask(mk(bf16, big ? 3 : 37, Sk, w, 2, 2, 1, 0, 1, dist, 1), 0);
                if (!big) test_create_mask(mk(bf16, Sk + 9, Sk, w, 1, 2, 1, 1, 1, dist, 2), 5);
                /* full bias (Sq rows), full mask, causal and not, strided bias */
                test_create_mask(mk(bf16, big ? 2 : 17, Sk, w, 1, 2, big ? 2 : 17, 2, 1, dist, 2), 3);
                test_create_mask(mk(bf16, big ? 2 : 13, Sk, w, 2, 1, big ? 2 : 13, 0, 0, dist, 1), 0);
                /* GQA-style heads: bias (1, 2, 1, Sk), mask (1, 4, 1, Sk) */
                test_create_mask(mk(bf16, big ? 2 : 21, Sk, w, 1, 2, 1, 3, 1, dist, 1), 0);
                /* sparse: causal (Sq < Sk, Sq = Sk, Sq > Sk), with and without mask, and non-causal */
                const int64_t tm = big ? 256 : ((wi & 1) ? 64 : 17);
                test_sparse(mk(bf16, big ? Sk : std::max<int64_t>(1, Sk / 2), Sk, w, 1, 2, 1, 0, 1, dist, 1), tm,
                            big ? 48 : 1 << 30);
                test_sparse(mk(bf16, Sk, Sk, w, 2, 1, 1, 1, 1, dist, 2), 128, big ? 48 : 1 << 30);
                if (!big) test_sparse(mk(bf16, Sk + 40, Sk, w, 1, 1, 1, 1, 1, dist, 1), 64, 1 << 30);
                if (!big) test_sparse(mk(bf16, Sk, Sk, w, 1, 2, 1, 3, 1, dist, 1), 32, 1 << 30);
                test_sparse(mk(bf16, 7, Sk, w, 1, 3, 1, 1, 0, dist, 1), 64, 1);
            }
        }
        printf("Sk=%lld done: %d passed, %d failed so far\n", (long long)Sk, g_pass, g_fail);
        fflush(stdout);
    }
    if (do_tests) printf("\ncorrectness: %d passed, %d failed\n", g_pass, g_fail);
    if (do_timing) timing();
    return g_fail ? 1 : 0;
}
