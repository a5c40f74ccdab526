/*
 * bwd_dense.cuh -- the one-pass dkdv kernel of the CUDA backward (SPEC section 4) for the common calls: head dim
 * padded to 64 or 128, default (atomic dq) mode, no dropout, no softcap, no top-k window keys, no bias or a per-key
 * bias or a full bias with 16-byte rows (dense_eligible in bwd_common.cuh; bwd_common.cuh's dkdv/dq kernels run every
 * other call). Included by bwd_launch.cuh.
 *
 * Shapes as in bwd_common.cuh: q, dout (B, Sq, H, D); k, v, dk, dv (B, Sk, Hkv, D); lse, Di (B, H, Sq) fp32.
 *
 * Same grid and workspace as the general dkdv kernel (bwd.cu's make_config: one CTA per (128 keys, kv head or query
 * head, batch); for ACC dbias always per query head, with atomics, where the general kernel loops over the sharers),
 * 8 warps of 16 keys, and the same transposed layout (S^T = K Q^T, so that P^T and dS^T are already A operands of
 * dV += P^T dO and dK += dS^T Q), but:
 *   - one pass over the query blocks: the dV and dK accumulators (16 x kDp fp32 per warp each, 128 registers at
 *     kDp = 128) live in registers together; kBM query rows per step (dense_bm: 64 at kDp = 64, 32 at kDp = 128),
 *     S^T and dP^T are 16 x kBM per warp; P^T is kept for dS^T as fp16 pairs (half the registers of fp32);
 *   - compile-time features (kFeat bits DENSE_BIAS, DENSE_KBIAS, DENSE_MASK, DENSE_SMASK): the plain instantiation
 *     carries no mask, bias or dbias code, the bias ones no mask code. DENSE_KBIAS, a bias whose rows broadcast
 *     (dim 2 == 1, the per-key bias): 2 values per thread and step (its keys gid, gid + 8; rows are keys in this
 *     layout), and dbias (ACC_ROWS, or DIRECT when Sq = 1) as 2 fp32 column sums per thread over the head's query
 *     loop, reduced over the row's 4 lanes and written by one owner lane per key once per head (key_dbias_flush).
 *     DENSE_BIAS, a full bias: its kBM x 128 tile is staged in shared memory with Q / dO (16-byte cp.async,
 *     double-buffered) and read by ldmatrix.trans straight into the C-fragment order (2 instructions per warp and
 *     32 query rows); dbias from the dS^T tile that dq_atomic stages anyway: DIRECT written (dbias_from_sds,
 *     coalesced), ACC added to the fp32 accumulator by vector atomic reductions (dbias_red_sds), uniform runtime
 *     branches. DENSE_SMASK, a mask with Sq rows of 16-byte aligned contiguous bytes (dense_mask_staged): its
 *     kBM x 128 byte tile is staged too, in the same cp.async group, and folded into the staged bias tile (bias :=
 *     -inf where False; without a bias the tile is written as 0 / -inf) by the thread that copied both, after its
 *     own cp.async.wait and before the barrier that publishes the tile (fold_mask_tile): the score path is the bias
 *     one, exp2(-inf) = 0 gives P = dS = 0 (so dbias 0) at masked elements, and no mask byte is read per element.
 *     DENSE_MASK, any other mask (row-broadcast, unaligned): visible bits read per element from global memory.
 *     Causal and the Sq / Sk edges stay runtime: their per-element tests run only in warps whose 16 x kBM tile
 *     crosses the diagonal or an edge (a warp-uniform branch; DENSE_MASK: every warp);
 *   - 2 barriers per step: the one that publishes query tile t (cp.async, double-buffered) also frees the other
 *     buffer, whose load of tile t + 1 is issued right after it; the second publishes dS^T for dQ. All-False mask
 *     tiles are skipped (DIRECT dbias zeroed): DENSE_SMASK probes at the publishing barrier (__syncthreads_or over
 *     the staged bytes), DENSE_MASK adds a probe barrier over its visible bits.
 * Per step and warp (5 products; 320 mma.sync m16n8k16 per 64 query rows at kDp = 128):
 *   S^T = K Q^T;  P^T = exp2(S^T scale log2e [+ bias log2e] - lse log2e), 0 where not visible
 *   dV += P^T dO;  dP^T = V dO^T;  dS^T = P^T (dP^T - Di) [-> dbias];  dK += dS^T Q;  dQ += dS K (dq_atomic)
 * All k steps of the products run (kDp / 16): the columns past D are zeros in shared memory, so a padded D only
 * costs work, not correctness.
 *
 * Occupancy: one CTA of 8 warps per SM (255 registers x 256 threads; ~107 KB shared memory at kDp = 128, + 17 KB for
 * a staged bias tile, + 8 KB for a staged mask). Two CTAs of 64 keys x 4 warps would fit too, but halve the keys per
 * loaded query tile (2x the Q/dO/lse/Di loads) and double the dQ atomics (one set per 64 keys instead of 128), and
 * need a different grid.
 */
#ifndef FDMA_CUDA_BWD_DENSE_CUH
#define FDMA_CUDA_BWD_DENSE_CUH

#include <type_traits>

#include "bwd_common.cuh"

namespace fdma_bwdk {

enum { DENSE_BIAS = 1, DENSE_MASK = 2, DENSE_KBIAS = 4, DENSE_SMASK = 8 };
constexpr int kDenseBN = 128; /* keys per CTA: key_block(kDp) for kDp <= 128, the grid bwd.cu launches */
/* Query rows per step: 64 at kDp = 64; 32 at kDp = 128 (64 rows spill 12-32 bytes there, loop-invariant state
 * outside the step loop, but the build allows none). */
constexpr int dense_bm(int dp) { return dp <= 64 ? 64 : 32; }

/* Rows of the staged bias tile (DENSE_BIAS, DENSE_SMASK): kDenseBN keys + 8 (16-byte rows at a 272-byte pitch: the 8
 * rows that one ldmatrix phase reads land in 8 different bank groups). The staged mask tile (DENSE_SMASK) has rows of
 * kDenseBN bytes (read only by the thread that copied them). */
constexpr int kBiasPitch = kDenseBN + 8;

/* bf16 / fp16 pair -> float2. */
template <typename T> __device__ __forceinline__ float2 pair_f2(uint32_t u);
template <> __device__ __forceinline__ float2 pair_f2<__nv_bfloat16>(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u));
}
template <> __device__ __forceinline__ float2 pair_f2<__half>(uint32_t u) {
    return __half22float2(*reinterpret_cast<const __half2 *>(&u));
}

/* S^T tile (raw q.k C fragments, 16 keys x 8kN queries) -> P^T in place. kTest: elements whose bit (4n + e) in vis
 * is clear get 0; otherwise every element is visible. lse_s: the tile's lse (per query column). sb (kBias): the
 * staged bias tile of the step (DENSE_SMASK: the mask folded in), [query][kBiasPitch], at the warp's first key:
 * ldmatrix.trans of its 8 x 8 blocks (query rows 8n.., keys 8 kh..) hands each thread the C-fragment pair (key
 * gid + 8 kh, queries 8n + 2 t4, + 1).
 * kb (kKBias): the per-key bias times log2 e of the thread's keys gid and gid + 8. */
template <typename T, int kN, bool kBias, bool kKBias, bool kTest>
__device__ __forceinline__ void dense_p(const Args &a, float (&s)[kN][4], uint32_t vis, const float *lse_s,
                                        const T *sb, const float (&kb)[2], int lane) {
    constexpr float kLog2e = 1.4426950408889634f;
    const float sl2 = a.scale * kLog2e;
    const int t4 = lane & 3;
#pragma unroll
    for (int np = 0; np < kN / 2; np++) {
        uint32_t bb[4]; /* blocks (n, kh) = (2np, 0), (2np, 1), (2np + 1, 0), (2np + 1, 1) */
        if (kBias)
            fdma_ldmatrix_x4_trans(bb, sb + (16 * np + ((lane >> 4) << 3) + (lane & 7)) * kBiasPitch +
                                           (((lane >> 3) & 1) << 3));
#pragma unroll
        for (int nn = 0; nn < 2; nn++) {
            const int n = 2 * np + nn;
            const float2 l = *reinterpret_cast<const float2 *>(lse_s + 8 * n + 2 * t4);
            /* an empty row (lse -inf) gets +inf, so that p = 0 */
            const float l2[2] = {(l.x == -INFINITY ? INFINITY : l.x) * kLog2e,
                                 (l.y == -INFINITY ? INFINITY : l.y) * kLog2e};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const bool v = !kTest || ((vis >> (4 * n + e)) & 1);
                float x = fmaf(s[n][e], sl2, -l2[e & 1]);
                if (kBias) {
                    const float2 bf = pair_f2<T>(bb[2 * nn + (e >> 1)]);
                    x = fmaf((e & 1) ? bf.y : bf.x, kLog2e, x);
                }
                if (kKBias) x += kb[e >> 1];
                s[n][e] = v ? exp2f(x) : 0.f;
            }
        }
    }
}

/* The staged tiles of query rows [i0, i0 + kBM) x keys [n0, n0 + kDenseBN) of head h by 16-byte cp.async: kMask, the
 * mask bytes into sm ([kBM][kDenseBN]); kBias, the bias into sb ([kBM][kBiasPitch], DENSE_BIAS_ROWS16 form). Thread x
 * copies the 16-key chunks c = x, x + kThreads, ... (row c / 8, keys 16 (c % 8) ..): one mask chunk and the two bias
 * chunks of the same keys, so that fold_mask_tile, run by the same thread after its cp.async.wait, reads only what it
 * copied. Rows past Sq and keys past Sk: zeros (mask False). */
template <typename T, int kBM, int kThreads, bool kMask, bool kBias>
__device__ __forceinline__ void load_stage_tile(const Args &a, uint8_t *sm, T *sb, int b, int h, int64_t i0,
                                                int64_t n0) {
    constexpr int kCh = kDenseBN / 16;
    const uint8_t *gm = kMask ? a.mask + b * a.ms[0] + (int64_t)(h / a.mhdiv) * a.ms[1] + i0 * a.ms[2] + n0 : nullptr;
    const T *gb = kBias ? (const T *)a.bias + b * a.bs[0] + (int64_t)(h / a.bhdiv) * a.bs[1] + i0 * a.bs[2] + n0
                        : nullptr;
    const int keys = a.sk - (int)n0;
#pragma unroll
    for (int c = threadIdx.x; c < kBM * kCh; c += kThreads) {
        const int r = c / kCh, ch = c % kCh;
        const int nk = i0 + r < a.Sq ? min(16, keys - 16 * ch) : 0; /* valid keys of the chunk (<= 0: none) */
        if (kMask)
            fdma_cp_async16(sm + r * kDenseBN + 16 * ch, nk > 0 ? gm + r * a.ms[2] + 16 * ch : a.mask, max(nk, 0));
        if (kBias)
#pragma unroll
            for (int hh = 0; hh < 2; hh++) {
                const int nb = min(8, nk - 8 * hh);
                fdma_cp_async16(sb + r * kBiasPitch + 16 * ch + 8 * hh,
                                nb > 0 ? gb + r * a.bs[2] + 16 * ch + 8 * hh : (const T *)a.bias, nb > 0 ? 2 * nb : 0);
            }
    }
}

/* Sign-replicating byte permute (prmt.b32 with selector nibbles 8..15): result byte k = 0xff if the msb of byte
 * (sel nibble k & 7) of x is set, else 0. */
template <uint32_t kSel> __device__ __forceinline__ uint32_t prmt_sign(uint32_t x) {
    uint32_t r;
    asm("prmt.b32 %0, %1, 0, %2;\n" : "=r"(r) : "r"(x), "n"(kSel));
    return r;
}

/* DENSE_SMASK: the mask chunks this thread copied (load_stage_tile) folded into the bias tile, after its own
 * cp.async.wait for the tile and before the barrier that publishes it: bias := -inf where the mask byte is 0 (kBias),
 * or the tile written as 0 / -inf (no bias). Per 32-bit word of the bias (2 keys): the lane masks come from the mask
 * word by one prmt (the byte msb replicated) after a carry-free "byte != 0" (any nonzero byte counts as True), then
 * one select (lop3). Returns whether any of its mask bytes is True. */
template <typename T, int kBM, int kThreads, bool kBias>
__device__ __forceinline__ bool fold_mask_tile(const uint8_t *sm, T *sb) {
    constexpr int kCh = kDenseBN / 16;
    const uint32_t ninf = fdma_pack2<T>(-INFINITY, -INFINITY);
    uint32_t any = 0;
#pragma unroll
    for (int c = threadIdx.x; c < kBM * kCh; c += kThreads) {
        const int r = c / kCh, ch = c % kCh;
        const uint4 m = *reinterpret_cast<const uint4 *>(sm + r * kDenseBN + 16 * ch);
        const uint32_t mw[4] = {m.x, m.y, m.z, m.w};
        uint4 *bp = reinterpret_cast<uint4 *>(sb + r * kBiasPitch + 16 * ch);
#pragma unroll
        for (int hh = 0; hh < 2; hh++) { /* bias chunk hh: keys 8 hh .. 8 hh + 7, mask words 2 hh, 2 hh + 1 */
            const uint4 bv = kBias ? bp[hh] : make_uint4(0u, 0u, 0u, 0u);
            uint32_t w[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int e = 0; e < 4; e++) { /* bias word e: keys 2e, 2e + 1 of the chunk = bytes 2 (e & 1), + 1 */
                const uint32_t x = mw[2 * hh + (e >> 1)];
                const uint32_t nz = x | ((x & 0x7f7f7f7fu) + 0x7f7f7f7fu); /* msb of each byte: byte != 0 */
                if (e & 1) any |= nz;
                const uint32_t lm = (e & 1) ? prmt_sign<0xBBAA>(nz) : prmt_sign<0x9988>(nz);
                w[e] = (w[e] & lm) | (ninf & ~lm);
            }
            bp[hh] = make_uint4(w[0], w[1], w[2], w[3]);
        }
    }
    return (any & 0x80808080u) != 0;
}

/* dP^T -> dS^T = P^T (dP^T - Di) in place; ph: P^T as fp16 pairs in A-fragment order (to_afrag: elements (n, 0..1)
 * and (n, 2..3) at ph[n / 2][2 (n & 1)] and [2 (n & 1) + 1]); di_s: the tile's Di (per query column). */
template <int kN>
__device__ __forceinline__ void dense_ds(float (&dp)[kN][4], const uint32_t (&ph)[kN / 2][4], const float *di_s,
                                         int lane) {
    const int t4 = lane & 3;
#pragma unroll
    for (int n = 0; n < kN; n++) {
        const float2 d = *reinterpret_cast<const float2 *>(di_s + 8 * n + 2 * t4);
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            const float2 p = __half22float2(*reinterpret_cast<const __half2 *>(&ph[n >> 1][2 * (n & 1) + hf]));
            dp[n][2 * hf] = p.x * (dp[n][2 * hf] - d.x);
            dp[n][2 * hf + 1] = p.y * (dp[n][2 * hf + 1] - d.y);
        }
    }
}

/* KEY-BIAS: the bias of the thread's keys j and j + 8 (j = the warp's first key + gid) for head h, times log2 e
 * (0 past Sk). */
template <typename T>
__device__ __forceinline__ void key_bias(const Args &a, float (&kb)[2], int b, int h, int j) {
    constexpr float kLog2e = 1.4426950408889634f;
    const T *p = (const T *)a.bias + b * a.bs[0] + (int64_t)(h / a.bhdiv) * a.bs[1] + (int64_t)j * a.bs[3];
    kb[0] = j < a.sk ? to_f(p[0]) * kLog2e : 0.f;
    kb[1] = j + 8 < a.sk ? to_f(p[8 * a.bs[3]]) * kLog2e : 0.f;
}

/* KEY-BIAS dbias of head h, once all its query tiles are done: db holds the thread's partial column sums of dS^T
 * (keys j, j + 8 over its query columns); summed over the 4 lanes of a row (fixed order), then one owner lane per
 * key adds it to the (batch, query head, key) partial (ACC_ROWS: its only writer, the workspace starts at 0) or
 * writes dbias (DIRECT: Sq == 1, the one row). */
template <typename T>
__device__ __forceinline__ void key_dbias_flush(const Args &a, float (&db)[2], int b, int h, int j, int lane) {
    if (a.dbias_mode == DBIAS_NONE) return;
#pragma unroll
    for (int x = 0; x < 2; x++) {
        db[x] += __shfl_xor_sync(0xffffffffu, db[x], 1);
        db[x] += __shfl_xor_sync(0xffffffffu, db[x], 2);
    }
    if ((lane & 3) == 0) {
        if (a.dbias_mode == DBIAS_ACC_ROWS) {
            float *base = a.dbacc + b * a.acs[0] + (int64_t)(h / a.achdiv) * a.acs[1];
            if (j < a.sk) base[j] += db[0];
            if (j + 8 < a.sk) base[j + 8] += db[1];
        } else {
            T *base = (T *)a.dbias + b * a.dbs[0] + (int64_t)h * a.dbs[1];
            if (j < a.sk) base[(int64_t)j * a.dbs[3]] = from_f<T>(db[0]);
            if (j + 8 < a.sk) base[(int64_t)(j + 8) * a.dbs[3]] = from_f<T>(db[1]);
        }
    }
    db[0] = db[1] = 0.f;
}

/* DIRECT dbias of a step (DENSE_BIAS) from the dS^T tile that dq_atomic left in shared memory ([key][kBM + 8], the
 * values dbias_tile would write: the same rounding to T), after its barrier and before the next step's first one:
 * thread x writes keys x % 32 + 32 k of query rows x / 32, x / 32 + kThreads / 32, ... (32 consecutive keys per
 * warp store: coalesced for a key-contiguous dbias). */
template <typename T, int kBM, int kThreads>
__device__ __forceinline__ void dbias_from_sds(const Args &a, const T *sdS, int b, int h, int64_t i0, int64_t n0) {
    const int jl0 = threadIdx.x & 31;
#pragma unroll 1
    for (int il = threadIdx.x >> 5; il < kBM && i0 + il < a.Sq; il += kThreads / 32) {
        T *row = (T *)a.dbias + b * a.dbs[0] + (int64_t)h * a.dbs[1] + (i0 + il) * a.dbs[2];
#pragma unroll
        for (int k = 0; k < kDenseBN / 32; k++) {
            const int jl = jl0 + 32 * k;
            if (n0 + jl < a.Sk) row[(n0 + jl) * a.dbs[3]] = sdS[jl * (kBM + 8) + il];
        }
    }
}

/* dst[0 .. 3] += v, fp32 reductions (relaxed, device scope; no value returned): one vector red on sm90 (red.add with
 * .v4.f32 needs sm_90), four scalar ones below. dst 16-byte aligned, global. */
__device__ __forceinline__ void red_add_f32x4(float *dst, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(v.x), "f"(v.y), "f"(v.z),
                 "f"(v.w)
                 : "memory");
#else
    asm volatile("red.global.add.f32 [%0], %1;\n\tred.global.add.f32 [%0+4], %2;\n\t"
                 "red.global.add.f32 [%0+8], %3;\n\tred.global.add.f32 [%0+12], %4;\n" ::"l"(dst),
                 "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
                 : "memory");
#endif
}

/* ACC dbias of a step (DENSE_BIAS; the dense kernel runs in the default mode only, so atomics are allowed): the dS^T
 * tile that dq_atomic left in shared memory ([key][kBM + 8], T) added to the fp32 accumulator (B, H and Sq
 * broadcasts resolved by acs / achdiv) by vector reductions. The CTAs of the query heads (and batches) that share an
 * element add to it concurrently, so the order of the sum, and its last bits, vary from run to run (as dq's do).
 * Lane l of a warp: query rows 2p, 2p + 1 (p = l % kLanesQ: one 32-bit word of the tile per key, conflict-free) and
 * keys 4q .. 4q + 3 (q: kGroupsW consecutive groups per warp and pass); groups that are all 0 (masked, causal) are
 * skipped. The accumulator rows are padded to a multiple of 4 floats (bwd.cu), so the group at the Sk edge stays in
 * its row and is 16-byte aligned. */
template <typename T, int kBM, int kThreads>
__device__ __forceinline__ void dbias_red_sds(const Args &a, const T *sdS, int b, int h, int64_t i0, int64_t n0) {
    constexpr int kLanesQ = kBM / 2 < 32 ? kBM / 2 : 32, kGroupsW = 32 / kLanesQ;
    static_assert(kBM / 2 == kLanesQ, "one query pair per lane");
    const int lane = threadIdx.x & 31, p = lane % kLanesQ;
    const int64_t i = i0 + 2 * p;
    float *row = a.dbacc + b * a.acs[0] + (int64_t)(h / a.achdiv) * a.acs[1] + i * a.acs[2] + n0;
#pragma unroll 1
    for (int q = (threadIdx.x >> 5) * kGroupsW + lane / kLanesQ; q < kDenseBN / 4 && n0 + 4 * q < a.Sk;
         q += kThreads / 32 * kGroupsW) {
        float lo[4], hi[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float2 f = pair_f2<T>(*reinterpret_cast<const uint32_t *>(sdS + (4 * q + e) * (kBM + 8) + 2 * p));
            lo[e] = f.x;
            hi[e] = f.y;
        }
        if (i < a.Sq && (lo[0] != 0.f || lo[1] != 0.f || lo[2] != 0.f || lo[3] != 0.f))
            red_add_f32x4(row + 4 * q, make_float4(lo[0], lo[1], lo[2], lo[3]));
        if (i + 1 < a.Sq && (hi[0] != 0.f || hi[1] != 0.f || hi[2] != 0.f || hi[3] != 0.f))
            red_add_f32x4(row + a.acs[2] + 4 * q, make_float4(hi[0], hi[1], hi[2], hi[3]));
    }
}

template <typename T, int kDp, int kFeat, int kBM>
__global__ void __launch_bounds__(kDenseBN * 2, 1) dense_kernel(const Args a) {
#ifndef FDMA_BWD_NO_DEVICE_CODE
    constexpr bool kBias = (kFeat & DENSE_BIAS) != 0, kMask = (kFeat & DENSE_MASK) != 0;
    constexpr bool kKBias = (kFeat & DENSE_KBIAS) != 0, kSMask = (kFeat & DENSE_SMASK) != 0;
    constexpr bool kTile = kBias || kSMask; /* a staged bias tile, read by dense_p */
    static_assert(!(kBias && kKBias), "one bias form per instantiation");
    static_assert(!(kMask && kSMask), "one mask form per instantiation");
    constexpr int kBN = kDenseBN, kN = kBM / 8, kThreads = kBN * 2, kK = kDp / 16;
    extern __shared__ __align__(128) unsigned char smem[];
    const DkdvTiles<T, kDp, kBN, true, kBM> tl(smem);
    T *sBias = reinterpret_cast<T *>(tl.sDi + 2 * kBM); /* kTile: [2][kBM][kBiasPitch], past DkdvSmem's layout */
    uint8_t *sMask = reinterpret_cast<uint8_t *>(sBias + 2 * kBM * kBiasPitch); /* kSMask: [2][kBM][kBN] */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, row0 = warp * 16;
    const Lane L = make_lane(lane);
    const int64_t n0 = (int64_t)blockIdx.x * kBN;
    const int nM = (int)((a.Sq + kBM - 1) / kBM);
    const int m_first = first_q_block(a, n0, kBM);
    const int nm = nM - m_first;
    const int jw = (int)n0 + row0; /* the warp's first key */
    const bool key_edge = jw + 16 > a.sk;

    for_each_unit(a, [&](int b, int hkv, int h_lo, int nh) {
        begin_unit<T, kDp, kBN, kThreads, kBias || kKBias, true>(a, tl.sK, tl.sV, b, hkv, h_lo, nh,
                                                                 (int64_t)m_first * kBM, n0);
        auto load_tile = [&](int h, int64_t i0, int buf) {
            load_q_tile<T, kDp, kBN, true, kBM, kThreads, true>(a, tl, b, h, i0, buf);
            if (kTile)
                load_stage_tile<T, kBM, kThreads, kSMask, kBias>(a, sMask + buf * kBM * kBN,
                                                                 sBias + buf * kBM * kBiasPitch, b, h, i0, n0);
        };
        if (nm > 0) load_tile(h_lo, (int64_t)m_first * kBM, 0);
        fdma_cp_async_commit();
        float accV[kDp / 8][4], accK[kDp / 8][4];
        zero_acc(accV);
        zero_acc(accK);
        float db[2] = {0.f, 0.f}; /* KEY-BIAS dbias: partial column sums of dS^T (keys jk, jk + 8) of the head */
        const int jk = jw + (lane >> 2);
        /* query tiles (head h_lo .. h_end - 1) x (block m_first .. m_first + nm - 1), head-major; (hn, mn) is the
           next tile, buf the buffer of the current one */
        const int h_end = nm > 0 ? h_lo + nh : h_lo;
        for (int hn = h_lo, mn = m_first, buf = 1; hn < h_end;) {
            const int h = hn, m = mn;
            buf ^= 1;
            if (++mn == m_first + nm) {
                mn = m_first;
                hn++;
            }
            if (kKBias && m == m_first && h != h_lo) key_dbias_flush<T>(a, db, b, h - 1, jk, lane);
            fdma_cp_async_wait<0>();
            /* tile (h, m) visible; every warp is done with the previous step (buf ^ 1, dS^T). kSMask: each thread
               first folds the mask chunks it copied into the bias tile, and the barrier tells whether any is True */
            bool live = true;
            if constexpr (kSMask)
                live = __syncthreads_or(fold_mask_tile<T, kBM, kThreads, kBias>(sMask + buf * kBM * kBN,
                                                                                 sBias + buf * kBM * kBiasPitch));
            else
                __syncthreads();
            if (hn < h_end) load_tile(hn, (int64_t)mn * kBM, buf ^ 1);
            fdma_cp_async_commit();
            const int64_t i0 = (int64_t)m * kBM;
            if (!live) { /* an all-False mask tile */
                if (kBias && a.dbias_mode == DBIAS_DIRECT) dbias_zero<T, kBN, kThreads>(a, b, h, i0, i0 + kBM, n0);
                continue;
            }
            /* per-element tests only where the warp's tile crosses the causal diagonal or an Sq / Sk edge */
            const bool test = kMask || key_edge || (int)i0 + kBM > a.sq ||
                              (a.causal && jw + 15 - (int)i0 > a.sk - a.sq);
            static_assert(kN <= 8, "visible bits: 32 per thread");
            uint32_t vis = 0xffffffffu;
            if (kMask) {
                vis = visible_bits<true, kN, true, false>(a, b, h, i0, n0, row0, lane);
                if (!__syncthreads_or(vis != 0)) {
                    if (kBias && a.dbias_mode == DBIAS_DIRECT) dbias_zero<T, kBN, kThreads>(a, b, h, i0, i0 + kBM, n0);
                    continue;
                }
            } else if (test) {
                vis = visible_bits<true, kN, false, false>(a, b, h, i0, n0, row0, lane);
            }
            const T *sQb = tl.sQ + buf * kBM * kDp, *sdOb = tl.sdO + buf * kBM * kDp;
            const T *sb = sBias + buf * kBM * kBiasPitch + row0;
            float kb[2] = {0.f, 0.f};
            if (kKBias) key_bias<T>(a, kb, b, h, jk);

            float s[kN][4];
            gemm_rows_bt<T, kDp, kN>(s, tl.sK, row0, sQb, kK, L); /* S^T = K Q^T */
            if (test) dense_p<T, kN, kTile, kKBias, true>(a, s, vis, tl.sLse + buf * kBM, sb, kb, lane);
            else dense_p<T, kN, kTile, kKBias, false>(a, s, vis, tl.sLse + buf * kBM, sb, kb, lane);
            /* P^T kept for dS^T as fp16 pairs (16 registers instead of 32 across the dP^T product; P <= 1) */
            uint32_t ph[kN / 2][4];
            to_afrag<__half, kN>(ph, s, [](int, int) { return 1.f; });
            if constexpr (std::is_same<T, __half>::value) {
                gemm_regs_b<T, kDp, kN>(accV, ph, sdOb, kK, L); /* dV += P^T dO */
            } else {
                uint32_t pa[kN / 2][4];
                to_afrag<T, kN>(pa, s, [](int, int) { return 1.f; });
                gemm_regs_b<T, kDp, kN>(accV, pa, sdOb, kK, L);
            }
            float dp[kN][4];
            gemm_rows_bt<T, kDp, kN>(dp, tl.sV, row0, sdOb, kK, L); /* dP^T = V dO^T */
            dense_ds<kN>(dp, ph, tl.sDi + buf * kBM, lane);
            if (kKBias)
#pragma unroll
                for (int n = 0; n < kN; n++) {
                    db[0] += dp[n][0] + dp[n][1];
                    db[1] += dp[n][2] + dp[n][3];
                }
            uint32_t da[kN / 2][4];
            to_afrag<T, kN>(da, dp, [](int, int) { return 1.f; });
            gemm_regs_b<T, kDp, kN>(accK, da, sQb, kK, L); /* dK += dS^T Q */
            dq_atomic<T, kDp, kBN, kBM, false>(a, tl.sdS, tl.sK, da, b, h, i0, row0, lane, L);
            if (kBias && a.dbias_mode == DBIAS_DIRECT) dbias_from_sds<T, kBM, kThreads>(a, tl.sdS, b, h, i0, n0);
            if (kBias && a.dbias_mode == DBIAS_ACC) dbias_red_sds<T, kBM, kThreads>(a, tl.sdS, b, h, i0, n0);
        }
        if (kKBias && nm > 0) key_dbias_flush<T>(a, db, b, h_end - 1, jk, lane);
        fdma_cp_async_wait<0>(); /* K / V when no query tile ran: nothing in flight into the next unit's tiles */
        const bool partial = a.hph == 1 && a.g > 1;
        write_kv<T, kDp, 0>(a, accV, 1.f, a.dv, a.dvs, partial ? a.dvpart : nullptr, b, hkv, h_lo, n0, row0, lane);
        write_kv<T, kDp, 0>(a, accK, a.scale, a.dk, a.dks, partial ? a.dkpart : nullptr, b, hkv, h_lo, n0, row0, lane);
    });
#endif
}

template <typename T, int kDp, int kFeat> cudaError_t launch_dense_feat(const Args &a, dim3 grid, cudaStream_t st) {
    constexpr int kBM = dense_bm(kDp);
    constexpr size_t kTileBytes = (kFeat & (DENSE_BIAS | DENSE_SMASK)) ? 2 * sizeof(T) * kBM * kBiasPitch : 0;
    constexpr size_t kMaskBytes = (kFeat & DENSE_SMASK) ? 2 * kBM * kDenseBN : 0;
    return launch_smem(dense_kernel<T, kDp, kFeat, kBM>, grid, kDenseBN * 2,
                       DkdvSmem<kDp, kDenseBN, true, kBM>::bytes_of(sizeof(T)) + kTileBytes + kMaskBytes, st, a);
}

/* kBiasFeat (0, DENSE_BIAS or DENSE_KBIAS) with the call's mask form: none, staged (dense_mask_staged), per element. */
template <typename T, int kDp, int kBiasFeat> cudaError_t launch_dense_mask(const Args &a, dim3 grid, cudaStream_t st) {
    if (!a.mask) return launch_dense_feat<T, kDp, kBiasFeat>(a, grid, st);
    return dense_mask_staged(a.mask, a.ms) ? launch_dense_feat<T, kDp, kBiasFeat | DENSE_SMASK>(a, grid, st)
                                           : launch_dense_feat<T, kDp, kBiasFeat | DENSE_MASK>(a, grid, st);
}

/* The dense kernel for a call that dense_eligible accepts; grid as bwd.cu computes it for key_block(kDp) keys. */
template <typename T, int kDp> cudaError_t launch_dense(const Args &a, dim3 grid, cudaStream_t st) {
    static_assert(kDp <= 128 && key_block(kDp) == kDenseBN, "the dense kernel uses the general kernel's grid");
    const int form = dense_bias_form(a.bias, a.bs, a.dbias_mode, a.Sq);
    if (form == DENSE_BIAS_KEY) return launch_dense_mask<T, kDp, DENSE_KBIAS>(a, grid, st);
    if (form == DENSE_BIAS_ROWS16) return launch_dense_mask<T, kDp, DENSE_BIAS>(a, grid, st);
    return launch_dense_mask<T, kDp, 0>(a, grid, st);
}

} /* namespace fdma_bwdk */

#endif /* FDMA_CUDA_BWD_DENSE_CUH */
