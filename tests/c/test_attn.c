/*
 * test_attn.c -- forward + backward of the library against the float64 reference (ref.c) over a sampled
 * grid of cases (SPEC section 8): D in {8, 40, 64, 128, 256}; fp32 / fp16 / bf16; causal on/off with
 * Sq != Sk; Sq, Sk in {1, 17, 113, 257}; GQA 1:1, 4:1, 8:1 and MQA; every mask and bias broadcast form
 * (dims {B|1|B by stride 0} x {H|Hkv|1|H by stride 0} x {Sq|1|Sq by stride 0}); softcap; window; dropout;
 * three memory layouts; fully masked rows (holes in mask, -inf bias rows, causal with Sq > Sk).
 *
 * Case n takes axis values from lists of co-prime lengths, so every value of every axis appears while the
 * whole grid stays small; cases whose reference would be too slow lose batch / heads first.
 * Rule: fp32 max|x - ref| <= 1e-4 (1 + max|ref|); fp16/bf16 max|x - ref| <= 2 max|x_lowp - ref| + 1e-5,
 * per output tensor (out, lse, probs, dq, dk, dv, dbias). All outputs are NaN-poisoned before each run.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tutil.h"

typedef struct acase {
    fdma_dtype dt;
    int64_t B, Sq, Sk, H, Hkv, D;
    int causal;
    int mform, bform; /* -1 none; else d0*100 + d1*10 + d2 (see view_dims) */
    double softcap;
    int64_t window;
    double p_drop;
    int layout, holes;
} acase;

/* form digits: d0 0=B 1=one 2=B-by-stride-0; d1 0=H 1=Hkv 2=one 3=H-by-stride-0; d2 0=Sq 1=one 2=Sq-by-stride-0 */
static void view_dims(int form, const acase *c, int64_t vdim[4], int64_t pdim[4], int zero[4]) {
    int d0 = form / 100, d1 = (form / 10) % 10, d2 = form % 10;
    vdim[0] = d0 == 1 ? 1 : c->B;
    pdim[0] = d0 == 0 ? c->B : 1;
    zero[0] = d0 == 2;
    vdim[1] = d1 == 1 ? c->Hkv : d1 == 2 ? 1 : c->H;
    pdim[1] = d1 == 0 ? c->H : d1 == 1 ? c->Hkv : 1;
    zero[1] = d1 == 3;
    vdim[2] = d2 == 1 ? 1 : c->Sq;
    pdim[2] = d2 == 0 ? c->Sq : 1;
    zero[2] = d2 == 2;
    vdim[3] = pdim[3] = c->Sk;
    zero[3] = 0;
}

static const char *form_str(int form, char *buf) {
    if (form < 0) return "none";
    const char *a[] = {"B", "1", "B/s0"}, *b[] = {"H", "Hkv", "1", "H/s0"}, *d[] = {"Sq", "1", "Sq/s0"};
    sprintf(buf, "(%s,%s,%s,Sk)", a[form / 100], b[(form / 10) % 10], d[form % 10]);
    return buf;
}

/* A mask or bias: physical buffer over pdim (last-dim stride `s3`), a view over vdim, a dense copy over vdim. */
typedef struct tview {
    void *phys;
    int64_t pstride[4];
    fdma_view4 view;
    double *dense;  /* bias values over vdim */
    uint8_t *mdense;/* mask values over vdim */
} tview;

static void make_view(tview *t, int form, const acase *c, int is_mask, int64_t s3) {
    int64_t vdim[4], pdim[4];
    int zero[4];
    view_dims(form, c, vdim, pdim, zero);
    int64_t esz = is_mask ? 1 : t_esize(c->dt);
    t->pstride[3] = s3;
    t->pstride[2] = pdim[3] * s3;
    t->pstride[1] = pdim[2] * t->pstride[2];
    t->pstride[0] = pdim[1] * t->pstride[1];
    int64_t n = pdim[0] * t->pstride[0];
    t->phys = calloc((size_t)n, (size_t)esz);
    for (int64_t a = 0; a < pdim[0]; a++)
        for (int64_t b = 0; b < pdim[1]; b++)
            for (int64_t i = 0; i < pdim[2]; i++)
                for (int64_t j = 0; j < pdim[3]; j++) {
                    int64_t e = a * t->pstride[0] + b * t->pstride[1] + i * t->pstride[2] + j * s3;
                    if (is_mask) {
                        int on = t_uniform() < 0.7;
                        if (c->holes && pdim[2] == c->Sq && i % 7 == 3) on = 0; /* fully masked rows */
                        if (c->holes && pdim[2] != c->Sq && j % 4 == 0) on = 0;
                        ((uint8_t *)t->phys)[e] = (uint8_t)on;
                    } else {
                        double x = t_round(t_normal(), c->dt);
                        if (c->holes && t_uniform() < 0.05) x = -INFINITY;              /* -inf acts as masked */
                        if (c->holes && pdim[2] == c->Sq && i % 11 == 5) x = -INFINITY; /* all -inf: masked row */
                        t_store(t->phys, e, c->dt, x);
                    }
                }
    t->view.ptr = t->phys;
    for (int d = 0; d < 4; d++) {
        t->view.dim[d] = vdim[d];
        t->view.stride[d] = zero[d] ? 0 : (vdim[d] == 1 ? 999 : t->pstride[d]); /* size-1 stride is ignored */
    }
    int64_t nv = vdim[0] * vdim[1] * vdim[2] * vdim[3], e = 0;
    if (is_mask)
        t->mdense = malloc((size_t)nv);
    else
        t->dense = malloc((size_t)nv * sizeof(double));
    for (int64_t a = 0; a < vdim[0]; a++)
        for (int64_t b = 0; b < vdim[1]; b++)
            for (int64_t i = 0; i < vdim[2]; i++)
                for (int64_t j = 0; j < vdim[3]; j++, e++) {
                    int64_t pe = (zero[0] ? 0 : a * t->pstride[0]) + (zero[1] ? 0 : b * t->pstride[1]) +
                                 (zero[2] ? 0 : i * t->pstride[2]) + j * s3;
                    if (is_mask)
                        t->mdense[e] = ((uint8_t *)t->phys)[pe];
                    else
                        t->dense[e] = t_load(t->phys, pe, c->dt);
                }
}

static void free_view(tview *t) {
    free(t->phys);
    free(t->dense);
    free(t->mdense);
}

typedef struct cmp_state {
    char worst[16];
    double worst_ratio;
    char fails[256];
    int ok;
} cmp_state;

static void cmp(cmp_state *st, const char *name, const double *x, const double *ref, const double *lowp, int64_t n,
                fdma_dtype dt) {
    double err = t_maxdiff(x, ref, n);
    double tol = dt == FDMA_DTYPE_F32 ? 1e-4 * (1.0 + t_maxabs_finite(ref, n)) : 2.0 * t_maxdiff(lowp, ref, n) + 1e-5;
    double ratio = err / tol;
    if (ratio > st->worst_ratio || st->worst[0] == 0) {
        st->worst_ratio = ratio;
        snprintf(st->worst, sizeof st->worst, "%s", name);
    }
    if (!(err <= tol)) {
        st->ok = 0;
        size_t l = strlen(st->fails);
        snprintf(st->fails + l, sizeof(st->fails) - l, " %s:%.2e>%.2e", name, err, tol);
    }
}

static int run_attention_case(const acase *c, int case_id) {
    t_seed(1000 + (uint64_t)case_id);
    const int64_t B = c->B, Sq = c->Sq, Sk = c->Sk, H = c->H, Hkv = c->Hkv, D = c->D;
    const int64_t qn[4] = {B, Sq, H, D}, kn[4] = {B, Sk, Hkv, D};
    const int64_t nq = B * Sq * H * D, nk = B * Sk * Hkv * D, nl = B * H * Sq, np = B * H * Sq * Sk;
    double *dq_ = malloc(nq * sizeof(double)), *dk_ = malloc(nk * sizeof(double)), *dv_ = malloc(nk * sizeof(double));
    double *ddo = malloc(nq * sizeof(double));
    ttensor q = tt_new(qn, c->layout, c->dt), k = tt_new(kn, (c->layout + 1) % N_LAYOUTS, c->dt),
            v = tt_new(kn, (c->layout + 2) % N_LAYOUTS, c->dt), dout = tt_new(qn, c->layout, c->dt);
    tt_fill_normal(&q, dq_, 1.0);
    tt_fill_normal(&k, dk_, 1.0);
    tt_fill_normal(&v, dv_, 1.0);
    tt_fill_normal(&dout, ddo, 1.0);
    ttensor out = tt_new(qn, (c->layout + 1) % N_LAYOUTS, c->dt), dq = tt_new(qn, c->layout, c->dt),
            dk = tt_new(kn, c->layout, c->dt), dv = tt_new(kn, (c->layout + 1) % N_LAYOUTS, c->dt);
    const int64_t ln[4] = {1, 1, 1, nl}, pn[4] = {1, 1, 1, np};
    ttensor lse = tt_new(ln, LAYOUT_CONTIGUOUS, FDMA_DTYPE_F32), probs = tt_new(pn, LAYOUT_CONTIGUOUS, c->dt);
    tview mask = {0}, bias = {0};
    ttensor dbias = {0};
    if (c->mform >= 0) make_view(&mask, c->mform, c, 1, c->layout == LAYOUT_PADDED ? 3 : 1);
    if (c->bform >= 0) {
        make_view(&bias, c->bform, c, 0, c->layout == LAYOUT_PADDED ? 2 : 1);
        dbias = tt_new(bias.view.dim, c->layout == LAYOUT_DIM12_SWAPPED ? LAYOUT_CONTIGUOUS : c->layout, c->dt);
    }

    fdma_params p;
    fdma_params_init(&p);
    p.dtype = c->dt;
    p.B = B; p.Sq = Sq; p.Sk = Sk; p.H = H; p.Hkv = Hkv; p.D = D;
    p.q = q.ptr; memcpy(p.q_stride, q.stride, sizeof p.q_stride);
    p.k = k.ptr; memcpy(p.k_stride, k.stride, sizeof p.k_stride);
    p.v = v.ptr; memcpy(p.v_stride, v.stride, sizeof p.v_stride);
    if (c->mform >= 0) p.mask = mask.view;
    if (c->bform >= 0) p.bias = bias.view;
    p.softcap = (float)c->softcap;
    p.causal = c->causal;
    p.window = c->window;
    p.p_drop = (float)c->p_drop;
    p.seed = 0x1234567890abcdefull + (uint64_t)case_id;
    p.offset = 3 + (uint64_t)case_id;
    p.out = out.ptr; memcpy(p.out_stride, out.stride, sizeof p.out_stride);
    p.lse = (float *)lse.ptr;
    p.probs = probs.ptr;
    fdma_status st = fdma_fwd(&p);
    p.probs = NULL;
    p.dout = dout.ptr; memcpy(p.dout_stride, dout.stride, sizeof p.dout_stride);
    p.dq = dq.ptr; memcpy(p.dq_stride, dq.stride, sizeof p.dq_stride);
    p.dk = dk.ptr; memcpy(p.dk_stride, dk.stride, sizeof p.dk_stride);
    p.dv = dv.ptr; memcpy(p.dv_stride, dv.stride, sizeof p.dv_stride);
    if (c->bform >= 0) {
        p.dbias = dbias.ptr;
        memcpy(p.dbias_stride, dbias.stride, sizeof p.dbias_stride);
    }
    fdma_status st2 = st == FDMA_STATUS_OK ? fdma_bwd(&p) : st;

    ref_params rp;
    memset(&rp, 0, sizeof rp);
    rp.B = B; rp.Sq = Sq; rp.Sk = Sk; rp.H = H; rp.Hkv = Hkv; rp.D = D;
    rp.scale = (double)(float)(1.0 / sqrt((double)D));
    rp.softcap = (double)(float)c->softcap;
    rp.p_drop = (double)(float)c->p_drop;
    rp.causal = c->causal;
    rp.window = c->window;
    rp.seed = p.seed;
    rp.offset = p.offset;
    rp.q = dq_; rp.k = dk_; rp.v = dv_; rp.dout = ddo;
    if (c->mform >= 0) { rp.mask = mask.mdense; memcpy(rp.mdim, mask.view.dim, sizeof rp.mdim); }
    if (c->bform >= 0) { rp.bias = bias.dense; memcpy(rp.bdim, bias.view.dim, sizeof rp.bdim); }
    rp.dt = c->dt;
    ref_result ref, lowp;
    ref_attention(&rp, &ref);
    memset(&lowp, 0, sizeof lowp);
    if (c->dt != FDMA_DTYPE_F32) {
        rp.lowp = 1;
        ref_attention(&rp, &lowp);
    }

    cmp_state cs;
    memset(&cs, 0, sizeof cs);
    cs.ok = st == FDMA_STATUS_OK && st2 == FDMA_STATUS_OK;
    if (cs.ok) {
        int64_t nb = c->bform >= 0 ? bias.view.dim[0] * bias.view.dim[1] * bias.view.dim[2] * bias.view.dim[3] : 0;
        double *x = malloc((size_t)(np > nq ? (np > nk ? np : nk) : (nq > nk ? nq : nk)) * sizeof(double) + 64);
        tt_read(&out, x); cmp(&cs, "out", x, ref.out, lowp.out, nq, c->dt);
        tt_read(&lse, x); cmp(&cs, "lse", x, ref.lse, lowp.lse, nl, c->dt);
        tt_read(&probs, x); cmp(&cs, "probs", x, ref.probs, lowp.probs, np, c->dt);
        tt_read(&dq, x); cmp(&cs, "dq", x, ref.dq, lowp.dq, nq, c->dt);
        tt_read(&dk, x); cmp(&cs, "dk", x, ref.dk, lowp.dk, nk, c->dt);
        tt_read(&dv, x); cmp(&cs, "dv", x, ref.dv, lowp.dv, nk, c->dt);
        if (nb) { tt_read(&dbias, x); cmp(&cs, "dbias", x, ref.dbias, lowp.dbias, nb, c->dt); }
        free(x);
    }
    char mb[32], bb[32];
    t_report(cs.ok, "attn %s B=%lld Sq=%lld Sk=%lld H=%lld Hkv=%lld D=%lld causal=%d mask=%s bias=%s softcap=%g "
             "window=%lld p_drop=%g layout=%d holes=%d | %s%s%s worst %s err/tol=%.2f%s",
             t_dtype_name(c->dt), (long long)B, (long long)Sq, (long long)Sk, (long long)H, (long long)Hkv,
             (long long)D, c->causal, form_str(c->mform, mb), form_str(c->bform, bb), c->softcap,
             (long long)c->window, c->p_drop, c->layout, c->holes, st == FDMA_STATUS_OK ? "" : "fwd failed: ",
             st == FDMA_STATUS_OK ? "" : fdma_last_error(), st2 == FDMA_STATUS_OK || st != FDMA_STATUS_OK ? "" : "bwd failed",
             cs.worst, cs.worst_ratio, cs.fails);
    ref_free(&ref);
    ref_free(&lowp);
    tt_free(&q); tt_free(&k); tt_free(&v); tt_free(&dout); tt_free(&out); tt_free(&dq); tt_free(&dk); tt_free(&dv);
    tt_free(&lse); tt_free(&probs);
    if (c->bform >= 0) tt_free(&dbias);
    free_view(&mask);
    free_view(&bias);
    free(dq_); free(dk_); free(dv_); free(ddo);
    return cs.ok;
}

void test_attention_grid(void) {
    static const fdma_dtype dts[3] = {FDMA_DTYPE_F32, FDMA_DTYPE_F16, FDMA_DTYPE_BF16};
    static const int64_t Ds[5] = {8, 40, 64, 128, 256};
    static const int64_t sizes[13][2] = {{17, 113}, {113, 17}, {1, 17}, {17, 1}, {1, 1}, {113, 257}, {257, 113},
                                         {17, 17}, {257, 17}, {1, 257}, {113, 113}, {17, 257}, {257, 1}};
    static const int64_t gqa[4][2] = {{4, 4}, {8, 2}, {8, 1}, {4, 1}}; /* 1:1, 4:1, 8:1 (= MQA of 8), MQA */
    int forms[37];
    int nf = 0;
    forms[nf++] = -1;
    for (int d0 = 0; d0 < 3; d0++)
        for (int d1 = 0; d1 < 4; d1++)
            for (int d2 = 0; d2 < 3; d2++) forms[nf++] = d0 * 100 + d1 * 10 + d2;
    const int N = 74;
    for (int n = 0; n < N; n++) {
        acase c;
        memset(&c, 0, sizeof c);
        c.dt = dts[n % 3];
        c.D = Ds[n % 5];
        c.causal = (n / 3) % 2;
        c.Sq = sizes[n % 13][0];
        c.Sk = sizes[n % 13][1];
        c.H = gqa[(n / 2) % 4][0];
        c.Hkv = gqa[(n / 2) % 4][1];
        c.B = n % 4 == 3 ? 1 : 2;
        c.mform = forms[(n * 7) % 37];
        c.bform = forms[(n * 11 + 5) % 37];
        c.softcap = n % 4 == 1 ? 5.0 : 0.0;
        c.window = (c.bform >= 0 && n % 5 == 2) ? (n % 3 == 0 ? 1 : n % 3 == 1 ? 7 : 100000) : 0;
        c.p_drop = n % 6 == 4 ? 0.2 : 0.0;
        c.layout = n % N_LAYOUTS;
        c.holes = (n / 5) % 2;
        /* keep the float64 reference affordable (ASan, 2 cores): shrink the batch, then both head counts
           (keeping H/Hkv), then the query heads, then D */
        while (c.B * c.H * c.Sq * c.Sk * c.D > 1200000 && c.B > 1) c.B = 1;
        while (c.B * c.H * c.Sq * c.Sk * c.D > 1200000 && c.Hkv > 1) { c.H /= 2; c.Hkv /= 2; }
        while (c.B * c.H * c.Sq * c.Sk * c.D > 1200000 && c.H > c.Hkv) c.H /= 2;
        while (c.B * c.H * c.Sq * c.Sk * c.D > 1200000 && c.D > 64) c.D /= 2; /* D = 256 is covered elsewhere */
        if (c.window > 0 && c.Sq * c.Sk * c.Sk * c.B * c.H > 40000000) c.window = 0; /* naive O(Sk^2) top-k */
        run_attention_case(&c, n);
    }
    /* explicit extras: a long key sequence (decode-like), odd head dims (CPU takes any D in 1..256) */
    acase x;
    memset(&x, 0, sizeof x);
    x = (acase){FDMA_DTYPE_F16, 1, 3, 4095, 2, 1, 64, 1, 10, 22, 0.0, 0, 0.0, 0, 1};
    run_attention_case(&x, N);
    x = (acase){FDMA_DTYPE_BF16, 1, 2, 4095, 2, 2, 8, 0, -1, 0, 0.0, 0, 0.1, 1, 0};
    run_attention_case(&x, N + 1);
    x = (acase){FDMA_DTYPE_F32, 2, 17, 31, 4, 2, 1, 1, 100, 120, 3.0, 0, 0.0, 1, 1};
    run_attention_case(&x, N + 2);
    x = (acase){FDMA_DTYPE_F16, 2, 31, 17, 4, 2, 3, 1, 0, 11, 0.0, 5, 0.0, 2, 1};
    run_attention_case(&x, N + 3);
    x = (acase){FDMA_DTYPE_BF16, 1, 33, 47, 6, 3, 200, 0, 1, 1, 0.0, 0, 0.0, 0, 0};
    run_attention_case(&x, N + 4);
}
