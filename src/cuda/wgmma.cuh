/*
 * wgmma.cuh -- the Hopper warpgroup matrix-multiply pieces (PTX wgmma.mma_async, sm_90a only) that the wgmma
 * backward kernels (bwd_wgmma.cu, bwd_wgmma_sparse.cu) use: shared-memory matrix descriptors for the 128-byte swizzled
 * layout, fence / commit / wait, the tile loader, and the shapes the backward needs, as inline PTX with fp32
 * accumulators:
 *   WgSS64<T, kTA, kTB>::run(d, descA, descB, scale_d)   d (64 x 64) (scale_d ? += : =) A (64 x 16) B (16 x 64)
 *   WgSS64<T, kTA, kTB>::first(d, descA, descB)          d = A B with d write-only (the first k step of a product)
 *   WgSS128<T, kTA, kTB>::first / run(d, descA, descB)   d (64 x 128) = / += A (64 x 16) B (16 x 128)
 *   WgRS128<T, kTB>::run(d, a, descB)                    d (64 x 128) += A (64 x 16, registers) B (16 x 128)
 *   wg_ss64_k128<T>(d, ...)                              d (64 x 64) = A B^T over k = 128, K-major tiles
 * T is __nv_bfloat16 or __half. kTA / kTB = 0: the operand is K-major in shared memory (A [m][k], B [n][k], k
 * contiguous); 1: M- / N-major (A [k][m], B [k][n]).
 *
 * Register layouts (PTX ISA, "Register Fragments" of wgmma .m64nNk16): warp w of the warpgroup (w = warp % 4) owns
 * rows 16 w .. 16 w + 15 of d and of A; d[n][e] is row 16 w + gid + 8 (e >> 1), column 8 n + 2 t4 + (e & 1) (gid =
 * lane / 4, t4 = lane % 4): per warp exactly mma.sync m16n8k16's C layout, and the A registers are its A fragment
 * (to_afrag in bwd_common.cuh builds them from C fragments).
 *
 * Shared-memory layout (one "atom" of the 128-byte swizzle, 1024 bytes, 1024-byte aligned): 8 rows of 128 bytes,
 * 16-byte chunk c of row r stored at chunk c ^ (r % 8). A K-major operand with k = 64 elements per row: rows are m
 * (or n), atoms stacked along m every 1024 bytes (SBO); a 16-wide k step starts 32 bytes further into the row (the
 * hardware applies the swizzle to the final address bits). An MN-major operand: rows are k, 64 m (n) elements per row;
 * the 8-row k groups every SBO bytes, 64-element m (n) blocks every LBO bytes. Descriptor bits (PTX "Matrix
 * Descriptor Format"): start address >> 4 in 0-13, LBO >> 4 in 16-29, SBO >> 4 in 32-45, base offset 0 (atoms are
 * 1024-byte aligned), swizzle mode 1 (128-byte) in 62-63.
 *
 * Async rules kept by the callers: wg_fence() before the first wgmma of a batch whose accumulator or A registers were
 * written by ordinary instructions; wg_commit() closes a group; wg_wait<N>() waits until at most N groups are
 * pending; shared memory written by the generic proxy (st.shared, cp.async) that wgmma reads needs
 * fence_proxy_async() in the writing threads before the barrier that publishes it. wg_reg_fence() pins accumulator
 * registers so the compiler moves no access to them across a wgmma issue or wait.
 */
#ifndef FDMA_CUDA_WGMMA_CUH
#define FDMA_CUDA_WGMMA_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

namespace fdma_wg {

/* Descriptor of a 128-byte swizzled operand at shared-window address saddr (16-byte aligned). */
__device__ __forceinline__ uint64_t desc_sw128(uint32_t saddr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((saddr & 0x3FFFFu) >> 4) | ((uint64_t)((lbo & 0x3FFFFu) >> 4) << 16) |
           ((uint64_t)((sbo & 0x3FFFFu) >> 4) << 32) | (1ull << 62);
}

/* The same descriptor kept as two 32-bit words, so that a loop steps it by one 32-bit add: lo = start address >> 4 |
 * LBO >> 4 << 16 (a byte offset x is added as x >> 4: the address field cannot carry into LBO, shared addresses are
 * below 256 KB), hi = SBO >> 4 | the swizzle mode. */
__device__ __forceinline__ uint32_t desc_lo(uint32_t saddr, uint32_t lbo) {
    return ((saddr & 0x3FFFFu) >> 4) | (((lbo & 0x3FFFFu) >> 4) << 16);
}
__host__ __device__ constexpr uint32_t desc_hi(uint32_t sbo) { return ((sbo & 0x3FFFFu) >> 4) | (1u << 30); }
__device__ __forceinline__ uint64_t desc_of(uint32_t lo, uint32_t hi) { return ((uint64_t)hi << 32) | lo; }

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <int N> __device__ __forceinline__ void wg_reg_fence(float (&d)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(d[n][e])::"memory");
}

template <typename T, int kTA, int kTB> struct WgSS64;
template <typename T, int kTA, int kTB> struct WgSS128;
template <typename T, int kTB> struct WgRS128;

/* Rows [0, R) of a global (rows, D) slab (row stride rs, D <= 128) into a [2 column halves][R][64] tile at shared
 * address s (1024-byte aligned), 128-byte swizzled, by kThreads threads; rows >= nvalid and columns >= D become
 * zeros (cp.async, not committed). */
template <typename T, int R, int kThreads>
__device__ __forceinline__ void wg_load_rows(uint32_t s, const T *g, int64_t rs, int64_t nvalid, int D) {
#pragma unroll
    for (int c = threadIdx.x; c < R * 16; c += kThreads) {
        const int r = c >> 4, cc = c & 15;
        const uint32_t dst = s + (cc >> 3) * (R * 128) + r * 128 + (((cc & 7) ^ (r & 7)) << 4);
        const bool pred = r < nvalid && cc * 8 < D;
        fdma_cp_async16_s(dst, pred ? g + r * rs + cc * 8 : g, pred ? 16 : 0);
    }
}

/* Register lists of the shapes: FDMA_WG_R32 / R64 the accumulator operands %0.., FDMA_WG_D32 / D64 (C, d) the
 * matching constraint list, C one of FDMA_WG_RW ("+f") or FDMA_WG_WO ("=f", write-only). */
#define FDMA_WG_RW(x) "+f"(x)
#define FDMA_WG_WO(x) "=f"(x)
#define FDMA_WG_R32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "\
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FDMA_WG_R64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "\
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "\
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "\
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define FDMA_WG_D32(C, d) \
    C(d[0][0]), C(d[0][1]), C(d[0][2]), C(d[0][3]), C(d[1][0]), C(d[1][1]), C(d[1][2]), C(d[1][3]), \
    C(d[2][0]), C(d[2][1]), C(d[2][2]), C(d[2][3]), C(d[3][0]), C(d[3][1]), C(d[3][2]), C(d[3][3]), \
    C(d[4][0]), C(d[4][1]), C(d[4][2]), C(d[4][3]), C(d[5][0]), C(d[5][1]), C(d[5][2]), C(d[5][3]), \
    C(d[6][0]), C(d[6][1]), C(d[6][2]), C(d[6][3]), C(d[7][0]), C(d[7][1]), C(d[7][2]), C(d[7][3])
#define FDMA_WG_D64(C, d) \
    C(d[0][0]), C(d[0][1]), C(d[0][2]), C(d[0][3]), C(d[1][0]), C(d[1][1]), C(d[1][2]), C(d[1][3]), \
    C(d[2][0]), C(d[2][1]), C(d[2][2]), C(d[2][3]), C(d[3][0]), C(d[3][1]), C(d[3][2]), C(d[3][3]), \
    C(d[4][0]), C(d[4][1]), C(d[4][2]), C(d[4][3]), C(d[5][0]), C(d[5][1]), C(d[5][2]), C(d[5][3]), \
    C(d[6][0]), C(d[6][1]), C(d[6][2]), C(d[6][3]), C(d[7][0]), C(d[7][1]), C(d[7][2]), C(d[7][3]), \
    C(d[8][0]), C(d[8][1]), C(d[8][2]), C(d[8][3]), C(d[9][0]), C(d[9][1]), C(d[9][2]), C(d[9][3]), \
    C(d[10][0]), C(d[10][1]), C(d[10][2]), C(d[10][3]), C(d[11][0]), C(d[11][1]), C(d[11][2]), C(d[11][3]), \
    C(d[12][0]), C(d[12][1]), C(d[12][2]), C(d[12][3]), C(d[13][0]), C(d[13][1]), C(d[13][2]), C(d[13][3]), \
    C(d[14][0]), C(d[14][1]), C(d[14][2]), C(d[14][3]), C(d[15][0]), C(d[15][1]), C(d[15][2]), C(d[15][3])


/* The wgmma shapes for one element type: CT the C++ type, PT its PTX name. */
#define FDMA_WG_OPS(CT, PT)                                                                                      \
    template <int kTA, int kTB> struct WgSS64<CT, kTA, kTB> {                                                    \
        /* d (scale_d ? += : =) A B */                                                                           \
        static __device__ __forceinline__ void run(float (&d)[8][4], uint64_t da, uint64_t db, int scale_d) {   \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                            \
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32." PT "." PT "\n" FDMA_WG_R32 ",\n"         \
                         "%32, %33, p, 1, 1, %35, %36;\n}\n"                                                    \
                         : FDMA_WG_D32(FDMA_WG_RW, d)                                                            \
                         : "l"(da), "l"(db), "r"(scale_d), "n"(kTA), "n"(kTB));                                  \
        }                                                                                                        \
        /* d = A B, d write-only (so that nothing initialises d before the product) */                          \
        static __device__ __forceinline__ void first(float (&d)[8][4], uint64_t da, uint64_t db) {              \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %36, 0;\n"                                            \
                         "wgmma.mma_async.sync.aligned.m64n64k16.f32." PT "." PT "\n" FDMA_WG_R32 ",\n"         \
                         "%32, %33, p, 1, 1, %34, %35;\n}\n"                                                    \
                         : FDMA_WG_D32(FDMA_WG_WO, d)                                                            \
                         : "l"(da), "l"(db), "n"(kTA), "n"(kTB), "r"(0));                                        \
        }                                                                                                        \
    };                                                                                                           \
    template <int kTA, int kTB> struct WgSS128<CT, kTA, kTB> {                                                   \
        /* d = A B, d write-only */                                                                              \
        static __device__ __forceinline__ void first(float (&d)[16][4], uint64_t da, uint64_t db) {             \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %68, 0;\n"                                            \
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32." PT "." PT "\n" FDMA_WG_R64 ",\n"        \
                         "%64, %65, p, 1, 1, %66, %67;\n}\n"                                                    \
                         : FDMA_WG_D64(FDMA_WG_WO, d)                                                            \
                         : "l"(da), "l"(db), "n"(kTA), "n"(kTB), "r"(0));                                        \
        }                                                                                                        \
        /* d += A B */                                                                                           \
        static __device__ __forceinline__ void run(float (&d)[16][4], uint64_t da, uint64_t db) {               \
            asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." PT "." PT "\n" FDMA_WG_R64 ",\n"        \
                         "%64, %65, 1, 1, 1, %66, %67;\n"                                                        \
                         : FDMA_WG_D64(FDMA_WG_RW, d)                                                            \
                         : "l"(da), "l"(db), "n"(kTA), "n"(kTB));                                                \
        }                                                                                                        \
    };                                                                                                           \
    template <int kTB> struct WgRS128<CT, kTB> {                                                                 \
        /* d += A B, A from registers */                                                                         \
        static __device__ __forceinline__ void run(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db) {    \
            asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." PT "." PT "\n" FDMA_WG_R64 ",\n"        \
                         "{%64, %65, %66, %67}, %68, 1, 1, 1, %69;\n"                                            \
                         : FDMA_WG_D64(FDMA_WG_RW, d)                                                            \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(kTB));                       \
        }                                                                                                        \
    };

FDMA_WG_OPS(__nv_bfloat16, "bf16")
FDMA_WG_OPS(__half, "f16")

/* d (64 x 64) = A B^T over k = 128: A and B K-major [2 column halves][rows][64] tiles (descriptor lo words alo, blo;
 * a_half, b_half: bytes from one half to the other; hi: desc_hi(1024)); 8 k steps, the first write-only. The caller
 * fences before and commits after. */
template <typename T>
__device__ __forceinline__ void wg_ss64_k128(float (&d)[8][4], uint32_t alo, uint32_t a_half, uint32_t blo,
                                             uint32_t b_half, uint32_t hi) {
    WgSS64<T, 0, 0>::first(d, desc_of(alo, hi), desc_of(blo, hi));
#pragma unroll
    for (int kk = 1; kk < 8; kk++)
        WgSS64<T, 0, 0>::run(d, desc_of(alo + ((kk >> 2) * a_half + (kk & 3) * 32) / 16, hi),
                             desc_of(blo + ((kk >> 2) * b_half + (kk & 3) * 32) / 16, hi), 1);
}

} /* namespace fdma_wg */

#endif /* FDMA_CUDA_WGMMA_CUH */
