/*
 * validate.c -- every argument check of SPEC section 7, in one place, before anything is computed or written.
 *
 * Order of checks (the first failure is reported): params pointer; device and dtype; sizes (>= 1, H % Hkv,
 * D <= 256, index products fit int64); options (scale, softcap, p_drop, window, causal, deterministic);
 * required pointers; each tensor's strides (non-negative, last dim contiguous, outputs not aliased by a zero
 * stride, byte extent fits int64); mask / bias / dbias broadcast dims ({B|1}, {H|Hkv|1}, {Sq|1}, Sk); the
 * dropout row count B*H*Sq < 2^32; rng_state 8-byte aligned (its memory kind is the CUDA backend's
 * fdma_cuda_check_pointers). CUDA-specific limits (D multiple of 8, compute capability) are the CUDA
 * plan function's job and come back as FDMA_STATUS_UNSUPPORTED.
 *
 * Messages name the argument, what was expected and what was given, e.g.
 *   "k: shape (2, 17, 3, 64) has Hkv=3 which does not divide H=8".
 */
#include <math.h>
#include <stdio.h>

#include "backend.h"
#include "validate.h"

#define INVALID FDMA_STATUS_INVALID_ARGUMENT

static const char *dtype_name(fdma_dtype d) {
    switch (d) {
    case FDMA_DTYPE_F32: return "F32";
    case FDMA_DTYPE_F16: return "F16";
    case FDMA_DTYPE_BF16: return "BF16";
    }
    return "?";
}

static int64_t dtype_bytes(fdma_dtype d) { return d == FDMA_DTYPE_F32 ? 4 : 2; }

/* a * b into *r; 0 on int64 overflow (all operands are >= 0 here). */
static int mul_ok(int64_t a, int64_t b, int64_t *r) { return !__builtin_mul_overflow(a, b, r); }
static int add_ok(int64_t a, int64_t b, int64_t *r) { return !__builtin_add_overflow(a, b, r); }

static int prod_ok(int64_t a, int64_t b, int64_t c, int64_t d) {
    int64_t r;
    return mul_ok(a, b, &r) && mul_ok(r, c, &r) && mul_ok(r, d, &r);
}

static const char *fmt_shape(char *buf, size_t n, const int64_t d[4]) {
    snprintf(buf, n, "(%lld, %lld, %lld, %lld)", (long long)d[0], (long long)d[1], (long long)d[2],
             (long long)d[3]);
    return buf;
}

static fdma_status check_device_dtype(fdma_device device, fdma_dtype dtype) {
    if (device != FDMA_DEVICE_CPU && device != FDMA_DEVICE_CUDA)
        return fdma_set_error(INVALID, "device: expected FDMA_DEVICE_CPU (0) or FDMA_DEVICE_CUDA (1), got %d",
                              (int)device);
    if (dtype != FDMA_DTYPE_F32 && dtype != FDMA_DTYPE_F16 && dtype != FDMA_DTYPE_BF16)
        return fdma_set_error(INVALID, "dtype: expected FDMA_DTYPE_F32 (0), F16 (1) or BF16 (2), got %d",
                              (int)dtype);
    if (device == FDMA_DEVICE_CUDA && dtype == FDMA_DTYPE_F32)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED,
                              "dtype: %s runs on the CPU backend only; the CUDA backend takes F16 or BF16",
                              dtype_name(dtype));
    return FDMA_STATUS_OK;
}

/*
 * A dense tensor argument of logical shape n[4] with element size `esize`: strides >= 0, stride[3] == 1
 * when n[3] > 1 (last dim contiguous), no zero stride on a dim of size > 1 for an output, and the furthest
 * element's byte offset fits int64.
 */
static fdma_status check_tensor(const char *name, const int64_t stride[4], const int64_t n[4], int64_t esize,
                                int is_output) {
    char sb[128], nb[128];
    for (int d = 0; d < 4; d++) {
        if (n[d] > 1 && stride[d] < 0)
            return fdma_set_error(INVALID, "%s: stride[%d] = %lld is negative (strides %s, shape %s)", name, d,
                                  (long long)stride[d], fmt_shape(sb, sizeof sb, stride),
                                  fmt_shape(nb, sizeof nb, n));
    }
    if (n[3] > 1 && stride[3] != 1)
        return fdma_set_error(INVALID, "%s: last dim must be contiguous (stride[3] == 1), got strides %s for shape %s",
                              name, fmt_shape(sb, sizeof sb, stride), fmt_shape(nb, sizeof nb, n));
    if (is_output) {
        for (int d = 0; d < 3; d++) {
            if (n[d] > 1 && stride[d] == 0)
                return fdma_set_error(INVALID,
                                      "%s: stride[%d] is 0 on a dim of size %lld; an output cannot be a broadcast "
                                      "view (strides %s, shape %s)",
                                      name, d, (long long)n[d], fmt_shape(sb, sizeof sb, stride),
                                      fmt_shape(nb, sizeof nb, n));
        }
    }
    int64_t extent = 0;
    for (int d = 0; d < 4; d++) {
        int64_t t;
        if (!mul_ok(n[d] - 1, stride[d], &t) || !add_ok(extent, t, &extent))
            return fdma_set_error(INVALID, "%s: strides %s with shape %s overflow int64 offsets", name,
                                  fmt_shape(sb, sizeof sb, stride), fmt_shape(nb, sizeof nb, n));
    }
    int64_t bytes;
    if (!add_ok(extent, 1, &bytes) || !mul_ok(bytes, esize, &bytes))
        return fdma_set_error(INVALID, "%s: strides %s with shape %s overflow int64 byte offsets", name,
                              fmt_shape(sb, sizeof sb, stride), fmt_shape(nb, sizeof nb, n));
    return FDMA_STATUS_OK;
}

/* A mask / bias / dbias view: dims ({B|1}, {H|Hkv|1}, {Sq|1}, Sk), strides >= 0, extent fits int64. */
static fdma_status check_view(const char *name, const fdma_view4 *v, int64_t esize, int64_t B, int64_t H,
                              int64_t Hkv, int64_t Sq, int64_t Sk) {
    char db[128];
    fmt_shape(db, sizeof db, v->dim);
    if (v->dim[0] != B && v->dim[0] != 1)
        return fdma_set_error(INVALID, "%s: dims %s: dim[0] = %lld, expected B=%lld or 1", name, db,
                              (long long)v->dim[0], (long long)B);
    if (v->dim[1] != H && v->dim[1] != Hkv && v->dim[1] != 1)
        return fdma_set_error(INVALID, "%s: dims %s: dim[1] = %lld, expected H=%lld, Hkv=%lld or 1", name, db,
                              (long long)v->dim[1], (long long)H, (long long)Hkv);
    if (v->dim[2] != Sq && v->dim[2] != 1)
        return fdma_set_error(INVALID, "%s: dims %s: dim[2] = %lld, expected Sq=%lld or 1", name, db,
                              (long long)v->dim[2], (long long)Sq);
    if (v->dim[3] != Sk)
        return fdma_set_error(INVALID, "%s: dims %s: dim[3] = %lld, expected Sk=%lld", name, db,
                              (long long)v->dim[3], (long long)Sk);
    char sb[128];
    int64_t extent = 0;
    for (int d = 0; d < 4; d++) {
        if (v->dim[d] > 1 && v->stride[d] < 0)
            return fdma_set_error(INVALID, "%s: stride[%d] = %lld is negative (strides %s, dims %s)", name, d,
                                  (long long)v->stride[d], fmt_shape(sb, sizeof sb, v->stride), db);
        int64_t t;
        if (v->dim[d] > 1 && (!mul_ok(v->dim[d] - 1, v->stride[d], &t) || !add_ok(extent, t, &extent)))
            return fdma_set_error(INVALID, "%s: strides %s with dims %s overflow int64 offsets", name,
                                  fmt_shape(sb, sizeof sb, v->stride), db);
    }
    int64_t bytes;
    if (!add_ok(extent, 1, &bytes) || !mul_ok(bytes, esize, &bytes))
        return fdma_set_error(INVALID, "%s: strides %s with dims %s overflow int64 byte offsets", name,
                              fmt_shape(sb, sizeof sb, v->stride), db);
    return FDMA_STATUS_OK;
}

static fdma_status check_sizes(const fdma_params *p) {
    const char *names[6] = {"B", "Sq", "Sk", "H", "Hkv", "D"};
    const int64_t vals[6] = {p->B, p->Sq, p->Sk, p->H, p->Hkv, p->D};
    for (int i = 0; i < 6; i++) {
        if (vals[i] < 1)
            return fdma_set_error(INVALID, "%s: expected >= 1, got %lld", names[i], (long long)vals[i]);
    }
    if (p->H % p->Hkv != 0)
        return fdma_set_error(INVALID, "k: shape (%lld, %lld, %lld, %lld) has Hkv=%lld which does not divide H=%lld",
                              (long long)p->B, (long long)p->Sk, (long long)p->Hkv, (long long)p->D,
                              (long long)p->Hkv, (long long)p->H);
    if (p->D > 256)
        return fdma_set_error(INVALID, "D: head dim must be in 1..256, got %lld", (long long)p->D);
    if (!prod_ok(p->B, p->Sq, p->H, p->D) || !prod_ok(p->B, p->Sk, p->Hkv, p->D) ||
        !prod_ok(p->B, p->H, p->Sq, p->Sk))
        return fdma_set_error(INVALID, "sizes: B=%lld, Sq=%lld, Sk=%lld, H=%lld, D=%lld: B*H*Sq*Sk or B*S*H*D "
                              "overflows int64 index math",
                              (long long)p->B, (long long)p->Sq, (long long)p->Sk, (long long)p->H, (long long)p->D);
    return FDMA_STATUS_OK;
}

fdma_status fdma_validate_attn(const fdma_params *p, fdma_op op, fdma_params *resolved) {
    fdma_status st;
    if (!p) return fdma_set_error(INVALID, "p: params pointer is NULL");
    if ((st = check_device_dtype(p->device, p->dtype)) != FDMA_STATUS_OK) return st;
    if ((st = check_sizes(p)) != FDMA_STATUS_OK) return st;

    /* options */
    if (isinf(p->scale))
        return fdma_set_error(INVALID, "scale: expected a finite value or NaN (= 1/sqrt(D)), got %g", (double)p->scale);
    if (!isfinite(p->softcap) || p->softcap < 0.0f)
        return fdma_set_error(INVALID, "softcap: expected a finite value >= 0 (0 = off), got %g", (double)p->softcap);
    if (!(p->p_drop >= 0.0f && p->p_drop < 1.0f))
        return fdma_set_error(INVALID, "p_drop: expected a dropout probability in [0, 1), got %g", (double)p->p_drop);
    if (p->window < 0)
        return fdma_set_error(INVALID, "window: expected 0 (off) or >= 1, got %lld", (long long)p->window);
    if (p->window > 0 && !p->bias.ptr)
        return fdma_set_error(INVALID, "window: window = %lld selects the top keys by bias, but bias is NULL",
                              (long long)p->window);
    if (p->causal != 0 && p->causal != 1)
        return fdma_set_error(INVALID, "causal: expected 0 or 1, got %d", (int)p->causal);
    if (p->deterministic != 0 && p->deterministic != 1)
        return fdma_set_error(INVALID, "deterministic: expected 0 or 1, got %d", (int)p->deterministic);

    /* required pointers */
    const int bwd = op == FDMA_OP_BACKWARD;
    if (op != FDMA_OP_FORWARD && op != FDMA_OP_BACKWARD)
        return fdma_set_error(INVALID, "op: expected FDMA_OP_FORWARD (0) or FDMA_OP_BACKWARD (1), got %d", (int)op);
    const struct { const char *name; const void *ptr; } req[] = {
        {"q", p->q}, {"k", p->k}, {"v", p->v}, {"out", p->out},
        {"lse", bwd ? (const void *)p->lse : (const void *)1},
        {"dout", bwd ? p->dout : (const void *)1},
        {"dq", bwd ? (const void *)p->dq : (const void *)1},
        {"dk", bwd ? (const void *)p->dk : (const void *)1},
        {"dv", bwd ? (const void *)p->dv : (const void *)1},
    };
    for (size_t i = 0; i < sizeof(req) / sizeof(req[0]); i++) {
        if (!req[i].ptr)
            return fdma_set_error(INVALID, "%s: required pointer is NULL (%s)", req[i].name,
                                  bwd ? "backward" : "forward");
    }
    if (bwd && p->dbias && !p->bias.ptr)
        return fdma_set_error(INVALID, "dbias: given, but bias is NULL (dbias is the gradient of the bias)");

    /* tensors */
    const int64_t es = dtype_bytes(p->dtype);
    const int64_t qn[4] = {p->B, p->Sq, p->H, p->D};
    const int64_t kn[4] = {p->B, p->Sk, p->Hkv, p->D};
    if ((st = check_tensor("q", p->q_stride, qn, es, 0)) != FDMA_STATUS_OK) return st;
    if ((st = check_tensor("k", p->k_stride, kn, es, 0)) != FDMA_STATUS_OK) return st;
    if ((st = check_tensor("v", p->v_stride, kn, es, 0)) != FDMA_STATUS_OK) return st;
    if ((st = check_tensor("out", p->out_stride, qn, es, !bwd)) != FDMA_STATUS_OK) return st;
    if (bwd) {
        if ((st = check_tensor("dout", p->dout_stride, qn, es, 0)) != FDMA_STATUS_OK) return st;
        if ((st = check_tensor("dq", p->dq_stride, qn, es, 1)) != FDMA_STATUS_OK) return st;
        if ((st = check_tensor("dk", p->dk_stride, kn, es, 1)) != FDMA_STATUS_OK) return st;
        if ((st = check_tensor("dv", p->dv_stride, kn, es, 1)) != FDMA_STATUS_OK) return st;
    }
    int64_t t;
    if (!prod_ok(p->B, p->H, p->Sq, 4) || (!bwd && p->probs && !(mul_ok(p->B * p->H * p->Sq, p->Sk, &t) &&
                                                                 mul_ok(t, es, &t))))
        return fdma_set_error(INVALID, "lse/probs: (B, H, Sq%s) = (%lld, %lld, %lld) overflows int64 byte offsets",
                              p->probs ? ", Sk" : "", (long long)p->B, (long long)p->H, (long long)p->Sq);

    /* mask, bias, dbias */
    if (p->mask.ptr &&
        (st = check_view("mask", &p->mask, 1, p->B, p->H, p->Hkv, p->Sq, p->Sk)) != FDMA_STATUS_OK)
        return st;
    if (p->bias.ptr &&
        (st = check_view("bias", &p->bias, es, p->B, p->H, p->Hkv, p->Sq, p->Sk)) != FDMA_STATUS_OK)
        return st;
    if (bwd && p->dbias) {
        fdma_view4 db = {p->dbias, {p->bias.dim[0], p->bias.dim[1], p->bias.dim[2], p->bias.dim[3]},
                         {p->dbias_stride[0], p->dbias_stride[1], p->dbias_stride[2], p->dbias_stride[3]}};
        if ((st = check_view("dbias", &db, es, p->B, p->H, p->Hkv, p->Sq, p->Sk)) != FDMA_STATUS_OK) return st;
        char sb[128], nb[128];
        for (int d = 0; d < 4; d++) {
            if (db.dim[d] > 1 && db.stride[d] == 0)
                return fdma_set_error(INVALID,
                                      "dbias: stride[%d] is 0 on a dim of size %lld; an output cannot be a "
                                      "broadcast view (strides %s, dims %s = bias dims)",
                                      d, (long long)db.dim[d], fmt_shape(sb, sizeof sb, db.stride),
                                      fmt_shape(nb, sizeof nb, db.dim));
        }
    }

    /* dropout rows are 32-bit in the Philox counter (SPEC section 5) */
    if (p->p_drop > 0.0f && p->B * p->H * p->Sq >= ((int64_t)1 << 32))
        return fdma_set_error(INVALID, "p_drop: dropout needs B*H*Sq < 2^32, got B*H*Sq = %lld",
                              (long long)(p->B * p->H * p->Sq));
    if (p->rng_state && ((uintptr_t)p->rng_state & 7u))
        return fdma_set_error(INVALID, "rng_state: expected an 8-byte aligned pointer to {seed, offset}, got %p",
                              (const void *)p->rng_state);

    *resolved = *p;
    if (isnan(p->scale)) resolved->scale = (float)(1.0 / sqrt((double)p->D));
    return FDMA_STATUS_OK;
}

fdma_status fdma_validate_mask_summary(const fdma_params *p) {
    fdma_status st;
    if (!p) return fdma_set_error(INVALID, "p: params pointer is NULL");
    if ((st = check_device_dtype(p->device, p->dtype)) != FDMA_STATUS_OK) return st;
    if ((st = check_sizes(p)) != FDMA_STATUS_OK) return st;
    if (!p->mask.ptr) return fdma_set_error(INVALID, "mask: required for a mask summary, got NULL");
    return check_view("mask", &p->mask, 1, p->B, p->H, p->Hkv, p->Sq, p->Sk);
}

/* Broadcast of two sizes: equal, or one of them 1; -1 when incompatible. */
static int64_t bcast(int64_t a, int64_t b) {
    if (a == b || b == 1) return a;
    if (a == 1) return b;
    return -1;
}

fdma_status fdma_validate_topk(const fdma_topk_params *p) {
    fdma_status st;
    char db[128], mb[128], ob[128];
    if (!p) return fdma_set_error(INVALID, "p: topk params pointer is NULL");
    if (p->device != FDMA_DEVICE_CPU && p->device != FDMA_DEVICE_CUDA)
        return fdma_set_error(INVALID, "device: expected FDMA_DEVICE_CPU (0) or FDMA_DEVICE_CUDA (1), got %d",
                              (int)p->device);
    if (p->dtype != FDMA_DTYPE_F32 && p->dtype != FDMA_DTYPE_F16 && p->dtype != FDMA_DTYPE_BF16)
        return fdma_set_error(INVALID, "dtype: expected FDMA_DTYPE_F32 (0), F16 (1) or BF16 (2), got %d",
                              (int)p->dtype);
    if (p->Sq < 1) return fdma_set_error(INVALID, "Sq: expected >= 1, got %lld", (long long)p->Sq);
    if (p->Sk < 1) return fdma_set_error(INVALID, "Sk: expected >= 1, got %lld", (long long)p->Sk);
    if (p->window < 1) return fdma_set_error(INVALID, "window: expected >= 1, got %lld", (long long)p->window);
    if (p->causal != 0 && p->causal != 1)
        return fdma_set_error(INVALID, "causal: expected 0 or 1, got %d", (int)p->causal);
    if (!p->bias.ptr) return fdma_set_error(INVALID, "bias: required (the top-k is taken over the bias), got NULL");
    if (!p->out) return fdma_set_error(INVALID, "out: required pointer is NULL");
    const int64_t es = p->dtype == FDMA_DTYPE_F32 ? 4 : 2;
    /* Each input's heads and batch are its own (any size >= 1); only Sq/1 and Sk are fixed. */
    const fdma_view4 *in[2] = {&p->bias, p->mask.ptr ? &p->mask : NULL};
    const char *nm[2] = {"bias", "mask"};
    for (int a = 0; a < 2; a++) {
        if (!in[a]) continue;
        if (in[a]->dim[0] < 1 || in[a]->dim[1] < 1)
            return fdma_set_error(INVALID, "%s: dims %s: dim[0] and dim[1] must be >= 1", nm[a],
                                  fmt_shape(db, sizeof db, in[a]->dim));
        if ((st = check_view(nm[a], in[a], a == 0 ? es : 1, in[a]->dim[0], in[a]->dim[1], in[a]->dim[1], p->Sq,
                             p->Sk)) != FDMA_STATUS_OK)
            return st;
    }
    int64_t e0 = p->bias.dim[0], e1 = p->bias.dim[1];
    int64_t rows = (p->causal || p->bias.dim[2] == p->Sq) ? p->Sq : 1;
    if (p->mask.ptr) {
        e0 = bcast(p->bias.dim[0], p->mask.dim[0]);
        e1 = bcast(p->bias.dim[1], p->mask.dim[1]);
        if (e0 < 0 || e1 < 0)
            return fdma_set_error(INVALID, "mask: dims %s do not broadcast with bias dims %s (dims 0 and 1 must be "
                                  "equal or 1)",
                                  fmt_shape(mb, sizeof mb, p->mask.dim), fmt_shape(db, sizeof db, p->bias.dim));
        if (p->mask.dim[2] == p->Sq) rows = p->Sq;
    }
    const int64_t want[4] = {e0, e1, rows, p->Sk};
    for (int d = 0; d < 4; d++) {
        if (p->out_dim[d] != want[d])
            return fdma_set_error(INVALID, "out: dims %s, expected %s (broadcast of bias%s, rows = %s)",
                                  fmt_shape(ob, sizeof ob, p->out_dim), fmt_shape(db, sizeof db, want),
                                  p->mask.ptr ? " and mask" : "", rows == p->Sq ? "Sq" : "1");
    }
    if (!prod_ok(want[0], want[1], want[2], want[3]))
        return fdma_set_error(INVALID, "out: dims %s overflow int64 index math", fmt_shape(ob, sizeof ob, want));
    int64_t extent = 0;
    for (int d = 0; d < 4; d++) {
        if (want[d] > 1 && p->out_stride[d] <= 0)
            return fdma_set_error(INVALID, "out: stride[%d] = %lld, expected > 0 for a dim of size %lld (strides %s)",
                                  d, (long long)p->out_stride[d], (long long)want[d],
                                  fmt_shape(ob, sizeof ob, p->out_stride));
        int64_t t;
        if (!mul_ok(want[d] - 1, p->out_stride[d], &t) || !add_ok(extent, t, &extent))
            return fdma_set_error(INVALID, "out: strides %s overflow int64 offsets",
                                  fmt_shape(ob, sizeof ob, p->out_stride));
    }
    return FDMA_STATUS_OK;
}
