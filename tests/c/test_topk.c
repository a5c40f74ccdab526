/*
 * test_topk.c -- fdma_create_mask (SPEC section 6) against the naive O(Sk^2) reference ref_topk_row:
 * ties (constant bias -> the larger j wins), NaN (smallest), -inf (above NaN), window >= candidates,
 * window 1, per-key vs full bias, causal with Sq != Sk, base mask, broadcast of bias and mask dims, fp16 and
 * bf16 biases with many ties. The output is poisoned (0xAA) before each run.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tutil.h"

static int64_t vidx(const int64_t dim[4], int64_t a, int64_t b, int64_t i, int64_t j) {
    return (((dim[0] == 1 ? 0 : a) * dim[1] + (dim[1] == 1 ? 0 : b)) * dim[2] + (dim[2] == 1 ? 0 : i)) * dim[3] + j;
}

/* Runs create_mask and compares with the reference; returns the library's keep mask (caller frees) */
static uint8_t *topk_case(const char *what, fdma_dtype dt, int64_t Sq, int64_t Sk, const int64_t bdim[4],
                          const double *bvals, const int64_t *mdim, const uint8_t *mvals, int causal, int64_t window) {
    const int64_t nb = bdim[0] * bdim[1] * bdim[2] * bdim[3];
    void *bias = malloc((size_t)(nb * t_esize(dt)));
    for (int64_t e = 0; e < nb; e++) t_store(bias, e, dt, bvals[e]);
    int64_t odim[4] = {bdim[0], bdim[1], (causal || bdim[2] == Sq) ? Sq : 1, Sk};
    if (mdim) {
        odim[0] = bdim[0] > mdim[0] ? bdim[0] : mdim[0];
        odim[1] = bdim[1] > mdim[1] ? bdim[1] : mdim[1];
        if (mdim[2] == Sq) odim[2] = Sq;
    }
    const int64_t no = odim[0] * odim[1] * odim[2] * odim[3];
    uint8_t *out = malloc((size_t)no);
    memset(out, 0xAA, (size_t)no);
    fdma_topk_params p;
    fdma_topk_params_init(&p);
    p.dtype = dt;
    p.Sq = Sq;
    p.Sk = Sk;
    p.bias.ptr = bias;
    memcpy(p.bias.dim, bdim, sizeof p.bias.dim);
    fdma_strides_contiguous(p.bias.stride, bdim[0], bdim[1], bdim[2], bdim[3]);
    if (mdim) {
        p.mask.ptr = mvals;
        memcpy(p.mask.dim, mdim, sizeof p.mask.dim);
        fdma_strides_contiguous(p.mask.stride, mdim[0], mdim[1], mdim[2], mdim[3]);
    }
    p.causal = causal;
    p.window = window;
    p.out = out;
    memcpy(p.out_dim, odim, sizeof odim);
    fdma_strides_contiguous(p.out_stride, odim[0], odim[1], odim[2], odim[3]);
    fdma_status st = fdma_create_mask(&p);

    int64_t bad = 0;
    double *brow = malloc((size_t)Sk * sizeof(double));
    uint8_t *cand = malloc((size_t)Sk), *keep = malloc((size_t)Sk);
    for (int64_t a = 0; a < odim[0]; a++)
        for (int64_t b = 0; b < odim[1]; b++)
            for (int64_t i = 0; i < odim[2]; i++) {
                for (int64_t j = 0; j < Sk; j++) {
                    brow[j] = t_load(bias, vidx(bdim, a, b, i, j), dt);
                    cand[j] = (!causal || j <= i + Sk - Sq) && (!mdim || mvals[vidx(mdim, a, b, i, j)]);
                }
                ref_topk_row(brow, 1, cand, Sk, window, keep);
                for (int64_t j = 0; j < Sk; j++) bad += out[((a * odim[1] + b) * odim[2] + i) * Sk + j] != keep[j];
            }
    t_report(st == FDMA_STATUS_OK && bad == 0,
             "topk %s: %s Sq=%lld Sk=%lld bias (%lld,%lld,%lld,%lld) mask %s causal=%d window=%lld -> out "
             "(%lld,%lld,%lld,%lld): %s, %lld mismatches",
             what, t_dtype_name(dt), (long long)Sq, (long long)Sk, (long long)bdim[0], (long long)bdim[1],
             (long long)bdim[2], (long long)bdim[3], mdim ? "yes" : "no", causal, (long long)window,
             (long long)odim[0], (long long)odim[1], (long long)odim[2], (long long)odim[3], fdma_status_string(st),
             (long long)bad);
    free(bias);
    free(brow);
    free(cand);
    free(keep);
    return out;
}

static double *normals(int64_t n, fdma_dtype dt, double step) {
    double *x = malloc((size_t)n * sizeof(double));
    for (int64_t e = 0; e < n; e++) {
        double v = t_normal();
        if (step > 0) v = floor(v / step) * step; /* coarse values: many ties */
        x[e] = t_round(v, dt);
    }
    return x;
}

static uint8_t *bits(int64_t n, double p_on) {
    uint8_t *m = malloc((size_t)n);
    for (int64_t e = 0; e < n; e++) m[e] = t_uniform() < p_on;
    return m;
}

void test_topk(void) {
    t_seed(99);
    {   /* ties: constant bias keeps the `window` largest j */
        const int64_t bd[4] = {1, 1, 17, 40};
        double *b = calloc(17 * 40, sizeof(double));
        uint8_t *o = topk_case("constant bias (ties -> larger j)", FDMA_DTYPE_F32, 17, 40, bd, b, NULL, NULL, 0, 5);
        int ok = 1;
        for (int64_t i = 0; i < 17; i++)
            for (int64_t j = 0; j < 40; j++) ok &= o[i * 40 + j] == (j >= 35);
        t_report(ok, "topk constant bias: exactly keys 35..39 kept in every row");
        free(b);
        free(o);
    }
    {   /* NaN smallest, -inf above NaN */
        const int64_t bd[4] = {1, 2, 5, 30};
        double *b = normals(2 * 5 * 30, FDMA_DTYPE_F32, 0);
        int64_t nnan = 0;
        for (int64_t e = 0; e < 300; e++) {
            if (e % 3 == 0) { b[e] = NAN; nnan++; }
            else if (e % 7 == 0) b[e] = -INFINITY;
        }
        free(topk_case("NaN and -inf entries", FDMA_DTYPE_F32, 5, 30, bd, b, NULL, NULL, 0, 22));
        /* a row of 30 with 10 NaN keeps 20 numbers + the 2 NaN of largest j */
        for (int64_t e = 0; e < 30; e++) b[e] = e % 3 == 0 ? NAN : (double)(e % 5);
        uint8_t *o = topk_case("NaN counted smallest", FDMA_DTYPE_F32, 5, 30, bd, b, NULL, NULL, 0, 22);
        int ok = 1;
        for (int64_t j = 0; j < 30; j++) ok &= o[j] == (j % 3 != 0 || j >= 24);
        t_report(ok, "topk NaN: row 0 keeps its 20 numbers and, of its NaN, only j = 24 and 27 (larger j first)");
        free(o);
        free(b);
    }
    {   /* -inf everywhere but a few: -inf entries still rank above NaN and by j */
        const int64_t bd[4] = {1, 1, 1, 16};
        double b[16];
        for (int j = 0; j < 16; j++) b[j] = j < 8 ? NAN : -INFINITY;
        b[3] = 1.0;
        uint8_t *o = topk_case("-inf above NaN", FDMA_DTYPE_F32, 1, 16, bd, b, NULL, NULL, 0, 4);
        int ok = o[3] && o[15] && o[14] && o[13] && !o[12] && !o[7];
        t_report(ok, "topk -inf: keeps 1.0 at j=3 and -inf at j=13..15, no NaN");
        free(o);
    }
    {
        const int64_t bd[4] = {2, 3, 20, 50};
        double *b = normals(2 * 3 * 20 * 50, FDMA_DTYPE_F32, 0);
        free(topk_case("window >= candidates", FDMA_DTYPE_F32, 20, 50, bd, b, NULL, NULL, 1, 50));
        free(topk_case("window 1", FDMA_DTYPE_F32, 20, 50, bd, b, NULL, NULL, 0, 1));
        free(topk_case("full bias, causal Sq < Sk", FDMA_DTYPE_F32, 20, 50, bd, b, NULL, NULL, 1, 7));
        const int64_t md[4] = {2, 1, 20, 50};
        uint8_t *m = bits(2 * 20 * 50, 0.6);
        free(topk_case("full bias + base mask (heads broadcast)", FDMA_DTYPE_F32, 20, 50, bd, b, md, m, 1, 9));
        free(m);
        free(b);
    }
    {   /* per-key bias: causal gives a per-row set */
        const int64_t bd[4] = {2, 3, 1, 50};
        double *b = normals(2 * 3 * 50, FDMA_DTYPE_F32, 0);
        free(topk_case("per-key bias, causal (rows = Sq)", FDMA_DTYPE_F32, 20, 50, bd, b, NULL, NULL, 1, 6));
        free(topk_case("per-key bias, not causal (rows = 1)", FDMA_DTYPE_F32, 20, 50, bd, b, NULL, NULL, 0, 6));
        free(topk_case("per-key bias, causal Sq > Sk", FDMA_DTYPE_F32, 70, 50, bd, b, NULL, NULL, 1, 6));
        const int64_t md[4] = {1, 1, 20, 50};
        uint8_t *m = bits(20 * 50, 0.5);
        free(topk_case("per-key bias + (1,1,Sq,Sk) mask", FDMA_DTYPE_F32, 20, 50, bd, b, md, m, 0, 6));
        free(m);
        free(b);
    }
    {   /* broadcast from both sides */
        const int64_t bd[4] = {1, 3, 1, 33}, md[4] = {2, 1, 9, 33};
        double *b = normals(3 * 33, FDMA_DTYPE_F32, 0);
        uint8_t *m = bits(2 * 9 * 33, 0.7);
        free(topk_case("bias (1,3,1,Sk) x mask (2,1,Sq,Sk)", FDMA_DTYPE_F32, 9, 33, bd, b, md, m, 1, 4));
        free(m);
        free(b);
    }
    {   /* low precision biases with many ties */
        const int64_t bd[4] = {2, 2, 13, 64};
        double *b16 = normals(2 * 2 * 13 * 64, FDMA_DTYPE_F16, 0.5);
        double *bbf = normals(2 * 2 * 13 * 64, FDMA_DTYPE_BF16, 0.25);
        free(topk_case("fp16 bias with ties", FDMA_DTYPE_F16, 13, 64, bd, b16, NULL, NULL, 1, 10));
        free(topk_case("bf16 bias with ties", FDMA_DTYPE_BF16, 13, 64, bd, bbf, NULL, NULL, 0, 10));
        free(b16);
        free(bbf);
    }
    {   /* a long row: selection on 4095 keys */
        const int64_t bd[4] = {1, 1, 3, 4095};
        double *b = normals(3 * 4095, FDMA_DTYPE_F32, 0.1);
        free(topk_case("Sk = 4095, window 2048", FDMA_DTYPE_F32, 3, 4095, bd, b, NULL, NULL, 1, 2048));
        free(b);
    }
}
