/*
 * test_dropout.c -- SPEC section 5: Philox4x32-10 known-answer tests (Random123 kat_vectors), the keep
 * rate, reproducibility for the same (seed, offset), independence across offsets, and agreement between the
 * public fdma_dropout_keep and the header used by the kernels (src/philox.h). The dropout forward and
 * backward against the reference run in test_attn.c (p_drop = 0.2 cases) and test_fd.c.
 */
#include <math.h>
#include <stdio.h>

#include "philox.h"
#include "tutil.h"

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
}
