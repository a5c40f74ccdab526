/*
 * fwd_aux.cu -- the two small forward-side kernels beside the attention kernel:
 *
 *   fdma_probs_kernel      p[b,h,i,j] = exp(s[i,j] - lse[i]) where visible, else 0 (SPEC section 3, the
 *                          return_attn_probs debug output), written (B, H, Sq, Sk) contiguous in q's dtype.
 *                          One CTA per query row; s recomputed in fp32 from q and k; lse from the forward.
 *   fdma_gather_kernel     the gathered-key lists of a row-broadcast mask ({B|1}, {H|Hkv|1}, 1, Sk): per (b, mask
 *                          head) [count, 15 unused, kept key indices in increasing order]. One CTA of 1024
 *                          threads per list walks Sk in chunks of 1024 keys (ballot + block prefix sum).
 *   fdma_summary_kernel    one byte per 64x64 tile of the mask in its own dims (m0, m1, ceil(m2/64),
 *                          ceil(Sk/64)): 0 all False, 1 mixed, 2 all True (only elements inside the mask
 *                          count). One warp per tile, 16-byte loads where aligned. Two entry points: the
 *                          public fdma_cuda_mask_summarize (the mask alone: a caller's reusable summary) and
 *                          fdma_cuda_fwd_mask_summary (the forward's own, causal: tiles no row can see are 0
 *                          unread).
 */
#include "common.cuh"

template <typename T>
__global__ void __launch_bounds__(128) fdma_probs_kernel(const FdmaFwdParams p, uint16_t *probs, const float *lse) {
    __shared__ float qs[256];
    const int64_t i = blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z, hk = h / p.hkv_div;
    const uint16_t *qg = static_cast<const uint16_t *>(p.q) + b * p.q_sb + h * p.q_sh + i * p.q_ss;
    for (int d = threadIdx.x; d < p.D; d += blockDim.x) qs[d] = fdma_to_float<T>(qg[d]);
    __syncthreads();
    const int64_t row = ((int64_t)b * p.H + h) * p.Sq + i;
    const float l = lse[row];
    const uint16_t *kg = static_cast<const uint16_t *>(p.k) + b * p.k_sb + hk * p.k_sh;
    const uint8_t *mg = p.mask ? p.mask + b * p.m_sb + (int64_t)(h / p.m_hdiv) * p.m_sh +
                                     (p.m_rows_bcast ? 0 : i * p.m_si)
                               : nullptr;
    const uint16_t *bg = p.bias ? static_cast<const uint16_t *>(p.bias) + b * p.b_sb +
                                      (int64_t)(h / p.b_hdiv) * p.b_sh + (p.b_rows_bcast ? 0 : i * p.b_si)
                                : nullptr;
    uint16_t *out = probs + row * p.Sk;
    for (int64_t j = threadIdx.x; j < p.Sk; j += blockDim.x) {
        bool vis = (!p.causal || j <= i + p.Sk - p.Sq) && (!mg || mg[j * p.m_sj] != 0) && l != -INFINITY;
        float pr = 0.f;
        if (vis) {
            const uint16_t *kr = kg + j * p.k_ss;
            float acc = 0.f;
            for (int d = 0; d < p.D; d++) acc += qs[d] * fdma_to_float<T>(kr[d]);
            float s = acc * p.scale;
            if (p.softcap > 0.f) s = p.softcap * tanhf(s * p.inv_softcap);
            if (bg) s += fdma_to_float<T>(bg[j * p.b_sj]);
            pr = s == -INFINITY ? 0.f : expf(s - l);
        }
        out[j] = fdma_from_float<T>(pr);
    }
}

fdma_status fdma_cuda_fwd_probs_launch(const FdmaFwdParams &kp, fdma_dtype dt, void *probs, const float *lse,
                                       cudaStream_t stream) {
    dim3 grid((unsigned)kp.Sq, (unsigned)kp.H, (unsigned)kp.B);
    if (dt == FDMA_DTYPE_F16)
        fdma_probs_kernel<__half><<<grid, 128, 0, stream>>>(kp, static_cast<uint16_t *>(probs), lse);
    else
        fdma_probs_kernel<__nv_bfloat16><<<grid, 128, 0, stream>>>(kp, static_cast<uint16_t *>(probs), lse);
    return fdma_cuda_check_launch("cuda_fwd_probs");
}

__global__ void __launch_bounds__(1024)
    fdma_gather_kernel(const uint8_t *mask, int64_t m_sb, int64_t m_sh, int64_t m_sj, int Sk, int32_t *lists,
                       int64_t list_stride) {
    __shared__ int warp_off[32];
    __shared__ int total;
    const uint8_t *row = mask + blockIdx.y * m_sb + blockIdx.x * m_sh;
    int32_t *out = lists + ((int64_t)blockIdx.y * gridDim.x + blockIdx.x) * list_stride;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int running = 0;
    for (int j0 = 0; j0 < Sk; j0 += 1024) {
        const int j = j0 + threadIdx.x;
        const bool f = j < Sk && row[(int64_t)j * m_sj] != 0;
        const unsigned bal = __ballot_sync(0xffffffffu, f);
        if (lane == 0) warp_off[warp] = __popc(bal);
        __syncthreads();
        if (warp == 0) {
            const int v = warp_off[lane];
            int x = v;
            for (int o = 1; o < 32; o <<= 1) {
                const int y = __shfl_up_sync(0xffffffffu, x, o);
                if (lane >= o) x += y;
            }
            warp_off[lane] = x - v; /* exclusive */
            if (lane == 31) total = x;
        }
        __syncthreads();
        if (f) out[16 + running + warp_off[warp] + __popc(bal & ((1u << lane) - 1u))] = j;
        running += total;
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = running;
}

fdma_status fdma_cuda_gather_launch(const FdmaFwdParams &kp, const fdma_params *p, int32_t *lists,
                                    cudaStream_t stream) {
    const fdma_view4 *m = &p->mask;
    dim3 grid((unsigned)m->dim[1], (unsigned)m->dim[0]);
    fdma_gather_kernel<<<grid, 1024, 0, stream>>>(static_cast<const uint8_t *>(m->ptr), m->dim[0] > 1 ? m->stride[0] : 0,
                                                  m->dim[1] > 1 ? m->stride[1] : 0, m->stride[3], (int)p->Sk, lists,
                                                  p->Sk + 16);
    return fdma_cuda_check_launch("cuda_fwd_gather_lists");
}

/* 16 mask bytes -> (any nonzero, all nonzero) */
__device__ __forceinline__ void fdma_summary_bytes(uint4 x, int &any, int &all) {
    const uint32_t w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int e = 0; e < 4; e++) {
        any |= w[e] != 0;
        all &= ((w[e] - 0x01010101u) & ~w[e] & 0x80808080u) == 0; /* no zero byte */
    }
}

/* One warp per 64 x 64 tile (grid-stride over tiles): lane c covers 16-byte chunks c, c + 32, ... of the tile's 64
 * rows x 4 chunks; vec: 16-byte loads (contiguous keys, 16-byte aligned rows), else byte loads. causal: the mask's
 * rows are query rows and row i sees keys j <= i + coff (coff = Sk - Sq); a tile whose last row sees none of its
 * keys is written 0 without being read. */
__global__ void __launch_bounds__(256)
    fdma_summary_kernel(const uint8_t *mask, int64_t d0, int64_t d1, int64_t d2, int64_t Sk, int64_t s0, int64_t s1,
                        int64_t s2, int64_t s3, int vec, int causal, int64_t coff, uint8_t *summary, int64_t tiles) {
    const int64_t tr_n = (d2 + 63) / 64, tc_n = (Sk + 63) / 64;
    const int lane = threadIdx.x & 31;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t t = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); t < tiles; t += warps) {
        const int64_t tc = t % tc_n, tr = (t / tc_n) % tr_n, a1 = (t / (tc_n * tr_n)) % d1,
                      a0 = t / (tc_n * tr_n * d1);
        if (causal && min(tr * 64 + 63, d2 - 1) + coff < tc * 64) { /* warp-uniform */
            if (lane == 0) summary[t] = 0;
            continue;
        }
        const uint8_t *base = mask + (d0 > 1 ? a0 * s0 : 0) + (d1 > 1 ? a1 * s1 : 0);
        int any = 0, all = 1;
#pragma unroll 4
        for (int c = lane; c < 256; c += 32) {
            const int64_t i = tr * 64 + (c >> 2), j0 = tc * 64 + (c & 3) * 16;
            if (i >= d2 || j0 >= Sk) continue;
            const uint8_t *row = base + (d2 > 1 ? i * s2 : 0);
            if (vec && j0 + 16 <= Sk) {
                fdma_summary_bytes(__ldg(reinterpret_cast<const uint4 *>(row + j0)), any, all);
            } else {
                for (int64_t j = j0; j < j0 + 16 && j < Sk; j++) {
                    const int v = row[j * s3] != 0;
                    any |= v;
                    all &= v;
                }
            }
        }
        any = __any_sync(0xffffffffu, any);
        all = __all_sync(0xffffffffu, all);
        if (lane == 0) summary[t] = any ? (all ? 2 : 1) : 0;
    }
}

/* The summary of p's mask into summary (ceil-64 tiles of its dims; size and pointers checked by the caller). */
static fdma_status summary_launch(const fdma_params *p, uint8_t *summary, int causal) {
    const int64_t d0 = p->mask.dim[0], d1 = p->mask.dim[1], d2 = p->mask.dim[2], Sk = p->mask.dim[3];
    const int64_t tiles = d0 * d1 * ((d2 + 63) / 64) * ((Sk + 63) / 64);
    const int64_t *ms = p->mask.stride;
    const int vec = ms[3] == 1 && (((uintptr_t)p->mask.ptr | (uintptr_t)(d0 > 1 ? ms[0] : 0) |
                                    (uintptr_t)(d1 > 1 ? ms[1] : 0) | (uintptr_t)(d2 > 1 ? ms[2] : 0)) & 15) == 0;
    const int64_t blocks = (tiles + 7) / 8, grid = blocks < (1 << 16) ? blocks : (1 << 16);
    fdma_summary_kernel<<<(unsigned)grid, 256, 0, (cudaStream_t)p->stream>>>(
        static_cast<const uint8_t *>(p->mask.ptr), d0, d1, d2, Sk, ms[0], ms[1], ms[2], ms[3], vec, causal,
        p->Sk - p->Sq, summary, tiles);
    return fdma_cuda_check_launch("cuda_mask_summarize");
}

extern "C" fdma_status fdma_cuda_mask_summarize(const fdma_params *p, uint8_t *summary, size_t bytes) {
    if (!p->mask.ptr) return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "mask: required for a summary, got NULL");
    if (!summary) return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "summary: NULL");
    const int64_t tiles = p->mask.dim[0] * p->mask.dim[1] * ((p->mask.dim[2] + 63) / 64) * ((p->mask.dim[3] + 63) / 64);
    if (bytes < (size_t)tiles)
        return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "bytes: the summary needs %lld bytes, got %zu",
                              (long long)tiles, bytes);
    fdma_status st = fdma_cuda_check_device_ptr(p->mask.ptr, "mask");
    if (st == FDMA_STATUS_OK) st = fdma_cuda_check_device_ptr(summary, "summary");
    if (st != FDMA_STATUS_OK) return st;
    return summary_launch(p, summary, 0);
}

/* The forward's own summary (api_cuda.cu, fwd_run_attention; workspace sized by fwd_autosum_bytes, pointers checked
 * with the call's). With causal and a mask with Sq rows (dim 2 > 1: then the mask's row i is query row i), a tile of
 * summary row r (query rows 64r .. min(64r + 63, Sq - 1)) and key tile c is 0 unread when
 * min(64r + 63, Sq - 1) + Sk - Sq < 64c: no row of r sees any of its keys. Why 0 is exact for the forward
 * (fwd_kernel.cuh): a CTA's query rows (at most 128, i0 a multiple of their count) read the bytes of the (at most 2) summary rows
 * that hold its rows (summary_raw) and skips tile n only when both are 0 (summary_status); each byte is 0 only if
 * every one of its rows either has no True in the tile or sees none of its keys, so a skipped tile holds no
 * visible key of any row of the CTA. A byte written 0 is never 2, so "all True" (2 = 0x202: no mask tile loaded)
 * still needs both rows' real tiles all True; a pair 0 / nonzero reads as mixed (1): the mask tile is then loaded
 * and applied per element with causality, which is exact whatever the rows of the skipped summary row hold. Tiles
 * past the CTA's causal bound (n_end) are not read at all. A row-broadcast mask (dim 2 == 1) stands for every
 * query row: no tile is skipped. */
fdma_status fdma_cuda_fwd_mask_summary(const fdma_params *p, uint8_t *summary) {
    return summary_launch(p, summary, p->causal && p->mask.dim[2] > 1);
}
