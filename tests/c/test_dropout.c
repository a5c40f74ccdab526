/*
 * test_dropout.c -- SPEC section 5: Philox4x32-10 known-answer tests (Random123 kat_vectors), the keep
 * rate, reproducibility for the same (seed, offset), independence across offsets, and agreement between the
 * public fdma_dropout_keep and the header used by the kernels (src/philox.h), and fdma_params.rng_state: the
 * pair read through the pointer gives bitwise the forward and backward of the same pair by value (CPU). The
 * dropout forward and backward against the reference run in test_attn.c (p_drop = 0.2 cases) and test_fd.c.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "philox.h"
#include "tutil.h"

/* One CPU fp32 forward + backward with dropout: q, dout (B, Sq, H, D), k, v (B, Sk, Hkv, D), causal. The keep
 * bits come from rng_state when it is non-NULL (the by-value seed/offset are then ignored), else from
 * (seed, offset). Outputs are NaN-poisoned first. */
enum { RB = 2, RSQ = 9, RSK = 13, RH = 4, RHKV = 2, RD = 8 };
typedef struct rng_io {
    float q[RB * RSQ * RH * RD], k[RB * RSK * RHKV * RD], v[RB * RSK * RHKV * RD], dout[RB * RSQ * RH * RD];
    float out[RB * RSQ * RH * RD], lse[RB * RH * RSQ];
    float dq[RB * RSQ * RH * RD], dk[RB * RSK * RHKV * RD], dv[RB * RSK * RHKV * RD];
} rng_io;

static fdma_status rng_run(rng_io *io, uint64_t seed, uint64_t offset, const uint64_t *rng_state) {
    memset(io->out, 0xFF, sizeof io->out);
    memset(io->lse, 0xFF, sizeof io->lse);
    memset(io->dq, 0xFF, sizeof io->dq);
    memset(io->dk, 0xFF, sizeof io->dk);
    memset(io->dv, 0xFF, sizeof io->dv);
    fdma_params p;
    fdma_params_init(&p);
    p.B = RB; p.Sq = RSQ; p.Sk = RSK; p.H = RH; p.Hkv = RHKV; p.D = RD;
    p.q = io->q; fdma_strides_contiguous(p.q_stride, RB, RSQ, RH, RD);
    p.k = io->k; fdma_strides_contiguous(p.k_stride, RB, RSK, RHKV, RD);
    p.v = io->v; fdma_strides_contiguous(p.v_stride, RB, RSK, RHKV, RD);
    p.out = io->out; fdma_strides_contiguous(p.out_stride, RB, RSQ, RH, RD);
    p.lse = io->lse;
    p.causal = 1;
    p.p_drop = 0.3f;
    p.seed = seed;
    p.offset = offset;
    p.rng_state = rng_state;
    fdma_status st = fdma_fwd(&p);
    if (st != FDMA_STATUS_OK) return st;
    p.dout = io->dout; fdma_strides_contiguous(p.dout_stride, RB, RSQ, RH, RD);
    p.dq = io->dq; fdma_strides_contiguous(p.dq_stride, RB, RSQ, RH, RD);
    p.dk = io->dk; fdma_strides_contiguous(p.dk_stride, RB, RSK, RHKV, RD);
    p.dv = io->dv; fdma_strides_contiguous(p.dv_stride, RB, RSK, RHKV, RD);
    return fdma_bwd(&p);
}

static int rng_same(const rng_io *a, const rng_io *b) {
    return memcmp(a->out, b->out, sizeof a->out) == 0 && memcmp(a->lse, b->lse, sizeof a->lse) == 0 &&
           memcmp(a->dq, b->dq, sizeof a->dq) == 0 && memcmp(a->dk, b->dk, sizeof a->dk) == 0 &&
           memcmp(a->dv, b->dv, sizeof a->dv) == 0;
}

static void test_rng_state_pointer(void) {
    static rng_io byval, byptr, other;
    t_seed(31);
    float *ins[4] = {byval.q, byval.k, byval.v, byval.dout};
    size_t ns[4] = {sizeof byval.q, sizeof byval.k, sizeof byval.v, sizeof byval.dout};
    for (int a = 0; a < 4; a++)
        for (size_t e = 0; e < ns[a] / sizeof(float); e++) ins[a][e] = (float)t_normal();
    byptr = byval;
    other = byval;
    const uint64_t s = 0x9e3779b97f4a7c15ull, o = (1ull << 40) + 12345;
    const uint64_t pair[2] = {s, o}, pair2[2] = {s, o + 1};
    fdma_status a = rng_run(&byval, s, o, NULL);
    fdma_status b = rng_run(&byptr, s + 1, o + 7, pair); /* the by-value fields must be ignored */
    fdma_status c = rng_run(&other, s, o, pair2);
    t_report(a == FDMA_STATUS_OK && b == FDMA_STATUS_OK && c == FDMA_STATUS_OK && rng_same(&byval, &byptr),
             "dropout: rng_state {seed, offset} gives bitwise the forward and backward of seed/offset by value (%s, %s)",
             fdma_status_string(a), fdma_status_string(b));
    t_report(c == FDMA_STATUS_OK && memcmp(byval.out, other.out, sizeof byval.out) != 0 &&
                 memcmp(byval.dq, other.dq, sizeof byval.dq) != 0,
             "dropout: rng_state {seed, offset + 1} gives other keep bits (%s)", fdma_status_string(c));
}

void test_philox_dropout(void) {
    static const struct { uint32_t ctr[4], key[2], out[4]; } kat[3] = {
        {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
        {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, {0xffffffffu, 0xffffffffu},
         {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
        {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, {0xa4093822u, 0x299f31d0u},
         {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
    };
    for (int t = 0; t < 3; t++) {
        uint32_t out[4];
        fdma_philox4x32_10(kat[t].key, kat[t].ctr, out);
        int ok = out[0] == kat[t].out[0] && out[1] == kat[t].out[1] && out[2] == kat[t].out[2] && out[3] == kat[t].out[3];
        t_report(ok, "philox KAT %d: ctr %08x %08x %08x %08x key %08x %08x -> %08x %08x %08x %08x", t, kat[t].ctr[0],
                 kat[t].ctr[1], kat[t].ctr[2], kat[t].ctr[3], kat[t].key[0], kat[t].key[1], out[0], out[1], out[2],
                 out[3]);
    }

    /* keep rate: 2^20 draws per p, within 6 standard deviations of 1 - p */
    static const float ps[4] = {0.1f, 0.5f, 0.9f, 0.0f};
    for (int a = 0; a < 4; a++) {
        const int64_t rows = 1024, cols = 1024;
        int64_t kept = 0;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < cols; j++) kept += fdma_dropout_keep(42, 7, (uint64_t)r, (uint64_t)j, ps[a]);
        double n = (double)(rows * cols), rate = kept / n, want = 1.0 - (double)ps[a];
        double sd = sqrt(want * (1.0 - want) / n);
        t_report(fabs(rate - want) <= 6.0 * sd + 1e-12, "dropout keep rate p_drop=%.1f: %.5f (expected %.5f +- %.5f)",
                 ps[a], rate, want, 6.0 * sd);
    }

    /* same (seed, offset) -> same bits; another offset or seed -> about 2 p (1 - p) of the bits differ */
    int same = 1;
    int64_t diff_off = 0, diff_seed = 0, n = 0, hdr = 0;
    const float pd = 0.5f;
    for (uint64_t r = 0; r < 256; r++)
        for (uint64_t j = 0; j < 256; j++, n++) {
            int a = fdma_dropout_keep(0xdeadbeefcafef00dull, 1ull << 33, r, j, pd);
            same &= a == fdma_dropout_keep(0xdeadbeefcafef00dull, 1ull << 33, r, j, pd);
            diff_off += a != fdma_dropout_keep(0xdeadbeefcafef00dull, (1ull << 33) + 1, r, j, pd);
            diff_seed += a != fdma_dropout_keep(0xdeadbeefcafef00eull, 1ull << 33, r, j, pd);
            hdr += a != fdma_dropout_keep_bit(0xdeadbeefcafef00dull, 1ull << 33, r, j, fdma_dropout_threshold(pd));
        }
    t_report(same, "dropout: same (seed, offset) gives the same keep bits");
    t_report(fabs((double)diff_off / n - 0.5) < 0.02, "dropout: offset + 1 changes %.3f of the bits (expected 0.5)",
             (double)diff_off / n);
    t_report(fabs((double)diff_seed / n - 0.5) < 0.02, "dropout: seed + 1 changes %.3f of the bits (expected 0.5)",
             (double)diff_seed / n);
    t_report(hdr == 0, "dropout: fdma_dropout_keep == src/philox.h keep bit (%lld mismatches)", (long long)hdr);

    /* the word layout of SPEC section 5: key j uses word j & 3 of counter (j >> 2, row, offset lo, offset hi) */
    uint64_t seed = 0x0123456789abcdefull, offset = 0x0000000500000009ull;
    uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    uint32_t ctr[4] = {5, 77, (uint32_t)offset, (uint32_t)(offset >> 32)}, w[4];
    fdma_philox4x32_10(key, ctr, w);
    uint32_t thr = (uint32_t)floor((double)0.3f * 4294967296.0);
    int lay = 1;
    for (int jj = 0; jj < 4; jj++) lay &= fdma_dropout_keep(seed, offset, 77, 20 + jj, 0.3f) == (w[jj] >= thr);
    t_report(lay, "dropout: key j of row r uses word j & 3 of Philox(key = seed, ctr = (j >> 2, r, offset))");

    test_rng_state_pointer();
}
