/*
 * cpu_fwd.c -- the CPU forward pass (SPEC section 3), fp32 math for fp32 / fp16 / bf16 inputs.
 *
 * Work item = (b, h, block of RB query rows); items run in parallel and each writes only its own rows of
 * out, lse and probs, so results do not depend on the thread count. Per item:
 *   1. for each key block of KB keys: K panel -> fp32; s[r, j] = scores of row r (cpu_row_scores: scale,
 *      softcap, bias, -inf where masked / causal / outside the top-k window)
 *   2. per row: m = max_j s; lse = m + log sum_j exp(s - m); p = exp(s - lse); probs = p
 *      (no visible key, i.e. m == -inf: p = 0, lse = -inf, out = 0)
 *   3. for each key block: V panel -> fp32; out[r] = sum_j p[r, j] * z[r, j] / (1 - p_drop) * V[j]
 * Scratch per thread: RB x Sk scores, two KB x D panels, RB x D accumulators, Sk top-k keys (window only).
 *
 * Shapes: q, out (B, Sq, H, D); k, v (B, Sk, Hkv, D); lse (B, H, Sq); probs (B, H, Sq, Sk).
 */
#include <stdio.h>
#include <string.h>

#include "cpu.h"

enum { FWD_RB = 32, FWD_KB = 64 };

typedef struct fwd_ctx {
    const fdma_params *p;
    int64_t n_row_blocks;
    size_t off_panel, off_zs, off_acc, off_q, off_keys;
} fwd_ctx;

static void fwd_item(void *vctx, int64_t item, void *scratch) {
    const fwd_ctx *c = (const fwd_ctx *)vctx;
    const fdma_params *p = c->p;
    const int64_t Sq = p->Sq, Sk = p->Sk, H = p->H, D = p->D, g = p->H / p->Hkv;
    const int64_t b = item / (H * c->n_row_blocks);
    const int64_t h = (item / c->n_row_blocks) % H;
    const int64_t i0 = (item % c->n_row_blocks) * FWD_RB;
    const int64_t nr = Sq - i0 < FWD_RB ? Sq - i0 : FWD_RB;
    const int64_t hk = h / g;
    char *base = (char *)scratch;
    float *s = (float *)base;                          /* (RB, Sk) scores, then probabilities */
    float *panel = (float *)(base + c->off_panel);     /* (KB, D) K or V rows */
    float *zs = (float *)(base + c->off_zs);           /* (KB) dropout multipliers */
    float *acc = (float *)(base + c->off_acc);         /* (RB, D) output accumulators */
    float *qf = (float *)(base + c->off_q);            /* (RB, D) query rows */
    cpu_topk_key *keys = (cpu_topk_key *)(base + c->off_keys);

    cpu_row rows[FWD_RB];
    int64_t jmax = -1;
    for (int64_t r = 0; r < nr; r++) {
        cpu_row_init(&rows[r], p, b, h, i0 + r);
        if (p->window > 0) cpu_row_topk(&rows[r], p, keys);
        cpu_load_row(qf + r * D, p->q, b * p->q_stride[0] + (i0 + r) * p->q_stride[1] + h * p->q_stride[2], D,
                     p->dtype);
        if (rows[r].jmax > jmax) jmax = rows[r].jmax;
    }

    /* 1. s = softcap(scale * q k^T) + bias, -inf where not visible */
    for (int64_t r = 0; r < nr; r++)
        for (int64_t j = 0; j < Sk; j++) s[r * Sk + j] = -INFINITY;
    for (int64_t j0 = 0; j0 <= jmax; j0 += FWD_KB) {
        int64_t j1 = j0 + FWD_KB < Sk ? j0 + FWD_KB : Sk;
        cpu_load_kv_panel(panel, p->k, p->k_stride, p, b, hk, j0, j1);
        for (int64_t r = 0; r < nr; r++) cpu_row_scores(&rows[r], p, qf + r * D, panel, j0, j1, s + r * Sk + j0, NULL);
    }

    /* 2. lse = log sum exp s ; p = exp(s - lse) */
    float lse[FWD_RB];
    for (int64_t r = 0; r < nr; r++) {
        float *sr = s + r * Sk;
        float m = -INFINITY;
        for (int64_t j = 0; j < Sk; j++) m = sr[j] > m ? sr[j] : m;
        if (m == -INFINITY) {
            lse[r] = -INFINITY;
            for (int64_t j = 0; j < Sk; j++) sr[j] = 0.0f;
            continue;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < Sk; j++) sum += expf(sr[j] - m);
        lse[r] = m + logf(sum);
        for (int64_t j = 0; j < Sk; j++) sr[j] = expf(sr[j] - lse[r]);
    }

    /* 3. out = (p * z / (1 - p_drop)) v */
    memset(acc, 0, (size_t)(nr * D) * sizeof(float));
    for (int64_t j0 = 0; j0 <= jmax; j0 += FWD_KB) {
        int64_t j1 = j0 + FWD_KB < Sk ? j0 + FWD_KB : Sk;
        cpu_load_kv_panel(panel, p->v, p->v_stride, p, b, hk, j0, j1);
        for (int64_t r = 0; r < nr; r++) {
            cpu_row_dropout(&rows[r], p, j0, j1, zs);
            const float *pr = s + r * Sk;
            float *ar = acc + r * D;
            for (int64_t j = j0; j < j1; j++) {
                float w = pr[j] * zs[j - j0];
                if (w == 0.0f) continue;
                const float *vj = panel + (j - j0) * D;
                for (int64_t d = 0; d < D; d++) ar[d] += w * vj[d];
            }
        }
    }

    for (int64_t r = 0; r < nr; r++) {
        const int64_t i = i0 + r;
        cpu_store_row(p->out, b * p->out_stride[0] + i * p->out_stride[1] + h * p->out_stride[2], acc + r * D, D,
                      p->dtype);
        const int64_t row = (b * H + h) * Sq + i;
        if (p->lse) p->lse[row] = lse[r];
        if (p->probs) cpu_store_row(p->probs, row * Sk, s + r * Sk, Sk, p->dtype);
    }
}

static const char *dtype_suffix(fdma_dtype d) {
    return d == FDMA_DTYPE_F16 ? "f16" : d == FDMA_DTYPE_BF16 ? "bf16" : "f32";
}

fdma_status fdma_cpu_fwd_plan(const fdma_params *p, fdma_plan *plan) {
    memset(plan, 0, sizeof(*plan));
    snprintf(plan->name, sizeof(plan->name), "cpu_fwd_%s", dtype_suffix(p->dtype));
    if (p->Sk > ((int64_t)1 << 34)) /* keeps per-thread scratch sizes and the Philox key counter in range */
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED, "Sk: the CPU backend takes up to 2^34 keys, got %lld",
                              (long long)p->Sk);
    plan->workspace_bytes = 0; /* the CPU backend keeps its scratch in per-thread host allocations */
    return FDMA_STATUS_OK;
}

fdma_status fdma_cpu_fwd_run(const fdma_params *p, const fdma_plan *plan) {
    fwd_ctx c;
    c.p = p;
    c.n_row_blocks = (p->Sq + FWD_RB - 1) / FWD_RB;
    const size_t Sk = (size_t)p->Sk, D = (size_t)p->D;
    size_t off = cpu_align64(FWD_RB * Sk * sizeof(float));
    c.off_panel = off;
    off += cpu_align64(FWD_KB * D * sizeof(float));
    c.off_zs = off;
    off += cpu_align64(FWD_KB * sizeof(float));
    c.off_acc = off;
    off += cpu_align64(FWD_RB * D * sizeof(float));
    c.off_q = off;
    off += cpu_align64(FWD_RB * D * sizeof(float));
    c.off_keys = off;
    off += p->window > 0 ? cpu_align64(Sk * sizeof(cpu_topk_key)) : 0;
    return cpu_parallel_for(p->B * p->H * c.n_row_blocks, off, fwd_item, &c);
}
