/*
 * example.c -- the README's C example: a tiny causal GQA attention forward and backward on the CPU.
 *
 *   q (B=1, Sq=3, H=2, D=4), k and v (B=1, Sk=5, Hkv=1, D=4): two query heads share one key/value head.
 *   causal is bottom-right aligned: query row i sees keys j <= i + Sk - Sq.
 *
 * Build and run (CMake builds it as example_c and ctest runs it):
 *   cmake -S . -B build && cmake --build build && ./build/example_c
 */
#include <math.h>
#include <stdio.h>

#include "flash_dma.h"

enum { B = 1, Sq = 3, Sk = 5, H = 2, Hkv = 1, D = 4 };

int main(void) {
    float q[B * Sq * H * D], k[B * Sk * Hkv * D], v[B * Sk * Hkv * D];
    float out[B * Sq * H * D], lse[B * H * Sq];
    float dout[B * Sq * H * D], dq[B * Sq * H * D], dk[B * Sk * Hkv * D], dv[B * Sk * Hkv * D];
    for (int e = 0; e < B * Sq * H * D; e++) q[e] = sinf(0.3f * (float)e), dout[e] = 1.0f;
    for (int e = 0; e < B * Sk * Hkv * D; e++) k[e] = cosf(0.2f * (float)e), v[e] = (float)(e % 7) - 3.0f;

    /* 1. describe the call: sizes, pointers and strides (in elements, (batch, seq, head, dim) order) */
    fdma_params p;
    fdma_params_init(&p); /* CPU, fp32, scale = 1/sqrt(D), no mask, no bias, no dropout */
    p.B = B; p.Sq = Sq; p.Sk = Sk; p.H = H; p.Hkv = Hkv; p.D = D;
    p.q = q; fdma_strides_contiguous(p.q_stride, B, Sq, H, D);
    p.k = k; fdma_strides_contiguous(p.k_stride, B, Sk, Hkv, D);
    p.v = v; fdma_strides_contiguous(p.v_stride, B, Sk, Hkv, D);
    p.out = out; fdma_strides_contiguous(p.out_stride, B, Sq, H, D);
    p.lse = lse; /* the backward reads the forward's log-sum-exp */
    p.causal = 1;

    /* 2. workspace: ask, then provide (the CPU backend needs none, a CUDA kernel may) */
    size_t ws = 0;
    if (fdma_fwd_workspace_size(&p, &ws) != FDMA_STATUS_OK || ws != 0) {
        fprintf(stderr, "workspace query: %s\n", fdma_last_error());
        return 1;
    }

    /* 3. forward: every argument is validated first; on error the message names it */
    fdma_status st = fdma_fwd(&p);
    if (st != FDMA_STATUS_OK) {
        fprintf(stderr, "fdma_fwd: %s: %s\n", fdma_status_string(st), fdma_last_error());
        return 1;
    }

    /* 4. backward with dout = 1: dq, dk, dv (dk and dv summed over the two query heads) */
    p.dout = dout; fdma_strides_contiguous(p.dout_stride, B, Sq, H, D);
    p.dq = dq; fdma_strides_contiguous(p.dq_stride, B, Sq, H, D);
    p.dk = dk; fdma_strides_contiguous(p.dk_stride, B, Sk, Hkv, D);
    p.dv = dv; fdma_strides_contiguous(p.dv_stride, B, Sk, Hkv, D);
    st = fdma_bwd(&p);
    if (st != FDMA_STATUS_OK) {
        fprintf(stderr, "fdma_bwd: %s: %s\n", fdma_status_string(st), fdma_last_error());
        return 1;
    }

    /* dv of key j sums the probabilities given to it (dout = 1): sum_j dv[j, 0] = H * Sq */
    float total = 0.0f;
    for (int j = 0; j < Sk; j++) total += dv[j * D];
    printf("libflashdma %s: out[0, 0, 0, :] = %.4f %.4f %.4f %.4f, lse[0, 0, 0] = %.4f\n", fdma_version_string(),
           out[0], out[1], out[2], out[3], lse[0]);
    printf("sum_j dv[0, j, 0, 0] = %.4f (expected %d)\n", total, H * Sq);
    if (fabsf(total - (float)(H * Sq)) > 1e-4f) {
        fprintf(stderr, "unexpected dv sum\n");
        return 1;
    }

    /* a bad argument: Hkv = 3 does not divide H = 2 */
    p.Hkv = 3;
    st = fdma_fwd(&p);
    printf("with Hkv = 3: %s: %s\n", fdma_status_string(st), fdma_last_error());
    return st == FDMA_STATUS_INVALID_ARGUMENT ? 0 : 1;
}
