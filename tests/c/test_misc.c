/*
 * test_misc.c -- properties that need no reference: bitwise determinism of the backward across thread
 * counts and repeated runs; the top-k window inside attention equals attention with the mask that
 * fdma_create_mask writes (same selection); an explicit scale; rows with nothing visible give out = 0,
 * lse = -inf and zero gradients exactly; the thread-count setting.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tutil.h"

typedef struct mrun {
    int64_t B, Sq, Sk, H, Hkv, D;
    float *q, *k, *v, *dout, *bias, *out, *lse, *dq, *dk, *dv, *dbias;
    uint8_t *mask;
    int64_t bdim[4];
    fdma_params p;
} mrun;

static void mrun_init(mrun *m, int64_t B, int64_t Sq, int64_t Sk, int64_t H, int64_t Hkv, int64_t D, const int64_t bdim[4]) {
    memset(m, 0, sizeof *m);
    m->B = B; m->Sq = Sq; m->Sk = Sk; m->H = H; m->Hkv = Hkv; m->D = D;
    memcpy(m->bdim, bdim, sizeof m->bdim);
    const int64_t nq = B * Sq * H * D, nk = B * Sk * Hkv * D, nb = bdim[0] * bdim[1] * bdim[2] * bdim[3];
    m->q = malloc(nq * 4); m->dout = malloc(nq * 4); m->out = malloc(nq * 4); m->dq = malloc(nq * 4);
    m->k = malloc(nk * 4); m->v = malloc(nk * 4); m->dk = malloc(nk * 4); m->dv = malloc(nk * 4);
    m->bias = malloc(nb * 4); m->dbias = malloc(nb * 4);
    m->lse = malloc(B * H * Sq * 4);
    for (int64_t e = 0; e < nq; e++) { m->q[e] = (float)t_normal(); m->dout[e] = (float)t_normal(); m->out[e] = m->dq[e] = NAN; }
    for (int64_t e = 0; e < nk; e++) { m->k[e] = (float)t_normal(); m->v[e] = (float)t_normal(); m->dk[e] = m->dv[e] = NAN; }
    for (int64_t e = 0; e < nb; e++) { m->bias[e] = (float)t_normal(); m->dbias[e] = NAN; }
    fdma_params *p = &m->p;
    fdma_params_init(p);
    p->B = B; p->Sq = Sq; p->Sk = Sk; p->H = H; p->Hkv = Hkv; p->D = D;
    p->q = m->q; fdma_strides_contiguous(p->q_stride, B, Sq, H, D);
    p->k = m->k; fdma_strides_contiguous(p->k_stride, B, Sk, Hkv, D);
    p->v = m->v; fdma_strides_contiguous(p->v_stride, B, Sk, Hkv, D);
    p->out = m->out; memcpy(p->out_stride, p->q_stride, sizeof p->q_stride);
    p->dout = m->dout; memcpy(p->dout_stride, p->q_stride, sizeof p->q_stride);
    p->dq = m->dq; memcpy(p->dq_stride, p->q_stride, sizeof p->q_stride);
    p->dk = m->dk; memcpy(p->dk_stride, p->k_stride, sizeof p->k_stride);
    p->dv = m->dv; memcpy(p->dv_stride, p->k_stride, sizeof p->k_stride);
    p->lse = m->lse;
    p->bias.ptr = m->bias; memcpy(p->bias.dim, bdim, sizeof p->bias.dim);
    fdma_strides_contiguous(p->bias.stride, bdim[0], bdim[1], bdim[2], bdim[3]);
    p->dbias = m->dbias; memcpy(p->dbias_stride, p->bias.stride, sizeof p->bias.stride);
}

static void mrun_free(mrun *m) {
    free(m->q); free(m->k); free(m->v); free(m->dout); free(m->bias); free(m->out); free(m->lse);
    free(m->dq); free(m->dk); free(m->dv); free(m->dbias); free(m->mask);
}

static size_t nbytes_q(const mrun *m) { return (size_t)(m->B * m->Sq * m->H * m->D) * 4; }
static size_t nbytes_k(const mrun *m) { return (size_t)(m->B * m->Sk * m->Hkv * m->D) * 4; }
static size_t nbytes_b(const mrun *m) { return (size_t)(m->bdim[0] * m->bdim[1] * m->bdim[2] * m->bdim[3]) * 4; }

void test_misc(void) {
    t_seed(4242);
    {   /* determinism: 1 vs 3 threads vs a repeat, bitwise */
        const int64_t bd[4] = {1, 1, 1, 77};
        mrun m;
        mrun_init(&m, 2, 45, 77, 8, 2, 24, bd);
        m.p.causal = 1;
        m.p.softcap = 4.0f;
        m.p.p_drop = 0.1f;
        m.p.deterministic = 1;
        int ok = 1;
        void *ref[4] = {malloc(nbytes_q(&m)), malloc(nbytes_k(&m)), malloc(nbytes_k(&m)), malloc(nbytes_b(&m))};
        int threads[3] = {1, 3, 3};
        for (int r = 0; r < 3; r++) {
            fdma_set_num_threads(threads[r]);
            ok &= fdma_fwd(&m.p) == FDMA_STATUS_OK && fdma_bwd(&m.p) == FDMA_STATUS_OK;
            if (r == 0) {
                memcpy(ref[0], m.dq, nbytes_q(&m)); memcpy(ref[1], m.dk, nbytes_k(&m));
                memcpy(ref[2], m.dv, nbytes_k(&m)); memcpy(ref[3], m.dbias, nbytes_b(&m));
            } else {
                ok &= !memcmp(ref[0], m.dq, nbytes_q(&m)) && !memcmp(ref[1], m.dk, nbytes_k(&m)) &&
                      !memcmp(ref[2], m.dv, nbytes_k(&m)) && !memcmp(ref[3], m.dbias, nbytes_b(&m));
            }
        }
        fdma_set_num_threads(0);
        t_report(ok, "determinism: backward with 1, 3, 3 threads bitwise identical (dq, dk, dv, dbias (1,1,1,Sk))");
        for (int a = 0; a < 4; a++) free(ref[a]);
        mrun_free(&m);
    }
    {   /* dbias is optional: without it dq, dk, dv are bitwise the same (a different item split) */
        const int64_t bd[4] = {1, 1, 7, 50};
        mrun m;
        mrun_init(&m, 3, 7, 50, 4, 2, 16, bd);
        m.p.causal = 1;
        int ok = fdma_fwd(&m.p) == FDMA_STATUS_OK && fdma_bwd(&m.p) == FDMA_STATUS_OK;
        void *ref[3] = {malloc(nbytes_q(&m)), malloc(nbytes_k(&m)), malloc(nbytes_k(&m))};
        memcpy(ref[0], m.dq, nbytes_q(&m)); memcpy(ref[1], m.dk, nbytes_k(&m)); memcpy(ref[2], m.dv, nbytes_k(&m));
        memset(m.dq, 0xFF, nbytes_q(&m)); memset(m.dk, 0xFF, nbytes_k(&m)); memset(m.dv, 0xFF, nbytes_k(&m));
        m.p.dbias = NULL;
        ok &= fdma_bwd(&m.p) == FDMA_STATUS_OK;
        ok &= !memcmp(ref[0], m.dq, nbytes_q(&m)) && !memcmp(ref[1], m.dk, nbytes_k(&m)) &&
              !memcmp(ref[2], m.dv, nbytes_k(&m));
        t_report(ok, "dbias optional: backward without dbias gives the same dq, dk, dv bitwise");
        for (int a = 0; a < 3; a++) free(ref[a]);
        mrun_free(&m);
    }
    {   /* threads setting */
        fdma_set_num_threads(5);
        int a = fdma_get_num_threads();
        fdma_set_num_threads(0);
        int b = fdma_get_num_threads();
        t_report(a == 5 && b >= 1, "threads: set 5 -> %d, default -> %d", a, b);
    }
    {   /* window in attention == attention with the create_mask keep mask */
        const int64_t bd[4] = {2, 2, 1, 60};
        mrun m;
        mrun_init(&m, 2, 19, 60, 4, 2, 16, bd);
        m.p.causal = 1;
        m.p.window = 9;
        int ok = fdma_fwd(&m.p) == FDMA_STATUS_OK;
        float *out1 = malloc(nbytes_q(&m)), *lse1 = malloc((size_t)(2 * 4 * 19) * 4);
        memcpy(out1, m.out, nbytes_q(&m));
        memcpy(lse1, m.lse, (size_t)(2 * 4 * 19) * 4);
        fdma_topk_params t;
        fdma_topk_params_init(&t);
        t.Sq = 19; t.Sk = 60; t.bias = m.p.bias; t.causal = 1; t.window = 9;
        m.mask = malloc(2 * 2 * 19 * 60);
        t.out = m.mask;
        t.out_dim[0] = 2; t.out_dim[1] = 2; t.out_dim[2] = 19; t.out_dim[3] = 60;
        fdma_strides_contiguous(t.out_stride, 2, 2, 19, 60);
        ok &= fdma_create_mask(&t) == FDMA_STATUS_OK;
        m.p.window = 0;
        m.p.causal = 0; /* the keep mask already contains causality */
        m.p.mask.ptr = m.mask;
        memcpy(m.p.mask.dim, t.out_dim, sizeof t.out_dim);
        memcpy(m.p.mask.stride, t.out_stride, sizeof t.out_stride);
        ok &= fdma_fwd(&m.p) == FDMA_STATUS_OK;
        ok &= !memcmp(out1, m.out, nbytes_q(&m)) && !memcmp(lse1, m.lse, (size_t)(2 * 4 * 19) * 4);
        t_report(ok, "window: attention(window=9, causal) == attention(mask = create_mask(window=9, causal)) bitwise");
        free(out1);
        free(lse1);
        mrun_free(&m);
    }
    {   /* explicit scale: scale = 2/sqrt(D) with q / 2 is the same computation, bitwise */
        const int64_t bd[4] = {1, 4, 10, 33};
        mrun m;
        mrun_init(&m, 1, 10, 33, 4, 4, 16, bd);
        int ok = fdma_fwd(&m.p) == FDMA_STATUS_OK;
        float *out1 = malloc(nbytes_q(&m));
        memcpy(out1, m.out, nbytes_q(&m));
        for (int64_t e = 0; e < 10 * 4 * 16; e++) m.q[e] *= 0.5f;
        m.p.scale = 2.0f * (float)(1.0 / sqrt(16.0));
        ok &= fdma_fwd(&m.p) == FDMA_STATUS_OK && !memcmp(out1, m.out, nbytes_q(&m));
        t_report(ok, "scale: explicit scale 2/sqrt(D) on q/2 equals the default scale bitwise");
        free(out1);
        mrun_free(&m);
    }
    {   /* nothing visible: causal with Sq > Sk, and a bias row of -inf */
        const int64_t bd[4] = {1, 1, 30, 9};
        mrun m;
        mrun_init(&m, 1, 30, 9, 2, 1, 8, bd);
        for (int j = 0; j < 9; j++) m.bias[25 * 9 + j] = -INFINITY;
        m.p.causal = 1;
        int ok = fdma_fwd(&m.p) == FDMA_STATUS_OK && fdma_bwd(&m.p) == FDMA_STATUS_OK;
        int exact = 1, finite = 1;
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 30; i++) {
                int hidden = i < 30 - 9 || i == 25;
                for (int d = 0; d < 8; d++) {
                    float o = m.out[(i * 2 + h) * 8 + d], g = m.dq[(i * 2 + h) * 8 + d];
                    if (hidden) exact &= o == 0.0f && g == 0.0f;
                    finite &= isfinite(o) && isfinite(g);
                }
                if (hidden) exact &= m.lse[h * 30 + i] == -INFINITY;
            }
        for (int e = 0; e < 30 * 9; e++) {
            finite &= isfinite(m.dbias[e]);
            if (e / 9 == 25 || e / 9 < 21) exact &= m.dbias[e] == 0.0f;
        }
        t_report(ok && exact && finite, "fully masked rows: out 0, lse -inf, dq 0, dbias 0 exactly; no NaN anywhere");
        mrun_free(&m);
    }
}
