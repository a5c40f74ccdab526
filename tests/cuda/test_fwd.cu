/*
 * test_fwd.cu -- standalone test and timing harness for the CUDA forward (src/cuda/api_cuda.cu,
 * fwd*.cu). It calls fdma_cuda_fwd_plan / fdma_cuda_fwd_run directly with hand-filled params (no
 * libflashdma: the one symbol it needs from src/, fdma_set_error, is defined here) and compares with
 *
 *   ref    SPEC section 3 in float64 on the GPU (one CTA per query row), on the same rounded inputs;
 *   torch  the same math "as a user would write it in PyTorch": S, scaled S, biased S and P rounded to
 *          fp16/bf16, softmax in fp32, P V accumulated in fp32 and rounded;
 *
 * with the SPEC section 8 rule: max|x - ref| <= 2 * max|torch - ref| + 1e-5 for out, lse and probs. The
 * dropout keep bits of the reference come from src/philox.h evaluated on the host (the CPU backend's code),
 * so a pass also proves that the kernel's bits equal the CPU path's. With a top-k window (SPEC section 6) the
 * reference attends to the keep mask of fdma_cuda_create_mask (the exact selection, materialised), while the
 * forward runs its own path (SPARSE lists or the workspace mask). Outputs are NaN-poisoned before each run;
 * inputs are fresh normal draws per case. Each line names the plan's kernel, ending with the instantiation that
 * ran ("_f<feature bits>_<warps>x<row blocks>", api_cuda.cu).
 *
 * Build and run (from the repository root):
 *   nvcc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 -Iinclude -Isrc \
 *        src/cuda/fwd*.cu src/cuda/api_cuda.cu src/cuda/window.cu src/cuda/topk*.cu tests/cuda/test_fwd.cu -o test_fwd
 *   ./test_fwd            all cases          ./test_fwd --small    a few small cases (compute-sanitizer)
 *   ./test_fwd --bench [N]  C-level timing: cudaEvents around fdma_cuda_fwd_run, median of 100 runs
 *                           (N: only workload N)
 */
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "backend.h"
#include "philox.h"

#include "harness.cuh"

/* ---- random inputs on the GPU ---- */
__device__ __forceinline__ uint32_t hash32(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return (uint32_t)x;
}
__device__ __forceinline__ float u01(uint64_t k) { return ((hash32(k) >> 8) + 0.5f) * (1.f / 16777216.f); }

__global__ void fill_normal(uint16_t *x, int64_t n, uint64_t seed, int bf16, float sd) {
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < n; t += (int64_t)gridDim.x * blockDim.x) {
        float u1 = u01(seed * 0x9E3779B97F4A7C15ULL + 2 * t), u2 = u01(seed * 0x9E3779B97F4A7C15ULL + 2 * t + 1);
        float z = sd * sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
        x[t] = bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(z)) : __half_as_ushort(__float2half_rn(z));
    }
}
/* mask element at flat index t of a (d0, d1, d2, d3) contiguous buffer; mode 0: Bernoulli(keep);
 * mode 1: 64x64 blocks, a third of them Bernoulli(keep), the rest all False; every row r % 7 == 3 all
 * False (fully masked rows when the mask has Sq rows); mode 2: 128 x 64 blocks (the 128-row CTA of D = 128 reads
 * 2 summary rows) all True, all False and Bernoulli(keep) in turn (every tile status), no rows forced False */
__global__ void fill_mask(uint8_t *m, int64_t n, int64_t d2, int64_t d3, uint64_t seed, float keep, int mode) {
    for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < n; t += (int64_t)gridDim.x * blockDim.x) {
        int64_t j = t % d3, i = (t / d3) % d2;
        int v = u01(seed * 0x2545F4914F6CDD1DULL + t) < keep;
        if (mode == 1 && ((i / 64 + j / 64) % 3) != 0) v = 0;
        if (mode == 2 && ((i / 128 + j / 64) % 3) != 2) v = (i / 128 + j / 64) % 3 == 0;
        if (mode != 2 && d2 > 1 && i % 7 == 3) v = 0;
        m[t] = (uint8_t)(v ? 1 + (t & 3) : 0); /* nonzero values other than 1 also mean "attend" */
    }
}

/* ---- float64 reference (and the low-precision "torch" emulation), one CTA per (b, h, i) ---- */
struct View {
    const void *ptr;
    int64_t dim[4], stride[4];
};
struct RefArgs {
    const uint16_t *q, *k, *v;
    int64_t qs[3], ks[3], vs[3];
    View mask, bias;
    int B, H, Hkv, Sq, Sk, D, bf16, causal, lowp;
    double scale, softcap, p_drop;
    const uint8_t *keep; /* (B, H, Sq, Sk) or NULL */
    double *out, *lse, *probs, *scratch;
};
__device__ double ld(const uint16_t *p, int bf16) {
    return bf16 ? (double)__bfloat162float(__ushort_as_bfloat16(*p)) : (double)__half2float(__ushort_as_half(*p));
}
__device__ double rnd(double x, int bf16) { /* round to the dtype (through float, as torch does) */
    float f = (float)x;
    return bf16 ? (double)__bfloat162float(__float2bfloat16_rn(f)) : (double)__half2float(__float2half_rn(f));
}
__device__ int64_t voff(const View &v, int b, int h, int H, int Hkv, int64_t i, int64_t j) {
    int64_t hb = v.dim[1] == 1 ? 0 : (v.dim[1] == H ? h : h / (H / Hkv));
    return (v.dim[0] == 1 ? 0 : b * v.stride[0]) + hb * v.stride[1] + (v.dim[2] == 1 ? 0 : i * v.stride[2]) +
           j * v.stride[3];
}
__device__ double block_reduce(double x, int is_max) {
    __shared__ double red[32];
    for (int o = 16; o > 0; o >>= 1) {
        double y = __shfl_xor_sync(0xffffffffu, x, o);
        x = is_max ? fmax(x, y) : x + y;
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
    __syncthreads();
    double r = red[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++) r = is_max ? fmax(r, red[w]) : r + red[w];
    return r;
}
__global__ void ref_kernel(RefArgs a) {
    const int64_t row = blockIdx.x;
    const int64_t i = row % a.Sq;
    const int h = (int)((row / a.Sq) % a.H), b = (int)(row / ((int64_t)a.Sq * a.H)), hk = h / (a.H / a.Hkv);
    double *sc = a.scratch + row * a.Sk;
    const uint16_t *qr = a.q + b * a.qs[0] + i * a.qs[1] + h * a.qs[2];
    for (int64_t j = threadIdx.x; j < a.Sk; j += blockDim.x) {
        const uint16_t *kr = a.k + b * a.ks[0] + j * a.ks[1] + hk * a.ks[2];
        double s = 0;
        if (a.lowp) {
            float f = 0.f;
            for (int d = 0; d < a.D; d++) f += (float)ld(qr + d, a.bf16) * (float)ld(kr + d, a.bf16);
            s = rnd(rnd(f, a.bf16) * a.scale, a.bf16);
            if (a.softcap > 0) s = rnd(a.softcap * rnd(tanh(rnd(s / a.softcap, a.bf16)), a.bf16), a.bf16);
        } else {
            for (int d = 0; d < a.D; d++) s += ld(qr + d, a.bf16) * ld(kr + d, a.bf16);
            s *= a.scale;
            if (a.softcap > 0) s = a.softcap * tanh(s / a.softcap);
        }
        if (a.bias.ptr) {
            s += ld((const uint16_t *)a.bias.ptr + voff(a.bias, b, h, a.H, a.Hkv, i, j), a.bf16);
            if (a.lowp) s = rnd(s, a.bf16);
        }
        bool vis = true;
        if (a.mask.ptr) vis = ((const uint8_t *)a.mask.ptr)[voff(a.mask, b, h, a.H, a.Hkv, i, j)] != 0;
        if (a.causal && j > i + a.Sk - a.Sq) vis = false;
        sc[j] = vis ? s : -INFINITY;
    }
    __syncthreads();
    double m = -INFINITY;
    for (int64_t j = threadIdx.x; j < a.Sk; j += blockDim.x) m = fmax(m, sc[j]);
    m = block_reduce(m, 1);
    double l = 0;
    for (int64_t j = threadIdx.x; j < a.Sk; j += blockDim.x) {
        double e = sc[j] == -INFINITY ? 0.0 : (a.lowp ? (double)expf((float)(sc[j] - m)) : exp(sc[j] - m));
        sc[j] = e;
        l += e;
    }
    l = block_reduce(l, 0);
    if (a.lowp) l = (float)l;
    const double lse = l > 0 ? (a.lowp ? (double)((float)m + logf((float)l)) : m + log(l)) : -INFINITY;
    for (int64_t j = threadIdx.x; j < a.Sk; j += blockDim.x) {
        double p = l > 0 ? sc[j] / l : 0.0;
        if (a.lowp) p = rnd((float)p, a.bf16);
        if (a.probs) a.probs[row * a.Sk + j] = p;
        if (a.keep) p = a.keep[row * a.Sk + j] ? p / (1.0 - a.p_drop) : 0.0;
        if (a.lowp && a.keep) p = rnd(p, a.bf16);
        sc[j] = p;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < a.D; d += blockDim.x) {
        double acc = 0;
        float accf = 0.f;
        for (int64_t j = 0; j < a.Sk; j++) {
            const double vv = ld(a.v + b * a.vs[0] + j * a.vs[1] + hk * a.vs[2] + d, a.bf16);
            if (a.lowp) accf += (float)sc[j] * (float)vv;
            else acc += sc[j] * vv;
        }
        a.out[row * a.D + d] = a.lowp ? rnd(accf, a.bf16) : acc;
    }
    if (threadIdx.x == 0) a.lse[row] = lse;
}

/* ---- host helpers ---- */
static float half_bits_to_float(uint16_t h) {
    uint32_t s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
    float f;
    if (e == 0) f = ldexpf((float)m, -24);
    else if (e == 31) f = m ? NAN : INFINITY;
    else f = ldexpf((float)(m | 1024), (int)e - 25);
    return s ? -f : f;
}
static float bits_to_float(uint16_t x, int bf16) {
    if (bf16) {
        uint32_t u = (uint32_t)x << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return half_bits_to_float(x);
}

enum { LAYOUT_BSHD = 0, LAYOUT_BHSD = 1 };
/* a (B, S, Hx, D) tensor in one buffer: BSHD or BHSD physical order, `pad` extra elements per row of D,
 * pointer offset `off` elements (off = 1 breaks 16-byte alignment) */
struct Tensor {
    uint16_t *buf = nullptr, *ptr = nullptr;
    int64_t stride[4] = {0, 0, 0, 1};
    int64_t n = 0;
};
static Tensor make_tensor(int B, int S, int Hx, int D, int layout, int pad, int off, uint64_t seed, int bf16,
                          float sd) {
    Tensor t;
    int64_t rd = D + pad;
    t.n = (int64_t)B * S * Hx * rd + off;
    CK(cudaMalloc(&t.buf, t.n * 2));
    fill_normal<<<1024, 256>>>(t.buf, t.n, seed, bf16, sd);
    t.ptr = t.buf + off;
    if (layout == LAYOUT_BSHD) {
        t.stride[0] = (int64_t)S * Hx * rd; t.stride[1] = Hx * rd; t.stride[2] = rd;
    } else {
        t.stride[0] = (int64_t)S * Hx * rd; t.stride[1] = rd; t.stride[2] = (int64_t)S * rd;
    }
    return t;
}

struct Case {
    const char *name;
    int B, H, Hkv, Sq, Sk, D, bf16, causal;
    int mask_form;      /* 0 none; else dims code below */
    int bias_form;
    float softcap, p_drop;
    int layout, pad, off;   /* q, k, v, out memory */
    int mask_mode;      /* fill_mask mode */
    int summary;        /* also run with the mask summary */
    int probs;          /* 1: probs; 2: probs with lse = NULL */
    int bias_neginf;    /* scatter -inf into the bias */
    float keep;
    int window;         /* top-k window (keep_window_size), 0 = off */
};
/* mask/bias dims code: 1 (B,H,Sq,Sk), 2 (B,Hkv,1,Sk), 3 (1,1,Sq,Sk), 4 (B,1,1,Sk), 5 (1,H,Sq,Sk),
 * 6 (B,Hkv,Sq,Sk), 7 (B,H,1,Sk) */
static void form_dims(int form, const Case &c, int64_t dim[4]) {
    int64_t B = c.B, H = c.H, Hkv = c.Hkv, Sq = c.Sq, Sk = c.Sk;
    int64_t t[8][4] = {{0, 0, 0, 0}, {B, H, Sq, Sk}, {B, Hkv, 1, Sk}, {1, 1, Sq, Sk},
                       {B, 1, 1, Sk}, {1, H, Sq, Sk}, {B, Hkv, Sq, Sk}, {B, H, 1, Sk}};
    for (int d = 0; d < 4; d++) dim[d] = t[form][d];
}

struct Stats {
    double err, terr, refmax;
    bool ok;
};
static Stats compare(const std::vector<double> &ours, const std::vector<double> &ref,
                     const std::vector<double> &torch) {
    Stats s = {0, 0, 0, true};
    for (size_t t = 0; t < ours.size(); t++) {
        double r = ref[t], x = ours[t], y = torch[t];
        if (std::isinf(r)) {
            if (!(std::isinf(x) && (x < 0) == (r < 0))) { s.ok = false; s.err = INFINITY; }
            continue;
        }
        if (std::isnan(x) || std::isinf(x)) { s.ok = false; s.err = INFINITY; continue; }
        s.err = std::max(s.err, fabs(x - r));
        if (!std::isinf(y)) s.terr = std::max(s.terr, fabs(y - r));
        s.refmax = std::max(s.refmax, fabs(r));
    }
    if (!(s.err <= 2 * s.terr + 1e-5)) s.ok = false;
    return s;
}

static int run_case(const Case &c, uint64_t seed) {
    const int64_t rows = (int64_t)c.B * c.H * c.Sq;
    Tensor q = make_tensor(c.B, c.Sq, c.H, c.D, c.layout, c.pad, c.off, seed * 7 + 1, c.bf16, 1.f);
    Tensor k = make_tensor(c.B, c.Sk, c.Hkv, c.D, c.layout, c.pad, c.off, seed * 7 + 2, c.bf16, 1.f);
    Tensor v = make_tensor(c.B, c.Sk, c.Hkv, c.D, c.layout, c.pad, c.off, seed * 7 + 3, c.bf16, 1.f);
    Tensor o = make_tensor(c.B, c.Sq, c.H, c.D, c.layout, c.pad, c.off, seed * 7 + 4, c.bf16, 1.f);
    fdma_params p;
    memset(&p, 0, sizeof(p));
    p.device = FDMA_DEVICE_CUDA;
    p.dtype = c.bf16 ? FDMA_DTYPE_BF16 : FDMA_DTYPE_F16;
    p.B = c.B; p.H = c.H; p.Hkv = c.Hkv; p.Sq = c.Sq; p.Sk = c.Sk; p.D = c.D;
    p.q = q.ptr; p.k = k.ptr; p.v = v.ptr; p.out = o.ptr;
    memcpy(p.q_stride, q.stride, 32); memcpy(p.k_stride, k.stride, 32);
    memcpy(p.v_stride, v.stride, 32); memcpy(p.out_stride, o.stride, 32);
    p.scale = 1.f / sqrtf((float)c.D);
    p.softcap = c.softcap;
    p.causal = c.causal;
    p.p_drop = c.p_drop;
    p.seed = 0x1234567890abcdefULL ^ seed;
    p.offset = 3 + seed;

    uint8_t *mbuf = nullptr;
    uint16_t *bbuf = nullptr;
    View mview = {nullptr, {0}, {0}}, bview = {nullptr, {0}, {0}};
    if (c.mask_form) {
        int64_t dim[4];
        form_dims(c.mask_form, c, dim);
        /* odd row pitch when c.pad: the unaligned path; a contiguous layout otherwise */
        int64_t pitch = dim[3] + (c.pad ? 3 : 0);
        int64_t n = dim[0] * dim[1] * dim[2] * pitch + c.off;
        CK(cudaMalloc(&mbuf, n));
        fill_mask<<<1024, 256>>>(mbuf, n - c.off, dim[2], pitch, seed * 7 + 5, c.keep, c.mask_mode);
        p.mask.ptr = mbuf + c.off;
        for (int d = 0; d < 4; d++) p.mask.dim[d] = dim[d];
        p.mask.stride[3] = 1; p.mask.stride[2] = pitch; p.mask.stride[1] = pitch * dim[2];
        p.mask.stride[0] = pitch * dim[2] * dim[1];
        mview.ptr = p.mask.ptr;
        memcpy(mview.dim, p.mask.dim, 32); memcpy(mview.stride, p.mask.stride, 32);
    }
    if (c.bias_form) {
        int64_t dim[4];
        form_dims(c.bias_form, c, dim);
        int64_t pitch = dim[3] + (c.pad ? 1 : 0);
        int64_t n = dim[0] * dim[1] * dim[2] * pitch + c.off;
        CK(cudaMalloc(&bbuf, n * 2));
        fill_normal<<<1024, 256>>>(bbuf, n, seed * 7 + 6, c.bf16, 2.f);
        if (c.bias_neginf) { /* a few -inf entries: they act as masked */
            std::vector<uint16_t> hb(n);
            CK(cudaMemcpy(hb.data(), bbuf, n * 2, cudaMemcpyDeviceToHost));
            for (int64_t t = 0; t < n; t += 5) hb[t] = c.bf16 ? 0xFF80 : 0xFC00;
            CK(cudaMemcpy(bbuf, hb.data(), n * 2, cudaMemcpyHostToDevice));
        }
        p.bias.ptr = bbuf + c.off;
        for (int d = 0; d < 4; d++) p.bias.dim[d] = dim[d];
        p.bias.stride[3] = 1; p.bias.stride[2] = pitch; p.bias.stride[1] = pitch * dim[2];
        p.bias.stride[0] = pitch * dim[2] * dim[1];
        bview.ptr = p.bias.ptr;
        memcpy(bview.dim, p.bias.dim, 32); memcpy(bview.stride, p.bias.stride, 32);
    }
    uint8_t *kbuf = nullptr;
    if (c.window) { /* the reference attends to the keep mask of the selection; the forward gets the window */
        p.window = c.window;
        fdma_topk_params t;
        memset(&t, 0, sizeof(t));
        t.device = FDMA_DEVICE_CUDA; t.dtype = p.dtype; t.Sq = c.Sq; t.Sk = c.Sk;
        t.bias = p.bias; t.mask = p.mask; t.causal = c.causal; t.window = c.window;
        const int64_t m0 = p.mask.ptr ? p.mask.dim[0] : 1, m1 = p.mask.ptr ? p.mask.dim[1] : 1;
        const int64_t dim[4] = {std::max(p.bias.dim[0], m0), std::max(p.bias.dim[1], m1), c.Sq, c.Sk};
        CK(cudaMalloc(&kbuf, dim[0] * dim[1] * dim[2] * dim[3]));
        t.out = kbuf;
        memcpy(t.out_dim, dim, 32);
        t.out_stride[3] = 1; t.out_stride[2] = dim[3]; t.out_stride[1] = dim[3] * dim[2];
        t.out_stride[0] = dim[3] * dim[2] * dim[1];
        if (fdma_cuda_create_mask(&t) != FDMA_STATUS_OK) {
            printf("FAIL %-34s create_mask: %s\n", c.name, g_err);
            return 1;
        }
        mview.ptr = kbuf;
        memcpy(mview.dim, t.out_dim, 32); memcpy(mview.stride, t.out_stride, 32);
    }
    float *lse = nullptr;
    uint16_t *probs = nullptr;
    CK(cudaMalloc(&lse, rows * 4));
    p.lse = c.probs == 2 ? nullptr : lse; /* probs == 2: no caller lse, the plan asks for workspace */
    if (c.probs) {
        CK(cudaMalloc(&probs, rows * c.Sk * 2));
        p.probs = probs;
    }

    /* reference */
    uint8_t *keep = nullptr;
    if (c.p_drop > 0) {
        std::vector<uint8_t> hk(rows * c.Sk);
        uint32_t t = fdma_dropout_threshold(c.p_drop);
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < c.Sk; j++) hk[r * c.Sk + j] = (uint8_t)fdma_dropout_keep_bit(p.seed, p.offset, r, j, t);
        CK(cudaMalloc(&keep, hk.size()));
        CK(cudaMemcpy(keep, hk.data(), hk.size(), cudaMemcpyHostToDevice));
    }
    double *rout[2], *rlse[2], *rprobs[2] = {nullptr, nullptr}, *scratch;
    CK(cudaMalloc(&scratch, rows * c.Sk * 8));
    for (int t = 0; t < 2; t++) {
        CK(cudaMalloc(&rout[t], rows * c.D * 8));
        CK(cudaMalloc(&rlse[t], rows * 8));
        if (c.probs) CK(cudaMalloc(&rprobs[t], rows * c.Sk * 8));
        RefArgs a;
        memset(&a, 0, sizeof(a));
        a.q = q.ptr; a.k = k.ptr; a.v = v.ptr;
        memcpy(a.qs, q.stride, 24); memcpy(a.ks, k.stride, 24); memcpy(a.vs, v.stride, 24);
        a.mask = mview; a.bias = bview;
        a.B = c.B; a.H = c.H; a.Hkv = c.Hkv; a.Sq = c.Sq; a.Sk = c.Sk; a.D = c.D; a.bf16 = c.bf16;
        a.causal = c.causal; a.lowp = t; a.scale = p.scale; a.softcap = c.softcap; a.p_drop = c.p_drop;
        a.keep = keep; a.out = rout[t]; a.lse = rlse[t]; a.probs = rprobs[t]; a.scratch = scratch;
        ref_kernel<<<(unsigned)rows, 256>>>(a);
        CK(cudaGetLastError());
    }
    CK(cudaDeviceSynchronize());

    int fails = 0;
    for (int use_summary = 0; use_summary <= (c.summary && c.mask_form ? 1 : 0); use_summary++) {
        uint8_t *summ = nullptr;
        p.mask_summary = nullptr;
        if (use_summary) {
            int64_t nb = p.mask.dim[0] * p.mask.dim[1] * ((p.mask.dim[2] + 63) / 64) * ((c.Sk + 63) / 64);
            CK(cudaMalloc(&summ, nb));
            if (fdma_cuda_mask_summarize(&p, summ, nb) != FDMA_STATUS_OK) {
                printf("FAIL %-34s summarize: %s\n", c.name, g_err);
                return 1;
            }
            p.mask_summary = summ;
        }
        /* poison outputs */
        CK(cudaMemset(o.buf, 0xFF, o.n * 2));
        CK(cudaMemset(lse, 0xFF, rows * 4));
        if (probs) CK(cudaMemset(probs, 0xFF, rows * c.Sk * 2));
        fdma_plan plan;
        memset(&plan, 0, sizeof(plan));
        fdma_status st = fdma_cuda_fwd_plan(&p, &plan);
        void *ws = nullptr;
        if (st == FDMA_STATUS_OK && plan.workspace_bytes) {
            CK(cudaMalloc(&ws, plan.workspace_bytes));
            p.workspace = ws;
            p.workspace_bytes = plan.workspace_bytes;
        }
        if (st == FDMA_STATUS_OK) st = fdma_cuda_fwd_run(&p, &plan);
        cudaError_t ce = cudaDeviceSynchronize();
        if (st != FDMA_STATUS_OK || ce != cudaSuccess) {
            printf("FAIL %-34s status %d (%s) cuda %s\n", c.name, (int)st, g_err, cudaGetErrorString(ce));
            return 1;
        }
        /* out of the strided buffer -> (B, H, Sq, D) */
        std::vector<uint16_t> ho(o.n);
        CK(cudaMemcpy(ho.data(), o.buf, o.n * 2, cudaMemcpyDeviceToHost));
        std::vector<double> xo(rows * c.D), ro(rows * c.D), to(rows * c.D), xl(rows), rl(rows), tl(rows);
        for (int64_t r = 0; r < rows; r++) {
            int64_t i = r % c.Sq, h = (r / c.Sq) % c.H, b = r / ((int64_t)c.Sq * c.H);
            for (int d = 0; d < c.D; d++)
                xo[r * c.D + d] =
                    bits_to_float(ho[c.off + b * o.stride[0] + i * o.stride[1] + h * o.stride[2] + d], c.bf16);
        }
        CK(cudaMemcpy(ro.data(), rout[0], rows * c.D * 8, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(to.data(), rout[1], rows * c.D * 8, cudaMemcpyDeviceToHost));
        std::vector<float> hl(rows);
        CK(cudaMemcpy(hl.data(), lse, rows * 4, cudaMemcpyDeviceToHost));
        for (int64_t r = 0; r < rows; r++) xl[r] = hl[r];
        CK(cudaMemcpy(rl.data(), rlse[0], rows * 8, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(tl.data(), rlse[1], rows * 8, cudaMemcpyDeviceToHost));
        Stats so = compare(xo, ro, to), sl = compare(xl, rl, tl);
        if (!p.lse) sl = Stats{0, 0, 0, true};
        int64_t empty = 0;
        for (int64_t r = 0; r < rows; r++) empty += std::isinf(rl[r]);
        bool ok = so.ok && sl.ok;
        char extra[160] = "";
        if (c.probs) {
            std::vector<uint16_t> hp(rows * c.Sk);
            CK(cudaMemcpy(hp.data(), probs, hp.size() * 2, cudaMemcpyDeviceToHost));
            std::vector<double> xp(hp.size()), rp(hp.size()), tp(hp.size());
            for (size_t t = 0; t < hp.size(); t++) xp[t] = bits_to_float(hp[t], c.bf16);
            CK(cudaMemcpy(rp.data(), rprobs[0], hp.size() * 8, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(tp.data(), rprobs[1], hp.size() * 8, cudaMemcpyDeviceToHost));
            Stats sp = compare(xp, rp, tp);
            ok = ok && sp.ok;
            snprintf(extra, sizeof(extra), " probs %.2e (torch %.2e)", sp.err, sp.terr);
        }
        printf("%s %-34s %-40s%s out %.2e (torch %.2e, rel %.1e) lse %.2e (torch %.2e) empty rows %lld%s\n",
               ok ? "ok  " : "FAIL", c.name, plan.name, use_summary ? " +summary" : "", so.err, so.terr,
               so.err / (so.refmax > 0 ? so.refmax : 1), sl.err, sl.terr, (long long)empty, extra);
        fails += !ok;
        if (ws) cudaFree(ws);
        p.workspace = nullptr;
        p.workspace_bytes = 0;
        if (summ) cudaFree(summ);
    }
    cudaFree(q.buf); cudaFree(k.buf); cudaFree(v.buf); cudaFree(o.buf);
    if (mbuf) cudaFree(mbuf);
    if (bbuf) cudaFree(bbuf);
    if (kbuf) cudaFree(kbuf);
    cudaFree(lse);
    if (probs) cudaFree(probs);
    if (keep) cudaFree(keep);
    cudaFree(scratch);
    for (int t = 0; t < 2; t++) { cudaFree(rout[t]); cudaFree(rlse[t]); if (rprobs[t]) cudaFree(rprobs[t]); }
    return fails;
}

/* Unsupported / refused inputs: the plan must say so with a message. */
static int check_refusals() {
    fdma_params p;
    memset(&p, 0, sizeof(p));
    p.device = FDMA_DEVICE_CUDA;
    p.dtype = FDMA_DTYPE_BF16;
    p.B = 1; p.H = 1; p.Hkv = 1; p.Sq = 4; p.Sk = 4; p.D = 40;
    fdma_plan plan;
    int fails = 0;
    struct { const char *what; fdma_params p; } t[4];
    t[0] = {"D = 36", p}; t[0].p.D = 36;
    t[1] = {"fp32", p}; t[1].p.dtype = FDMA_DTYPE_F32;
    t[2] = {"Sk = 2^31", p}; t[2].p.Sk = (int64_t)1 << 31;
    t[3] = {"D = 264", p}; t[3].p.D = 264;
    for (int c = 0; c < 4; c++) {
        g_err[0] = 0;
        fdma_status st = fdma_cuda_fwd_plan(&t[c].p, &plan);
        bool ok = st == FDMA_STATUS_UNSUPPORTED && g_err[0];
        printf("%s refuse %-12s -> %d: %s\n", ok ? "ok  " : "FAIL", t[c].what, (int)st, g_err);
        fails += !ok;
    }
    void *host = malloc(64);
    p.q = host;
    fdma_status st = fdma_cuda_check_pointers(&p);
    bool ok = st == FDMA_STATUS_INVALID_ARGUMENT && cudaGetLastError() == cudaSuccess;
    printf("%s host pointer q -> %d: %s\n", ok ? "ok  " : "FAIL", (int)st, g_err);
    fails += !ok;
    free(host);
    return fails;
}

/* ---- C-level timing (BENCHMARKS.md workloads, bf16, causal) ---- */
static void bench(int only) {
    struct W { const char *name; int B, H, Hkv, S, D, form, w, summary, topk, blocks; }; /* topk: bias only, window w;
                                                                                          blocks: fill_mask mode 1 */
    const W ws[] = {
        {"dense Sk=4K", 1, 16, 4, 4096, 128, 0, 0},   {"dense Sk=16K", 1, 16, 4, 16384, 128, 0, 0},
        {"W1 Sk=4K w=1024", 1, 16, 4, 4096, 128, 2, 1024}, {"W1 Sk=16K w=1024", 1, 16, 4, 16384, 128, 2, 1024},
        {"W2 Sk=4K w=1024", 1, 16, 4, 4096, 128, 6, 1024}, {"W2 Sk=16K w=1024", 1, 16, 4, 16384, 128, 6, 1024},
        {"dense B2 H16 D64 Sk=8K", 2, 16, 16, 8192, 64, 0, 0}, {"W1 B2 H16 D64 Sk=8K w=2048", 2, 16, 16, 8192, 64, 2, 2048},
        /* W2 with the mask summary computed once outside the timing (the caller's reuse across layers) */
        {"W2 Sk=4K w=1024 +summary", 1, 16, 4, 4096, 128, 6, 1024, 1}, {"W2 Sk=16K w=1024 +summary", 1, 16, 4, 16384, 128, 6, 1024, 1},
        /* W1c: causal per-key bias (B, Hkv, 1, Sk), top-1024 per row (selection included in the time) */
        {"W1c Sk=4K w=1024", 1, 16, 4, 4096, 128, 2, 1024, 0, 1}, {"W1c Sk=16K w=1024", 1, 16, 4, 16384, 128, 2, 1024, 0, 1},
        /* W2 forms with two thirds of the 64-key tiles all False (tile skipping), without and with the summary */
        {"W2 1/3 tiles Sk=16K", 1, 16, 4, 16384, 128, 6, 1024, 0, 0, 1},
        {"W2 1/3 tiles Sk=16K +summary", 1, 16, 4, 16384, 128, 6, 1024, 1, 0, 1},
    };
    printf("\n%-30s %10s %10s %12s   %s\n", "workload (C harness)", "ms", "TFLOP/s", "useful TF/s",
           "kernel (plan name: ..._f<feature bits>_<warps>x<row blocks> = the instantiation)");
    for (int wi = 0; wi < (int)(sizeof(ws) / sizeof(ws[0])); wi++) {
        const W &w = ws[wi];
        if (only >= 0 && wi != only) continue;
        Case c = {w.name, w.B, w.H, w.Hkv, w.S, w.S, w.D, 1, 1, w.form, w.form, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                  w.form ? (float)w.w / w.S : 1.f};
        Tensor q = make_tensor(c.B, c.Sq, c.H, c.D, 0, 0, 0, 11, 1, 1.f);
        Tensor k = make_tensor(c.B, c.Sk, c.Hkv, c.D, 0, 0, 0, 12, 1, 1.f);
        Tensor v = make_tensor(c.B, c.Sk, c.Hkv, c.D, 0, 0, 0, 13, 1, 1.f);
        Tensor o = make_tensor(c.B, c.Sq, c.H, c.D, 0, 0, 0, 14, 1, 1.f);
        fdma_params p;
        memset(&p, 0, sizeof(p));
        p.device = FDMA_DEVICE_CUDA; p.dtype = FDMA_DTYPE_BF16;
        p.B = c.B; p.H = c.H; p.Hkv = c.Hkv; p.Sq = c.Sq; p.Sk = c.Sk; p.D = c.D;
        p.q = q.ptr; p.k = k.ptr; p.v = v.ptr; p.out = o.ptr;
        memcpy(p.q_stride, q.stride, 32); memcpy(p.k_stride, k.stride, 32);
        memcpy(p.v_stride, v.stride, 32); memcpy(p.out_stride, o.stride, 32);
        p.scale = 1.f / sqrtf((float)c.D); p.causal = 1;
        float *lse;
        CK(cudaMalloc(&lse, (int64_t)c.B * c.H * c.Sq * 4));
        p.lse = lse;
        uint8_t *m = nullptr;
        uint16_t *bb = nullptr;
        double useful_frac = 0.5;
        if (w.form) {
            int64_t dim[4];
            form_dims(w.form, c, dim);
            int64_t n = dim[0] * dim[1] * dim[2] * dim[3];
            CK(cudaMalloc(&m, n));
            CK(cudaMalloc(&bb, n * 2));
            /* random keep mask of density w/S (W1: w keys per row; W2 per-row top-w is timed with the same
               density: tile occupancy, not the exact selection, decides the cost here) */
            fill_mask<<<1024, 256>>>(m, n, 1, dim[3], 21, (float)w.w / w.S, w.blocks);
            fill_normal<<<1024, 256>>>(bb, n, 22, 1, 1.f);
            p.mask.ptr = m; p.bias.ptr = bb;
            for (int d = 0; d < 4; d++) p.mask.dim[d] = p.bias.dim[d] = dim[d];
            p.mask.stride[3] = p.bias.stride[3] = 1;
            p.mask.stride[2] = p.bias.stride[2] = dim[3];
            p.mask.stride[1] = p.bias.stride[1] = dim[3] * dim[2];
            p.mask.stride[0] = p.bias.stride[0] = dim[3] * dim[2] * dim[1];
            useful_frac = (double)w.w / w.S * 0.5;
            if (w.topk) { /* about w keys for every row */
                memset(&p.mask, 0, sizeof(p.mask));
                p.window = w.w;
                useful_frac = (double)w.w / w.S;
            }
        }
        uint8_t *summ = nullptr;
        if (w.summary) {
            int64_t nb = p.mask.dim[0] * p.mask.dim[1] * ((p.mask.dim[2] + 63) / 64) * ((c.Sk + 63) / 64);
            CK(cudaMalloc(&summ, nb));
            if (fdma_cuda_mask_summarize(&p, summ, nb) != FDMA_STATUS_OK) { printf("%s: %s\n", w.name, g_err); continue; }
            p.mask_summary = summ;
        }
        fdma_plan plan;
        if (fdma_cuda_fwd_plan(&p, &plan) != FDMA_STATUS_OK) { printf("%s: %s\n", w.name, g_err); continue; }
        void *ws = nullptr;
        if (plan.workspace_bytes) {
            CK(cudaMalloc(&ws, plan.workspace_bytes));
            p.workspace = ws;
            p.workspace_bytes = plan.workspace_bytes;
        }
        cudaEvent_t e0, e1;
        cudaEventCreate(&e0); cudaEventCreate(&e1);
        for (int t = 0; t < 10; t++) fdma_cuda_fwd_run(&p, &plan);
        std::vector<float> ms;
        for (int t = 0; t < 100; t++) {
            cudaEventRecord(e0);
            fdma_status st = fdma_cuda_fwd_run(&p, &plan);
            cudaEventRecord(e1);
            cudaEventSynchronize(e1);
            float x;
            cudaEventElapsedTime(&x, e0, e1);
            if (st != FDMA_STATUS_OK) { printf("%s: %s\n", w.name, g_err); break; }
            ms.push_back(x);
        }
        CK(cudaDeviceSynchronize());
        std::sort(ms.begin(), ms.end());
        double med = ms.empty() ? NAN : ms[ms.size() / 2];
        double flops = 4.0 * c.B * c.H * (double)c.Sq * c.Sk * c.D * 0.5;
        printf("%-30s %10.3f %10.1f %12.1f   %s\n", w.name, med, flops / med * 1e-9,
               flops * (useful_frac / 0.5) / med * 1e-9, plan.name);
        cudaFree(q.buf); cudaFree(k.buf); cudaFree(v.buf); cudaFree(o.buf); cudaFree(lse);
        if (m) cudaFree(m);
        if (bb) cudaFree(bb);
        if (summ) cudaFree(summ);
        if (ws) cudaFree(ws);
    }
}

int main(int argc, char **argv) {
    int small = argc > 1 && !strcmp(argv[1], "--small");
    if (argc > 1 && !strcmp(argv[1], "--bench")) {
        bench(argc > 2 ? atoi(argv[2]) : -1); /* --bench N: only workload N (for a profiler) */
        return 0;
    }
    /*                 name                          B  H Hkv  Sq    Sk    D bf16 caus mask bias cap  pdrop lay pad off mmode summ probs ninf keep win */
    const Case cases[] = {
        {"plain 113x257 d64",                        2, 4, 4,  113,  257,  64, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5f},
        {"Sq=1 Sk=1000 d128 GQA 8:1 f16",            2, 8, 1,    1, 1000, 128, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5f},
        {"Sq=17 Sk=4095 d40 causal",                 1, 2, 2,   17, 4095,  40, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5f},
        {"Sq=Sk=1000 d128 causal mask+bias BHSS",    1, 2, 2, 1000, 1000, 128, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0.5f},
        {"W1 form (B,Hkv,1,Sk) GQA 4:1 causal",      2, 8, 2,  300, 1031, 128, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0.3f},
        {"mask (1,1,Sq,Sk) bias (B,1,1,Sk) d256",    2, 2, 2,  113, 4095, 256, 0, 0, 3, 4, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0.5f},
        {"pad mask (B,1,1,Sk) d192",                 2, 3, 3,  200,  300, 192, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0.5f},
        {"bias (1,H,Sq,Sk) -inf softcap d96",        1, 4, 2,   65,  129,  96, 1, 0, 0, 5, 30.f, 0, 0, 0, 0, 0, 0, 0, 1, 0.5f},
        {"dropout 0.1 mask+bias probs d64",          2, 2, 1,  113,  257,  64, 1, 1, 6, 7, 0, 0.1f, 0, 0, 0, 0, 0, 1, 0, 0.6f},
        {"dropout 0.3 f16 d128",                     1, 2, 2,  130,  200, 128, 0, 0, 0, 0, 0, 0.3f, 0, 0, 0, 0, 0, 0, 0, 0.5f},
        {"causal Sq>Sk 300x100 d128",                1, 2, 2,  300,  100, 128, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5f},
        {"unaligned strides+ptr d64",                2, 2, 1,   77,  333,  64, 1, 1, 6, 1, 0, 0, 0, 3, 1, 0, 1, 0, 0, 0.5f},
        {"BHSD layout d128 block mask",              1, 4, 4,  256, 4095, 128, 1, 0, 1, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0.5f},
        {"block mask causal GQA 2:1 W1 bias",        1, 4, 2, 1000, 1000,  64, 0, 1, 6, 2, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0.7f},
        {"Sk=1 Sq=31 d8",                            1, 2, 2,   31,    1,   8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5f},
        {"d256 causal 130x257 probs",                1, 2, 1,  130,  257, 256, 1, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0.5f},
        {"mask (B,H,1,Sk) d32 f16",                  2, 2, 2,   50, 1000,  32, 0, 0, 7, 3, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0.5f},
        {"gather W1 dropout causal d128",            1, 4, 2,  200,  700, 128, 1, 1, 2, 2, 0, 0.2f, 0, 0, 0, 0, 0, 0, 0, 0.3f},
        {"gather Sq>Sk causal d64 f16",              2, 2, 2,  300,  150,  64, 0, 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5f},
        {"gather sparse 2% Sk=4095 d256 softcap",    1, 2, 1,  257, 4095, 256, 1, 1, 2, 2, 20.f, 0, 0, 0, 0, 0, 0, 0, 0, 0.02f},
        {"gather all masked d128",                   1, 2, 2,   33,  100, 128, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0f},
        {"gather unaligned BHSD d192 probs",         2, 2, 1,   90,  513, 192, 1, 1, 7, 2, 0, 0, 1, 5, 1, 0, 0, 2, 0, 0.4f},
        {"probs without lse buffer d64",             1, 2, 2,   70,   90,  64, 1, 1, 0, 0, 5.f, 0, 0, 0, 0, 0, 0, 2, 0, 0.5f},
        {"plain causal 777x777 d128 GQA 4:1",        2, 8, 2,  777,  777, 128, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5f},
        {"plain 300x1500 d96 f16",                   1, 4, 4,  300, 1500,  96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5f},
        {"mask (1,1,Sq,Sk) row bias (B,1,1,Sk) d128", 2, 4, 2,  333,  700, 128, 1, 1, 3, 4, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0.4f},
        {"W2 mask+bias (B,Hkv,Sq,Sk) d128 sparse",    1, 4, 2,  500, 2000, 128, 1, 1, 6, 6, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0.05f},
        /* gathered keys through the bias + gather instantiation (f10): padded D, Sq != Sk, GQA/MQA, -inf bias */
        {"gather bias d40 causal GQA 2:1 200x777",    2, 4, 2,  200,  777,  40, 1, 1, 2, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.3f},
        {"gather bias (B,H,1,Sk) d128 MQA 333x200 f16", 1, 4, 1, 333, 200, 128, 0, 0, 4, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.6f},
        {"gather -inf bias d64 causal Sq>Sk 500x300", 1, 8, 2,  500,  300,  64, 1, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0.5f},
        /* top-k window: SPARSE lists (causal per-key bias) in f10, f31 with dropout; non-causal: gathered mask */
        {"W1c window 64 (B,Hkv,1,Sk) d128 GQA 4:1",  2, 8, 2,  300, 1000, 128, 1, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5f, 64},
        {"W1c window 100 base mask d40 Sq>Sk f16",   1, 4, 4,  333,  257,  40, 0, 1, 4, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.7f, 100},
        {"W1c window 200 -inf bias d64 129x300",     1, 2, 1,  129,  300,  64, 1, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0.5f, 200},
        {"W1c window 64 dropout d128",               1, 2, 1,  200,  600, 128, 1, 1, 0, 2, 0, 0.1f, 0, 0, 0, 0, 0, 0, 0, 0.5f, 64},
        {"window 50 non-causal (B,Hkv,1,Sk) d128",   1, 4, 2,  100,  700, 128, 1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5f, 50},
        /* full mask + bias through the mask + bias instantiation (f3; d128: 4 x 2, mask folded into the bias tile):
           causal Sq != Sk, GQA, padded D, fully masked rows (r % 7 == 3), -inf bias, block mask, with and without
           the summary (without: every tile after the first active one is taken as mixed) */
        {"W2 mask+bias d96 causal GQA 4:1 300x1100 f16", 1, 8, 2, 300, 1100, 96, 0, 1, 6, 6, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0.5f},
        {"W2 block mask+bias d128 causal Sq>Sk 700x333", 2, 4, 2, 700,  333, 128, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0.6f},
        {"mask+bias d40 causal GQA 2:1 257x500 -inf",  1, 4, 2,  257,  500,  40, 1, 1, 6, 5, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0.5f},
        {"mask only (B,H,Sq,Sk) d128 block 200x900",   1, 2, 2,  200,  900, 128, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0.3f},
        {"mask+bias d128 unaligned BHSD 130x260",      1, 2, 1,  130,  260, 128, 1, 1, 1, 6, 0, 0, 1, 3, 1, 0, 1, 0, 0, 0.5f},
        /* the forward's own summary skips causal tiles no row sees (api_cuda.cu): blocks all True / all False /
           mixed across the diagonal, the diagonal off the 64-grid, Sq < Sk and Sq > Sk (rows that see nothing) */
        {"W2 3-state blocks d128 causal 333x1000",     1, 4, 2,  333, 1000, 128, 1, 1, 6, 6, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0.5f},
        {"W2 3-state blocks d128 causal 1000x333 f16", 2, 2, 2, 1000,  333, 128, 0, 1, 1, 1, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0.5f},
        /* the mask + bias kernel packs 4 or 2 query heads that share mask and bias into a CTA (fwd_kernel.cuh) */
        {"W2 pack 4 mask (1,1,Sq,Sk) bias (B,Hkv,Sq,Sk) 77x1030", 2, 8, 2, 77, 1030, 128, 1, 1, 3, 6, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0.4f},
        {"W2 pack 4 mask only (B,Hkv,Sq,Sk) f16 200x300",  1, 16, 4, 200,  300, 128, 0, 0, 6, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0.5f},
        {"W2 pack 2 Sq=1 mask+bias (B,Hkv,Sq,Sk) d112",    2, 4, 2,    1,  500, 112, 1, 1, 6, 6, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0.5f},
        {"W2 pack 2 causal Sq>Sk 260x190 BHSD",            1, 4, 2,  260,  190, 128, 1, 1, 6, 6, 0, 0, 1, 0, 0, 2, 1, 0, 0, 0.5f},
    };
    const int small_set[] = {0, 4, 8, 11, 12, 18, 22, 27, 30, 35, 39, 40};
    int fails = check_refusals();
    int n = small ? (int)(sizeof(small_set) / sizeof(int)) : (int)(sizeof(cases) / sizeof(cases[0]));
    for (int t = 0; t < n; t++) {
        const Case &c = cases[small ? small_set[t] : t];
        fails += run_case(c, 100 + t);
    }
    printf("%s: %d failure(s)\n", fails ? "FAILED" : "PASSED", fails);
    return fails ? 1 : 0;
}
