/*
 * cpu.h -- shared pieces of the CPU backend (src/cpu/): element loads and stores, the per-row view of one
 * attention row (b, h, i) with its visibility rule, the top-k window threshold, and a small pthread
 * parallel-for. Internal to the library.
 *
 * Visibility of key j to row (b, h, i) (SPEC sections 3 and 6):
 *   candidate(j) = j <= jmax (jmax = i + Sk - Sq if causal, else Sk - 1)  and  mask[b, h, i, j] != 0
 *   visible(j)   = candidate(j) and (window == 0 or (bias[b, h, i, j], j) >= threshold of the row)
 * where the threshold is the window-th largest (bias, j) among the candidates (NaN smallest); when the row
 * has at most `window` candidates every candidate is kept. Forward and backward call the same functions,
 * so both see the same selection.
 */
#ifndef FDMA_CPU_H
#define FDMA_CPU_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "backend.h"

/* ---- elements ---- */

static inline float cpu_load(const void *base, int64_t idx, fdma_dtype dt) {
    switch (dt) {
    case FDMA_DTYPE_F16: return fdma_half_to_float(((const uint16_t *)base)[idx]);
    case FDMA_DTYPE_BF16: return fdma_bf16_to_float(((const uint16_t *)base)[idx]);
    default: return ((const float *)base)[idx];
    }
}

static inline void cpu_store(void *base, int64_t idx, fdma_dtype dt, float x) {
    switch (dt) {
    case FDMA_DTYPE_F16: ((uint16_t *)base)[idx] = fdma_float_to_half(x); break;
    case FDMA_DTYPE_BF16: ((uint16_t *)base)[idx] = fdma_float_to_bf16(x); break;
    default: ((float *)base)[idx] = x; break;
    }
}

/* dst[0..n) = the n elements at base[off ..] (contiguous), as fp32 */
static inline void cpu_load_row(float *dst, const void *base, int64_t off, int64_t n, fdma_dtype dt) {
    if (dt == FDMA_DTYPE_F32) {
        const float *s = (const float *)base + off;
        for (int64_t d = 0; d < n; d++) dst[d] = s[d];
    } else {
        for (int64_t d = 0; d < n; d++) dst[d] = cpu_load(base, off + d, dt);
    }
}

static inline void cpu_store_row(void *base, int64_t off, const float *src, int64_t n, fdma_dtype dt) {
    for (int64_t d = 0; d < n; d++) cpu_store(base, off + d, dt, src[d]);
}

/* Eight partial sums in a fixed order: vectorisable without -ffast-math, and still deterministic. */
static inline float cpu_dot(const float *a, const float *b, int64_t n) {
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int u = 0; u < 8; u++) acc[u] += a[d + u] * b[d + u];
    float tail = 0.0f;
    for (; d < n; d++) tail += a[d] * b[d];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

/* Index of the broadcast view element for query head h (kv head hk) of batch b, row i, key 0. */
static inline int64_t cpu_view_offset(const fdma_view4 *v, int64_t b, int64_t h, int64_t hk, int64_t i,
                                      int64_t H) {
    int64_t bb = v->dim[0] == 1 ? 0 : b;
    int64_t hx = v->dim[1] == 1 ? 0 : (v->dim[1] == H ? h : hk);
    int64_t ii = v->dim[2] == 1 ? 0 : i;
    return bb * v->stride[0] + hx * v->stride[1] + ii * v->stride[2];
}

/* ---- the top-k window ---- */

/* The order of SPEC section 6: (value, j) lexicographic, NaN below every number (including -inf). */
static inline int cpu_topk_less(float va, int64_t ja, float vb, int64_t jb) {
    int na = isnan(va), nb = isnan(vb);
    if (na != nb) return na;
    if (!na && va != vb) return va < vb;
    return ja < jb;
}

typedef struct cpu_topk_key {
    float v;
    int64_t j;
} cpu_topk_key;

typedef struct cpu_topk_thr {
    int32_t keep_all; /* the row has at most `window` candidates */
    float v;          /* otherwise: keep (bias_j, j) >= (v, j) */
    int64_t j;
} cpu_topk_thr;

/* Threshold of one row from its n candidates keys[0..n) (reordered in place). */
cpu_topk_thr cpu_topk_threshold(cpu_topk_key *keys, int64_t n, int64_t window);

static inline int cpu_topk_keeps(const cpu_topk_thr *t, float v, int64_t j) {
    return t->keep_all || !cpu_topk_less(v, j, t->v, t->j);
}

/* ---- one attention row ---- */

typedef struct cpu_row {
    int64_t b, h, hk, i;
    int64_t jmax;        /* last key allowed by causality (Sk - 1 when not causal; < 0: none) */
    const uint8_t *mask; /* mask at (b, h, i, 0) or NULL; element j at mask[j * mask_s] */
    int64_t mask_s;
    const void *bias;    /* bias base pointer or NULL; element j at index bias_off + j * bias_s */
    int64_t bias_off, bias_s;
    cpu_topk_thr thr;    /* window > 0 only */
} cpu_row;

/* Fill everything but thr. */
void cpu_row_init(cpu_row *r, const fdma_params *p, int64_t b, int64_t h, int64_t i);

static inline int cpu_row_candidate(const cpu_row *r, int64_t j) {
    return j <= r->jmax && (!r->mask || r->mask[j * r->mask_s]);
}

/* Compute r->thr for a params with window > 0 (scratch: Sk keys). */
void cpu_row_topk(cpu_row *r, const fdma_params *p, cpu_topk_key *scratch);

static inline int cpu_row_visible(const cpu_row *r, const fdma_params *p, int64_t j) {
    if (!cpu_row_candidate(r, j)) return 0;
    if (p->window > 0) return cpu_topk_keeps(&r->thr, cpu_load(r->bias, r->bias_off + j * r->bias_s, p->dtype), j);
    return 1;
}

/*
 * Scores of keys j0..j1 of row r: s[j - j0] = softcap(scale * q . K[j]) + bias, or -inf where not visible.
 * sc (optional) receives the score after softcap, before the bias (for the softcap derivative).
 * K: fp32 panel, key j at K + (j - j0) * D.
 */
void cpu_row_scores(const cpu_row *r, const fdma_params *p, const float *qf, const float *K, int64_t j0, int64_t j1,
                    float *s, float *sc);

/* Dropout keep bits of row r for keys j0..j1 as multipliers: zs[j - j0] = keep ? 1/(1-p_drop) : 0. */
void cpu_row_dropout(const cpu_row *r, const fdma_params *p, int64_t j0, int64_t j1, float *zs);

/* fp32 panel of rows j0..j1 of k or v (B, Sk, Hkv, D) at (b, hk): dst[(j - j0) * D + d] */
void cpu_load_kv_panel(float *dst, const void *src, const int64_t stride[4], const fdma_params *p, int64_t b,
                       int64_t hk, int64_t j0, int64_t j1);

/* ---- threads ---- */

/* Run fn(ctx, item, scratch) for item in 0..n_items over fdma_get_num_threads() threads; each thread owns
 * a scratch of scratch_bytes (64-byte aligned). Items must be independent; results do not depend on the
 * number of threads or on which thread runs which item. Returns OUT_OF_MEMORY before running anything if
 * the scratch cannot be allocated. */
typedef void (*cpu_task_fn)(void *ctx, int64_t item, void *scratch);
fdma_status cpu_parallel_for(int64_t n_items, size_t scratch_bytes, cpu_task_fn fn, void *ctx);

/* Round a byte count up to 64 (for carving one scratch into aligned pieces). */
static inline size_t cpu_align64(size_t n) { return (n + 63) & ~(size_t)63; }

#endif /* FDMA_CPU_H */
