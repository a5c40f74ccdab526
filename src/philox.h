/*
 * philox.h -- Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
 * SC 2011) and the dropout keep bit of SPEC section 5. Header-only so that the C backend, the CUDA kernels
 * and the tests share one definition, bit for bit.
 *
 *   key     = (seed & 0xffffffff, seed >> 32)
 *   counter = (j >> 2, row & 0xffffffff, offset & 0xffffffff, offset >> 32),  row = (b*H + h)*Sq + i
 *   r       = philox(key, counter)[j & 3]
 *   keep    = r >= floor(p_drop * 2^32)
 */
#ifndef FDMA_PHILOX_H
#define FDMA_PHILOX_H

#include <stdint.h>

#if defined(__CUDACC__)
#define FDMA_HD __host__ __device__ __forceinline__
#else
#define FDMA_HD static inline
#endif

#define FDMA_PHILOX_M0 0xD2511F53u
#define FDMA_PHILOX_M1 0xCD9E8D57u
#define FDMA_PHILOX_W0 0x9E3779B9u
#define FDMA_PHILOX_W1 0xBB67AE85u

FDMA_HD void fdma_philox_round(uint32_t c[4], const uint32_t k[2]) {
    uint64_t p0 = (uint64_t)FDMA_PHILOX_M0 * c[0];
    uint64_t p1 = (uint64_t)FDMA_PHILOX_M1 * c[2];
    uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    uint32_t n0 = hi1 ^ c[1] ^ k[0];
    uint32_t n2 = hi0 ^ c[3] ^ k[1];
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
}

/* out = Philox4x32-10(key, counter) */
FDMA_HD void fdma_philox(const uint32_t key[2], const uint32_t counter[4], uint32_t out[4]) {
    uint32_t c[4] = {counter[0], counter[1], counter[2], counter[3]};
    uint32_t k[2] = {key[0], key[1]};
    for (int r = 0; r < 10; r++) {
        if (r > 0) {
            k[0] += FDMA_PHILOX_W0;
            k[1] += FDMA_PHILOX_W1;
        }
        fdma_philox_round(c, k);
    }
    out[0] = c[0];
    out[1] = c[1];
    out[2] = c[2];
    out[3] = c[3];
}

/* t = floor(p_drop * 2^32); keep iff r >= t. p_drop in [0, 1), so t < 2^32. */
FDMA_HD uint32_t fdma_dropout_threshold(float p_drop) {
    double t = (double)p_drop * 4294967296.0;
    return t <= 0.0 ? 0u : (uint32_t)t;
}

/* The 4 random words for keys j = 4*(j>>2) .. 4*(j>>2)+3 of one row. */
FDMA_HD void fdma_dropout_words(uint64_t seed, uint64_t offset, uint64_t row, uint64_t j, uint32_t out[4]) {
    uint32_t key[2] = {(uint32_t)(seed & 0xffffffffu), (uint32_t)(seed >> 32)};
    uint32_t ctr[4] = {(uint32_t)(j >> 2), (uint32_t)(row & 0xffffffffu), (uint32_t)(offset & 0xffffffffu),
                       (uint32_t)(offset >> 32)};
    fdma_philox(key, ctr, out);
}

FDMA_HD int fdma_dropout_keep_bit(uint64_t seed, uint64_t offset, uint64_t row, uint64_t j, uint32_t threshold) {
    uint32_t w[4];
    fdma_dropout_words(seed, offset, row, j, w);
    return w[j & 3] >= threshold;
}

#endif /* FDMA_PHILOX_H */
