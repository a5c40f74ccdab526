/*
 * test_dtype.c -- src/dtype.c (compiled into this test directly: the library does not export it) against
 * the tests' independent frexp/ldexp rounding: every fp16 and bf16 bit pattern decoded, and fp32 -> fp16 /
 * bf16 round-to-nearest-even on edge values (ties, subnormals, overflow, NaN, -0) and 2^20 random fp32 bit
 * patterns spanning every exponent.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "tutil.h"
#include "dtype.c"

static uint16_t bits_of(double x, fdma_dtype dt) {
    uint16_t b;
    t_store(&b, 0, dt, x);
    return b;
}

static int same_bits_or_nan(uint16_t got, double want, fdma_dtype dt) {
    if (isnan(want)) return isnan(t_load(&got, 0, dt));
    return got == bits_of(want, dt);
}

void test_dtype(void) {
    int bad16 = 0, badbf = 0;
    for (uint32_t b = 0; b < 65536; b++) {
        uint16_t h = (uint16_t)b;
        double w16 = t_load(&h, 0, FDMA_DTYPE_F16), wbf = t_load(&h, 0, FDMA_DTYPE_BF16);
        float g16 = fdma_half_to_float(h), gbf = fdma_bf16_to_float(h);
        if (isnan(w16) ? !isnan(g16) : ((double)g16 != w16 || !signbit(g16) != !signbit(w16))) bad16++;
        if (isnan(wbf) ? !isnan(gbf) : ((double)gbf != wbf || !signbit(gbf) != !signbit(wbf))) badbf++;
        /* representable values round-trip exactly */
        if (!isnan(w16) && fdma_float_to_half(g16) != h) bad16++;
        if (!isnan(wbf) && fdma_float_to_bf16(gbf) != h) badbf++;
    }
    t_report(bad16 == 0, "dtype: all 65536 fp16 patterns decode and round-trip (%d mismatches)", bad16);
    t_report(badbf == 0, "dtype: all 65536 bf16 patterns decode and round-trip (%d mismatches)", badbf);

    static const float edges[] = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, -65520.0f, 1e10f,
                                  INFINITY, -INFINITY, NAN, 6.1035156e-05f, 6.0975552e-05f, 5.9604645e-08f,
                                  2.9802322e-08f, 2.9802326e-08f, 1e-9f, 1.00048828125f, 1.00146484375f,
                                  1.0009765625f, 1.00390625f, 1.01171875f, 3.4028235e38f, 3.3961775e38f,
                                  1e-40f, -1e-45f, 1.17549435e-38f, 0.333333343f};
    int e16 = 0, ebf = 0;
    for (size_t e = 0; e < sizeof(edges) / sizeof(edges[0]); e++) {
        float f = edges[e];
        if (!same_bits_or_nan(fdma_float_to_half(f), t_round(f, FDMA_DTYPE_F16), FDMA_DTYPE_F16)) {
            printf("  fp16 edge %.9g: got 0x%04x want 0x%04x\n", f, fdma_float_to_half(f),
                   bits_of(t_round(f, FDMA_DTYPE_F16), FDMA_DTYPE_F16));
            e16++;
        }
        if (!same_bits_or_nan(fdma_float_to_bf16(f), t_round(f, FDMA_DTYPE_BF16), FDMA_DTYPE_BF16)) {
            printf("  bf16 edge %.9g: got 0x%04x\n", f, fdma_float_to_bf16(f));
            ebf++;
        }
    }
    t_report(e16 == 0 && ebf == 0, "dtype: fp32 -> fp16/bf16 RNE on %zu edge values (ties, subnormals, "
             "overflow, NaN, -0): %d / %d mismatches", sizeof(edges) / sizeof(edges[0]), e16, ebf);

    t_seed(7);
    int r16 = 0, rbf = 0;
    for (int n = 0; n < (1 << 20); n++) {
        uint32_t u = (uint32_t)t_u64();
        if (n & 1) u = (u & 0x80ffffffu) | ((uint32_t)(90 + (n >> 1) % 60) << 23); /* fp16-relevant exponents */
        float f;
        memcpy(&f, &u, 4);
        r16 += !same_bits_or_nan(fdma_float_to_half(f), t_round(f, FDMA_DTYPE_F16), FDMA_DTYPE_F16);
        rbf += !same_bits_or_nan(fdma_float_to_bf16(f), t_round(f, FDMA_DTYPE_BF16), FDMA_DTYPE_BF16);
    }
    t_report(r16 == 0 && rbf == 0, "dtype: fp32 -> fp16/bf16 RNE on 2^20 random fp32 patterns: %d / %d mismatches",
             r16, rbf);
}
