/*
 * cuda_stub.c -- the CUDA half of src/backend.h for a build without CUDA (CMake drops this file when nvcc is
 * found and src/cuda/ provides the real functions). Every entry returns FDMA_STATUS_UNSUPPORTED with a
 * message saying so; fdma_cuda_available() returns 0.
 */
#include "backend.h"

static fdma_status no_cuda(const char *what) {
    return fdma_set_error(FDMA_STATUS_UNSUPPORTED,
                          "device: FDMA_DEVICE_CUDA requested (%s), but this libflashdma was built without CUDA "
                          "(rebuild with nvcc on PATH or -DFDMA_WITH_CUDA=ON)",
                          what);
}

int fdma_cuda_available(void) { return 0; }
fdma_status fdma_cuda_check_pointers(const fdma_params *p) { return no_cuda("pointer check"); }
fdma_status fdma_cuda_fwd_plan(const fdma_params *p, fdma_plan *plan) { return no_cuda("forward"); }
fdma_status fdma_cuda_fwd_run(const fdma_params *p, const fdma_plan *plan) { return no_cuda("forward"); }
fdma_status fdma_cuda_bwd_plan(const fdma_params *p, fdma_plan *plan) { return no_cuda("backward"); }
fdma_status fdma_cuda_bwd_run(const fdma_params *p, const fdma_plan *plan) { return no_cuda("backward"); }
fdma_status fdma_cuda_create_mask(const fdma_topk_params *p) { return no_cuda("create_mask"); }
fdma_status fdma_cuda_mask_summarize(const fdma_params *p, uint8_t *summary, size_t bytes) {
    return no_cuda("mask summary");
}
