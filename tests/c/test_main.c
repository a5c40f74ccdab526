/*
 * test_main.c -- the C test binary test_fdma (ggml test-backend-ops style): runs every test group, prints
 * each case's parameters and result, and ends with the line "N passed, M failed"; exits nonzero on failure.
 *
 *   build/test_fdma            all groups
 *   build/test_fdma attn topk  only the named groups (dtype, philox, attn, fd, topk, invalid, misc)
 */
#include <stdio.h>
#include <string.h>

#include "tutil.h"

int main(int argc, char **argv) {
    static const struct { const char *name; void (*fn)(void); } groups[] = {
        {"dtype", test_dtype},     {"philox", test_philox_dropout}, {"invalid", test_invalid},
        {"topk", test_topk},       {"misc", test_misc},             {"fd", test_finite_differences},
        {"attn", test_attention_grid},
    };
    printf("test_fdma: libflashdma %s (header %d.%d.%d), CUDA available: %d\n", fdma_version_string(),
           FDMA_VERSION_MAJOR, FDMA_VERSION_MINOR, FDMA_VERSION_PATCH, fdma_device_available(FDMA_DEVICE_CUDA));
    for (size_t g = 0; g < sizeof(groups) / sizeof(groups[0]); g++) {
        int selected = argc < 2;
        for (int a = 1; a < argc; a++) selected |= strcmp(argv[a], groups[g].name) == 0;
        if (!selected) continue;
        printf("== %s\n", groups[g].name);
        groups[g].fn();
    }
    printf("%d passed, %d failed\n", t_passed, t_failed);
    return t_failed == 0 && t_passed > 0 ? 0 : 1;
}
