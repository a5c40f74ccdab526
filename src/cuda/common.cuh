/*
 * common.cuh -- shared pieces of the CUDA kernels (forward and backward): the small inline-PTX wrappers
 * (cp.async, ldmatrix, mma.sync m16n8k16), fp16/bf16 helpers, and the forward kernel's parameter block.
 *
 * Tensor-core fragment layout used everywhere (PTX ISA, "mma.m16n8k16"), lane = 4*g + q (g = lane/4,
 * q = lane%4):
 *   A (16x16, row major): a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 8+2q..), a3 = (g+8, 8+2q..)
 *   B (16x8, "col" = stored as 8 rows of 16 k): b0 = (k 2q..2q+1, n g), b1 = (k 8+2q.., n g)
 *   C (16x8, fp32): c0,c1 = (g, 2q..2q+1), c2,c3 = (g+8, 2q..2q+1)
 * Shared-memory tiles of 16-byte chunks are XOR-swizzled (chunk ^ row%8 within each group of 8 chunks) so
 * that ldmatrix's 8 row reads of one chunk column hit 8 different bank groups.
 *
 * Everything here is header-only and compiled into each translation unit that includes it.
 */
#ifndef FDMA_CUDA_COMMON_CUH
#define FDMA_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <limits.h>
#include <stdint.h>

#include "backend.h"
#include "philox.h"

#define FDMA_LOG2E 1.4426950408889634f
#define FDMA_LN2 0.6931471805599453f

/* ---- PTX wrappers ------------------------------------------------------------------------------------ */

__device__ __forceinline__ uint32_t fdma_smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* 16-byte asynchronous copy global -> shared; bytes beyond src_bytes (0..16) are zero-filled. Both
 * addresses must be 16-byte aligned; with src_bytes == 0 nothing is read. */
__device__ __forceinline__ void fdma_cp_async16(void *smem, const void *gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(fdma_smem_u32(smem)), "l"(gmem),
                 "r"(src_bytes));
}
__device__ __forceinline__ void fdma_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void fdma_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

/* The dropout pair {seed, offset} from device memory (fdma_params.rng_state, 8-byte aligned). volatile: the
 * compiler re-reads it where it is used (an L1 hit) instead of holding four registers across a loop. */
__device__ __forceinline__ void fdma_load_rng(const uint64_t *rng, uint64_t &seed, uint64_t &offset) {
    asm volatile("ld.global.nc.u64 %0, [%2];\n\tld.global.nc.u64 %1, [%2+8];\n" : "=l"(seed), "=l"(offset)
                 : "l"(rng));
}

/* The same three at a shared-window address (fdma_smem_u32): kernels that keep per-lane tile addresses in
 * registers and step them by constants. */
__device__ __forceinline__ void fdma_cp_async16_s(uint32_t saddr, const void *gmem, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void fdma_ldsm_x4(uint32_t r[4], uint32_t saddr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(saddr));
}
__device__ __forceinline__ void fdma_ldsm_x4_trans(uint32_t r[4], uint32_t saddr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(saddr));
}

__device__ __forceinline__ void fdma_ldmatrix_x4(uint32_t r[4], const void *smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fdma_smem_u32(smem)));
}
__device__ __forceinline__ void fdma_ldmatrix_x4_trans(uint32_t r[4], const void *smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fdma_smem_u32(smem)));
}

/* c += a * b, fp32 accumulate; T is __half or __nv_bfloat16. */
template <typename T> __device__ __forceinline__ void fdma_mma16816(float c[4], const uint32_t a[4], uint32_t b0,
                                                                    uint32_t b1);
template <> __device__ __forceinline__ void fdma_mma16816<__half>(float c[4], const uint32_t a[4], uint32_t b0,
                                                                  uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void fdma_mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4],
                                                                         uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* ---- element conversions ------------------------------------------------------------------------------ */

template <typename T> __device__ __forceinline__ uint32_t fdma_pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t fdma_pack2<__half>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}
template <> __device__ __forceinline__ uint32_t fdma_pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}

template <typename T> __device__ __forceinline__ float fdma_to_float(uint16_t bits);
template <> __device__ __forceinline__ float fdma_to_float<__half>(uint16_t bits) {
    return __half2float(__ushort_as_half(bits));
}
template <> __device__ __forceinline__ float fdma_to_float<__nv_bfloat16>(uint16_t bits) {
    return __bfloat162float(__ushort_as_bfloat16(bits));
}
template <typename T> __device__ __forceinline__ uint16_t fdma_from_float(float x);
template <> __device__ __forceinline__ uint16_t fdma_from_float<__half>(float x) {
    return __half_as_ushort(__float2half_rn(x));
}
template <> __device__ __forceinline__ uint16_t fdma_from_float<__nv_bfloat16>(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

/* Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of `cpr` chunks per row (cpr a
 * multiple of 8). */
__device__ __forceinline__ uint32_t fdma_swz(int row, int chunk, int cpr) {
    return (uint32_t)(row * cpr + ((chunk & ~7) | ((chunk ^ row) & 7))) * 16u;
}
/* The same offset is row * cpr * 16 + (16 chunk ^ 16 (row % 8)). For the chunk 2k + h (h in {0, 1}) of the k-th
 * 16-column step that an ldmatrix lane reads, that is row * cpr * 16 + (fdma_swz_lane(h, row) ^ 32 k): a lane keeps
 * its row offset and fdma_swz_lane, and a step costs one XOR; rows 8 apart differ by a constant. */
__device__ __forceinline__ uint32_t fdma_swz_lane(int h, int row) { return 16u * (uint32_t)((h ^ row) & 7); }

/* prmt.b32 (byte permute; a selector nibble with bit 3 set replicates the sign bit of the byte it selects). */
__device__ __forceinline__ uint32_t fdma_prmt(uint32_t a, uint32_t b, uint32_t sel) {
    uint32_t d;
    asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}

/* Two bf16 / fp16 values (one 32-bit word, low element first) -> floats. */
template <typename T> __device__ __forceinline__ void fdma_pair_to_float(uint32_t w, float &lo, float &hi);
template <> __device__ __forceinline__ void fdma_pair_to_float<__nv_bfloat16>(uint32_t w, float &lo, float &hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
}
template <> __device__ __forceinline__ void fdma_pair_to_float<__half>(uint32_t w, float &lo, float &hi) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2 *>(&w));
    lo = f.x;
    hi = f.y;
}

/* ---- forward kernel parameters ---------------------------------------------------------------------- */

/* Everything the forward kernel reads, by value. Strides in elements; a broadcast dim has stride 0. The
 * head of mask/bias for query head h is (h / *_hdiv) * *_sh (hdiv = 1 for an H-sized dim, H/Hkv for an
 * Hkv-sized dim; a size-1 dim has stride 0). */
struct FdmaFwdParams {
    const void *q, *k, *v;
    void *out;
    float *lse;          /* (B, H, Sq) or NULL */
    int64_t q_sb, q_ss, q_sh;
    int64_t k_sb, k_ss, k_sh;
    int64_t v_sb, v_ss, v_sh;
    int64_t o_sb, o_ss, o_sh;
    int B, H, Hkv, Sq, Sk, D;
    int hkv_div;         /* H / Hkv */
    int num_m_tiles;
    int sm90;            /* the device has compute capability >= 9.0 (fdma_fwd_inst) */
    int pack_log2;       /* query heads per CTA = 2^pack_log2 (set by the launcher; fwd_kernel.cuh, AUX_TOP) */

    const uint8_t *mask; /* NULL = none */
    int64_t m_sb, m_sh, m_si, m_sj;
    int m_hdiv, m_rows_bcast, m_vec; /* m_vec: 16-byte loads are legal */
    const uint8_t *summary;          /* NULL = none; (m0, m1, ceil(m2/64), ceil(Sk/64)) contiguous */
    int64_t s_sb, s_sh, s_si;        /* summary strides in bytes (0 on broadcast dims) */
    int s_rows, s_cols;              /* ceil(m2/64), ceil(Sk/64) */

    const void *bias;    /* NULL = none */
    int64_t b_sb, b_sh, b_si, b_sj;
    int b_hdiv, b_rows_bcast, b_vec;

    float scale, scale_log2, softcap, inv_softcap;
    int causal;
    int qkv_vec, o_vec;  /* 16-byte loads/stores legal on q/k/v and out */

    int dropout;
    uint32_t drop_threshold;
    float drop_scale;    /* 1 / (1 - p_drop) */
    uint64_t seed, offset;
    const uint64_t *rng_state; /* NULL = seed/offset; else device {seed, offset}, read by the kernel (graphs) */

    /* gathered keys (row-broadcast mask): list of (b, mask head) at gather + b*g_sb + (h/m_hdiv)*g_sh, as
       [count, 15 unused, kept key indices in increasing order]; NULL = dense keys */
    const int32_t *gather;
    int64_t g_sb, g_sh;

    /* top-k window, SPARSE mode (window.cuh): key lists per (row r, query tile of BR rows), the expiry e of each
       list entry at the entry's position + ex_eoff; row r = b * ex_rb + (h / ex_hdiv) * ex_hmul. (i, j) visible
       iff j <= lim_i < e[r][j]. NULL = none */
    const int32_t *ex_lists, *ex_counts;
    int64_t ex_eoff, ex_cap, ex_ntiles, ex_rb;
    int ex_hdiv, ex_hmul;
};

/* Feature bits of a forward kernel instantiation (fwd_kernel.cuh): a clear bit compiles the feature out. MASK
 * means mask tiles read per key tile; a row-broadcast mask whose kept keys are gathered needs only GATHER. */
enum {
    FDMA_F_MASK = 1, FDMA_F_BIAS = 2, FDMA_F_DROP = 4, FDMA_F_GATHER = 8, FDMA_F_CAP = 16, FDMA_F_ALL = 31,
    FDMA_F_MB = FDMA_F_MASK | FDMA_F_BIAS, FDMA_F_BG = FDMA_F_BIAS | FDMA_F_GATHER
};

/* Instantiations compiled for sm90 only: mask + bias and bias + gather at dt = 128 run 4 warps x 2 row blocks,
 * which ptxas spills on sm80 (spills are build errors), so their sm80 code is empty and sm80 runs the general one. */
__host__ __device__ static constexpr bool fdma_fwd_sm90_only(int dt, int feat) {
    return dt == 128 && (feat == FDMA_F_MB || feat == FDMA_F_BG);
}
/* feat where the device can run it, else the general instantiation */
static constexpr int fdma_fwd_on(int dt, int feat, bool sm90) {
    return sm90 || !fdma_fwd_sm90_only(dt, feat) ? feat : FDMA_F_ALL;
}

/* The instantiation that runs a call needing features f at head-dim tile dt on a device of compute capability
 * >= 9.0 (sm90) or below: plain (0), mask + bias (W2: dense tiles with a mask and bias), bias + gather (W1, W1c:
 * gathered keys, optional row-broadcast bias, top-k window lists), or the general one (31; the only one for
 * dt > 128). The launcher and the plan's kernel name use it. */
static constexpr int fdma_fwd_inst(int dt, int f, bool sm90) {
    return dt > 128                                         ? FDMA_F_ALL
           : f == 0                                         ? 0
           : (f & ~FDMA_F_MB) == 0                          ? fdma_fwd_on(dt, FDMA_F_MB, sm90)
           : ((f & FDMA_F_GATHER) && (f & ~FDMA_F_BG) == 0) ? fdma_fwd_on(dt, FDMA_F_BG, sm90)
                                                            : FDMA_F_ALL;
}

/* Forward kernel shape for a head-dim tile: warps per CTA, 16-row blocks per warp (MI), query rows per CTA.
 * MI = 2 halves the shared-memory fragment traffic per MMA but needs 2x the accumulator registers: it fits
 * (no spills) for DT = 64; at DT = 128 the general instantiation uses 8 warps x 1 block, the plain, mask + bias
 * and bias + gather ones 4 x 2 (fdma_fwd_mi_f below). */
#ifndef FDMA_FWD_D128_WARPS
#define FDMA_FWD_D128_WARPS 8
#endif
#ifndef FDMA_FWD_D128_MI
#define FDMA_FWD_D128_MI 1
#endif
static constexpr int fdma_fwd_warps(int dt) { return dt == 64 ? 4 : dt == 128 ? FDMA_FWD_D128_WARPS : 4; }
static constexpr int fdma_fwd_mi(int dt) { return dt == 64 ? 2 : dt == 128 ? FDMA_FWD_D128_MI : 1; }
static constexpr int fdma_fwd_rows(int dt) { return 16 * fdma_fwd_warps(dt) * fdma_fwd_mi(dt); }
/* The plain (feat 0), mask + bias (feat 3) and bias + gather (feat 10) instantiations at DT <= 128
 * (fwd_kernel.cuh) compile the other features out; with the registers that frees, DT = 128 can run FA2's 4 warps
 * x 2 row blocks. Same rows per CTA as the general instantiation (the plan's grid and the top-k window's
 * per-query-tile key lists do not depend on the instantiation). */
#ifndef FDMA_FWD_D128_PLAIN_MI
#define FDMA_FWD_D128_PLAIN_MI 2
#endif
/* mask + bias at 4 x 2 (one mask buffer: 108 KB of shared memory, 2 CTAs per SM) */
#ifndef FDMA_FWD_D128_MB_MI
#define FDMA_FWD_D128_MB_MI 2
#endif
#ifndef FDMA_FWD_D128_BG_MI
#define FDMA_FWD_D128_BG_MI 2
#endif
/* D <= 64, every feature (dropout, softcap, gathered and sparse-window keys): 8 warps x 1 block; 4 x 2 spilled a
 * few bytes once the top-k window's visibility test and the device dropout seed were added. */
#ifndef FDMA_FWD_D64_ALL_MI
#define FDMA_FWD_D64_ALL_MI 1
#endif
static constexpr int fdma_fwd_mi_f(int dt, int feat) {
    return dt == 128  ? (feat == 0           ? FDMA_FWD_D128_PLAIN_MI
                         : feat == FDMA_F_BG  ? FDMA_FWD_D128_BG_MI
                         : feat == FDMA_F_MB  ? FDMA_FWD_D128_MB_MI
                                              : fdma_fwd_mi(dt))
           : dt == 64 ? (feat == FDMA_F_ALL ? FDMA_FWD_D64_ALL_MI : fdma_fwd_mi(dt))
                      : fdma_fwd_mi(dt);
}
static constexpr int fdma_fwd_warps_f(int dt, int feat) { return fdma_fwd_rows(dt) / (16 * fdma_fwd_mi_f(dt, feat)); }

/* Launchers, one per (head-dim tile) translation unit; dtype picked inside. */
fdma_status fdma_cuda_fwd_launch_d64(const FdmaFwdParams &kp, fdma_dtype dt, cudaStream_t stream);
fdma_status fdma_cuda_fwd_launch_d128(const FdmaFwdParams &kp, fdma_dtype dt, cudaStream_t stream);
fdma_status fdma_cuda_fwd_launch_d192(const FdmaFwdParams &kp, fdma_dtype dt, cudaStream_t stream);
fdma_status fdma_cuda_fwd_launch_d256(const FdmaFwdParams &kp, fdma_dtype dt, cudaStream_t stream);
/* probabilities (debug path) and the mask summary (fwd_aux.cu) */
fdma_status fdma_cuda_gather_launch(const FdmaFwdParams &kp, const fdma_params *p, int32_t *lists,
                                    cudaStream_t stream);
fdma_status fdma_cuda_fwd_probs_launch(const FdmaFwdParams &kp, fdma_dtype dt, void *probs, const float *lse,
                                       cudaStream_t stream);

/* ptr (if not NULL) is device memory on the current device, else INVALID_ARGUMENT naming it (api_cuda.cu). */
fdma_status fdma_cuda_check_device_ptr(const void *ptr, const char *name);

/* After a launch: turn a launch error into FDMA_STATUS_CUDA_ERROR with CUDA's text. */
static inline fdma_status fdma_cuda_check_launch(const char *what) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return fdma_set_error(FDMA_STATUS_CUDA_ERROR, "%s: CUDA error %s (%s)", what, cudaGetErrorName(e),
                              cudaGetErrorString(e));
    return FDMA_STATUS_OK;
}

#endif /* FDMA_CUDA_COMMON_CUH */
