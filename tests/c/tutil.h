/*
 * tutil.h -- shared pieces of the C test binary test_fdma (tests/c/): the pass/fail counters, a seeded RNG,
 * the tests' own fp16/bf16 rounding (written independently of src/dtype.c), strided test tensors that are
 * NaN-poisoned before every run, and the naive float64 reference of SPEC sections 3-6 (tests/c/ref.c).
 */
#ifndef FDMA_TUTIL_H
#define FDMA_TUTIL_H

#include <stddef.h>
#include <stdint.h>

#include "flash_dma.h"

/* ---- counting ---- */
extern int t_passed, t_failed;
/* Record one case: prints "[ OK ] line" or "[FAIL] line". Returns ok. */
int t_report(int ok, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* ---- random numbers (splitmix64; deterministic) ---- */
void t_seed(uint64_t s);
uint64_t t_u64(void);
double t_uniform(void); /* [0, 1) */
double t_normal(void);

/* ---- element types, independent of the library ---- */
double t_round(double x, fdma_dtype dt);         /* nearest value of dt (ties to even), inf on overflow */
void t_store(void *base, int64_t idx, fdma_dtype dt, double x); /* x must be representable in dt */
double t_load(const void *base, int64_t idx, fdma_dtype dt);
int64_t t_esize(fdma_dtype dt);
const char *t_dtype_name(fdma_dtype dt);

/* ---- test tensors: logical 4-D shape n[] stored with one of a few layouts ---- */
enum { LAYOUT_CONTIGUOUS = 0, LAYOUT_PADDED = 1, LAYOUT_DIM12_SWAPPED = 2, N_LAYOUTS = 3 };
typedef struct ttensor {
    void *ptr;
    int64_t n[4], stride[4];
    int64_t numel_alloc;
    fdma_dtype dt;
} ttensor;
ttensor tt_new(const int64_t n[4], int layout, fdma_dtype dt);
void tt_free(ttensor *t);
void tt_poison(ttensor *t);                     /* every allocated element = NaN */
int64_t tt_index(const ttensor *t, int64_t a, int64_t b, int64_t c, int64_t d);
double tt_get(const ttensor *t, int64_t a, int64_t b, int64_t c, int64_t d);
void tt_set(ttensor *t, int64_t a, int64_t b, int64_t c, int64_t d, double x);
/* Fill with normal draws rounded to dt; also write them to dense (contiguous (n0..n3) doubles) if given. */
void tt_fill_normal(ttensor *t, double *dense, double sd);
/* Read back to a dense array of doubles. */
void tt_read(const ttensor *t, double *dense);

/* ---- error measure: max |x - ref| (same-signed infinities count 0; NaN in x counts +inf) ---- */
double t_maxdiff(const double *x, const double *ref, int64_t n);
double t_maxabs_finite(const double *ref, int64_t n);

/* ---- the naive float64 reference (ref.c) ---- */
typedef struct ref_params {
    int64_t B, Sq, Sk, H, Hkv, D;
    double scale, softcap, p_drop;
    int causal;
    int64_t window;
    uint64_t seed, offset;
    const double *q, *k, *v;     /* dense (B, Sq, H, D), (B, Sk, Hkv, D) */
    const uint8_t *mask;         /* dense over mdim, or NULL */
    int64_t mdim[4];
    const double *bias;          /* dense over bdim, or NULL */
    int64_t bdim[4];
    const double *dout;          /* dense (B, Sq, H, D), or NULL for forward only */
    int lowp;                    /* 1: emulate "the same math at the backend precision" (dtype dt) */
    fdma_dtype dt;
} ref_params;

typedef struct ref_result {
    double *out, *lse, *probs;   /* (B, Sq, H, D), (B, H, Sq), (B, H, Sq, Sk) */
    double *dq, *dk, *dv, *dbias;/* dbias over bdim */
} ref_result;

void ref_attention(const ref_params *r, ref_result *o); /* allocates o's arrays */
void ref_free(ref_result *o);
/* SPEC section 6 keep decision for one row, naive O(Sk^2): bias[j] (stride bs), cand[j] 0/1 */
void ref_topk_row(const double *bias, int64_t bs, const uint8_t *cand, int64_t Sk, int64_t window, uint8_t *keep);

/* ---- test groups ---- */
void test_dtype(void);
void test_philox_dropout(void);
void test_attention_grid(void);
void test_finite_differences(void);
void test_topk(void);
void test_invalid(void);
void test_misc(void);

#endif /* FDMA_TUTIL_H */
