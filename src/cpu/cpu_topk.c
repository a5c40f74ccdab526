/*
 * cpu_topk.c -- fdma_create_mask on the CPU (SPEC section 6): the keep mask of the dynamic top-k window.
 *
 * out dims (O0, O1, R, Sk): O0, O1 = broadcast of bias and mask dims 0 and 1; R = Sq when causal or either
 * input has Sq rows, else 1 (validated in src/validate.c). For each out row (o0, o1, i):
 *   candidates = { j : mask[o0, o1, i, j] (if mask) and j <= i + Sk - Sq (if causal) }
 *   keep       = all candidates if there are at most `window`, else the `window` largest (bias, j)
 *                (ties in bias -> larger j; NaN smallest), found with the same threshold as the attention
 *                forward and backward (cpu_topk_threshold).
 * Work item = block of 16 out rows; scratch = Sk keys per thread.
 */
#include "cpu.h"

enum { TOPK_ROWS = 16 };

typedef struct topk_ctx {
    const fdma_topk_params *p;
    int64_t n_rows;
} topk_ctx;

static int64_t topk_view_offset(const fdma_view4 *v, int64_t o0, int64_t o1, int64_t i) {
    return (v->dim[0] == 1 ? 0 : o0) * v->stride[0] + (v->dim[1] == 1 ? 0 : o1) * v->stride[1] +
           (v->dim[2] == 1 ? 0 : i) * v->stride[2];
}

static void topk_item(void *vctx, int64_t item, void *scratch) {
    const topk_ctx *c = (const topk_ctx *)vctx;
    const fdma_topk_params *p = c->p;
    const int64_t Sk = p->Sk, R = p->out_dim[2], O1 = p->out_dim[1];
    cpu_topk_key *keys = (cpu_topk_key *)scratch;
    for (int64_t row = item * TOPK_ROWS; row < c->n_rows && row < (item + 1) * TOPK_ROWS; row++) {
        const int64_t i = row % R, o1 = (row / R) % O1, o0 = row / (R * O1);
        const int64_t jmax = p->causal ? (i + Sk - p->Sq < Sk - 1 ? i + Sk - p->Sq : Sk - 1) : Sk - 1;
        const int64_t boff = topk_view_offset(&p->bias, o0, o1, i);
        const uint8_t *mask = p->mask.ptr ? (const uint8_t *)p->mask.ptr + topk_view_offset(&p->mask, o0, o1, i) : NULL;
        int64_t n = 0;
        for (int64_t j = 0; j <= jmax; j++) {
            if (mask && !mask[j * p->mask.stride[3]]) continue;
            keys[n].v = cpu_load(p->bias.ptr, boff + j * p->bias.stride[3], p->dtype);
            keys[n].j = j;
            n++;
        }
        const cpu_topk_thr thr = cpu_topk_threshold(keys, n, p->window);
        uint8_t *out = p->out + o0 * p->out_stride[0] + o1 * p->out_stride[1] + i * p->out_stride[2];
        for (int64_t j = 0; j < Sk; j++) {
            int keep = j <= jmax && (!mask || mask[j * p->mask.stride[3]]) &&
                       cpu_topk_keeps(&thr, cpu_load(p->bias.ptr, boff + j * p->bias.stride[3], p->dtype), j);
            out[j * p->out_stride[3]] = (uint8_t)keep;
        }
    }
}

fdma_status fdma_cpu_create_mask(const fdma_topk_params *p) {
    topk_ctx c;
    c.p = p;
    c.n_rows = p->out_dim[0] * p->out_dim[1] * p->out_dim[2];
    return cpu_parallel_for((c.n_rows + TOPK_ROWS - 1) / TOPK_ROWS, (size_t)p->Sk * sizeof(cpu_topk_key), topk_item,
                            &c);
}
