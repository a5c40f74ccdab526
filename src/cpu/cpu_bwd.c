/*
 * cpu_bwd.c -- the CPU backward pass (SPEC section 4): deterministic without atomics, fp32 accumulation.
 *
 * Forward, per row (b, h, i) and key j (cpu_fwd.c, cpu_common.c):
 *   s_pre = scale * q_i . k_j ;  sc = softcap * tanh(s_pre / softcap) ;  s = sc + bias_ij  (-inf if hidden)
 *   p_ij = exp(s - lse_i) ;  out_i = sum_j p_ij zs_ij v_j              zs = z / (1 - p_drop)
 * Backward, each line naming the forward line it differentiates:
 *   dv_j  += p_ij zs_ij dout_i            out_i = sum_j p_ij zs_ij v_j   (d/dv_j)
 *   dp_ij  = dout_i . v_j * zs_ij         out_i = sum_j p_ij zs_ij v_j   (d/dp_ij)
 *   D_i    = dout_i . out_i               softmax: sum_j p_ij dp_ij = D_i
 *   ds_ij  = p_ij (dp_ij - D_i)           p_ij = exp(s_ij - lse_i)       -> dbias_ij (s = sc + bias)
 *   dsc_ij = ds_ij (1 - (sc/softcap)^2)   sc = softcap * tanh(s_pre / softcap)
 *   dq_i  += scale dsc_ij k_j ; dk_j += scale dsc_ij q_i                s_pre = scale * q_i . k_j
 *
 * Ownership (every output element is written by exactly one work item, in a fixed order):
 *   pass 1, item (b, h, RB rows):   dq rows; also stores D_i and the row's top-k threshold.
 *   pass 2, item (b?, hk?, KB keys): dk, dv of those keys for its (b, hk) (summing the g = H/Hkv query heads
 *     of the group), and the dbias elements of those keys. When dbias broadcasts over the batch (dim 0 = 1)
 *     one item spans every b; when it broadcasts over heads (dim 1 = 1) one item spans every hk; the sum
 *     over broadcast rows (dim 2 = 1) is inside the item. So dbias is reduced in fp32 in a fixed order with
 *     scratch of (heads of one group) x (rows of dbias) x KB floats per thread, never (B, H, Sq, Sk).
 * Workspace: none (0 bytes); scratch is per-thread host memory plus D_i / thresholds of (B, H, Sq).
 *
 * Shapes: q, out, dout, dq (B, Sq, H, D); k, v, dk, dv (B, Sk, Hkv, D); lse (B, H, Sq); dbias = bias dims.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

enum { BWD_RB = 32, BWD_KB = 64 };

typedef struct bwd_ctx {
    const fdma_params *p;
    float *Di;          /* (B, H, Sq): dout_i . out_i */
    cpu_topk_thr *thr;  /* (B, H, Sq): the row's top-k threshold (window > 0) */
    int64_t n_row_blocks;
    /* pass 2 geometry */
    int split_b, split_hk;
    int64_t n_b_items, n_hk_items, n_kb;
    int64_t db_nhx, db_rows;
    size_t o1[9], o2[10]; /* scratch offsets of pass 1 and pass 2 */
} bwd_ctx;

static int64_t row_index(const fdma_params *p, int64_t b, int64_t h, int64_t i) { return (b * p->H + h) * p->Sq + i; }

/* ---- pass 1: dq, D_i, thresholds ---- */

static void dq_item(void *vctx, int64_t item, void *scratch) {
    const bwd_ctx *c = (const bwd_ctx *)vctx;
    const fdma_params *p = c->p;
    const int64_t Sk = p->Sk, H = p->H, D = p->D, g = p->H / p->Hkv;
    const int64_t b = item / (H * c->n_row_blocks);
    const int64_t h = (item / c->n_row_blocks) % H;
    const int64_t i0 = (item % c->n_row_blocks) * BWD_RB;
    const int64_t nr = p->Sq - i0 < BWD_RB ? p->Sq - i0 : BWD_RB;
    const int64_t hk = h / g;
    char *base = (char *)scratch;
    float *K = (float *)(base + c->o1[0]), *V = (float *)(base + c->o1[1]);
    float *qf = (float *)(base + c->o1[2]), *dof = (float *)(base + c->o1[3]);
    float *dq = (float *)(base + c->o1[4]);
    float *s = (float *)(base + c->o1[5]), *sc = (float *)(base + c->o1[6]), *zs = (float *)(base + c->o1[7]);
    cpu_topk_key *keys = (cpu_topk_key *)(base + c->o1[8]);

    cpu_row rows[BWD_RB];
    float lse[BWD_RB], Di[BWD_RB];
    int64_t jmax = -1;
    for (int64_t r = 0; r < nr; r++) {
        const int64_t i = i0 + r, row = row_index(p, b, h, i);
        cpu_row_init(&rows[r], p, b, h, i);
        if (p->window > 0) {
            cpu_row_topk(&rows[r], p, keys);
            c->thr[row] = rows[r].thr;
        }
        lse[r] = p->lse[row];
        cpu_load_row(qf + r * D, p->q, b * p->q_stride[0] + i * p->q_stride[1] + h * p->q_stride[2], D, p->dtype);
        cpu_load_row(dof + r * D, p->dout, b * p->dout_stride[0] + i * p->dout_stride[1] + h * p->dout_stride[2], D,
                     p->dtype);
        /* D_i = dout_i . out_i (out row loaded into dq's slot, which is cleared next) */
        cpu_load_row(dq + r * D, p->out, b * p->out_stride[0] + i * p->out_stride[1] + h * p->out_stride[2], D,
                     p->dtype);
        Di[r] = cpu_dot(dof + r * D, dq + r * D, D);
        c->Di[row] = Di[r];
        if (lse[r] != -INFINITY && rows[r].jmax > jmax) jmax = rows[r].jmax;
    }
    memset(dq, 0, (size_t)(nr * D) * sizeof(float));

    for (int64_t j0 = 0; j0 <= jmax; j0 += BWD_KB) {
        const int64_t j1 = j0 + BWD_KB < Sk ? j0 + BWD_KB : Sk;
        cpu_load_kv_panel(K, p->k, p->k_stride, p, b, hk, j0, j1);
        cpu_load_kv_panel(V, p->v, p->v_stride, p, b, hk, j0, j1);
        for (int64_t r = 0; r < nr; r++) {
            if (lse[r] == -INFINITY || j0 > rows[r].jmax) continue; /* fully masked row: every gradient 0 */
            cpu_row_scores(&rows[r], p, qf + r * D, K, j0, j1, s, sc);
            cpu_row_dropout(&rows[r], p, j0, j1, zs);
            const float *dor = dof + r * D;
            float *dqr = dq + r * D;
            for (int64_t j = j0; j < j1; j++) {
                const float sj = s[j - j0];
                if (sj == -INFINITY) continue;
                const float pij = expf(sj - lse[r]);                               /* p = exp(s - lse) */
                const float dp = cpu_dot(dor, V + (j - j0) * D, D) * zs[j - j0];   /* out = sum p zs v */
                const float ds = pij * (dp - Di[r]);                              /* softmax */
                float dsc = ds;
                if (p->softcap > 0.0f) {                                          /* sc = cap tanh(s_pre/cap) */
                    const float t = sc[j - j0] / p->softcap;
                    dsc = ds * (1.0f - t * t);
                }
                const float *kj = K + (j - j0) * D;                               /* s_pre = scale q . k */
                for (int64_t d = 0; d < D; d++) dqr[d] += dsc * kj[d];
            }
        }
    }
    for (int64_t r = 0; r < nr; r++) {
        float *dqr = dq + r * D;
        for (int64_t d = 0; d < D; d++) dqr[d] *= p->scale;
        const int64_t i = i0 + r;
        cpu_store_row(p->dq, b * p->dq_stride[0] + i * p->dq_stride[1] + h * p->dq_stride[2], dqr, D, p->dtype);
    }
}

/* ---- pass 2: dk, dv, dbias ---- */

/* Index of bias head for query head h in the dbias dims. */
static int64_t bias_head(const fdma_params *p, int64_t h) {
    const int64_t n = p->bias.dim[1];
    return n == 1 ? 0 : (n == p->H ? h : h / (p->H / p->Hkv));
}

static void dkv_item(void *vctx, int64_t item, void *scratch) {
    const bwd_ctx *c = (const bwd_ctx *)vctx;
    const fdma_params *p = c->p;
    const int64_t Sk = p->Sk, D = p->D, g = p->H / p->Hkv;
    const int64_t kb = item % c->n_kb;
    const int64_t hki = (item / c->n_kb) % c->n_hk_items;
    const int64_t bi = item / (c->n_kb * c->n_hk_items);
    const int64_t j0 = kb * BWD_KB, j1 = j0 + BWD_KB < Sk ? j0 + BWD_KB : Sk, nj = j1 - j0;
    const int64_t b_lo = c->split_b ? bi : 0, b_hi = c->split_b ? bi + 1 : p->B;
    const int64_t hk_lo = c->split_hk ? hki : 0, hk_hi = c->split_hk ? hki + 1 : p->Hkv;
    char *base = (char *)scratch;
    float *K = (float *)(base + c->o2[0]), *V = (float *)(base + c->o2[1]);
    float *dk = (float *)(base + c->o2[2]), *dv = (float *)(base + c->o2[3]);
    float *qf = (float *)(base + c->o2[4]), *dof = (float *)(base + c->o2[5]);
    float *s = (float *)(base + c->o2[6]), *sc = (float *)(base + c->o2[7]), *zs = (float *)(base + c->o2[8]);
    float *db = (float *)(base + c->o2[9]); /* (db_nhx, db_rows, KB) */
    const int want_db = p->dbias != NULL;
    const int64_t hx0 = want_db ? bias_head(p, hk_lo * g) : 0;
    if (want_db) memset(db, 0, (size_t)(c->db_nhx * c->db_rows * BWD_KB) * sizeof(float));

    for (int64_t b = b_lo; b < b_hi; b++) {
        for (int64_t hk = hk_lo; hk < hk_hi; hk++) {
            cpu_load_kv_panel(K, p->k, p->k_stride, p, b, hk, j0, j1);
            cpu_load_kv_panel(V, p->v, p->v_stride, p, b, hk, j0, j1);
            memset(dk, 0, (size_t)(nj * D) * sizeof(float));
            memset(dv, 0, (size_t)(nj * D) * sizeof(float));
            for (int64_t h = hk * g; h < hk * g + g; h++) {
                for (int64_t i = 0; i < p->Sq; i++) {
                    const int64_t row = row_index(p, b, h, i);
                    const float lse = p->lse[row];
                    if (lse == -INFINITY) continue; /* fully masked row: no gradient */
                    cpu_row r;
                    cpu_row_init(&r, p, b, h, i);
                    if (j0 > r.jmax) continue;
                    if (p->window > 0) r.thr = c->thr[row];
                    cpu_load_row(qf, p->q, b * p->q_stride[0] + i * p->q_stride[1] + h * p->q_stride[2], D, p->dtype);
                    cpu_load_row(dof, p->dout, b * p->dout_stride[0] + i * p->dout_stride[1] + h * p->dout_stride[2],
                                 D, p->dtype);
                    cpu_row_scores(&r, p, qf, K, j0, j1, s, sc);
                    cpu_row_dropout(&r, p, j0, j1, zs);
                    const float Di = c->Di[row];
                    float *dbr = want_db ? db + ((bias_head(p, h) - hx0) * c->db_rows +
                                                 (c->db_rows == 1 ? 0 : i)) * BWD_KB
                                         : NULL;
                    for (int64_t j = j0; j < j1; j++) {
                        const float sj = s[j - j0];
                        if (sj == -INFINITY) continue;
                        const float pij = expf(sj - lse);                                /* p = exp(s - lse) */
                        const float pz = pij * zs[j - j0];
                        const float *vj = V + (j - j0) * D;
                        const float dp = cpu_dot(dof, vj, D) * zs[j - j0];              /* out = sum p zs v */
                        const float ds = pij * (dp - Di);                               /* softmax */
                        float dsc = ds;
                        if (p->softcap > 0.0f) {                                        /* sc = cap tanh(.) */
                            const float t = sc[j - j0] / p->softcap;
                            dsc = ds * (1.0f - t * t);
                        }
                        float *dvj = dv + (j - j0) * D, *dkj = dk + (j - j0) * D;
                        for (int64_t d = 0; d < D; d++) dvj[d] += pz * dof[d];        /* out = sum p zs v */
                        for (int64_t d = 0; d < D; d++) dkj[d] += dsc * qf[d];        /* s_pre = scale q.k */
                        if (dbr) dbr[j - j0] += ds;                                    /* s = sc + bias */
                    }
                }
            }
            for (int64_t j = j0; j < j1; j++) {
                float *dkj = dk + (j - j0) * D;
                for (int64_t d = 0; d < D; d++) dkj[d] *= p->scale;
                cpu_store_row(p->dk, b * p->dk_stride[0] + j * p->dk_stride[1] + hk * p->dk_stride[2], dkj, D,
                              p->dtype);
                cpu_store_row(p->dv, b * p->dv_stride[0] + j * p->dv_stride[1] + hk * p->dv_stride[2],
                              dv + (j - j0) * D, D, p->dtype);
            }
        }
    }

    if (want_db) {
        const int64_t bb = p->bias.dim[0] == 1 ? 0 : b_lo;
        for (int64_t x = 0; x < c->db_nhx; x++)
            for (int64_t ir = 0; ir < c->db_rows; ir++)
                for (int64_t j = j0; j < j1; j++) {
                    const int64_t idx = bb * p->dbias_stride[0] + (hx0 + x) * p->dbias_stride[1] +
                                        ir * p->dbias_stride[2] + j * p->dbias_stride[3];
                    cpu_store(p->dbias, idx, p->dtype, db[(x * c->db_rows + ir) * BWD_KB + (j - j0)]);
                }
    }
}

static const char *dtype_suffix(fdma_dtype d) {
    return d == FDMA_DTYPE_F16 ? "f16" : d == FDMA_DTYPE_BF16 ? "bf16" : "f32";
}

fdma_status fdma_cpu_bwd_plan(const fdma_params *p, fdma_plan *plan) {
    memset(plan, 0, sizeof(*plan));
    snprintf(plan->name, sizeof(plan->name), "cpu_bwd_%s", dtype_suffix(p->dtype));
    if (p->Sk > ((int64_t)1 << 34)) /* keeps per-thread scratch sizes and the Philox key counter in range */
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED, "Sk: the CPU backend takes up to 2^34 keys, got %lld",
                              (long long)p->Sk);
    plan->workspace_bytes = 0; /* per-thread host scratch, see the file comment */
    return FDMA_STATUS_OK;
}

static size_t carve(size_t *off, size_t bytes) {
    size_t at = *off;
    *off += cpu_align64(bytes);
    return at;
}

fdma_status fdma_cpu_bwd_run(const fdma_params *p, const fdma_plan *plan) {
    bwd_ctx c;
    memset(&c, 0, sizeof(c));
    c.p = p;
    const size_t Sk = (size_t)p->Sk, D = (size_t)p->D, nrows = (size_t)(p->B * p->H * p->Sq);
    c.Di = (float *)malloc(nrows * sizeof(float));
    c.thr = p->window > 0 ? (cpu_topk_thr *)malloc(nrows * sizeof(cpu_topk_thr)) : NULL;
    if (!c.Di || (p->window > 0 && !c.thr)) {
        free(c.Di);
        free(c.thr);
        return fdma_set_error(FDMA_STATUS_OUT_OF_MEMORY, "CPU backward: could not allocate %zu row statistics",
                              nrows);
    }

    /* pass 1 scratch: K, V panels, q, dout, dq rows, s, sc, zs, top-k keys */
    size_t off = 0;
    const size_t panel = BWD_KB * D * sizeof(float);
    c.o1[0] = carve(&off, panel);
    c.o1[1] = carve(&off, panel);
    c.o1[2] = carve(&off, BWD_RB * D * sizeof(float));
    c.o1[3] = carve(&off, BWD_RB * D * sizeof(float));
    c.o1[4] = carve(&off, BWD_RB * D * sizeof(float));
    c.o1[5] = carve(&off, BWD_KB * sizeof(float));
    c.o1[6] = carve(&off, BWD_KB * sizeof(float));
    c.o1[7] = carve(&off, BWD_KB * sizeof(float));
    c.o1[8] = carve(&off, p->window > 0 ? Sk * sizeof(cpu_topk_key) : 0);
    c.n_row_blocks = (p->Sq + BWD_RB - 1) / BWD_RB;
    fdma_status st = cpu_parallel_for(p->B * p->H * c.n_row_blocks, off, dq_item, &c);

    if (st == FDMA_STATUS_OK) {
        c.split_b = !p->dbias || p->bias.dim[0] != 1;
        c.split_hk = !p->dbias || p->bias.dim[1] != 1;
        c.n_b_items = c.split_b ? p->B : 1;
        c.n_hk_items = c.split_hk ? p->Hkv : 1;
        c.n_kb = (p->Sk + BWD_KB - 1) / BWD_KB;
        c.db_nhx = p->dbias && p->bias.dim[1] == p->H ? p->H / p->Hkv : 1;
        c.db_rows = p->dbias ? p->bias.dim[2] : 1;
        off = 0;
        for (int t = 0; t < 4; t++) c.o2[t] = carve(&off, panel);
        c.o2[4] = carve(&off, D * sizeof(float));
        c.o2[5] = carve(&off, D * sizeof(float));
        c.o2[6] = carve(&off, BWD_KB * sizeof(float));
        c.o2[7] = carve(&off, BWD_KB * sizeof(float));
        c.o2[8] = carve(&off, BWD_KB * sizeof(float));
        c.o2[9] = carve(&off, p->dbias ? (size_t)(c.db_nhx * c.db_rows) * BWD_KB * sizeof(float) : 0);
        st = cpu_parallel_for(c.n_b_items * c.n_hk_items * c.n_kb, off, dkv_item, &c);
    }
    free(c.Di);
    free(c.thr);
    return st;
}
