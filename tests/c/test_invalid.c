/*
 * test_invalid.c -- SPEC section 7: every invalid argument returns its status, leaves a message in
 * fdma_last_error() that names the argument, and writes nothing (every output buffer is poisoned before the
 * call and compared byte for byte after it). One valid CPU fp32 call is mutated one field at a time.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tutil.h"

enum { B_ = 2, SQ = 5, SK = 7, H_ = 4, HKV = 2, D_ = 8 };

typedef struct env {
    float q[B_ * SQ * H_ * D_], k[B_ * SK * HKV * D_], v[B_ * SK * HKV * D_], dout[B_ * SQ * H_ * D_];
    float bias[B_ * H_ * SQ * SK];
    uint8_t mask[SQ * SK];
    /* outputs, poisoned */
    float out[B_ * SQ * H_ * D_], lse[B_ * H_ * SQ], probs[B_ * H_ * SQ * SK];
    float dq[B_ * SQ * H_ * D_], dk[B_ * SK * HKV * D_], dv[B_ * SK * HKV * D_], dbias[B_ * H_ * SQ * SK];
    uint8_t topk_out[B_ * H_ * SQ * SK];
} env;

static env E, SNAP;
static uint64_t RNG_WORDS[3]; /* 8-byte aligned: RNG_WORDS + 4 bytes is a misaligned rng_state */

static void env_reset(fdma_params *p) {
    t_seed(5);
    float *ins[5] = {E.q, E.k, E.v, E.dout, E.bias};
    size_t ns[5] = {sizeof E.q, sizeof E.k, sizeof E.v, sizeof E.dout, sizeof E.bias};
    for (int a = 0; a < 5; a++)
        for (size_t e = 0; e < ns[a] / sizeof(float); e++) ins[a][e] = (float)t_normal();
    for (int e = 0; e < SQ * SK; e++) E.mask[e] = (uint8_t)(e % 3 != 0);
    memset(E.out, 0xFF, sizeof E.out); /* 0xFFFFFFFF is a NaN */
    memset(E.lse, 0xFF, sizeof E.lse);
    memset(E.probs, 0xFF, sizeof E.probs);
    memset(E.dq, 0xFF, sizeof E.dq);
    memset(E.dk, 0xFF, sizeof E.dk);
    memset(E.dv, 0xFF, sizeof E.dv);
    memset(E.dbias, 0xFF, sizeof E.dbias);
    memset(E.topk_out, 0xAA, sizeof E.topk_out);
    SNAP = E;

    fdma_params_init(p);
    p->B = B_; p->Sq = SQ; p->Sk = SK; p->H = H_; p->Hkv = HKV; p->D = D_;
    p->q = E.q; fdma_strides_contiguous(p->q_stride, B_, SQ, H_, D_);
    p->k = E.k; fdma_strides_contiguous(p->k_stride, B_, SK, HKV, D_);
    p->v = E.v; fdma_strides_contiguous(p->v_stride, B_, SK, HKV, D_);
    p->out = E.out; fdma_strides_contiguous(p->out_stride, B_, SQ, H_, D_);
    p->lse = E.lse;
    p->probs = E.probs;
    p->mask.ptr = E.mask;
    p->mask.dim[0] = 1; p->mask.dim[1] = 1; p->mask.dim[2] = SQ; p->mask.dim[3] = SK;
    fdma_strides_contiguous(p->mask.stride, 1, 1, SQ, SK);
    p->bias.ptr = E.bias;
    p->bias.dim[0] = B_; p->bias.dim[1] = H_; p->bias.dim[2] = SQ; p->bias.dim[3] = SK;
    fdma_strides_contiguous(p->bias.stride, B_, H_, SQ, SK);
    p->dout = E.dout; fdma_strides_contiguous(p->dout_stride, B_, SQ, H_, D_);
    p->dq = E.dq; fdma_strides_contiguous(p->dq_stride, B_, SQ, H_, D_);
    p->dk = E.dk; fdma_strides_contiguous(p->dk_stride, B_, SK, HKV, D_);
    p->dv = E.dv; fdma_strides_contiguous(p->dv_stride, B_, SK, HKV, D_);
    p->dbias = E.dbias; fdma_strides_contiguous(p->dbias_stride, B_, H_, SQ, SK);
}

static void topk_reset(fdma_topk_params *t) {
    fdma_topk_params_init(t);
    t->Sq = SQ;
    t->Sk = SK;
    t->bias.ptr = E.bias;
    t->bias.dim[0] = B_; t->bias.dim[1] = H_; t->bias.dim[2] = SQ; t->bias.dim[3] = SK;
    fdma_strides_contiguous(t->bias.stride, B_, H_, SQ, SK);
    t->window = 3;
    t->causal = 1;
    t->out = E.topk_out;
    t->out_dim[0] = B_; t->out_dim[1] = H_; t->out_dim[2] = SQ; t->out_dim[3] = SK;
    fdma_strides_contiguous(t->out_stride, B_, H_, SQ, SK);
}

enum { OP_FWD, OP_BWD, OP_TOPK, OP_QUERY, OP_WS, OP_SUMMARY };

typedef struct inv {
    const char *what;
    int op;
    fdma_status want;
    const char *substr; /* must appear in fdma_last_error() */
} inv;

/* Apply mutation `kind` to p / t; returns its description, or NULL past the last kind. */
static const inv *mutate(int kind, fdma_params *p, fdma_topk_params *t, int *null_params) {
    static inv r;
    const fdma_status I = FDMA_STATUS_INVALID_ARGUMENT, U = FDMA_STATUS_UNSUPPORTED;
    *null_params = 0;
#define CASE(n, op_, want_, sub_, stmt) \
    case n: stmt; r.what = #stmt; r.op = op_; r.want = want_; r.substr = sub_; return &r;
    switch (kind) {
    CASE(0, OP_FWD, I, "p:", *null_params = 1)
    CASE(1, OP_FWD, I, "device", p->device = (fdma_device)7)
    CASE(2, OP_FWD, I, "dtype", p->dtype = (fdma_dtype)9)
    CASE(3, OP_FWD, I, "B:", p->B = 0)
    CASE(4, OP_FWD, I, "Sq:", p->Sq = -3)
    CASE(5, OP_FWD, I, "Sk:", p->Sk = 0)
    CASE(6, OP_FWD, I, "H:", p->H = 0)
    CASE(7, OP_FWD, I, "Hkv=3 which does not divide H=4", p->Hkv = 3)
    CASE(8, OP_FWD, I, "D:", p->D = 0)
    CASE(9, OP_FWD, I, "D:", p->D = 257)
    CASE(10, OP_FWD, I, "scale", p->scale = INFINITY)
    CASE(11, OP_FWD, I, "softcap", p->softcap = -1.0f)
    CASE(12, OP_FWD, I, "softcap", p->softcap = NAN)
    CASE(13, OP_FWD, I, "p_drop", p->p_drop = 1.0f)
    CASE(14, OP_FWD, I, "p_drop", p->p_drop = -0.1f)
    CASE(15, OP_FWD, I, "p_drop", p->p_drop = NAN)
    CASE(16, OP_FWD, I, "window", p->window = -1)
    CASE(17, OP_FWD, I, "bias is NULL", (p->window = 3, p->bias.ptr = NULL))
    CASE(18, OP_FWD, I, "causal", p->causal = 2)
    CASE(19, OP_FWD, I, "deterministic", p->deterministic = 5)
    CASE(20, OP_FWD, I, "q:", p->q = NULL)
    CASE(21, OP_FWD, I, "k:", p->k = NULL)
    CASE(22, OP_FWD, I, "v:", p->v = NULL)
    CASE(23, OP_FWD, I, "out:", p->out = NULL)
    CASE(24, OP_FWD, I, "q: last dim must be contiguous", p->q_stride[3] = 2)
    CASE(25, OP_FWD, I, "k: stride[1]", p->k_stride[1] = -64)
    CASE(26, OP_FWD, I, "out: stride[2] is 0", p->out_stride[2] = 0)
    CASE(27, OP_FWD, I, "v: strides", p->v_stride[0] = INT64_MAX / 2)
    CASE(28, OP_FWD, I, "mask: dims", p->mask.dim[0] = 3)
    CASE(29, OP_FWD, I, "expected H=4, Hkv=2 or 1", p->mask.dim[1] = 3)
    CASE(30, OP_FWD, I, "mask: dims", p->mask.dim[2] = 4)
    CASE(31, OP_FWD, I, "expected Sk=7", p->mask.dim[3] = 6)
    CASE(32, OP_FWD, I, "bias: dims", p->bias.dim[1] = 8)
    CASE(33, OP_FWD, I, "bias: stride[2]", p->bias.stride[2] = -1)
    CASE(34, OP_FWD, I, "bias: strides", p->bias.stride[0] = INT64_MAX / 3)
    CASE(35, OP_FWD, I, "overflows int64", (p->B = (int64_t)1 << 40, p->Sq = (int64_t)1 << 40))
    CASE(36, OP_FWD, I, "B*H*Sq < 2^32",
         (p->p_drop = 0.1f, p->B = (int64_t)1 << 31, p->bias.ptr = NULL, p->mask.ptr = NULL, p->q_stride[0] = 0,
          p->k_stride[0] = 0, p->v_stride[0] = 0, p->probs = NULL))
    CASE(37, OP_BWD, I, "lse:", p->lse = NULL)
    CASE(38, OP_BWD, I, "dout:", p->dout = NULL)
    CASE(39, OP_BWD, I, "dq:", p->dq = NULL)
    CASE(40, OP_BWD, I, "dk:", p->dk = NULL)
    CASE(41, OP_BWD, I, "dv:", p->dv = NULL)
    CASE(42, OP_BWD, I, "dbias: given, but bias is NULL", p->bias.ptr = NULL)
    CASE(43, OP_BWD, I, "dbias: stride[1] is 0", p->dbias_stride[1] = 0)
    CASE(44, OP_BWD, I, "dq: last dim must be contiguous", p->dq_stride[3] = 3)
    CASE(45, OP_BWD, I, "dout: stride[0]", p->dout_stride[0] = -1)
    CASE(46, OP_BWD, I, "dk: stride[1] is 0", p->dk_stride[1] = 0)
    CASE(47, OP_FWD, U, "dtype: F32 runs on the CPU backend only", p->device = FDMA_DEVICE_CUDA)
    CASE(48, OP_FWD, U, "CUDA", (p->device = FDMA_DEVICE_CUDA, p->dtype = FDMA_DTYPE_F16))
    CASE(49, OP_BWD, U, "CUDA", (p->device = FDMA_DEVICE_CUDA, p->dtype = FDMA_DTYPE_BF16))
    CASE(50, OP_QUERY, I, "op:", (void)0)
    CASE(51, OP_WS, I, "Hkv=3", p->Hkv = 3)
    CASE(52, OP_SUMMARY, U, "CUDA-only", (void)0)
    CASE(53, OP_SUMMARY, I, "mask: required", p->mask.ptr = NULL)
    CASE(54, OP_TOPK, I, "window", t->window = 0)
    CASE(55, OP_TOPK, I, "bias: required", t->bias.ptr = NULL)
    CASE(56, OP_TOPK, I, "out: required", t->out = NULL)
    CASE(57, OP_TOPK, I, "out: dims", t->out_dim[2] = 1)
    CASE(58, OP_TOPK, I, "do not broadcast",
         (t->mask.ptr = E.mask, t->mask.dim[0] = 3, t->mask.dim[1] = 1, t->mask.dim[2] = SQ, t->mask.dim[3] = SK,
          fdma_strides_contiguous(t->mask.stride, 3, 1, SQ, SK)))
    CASE(59, OP_TOPK, I, "expected Sk=7", t->bias.dim[3] = 8)
    CASE(60, OP_TOPK, I, "out: stride[3]", t->out_stride[3] = 0)
    CASE(61, OP_TOPK, I, "causal", t->causal = 3)
    CASE(62, OP_TOPK, I, "Sq:", t->Sq = 0)
    CASE(63, OP_TOPK, I, "dtype", t->dtype = (fdma_dtype)5)
    CASE(64, OP_FWD, I, "window", (p->window = 2, p->bias.ptr = NULL, p->mask.ptr = NULL))
    CASE(65, OP_FWD, U, "Sk: the CPU backend takes up to 2^34 keys",
         (p->Sk = (int64_t)1 << 35, p->k_stride[1] = 0, p->v_stride[1] = 0, p->mask.ptr = NULL, p->bias.ptr = NULL,
          p->probs = NULL))
    CASE(66, OP_FWD, I, "rng_state: expected an 8-byte aligned",
         (p->p_drop = 0.1f, p->rng_state = (const uint64_t *)((const uint8_t *)RNG_WORDS + 4)))
    default: return NULL;
    }
#undef CASE
}

void test_invalid(void) {
    const int cuda = fdma_device_available(FDMA_DEVICE_CUDA);
    for (int kind = 0;; kind++) {
        fdma_params p;
        fdma_topk_params t;
        int null_params;
        env_reset(&p);
        topk_reset(&t);
        const inv *c = mutate(kind, &p, &t, &null_params);
        if (!c) break;
        if (cuda && (kind == 48 || kind == 49 || kind == 52)) continue; /* with a GPU these reach the kernels */
        fdma_clear_error();
        fdma_status st = FDMA_STATUS_OK;
        size_t bytes = 12345;
        fdma_kernel_info info;
        uint8_t summary[64];
        switch (c->op) {
        case OP_FWD: st = fdma_fwd(null_params ? NULL : &p); break;
        case OP_BWD: st = fdma_bwd(&p); break;
        case OP_TOPK: st = fdma_create_mask(&t); break;
        case OP_QUERY: st = fdma_query(&p, (fdma_op)7, &info); break;
        case OP_WS: st = fdma_bwd_workspace_size(&p, &bytes); break;
        case OP_SUMMARY: st = fdma_mask_summarize(&p, summary, sizeof summary); break;
        }
        const char *msg = fdma_last_error();
        int unchanged = memcmp(&E, &SNAP, sizeof E) == 0 && bytes == 12345;
        int ok = st == c->want && strstr(msg, c->substr) != NULL && unchanged;
        if (kind == 48 || kind == 49) /* a CUDA build without a GPU may fail the pointer check differently */
            ok = st != FDMA_STATUS_OK && strstr(msg, "CUDA") != NULL && unchanged;
        t_report(ok, "invalid #%d %s: %s, \"%s\"%s", kind, c->what, fdma_status_string(st), msg,
                 unchanged ? "" : " (OUTPUT MODIFIED)");
    }

    /* the workspace check: the CPU plan needs none, so a query answers 0 and any workspace is enough */
    fdma_params p;
    env_reset(&p);
    size_t ws = 99;
    fdma_status st = fdma_fwd_workspace_size(&p, &ws);
    t_report(st == FDMA_STATUS_OK && ws == 0, "workspace: CPU forward needs %zu bytes (%s)", ws, fdma_status_string(st));
    st = fdma_fwd_workspace_size(&p, NULL);
    t_report(st == FDMA_STATUS_INVALID_ARGUMENT && strstr(fdma_last_error(), "bytes"), "workspace: bytes NULL -> %s \"%s\"",
             fdma_status_string(st), fdma_last_error());
    fdma_kernel_info info;
    st = fdma_query(&p, FDMA_OP_BACKWARD, &info);
    t_report(st == FDMA_STATUS_OK && strcmp(info.name, "cpu_bwd_f32") == 0, "query: CPU backward -> %s \"%s\"",
             fdma_status_string(st), info.name);
    p.Hkv = 3;
    fdma_status sq = fdma_query(&p, FDMA_OP_FORWARD, &info);
    char qmsg[1024];
    snprintf(qmsg, sizeof qmsg, "%s", fdma_last_error());
    fdma_status sf = fdma_fwd(&p);
    t_report(sq == sf && strcmp(qmsg, fdma_last_error()) == 0,
             "query: same status and message as the call itself (%s)", fdma_status_string(sq));
    t_report(fdma_status_string((fdma_status)99) != NULL && strcmp(fdma_status_string(FDMA_STATUS_UNSUPPORTED),
                                                                   "FDMA_STATUS_UNSUPPORTED") == 0,
             "status strings");
    t_report(fdma_version() == FDMA_VERSION && strcmp(fdma_version_string(), "0.2.0") == 0 &&
                 fdma_params_size() == sizeof(fdma_params),
             "version %d \"%s\", params size %zu", fdma_version(), fdma_version_string(), fdma_params_size());
}
