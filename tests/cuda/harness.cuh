/*
 * harness.cuh -- shared by the standalone CUDA harnesses (test_fwd.cu, test_bwd.cu, test_topk.cu).
 *
 * The harnesses link the CUDA backend's objects without src/*.c, so they supply the one library symbol the
 * backend calls, fdma_set_error (the message is kept in g_err for the harness to print), and CK(), which
 * stops the harness with the CUDA error text when a runtime call fails.
 */
#ifndef FDMA_TEST_HARNESS_CUH
#define FDMA_TEST_HARNESS_CUH

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include <cuda_runtime.h>

#include "backend.h"

static char g_err[1024];

extern "C" fdma_status fdma_set_error(fdma_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof(g_err), fmt, ap);
    va_end(ap);
    return status;
}

#define CK(x)                                                                                                  \
    do {                                                                                                       \
        cudaError_t e_ = (x);                                                                                  \
        if (e_ != cudaSuccess) {                                                                               \
            fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #x);   \
            exit(2);                                                                                           \
        }                                                                                                      \
    } while (0)

#endif /* FDMA_TEST_HARNESS_CUH */
