/*
 * fwd_d128.cu -- forward kernels for head dims up to 128 (D % 8 == 0, D <= 128), fp16 and bf16.
 * The kernel itself is fwd_kernel.cuh; one translation unit per head-dim tile so builds run in parallel.
 */
#include "fwd_kernel.cuh"

FDMA_DEFINE_FWD_LAUNCHER(128)
