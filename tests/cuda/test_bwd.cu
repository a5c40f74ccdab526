/*
 * test_bwd.cu -- standalone test and benchmark of the CUDA backward (src/cuda/bwd*.cu), SPEC section 4.
 *
 * For each case: fresh normal inputs q, k, v, dout (and mask, bias) at awkward sizes; a naive float64 GPU
 * reference computes the forward (out, lse), which is rounded to the dtype / fp32 and given to the kernel under
 * test exactly as the forward's outputs would be; then the reference backward (dq, dk, dv, dbias summed over
 * every broadcast dim) in float64. Outputs are NaN-poisoned before every run. Reported per tensor:
 * max |x - ref| / max |ref| (and NaN count); deterministic cases are also run 5 times and compared bit for bit.
 *
 * Calls fdma_cuda_bwd_plan / fdma_cuda_bwd_run directly with hand-filled params (no src/*.c needed: this file
 * provides fdma_set_error).
 *
 * Build and run (from the repository root, on a machine with an sm80+ GPU):
 *   nvcc -O3 -std=c++17 --use_fast_math -gencode arch=compute_90,code=sm_90 -Iinclude -Isrc \
 *        src/cuda/bwd*.cu tests/cuda/test_bwd.cu -o test_bwd
 *   ./test_bwd            all cases          ./test_bwd --small   a few small cases (for compute-sanitizer)
 *   ./test_bwd --bench    timing (B=1, H=16, Hkv=4, D=128, causal, Sk = 4K and 16K; no bias, per-key bias, full
 *                         bias (B, H, Sq, Sk), each with dbias; W2: bias and keep mask (B, Hkv, Sq, Sk), ~25%
 *                         random True, with dbias (ACC) and without; the plan name says which kernel ran)
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
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

/* ---- host helpers ------------------------------------------------------------------------------------- */
static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static double urand() {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return ((g_rng >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}
static double nrand() { return sqrt(-2.0 * log(urand())) * cos(6.283185307179586 * urand()); }

static uint16_t f2h(float x, int bf16) {
    if (bf16) {
        __nv_bfloat16 h = __float2bfloat16(x);
        return *(uint16_t *)&h;
    }
    __half h = __float2half(x);
    return *(uint16_t *)&h;
}
static float h2f(uint16_t u, int bf16) {
    if (bf16) {
        __nv_bfloat16 h;
        memcpy(&h, &u, 2);
        return __bfloat162float(h);
    }
    __half h;
    memcpy(&h, &u, 2);
    return __half2float(h);
}

/* ---- float64 reference kernels ------------------------------------------------------------------------ */
struct Ref {
    int B, H, Hkv, Sq, Sk, D, bf16, causal;
    double scale, softcap, p_drop;
    uint64_t seed, offset;
    const uint16_t *q, *k, *v, *dout, *out_t; /* dtype inputs, contiguous */
    const uint8_t *mask;
    int64_t ms[4];
    int mhdiv;
    const uint16_t *bias;
    int64_t bs[4];
    int bhdiv;
};

__device__ double ld(const uint16_t *p, int64_t i, int bf16) {
    uint16_t u = p[i];
    if (bf16) return (double)__bfloat162float(*(__nv_bfloat16 *)&u);
    return (double)__half2float(*(__half *)&u);
}

__device__ void ref_scores(const Ref &r, int b, int h, int64_t i, int64_t j, double *x, double *spre, int *vis) {
    const int g = r.H / r.Hkv, hk = h / g;
    double s = 0;
    for (int d = 0; d < r.D; d++)
        s += ld(r.q, ((b * (int64_t)r.Sq + i) * r.H + h) * r.D + d, r.bf16) *
             ld(r.k, ((b * (int64_t)r.Sk + j) * r.Hkv + hk) * r.D + d, r.bf16);
    s *= r.scale;
    *spre = s;
    if (r.softcap > 0) s = r.softcap * tanh(s / r.softcap);
    int v = 1;
    if (r.causal && j > i + r.Sk - r.Sq) v = 0;
    if (v && r.mask) v = r.mask[b * r.ms[0] + (h / r.mhdiv) * r.ms[1] + i * r.ms[2] + j * r.ms[3]] != 0;
    if (r.bias) s += ld(r.bias, b * r.bs[0] + (h / r.bhdiv) * r.bs[1] + i * r.bs[2] + j * r.bs[3], r.bf16);
    if (isinf(s) && s < 0) v = 0;
    *x = s;
    *vis = v;
}

__device__ double ref_z(const Ref &r, int b, int h, int64_t i, int64_t j) {
    if (r.p_drop <= 0) return 1.0;
    const uint64_t row = ((uint64_t)b * r.H + h) * r.Sq + i;
    return fdma_dropout_keep_bit(r.seed, r.offset, row, j, fdma_dropout_threshold((float)r.p_drop)) / (1.0 - r.p_drop);
}

/* forward: P (B,H,Sq,Sk), out (B,Sq,H,D), lse (B,H,Sq) */
__global__ void ref_fwd(Ref r, double *P, double *out, double *lse) {
    const int64_t row = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (int64_t)r.B * r.H * r.Sq) return;
    const int64_t i = row % r.Sq;
    const int h = (int)((row / r.Sq) % r.H), b = (int)(row / ((int64_t)r.Sq * r.H));
    const int hk = h / (r.H / r.Hkv);
    double mx = -INFINITY;
    for (int64_t j = 0; j < r.Sk; j++) {
        double x, sp;
        int v;
        ref_scores(r, b, h, i, j, &x, &sp, &v);
        P[row * r.Sk + j] = v ? x : -INFINITY;
        if (v && x > mx) mx = x;
    }
    double l = 0;
    if (mx > -INFINITY)
        for (int64_t j = 0; j < r.Sk; j++) l += exp(P[row * r.Sk + j] - mx);
    const double L = mx > -INFINITY ? mx + log(l) : -INFINITY;
    lse[row] = L;
    double o[256];
    for (int d = 0; d < r.D; d++) o[d] = 0;
    for (int64_t j = 0; j < r.Sk; j++) {
        const double p = L > -INFINITY ? exp(P[row * r.Sk + j] - L) : 0.0;
        P[row * r.Sk + j] = p;
        const double pz = p * ref_z(r, b, h, i, j);
        if (pz != 0)
            for (int d = 0; d < r.D; d++) o[d] += pz * ld(r.v, ((b * (int64_t)r.Sk + j) * r.Hkv + hk) * r.D + d, r.bf16);
    }
    for (int d = 0; d < r.D; d++) out[((b * (int64_t)r.Sq + i) * r.H + h) * r.D + d] = o[d];
}

/* backward per row: DS (dbias), DSC (dS after softcap), PD (p z / (1-p)), dq */
__global__ void ref_bwd_rows(Ref r, const double *P, double *DS, double *DSC, double *PD, double *dq) {
    const int64_t row = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (int64_t)r.B * r.H * r.Sq) return;
    const int64_t i = row % r.Sq;
    const int h = (int)((row / r.Sq) % r.H), b = (int)(row / ((int64_t)r.Sq * r.H));
    const int hk = h / (r.H / r.Hkv);
    const int64_t qo = ((b * (int64_t)r.Sq + i) * r.H + h) * r.D;
    double Di = 0;
    for (int d = 0; d < r.D; d++) Di += ld(r.dout, qo + d, r.bf16) * ld(r.out_t, qo + d, r.bf16);
    double a[256];
    for (int d = 0; d < r.D; d++) a[d] = 0;
    for (int64_t j = 0; j < r.Sk; j++) {
        const int64_t e = row * r.Sk + j;
        const double p = P[e];
        if (p == 0) {
            DS[e] = DSC[e] = PD[e] = 0;
            continue;
        }
        const int64_t ko = ((b * (int64_t)r.Sk + j) * r.Hkv + hk) * r.D;
        double dp = 0;
        for (int d = 0; d < r.D; d++) dp += ld(r.dout, qo + d, r.bf16) * ld(r.v, ko + d, r.bf16);
        const double z = ref_z(r, b, h, i, j);
        const double ds = p * (dp * z - Di);
        double dsc = ds;
        if (r.softcap > 0) {
            double x, sp;
            int v;
            ref_scores(r, b, h, i, j, &x, &sp, &v);
            const double t = tanh(sp / r.softcap);
            dsc = ds * (1 - t * t);
        }
        DS[e] = ds;
        DSC[e] = dsc;
        PD[e] = p * z;
        for (int d = 0; d < r.D; d++) a[d] += dsc * ld(r.k, ko + d, r.bf16);
    }
    for (int d = 0; d < r.D; d++) dq[qo + d] = r.scale * a[d];
}

/* dk, dv: one thread per (b, j, hkv, d) */
__global__ void ref_bwd_kv(Ref r, const double *DSC, const double *PD, double *dk, double *dv) {
    const int64_t x = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= (int64_t)r.B * r.Sk * r.Hkv * r.D) return;
    const int d = (int)(x % r.D);
    const int hk = (int)((x / r.D) % r.Hkv);
    const int64_t j = (x / ((int64_t)r.D * r.Hkv)) % r.Sk;
    const int b = (int)(x / ((int64_t)r.D * r.Hkv * r.Sk));
    const int g = r.H / r.Hkv;
    double sk = 0, sv = 0;
    for (int h = hk * g; h < hk * g + g; h++)
        for (int64_t i = 0; i < r.Sq; i++) {
            const int64_t e = (((int64_t)b * r.H + h) * r.Sq + i) * r.Sk + j;
            const int64_t qo = ((b * (int64_t)r.Sq + i) * r.H + h) * r.D + d;
            if (DSC[e] != 0) sk += DSC[e] * ld(r.q, qo, r.bf16);
            if (PD[e] != 0) sv += PD[e] * ld(r.dout, qo, r.bf16);
        }
    dk[x] = r.scale * sk;
    dv[x] = sv;
}

/* dbias in the bias dims (d0, d1, d2, Sk): sum of DS over the broadcast dims */
__global__ void ref_dbias(Ref r, const double *DS, int64_t d0, int64_t d1, int64_t d2, double *db) {
    const int64_t x = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= d0 * d1 * d2 * r.Sk) return;
    const int64_t j = x % r.Sk, e2 = (x / r.Sk) % d2, e1 = (x / (r.Sk * d2)) % d1, e0 = x / (r.Sk * d2 * d1);
    const int g = r.H / r.Hkv;
    double s = 0;
    for (int b = 0; b < r.B; b++) {
        if (d0 != 1 && b != e0) continue;
        for (int h = 0; h < r.H; h++) {
            const int64_t hx = d1 == r.H ? h : d1 == 1 ? 0 : h / g;
            if (hx != e1) continue;
            for (int64_t i = 0; i < r.Sq; i++) {
                if (d2 != 1 && i != e2) continue;
                s += DS[(((int64_t)b * r.H + h) * r.Sq + i) * r.Sk + j];
            }
        }
    }
    db[x] = s;
}

/* ---- one test case -------------------------------------------------------------------------------------- */
struct Case {
    const char *name;
    int bf16, B, H, Hkv, Sq, Sk, D, causal;
    int mdim[4]; /* mask dims as codes: 0 = absent; per dim: 1 = size 1, 2 = full (B / H / Sq), 3 = Hkv (dim 1) */
    int bdim[4]; /* bias dims, same codes */
    float softcap, p_drop;
    int det, masked_rows, qpad; /* masked_rows: 1 = every 7th row fully masked, 2 = every other 64-row block */
    int nodb;                   /* bias without dbias (dbias NULL: the kernels' DBIAS_NONE mode) */
    int rpad;                   /* mask, bias and dbias rows at a pitch of Sk rounded up to 16 (views of wider rows;
                                   the dbias padding must stay poisoned) */
    int mval;                   /* True mask bytes are random in 1..255 (nonzero = attend), not 1 */
};

static int64_t dim_of(int code, int which, const Case &c) {
    if (code == 1) return 1;
    if (which == 0) return c.B;
    if (which == 1) return code == 3 ? c.Hkv : c.H;
    if (which == 2) return c.Sq;
    return c.Sk;
}

struct Err {
    double maxerr, maxref;
    long nan;
};

static Err compare(const std::vector<uint16_t> &x, const std::vector<double> &ref, int bf16, int64_t n,
                   int64_t stride_rows, int D, int64_t ld_x) {
    /* x rows of D elements at row stride ld_x; ref contiguous rows of D */
    Err e = {0, 0, 0};
    for (int64_t r = 0; r < n / D; r++)
        for (int d = 0; d < D; d++) {
            const double xv = h2f(x[r * ld_x + d], bf16), rv = ref[r * D + d];
            if (isnan(xv)) {
                e.nan++;
                continue;
            }
            e.maxerr = std::max(e.maxerr, fabs(xv - rv));
            e.maxref = std::max(e.maxref, fabs(rv));
        }
    (void)stride_rows;
    return e;
}

template <typename V> static V *dalloc(size_t n) {
    V *p = nullptr;
    CK(cudaMalloc(&p, std::max(n, (size_t)1) * sizeof(V)));
    return p;
}

static int g_wgmma_runs = 0;        /* cases whose plan ran a wgmma kernel */
static bool g_expect_no_wgmma = false; /* set for the FDMA_BWD_WGMMA=0 re-run */

static int run_case(const Case &c, int *n_fail) {
    const int bf16 = c.bf16, B = c.B, H = c.H, Hkv = c.Hkv, Sq = c.Sq, Sk = c.Sk, D = c.D;
    const int Dq = D + (c.qpad ? 8 : 0); /* q and dq rows padded: non-contiguous head/seq strides */
    const int64_t nq = (int64_t)B * Sq * H * D, nk = (int64_t)B * Sk * Hkv * D;
    const int64_t nqp = (int64_t)B * Sq * H * Dq;
    const double scale = 1.0 / sqrt((double)D);
    std::vector<uint16_t> hq(nqp, 0), hk(nk), hv(nk), hdo(nq);
    for (int64_t r = 0; r < nq / D; r++)
        for (int d = 0; d < D; d++) hq[r * Dq + d] = f2h((float)nrand(), bf16);
    for (auto &x : hk) x = f2h((float)nrand(), bf16);
    for (auto &x : hv) x = f2h((float)nrand(), bf16);
    for (auto &x : hdo) x = f2h((float)nrand(), bf16);
    std::vector<uint16_t> hq_c(nq); /* contiguous copy for the reference */
    for (int64_t r = 0; r < nq / D; r++)
        for (int d = 0; d < D; d++) hq_c[r * D + d] = hq[r * Dq + d];

    int64_t md[4] = {0, 0, 0, 0}, bd[4] = {0, 0, 0, 0}, mst[4], bst[4];
    std::vector<uint8_t> hm;
    std::vector<uint16_t> hb;
    const int has_mask = c.mdim[0] != 0, has_bias = c.bdim[0] != 0, has_db = has_bias && !c.nodb;
    const int64_t pitch = c.rpad ? (Sk + 15) / 16 * 16 : Sk; /* row pitch of mask, bias and dbias */
    if (has_mask) {
        for (int x = 0; x < 4; x++) md[x] = dim_of(c.mdim[x], x, c);
        hm.resize(md[0] * md[1] * md[2] * pitch);
        for (auto &x : hm) x = urand() < 0.7 ? (c.mval ? (uint8_t)(1 + urand() * 254.999) : 1) : 0;
        if (c.masked_rows && md[2] > 1) /* every 7th row, or every other block of 64 rows, fully masked */
            for (int64_t a0 = 0; a0 < md[0] * md[1]; a0++)
                for (int64_t i = 0; i < md[2]; i++)
                    if (c.masked_rows == 1 ? i % 7 == 0 : (i / 64) % 2 == 1)
                        for (int64_t j = 0; j < md[3]; j++) hm[(a0 * md[2] + i) * pitch + j] = 0;
        mst[3] = 1;
        mst[2] = pitch;
        mst[1] = md[2] * pitch;
        mst[0] = md[1] * md[2] * pitch;
    }
    if (has_bias) {
        for (int x = 0; x < 4; x++) bd[x] = dim_of(c.bdim[x], x, c);
        hb.resize(bd[0] * bd[1] * bd[2] * pitch);
        for (auto &x : hb) x = f2h((float)nrand(), bf16);
        bst[3] = 1;
        bst[2] = pitch;
        bst[1] = bd[2] * pitch;
        bst[0] = bd[1] * bd[2] * pitch;
    }
    const int64_t nb = has_bias ? (int64_t)hb.size() : 0;  /* bias and dbias buffers, padding included */
    const int64_t nbr = has_bias ? bd[0] * bd[1] * bd[2] * Sk : 0; /* the reference dbias, contiguous */

    uint16_t *q = dalloc<uint16_t>(nqp), *qc = dalloc<uint16_t>(nq), *k = dalloc<uint16_t>(nk),
             *v = dalloc<uint16_t>(nk), *dout = dalloc<uint16_t>(nq), *out = dalloc<uint16_t>(nq);
    uint16_t *dq = dalloc<uint16_t>(nqp), *dk = dalloc<uint16_t>(nk), *dv = dalloc<uint16_t>(nk);
    uint8_t *mask = has_mask ? dalloc<uint8_t>(hm.size()) : nullptr;
    uint16_t *bias = has_bias ? dalloc<uint16_t>(nb) : nullptr, *dbias = has_bias ? dalloc<uint16_t>(nb) : nullptr;
    float *lse = dalloc<float>((size_t)B * H * Sq);
    CK(cudaMemcpy(q, hq.data(), nqp * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(qc, hq_c.data(), nq * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(k, hk.data(), nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(v, hv.data(), nk * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dout, hdo.data(), nq * 2, cudaMemcpyHostToDevice));
    if (has_mask) CK(cudaMemcpy(mask, hm.data(), hm.size(), cudaMemcpyHostToDevice));
    if (has_bias) CK(cudaMemcpy(bias, hb.data(), nb * 2, cudaMemcpyHostToDevice));

    /* reference forward */
    Ref r;
    memset(&r, 0, sizeof(r));
    r.B = B; r.H = H; r.Hkv = Hkv; r.Sq = Sq; r.Sk = Sk; r.D = D; r.bf16 = bf16; r.causal = c.causal;
    r.scale = scale; r.softcap = c.softcap; r.p_drop = c.p_drop; r.seed = 0x1234567890abcdefull; r.offset = 7;
    r.q = qc; r.k = k; r.v = v; r.dout = dout; r.out_t = out;
    const int g = H / Hkv;
    if (has_mask) {
        r.mask = mask;
        for (int x = 0; x < 4; x++) r.ms[x] = md[x] == 1 ? 0 : mst[x];
        r.mhdiv = (md[1] == H || md[1] == 1) ? 1 : g;
    }
    if (has_bias) {
        r.bias = bias;
        for (int x = 0; x < 4; x++) r.bs[x] = bd[x] == 1 ? 0 : bst[x];
        r.bhdiv = (bd[1] == H || bd[1] == 1) ? 1 : g;
    }
    const int64_t nP = (int64_t)B * H * Sq * Sk, rows = (int64_t)B * H * Sq;
    double *P = dalloc<double>(nP), *DS = dalloc<double>(nP), *DSC = dalloc<double>(nP), *PD = dalloc<double>(nP);
    double *rout = dalloc<double>(nq), *rlse = dalloc<double>(rows), *rdq = dalloc<double>(nq),
           *rdk = dalloc<double>(nk), *rdv = dalloc<double>(nk), *rdb = dalloc<double>(std::max<int64_t>(nbr, 1));
    ref_fwd<<<(unsigned)((rows + 127) / 128), 128>>>(r, P, rout, rlse);
    CK(cudaGetLastError());
    std::vector<double> hout(nq), hlse(rows);
    CK(cudaMemcpy(hout.data(), rout, nq * 8, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hlse.data(), rlse, rows * 8, cudaMemcpyDeviceToHost));
    std::vector<uint16_t> hout_t(nq);
    std::vector<float> hlse_f(rows);
    for (int64_t x = 0; x < nq; x++) hout_t[x] = f2h((float)hout[x], bf16);
    for (int64_t x = 0; x < rows; x++) hlse_f[x] = (float)hlse[x];
    CK(cudaMemcpy(out, hout_t.data(), nq * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(lse, hlse_f.data(), rows * 4, cudaMemcpyHostToDevice));
    ref_bwd_rows<<<(unsigned)((rows + 127) / 128), 128>>>(r, P, DS, DSC, PD, rdq);
    CK(cudaGetLastError());
    ref_bwd_kv<<<(unsigned)((nk + 127) / 128), 128>>>(r, DSC, PD, rdk, rdv);
    CK(cudaGetLastError());
    if (has_bias) {
        ref_dbias<<<(unsigned)((nbr + 127) / 128), 128>>>(r, DS, bd[0], bd[1], bd[2], rdb);
        CK(cudaGetLastError());
    }
    CK(cudaDeviceSynchronize());

    /* params for the kernel under test */
    fdma_params p;
    memset(&p, 0, sizeof(p));
    p.device = FDMA_DEVICE_CUDA;
    p.dtype = bf16 ? FDMA_DTYPE_BF16 : FDMA_DTYPE_F16;
    p.B = B; p.Sq = Sq; p.Sk = Sk; p.H = H; p.Hkv = Hkv; p.D = D;
    auto strides = [](int64_t *s, int64_t n1, int64_t n2, int64_t n3) {
        s[3] = 1; s[2] = n3; s[1] = n2 * n3; s[0] = n1 * n2 * n3;
    };
    p.q = q; strides(p.q_stride, Sq, H, Dq);
    p.k = k; strides(p.k_stride, Sk, Hkv, D);
    p.v = v; strides(p.v_stride, Sk, Hkv, D);
    p.out = out; strides(p.out_stride, Sq, H, D);
    p.dout = dout; strides(p.dout_stride, Sq, H, D);
    p.dq = dq; strides(p.dq_stride, Sq, H, Dq);
    p.dk = dk; strides(p.dk_stride, Sk, Hkv, D);
    p.dv = dv; strides(p.dv_stride, Sk, Hkv, D);
    p.lse = lse;
    if (has_mask) {
        p.mask.ptr = mask;
        for (int x = 0; x < 4; x++) { p.mask.dim[x] = md[x]; p.mask.stride[x] = mst[x]; }
    }
    if (has_bias) {
        p.bias.ptr = bias;
        for (int x = 0; x < 4; x++) { p.bias.dim[x] = bd[x]; p.bias.stride[x] = bst[x]; p.dbias_stride[x] = bst[x]; }
        p.dbias = has_db ? dbias : nullptr;
    }
    p.scale = (float)scale;
    p.softcap = c.softcap;
    p.causal = c.causal;
    p.p_drop = c.p_drop;
    p.seed = r.seed;
    p.offset = r.offset;
    p.deterministic = c.det;
    fdma_plan plan;
    memset(&plan, 0, sizeof(plan));
    fdma_status stt = fdma_cuda_bwd_plan(&p, &plan);
    if (stt != FDMA_STATUS_OK) {
        printf("FAIL %-28s plan: %s\n", c.name, g_err);
        (*n_fail)++;
        return 1;
    }
    void *ws = nullptr;
    if (plan.workspace_bytes) CK(cudaMalloc(&ws, plan.workspace_bytes));
    p.workspace = ws;
    p.workspace_bytes = plan.workspace_bytes;

    const int runs = c.det ? 5 : 1;
    std::vector<uint16_t> r_dq(nqp), r_dk(nk), r_dv(nk), r_db(nb), f_dq, f_dk, f_dv, f_db;
    int bitwise = 1;
    for (int run = 0; run < runs; run++) {
        CK(cudaMemset(dq, 0xff, nqp * 2));
        CK(cudaMemset(dk, 0xff, nk * 2));
        CK(cudaMemset(dv, 0xff, nk * 2));
        if (has_bias) CK(cudaMemset(dbias, 0xff, nb * 2));
        if (ws) CK(cudaMemset(ws, 0xff, plan.workspace_bytes)); /* the kernels must not rely on zeroed scratch */
        stt = fdma_cuda_bwd_run(&p, &plan);
        CK(cudaDeviceSynchronize());
        if (stt != FDMA_STATUS_OK) {
            printf("FAIL %-28s run: %s\n", c.name, g_err);
            (*n_fail)++;
            return 1;
        }
        CK(cudaMemcpy(r_dq.data(), dq, nqp * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(r_dk.data(), dk, nk * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(r_dv.data(), dv, nk * 2, cudaMemcpyDeviceToHost));
        if (has_db) CK(cudaMemcpy(r_db.data(), dbias, nb * 2, cudaMemcpyDeviceToHost));
        if (run == 0) {
            f_dq = r_dq; f_dk = r_dk; f_dv = r_dv; f_db = r_db;
        } else if (r_dq != f_dq || r_dk != f_dk || r_dv != f_dv || r_db != f_db) {
            bitwise = 0;
        }
    }
    std::vector<double> e_dq(nq), e_dk(nk), e_dv(nk), e_db(nbr);
    CK(cudaMemcpy(e_dq.data(), rdq, nq * 8, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(e_dk.data(), rdk, nk * 8, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(e_dv.data(), rdv, nk * 8, cudaMemcpyDeviceToHost));
    if (has_bias) CK(cudaMemcpy(e_db.data(), rdb, nbr * 8, cudaMemcpyDeviceToHost));
    Err E[4];
    E[0] = compare(f_dq, e_dq, bf16, nq, 0, D, Dq);
    E[1] = compare(f_dk, e_dk, bf16, nk, 0, D, D);
    E[2] = compare(f_dv, e_dv, bf16, nk, 0, D, D);
    E[3] = has_db ? compare(f_db, e_db, bf16, nbr, 0, (int)Sk, pitch) : Err{0, 0, 0};
    long pad_written = 0; /* dbias row padding (rpad) is no part of the view: it must keep its poison */
    if (has_db)
        for (int64_t rr = 0; rr < nbr / Sk; rr++)
            for (int64_t j = Sk; j < pitch; j++) pad_written += f_db[rr * pitch + j] != 0xffff;
    const double tol = bf16 ? 2e-2 : 1e-2;
    int ok = bitwise && !pad_written;
    double rel[4];
    for (int x = 0; x < 4; x++) {
        rel[x] = E[x].maxerr / std::max(E[x].maxref, 1e-30);
        if (E[x].maxref == 0) rel[x] = E[x].maxerr;
        if (E[x].nan || rel[x] > tol) ok = 0;
    }
    /* which kernel ran: the FDMA_BWD_WGMMA=0 re-run must not reach the wgmma kernels (else it tests nothing new) */
    const bool wg = strstr(plan.name, "_wgmma") != nullptr;
    g_wgmma_runs += wg;
    if (wg && g_expect_no_wgmma) {
        printf("FAIL %-28s plan %s with FDMA_BWD_WGMMA=0\n", c.name, plan.name);
        ok = 0;
    }
    printf("%s %-30s %-40s dq %.2e dk %.2e dv %.2e dbias %.2e  nan %ld/%ld/%ld/%ld%s", ok ? "ok  " : "FAIL", c.name,
           plan.name, rel[0], rel[1], rel[2], has_db ? rel[3] : 0.0, E[0].nan, E[1].nan, E[2].nan, E[3].nan,
           c.det ? (bitwise ? "  bitwise x5" : "  NOT BITWISE") : "");
    if (pad_written) printf("  dbias padding written: %ld", pad_written);
    printf("\n");
    if (!ok) (*n_fail)++;
    cudaFree(q); cudaFree(qc); cudaFree(k); cudaFree(v); cudaFree(dout); cudaFree(out); cudaFree(dq); cudaFree(dk);
    cudaFree(dv); cudaFree(mask); cudaFree(bias); cudaFree(dbias); cudaFree(lse); cudaFree(P); cudaFree(DS);
    cudaFree(DSC); cudaFree(PD); cudaFree(rout); cudaFree(rlse); cudaFree(rdq); cudaFree(rdk); cudaFree(rdv);
    cudaFree(rdb); cudaFree(ws);
    return ok ? 0 : 1;
}

/* ---- benchmark ---------------------------------------------------------------------------------------- */
__global__ void fill_normal(uint16_t *p, int64_t n, uint64_t seed, int bf16, float mul) {
    const int64_t x = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= n) return;
    uint32_t w[4];
    fdma_dropout_words(seed, 0, (uint64_t)x, 0, w);
    const float u1 = (w[0] + 0.5f) * 2.3283064e-10f, u2 = w[1] * 2.3283064e-10f;
    const float z = sqrtf(-2.f * logf(u1)) * cosf(6.2831853f * u2) * mul;
    if (bf16) {
        __nv_bfloat16 h = __float2bfloat16(z);
        p[x] = *(uint16_t *)&h;
    } else {
        __half h = __float2half(z);
        p[x] = *(uint16_t *)&h;
    }
}
__global__ void fill_const(float *p, int64_t n, float v) {
    const int64_t x = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x < n) p[x] = v;
}
/* keep mask: each byte 1 with probability keep, else 0 */
__global__ void fill_mask(uint8_t *p, int64_t n, uint64_t seed, float keep) {
    const int64_t x = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= n) return;
    uint32_t w[4];
    fdma_dropout_words(seed, 0, (uint64_t)x, 0, w);
    p[x] = w[0] * 2.3283064e-10f < keep;
}

/* with_bias: 0 none, 1 per-key (B, Hkv, 1, Sk) + dbias (ACC_ROWS), 2 full (B, H, Sq, Sk) + dbias (DIRECT), 3 W2:
 * bias (B, Hkv, Sq, Sk) + dbias (ACC) with a keep mask (B, Hkv, Sq, Sk) of ~25% random True, 4 W2 without dbias */
static void bench(int Sk, int with_bias, int det) {
    const int B = 1, H = 16, Hkv = 4, D = 128, Sq = Sk, bf16 = 1;
    const int w2 = with_bias >= 3;
    const int64_t nq = (int64_t)B * Sq * H * D, nk = (int64_t)B * Sk * Hkv * D;
    const int64_t nb = (int64_t)B * (with_bias == 2 ? H : Hkv) * (with_bias >= 2 ? Sq : 1) * Sk;
    uint16_t *q = dalloc<uint16_t>(nq), *k = dalloc<uint16_t>(nk), *v = dalloc<uint16_t>(nk),
             *out = dalloc<uint16_t>(nq), *dout = dalloc<uint16_t>(nq), *dq = dalloc<uint16_t>(nq),
             *dk = dalloc<uint16_t>(nk), *dv = dalloc<uint16_t>(nk), *bias = dalloc<uint16_t>(nb),
             *dbias = dalloc<uint16_t>(with_bias == 4 ? 0 : nb);
    uint8_t *mask = w2 ? dalloc<uint8_t>(nb) : nullptr;
    float *lse = dalloc<float>((size_t)B * H * Sq);
    uint16_t *bufs[] = {q, k, v, out, dout, bias};
    int64_t ns[] = {nq, nk, nk, nq, nq, nb};
    for (int x = 0; x < 6; x++) fill_normal<<<(unsigned)((ns[x] + 255) / 256), 256>>>(bufs[x], ns[x], 100 + x, bf16, 1.f);
    if (w2) fill_mask<<<(unsigned)((nb + 255) / 256), 256>>>(mask, nb, 200, 0.25f);
    fill_const<<<(unsigned)((B * H * Sq + 255) / 256), 256>>>(lse, (int64_t)B * H * Sq, 12.f);
    CK(cudaGetLastError());
    fdma_params p;
    memset(&p, 0, sizeof(p));
    p.device = FDMA_DEVICE_CUDA;
    p.dtype = FDMA_DTYPE_BF16;
    p.B = B; p.Sq = Sq; p.Sk = Sk; p.H = H; p.Hkv = Hkv; p.D = D;
    auto strides = [](int64_t *s, int64_t n1, int64_t n2, int64_t n3) {
        s[3] = 1; s[2] = n3; s[1] = n2 * n3; s[0] = n1 * n2 * n3;
    };
    p.q = q; strides(p.q_stride, Sq, H, D);
    p.k = k; strides(p.k_stride, Sk, Hkv, D);
    p.v = v; strides(p.v_stride, Sk, Hkv, D);
    p.out = out; strides(p.out_stride, Sq, H, D);
    p.dout = dout; strides(p.dout_stride, Sq, H, D);
    p.dq = dq; strides(p.dq_stride, Sq, H, D);
    p.dk = dk; strides(p.dk_stride, Sk, Hkv, D);
    p.dv = dv; strides(p.dv_stride, Sk, Hkv, D);
    p.lse = lse;
    p.scale = 1.f / sqrtf((float)D);
    p.causal = 1;
    p.deterministic = det;
    if (with_bias) {
        p.bias.ptr = bias;
        const int64_t bh = with_bias == 2 ? H : Hkv, b2 = with_bias == 1 ? 1 : Sq;
        p.bias.dim[0] = B; p.bias.dim[1] = bh; p.bias.dim[2] = b2; p.bias.dim[3] = Sk;
        strides(p.bias.stride, bh, b2, Sk);
        p.dbias = with_bias == 4 ? nullptr : dbias;
        for (int x = 0; x < 4; x++) p.dbias_stride[x] = p.bias.stride[x];
    }
    if (w2) {
        p.mask.ptr = mask;
        for (int x = 0; x < 4; x++) { p.mask.dim[x] = p.bias.dim[x]; p.mask.stride[x] = p.bias.stride[x]; }
    }
    fdma_plan plan;
    if (fdma_cuda_bwd_plan(&p, &plan) != FDMA_STATUS_OK) {
        printf("bench plan failed: %s\n", g_err);
        return;
    }
    void *ws = nullptr;
    CK(cudaMalloc(&ws, plan.workspace_bytes));
    p.workspace = ws;
    p.workspace_bytes = plan.workspace_bytes;
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int x = 0; x < 3; x++)
        if (fdma_cuda_bwd_run(&p, &plan) != FDMA_STATUS_OK) { printf("bench run failed: %s\n", g_err); return; }
    std::vector<float> ms;
    for (int x = 0; x < 20; x++) {
        CK(cudaEventRecord(e0));
        fdma_cuda_bwd_run(&p, &plan);
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float t;
        CK(cudaEventElapsedTime(&t, e0, e1));
        ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    const double med = ms[ms.size() / 2];
    const double flops = 2.5 * 4.0 * B * H * (double)Sq * Sk * D / 2.0;
    const char *label[] = {"no bias", "bias(B,Hkv,1,Sk)+dbias", "bias(B,H,Sq,Sk)+dbias", "W2 mask+bias+dbias",
                           "W2 mask+bias, no dbias"};
    printf("bench bwd B=1 H=16 Hkv=4 D=128 causal Sq=Sk=%-6d %-22s %-40s median %8.3f ms (min %.3f)  %6.1f TFLOP/s\n",
           Sk, label[with_bias], plan.name, med, ms[0], flops / med * 1e-9);
    cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(out); cudaFree(dout); cudaFree(dq); cudaFree(dk); cudaFree(dv);
    cudaFree(bias); cudaFree(dbias); cudaFree(mask); cudaFree(lse); cudaFree(ws);
}

int main(int argc, char **argv) {
    const int small = argc > 1 && !strcmp(argv[1], "--small");
    if (argc > 1 && !strcmp(argv[1], "--bench")) {
        for (int Sk : {4096, 16384})
            for (int wb = 0; wb < 5; wb++) bench(Sk, wb, 0);
        bench(16384, 0, 1);
        setenv("FDMA_BWD_WGMMA", "0", 1); /* the mma.sync dense kernel, for comparison */
        bench(4096, 0, 0);
        bench(16384, 0, 0);
        unsetenv("FDMA_BWD_WGMMA");
        return 0;
    }
    /*                 name                  bf16 B  H Hkv  Sq    Sk    D  causal mask dims      bias dims   softcap pdrop det mrows qpad */
    const Case all[] = {
        {"dense d64 bf16",                   1, 2, 4, 4,  113,  257,  64, 0, {0,0,0,0}, {0,0,0,0}, 0, 0, 0, 0, 0},
        {"dense d128 f16",                   0, 1, 2, 2,  113,  257, 128, 0, {0,0,0,0}, {0,0,0,0}, 0, 0, 0, 0, 0},
        {"Sq=1 Sk=4095 d128",                1, 1, 8, 1,    1, 4095, 128, 0, {0,0,0,0}, {2,3,1,2}, 0, 0, 0, 0, 0},
        {"Sq=17 Sk=1 d64",                   1, 2, 4, 2,   17,    1,  64, 0, {0,0,0,0}, {2,2,2,2}, 0, 0, 0, 0, 0},
        {"causal Sq<Sk d40",                 1, 1, 4, 2,  113, 1000,  40, 1, {0,0,0,0}, {0,0,0,0}, 0, 0, 0, 0, 0},
        {"causal Sq>Sk d128 f16",            0, 1, 4, 4, 1000,  113, 128, 1, {0,0,0,0}, {2,2,2,2}, 0, 0, 0, 0, 0},
        {"causal Sq=Sk=1000 gqa8 d128",      1, 1, 8, 1, 1000, 1000, 128, 1, {0,0,0,0}, {0,0,0,0}, 0, 0, 0, 0, 0},
        {"d256 causal",                      1, 1, 2, 1,  257,  300, 256, 1, {0,0,0,0}, {2,2,2,2}, 0, 0, 0, 0, 0},
        {"d256 f16 mask",                    0, 2, 2, 2,  113,  129, 256, 0, {2,1,2,2}, {0,0,0,0}, 0, 0, 0, 1, 0},
        {"d192 gqa",                         1, 1, 4, 2,   77,  200, 192, 0, {0,0,0,0}, {2,3,1,2}, 0, 0, 0, 0, 0},
        {"d8",                               1, 1, 2, 1,   50,   70,   8, 0, {0,0,0,0}, {0,0,0,0}, 0, 0, 0, 0, 0},
        {"mask B,Hkv,1,Sk bias B,Hkv,1,Sk",  1, 2, 8, 2,  113,  257, 128, 1, {2,3,1,2}, {2,3,1,2}, 0, 0, 0, 0, 0},
        {"bias B,H,Sq,Sk full + mask rows",  1, 2, 4, 2,  113,  257,  64, 0, {2,2,2,2}, {2,2,2,2}, 0, 0, 0, 1, 0},
        {"bias B,Hkv,Sq,Sk",                 1, 2, 8, 2,  113,  257,  64, 1, {0,0,0,0}, {2,3,2,2}, 0, 0, 0, 0, 0},
        {"bias B,1,Sq,Sk",                   1, 2, 4, 2,  113,  257,  64, 0, {0,0,0,0}, {2,1,2,2}, 0, 0, 0, 0, 0},
        {"bias 1,H,Sq,Sk",                   1, 3, 4, 2,  113,  257,  64, 1, {0,0,0,0}, {1,2,2,2}, 0, 0, 0, 0, 0},
        {"bias 1,1,Sq,Sk mask 1,1,Sq,Sk",    1, 2, 4, 2,  113,  257, 128, 0, {1,1,2,2}, {1,1,2,2}, 0, 0, 0, 1, 0},
        {"bias B,1,1,Sk",                    1, 2, 4, 2,  113,  257,  64, 1, {0,0,0,0}, {2,1,1,2}, 0, 0, 0, 0, 0},
        {"bias 1,1,1,Sk",                    1, 2, 4, 2,  113,  257,  64, 0, {0,0,0,0}, {1,1,1,2}, 0, 0, 0, 0, 0},
        {"bias B,H,1,Sk",                    1, 2, 4, 2,  113,  257,  64, 0, {0,0,0,0}, {2,2,1,2}, 0, 0, 0, 0, 0},
        {"bias 1,Hkv,1,Sk",                  1, 2, 8, 2,   17, 1000, 128, 1, {0,0,0,0}, {1,3,1,2}, 0, 0, 0, 0, 0},
        {"softcap bias",                     1, 1, 4, 2,  113,  257, 128, 1, {0,0,0,0}, {2,3,1,2}, 5, 0, 0, 0, 0},
        {"dropout",                          1, 1, 4, 2,  113,  257,  64, 0, {0,0,0,0}, {2,2,2,2}, 0, 0.2f, 0, 0, 0},
        {"dropout f16 causal gqa d128",      0, 1, 4, 1,  200,  150, 128, 1, {0,0,0,0}, {0,0,0,0}, 0, 0.1f, 0, 0, 0},
        {"det dense",                        1, 2, 4, 2,  113,  257, 128, 1, {0,0,0,0}, {0,0,0,0}, 0, 0, 1, 0, 0},
        {"det all features",                 1, 2, 8, 2,  113,  257,  64, 1, {2,1,2,2}, {1,1,2,2}, 3, 0.1f, 1, 1, 0},
        {"det per-key bias d128",            1, 1, 8, 2,  300,  500, 128, 1, {0,0,0,0}, {2,3,1,2}, 0, 0, 1, 0, 0},
        {"det d256 bias B,Hkv,Sq,Sk",        1, 1, 4, 2,  100,  130, 256, 0, {0,0,0,0}, {2,3,2,2}, 0, 0, 1, 0, 0},
        {"strided q/dq",                     1, 2, 4, 2,  113,  257,  64, 1, {0,0,0,0}, {0,0,0,0}, 0, 0, 0, 0, 1},
        {"long 4095 causal",                 1, 1, 2, 1, 4095, 4095, 128, 1, {0,0,0,0}, {2,3,1,2}, 0, 0, 0, 0, 0},
        {"long 4095 det",                    0, 1, 2, 2, 1000, 4095,  64, 0, {2,1,1,2}, {0,0,0,0}, 0, 0, 1, 0, 0},
        /* the dense kernel (bwd_dense.cuh): mask-only and mask + bias instantiations (masks with Sq rows), blocks of
           all-False tiles, DBIAS_NONE, long causal; the general kernel's skipped tiles with DIRECT dbias at d128 */
        {"mask B,1,Sq,Sk causal Sq>Sk gqa",  1, 2, 8, 2,  300,  257, 128, 1, {2,1,2,2}, {0,0,0,0}, 0, 0, 0, 1, 0},
        {"mask 1,H,Sq,Sk f16 causal Sq<Sk",  0, 1, 4, 4,   77,  500,  64, 1, {1,2,2,2}, {0,0,0,0}, 0, 0, 0, 0, 0},
        {"mask+bias f16 blocks masked",      0, 1, 4, 2,  333,  300,  64, 1, {2,2,2,2}, {2,2,2,2}, 0, 0, 0, 2, 0},
        {"mask+bias 1,1,Sq,Sk d40 blocks",   1, 2, 4, 2,  200,  333,  40, 0, {1,1,2,2}, {2,1,2,2}, 0, 0, 0, 2, 0},
        {"bias B,Hkv,Sq,Sk without dbias",   1, 1, 4, 2,  200,  300,  64, 1, {0,0,0,0}, {2,3,2,2}, 0, 0, 0, 0, 0, 1},
        {"mask+bias d128 (general kernel)",  0, 1, 4, 2,  333,  300, 128, 1, {2,2,2,2}, {2,2,2,2}, 0, 0, 0, 2, 0},
        {"causal 1030 f16 d128",             0, 1, 2, 2, 1030, 1030, 128, 1, {0,0,0,0}, {0,0,0,0}, 0, 0, 0, 0, 0},
        /* the dense kernel's KEY-BIAS instantiations (bias dim 2 == 1): ACC_ROWS dbias (GQA, batch and head
           broadcast), DIRECT (Sq = 1), no dbias, with a mask, padded D */
        {"kbias B,Hkv,1,Sk f16 causal Sq>Sk",0, 2, 8, 2,  300,  257, 128, 1, {0,0,0,0}, {2,3,1,2}, 0, 0, 0, 0, 0},
        {"kbias 1,1,1,Sk d120 causal Sq<Sk", 1, 2, 4, 2,   77,  500, 120, 1, {0,0,0,0}, {1,1,1,2}, 0, 0, 0, 0, 0},
        {"kbias B,H,1,Sk Sq=1 d96 DIRECT",   1, 2, 4, 2,    1,  300,  96, 1, {0,0,0,0}, {2,2,1,2}, 0, 0, 0, 0, 0},
        {"kbias B,H,1,Sk Sq=1 d64 f16",      0, 2, 4, 4,    1,  300,  64, 0, {0,0,0,0}, {2,2,1,2}, 0, 0, 0, 0, 0},
        {"mask B,H,Sq,Sk kbias 1,Hkv,1,Sk",  1, 2, 8, 2,  333,  300, 128, 1, {2,2,2,2}, {1,3,1,2}, 0, 0, 0, 2, 0},
        {"mask 1,H,Sq,Sk kbias B,1,1,Sk d64",0, 2, 4, 2,  150,  200,  64, 0, {1,2,2,2}, {2,1,1,2}, 0, 0, 0, 0, 0},
        {"kbias B,Hkv,1,Sk d128 without db", 1, 1, 4, 2,  200,  300, 128, 1, {0,0,0,0}, {2,3,1,2}, 0, 0, 0, 0, 0, 1},
        /* its staged full-bias instantiations (Sk a multiple of 8: 16-byte bias rows): DIRECT, ACC (batch / head
           broadcast; d128: summed from the staged dS^T tile), no dbias, with a mask, padded D */
        {"bias B,H,Sq,Sk d128 causal Sq<Sk", 1, 2, 4, 2,  113,  264, 128, 1, {0,0,0,0}, {2,2,2,2}, 0, 0, 0, 0, 0},
        {"mask+bias B,H,Sq,Sk d120 f16",     0, 1, 4, 2,  333,  296, 120, 1, {2,2,2,2}, {2,2,2,2}, 0, 0, 0, 2, 0},
        {"bias 1,1,Sq,Sk d128 ACC",          1, 2, 4, 2,  100,  256, 128, 0, {0,0,0,0}, {1,1,2,2}, 0, 0, 0, 0, 0},
        {"bias B,Hkv,Sq,Sk d64 ACC causal",  1, 1, 8, 2,   77,  200,  64, 1, {0,0,0,0}, {2,3,2,2}, 0, 0, 0, 0, 0},
        {"bias B,H,Sq,Sk d96 without db",    0, 1, 4, 4,  200,  320,  96, 1, {0,0,0,0}, {2,2,2,2}, 0, 0, 0, 0, 0, 1},
        {"mask 1,H,Sq,Sk bias 1,H,Sq,Sk d64",1, 2, 4, 2,  130,  136,  64, 0, {1,2,2,2}, {1,2,2,2}, 0, 0, 0, 1, 0},
        /* STAGED MASK (mask rows of 16-byte aligned contiguous bytes: Sk a multiple of 16, or a row pitch of one):
           folded into the staged bias tile, or a 0 / -inf tile without bias; ACC dbias by atomic reductions from a
           CTA per query head (GQA 4:1, batch / head broadcasts, d64 and d128), DIRECT, no dbias; fully masked rows,
           all-False tiles, empty causal rows (Sq > Sk), a partial last mask chunk (Sk = 301 in rows of 304: rpad),
           mask bytes other than 1 (mval) */
        {"smask+bias B,Hkv,Sq,Sk ACC gqa4",  1, 1, 8, 2,  320,  320, 128, 1, {2,3,2,2}, {2,3,2,2}, 0, 0, 0, 1, 0},
        {"smask+bias B,Hkv,Sq,Sk no db d96", 1, 1, 8, 2,  200,  336,  96, 1, {2,3,2,2}, {2,3,2,2}, 0, 0, 0, 2, 0, 1},
        {"smask+bias B,H,Sq,Sk DIRECT f16",  0, 2, 4, 2,  200,  336,  96, 0, {2,2,2,2}, {2,2,2,2}, 0, 0, 0, 2, 0},
        {"smask B,Hkv,Sq,Sk causal Sq>Sk",   1, 1, 8, 2,  336,  208, 128, 1, {2,3,2,2}, {0,0,0,0}, 0, 0, 0, 1, 0},
        {"smask 1,H,Sq,Sk f16 d64 blocks",   0, 2, 4, 2,  320,  320,  64, 1, {1,2,2,2}, {0,0,0,0}, 0, 0, 0, 2, 0},
        {"smask kbias B,Hkv,1,Sk ACC_ROWS",  1, 2, 8, 2,  320,  320, 128, 1, {2,3,2,2}, {2,3,1,2}, 0, 0, 0, 1, 0},
        {"smask+bias 1,1,Sq,Sk ACC d64",     1, 2, 4, 2,  200,  336,  64, 0, {1,1,2,2}, {1,1,2,2}, 0, 0, 0, 0, 0},
        {"smask+bias Sk=301/304 ACC mval",   1, 1, 4, 2,  150,  301, 128, 1, {2,3,2,2}, {2,3,2,2}, 0, 0, 0, 1, 0,
         0, 1, 1},
        {"smask+bias Sk=301/304 DIRECT d64", 0, 1, 4, 4,   77,  301,  64, 0, {2,2,2,2}, {2,2,2,2}, 0, 0, 0, 2, 0,
         0, 1, 1},
        /* masks the dense kernel reads per element (rows not 16-byte: Sk = 300, 328; row-broadcast), with ACC dbias
           by atomics; the deterministic general kernel over a stageable mask + ACC bias (owner loop, bitwise) */
        {"mask Sk=300 per element gqa4",     1, 1, 8, 2,  320,  300, 128, 1, {2,3,2,2}, {0,0,0,0}, 0, 0, 0, 1, 0},
        {"mask Sk=328 bias ACC f16",         0, 1, 8, 2,  200,  328, 128, 1, {2,3,2,2}, {2,3,2,2}, 0, 0, 0, 2, 0},
        {"mask B,Hkv,1,Sk bias Sq rows ACC", 1, 1, 8, 2,  200,  320, 128, 1, {2,3,1,2}, {2,3,2,2}, 0, 0, 0, 0, 0},
        {"det mask+bias B,Hkv,Sq,Sk d128",   1, 1, 8, 2,  200,  320, 128, 1, {2,3,2,2}, {2,3,2,2}, 0, 0, 1, 1, 0},
        /* plain calls at D in (64, 128]: bwd_wgmma.cu's kernel on a 9.0 device (plan suffix "_wgmma"; also the staged
           bias / mask cases above); main runs the D in (64, 128] cases again with FDMA_BWD_WGMMA=0 (mma.sync) */
        {"plain d96 causal Sq<Sk gqa4",      1, 2, 8, 2,  200,  333,  96, 1, {0,0,0,0}, {0,0,0,0}, 0, 0, 0, 0, 0},
        {"plain d128 causal Sq>Sk f16",      0, 1, 4, 4,  333,  130, 128, 1, {0,0,0,0}, {0,0,0,0}, 0, 0, 0, 0, 0},
        {"plain d128 Sq=1",                  1, 2, 4, 2,    1,  777, 128, 1, {0,0,0,0}, {0,0,0,0}, 0, 0, 0, 0, 0},
        {"plain d72 Sk=1 f16",               0, 1, 4, 1,   65,    1,  72, 0, {0,0,0,0}, {0,0,0,0}, 0, 0, 0, 0, 0},
        {"plain d128 causal 2100 gqa2",      1, 1, 4, 2, 2100, 2100, 128, 1, {0,0,0,0}, {0,0,0,0}, 0, 0, 0, 0, 0},
        {"plain d128 strided q/dq",          1, 2, 2, 2,  129,  191, 128, 0, {0,0,0,0}, {0,0,0,0}, 0, 0, 0, 0, 1},
    };
    const int idx_small[] = {0, 1, 3, 4, 12, 17, 22, 25, 38, 40, 46, 51, 58, 65};
    int n_fail = 0, n = 0;
    if (small) {
        for (int x : idx_small) { run_case(all[x], &n_fail); n++; }
    } else {
        for (const Case &c : all) { run_case(c, &n_fail); n++; }
    }
    /* the D in (64, 128] cases once more on the mma.sync kernels (the wgmma ones are the default on 9.0) */
    /* a 9.0 device must have run the wgmma kernels in the pass above (the plain D128 cases are theirs) when the
       build has them (bench/gpu_run.sh defines FDMA_HAVE_WGMMA for every object) */
#ifdef FDMA_HAVE_WGMMA
    const bool have_wgmma = true;
#else
    const bool have_wgmma = false;
#endif
    int dev = 0, major = 0, minor = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    if (!small && have_wgmma && major == 9 && minor == 0 && g_wgmma_runs == 0) {
        printf("FAIL no case ran a wgmma kernel on this compute capability 9.0 device\n");
        n_fail++;
    }
    setenv("FDMA_BWD_WGMMA", "0", 1);
    g_expect_no_wgmma = true;
    for (const Case &c : all)
        if (!small && c.D > 64 && c.D <= 128 && !c.det && c.p_drop == 0.f && c.softcap == 0.f) {
            run_case(c, &n_fail);
            n++;
        }
    unsetenv("FDMA_BWD_WGMMA");
    g_expect_no_wgmma = false;
    printf("%d/%d cases passed\n", n - n_fail, n);
    return n_fail ? 1 : 0;
}
