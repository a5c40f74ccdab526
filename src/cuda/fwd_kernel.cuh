/*
 * fwd_kernel.cuh -- the CUDA forward kernel (SPEC section 3), FlashAttention-2 style, hand-written with
 * mma.sync m16n8k16, ldmatrix and cp.async (common.cuh). Included by fwd_d64.cu, fwd_d128.cu, fwd_d192.cu
 * and fwd_d256.cu, each of which instantiates it for one head-dim tile DT and both dtypes.
 *
 * One CTA = one (batch b, query head h, tile of BR = 16*MI*NW query rows); each of the NW warps owns MI
 * blocks of 16 query rows. The mask + bias instantiation at DT = 128 packs P = 4 or 2 query heads that share K, V,
 * mask and bias (GQA with a (B, Hkv, Sq, Sk) mask and bias: W2) into a CTA, BR / P rows of each: their bias/mask
 * tile is copied and folded once for all of them (fdma_fwd_launch_t picks P; pack_log2). The kernel is instantiated per feature set FEAT (FDMA_F_* bits: mask, bias,
 * dropout, gathered keys, softcap; a clear bit compiles the feature out) and the launcher picks the smallest
 * that covers the call (fdma_fwd_inst): plain (FEAT 0), mask + bias (W2), bias + gather (W1, W1c), or all.
 * Warps x row blocks (common.cuh): D <= 64: 4 x 2 (general 8 x 1); D <= 128: plain, mask + bias and bias +
 * gather 4 x 2 (FA2's layout; it fits in 255 registers only without the other features), general 8 x 1;
 * larger: 4 x 1. BR is the same for all instantiations of a tile.
 * Key/value tiles of BC = 64 rows stream through shared memory (K and the mask double-buffered):
 *
 *   load Q (BR x DT) once; keep it in registers (MI = 1, DT <= 128) or re-read it from shared memory
 *   for each key tile n that is not skipped:
 *     wait K(n); barrier;  issue V(n); decide the next tile n' and issue K(n')  (cp.async)
 *     S = Q K(n)^T                                   (fp32 accumulators, 16 x 64 per row block)
 *     wait bias(n), mask(n) (each warp copies its own rows: __syncwarp, or a barrier for a broadcast row)
 *     S = scale*S + bias (one FFMA; bias fragments by ldmatrix) | log2e*softcap*tanh(scale*S/softcap) (+ bias);
 *       S = -inf where mask False, causal-hidden, j >= Sk
 *     online softmax: m_new = max(m, rowmax S); P = 2^(S - m_new); l += rowsum P; O, l *= 2^(m - m_new) when
 *       some row max of the warp moved
 *     P *= dropout keep bit (Philox, SPEC section 5)
 *     wait V(n); barrier; issue bias and mask of n'
 *     O += P V(n)                                    (P converted to fp16/bf16 in registers)
 *   out = O / l * 1/(1-p_drop); lse = m + log l  (out 0 and lse -inf for a row with nothing visible)
 *
 * Skipping: the causal bound cuts the key-tile range. With a mask, a tile whose mask is all False costs no
 * K/V/bias load and no math: with p->mask_summary the tile status (0 none, 1 mixed, 2 all True) is read
 * from the summary one tile ahead; without it (probe mode) the next mask tile is copied into the spare mask
 * buffer during this tile, and at the middle barrier (__syncthreads_or) each thread says whether its own
 * chunks hold a True; K(n') is then issued there. Mask + bias at DT = 128 has one mask buffer (108 KB of shared
 * memory: 2 CTAs per SM): it waits for bias(n) and mask(n) at the top barrier and folds the mask into the bias
 * tile there (AUX_TOP below); without a summary it would probe only up to the first active tile, then take every
 * tile as mixed, so the launcher (api_cuda.cu, fwd_autosum_bytes) computes the summary into the workspace when the
 * caller passes none.
 *
 * Shared-memory fragment addresses are per-lane bases kept in registers: with the XOR swizzle, the chunk of the k-th
 * 16-column step is the lane's base XOR 32k (fdma_swz_lane), and row blocks 16 apart are constant offsets.
 *
 * Keys are addressed through key_row(n, r): dense, 64*n + r; gathered (p.gather, used for a mask whose rows
 * broadcast, e.g. (B, Hkv, 1, Sk)), the n-th 64 entries of the increasing list of kept keys of (b, h), so
 * that the cost is O(Sq * kept keys) instead of O(Sq * Sk). K and V rows are loaded by that index, one
 * cp.async per 16 bytes; causal and dropout use the key's own index. The list entries of a tile reach shared
 * memory by cp.async one tile before the K loader needs them (3 index slots), the gathered bias is loaded into a
 * register at the top of the previous tile and stored as floats at its middle barrier, and per tile each warp
 * turns (list position, key index, expiry) into one visibility bit word per key for its rows: the score loop
 * tests 1 bit per element, and only when some word of the warp is not full. Dense keys with 16-byte aligned rows
 * (and row offsets below 2^31 elements) take the cheap loader: each thread walks one chunk column with a
 * 32-bit offset (25% fewer instructions in the dense kernel than indexing every chunk).
 *
 * Shapes: q, out (B, Sq, H, D); k, v (B, Sk, Hkv, D); mask/bias views broadcast to (B, H, Sq, Sk);
 * lse (B, H, Sq). D <= DT, D % 8 == 0; columns D..DT-1 are zero-filled in shared memory.
 */
#ifndef FDMA_CUDA_FWD_KERNEL_CUH
#define FDMA_CUDA_FWD_KERNEL_CUH

#include "common.cuh"


/* Tuning switches (bench/NOTES.md v7, v8 has the measurements). The generic (indexed) K/V loader in the
 * plain instantiation: unrolled (1: spills 68 bytes at D = 128) or rolled (0). */
#ifndef FDMA_FWD_PLAIN_UNROLL
#define FDMA_FWD_PLAIN_UNROLL 0
#endif
/* dense keys, aligned rows: K/V/bias loaders walk one pointer per thread (1) or index every chunk (0) */
#ifndef FDMA_FWD_FAST_LOAD
#define FDMA_FWD_FAST_LOAD 1
#endif
/* probe mode: K of the next tile issued speculatively with its mask tile (1: W2 16K 7.02 ms on H200), or
 * after the probe (0: 6.76 ms) */
#ifndef FDMA_FWD_SPEC_K
#define FDMA_FWD_SPEC_K 0
#endif
/* the pointer-walking loaders also for 4 warps x 2 blocks at D = 128 (1: dense 16K 3.18 ms on H200; 0: 3.80),
 * and their unroll there (8: 3.18 ms; 1: 3.34) */
#ifndef FDMA_FWD_FAST_MI2
#define FDMA_FWD_FAST_MI2 1
#endif
#ifndef FDMA_FWD_FAST_UNROLL_MI2
#define FDMA_FWD_FAST_UNROLL_MI2 8
#endif

template <int DT_, int NW_, int MI_, int FEAT_ = FDMA_F_ALL> struct FdmaFwdCfg {
    static constexpr int DT = DT_;             /* head-dim tile */
    static constexpr int NW = NW_;             /* warps */
    static constexpr int MI = MI_;             /* 16-row blocks per warp */
    static constexpr int THREADS = 32 * NW;
    static constexpr int BR = 16 * MI * NW;    /* query rows per CTA */
    static constexpr int LOG_BR = BR == 128 ? 7 : BR == 64 ? 6 : BR == 32 ? 5 : -1;
    static_assert(LOG_BR > 0, "query rows per CTA: 32, 64 or 128");
    static constexpr int BC = 64;              /* keys per tile */
    static constexpr int CPR = DT / 8;         /* 16-byte chunks per row */
    static constexpr int Q_BYTES = BR * DT * 2;
    static constexpr int KV_BYTES = BC * DT * 2;
    static constexpr int BIAS_LD = BC + 8;     /* elements; the pad spreads rows over banks */
    static constexpr int MASK_LD = BC + 16;    /* bytes */
    /* an instantiation with GATHER and without MASK only ever runs gathered keys (fdma_fwd_inst) */
    static constexpr bool G_ONLY = (FEAT_ & FDMA_F_GATHER) && !(FEAT_ & FDMA_F_MASK);
    /* bias: a BR x BC tile (dense keys) or the gathered row of BC floats (it starts the same region) */
    static constexpr int BIAS_BYTES = !(FEAT_ & FDMA_F_BIAS) ? 0 : G_ONLY ? BC * 4 : BR * BIAS_LD * 2;
    static constexpr int MASK_BYTES = (FEAT_ & FDMA_F_MASK) ? BR * MASK_LD : 0;
    /* mask tile buffers: two (probe mode reads the next tile's mask during this one), or one for mask + bias at
       DT = 128 (4 x 2: 108 KB, 2 CTAs per SM), which always runs with a summary (the launcher makes one) */
    static constexpr int MASK_BUFS = (FEAT_ == FDMA_F_MB && DT_ == 128) ? 1 : 2;
    /* gathered keys: 3 slots of [64] key indices and [64] expiries, then [NW][64] visibility words */
    static constexpr int IDX_BYTES = (FEAT_ & FDMA_F_GATHER) ? 3 * 2 * 64 * 4 + NW * 64 * 4 : 0;
    static constexpr int SMEM = Q_BYTES + 3 * KV_BYTES + BIAS_BYTES + MASK_BUFS * MASK_BYTES + IDX_BYTES;
    static constexpr bool Q_IN_REGS = MI == 1 && DT <= 128;
    static_assert(DT % 64 == 0, "head-dim tile must be a multiple of 64 (swizzle groups of 8 chunks)");
};


/* 4-byte asynchronous copy global -> shared (zero-filled when src_bytes == 0: nothing is read). */
__device__ __forceinline__ void fdma_cp_async4(void *smem, const void *gmem, int src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(fdma_smem_u32(smem)), "l"(gmem),
                 "r"(src_bytes));
}

/* 8 scalar 16-bit loads -> one 16-byte value (the unaligned path). */
__device__ __forceinline__ uint4 fdma_load8_scalar(const uint16_t *src, int count) {
    uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
    for (int e = 0; e < 8; e++)
        if (e < count) w[e >> 1] |= (uint32_t)src[e] << (16 * (e & 1));
    return make_uint4(w[0], w[1], w[2], w[3]);
}

/* In sm80 code the sm90-only instantiations (fdma_fwd_sm90_only; the launcher never runs them there) have an empty
 * body; sm90 code is the body alone. */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define FDMA_FWD_SM80_SKIP_BEGIN(DT, FEAT) if constexpr (fdma_fwd_sm90_only(DT, FEAT)) { return; } else {
#define FDMA_FWD_SM80_SKIP_END }
#else
#define FDMA_FWD_SM80_SKIP_BEGIN(DT, FEAT)
#define FDMA_FWD_SM80_SKIP_END
#endif

template <typename T, int DT, int NW, int MI, int FEAT>
__global__ void __launch_bounds__(32 * NW, 1) fdma_fwd_kernel(const FdmaFwdParams p) {
    FDMA_FWD_SM80_SKIP_BEGIN(DT, FEAT)
    using C = FdmaFwdCfg<DT, NW, MI, FEAT>;
    constexpr bool F_MASK = FEAT & FDMA_F_MASK, F_BIAS = FEAT & FDMA_F_BIAS, F_DROP = FEAT & FDMA_F_DROP,
                   F_GATHER = FEAT & FDMA_F_GATHER, F_CAP = FEAT & FDMA_F_CAP;
    const bool has_bias = F_BIAS && p.bias != nullptr, has_cap = F_CAP && p.softcap > 0.f;
    constexpr int CPR = C::CPR, THREADS = C::THREADS, BR = C::BR;
    /* K/V tile loads: fully unrolled where the registers allow it (MI = 2 and DT = 256 would spill) */
    constexpr int LOAD_UNROLL = ((MI == 1 && DT <= 192) || (FEAT == 0 && FDMA_FWD_PLAIN_UNROLL)) ? 64 * CPR / THREADS : 1;
    extern __shared__ __align__(128) uint8_t smem[];
    uint8_t *sQ = smem;
    uint8_t *sK = sQ + C::Q_BYTES;          /* two K buffers: the next tile's K loads during this tile */
    uint8_t *sV = sK + 2 * C::KV_BYTES;
    uint16_t *sBias = reinterpret_cast<uint16_t *>(sV + C::KV_BYTES);
    uint8_t *sMask = sV + C::KV_BYTES + C::BIAS_BYTES;
    /* sMask: C::MASK_BUFS buffers (two: the next tile's mask is probed in place; mask_buf(kb) goes with K
       buffer kb). Gathered keys: the list entries of tile n
       (key index; SPARSE window: and its expiry) in slot n % 3, copied with K(n - 1) (one tile ahead of their
       use by the K loader); sVis: per warp, a word per key of the current tile, bit k = row wrow + k sees it;
       sBiasG: the gathered (row-broadcast) bias of the current tile as floats */
    int *sIdx = reinterpret_cast<int *>(sMask + C::MASK_BUFS * C::MASK_BYTES);
    int *sExp = sIdx + 3 * 64;
    uint32_t *sVis = reinterpret_cast<uint32_t *>(sExp + 3 * 64);
    float *sBiasG = reinterpret_cast<float *>(sBias);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, qd = lane & 3;
    const int wrow = warp * 16 * MI; /* this warp's first row in the tile; block mi: wrow + 16 mi */
    /* One mask buffer (mask + bias at DT = 128, AUX_TOP below) packs P = 2^lp query heads that share K, V, mask and
       bias into a CTA (fdma_fwd_launch_t decides): RH = BR / P query rows of each; warp rows wrow.. hold head
       h0 + wrow / RH, queries i0 + wr... Every other instantiation: P = 1, RH = BR, wr = wrow. */
    constexpr bool AUX_TOP = C::MASK_BUFS == 1;
    const int lp = AUX_TOP ? p.pack_log2 : 0, RH = BR >> lp, wr = AUX_TOP ? wrow & (RH - 1) : wrow;
    const int HG = p.H >> lp; /* CTAs per query tile */
    const int h0 = (blockIdx.x % HG) << lp; /* the CTA's first query head */
    int mt = blockIdx.x / HG;
    if (p.causal) mt = p.num_m_tiles - 1 - mt; /* longest causal rows first */
    const int b = blockIdx.y;
    const int i0 = mt * RH;
    const int h = AUX_TOP ? h0 + (wrow >> (C::LOG_BR - lp)) : h0; /* this warp's query head */
    const int hk = h0 / p.hkv_div;
    const int Sq = p.Sq, Sk = p.Sk, D = p.D;

    const uint16_t *qg = static_cast<const uint16_t *>(p.q) + b * p.q_sb + h0 * p.q_sh;
    const uint16_t *kg = static_cast<const uint16_t *>(p.k) + b * p.k_sb + hk * p.k_sh;
    const uint16_t *vg = static_cast<const uint16_t *>(p.v) + b * p.v_sb + hk * p.v_sh;
    const uint8_t *mg = (F_MASK && p.mask) ? p.mask + b * p.m_sb + (int64_t)(h0 / p.m_hdiv) * p.m_sh : nullptr;
    const uint16_t *bg =
        has_bias ? static_cast<const uint16_t *>(p.bias) + b * p.b_sb + (int64_t)(h0 / p.b_hdiv) * p.b_sh : nullptr;
    const uint8_t *sg = p.summary ? p.summary + b * p.s_sb + (int64_t)(h0 / p.m_hdiv) * p.s_sh : nullptr;

    /* Gathered keys: the kept keys of a row-broadcast mask, in increasing order (fdma_gather_kernel); key
       tile n is list[64n .. 64n+63]. Dense keys: tile n is keys 64n .. 64n+63. */
    /* SPARSE window: this query tile's list of the keys any of its rows keeps, and their expiry (visibility
       j <= lim_i < e[j] per row, applied with the causal bound below) */
    const bool sparse = F_GATHER && p.ex_lists != nullptr;
    const bool gather = C::G_ONLY || (F_GATHER && (p.gather != nullptr || sparse));
    const int32_t *gl = nullptr;
    int nkeys = Sk; /* keys in the loop's index space */
    if (sparse) {
        const int64_t r = (int64_t)b * p.ex_rb + (int64_t)(h / p.ex_hdiv) * p.ex_hmul;
        const int64_t lt = r * p.ex_ntiles + (p.ex_ntiles > 1 ? mt : 0);
        gl = p.ex_lists + lt * p.ex_cap;
        nkeys = p.ex_counts[lt];
    } else if (gather) {
        gl = p.gather + b * p.g_sb + (int64_t)(h / p.m_hdiv) * p.g_sh;
        nkeys = gl[0];
        gl += 16;
    }
    /* key-tile range; causal: the last visible key of the tile's last row */
    const int jmax = min(i0 + RH - 1, Sq - 1) - Sq + Sk;
    int n_end = (nkeys + 63) / 64;
    if (p.causal && !gather) n_end = jmax < 0 ? 0 : min(n_end, jmax / 64 + 1);
    if (p.causal && jmax < 0) n_end = 0;
    /* none, summary, probe (read the mask tile ahead, test it in shared memory); gathered keys are all kept (the tile status says where causal ends) */
    const int mask_mode = (!mg || gather) ? 0 : (p.summary ? 1 : 2);
    /* mask tiles copied with the bias (their own cp.async group, after the middle barrier): summary mode, and
       probe mode with one mask buffer (no probe in the loop: every tile after the first active one is mixed) */
    const bool mask_aux = mask_mode == 1 || (C::MASK_BUFS == 1 && mask_mode == 2);
    /* AUX_TOP (one mask buffer): the bias/mask group of a tile is waited for at the tile's top barrier; before it,
       each thread folds the mask chunks it copied into the bias chunks it copied (load_aux_top: bias = -inf where
       False; a mask without bias makes a 0 / -inf tile), so the barrier publishes the folded tile, while only O
       is live. The score loop then adds the bias tile alone. */
    /* rows a warp reads from the bias / mask tile: its own (every row present; AUX_TOP: the tile's RH rows, from wr)
       or row 0 of a broadcast row copied once */
    const bool own_b = AUX_TOP || !p.b_rows_bcast, own_m = AUX_TOP || !p.m_rows_bcast;
    auto mask_buf = [&](int kb) { return C::MASK_BUFS == 1 ? sMask : sMask + kb * C::MASK_BYTES; }; /* of K buffer kb */

    /* ---- loaders ---- */
    /* K/V row offsets (elements, rows up to Sk + 63) fit in 32 bits */
    const bool off32 = (int64_t)(Sk + 64) * (p.k_ss > p.v_ss ? p.k_ss : p.v_ss) < (int64_t)INT_MAX;
    /* key index of row r of tile n (gathered: from the tile's index slot idx; Sk past the list) */
    auto key_row = [&](int n, int r, const int *idx) -> int {
        if (!gather) return n * 64 + r;
        return n * 64 + r < nkeys ? idx[r] : Sk;
    };
    auto load_rows = [&](uint8_t *dst_tile, const uint16_t *base, int64_t row_stride, int n, const int *idx) {
        /* dense keys, 16-byte rows, and row offsets that fit in 32 bits: each thread walks one chunk column
           (rows r0, r0 + RSTEP, ...) with a 32-bit element offset */
        if constexpr (FDMA_FWD_FAST_LOAD && THREADS % CPR == 0 && (FDMA_FWD_FAST_MI2 || !(MI == 2 && DT >= 128))) {
            if (!gather && p.qkv_vec && off32) {
                constexpr int RSTEP = THREADS / CPR;
                constexpr int UNR = (MI == 2 && DT >= 128) ? FDMA_FWD_FAST_UNROLL_MI2 : 64 / RSTEP;
                const int r0 = tid / CPR, ch = tid % CPR, rs = (int)row_stride;
                int j = n * 64 + r0;
                int off = j * rs + ch * 8;
                const bool chok = ch * 8 < D;
                /* a full tile (every row exists) and a chunk inside D: no per-row test; rows RSTEP apart have the
                   same swizzle (RSTEP % 8 == 0), so the destination steps by a constant */
                if constexpr (RSTEP % 8 == 0) {
                    if (chok && n * 64 + 64 <= Sk) {
                        const uint32_t d0 = fdma_smem_u32(dst_tile) + fdma_swz(r0, ch, CPR);
#pragma unroll
                        for (int it = 0; it < 64 / RSTEP; it++, off += RSTEP * rs)
                            fdma_cp_async16_s(d0 + it * RSTEP * CPR * 16, base + off, 16);
                        return;
                    }
                }
#pragma unroll(UNR)
                for (int it = 0; it < 64 / RSTEP; it++) {
                    const bool ok = chok && j < Sk;
                    fdma_cp_async16(dst_tile + fdma_swz(r0 + it * RSTEP, ch, CPR), base + (ok ? off : 0), ok ? 16 : 0);
                    off += RSTEP * rs;
                    j += RSTEP;
                }
                return;
            }
        }
#pragma unroll(LOAD_UNROLL)
        for (int it = 0; it < 64 * CPR / THREADS; it++) {
            const int c = tid + it * THREADS, r = c / CPR, ch = c % CPR;
            const int j = key_row(n, r, idx);
            const bool ok = j < Sk && ch * 8 < D;
            uint8_t *dst = dst_tile + fdma_swz(r, ch, CPR);
            const uint16_t *src = base + (int64_t)j * row_stride + ch * 8;
            if (p.qkv_vec)
                fdma_cp_async16(dst, ok ? src : base, ok ? 16 : 0);
            else
                *reinterpret_cast<uint4 *>(dst) = ok ? fdma_load8_scalar(src, 8) : make_uint4(0, 0, 0, 0);
        }
    };
    /* bias chunk of tile row r (query i0 + r), keys j .. j + 7 (j % 8 == 0): cp.async where aligned, else
       synchronously; rows past Sq and keys past Sk are zeros */
    auto bias_chunk = [&](int r, int j) {
        const int i = i0 + r;
        const bool ok = (p.b_rows_bcast || i < Sq) && j < Sk;
        uint16_t *dst = sBias + r * C::BIAS_LD + (j & 63);
        const uint16_t *src = bg + (p.b_rows_bcast ? 0 : (int64_t)i * p.b_si) + (int64_t)j * p.b_sj;
        if (p.b_vec) {
            fdma_cp_async16(dst, ok ? src : bg, ok ? min(16, (Sk - j) * 2) : 0);
        } else {
            uint32_t w[4] = {0, 0, 0, 0};
            if (ok) {
#pragma unroll
                for (int e = 0; e < 8; e++)
                    if (j + e < Sk) w[e >> 1] |= (uint32_t)src[(int64_t)e * p.b_sj] << (16 * (e & 1));
            }
            *reinterpret_cast<uint4 *>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
        }
    };
    /* Bias and mask tiles: each warp copies its own rows (so a warp needs only its own cp.async wait and a
       __syncwarp before reading them); a row-broadcast tile (one row) is copied by the first threads. */
    auto load_bias = [&](int n) {
        const int j0 = n * 64;
        const bool own = own_b;
        if (FDMA_FWD_FAST_LOAD && own && p.b_vec) { /* lane: chunk lane % 8 of rows wrow + lane / 8 + 4 it */
            int i = i0 + wrow + (lane >> 3);
            const int j = j0 + (lane & 7) * 8;
            const uint16_t *src = bg + (int64_t)i * p.b_si + j;
            if (i0 + BR <= Sq && j0 + 64 <= Sk) { /* a full tile: no per-row test */
                const uint32_t d0 = fdma_smem_u32(sBias + (wrow + (lane >> 3)) * C::BIAS_LD + (lane & 7) * 8);
#pragma unroll
                for (int it = 0; it < 4 * MI; it++, src += 4 * p.b_si) fdma_cp_async16_s(d0 + it * 8 * C::BIAS_LD, src, 16);
                return;
            }
            uint16_t *dst = sBias + (wrow + (lane >> 3)) * C::BIAS_LD + (lane & 7) * 8;
            const int bytes = j < Sk ? min(16, (Sk - j) * 2) : 0;
#pragma unroll
            for (int it = 0; it < 4 * MI; it++) {
                const bool ok = i < Sq && bytes > 0;
                fdma_cp_async16(dst, ok ? src : bg, ok ? bytes : 0);
                src += 4 * p.b_si;
                dst += 4 * C::BIAS_LD;
                i += 4;
            }
            return;
        }
        for (int c = own ? lane : tid; c < (own ? 16 * MI * 8 : 8); c += own ? 32 : THREADS)
            bias_chunk((own ? wrow : 0) + (c >> 3), j0 + (c & 7) * 8);
    };
    /* one 16-byte chunk (row r, keys j..j+15) of the mask, synchronously into registers */
    auto mask_chunk = [&](int r, int q4, int n) -> uint4 {
        const int j = n * 64 + q4 * 16, i = i0 + r;
        uint4 v = make_uint4(0, 0, 0, 0);
        if ((p.m_rows_bcast || i < Sq) && j < Sk) {
            const uint8_t *src = mg + (p.m_rows_bcast ? 0 : (int64_t)i * p.m_si) + (int64_t)j * p.m_sj;
            if (p.m_vec && j + 16 <= Sk) {
                v = __ldg(reinterpret_cast<const uint4 *>(src));
            } else {
                uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
                for (int e = 0; e < 16; e++)
                    if (j + e < Sk) w[e >> 2] |= (uint32_t)(src[(int64_t)e * p.m_sj] != 0) << (8 * (e & 3));
                v = make_uint4(w[0], w[1], w[2], w[3]);
            }
        }
        return v;
    };
    /* mask chunk of tile row r (query i0 + r), keys n * 64 + 16 q4 .. + 15 into buffer buf (cp.async where aligned) */
    auto mask_chunk_async = [&](uint8_t *buf, int r, int n, int q4) {
        const int j = n * 64 + q4 * 16, i = i0 + r;
        uint8_t *dst = buf + r * C::MASK_LD + q4 * 16;
        if (p.m_vec) {
            const bool ok = (p.m_rows_bcast || i < Sq) && j < Sk;
            const uint8_t *src = mg + (p.m_rows_bcast ? 0 : (int64_t)i * p.m_si) + j;
            fdma_cp_async16(dst, ok ? src : mg, ok ? min(16, Sk - j) : 0);
        } else {
            *reinterpret_cast<uint4 *>(dst) = mask_chunk(r, q4, n);
        }
    };
    /* summary mode: mask tile straight to shared memory (cp.async where aligned) */
    auto load_mask_async = [&](int n, int kb) {
        /* warp-own rows of a full tile (16-byte rows): lane copies chunk lane % 4 of rows wrow + lane / 4 + 8 t */
        if (own_m && p.m_vec && (p.m_rows_bcast || i0 + BR <= Sq) && n * 64 + 64 <= Sk) {
            const int64_t si = p.m_rows_bcast ? 0 : p.m_si;
            const uint8_t *src = mg + (int64_t)(i0 + wrow + (lane >> 2)) * si + n * 64 + (lane & 3) * 16;
            const uint32_t d0 = fdma_smem_u32(mask_buf(kb) + (wrow + (lane >> 2)) * C::MASK_LD + (lane & 3) * 16);
#pragma unroll
            for (int t = 0; t < 2 * MI; t++, src += 8 * si) fdma_cp_async16_s(d0 + t * 8 * C::MASK_LD, src, 16);
            return;
        }
#pragma unroll
        for (int t = 0; t < 2 * MI; t++) {
            const bool own = own_m;
            const int c = own ? lane + 32 * t : tid + t * THREADS;
            if (c >= (own ? 64 * MI : 4)) break;
            mask_chunk_async(mask_buf(kb), (own ? wrow : 0) + (c >> 2), n, c & 3);
        }
    };
    /* AUX_TOP: bias and mask of tile n (status st), RH rows x 64 keys shared by the CTA's heads. Thread t copies rows
       t / 4 + 32 s (s < RH / 32), keys 16 (t % 4) .. + 15: the two bias chunks and (st == 1) the mask chunk, which it
       folds itself (fold_own) after its own cp.async wait at the top of the tile. */
    auto load_aux_top = [&](int n, int st) {
        static_assert(!AUX_TOP || THREADS == 128, "AUX_TOP copies 32 rows x 4 chunks per pass");
        const bool want_m = st == 1 && mask_aux;
        const int q4 = tid & 3, j = n * 64 + 16 * q4, r0 = tid >> 2;
        if ((!has_bias || p.b_vec) && (!want_m || p.m_vec) && i0 + RH <= Sq && n * 64 + 64 <= Sk) {
            /* a full tile: no per-chunk test */
            const uint32_t db = fdma_smem_u32(sBias + r0 * C::BIAS_LD + 16 * q4);
            const uint32_t dm = fdma_smem_u32(sMask + r0 * C::MASK_LD + 16 * q4);
            for (int s = 0; s < RH / 32; s++) {
                const int i = i0 + r0 + 32 * s;
                if (has_bias) {
                    const uint16_t *src = bg + (p.b_rows_bcast ? 0 : (int64_t)i * p.b_si) + j;
                    fdma_cp_async16_s(db + s * 32 * C::BIAS_LD * 2, src, 16);
                    fdma_cp_async16_s(db + s * 32 * C::BIAS_LD * 2 + 16, src + 8, 16);
                }
                if (want_m)
                    fdma_cp_async16_s(dm + s * 32 * C::MASK_LD, mg + (p.m_rows_bcast ? 0 : (int64_t)i * p.m_si) + j, 16);
            }
            return;
        }
        for (int r = r0; r < RH; r += 32) {
            if (has_bias) {
                bias_chunk(r, j);
                bias_chunk(r, j + 8);
            }
            if (want_m) mask_chunk_async(sMask, r, n, q4);
        }
    };
    /* summary bytes of tile n for this CTA's rows (at most 2 summary rows: RH <= 128) */
    auto summary_raw = [&](int n) -> int { /* the (at most 2) bytes packed: u0 | u1 << 8 */
        const int r0 = p.m_rows_bcast ? 0 : i0 / 64;
        const int r1 = p.m_rows_bcast ? 0 : min((i0 + RH - 1) / 64, p.s_rows - 1);
        const int u0 = sg[(int64_t)r0 * p.s_si + n];
        return u0 | (r1 != r0 ? sg[(int64_t)r1 * p.s_si + n] : u0) << 8;
    };
    auto summary_status = [](int u) { return u == 0 ? 0 : (u == 0x202 ? 2 : 1); };
    /* gathered keys: the list entries of tile n (key index; SPARSE: and its expiry e) into index slot s by 4-byte
       cp.async; positions past the list are zero-filled, never read */
    auto issue_idx = [&](int n, int s) {
        if (tid < 64) {
            const int pos = n * 64 + tid;
            const bool ok = pos < nkeys;
            fdma_cp_async4(sIdx + 64 * s + tid, gl + (ok ? pos : 0), ok ? 4 : 0);
            if (sparse) fdma_cp_async4(sExp + 64 * s + tid, gl + (ok ? p.ex_eoff + pos : 0), ok ? 4 : 0);
        }
    };
    /* K of tile n into K buffer kb; gathered keys: the tile's indices are in slot s (landed), and the list
       entries of tile n + 1 go into the next slot in the same cp.async group */
    auto issue_k = [&](int n, int kb, int s) {
        load_rows(sK + kb * C::KV_BYTES, kg, p.k_ss, n, sIdx + 64 * s);
        if (gather) issue_idx(n + 1, s == 2 ? 0 : s + 1);
    };
    /* gathered (row-broadcast) bias of key c = tid < 64 of the tile in slot s: loaded into gbias at the top of
       the tile before, stored as a float by issue_aux after that tile's middle barrier */
    uint16_t gbias = 0;
    auto gather_bias = [&](int s) -> uint16_t { return bg[(int64_t)sIdx[64 * s + tid] * p.b_sj]; };
    /* bias and mask of tile n (status st) into their single buffers */
    auto issue_aux = [&](int n, int st, int kb) {
        if (AUX_TOP) {
            load_aux_top(n, st);
            return;
        }
        if (gather) {
            if (has_bias && tid < 64) sBiasG[tid] = fdma_to_float<T>(gbias);
        } else if (has_bias) {
            load_bias(n);
        }
        if (st == 1 && mask_aux) load_mask_async(n, kb); /* probe mode with two buffers: already there */
    };
    /* probe: does any of this thread's own chunks of mask buffer kb hold a True? (its own cp.async
       copies are visible to it after cp.async.wait_group) */
    auto probe_nonzero = [&](int kb) {
        uint32_t a = 0;
#pragma unroll
        for (int t = 0; t < 2 * MI; t++) {
            const bool own = own_m;
            const int c = own ? lane + 32 * t : tid + t * THREADS;
            if (c < (own ? 64 * MI : 4)) {
                const uint4 v = *reinterpret_cast<const uint4 *>(mask_buf(kb) +
                                                                 ((own ? wrow : 0) + (c >> 2)) * C::MASK_LD + (c & 3) * 16);
                a |= v.x | v.y | v.z | v.w;
            }
        }
        return a != 0;
    };
    /* status of tile n, synchronously (used while skipping); probe mode: the mask tile lands in buffer kb
       and a barrier decides */
    auto status_now = [&](int n, int kb) -> int {
        if (gather) return (!p.causal || gl[n * 64] <= jmax) ? 2 : -1; /* -1: no visible key from here on */
        if (mask_mode == 0) return 2;
        if (mask_mode == 1) return summary_status(summary_raw(n));
        load_mask_async(n, kb);
        fdma_cp_async_commit();
        fdma_cp_async_wait<0>();
        return __syncthreads_or(probe_nonzero(kb)) ? 1 : 0;
    };

    /* ---- prologue: Q, first active tile ---- */
#pragma unroll
    for (int it = 0; it < BR * CPR / THREADS; it++) { /* row r: head h0 + r / RH, query i0 + r % RH */
        const int c = tid + it * THREADS, r = c / CPR, ch = c % CPR, i = i0 + (AUX_TOP ? r & (RH - 1) : r);
        const bool ok = i < Sq && ch * 8 < D;
        uint8_t *dst = sQ + fdma_swz(r, ch, CPR);
        const uint16_t *src = qg + (AUX_TOP ? (int64_t)(r >> (C::LOG_BR - lp)) * p.q_sh : 0) + (int64_t)i * p.q_ss + ch * 8;
        if (p.qkv_vec)
            fdma_cp_async16(dst, ok ? src : qg, ok ? 16 : 0);
        else
            *reinterpret_cast<uint4 *>(dst) = ok ? fdma_load8_scalar(src, 8) : make_uint4(0, 0, 0, 0);
    }
    fdma_cp_async_commit();

    int n = 0, st = 0;
    while (n < n_end && (st = status_now(n, 0)) == 0) n++;
    if (st < 0) n_end = n;
    int kb = 0; /* K buffer of the current tile; gathered keys: index slot n % 3 (n = 0 here) */
    if (n < n_end) {
        if (gather) { /* the first tile's list entries (and bias) synchronously, once */
            issue_idx(n, 0);
            fdma_cp_async_commit();
            fdma_cp_async_wait<0>();
            __syncthreads();
            if (has_bias && tid < 64) gbias = gather_bias(0);
        }
        issue_k(n, kb, 0);
        fdma_cp_async_commit();
        issue_aux(n, st, kb);
        fdma_cp_async_commit();
    }
    /* Status of the tile after the current one is read one tile ahead: summary bytes (su) or the first key of
       its index slot. Except in probe mode, K of the next tile is issued at the top of the current one. */
    const bool early = C::MASK_BUFS == 1 || mask_mode != 2;
    int su = 0;
    if (mask_mode == 1 && n + 1 < n_end) su = summary_raw(n + 1);

    float o[MI][DT / 8][4];
#pragma unroll
    for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int d = 0; d < DT / 8; d++) o[mi][d][0] = o[mi][d][1] = o[mi][d][2] = o[mi][d][3] = 0.f;
    float m_run[MI][2], l_run[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; mi++) m_run[mi][0] = m_run[mi][1] = -INFINITY, l_run[mi][0] = l_run[mi][1] = 0.f;
    uint32_t qa[C::Q_IN_REGS ? DT / 16 : 1][4];

    if (n < n_end) {
        fdma_cp_async_wait<0>();
        __syncthreads();
        if constexpr (C::Q_IN_REGS) {
#pragma unroll
            for (int kk = 0; kk < DT / 16; kk++)
                fdma_ldmatrix_x4(qa[kk], sQ + fdma_swz(wrow + (lane & 15), 2 * kk + (lane >> 4), CPR));
        }
    }

    /* Per-lane ldmatrix addresses (shared window; fdma_swz_lane): Q rows wrow + (lane & 15) (+ 16 mi), K rows
       (lane & 7) + 8 (lane >> 4) (+ 16 np; + the K buffer), V rows (lane & 7) + 8 ((lane >> 3) & 1) (+ 16 kk); a
       16-column step k adds the lane's xQ / xK XOR 32 k (V's chunk bit is Q's, so it uses xQ) */
    constexpr uint32_t ROW_BYTES = CPR * 16;
    const uint32_t aQ = fdma_smem_u32(sQ) + (wrow + (lane & 15)) * ROW_BYTES;
    const uint32_t aK = fdma_smem_u32(sK) + ((lane & 7) + ((lane >> 4) << 3)) * ROW_BYTES;
    const uint32_t aV = fdma_smem_u32(sV) + ((lane & 7) + (((lane >> 3) & 1) << 3)) * ROW_BYTES;
    const uint32_t xQ = fdma_swz_lane(lane >> 4, lane), xK = fdma_swz_lane((lane >> 3) & 1, lane);

    /* this thread's rows: i0 + wrow + 16 mi + g (+ 8) */
    const int row0 = i0 + wr + g;
    const uint64_t drow0 = ((uint64_t)b * p.H + h) * (uint64_t)Sq + (uint64_t)row0;

    /* AUX_TOP: the mask chunk (row r, keys 16 q4 .. + 15) folded into the same keys of the bias tile: bias = -inf
       where False (no bias: 0 / -inf), 16 elements per call */
    auto fold_chunk = [&](int r, int q4) {
        const uint32_t ninf = fdma_from_float<T>(-INFINITY), ninf2 = ninf | ninf << 16;
        const uint4 m = *reinterpret_cast<const uint4 *>(sMask + r * C::MASK_LD + q4 * 16);
        const uint32_t mw[4] = {m.x, m.y, m.z, m.w};
        uint4 *bp = reinterpret_cast<uint4 *>(sBias + r * C::BIAS_LD + q4 * 16);
#pragma unroll
        for (int hh = 0; hh < 2; hh++) { /* keys 8 hh .. 8 hh + 7 of the chunk: bias word e = keys 2e, 2e + 1 */
            const uint4 bv = has_bias ? bp[hh] : make_uint4(0, 0, 0, 0);
            uint32_t w[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int q = 0; q < 2; q++) { /* mask word 2 hh + q: the bytes of bias words 2q, 2q + 1 */
                const uint32_t x = mw[2 * hh + q];
                const uint32_t nz = ((x & 0x7f7f7f7fu) + 0x7f7f7f7fu) | x; /* bit 7 of a byte: it is nonzero */
                /* a byte's bit 7 replicated over its element's 16 bits: keep lanes, then bias or -inf */
                const uint32_t k0 = fdma_prmt(nz, 0u, 0x9988u), k1 = fdma_prmt(nz, 0u, 0xbbaau);
                w[2 * q] = (w[2 * q] & k0) | (ninf2 & ~k0);
                w[2 * q + 1] = (w[2 * q + 1] & k1) | (ninf2 & ~k1);
            }
            bp[hh] = make_uint4(w[0], w[1], w[2], w[3]);
        }
    };
    /* the chunks this thread copied (load_aux_top), once its cp.async copies have landed */
    auto fold_own = [&]() {
        for (int r = tid >> 2; r < RH; r += 32) fold_chunk(r, tid & 3);
    };

    /* ---- main loop over key tiles ---- */
    while (n < n_end) {
        /* pending: K(n), then the bias/mask group of n (its own group: waited only before the scores, or here
           with one mask buffer) */
        const bool folded = AUX_TOP && mask_aux && st == 1; /* the tile's bias has the mask in it */
        if constexpr (AUX_TOP) {
            fdma_cp_async_wait<0>();
            if (folded) fold_own();
        } else {
            fdma_cp_async_wait<1>();
        }
        __syncthreads();
        const int ib = n % 3, ibn = ib == 2 ? 0 : ib + 1; /* index slots of tiles n and n + 1 (gathered) */
        const int *sI = sIdx + 64 * ib, *sE = sExp + 64 * ib;
        load_rows(sV, vg, p.v_ss, n, sI);
        fdma_cp_async_commit();

        int nn = n + 1, st_next = 0;
        bool k_pending = false;
        int after_v = 0; /* groups committed after V(n) */
        if (early) {
            if (nn < n_end) {
                st_next = gather ? ((!p.causal || sIdx[64 * ibn] <= jmax) ? 2 : -1)
                                 : mask_mode == 0 ? 2 : mask_mode == 1 ? summary_status(su) : 1;
                while (st_next == 0) {
                    if (++nn >= n_end) break;
                    st_next = status_now(nn, kb ^ 1);
                }
                if (st_next < 0) n_end = nn;
                if (nn < n_end) {
                    issue_k(nn, kb ^ 1, ibn);
                    fdma_cp_async_commit();
                    k_pending = true;
                    after_v = 1;
                    if (gather && has_bias && tid < 64) gbias = gather_bias(ibn); /* lands during this tile */
                    if (!AUX_TOP && mask_mode == 1 && nn + 1 < n_end) su = summary_raw(nn + 1);
                }
            }
        } else if (nn < n_end) {
            load_mask_async(nn, kb ^ 1); /* the probe of the next tile */
            fdma_cp_async_commit();
            after_v = 1;
            if (FDMA_FWD_SPEC_K) { /* K of the next tile, in case the probe finds it active */
                issue_k(nn, kb ^ 1, 0);
                fdma_cp_async_commit();
                k_pending = true;
                after_v = 2;
            }
        }

        const bool bias_tile = has_bias || folded;

        /* Gathered keys: this warp's visibility word of each key c of the tile, bit k = row i0 + wrow + k sees it:
           c is in the list, j <= lim and (SPARSE) lim < e, with lim = i - Sq + Sk (causal) or Sk - 1. The score
           loop below tests the bits only when some word of the warp is not full (tail, diagonal, expiring keys). */
        bool vis_all = true;
        if (gather) {
            constexpr int ROWS = 16 * MI;
            constexpr uint32_t FULL = 0xffffffffu >> (32 - ROWS);
            const int L0 = i0 + wrow - Sq + Sk; /* lim of row k: L0 + k */
            bool full = true;
#pragma unroll
            for (int hc = 0; hc < 2; hc++) {
                const int c = lane + 32 * hc;
                uint32_t wd = 0;
                if (n * 64 + c < nkeys) {
                    if (!p.causal) {
                        wd = (!sparse || sE[c] >= Sk) ? FULL : 0u;
                    } else {
                        const int lo = max(sI[c] - L0, 0), hi = sparse ? min(sE[c] - L0, ROWS) : ROWS;
                        wd = lo < hi ? (0xffffffffu >> (32 - hi)) & (0xffffffffu << lo) : 0u;
                    }
                }
                sVis[64 * warp + c] = wd;
                full = full && wd == FULL;
            }
            vis_all = __all_sync(0xffffffffu, full);
            __syncwarp();
        }

        /* S = Q K^T: per 16-column step kk, the K fragments are loaded once and used by all MI row blocks */
        float s[MI][8][4];
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
#pragma unroll
            for (int t = 0; t < 8; t++) s[mi][t][0] = s[mi][t][1] = s[mi][t][2] = s[mi][t][3] = 0.f;
        const uint32_t aKc = aK + kb * C::KV_BYTES;
#pragma unroll
        for (int kk = 0; kk < DT / 16; kk++) {
            /* DT > 128: a branch per step past D keeps ptxas from hoisting fragment loads into spills */
            if (DT > 128 && kk * 16 >= D) break;
            uint32_t a[MI][4];
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                if constexpr (C::Q_IN_REGS) {
                    a[mi][0] = qa[kk][0]; a[mi][1] = qa[kk][1]; a[mi][2] = qa[kk][2]; a[mi][3] = qa[kk][3];
                } else {
                    fdma_ldsm_x4(a[mi], aQ + (xQ ^ (32u * kk)) + mi * 16 * ROW_BYTES);
                }
            }
#pragma unroll
            for (int np = 0; np < 4; np++) {
                uint32_t bb[4];
                fdma_ldsm_x4(bb, aKc + (xK ^ (32u * kk)) + np * 16 * ROW_BYTES);
#pragma unroll
                for (int mi = 0; mi < MI; mi++) {
                    fdma_mma16816<T>(s[mi][2 * np], a[mi], bb[0], bb[1]);
                    fdma_mma16816<T>(s[mi][2 * np + 1], a[mi], bb[2], bb[3]);
                }
            }
        }

        /* Scores. Plain tiles (no bias, no softcap) stay raw: the softmax folds scale*log2(e) into one FFMA
           per element (sl = scale*log2 e); otherwise S becomes log2 units here (sl = 1). Masked, causal-hidden
           and out-of-range keys become -inf. Each step is its own loop behind a warp-uniform test. */
        const int j0 = n * 64;
        /* this tile's bias/mask copies (warp-own rows; a broadcast row needs the whole CTA) */
        if ((F_BIAS || F_MASK) && !AUX_TOP && !gather && (has_bias || (mask_aux && st == 1))) {
            if (after_v == 2) fdma_cp_async_wait<3>();
            else if (after_v == 1) fdma_cp_async_wait<2>();
            else fdma_cp_async_wait<1>();
            if ((has_bias && p.b_rows_bcast) || (mask_aux && st == 1 && p.m_rows_bcast)) __syncthreads();
            else __syncwarp();
        }
        /* Units: plain tiles (no bias, no softcap) stay raw and the softmax folds scale*log2(e) into one FFMA
           per element (sl = scale*log2 e); with a bias and no softcap S becomes scale*S + bias (one FFMA,
           sl = log2 e); with a softcap S becomes log2 units here (sl = 1). */
        const bool plain = !bias_tile && !has_cap && p.scale_log2 > 0.f;
        const bool fused = bias_tile && !has_cap;
        const float sl = plain ? p.scale_log2 : fused ? FDMA_LOG2E : 1.f;
        if (!plain) {
            const float mul = has_cap ? p.scale * p.inv_softcap : fused ? p.scale : p.scale_log2;
            const float cap = p.softcap * FDMA_LOG2E;
            if (bias_tile) {
                const float bmul = fused ? 1.f : FDMA_LOG2E;
                auto add_bias = [&](float &x, float bv) {
                    x = has_cap ? fmaf(cap, tanhf(x * mul), bv * bmul) : fmaf(x, mul, bv * bmul);
                };
                if (gather) { /* the gathered row: this thread's two keys of each n8 tile, for all its rows */
#pragma unroll
                    for (int t = 0; t < 8; t++) {
                        const float2 bv = reinterpret_cast<const float2 *>(sBiasG)[4 * t + qd];
#pragma unroll
                        for (int mi = 0; mi < MI; mi++)
#pragma unroll
                            for (int r = 0; r < 2; r++) {
                                add_bias(s[mi][t][2 * r], bv.x);
                                add_bias(s[mi][t][2 * r + 1], bv.y);
                            }
                    }
                } else {
                    /* bias fragments by ldmatrix (the C layout of two n8 tiles is the A layout of one k16 step);
                       a broadcast bias row: every lane addresses row 0 */
#pragma unroll
                    for (int mi = 0; mi < MI; mi++)
#pragma unroll
                        for (int u = 0; u < 4; u++) {
                            const int rl = !own_b ? 0 : (AUX_TOP ? wr : wrow) + 16 * mi + (lane & 15);
                            uint32_t bw[4];
                            fdma_ldmatrix_x4(bw, sBias + rl * C::BIAS_LD + (2 * u + (lane >> 4)) * 8);
#pragma unroll
                            for (int x = 0; x < 4; x++) {
                                float *sv = &s[mi][2 * u + (x >> 1)][2 * (x & 1)];
                                float lo, hi;
                                fdma_pair_to_float<T>(bw[x], lo, hi);
                                add_bias(sv[0], lo);
                                add_bias(sv[1], hi);
                            }
                        }
                }
            } else {
#pragma unroll
                for (int mi = 0; mi < MI; mi++)
#pragma unroll
                    for (int t = 0; t < 8; t++)
#pragma unroll
                        for (int e = 0; e < 4; e++)
                            s[mi][t][e] = has_cap ? cap * tanhf(s[mi][t][e] * mul) : s[mi][t][e] * mul;
            }
        }
        if (F_MASK && !AUX_TOP && st == 1) {
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
#pragma unroll
                for (int t = 0; t < 8; t++)
#pragma unroll
                    for (int r = 0; r < 2; r++) {
                        const int rl = p.m_rows_bcast ? 0 : wrow + 16 * mi + g + 8 * r;
                        const uint32_t mw = *reinterpret_cast<const uint16_t *>(mask_buf(kb) +
                                                                                rl * C::MASK_LD + t * 8 + 2 * qd);
                        if (!(mw & 0xffu)) s[mi][t][2 * r] = -INFINITY;
                        if (!(mw >> 8)) s[mi][t][2 * r + 1] = -INFINITY;
                    }
        }
        if (gather) {
            if (!vis_all) { /* row g + 16 mi + 8 r of the warp is bit 16 mi + 8 r of the word shifted by g */
#pragma unroll
                for (int t = 0; t < 8; t++) {
                    const uint2 w2 = *reinterpret_cast<const uint2 *>(sVis + 64 * warp + t * 8 + 2 * qd);
                    const uint32_t wa = w2.x >> g, wb = w2.y >> g;
#pragma unroll
                    for (int mi = 0; mi < MI; mi++)
#pragma unroll
                        for (int r = 0; r < 2; r++) {
                            if (!((wa >> (16 * mi + 8 * r)) & 1u)) s[mi][t][2 * r] = -INFINITY;
                            if (!((wb >> (16 * mi + 8 * r)) & 1u)) s[mi][t][2 * r + 1] = -INFINITY;
                        }
                }
            }
        } else if (j0 + 64 > Sk || (p.causal && j0 + 63 > i0 + wr - Sq + Sk)) { /* tail or diagonal tile */
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                /* keys j0 + jl with jl < lim[r] are visible to the row */
                const int r0 = row0 + 16 * mi;
                const int lim0 = min(Sk, p.causal ? r0 - Sq + Sk + 1 : Sk) - j0;
                const int lim1 = min(Sk, p.causal ? r0 + 8 - Sq + Sk + 1 : Sk) - j0;
#pragma unroll
                for (int t = 0; t < 8; t++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        if (t * 8 + 2 * qd + (e & 1) >= ((e >> 1) ? lim1 : lim0)) s[mi][t][e] = -INFINITY;
            }
        }

        /* online softmax (m_run in log2 units); O and l are rescaled only when some row max of the warp moved */
#pragma unroll
        for (int mi = 0; mi < MI; mi++) {
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float mx[4];
#pragma unroll
                for (int u = 0; u < 4; u++)
                    mx[u] = fmaxf(fmaxf(s[mi][2 * u][2 * r], s[mi][2 * u][2 * r + 1]),
                                  fmaxf(s[mi][2 * u + 1][2 * r], s[mi][2 * u + 1][2 * r + 1]));
                float m = fmaxf(fmaxf(mx[0], mx[1]), fmaxf(mx[2], mx[3]));
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
                const float m_new = fmaxf(m_run[mi][r], m * sl);
                const float m_use = m_new == -INFINITY ? 0.f : m_new;
                float rs = 0.f;
#pragma unroll
                for (int t = 0; t < 8; t++) {
                    s[mi][t][2 * r] = exp2f(fmaf(s[mi][t][2 * r], sl, -m_use));
                    s[mi][t][2 * r + 1] = exp2f(fmaf(s[mi][t][2 * r + 1], sl, -m_use));
                    rs += s[mi][t][2 * r] + s[mi][t][2 * r + 1];
                }
                if (__any_sync(0xffffffffu, m_new != m_run[mi][r])) {
                    const float alpha = exp2f(m_run[mi][r] - m_use);
                    l_run[mi][r] *= alpha;
#pragma unroll
                    for (int d = 0; d < DT / 8; d++) {
                        o[mi][d][2 * r] *= alpha;
                        o[mi][d][2 * r + 1] *= alpha;
                    }
                }
                l_run[mi][r] += rs;
                m_run[mi][r] = m_new;
            }
        }

        /* dropout: keep bit of (row, key) from Philox; the row sum above is taken before dropout */
        if (F_DROP && p.dropout) {
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
                /* keep bits first, one Philox call at a time (an unrolled loop of 16 calls would spill) */
                uint32_t kb = 0;
#pragma unroll 1
                for (int x = 0; x < 16; x++) {
                    const int r = x >> 3, t = x & 7;
                    /* a device rng_state (refilled by a captured RNG op on every CUDA-graph replay) overrides
                       the by-value pair; re-read per call (an L1 hit) so that it holds no registers */
                    uint64_t seed = p.seed, offset = p.offset;
                    if (p.rng_state) fdma_load_rng(p.rng_state, seed, offset);
                    uint32_t w[4];
                    uint32_t lo, hi;
                    if (gather) { /* the two keys' own indices need not share a Philox call */
                        const int ja = sI[t * 8 + 2 * qd], jb = sI[t * 8 + 2 * qd + 1];
                        fdma_dropout_words(seed, offset, drow0 + 16 * mi + 8 * r, (uint64_t)ja, w);
                        lo = (ja & 3) == 0 ? w[0] : (ja & 3) == 1 ? w[1] : (ja & 3) == 2 ? w[2] : w[3];
                        fdma_dropout_words(seed, offset, drow0 + 16 * mi + 8 * r, (uint64_t)jb, w);
                        hi = (jb & 3) == 0 ? w[0] : (jb & 3) == 1 ? w[1] : (jb & 3) == 2 ? w[2] : w[3];
                    } else {
                        fdma_dropout_words(seed, offset, drow0 + 16 * mi + 8 * r, (uint64_t)(j0 + t * 8 + 2 * qd), w);
                        lo = (qd & 1) ? w[2] : w[0];
                        hi = (qd & 1) ? w[3] : w[1];
                    }
                    kb |= (uint32_t)(lo >= p.drop_threshold) << (2 * x) |
                          (uint32_t)(hi >= p.drop_threshold) << (2 * x + 1);
                }
#pragma unroll
                for (int r = 0; r < 2; r++) {
#pragma unroll
                    for (int t = 0; t < 8; t++) {
                        if (!((kb >> (2 * (8 * r + t))) & 1)) s[mi][t][2 * r] = 0.f;
                        if (!((kb >> (2 * (8 * r + t) + 1)) & 1)) s[mi][t][2 * r + 1] = 0.f;
                    }
                }
            }
        }

        /* P -> fp16/bf16 A fragments */
        uint32_t pa[MI][4][4];
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                pa[mi][kk][0] = fdma_pack2<T>(s[mi][2 * kk][0], s[mi][2 * kk][1]);
                pa[mi][kk][1] = fdma_pack2<T>(s[mi][2 * kk][2], s[mi][2 * kk][3]);
                pa[mi][kk][2] = fdma_pack2<T>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
                pa[mi][kk][3] = fdma_pack2<T>(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
            }

        /* V(n) landed (the next K may still be in flight); the barrier frees K, bias and mask of this tile;
           probe mode decides the next tile here */
        if (k_pending) fdma_cp_async_wait<1>();
        else fdma_cp_async_wait<0>();
        if (early) {
            __syncthreads();
            if (nn < n_end) {
                issue_aux(nn, st_next, kb ^ 1);
                fdma_cp_async_commit();
                /* AUX_TOP: the summary of the tile after nn is read here, off the score loop's registers */
                if (AUX_TOP && mask_mode == 1 && nn + 1 < n_end) su = summary_raw(nn + 1);
            }
        } else {
            st_next = __syncthreads_or(nn < n_end && probe_nonzero(kb ^ 1)) ? 1 : 0;
            if (nn < n_end) {
                /* a speculative K(nn) is the right one if the probe found nn active; otherwise status_now
                   has drained it (cp.async.wait_group 0) before the same threads overwrite their chunks */
                const bool k_issued = FDMA_FWD_SPEC_K && st_next != 0;
                while (st_next == 0) {
                    if (++nn >= n_end) break;
                    st_next = status_now(nn, kb ^ 1);
                }
                if (nn < n_end) {
                    if (!k_issued) issue_k(nn, kb ^ 1, 0);
                    fdma_cp_async_commit();
                    issue_aux(nn, st_next, kb ^ 1);
                    fdma_cp_async_commit();
                }
            }
        }

        /* O += P V: V fragments loaded once per (kk, dp) and used by all MI row blocks */
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
#pragma unroll
            for (int dp = 0; dp < DT / 16; dp++) {
                if (DT > 128 && dp * 16 >= D) break;
                uint32_t bb[4];
                fdma_ldsm_x4_trans(bb, aV + (xQ ^ (32u * dp)) + kk * 16 * ROW_BYTES);
#pragma unroll
                for (int mi = 0; mi < MI; mi++) {
                    fdma_mma16816<T>(o[mi][2 * dp], pa[mi][kk], bb[0], bb[1]);
                    fdma_mma16816<T>(o[mi][2 * dp + 1], pa[mi][kk], bb[2], bb[3]);
                }
            }
        }
        n = nn;
        st = st_next;
        kb ^= 1;
    }

    /* ---- epilogue: normalise, stage through this warp's rows of sQ, store ---- */
    fdma_cp_async_wait<0>(); /* with no active tile the Q copies may still be in flight */
    __syncthreads();
#pragma unroll
    for (int mi = 0; mi < MI; mi++) {
        float inv[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float l = l_run[mi][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            inv[r] = l > 0.f ? p.drop_scale / l : 0.f;
            const int i = row0 + 16 * mi + 8 * r;
            if (p.lse && qd == 0 && i < Sq)
                p.lse[((int64_t)b * p.H + h) * Sq + i] = l > 0.f ? (m_run[mi][r] + log2f(l)) * FDMA_LN2 : -INFINITY;
        }
#pragma unroll
        for (int d = 0; d < DT / 8; d++) {
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int rl = wrow + 16 * mi + g + 8 * r;
                *reinterpret_cast<uint32_t *>(sQ + fdma_swz(rl, d, CPR) + 4 * qd) =
                    fdma_pack2<T>(o[mi][d][2 * r] * inv[r], o[mi][d][2 * r + 1] * inv[r]);
            }
        }
    }
    __syncwarp();
    uint16_t *og = static_cast<uint16_t *>(p.out) + b * p.o_sb + h * p.o_sh;
#pragma unroll
    for (int it = 0; it < 16 * MI * CPR / 32; it++) {
        const int c = lane + it * 32, r = c / CPR, ch = c % CPR, i = i0 + wr + r;
        if (i < Sq && ch * 8 < D) {
            const uint4 val = *reinterpret_cast<const uint4 *>(sQ + fdma_swz(wrow + r, ch, CPR));
            uint16_t *dst = og + (int64_t)i * p.o_ss + ch * 8;
            if (p.o_vec) {
                *reinterpret_cast<uint4 *>(dst) = val;
            } else {
                const uint32_t w[4] = {val.x, val.y, val.z, val.w};
#pragma unroll
                for (int e = 0; e < 8; e++) dst[e] = (uint16_t)(w[e >> 1] >> (16 * (e & 1)));
            }
        }
    }
    FDMA_FWD_SM80_SKIP_END
}

/* Launch one instantiation on the caller's stream. */
template <typename T, int DT, int NW, int MI, int FEAT>
static fdma_status fdma_fwd_launch_t(const FdmaFwdParams &kp, cudaStream_t stream, const char *name) {
    using C = FdmaFwdCfg<DT, NW, MI, FEAT>;
    static_assert(C::BR == fdma_fwd_rows(DT), "query rows per CTA must match the plan (fdma_fwd_rows)");
    auto kern = fdma_fwd_kernel<T, DT, NW, MI, FEAT>;
    if (C::SMEM > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
        if (e != cudaSuccess) {
            cudaGetLastError();
            return fdma_set_error(FDMA_STATUS_CUDA_ERROR, "%s: cannot raise shared memory to %d bytes: %s", name,
                                  C::SMEM, cudaGetErrorString(e));
        }
    }
    /* one mask buffer: sized for 2 CTAs per SM; ask for the whole carveout as shared memory */
    if (C::MASK_BUFS == 1 && cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout,
                                                  (int)cudaSharedmemCarveoutMaxShared) != cudaSuccess)
        cudaGetLastError(); /* only a hint */
    /* One mask buffer (mask + bias, AUX_TOP): pack P = 4 or 2 query heads into a CTA when they share K, V, mask,
       bias and summary (P divides H / Hkv and the mask's and bias's head divisors, or those have one head) and the
       launcher's summary is there (probe mode keeps one head); RH = BR / P rows of each, ceil(Sq / RH) tiles. */
    FdmaFwdParams kq = kp;
    kq.pack_log2 = 0;
    if (C::MASK_BUFS == 1 && kp.summary) {
        for (int lp = 2; lp > 0 && !kq.pack_log2; lp--) {
            const int P = 1 << lp;
            const bool ok = kp.H % P == 0 && kp.hkv_div % P == 0 && (!kp.bias || kp.b_sh == 0 || kp.b_hdiv % P == 0) &&
                            (!kp.mask || kp.m_sh == 0 || kp.m_hdiv % P == 0);
            if (ok) kq.pack_log2 = lp;
        }
        const int rh = C::BR >> kq.pack_log2;
        kq.num_m_tiles = (kp.Sq + rh - 1) / rh;
    }
    dim3 grid((unsigned)((int64_t)(kq.H >> kq.pack_log2) * kq.num_m_tiles), (unsigned)kq.B);
    kern<<<grid, C::THREADS, C::SMEM, stream>>>(kq);
    return fdma_cuda_check_launch(name);
}


/* Features a call needs (FDMA_F_* bits); a gathered row-broadcast mask reads no mask tiles. */
static inline int fdma_fwd_features(const FdmaFwdParams &kp) {
    const bool gather = kp.gather || kp.ex_lists;
    return (kp.mask && !gather ? FDMA_F_MASK : 0) | (kp.bias ? FDMA_F_BIAS : 0) | (kp.dropout ? FDMA_F_DROP : 0) |
           (gather ? FDMA_F_GATHER : 0) | (kp.softcap > 0.f ? FDMA_F_CAP : 0);
}

/* One instantiation FEAT of a head-dim tile at its warps x row blocks (fdma_fwd_warps_f / fdma_fwd_mi_f). */
template <typename T, int DT, int FEAT>
static fdma_status fdma_fwd_launch_f(const FdmaFwdParams &kp, cudaStream_t stream, const char *name) {
    return fdma_fwd_launch_t<T, DT, fdma_fwd_warps_f(DT, FEAT), fdma_fwd_mi_f(DT, FEAT), FEAT>(kp, stream, name);
}

/* One head-dim tile, one dtype: the instantiation fdma_fwd_inst picks (common.cuh). DT > 128 has only the
 * general one. */
template <typename T, int DT>
static fdma_status fdma_fwd_launch_dt(const FdmaFwdParams &kp, cudaStream_t stream, const char *name) {
    if constexpr (DT <= 128) {
        switch (fdma_fwd_inst(DT, fdma_fwd_features(kp), kp.sm90 != 0)) {
        case 0: return fdma_fwd_launch_f<T, DT, 0>(kp, stream, name);
        case FDMA_F_MB: return fdma_fwd_launch_f<T, DT, FDMA_F_MB>(kp, stream, name);
        case FDMA_F_BG: return fdma_fwd_launch_f<T, DT, FDMA_F_BG>(kp, stream, name);
        default: break;
        }
    }
    return fdma_fwd_launch_f<T, DT, FDMA_F_ALL>(kp, stream, name);
}

#define FDMA_DEFINE_FWD_LAUNCHER(DT)                                                                         \
    fdma_status fdma_cuda_fwd_launch_d##DT(const FdmaFwdParams &kp, fdma_dtype dt, cudaStream_t stream) {   \
        if (dt == FDMA_DTYPE_F16) return fdma_fwd_launch_dt<__half, DT>(kp, stream, "cuda_fwd_f16_d" #DT);  \
        return fdma_fwd_launch_dt<__nv_bfloat16, DT>(kp, stream, "cuda_fwd_bf16_d" #DT);                     \
    }

#endif /* FDMA_CUDA_FWD_KERNEL_CUH */
