/*
 * dtype.c -- fp16 (IEEE binary16) and bf16 <-> fp32 conversions for the C backends, bit-exact and without
 * relying on compiler or hardware half-precision support.
 *
 * fp32 -> fp16 / bf16 round to nearest, ties to even. Subnormals are produced and read exactly; overflow goes
 * to +-inf (fp16: |x| >= 65520); NaN stays NaN (made quiet, sign kept); -0 stays -0.
 */
#include <string.h>

#include "backend.h"

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float fdma_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0) {
        /* zero or subnormal: mant * 2^-24, exact in fp32 */
        float mag = (float)mant * 5.9604644775390625e-8f;
        return sign ? -mag : mag;
    }
    if (exp == 31) return f32_from_bits(sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u));
    return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}

uint16_t fdma_float_to_half(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu)); /* NaN, quiet */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);                      /* >= 65520 -> inf */
    if (a >= 0x38800000u) {                                                       /* normal: >= 2^-14 */
        uint32_t mant = a & 0x7fffffu;
        uint32_t h = ((((a >> 23) - 127u + 15u)) << 10) | (mant >> 13);
        uint32_t rem = mant & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++; /* a carry into the exponent is correct */
        return (uint16_t)(sign | h);
    }
    if (a < 0x33000000u) return sign; /* below 2^-25: rounds to zero (2^-25 itself ties to even zero) */
    /* subnormal result: value = mant * 2^(e - 23); in units of 2^-24 that is mant >> (-(e + 1)) */
    uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    int e = (int)(a >> 23) - 127; /* -25 .. -15 */
    int shift = -(e + 1);         /* 14 .. 24 */
    uint32_t h = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

float fdma_bf16_to_float(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

uint16_t fdma_float_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* NaN, quiet */
    x += 0x7fffu + ((x >> 16) & 1u);                                         /* round to nearest even */
    return (uint16_t)(x >> 16);
}
