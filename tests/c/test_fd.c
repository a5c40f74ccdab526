/*
 * test_fd.c -- the library's fp32 backward (dq, dk, dv, dbias) against central finite differences of the
 * float64 reference forward (ref.c). Loss L = sum(out * W) with W the dout given to fdma_bwd, so that
 * dL/dx = the library's dx. Every element of q, k, v and the bias is perturbed by +-1e-6:
 *   fd(x) = (L(x + e) - L(x - e)) / 2e,   pass when max|grad - fd| <= 1e-4 (1 + max|fd|).
 * Covers every bias broadcast form ({B|1} x {H|Hkv|1} x {Sq|1}), causal, a fully masked row, softcap,
 * the top-k window and dropout.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tutil.h"

enum { FB = 2, FSQ = 4, FSK = 6, FH = 4, FHKV = 2, FD = 6 };

typedef struct fd_case {
    int bform;  /* d0*100 + d1*10 + d2: d0 0=B 1=one; d1 0=H 1=Hkv 2=one; d2 0=Sq 1=one */
    int causal, masked_row;
    double softcap, p_drop;
    int64_t window;
} fd_case;

static double loss(ref_params *rp, const double *W) {
    ref_result o;
    ref_attention(rp, &o);
    double L = 0.0;
    for (int64_t e = 0; e < FB * FSQ * FH * FD; e++) L += o.out[e] * W[e];
    ref_free(&o);
    return L;
}

static double fd_check(ref_params *rp, const double *W, double *x, int64_t n, const double *grad) {
    const double eps = 1e-6;
    double err = 0.0, mx = 0.0;
    for (int64_t e = 0; e < n; e++) {
        double x0 = x[e];
        x[e] = x0 + eps;
        double lp = loss(rp, W);
        x[e] = x0 - eps;
        double lm = loss(rp, W);
        x[e] = x0;
        double fd = (lp - lm) / (2 * eps);
        if (fabs(fd) > mx) mx = fabs(fd);
        double d = fabs(grad[e] - fd);
        if (!(d <= err)) err = isnan(d) ? INFINITY : d;
    }
    return err / (1e-4 * (1.0 + mx));
}

static void fd_run(const fd_case *c, int id) {
    t_seed(500 + (uint64_t)id);
    const int64_t nq = FB * FSQ * FH * FD, nk = FB * FSK * FHKV * FD;
    int64_t bdim[4] = {c->bform / 100 == 0 ? FB : 1, (c->bform / 10) % 10 == 0 ? FH : (c->bform / 10) % 10 == 1 ? FHKV : 1,
                       c->bform % 10 == 0 ? FSQ : 1, FSK};
    const int64_t nb = bdim[0] * bdim[1] * bdim[2] * bdim[3];
    float *q = malloc(nq * 4), *k = malloc(nk * 4), *v = malloc(nk * 4), *W = malloc(nq * 4), *bias = malloc(nb * 4);
    float *out = malloc(nq * 4), *lse = malloc(FB * FH * FSQ * 4), *dq = malloc(nq * 4), *dk = malloc(nk * 4),
          *dv = malloc(nk * 4), *dbias = malloc(nb * 4);
    double *xq = malloc(nq * 8), *xk = malloc(nk * 8), *xv = malloc(nk * 8), *xw = malloc(nq * 8), *xb = malloc(nb * 8);
    double *gq = malloc(nq * 8), *gk = malloc(nk * 8), *gv = malloc(nk * 8), *gb = malloc(nb * 8);
    for (int64_t e = 0; e < nq; e++) { q[e] = (float)t_normal(); xq[e] = q[e]; W[e] = (float)t_normal(); xw[e] = W[e]; }
    for (int64_t e = 0; e < nk; e++) { k[e] = (float)t_normal(); xk[e] = k[e]; v[e] = (float)t_normal(); xv[e] = v[e]; }
    for (int64_t e = 0; e < nb; e++) { bias[e] = (float)t_normal(); xb[e] = bias[e]; }
    uint8_t mask[FSQ * FSK];
    for (int e = 0; e < FSQ * FSK; e++) mask[e] = c->masked_row ? (e / FSK != 1) : 1; /* row 1 fully masked */
    for (int64_t e = 0; e < nq; e++) out[e] = dq[e] = NAN;
    for (int64_t e = 0; e < nk; e++) dk[e] = dv[e] = NAN;
    for (int64_t e = 0; e < nb; e++) dbias[e] = NAN;

    fdma_params p;
    fdma_params_init(&p);
    p.B = FB; p.Sq = FSQ; p.Sk = FSK; p.H = FH; p.Hkv = FHKV; p.D = FD;
    p.q = q; fdma_strides_contiguous(p.q_stride, FB, FSQ, FH, FD);
    p.k = k; fdma_strides_contiguous(p.k_stride, FB, FSK, FHKV, FD);
    p.v = v; fdma_strides_contiguous(p.v_stride, FB, FSK, FHKV, FD);
    p.out = out; memcpy(p.out_stride, p.q_stride, sizeof p.q_stride);
    p.dout = W; memcpy(p.dout_stride, p.q_stride, sizeof p.q_stride);
    p.dq = dq; memcpy(p.dq_stride, p.q_stride, sizeof p.q_stride);
    p.dk = dk; memcpy(p.dk_stride, p.k_stride, sizeof p.k_stride);
    p.dv = dv; memcpy(p.dv_stride, p.k_stride, sizeof p.k_stride);
    p.lse = lse;
    p.bias.ptr = bias; memcpy(p.bias.dim, bdim, sizeof bdim);
    fdma_strides_contiguous(p.bias.stride, bdim[0], bdim[1], bdim[2], bdim[3]);
    p.dbias = dbias; memcpy(p.dbias_stride, p.bias.stride, sizeof p.bias.stride);
    p.mask.ptr = mask;
    p.mask.dim[0] = 1; p.mask.dim[1] = 1; p.mask.dim[2] = FSQ; p.mask.dim[3] = FSK;
    fdma_strides_contiguous(p.mask.stride, 1, 1, FSQ, FSK);
    p.causal = c->causal;
    p.softcap = (float)c->softcap;
    p.window = c->window;
    p.p_drop = (float)c->p_drop;
    p.seed = 77;
    p.offset = (uint64_t)id;
    fdma_status st = fdma_fwd(&p);
    if (st == FDMA_STATUS_OK) st = fdma_bwd(&p);
    for (int64_t e = 0; e < nq; e++) gq[e] = dq[e];
    for (int64_t e = 0; e < nk; e++) { gk[e] = dk[e]; gv[e] = dv[e]; }
    for (int64_t e = 0; e < nb; e++) gb[e] = dbias[e];

    ref_params rp;
    memset(&rp, 0, sizeof rp);
    rp.B = FB; rp.Sq = FSQ; rp.Sk = FSK; rp.H = FH; rp.Hkv = FHKV; rp.D = FD;
    rp.scale = (double)(float)(1.0 / sqrt((double)FD));
    rp.softcap = (double)(float)c->softcap;
    rp.p_drop = (double)(float)c->p_drop;
    rp.causal = c->causal; rp.window = c->window; rp.seed = 77; rp.offset = (uint64_t)id;
    rp.q = xq; rp.k = xk; rp.v = xv;
    rp.mask = mask; rp.mdim[0] = 1; rp.mdim[1] = 1; rp.mdim[2] = FSQ; rp.mdim[3] = FSK;
    rp.bias = xb; memcpy(rp.bdim, bdim, sizeof bdim);
    rp.dt = FDMA_DTYPE_F32;
    double rq = fd_check(&rp, xw, xq, nq, gq), rk = fd_check(&rp, xw, xk, nk, gk), rv = fd_check(&rp, xw, xv, nk, gv),
           rb = fd_check(&rp, xw, xb, nb, gb);
    const char *d0[] = {"B", "1"}, *d1[] = {"H", "Hkv", "1"}, *d2[] = {"Sq", "1"};
    t_report(st == FDMA_STATUS_OK && rq <= 1 && rk <= 1 && rv <= 1 && rb <= 1,
             "fd f32 B=%d Sq=%d Sk=%d H=%d Hkv=%d D=%d bias=(%s,%s,%s,Sk) causal=%d masked_row=%d softcap=%g window=%lld "
             "p_drop=%g | err/tol dq %.3f dk %.3f dv %.3f dbias %.3f %s",
             FB, FSQ, FSK, FH, FHKV, FD, d0[c->bform / 100], d1[(c->bform / 10) % 10], d2[c->bform % 10], c->causal,
             c->masked_row, c->softcap, (long long)c->window, c->p_drop, rq, rk, rv, rb,
             st == FDMA_STATUS_OK ? "" : fdma_last_error());
    free(q); free(k); free(v); free(W); free(bias); free(out); free(lse); free(dq); free(dk); free(dv); free(dbias);
    free(xq); free(xk); free(xv); free(xw); free(xb); free(gq); free(gk); free(gv); free(gb);
}

void test_finite_differences(void) {
    int id = 0;
    for (int d0 = 0; d0 < 2; d0++)
        for (int d1 = 0; d1 < 3; d1++)
            for (int d2 = 0; d2 < 2; d2++, id++) {
                fd_case c;
                memset(&c, 0, sizeof c);
                c.bform = d0 * 100 + d1 * 10 + d2;
                c.causal = id % 2;
                c.masked_row = id % 3 == 0;
                c.softcap = id % 4 == 1 ? 2.0 : 0.0;
                fd_run(&c, id);
            }
    fd_case w = {0, 1, 0, 0.0, 0.0, 3};
    fd_run(&w, id++);
    fd_case dr = {10, 0, 1, 3.0, 0.3, 0};
    fd_run(&dr, id++);
    fd_case all = {120, 1, 1, 1.5, 0.25, 4};
    fd_run(&all, id++);
}
