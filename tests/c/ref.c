/*
 * ref.c -- the naive float64 reference of SPEC sections 3-6, written for the reader, not for speed, and
 * sharing no code with the library (only fdma_dropout_keep, the documented keep-bit function, and it is
 * checked against Philox known answers in test_philox_dropout).
 *
 * Every score is materialised: S, P, ZS of shape (B, H, Sq, Sk). With lowp = 1 it emulates what a user
 * would write in PyTorch at the backend precision (tests/python/reference.py, precision="lowp"): matmul
 * operands in dtype with the matmul result rounded to dtype, softmax in high precision, P rounded to dtype
 * before P.V, every output rounded to dtype. That result x_lowp gives the SPEC section 8 tolerance
 * 2 * max|x_lowp - ref| + 1e-5 for fp16/bf16.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tutil.h"

/* (value, j) order of SPEC section 6: NaN below everything, ties broken by j. */
static int topk_greater(double va, int64_t ja, double vb, int64_t jb) {
    int na = isnan(va), nb = isnan(vb);
    if (na != nb) return nb;
    if (!na && va != vb) return va > vb;
    return ja > jb;
}

void ref_topk_row(const double *bias, int64_t bs, const uint8_t *cand, int64_t Sk, int64_t window, uint8_t *keep) {
    int64_t n = 0;
    for (int64_t j = 0; j < Sk; j++) n += cand[j] != 0;
    for (int64_t j = 0; j < Sk; j++) {
        keep[j] = 0;
        if (!cand[j]) continue;
        if (n <= window) {
            keep[j] = 1;
            continue;
        }
        int64_t above = 0; /* candidates ranked above j */
        for (int64_t jj = 0; jj < Sk; jj++)
            if (cand[jj] && topk_greater(bias[jj * bs], jj, bias[j * bs], j)) above++;
        keep[j] = above < window;
    }
}

static int64_t bidx(const int64_t dim[4], int64_t b, int64_t h, int64_t hk, int64_t i, int64_t j, int64_t H) {
    int64_t bb = dim[0] == 1 ? 0 : b;
    int64_t hx = dim[1] == 1 ? 0 : (dim[1] == H ? h : hk);
    int64_t ii = dim[2] == 1 ? 0 : i;
    return ((bb * dim[1] + hx) * dim[2] + ii) * dim[3] + j;
}

void ref_attention(const ref_params *r, ref_result *o) {
    const int64_t B = r->B, Sq = r->Sq, Sk = r->Sk, H = r->H, Hkv = r->Hkv, D = r->D, g = H / Hkv;
    const int lp = r->lowp;
#define R(x) (lp ? t_round((x), r->dt) : (x))
    memset(o, 0, sizeof(*o));
    o->out = calloc((size_t)(B * Sq * H * D), sizeof(double));
    o->lse = calloc((size_t)(B * H * Sq), sizeof(double));
    o->probs = calloc((size_t)(B * H * Sq * Sk), sizeof(double));
    double *P = calloc((size_t)(B * H * Sq * Sk), sizeof(double));  /* p before rounding */
    double *ZS = calloc((size_t)(B * H * Sq * Sk), sizeof(double)); /* z / (1 - p_drop) */
    double *SP = calloc((size_t)(B * H * Sq * Sk), sizeof(double)); /* s_pre = scale q.k */
    double *S = calloc((size_t)Sk, sizeof(double));
    uint8_t *cand = calloc((size_t)Sk, 1), *keep = calloc((size_t)Sk, 1);
    double *brow = calloc((size_t)Sk, sizeof(double));

    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t i = 0; i < Sq; i++) {
                const int64_t hk = h / g, row = (b * H + h) * Sq + i;
                double *Prow = P + row * Sk, *ZSrow = ZS + row * Sk, *SProw = SP + row * Sk;
                /* visible = mask and causal (bottom-right) and, with a window, the top-k of the bias */
                for (int64_t j = 0; j < Sk; j++) {
                    cand[j] = (!r->causal || j <= i + Sk - Sq) && (!r->mask || r->mask[bidx(r->mdim, b, h, hk, i, j, H)]);
                    brow[j] = r->bias ? r->bias[bidx(r->bdim, b, h, hk, i, j, H)] : 0.0;
                }
                if (r->window > 0)
                    ref_topk_row(brow, 1, cand, Sk, r->window, keep);
                else
                    memcpy(keep, cand, (size_t)Sk);
                /* s = softcap(scale q.k) + bias */
                double m = -INFINITY;
                for (int64_t j = 0; j < Sk; j++) {
                    double dot = 0.0;
                    for (int64_t d = 0; d < D; d++)
                        dot += r->q[((b * Sq + i) * H + h) * D + d] * r->k[((b * Sk + j) * Hkv + hk) * D + d];
                    SProw[j] = r->scale * R(dot);
                    double s = r->softcap > 0 ? r->softcap * tanh(SProw[j] / r->softcap) : SProw[j];
                    S[j] = keep[j] ? s + brow[j] : -INFINITY;
                    if (S[j] > m) m = S[j];
                }
                /* lse = log sum_visible exp(s); p = exp(s - lse); a row with nothing visible: lse = -inf, p = 0 */
                double lse = -INFINITY;
                if (m > -INFINITY) {
                    double sum = 0.0;
                    for (int64_t j = 0; j < Sk; j++) sum += exp(S[j] - m);
                    lse = m + log(sum);
                }
                o->lse[row] = lse;
                for (int64_t j = 0; j < Sk; j++) {
                    Prow[j] = lse > -INFINITY ? exp(S[j] - lse) : 0.0;
                    ZSrow[j] = r->p_drop > 0 ? (fdma_dropout_keep(r->seed, r->offset, (uint64_t)row, (uint64_t)j,
                                                                  (float)r->p_drop)
                                                    ? 1.0 / (1.0 - r->p_drop)
                                                    : 0.0)
                                             : 1.0;
                    o->probs[row * Sk + j] = R(Prow[j]);
                }
                /* out = (p zs) v */
                for (int64_t d = 0; d < D; d++) {
                    double acc = 0.0;
                    for (int64_t j = 0; j < Sk; j++) acc += R(Prow[j] * ZSrow[j]) * r->v[((b * Sk + j) * Hkv + hk) * D + d];
                    o->out[((b * Sq + i) * H + h) * D + d] = R(acc);
                }
            }

    if (r->dout) {
        o->dq = calloc((size_t)(B * Sq * H * D), sizeof(double));
        o->dk = calloc((size_t)(B * Sk * Hkv * D), sizeof(double));
        o->dv = calloc((size_t)(B * Sk * Hkv * D), sizeof(double));
        int64_t nb = r->bias ? r->bdim[0] * r->bdim[1] * r->bdim[2] * r->bdim[3] : 1;
        o->dbias = calloc((size_t)nb, sizeof(double));
        double *DSC = calloc((size_t)Sk, sizeof(double));
        double *dkh = calloc((size_t)(B * H * Sk * D), sizeof(double)); /* per query head, before the group sum */
        double *dvh = calloc((size_t)(B * H * Sk * D), sizeof(double));
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < H; h++)
                for (int64_t i = 0; i < Sq; i++) {
                    const int64_t hk = h / g, row = (b * H + h) * Sq + i;
                    const double *dout = r->dout + ((b * Sq + i) * H + h) * D;
                    const double *q = r->q + ((b * Sq + i) * H + h) * D;
                    double Di = 0.0; /* D_i = dout . out */
                    for (int64_t d = 0; d < D; d++) Di += dout[d] * o->out[((b * Sq + i) * H + h) * D + d];
                    for (int64_t j = 0; j < Sk; j++) {
                        const double *v = r->v + ((b * Sk + j) * Hkv + hk) * D;
                        double p = P[row * Sk + j], zs = ZS[row * Sk + j];
                        double dot = 0.0;
                        for (int64_t d = 0; d < D; d++) dot += dout[d] * v[d];
                        double dp = R(dot) * zs;      /* dp = dout . v * zs */
                        double ds = p * (dp - Di);    /* ds = p (dp - D_i) */
                        double dsc = ds;              /* through softcap */
                        if (r->softcap > 0) {
                            double t = tanh(SP[row * Sk + j] / r->softcap);
                            dsc = ds * (1.0 - t * t);
                        }
                        DSC[j] = R(dsc);
                        if (r->bias) o->dbias[bidx(r->bdim, b, h, hk, i, j, H)] += ds;
                        double pz = R(p * zs);
                        for (int64_t d = 0; d < D; d++) {
                            dkh[((b * H + h) * Sk + j) * D + d] += DSC[j] * q[d];
                            dvh[((b * H + h) * Sk + j) * D + d] += pz * dout[d];
                        }
                    }
                    for (int64_t d = 0; d < D; d++) {
                        double acc = 0.0;
                        for (int64_t j = 0; j < Sk; j++) acc += DSC[j] * r->k[((b * Sk + j) * Hkv + hk) * D + d];
                        o->dq[((b * Sq + i) * H + h) * D + d] = R(r->scale * R(acc));
                    }
                }
        for (int64_t b = 0; b < B; b++)
            for (int64_t hk = 0; hk < Hkv; hk++)
                for (int64_t j = 0; j < Sk; j++)
                    for (int64_t d = 0; d < D; d++) {
                        double sk = 0.0, sv = 0.0;
                        for (int64_t h = hk * g; h < hk * g + g; h++) {
                            sk += r->scale * R(dkh[((b * H + h) * Sk + j) * D + d]);
                            sv += R(dvh[((b * H + h) * Sk + j) * D + d]);
                        }
                        o->dk[((b * Sk + j) * Hkv + hk) * D + d] = R(sk);
                        o->dv[((b * Sk + j) * Hkv + hk) * D + d] = R(sv);
                    }
        for (int64_t e = 0; e < nb; e++) o->dbias[e] = R(o->dbias[e]);
        free(DSC);
        free(dkh);
        free(dvh);
    }
#undef R
    free(P);
    free(ZS);
    free(SP);
    free(S);
    free(cand);
    free(keep);
    free(brow);
}

void ref_free(ref_result *o) {
    free(o->out);
    free(o->lse);
    free(o->probs);
    free(o->dq);
    free(o->dk);
    free(o->dv);
    free(o->dbias);
    memset(o, 0, sizeof(*o));
}
