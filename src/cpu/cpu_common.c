/*
 * cpu_common.c -- the pieces shared by the CPU forward, backward and create_mask: the top-k threshold
 * (Wirth's selection, O(Sk) per row on average), one row's visibility, scores and dropout multipliers,
 * fp32 K/V panels, and the pthread parallel-for.
 *
 * Scores of row (b, h, i), key j (SPEC section 3):
 *   s_pre = scale * q[b,i,h,:] . k[b,j,hk,:]
 *   sc    = softcap * tanh(s_pre / softcap)     (= s_pre when softcap == 0)
 *   s     = sc + bias[b,h,i,j]                  (-inf when j is not visible)
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"
#include "philox.h"

cpu_topk_thr cpu_topk_threshold(cpu_topk_key *a, int64_t n, int64_t window) {
    cpu_topk_thr t = {1, 0.0f, 0};
    if (n <= window) return t;
    /* The window-th largest is the (n - window)-th smallest (0-based) in ascending order. Keys are
     * distinct (j differs), so the element found does not depend on the selection algorithm. */
    int64_t k = n - window, l = 0, m = n - 1;
    while (l < m) {
        cpu_topk_key x = a[k];
        int64_t i = l, j = m;
        do {
            while (cpu_topk_less(a[i].v, a[i].j, x.v, x.j)) i++;
            while (cpu_topk_less(x.v, x.j, a[j].v, a[j].j)) j--;
            if (i <= j) {
                cpu_topk_key tmp = a[i];
                a[i] = a[j];
                a[j] = tmp;
                i++;
                j--;
            }
        } while (i <= j);
        if (j < k) l = i;
        if (k < i) m = j;
    }
    t.keep_all = 0;
    t.v = a[k].v;
    t.j = a[k].j;
    return t;
}

void cpu_row_init(cpu_row *r, const fdma_params *p, int64_t b, int64_t h, int64_t i) {
    const int64_t g = p->H / p->Hkv;
    r->b = b;
    r->h = h;
    r->hk = h / g;
    r->i = i;
    r->jmax = p->causal ? i + p->Sk - p->Sq : p->Sk - 1;
    if (r->jmax > p->Sk - 1) r->jmax = p->Sk - 1;
    r->mask = NULL;
    r->mask_s = 0;
    if (p->mask.ptr) {
        r->mask = (const uint8_t *)p->mask.ptr + cpu_view_offset(&p->mask, b, h, r->hk, i, p->H);
        r->mask_s = p->mask.stride[3];
    }
    r->bias = p->bias.ptr;
    r->bias_off = p->bias.ptr ? cpu_view_offset(&p->bias, b, h, r->hk, i, p->H) : 0;
    r->bias_s = p->bias.stride[3];
    r->thr.keep_all = 1;
    r->thr.v = 0.0f;
    r->thr.j = 0;
}

void cpu_row_topk(cpu_row *r, const fdma_params *p, cpu_topk_key *keys) {
    int64_t n = 0;
    for (int64_t j = 0; j < p->Sk; j++) {
        if (!cpu_row_candidate(r, j)) continue;
        keys[n].v = cpu_load(r->bias, r->bias_off + j * r->bias_s, p->dtype);
        keys[n].j = j;
        n++;
    }
    r->thr = cpu_topk_threshold(keys, n, p->window);
}

void cpu_row_scores(const cpu_row *r, const fdma_params *p, const float *qf, const float *K, int64_t j0, int64_t j1,
                    float *s, float *sc) {
    const int64_t D = p->D;
    for (int64_t j = j0; j < j1; j++) {
        if (!cpu_row_visible(r, p, j)) {
            s[j - j0] = -INFINITY;
            if (sc) sc[j - j0] = 0.0f;
            continue;
        }
        float x = p->scale * cpu_dot(qf, K + (j - j0) * D, D);
        if (p->softcap > 0.0f) x = p->softcap * tanhf(x / p->softcap);
        if (sc) sc[j - j0] = x;
        if (r->bias) x += cpu_load(r->bias, r->bias_off + j * r->bias_s, p->dtype);
        s[j - j0] = x;
    }
}

void cpu_row_dropout(const cpu_row *r, const fdma_params *p, int64_t j0, int64_t j1, float *zs) {
    if (p->p_drop <= 0.0f) {
        for (int64_t j = j0; j < j1; j++) zs[j - j0] = 1.0f;
        return;
    }
    const uint32_t t = fdma_dropout_threshold(p->p_drop);
    const float keep_scale = 1.0f / (1.0f - p->p_drop);
    const uint64_t row = (uint64_t)((r->b * p->H + r->h) * p->Sq + r->i);
    /* rng_state (host memory on this backend) overrides the by-value pair */
    const uint64_t seed = p->rng_state ? p->rng_state[0] : p->seed;
    const uint64_t offset = p->rng_state ? p->rng_state[1] : p->offset;
    uint32_t w[4];
    int64_t group = -1;
    for (int64_t j = j0; j < j1; j++) {
        if ((j >> 2) != group) {
            group = j >> 2;
            fdma_dropout_words(seed, offset, row, (uint64_t)j, w);
        }
        zs[j - j0] = w[j & 3] >= t ? keep_scale : 0.0f;
    }
}

void cpu_load_kv_panel(float *dst, const void *src, const int64_t stride[4], const fdma_params *p, int64_t b,
                       int64_t hk, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; j++)
        cpu_load_row(dst + (j - j0) * p->D, src, b * stride[0] + j * stride[1] + hk * stride[2], p->D, p->dtype);
}

/* ---- parallel-for ---- */

typedef struct cpu_pool {
    atomic_llong next;
    int64_t n_items;
    cpu_task_fn fn;
    void *ctx;
} cpu_pool;

typedef struct cpu_worker {
    cpu_pool *pool;
    void *scratch;
} cpu_worker;

static void *cpu_worker_main(void *arg) {
    cpu_worker *w = (cpu_worker *)arg;
    for (;;) {
        int64_t item = (int64_t)atomic_fetch_add(&w->pool->next, 1);
        if (item >= w->pool->n_items) break;
        w->pool->fn(w->pool->ctx, item, w->scratch);
    }
    return NULL;
}

fdma_status cpu_parallel_for(int64_t n_items, size_t scratch_bytes, cpu_task_fn fn, void *ctx) {
    if (n_items <= 0) return FDMA_STATUS_OK;
    int64_t nt = fdma_get_num_threads();
    if (nt > n_items) nt = n_items;
    if (nt < 1) nt = 1;
    cpu_worker *workers = (cpu_worker *)calloc((size_t)nt, sizeof(cpu_worker));
    pthread_t *tids = (pthread_t *)calloc((size_t)nt, sizeof(pthread_t));
    int *started = (int *)calloc((size_t)nt, sizeof(int));
    cpu_pool pool;
    atomic_init(&pool.next, 0);
    pool.n_items = n_items;
    pool.fn = fn;
    pool.ctx = ctx;
    int ok = workers && tids && started;
    size_t bytes = cpu_align64(scratch_bytes > 0 ? scratch_bytes : 64);
    for (int64_t t = 0; ok && t < nt; t++) {
        workers[t].pool = &pool;
        workers[t].scratch = aligned_alloc(64, bytes);
        if (!workers[t].scratch) ok = 0;
    }
    if (!ok) {
        for (int64_t t = 0; workers && t < nt; t++) free(workers[t].scratch);
        free(workers);
        free(tids);
        free(started);
        return fdma_set_error(FDMA_STATUS_OUT_OF_MEMORY, "CPU backend: could not allocate %lld x %zu bytes of "
                              "per-thread scratch", (long long)nt, bytes);
    }
    /* Threads that fail to start are simply absent: the caller's own loop takes their items. */
    for (int64_t t = 1; t < nt; t++) started[t] = pthread_create(&tids[t], NULL, cpu_worker_main, &workers[t]) == 0;
    cpu_worker_main(&workers[0]);
    for (int64_t t = 1; t < nt; t++)
        if (started[t]) pthread_join(tids[t], NULL);
    for (int64_t t = 0; t < nt; t++) free(workers[t].scratch);
    free(workers);
    free(tids);
    free(started);
    return FDMA_STATUS_OK;
}
