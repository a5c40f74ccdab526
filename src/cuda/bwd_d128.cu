/*
 * bwd_d128.cu -- instantiates the backward kernels (bwd_launch.cuh) for head dims padded to 128 (one
 * translation unit per head dim so that builds run in parallel). Called by bwd.cu.
 */
#include "bwd_launch.cuh"

namespace fdma_bwdk {

cudaError_t launch_d128(const Args &a, int bf16, int deterministic, dim3 grid, cudaStream_t st) {
    return bf16 ? launch_dp<__nv_bfloat16, 128>(a, deterministic, grid, st)
                : launch_dp<__half, 128>(a, deterministic, grid, st);
}

} /* namespace fdma_bwdk */
