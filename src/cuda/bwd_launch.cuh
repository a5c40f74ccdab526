/*
 * bwd_launch.cuh -- per-head-dim launchers of the backward kernels (bwd_d64.cu, bwd_d128.cu, bwd_d256.cu
 * instantiate launch_dp): the sparse kernel for gathered key lists, else the dkdv kernel (plus the dq kernel
 * when deterministic).
 */
#ifndef FDMA_CUDA_BWD_LAUNCH_CUH
#define FDMA_CUDA_BWD_LAUNCH_CUH

#include "bwd_common.cuh"
#include "bwd_sparse.cuh"

namespace fdma_bwdk {

template <typename T, int kDp>
cudaError_t launch_dp(const Args &a, int deterministic, dim3 grid, cudaStream_t st) {
    constexpr int kBN = key_block(kDp);
    cudaError_t err;
    if constexpr (kDp <= 128) if (a.ex_lists) return launch_sparse<T, kDp>(a, st);
    if (deterministic) {
        const size_t sm = DkdvSmem<kDp, kBN, false>::bytes_of(sizeof(T));
        auto k1 = dkdv_kernel<T, kDp, kBN, false>;
        if ((err = cudaFuncSetAttribute(k1, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm)) != cudaSuccess)
            return err;
        k1<<<grid, kBN * 2, sm, st>>>(a);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
        const size_t sq = DqSmem<kDp>::bytes_of(sizeof(T));
        auto k2 = dq_kernel<T, kDp>;
        if ((err = cudaFuncSetAttribute(k2, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sq)) != cudaSuccess)
            return err;
        dim3 g2((unsigned)((a.Sq + 63) / 64), (unsigned)a.H, (unsigned)a.B);
        k2<<<g2, 128, sq, st>>>(a);
        return cudaGetLastError();
    }
    const size_t sm = DkdvSmem<kDp, kBN, true>::bytes_of(sizeof(T));
    auto k1 = dkdv_kernel<T, kDp, kBN, true>;
    if ((err = cudaFuncSetAttribute(k1, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm)) != cudaSuccess)
        return err;
    k1<<<grid, kBN * 2, sm, st>>>(a);
    return cudaGetLastError();
}

} /* namespace fdma_bwdk */

#endif /* FDMA_CUDA_BWD_LAUNCH_CUH */
