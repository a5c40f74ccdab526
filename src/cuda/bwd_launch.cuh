/*
 * bwd_launch.cuh -- per-head-dim launchers of the backward kernels (bwd_d64.cu, bwd_d128.cu, bwd_d256.cu
 * instantiate launch_dp): the sparse kernel for gathered key lists; else the dense one-pass kernel (bwd_dense.cuh)
 * for the calls dense_eligible accepts (bwd_wgmma.cu's kernel at kDp = 128 where the plan chose it: Args::wgmma);
 * else the dkdv kernel (plus the dq kernel when deterministic).
 */
#ifndef FDMA_CUDA_BWD_LAUNCH_CUH
#define FDMA_CUDA_BWD_LAUNCH_CUH

#include "bwd_common.cuh"
#include "bwd_dense.cuh"
#include "bwd_sparse.cuh"

namespace fdma_bwdk {

template <typename T, int kDp>
cudaError_t launch_dp(const Args &a, int deterministic, dim3 grid, cudaStream_t st) {
    constexpr int kBN = key_block(kDp);
    if constexpr (kDp <= 128) {
        if (a.ex_lists) {
#ifdef FDMA_HAVE_WGMMA
            if (kDp == 128 && a.wgmma) return launch_wgmma_sparse_d128(a, std::is_same<T, __nv_bfloat16>::value, st);
#endif
            return launch_sparse<T, kDp>(a, st);
        }
        if (dense_eligible(kDp, deterministic, a.dropout != 0, a.softcap, a.expiry != nullptr,
                           dense_bias_form(a.bias, a.bs, a.dbias_mode, a.Sq))) {
#ifdef FDMA_HAVE_WGMMA
            if (kDp == 128 && a.wgmma) return launch_wgmma_d128(a, std::is_same<T, __nv_bfloat16>::value, grid, st);
#endif
            return launch_dense<T, kDp>(a, grid, st);
        }
    }
    if (deterministic) {
        cudaError_t err = launch_smem(dkdv_kernel<T, kDp, kBN, false>, grid, kBN * 2,
                                      DkdvSmem<kDp, kBN, false>::bytes_of(sizeof(T)), st, a);
        if (err != cudaSuccess) return err;
        return launch_smem(dq_kernel<T, kDp>, dim3((unsigned)((a.Sq + 63) / 64), (unsigned)a.H, (unsigned)a.B), 128,
                           DqSmem<kDp>::bytes_of(sizeof(T)), st, a);
    }
    return launch_smem(dkdv_kernel<T, kDp, kBN, true>, grid, kBN * 2, DkdvSmem<kDp, kBN, true>::bytes_of(sizeof(T)),
                       st, a);
}

} /* namespace fdma_bwdk */

#endif /* FDMA_CUDA_BWD_LAUNCH_CUH */
