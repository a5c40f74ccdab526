/*
 * tutil.c -- counters, RNG, the tests' own fp16/bf16 rounding and test tensors (see tutil.h).
 *
 * The fp16/bf16 code here is deliberately different from src/dtype.c (frexp/ldexp arithmetic on doubles
 * instead of bit manipulation), so that test_dtype compares two independent implementations.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tutil.h"

int t_passed, t_failed;

int t_report(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("[%s] ", ok ? " OK " : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    fflush(stdout);
    if (ok)
        t_passed++;
    else
        t_failed++;
    return ok;
}

static uint64_t t_state = 0x9e3779b97f4a7c15ull;
void t_seed(uint64_t s) { t_state = s * 0x9e3779b97f4a7c15ull + 1; }
uint64_t t_u64(void) {
    uint64_t z = (t_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
double t_uniform(void) { return (double)(t_u64() >> 11) * (1.0 / 9007199254740992.0); }
double t_normal(void) {
    double u1 = t_uniform(), u2 = t_uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

int64_t t_esize(fdma_dtype dt) { return dt == FDMA_DTYPE_F32 ? 4 : 2; }
const char *t_dtype_name(fdma_dtype dt) {
    return dt == FDMA_DTYPE_F16 ? "f16" : dt == FDMA_DTYPE_BF16 ? "bf16" : "f32";
}

/* Round to a binary format with `mbits` explicit mantissa bits, minimum normal exponent emin and the
 * overflow threshold `ovf` (the first value that rounds to inf). */
static double round_fmt(double x, int mbits, int emin, double ovf) {
    if (isnan(x) || isinf(x) || x == 0.0) return x;
    double a = fabs(x);
    if (a >= ovf) return copysign(INFINITY, x);
    int e;
    frexp(a, &e); /* a = m 2^e, m in [0.5, 1): exponent of the leading bit is e - 1 */
    int E = e - 1 < emin ? emin : e - 1;
    double quantum = ldexp(1.0, E - mbits);
    return copysign(nearbyint(a / quantum) * quantum, x); /* default rounding mode: ties to even */
}

double t_round(double x, fdma_dtype dt) {
    switch (dt) {
    case FDMA_DTYPE_F16: return round_fmt(x, 10, -14, 65520.0);
    case FDMA_DTYPE_BF16: return round_fmt(x, 7, -126, ldexp(2.0 - ldexp(1.0, -8), 127));
    default: return (double)(float)x;
    }
}

void t_store(void *base, int64_t idx, fdma_dtype dt, double x) {
    if (dt == FDMA_DTYPE_F32) {
        ((float *)base)[idx] = (float)x;
    } else if (dt == FDMA_DTYPE_BF16) {
        float f = (float)x;
        uint32_t u;
        memcpy(&u, &f, 4);
        ((uint16_t *)base)[idx] = (uint16_t)(u >> 16);
    } else {
        uint16_t sign = signbit(x) ? 0x8000 : 0, bits;
        double a = fabs(x);
        if (isnan(x))
            bits = 0x7e00;
        else if (isinf(x))
            bits = 0x7c00;
        else if (a < ldexp(1.0, -14))
            bits = (uint16_t)(a / ldexp(1.0, -24));
        else {
            int e;
            frexp(a, &e);
            int E = e - 1;
            bits = (uint16_t)(((E + 15) << 10) | (int)((a / ldexp(1.0, E) - 1.0) * 1024.0));
        }
        ((uint16_t *)base)[idx] = sign | bits;
    }
}

double t_load(const void *base, int64_t idx, fdma_dtype dt) {
    if (dt == FDMA_DTYPE_F32) return ((const float *)base)[idx];
    uint16_t b = ((const uint16_t *)base)[idx];
    if (dt == FDMA_DTYPE_BF16) {
        uint32_t u = (uint32_t)b << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    int E = (b >> 10) & 31, m = b & 1023;
    double v = E == 0 ? ldexp(m, -24) : E == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, E - 25);
    return (b & 0x8000) ? -v : v;
}

ttensor tt_new(const int64_t n[4], int layout, fdma_dtype dt) {
    ttensor t;
    memset(&t, 0, sizeof(t));
    memcpy(t.n, n, sizeof(t.n));
    t.dt = dt;
    if (layout == LAYOUT_PADDED) {
        int64_t n3p = n[3] + 3;
        t.stride[3] = 1;
        t.stride[2] = n3p;
        t.stride[1] = n[2] * n3p;
        t.stride[0] = n[1] * n[2] * n3p;
        t.numel_alloc = n[0] * n[1] * n[2] * n3p;
    } else if (layout == LAYOUT_DIM12_SWAPPED) {
        t.stride[3] = 1;
        t.stride[1] = n[3];
        t.stride[2] = n[1] * n[3];
        t.stride[0] = n[1] * n[2] * n[3];
        t.numel_alloc = n[0] * n[1] * n[2] * n[3];
    } else {
        fdma_strides_contiguous(t.stride, n[0], n[1], n[2], n[3]);
        t.numel_alloc = n[0] * n[1] * n[2] * n[3];
    }
    if (t.numel_alloc < 1) t.numel_alloc = 1;
    t.ptr = malloc((size_t)(t.numel_alloc * t_esize(dt)));
    tt_poison(&t);
    return t;
}

void tt_free(ttensor *t) {
    free(t->ptr);
    t->ptr = NULL;
}

void tt_poison(ttensor *t) {
    for (int64_t e = 0; e < t->numel_alloc; e++) t_store(t->ptr, e, t->dt, NAN);
}

int64_t tt_index(const ttensor *t, int64_t a, int64_t b, int64_t c, int64_t d) {
    return a * t->stride[0] + b * t->stride[1] + c * t->stride[2] + d * t->stride[3];
}
double tt_get(const ttensor *t, int64_t a, int64_t b, int64_t c, int64_t d) {
    return t_load(t->ptr, tt_index(t, a, b, c, d), t->dt);
}
void tt_set(ttensor *t, int64_t a, int64_t b, int64_t c, int64_t d, double x) {
    t_store(t->ptr, tt_index(t, a, b, c, d), t->dt, x);
}

void tt_fill_normal(ttensor *t, double *dense, double sd) {
    int64_t e = 0;
    for (int64_t a = 0; a < t->n[0]; a++)
        for (int64_t b = 0; b < t->n[1]; b++)
            for (int64_t c = 0; c < t->n[2]; c++)
                for (int64_t d = 0; d < t->n[3]; d++, e++) {
                    double x = t_round(sd * t_normal(), t->dt);
                    tt_set(t, a, b, c, d, x);
                    if (dense) dense[e] = x;
                }
}

void tt_read(const ttensor *t, double *dense) {
    int64_t e = 0;
    for (int64_t a = 0; a < t->n[0]; a++)
        for (int64_t b = 0; b < t->n[1]; b++)
            for (int64_t c = 0; c < t->n[2]; c++)
                for (int64_t d = 0; d < t->n[3]; d++, e++) dense[e] = tt_get(t, a, b, c, d);
}

double t_maxdiff(const double *x, const double *ref, int64_t n) {
    double m = 0.0;
    for (int64_t e = 0; e < n; e++) {
        if (isnan(x[e])) return INFINITY;
        if (isinf(x[e]) && isinf(ref[e]) && !signbit(x[e]) == !signbit(ref[e])) continue;
        double d = fabs(x[e] - ref[e]);
        if (isnan(d) || d > m) m = isnan(d) ? INFINITY : d;
    }
    return m;
}

double t_maxabs_finite(const double *ref, int64_t n) {
    double m = 0.0;
    for (int64_t e = 0; e < n; e++)
        if (isfinite(ref[e]) && fabs(ref[e]) > m) m = fabs(ref[e]);
    return m;
}
