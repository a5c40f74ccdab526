/*
 * api_cuda.cu -- the CUDA backend's entry points from src/backend.h (forward side; the backward pair is in
 * bwd*.cu):
 *
 *   fdma_cuda_available       built with CUDA and the current device has compute capability >= 8.0
 *   fdma_cuda_check_pointers  every non-NULL pointer in the params is device memory on the current device
 *   fdma_cuda_fwd_plan        THE forward selector: which kernel ("cuda_fwd_bf16_d128"), its workspace, or
 *                             FDMA_STATUS_UNSUPPORTED with the reason (fp32, D % 8 != 0, cc < 8.0, sizes)
 *   fdma_cuda_fwd_run         params -> FdmaFwdParams (strides, broadcast, alignment flags) -> launch on the
 *                             caller's stream; then the probabilities kernel if p->probs is set
 *
 * Kernel paths, all in fwd_kernel.cuh: dense key tiles ("cuda_fwd_bf16_d128"); gathered keys ("..._gather")
 * when the mask broadcasts over query rows and the bias is absent or row-broadcast too (the Doge / W1 form): a
 * small kernel first lists each (b, mask head)'s kept keys in the workspace, then the attention kernel walks only
 * those; and the top-k window (window.cuh): "..._sparse" (causal per-key bias: per query tile the list of keys
 * any of its rows keeps, visibility j <= lim_i < e[j] in the kernel) or "..._window" (the keep mask selected into
 * the workspace, then one of the first two paths). The name ends with the kernel instantiation (fdma_fwd_inst):
 * "_f<feature bits>_<warps>x<row blocks>", e.g. "cuda_fwd_bf16_d128_sparse_f10_4x2". Workspace = the selection,
 * the gathered lists (+ lse when probs are asked without lse; + the mask summary when the mask + bias
 * instantiation at DT = 128 runs without the caller's: computed per call, causal tiles no row sees left unread).
 *   fdma_cuda_create_mask     checks that bias, mask and out are device memory, then runs the exact radix-select
 *                             top-k of topk.cu (fdma_cuda_topk_create_mask)
 *
 * Head-dim tiles: D <= 64 -> 64, <= 128 -> 128, <= 192 -> 192, <= 256 -> 256 (fwd_d*.cu).
 * The params arrive validated (src/validate.c): shapes, broadcast dims and strides are consistent.
 */
#include <math.h>
#include <string.h>
#include <stdio.h>

#include "common.cuh"
#include "window.cuh"

static int current_cc(int *dev_out) {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    if (dev_out) *dev_out = dev;
    return major * 10 + minor;
}

extern "C" int fdma_cuda_available(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        cudaGetLastError();
        return 0;
    }
    return current_cc(NULL) >= 80;
}

static fdma_status check_ptr(const void *ptr, const char *name, int dev) {
    if (!ptr) return FDMA_STATUS_OK;
    cudaPointerAttributes at;
    cudaError_t e = cudaPointerGetAttributes(&at, ptr);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "%s: expected CUDA device memory, cudaPointerGetAttributes "
                              "failed (%s)", name, cudaGetErrorString(e));
    }
    if (at.type == cudaMemoryTypeManaged) return FDMA_STATUS_OK;
    if (at.type != cudaMemoryTypeDevice)
        return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "%s: expected CUDA device memory, got %s memory", name,
                              at.type == cudaMemoryTypeHost ? "pinned host" : "unregistered host");
    if (at.device != dev)
        return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "%s: expected memory on the current device %d, got device %d",
                              name, dev, at.device);
    return FDMA_STATUS_OK;
}

extern "C" fdma_status fdma_cuda_check_pointers(const fdma_params *p) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) {
        cudaError_t e = cudaGetLastError();
        return fdma_set_error(FDMA_STATUS_CUDA_ERROR, "device: no usable CUDA device (%s)", cudaGetErrorString(e));
    }
    const void *ptrs[] = {p->q,    p->k,  p->v,  p->mask.ptr, p->bias.ptr, p->out,          p->lse,       p->probs,
                          p->dout, p->dq, p->dk, p->dv,       p->dbias,    p->mask_summary, p->workspace, p->rng_state};
    const char *names[] = {"q",    "k",  "v",  "mask", "bias",  "out",          "lse",       "probs",
                           "dout", "dq", "dk", "dv",   "dbias", "mask_summary", "workspace", "rng_state"};
    for (size_t t = 0; t < sizeof(ptrs) / sizeof(ptrs[0]); t++) {
        fdma_status st = check_ptr(ptrs[t], names[t], dev);
        if (st != FDMA_STATUS_OK) return st;
    }
    return FDMA_STATUS_OK;
}

/* Gathered keys: a mask whose rows broadcast (dim 2 == 1) and a bias that is absent or row-broadcast too.
 * The kernel then walks only the kept keys (lists built in the workspace by fdma_gather_kernel). */
static int fwd_use_gather(const fdma_params *p) {
    return p->mask.ptr && p->mask.dim[2] == 1 && (!p->bias.ptr || p->bias.dim[2] == 1);
}
static size_t fwd_gather_bytes(const fdma_params *p) {
    if (!fwd_use_gather(p)) return 0;
    size_t b = (size_t)(p->mask.dim[0] * p->mask.dim[1] * (p->Sk + 16)) * sizeof(int32_t);
    return (b + 255) & ~(size_t)255;
}

static int fwd_dtile(int64_t D) { return D <= 64 ? 64 : D <= 128 ? 128 : D <= 192 ? 192 : 256; }

/* FDMA_F_* features of the attention call pa (after the window's params; sparse: SPARSE window lists), as
 * fdma_fwd_features sees them in the launcher: a gathered mask reads no mask tiles. */
static int fwd_features(const fdma_params *pa, int sparse) {
    const int gather = sparse || fwd_use_gather(pa);
    return (pa->mask.ptr && !gather ? FDMA_F_MASK : 0) | (pa->bias.ptr ? FDMA_F_BIAS : 0) |
           (pa->p_drop > 0.f ? FDMA_F_DROP : 0) | (gather ? FDMA_F_GATHER : 0) | (pa->softcap > 0.f ? FDMA_F_CAP : 0);
}

/* Bytes of the mask summary the forward computes itself (workspace, 256-aligned): the mask + bias instantiation at
 * DT = 128 has no in-loop probe (fwd_kernel.cuh, AUX_TOP), so without the caller's summary it would compute
 * all-False tiles; one pass over the mask restores the skipping. With causal it reads only the tiles some row can
 * see (fdma_cuda_fwd_mask_summary says why the others may read as all False). 0 when not needed. */
static size_t fwd_autosum_bytes(const fdma_params *pa, int dt, int sparse, bool sm90) {
    if (!pa->mask.ptr || pa->mask_summary || dt != 128 || fdma_fwd_inst(dt, fwd_features(pa, sparse), sm90) != FDMA_F_MB)
        return 0;
    const fdma_view4 *m = &pa->mask;
    const size_t b = (size_t)(m->dim[0] * m->dim[1] * ((m->dim[2] + 63) / 64) * ((pa->Sk + 63) / 64));
    return (b + 255) & ~(size_t)255;
}

/* fwd_aux.cu: the mask summary of fdma_cuda_mask_summarize, but causal tiles that no row sees are 0 unread */
fdma_status fdma_cuda_fwd_mask_summary(const fdma_params *p, uint8_t *summary);

static size_t fwd_lse_bytes(const fdma_params *p) {
    return (p->probs && !p->lse) ? (((size_t)(p->B * p->H * p->Sq) * sizeof(float) + 255) & ~(size_t)255) : 0;
}

extern "C" fdma_status fdma_cuda_fwd_plan(const fdma_params *p, fdma_plan *plan) {
    if (p->dtype != FDMA_DTYPE_F16 && p->dtype != FDMA_DTYPE_BF16)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED, "dtype: the CUDA forward runs fp16 and bf16, got fp32 (use "
                              "the CPU backend or convert)");
    if (p->D % 8 != 0 || p->D > 256 || p->D < 8)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED, "D: the CUDA forward needs a multiple of 8 in [8, 256], got "
                              "%lld (the Python layer pads D)", (long long)p->D);
    int cc = current_cc(NULL);
    if (cc < 80)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED, "device: the CUDA forward needs compute capability >= 8.0, "
                              "the current device has %d.%d", cc / 10, cc % 10);
    const int64_t lim = (int64_t)1 << 31;
    if (p->Sq >= lim || p->Sk >= lim)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED, "Sq, Sk: the CUDA forward needs < 2^31, got Sq = %lld, Sk = "
                              "%lld", (long long)p->Sq, (long long)p->Sk);
    const int dt = fwd_dtile(p->D);
    const int64_t m_tiles = (p->Sq + fdma_fwd_rows(dt) - 1) / fdma_fwd_rows(dt);
    if (p->B > 65535 || p->H * m_tiles >= lim || (p->probs && (p->Sq >= lim || p->H > 65535)))
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED, "B, H, Sq: grid too large for the CUDA forward (B = %lld <= "
                              "65535, H * ceil(Sq/%d) = %lld < 2^31)", (long long)p->B, fdma_fwd_rows(dt),
                              (long long)(p->H * m_tiles));
    /* top-k window: the selection first (window.cuh), then the attention with what it produced */
    fdma_cuda_window w;
    fdma_status st = fdma_cuda_window_plan(p, fdma_fwd_rows(dt), p->probs != NULL, &w);
    if (st != FDMA_STATUS_OK) return st;
    fdma_params pa;
    fdma_cuda_window_params(&w, p, (void *)(uintptr_t)256, &pa);
    const int gather = fwd_use_gather(&pa);
    /* the name ends with the kernel instantiation: its feature bits and warps x row blocks */
    const int inst = fdma_fwd_inst(dt, fwd_features(&pa, w.mode == FDMA_WIN_SPARSE), cc >= 90);
    snprintf(plan->name, sizeof(plan->name), "cuda_fwd_%s_d%d%s%s_f%d_%dx%d", p->dtype == FDMA_DTYPE_F16 ? "f16" : "bf16",
             dt, w.mode == FDMA_WIN_SPARSE ? "_sparse" : w.mode == FDMA_WIN_MASK ? "_window" : "", gather ? "_gather" : "",
             inst, fdma_fwd_warps_f(dt, inst), fdma_fwd_mi_f(dt, inst));
    plan->variant = dt;
    plan->flags = gather;
    /* workspace: the selection; the gathered-key lists; lse when the probabilities need it and the caller gave
       none; the mask summary the launcher computes (fwd_autosum_bytes) */
    plan->workspace_bytes = w.bytes + fwd_gather_bytes(&pa) + fwd_lse_bytes(p) +
                            fwd_autosum_bytes(&pa, dt, w.mode == FDMA_WIN_SPARSE, cc >= 90);
    return FDMA_STATUS_OK;
}

static int aligned16(const void *ptr) { return ((uintptr_t)ptr & 15) == 0; }

/* head divisor of a mask/bias dim1 (see FdmaFwdParams) and the stride to use with it */
static void head_map(const fdma_params *p, int64_t dim1, int64_t stride1, int *hdiv, int64_t *sh) {
    if (dim1 == 1) {
        *hdiv = 1;
        *sh = 0;
    } else if (dim1 == p->H) {
        *hdiv = 1;
        *sh = stride1;
    } else {
        *hdiv = (int)(p->H / p->Hkv);
        *sh = stride1;
    }
}

/* The attention after the selection: p has window 0 (and the keep mask as its mask in MASK mode); ws = the
 * workspace after the selection's part; view = the SPARSE selection or zeros. */
static fdma_status fwd_run_attention(const fdma_params *p, const fdma_plan *plan, char *ws,
                                     const fdma_cuda_sparse_view *view) {
    FdmaFwdParams kp;
    memset(&kp, 0, sizeof(kp));
    kp.q = p->q;
    kp.k = p->k;
    kp.v = p->v;
    kp.out = p->out;
    const size_t gbytes = plan->flags ? fwd_gather_bytes(p) : 0;
    float *lse = p->lse ? p->lse : (p->probs ? reinterpret_cast<float *>(ws + gbytes) : NULL);
    kp.lse = lse;
    kp.q_sb = p->q_stride[0]; kp.q_ss = p->q_stride[1]; kp.q_sh = p->q_stride[2];
    kp.k_sb = p->k_stride[0]; kp.k_ss = p->k_stride[1]; kp.k_sh = p->k_stride[2];
    kp.v_sb = p->v_stride[0]; kp.v_ss = p->v_stride[1]; kp.v_sh = p->v_stride[2];
    kp.o_sb = p->out_stride[0]; kp.o_ss = p->out_stride[1]; kp.o_sh = p->out_stride[2];
    kp.B = (int)p->B; kp.H = (int)p->H; kp.Hkv = (int)p->Hkv;
    kp.Sq = (int)p->Sq; kp.Sk = (int)p->Sk; kp.D = (int)p->D;
    kp.hkv_div = (int)(p->H / p->Hkv);
    const int dt = plan->variant;
    kp.num_m_tiles = (int)((p->Sq + fdma_fwd_rows(dt) - 1) / fdma_fwd_rows(dt));
    kp.sm90 = current_cc(NULL) >= 90;

    int64_t all_or = p->q_stride[0] | p->q_stride[1] | p->q_stride[2] | p->k_stride[0] | p->k_stride[1] |
                     p->k_stride[2] | p->v_stride[0] | p->v_stride[1] | p->v_stride[2];
    kp.qkv_vec = aligned16(p->q) && aligned16(p->k) && aligned16(p->v) && (all_or & 7) == 0;
    kp.o_vec = aligned16(p->out) && ((p->out_stride[0] | p->out_stride[1] | p->out_stride[2]) & 7) == 0;

    if (p->mask.ptr) {
        const fdma_view4 *m = &p->mask;
        kp.mask = static_cast<const uint8_t *>(m->ptr);
        kp.m_sb = m->dim[0] > 1 ? m->stride[0] : 0;
        head_map(p, m->dim[1], m->stride[1], &kp.m_hdiv, &kp.m_sh);
        kp.m_rows_bcast = m->dim[2] == 1;
        kp.m_si = kp.m_rows_bcast ? 0 : m->stride[2];
        kp.m_sj = m->stride[3];
        kp.m_vec = aligned16(m->ptr) && kp.m_sj == 1 && ((kp.m_sb | kp.m_sh | kp.m_si) & 15) == 0;
        const size_t sbytes = fwd_autosum_bytes(p, dt, view->lists != NULL, kp.sm90 != 0);
        const uint8_t *summary = p->mask_summary;
        if (sbytes) {
            uint8_t *own = reinterpret_cast<uint8_t *>(ws + gbytes + fwd_lse_bytes(p));
            fdma_status st = fdma_cuda_fwd_mask_summary(p, own);
            if (st != FDMA_STATUS_OK) return st;
            summary = own;
        }
        if (summary) {
            kp.summary = summary;
            kp.s_rows = (int)((m->dim[2] + 63) / 64);
            kp.s_cols = (int)((p->Sk + 63) / 64);
            kp.s_si = kp.s_cols;
            kp.s_sh = m->dim[1] > 1 ? (int64_t)kp.s_rows * kp.s_cols : 0;
            kp.s_sb = m->dim[0] > 1 ? m->dim[1] * (int64_t)kp.s_rows * kp.s_cols : 0;
        }
    }
    if (p->bias.ptr) {
        const fdma_view4 *bv = &p->bias;
        kp.bias = bv->ptr;
        kp.b_sb = bv->dim[0] > 1 ? bv->stride[0] : 0;
        head_map(p, bv->dim[1], bv->stride[1], &kp.b_hdiv, &kp.b_sh);
        kp.b_rows_bcast = bv->dim[2] == 1;
        kp.b_si = kp.b_rows_bcast ? 0 : bv->stride[2];
        kp.b_sj = bv->stride[3];
        kp.b_vec = aligned16(bv->ptr) && kp.b_sj == 1 && ((kp.b_sb | kp.b_sh | kp.b_si) & 7) == 0;
    }
    kp.scale = p->scale;
    kp.scale_log2 = p->scale * FDMA_LOG2E;
    kp.softcap = p->softcap > 0.f ? p->softcap : 0.f;
    kp.inv_softcap = p->softcap > 0.f ? 1.f / p->softcap : 0.f;
    kp.causal = p->causal != 0;
    kp.dropout = p->p_drop > 0.f;
    kp.drop_threshold = fdma_dropout_threshold(p->p_drop);
    kp.drop_scale = p->p_drop > 0.f ? 1.f / (1.f - p->p_drop) : 1.f;
    kp.seed = p->seed;
    kp.offset = p->offset;
    kp.rng_state = p->rng_state;

    cudaStream_t stream = static_cast<cudaStream_t>(p->stream);
    fdma_status st;
    if (view->lists) {
        kp.ex_lists = view->lists;
        kp.ex_counts = view->counts;
        kp.ex_eoff = view->elists - view->lists;
        kp.ex_cap = view->cap;
        kp.ex_ntiles = view->ntiles;
        kp.ex_rb = view->rb;
        kp.ex_hdiv = view->hdiv;
        kp.ex_hmul = view->hmul;
    }
    if (plan->flags) {
        int32_t *lists = reinterpret_cast<int32_t *>(ws);
        const int64_t ls = p->Sk + 16;
        kp.gather = lists;
        kp.g_sb = p->mask.dim[0] > 1 ? p->mask.dim[1] * ls : 0;
        kp.g_sh = p->mask.dim[1] > 1 ? ls : 0;
        kp.summary = NULL;
        if ((st = fdma_cuda_gather_launch(kp, p, lists, stream)) != FDMA_STATUS_OK) return st;
    }
    switch (dt) {
    case 64: st = fdma_cuda_fwd_launch_d64(kp, p->dtype, stream); break;
    case 128: st = fdma_cuda_fwd_launch_d128(kp, p->dtype, stream); break;
    case 192: st = fdma_cuda_fwd_launch_d192(kp, p->dtype, stream); break;
    case 256: st = fdma_cuda_fwd_launch_d256(kp, p->dtype, stream); break;
    default: return fdma_set_error(FDMA_STATUS_INTERNAL, "cuda forward: plan variant %d is not a head-dim tile", dt);
    }
    if (st != FDMA_STATUS_OK || !p->probs) return st;
    return fdma_cuda_fwd_probs_launch(kp, p->dtype, p->probs, lse, stream);
}

extern "C" fdma_status fdma_cuda_fwd_run(const fdma_params *p, const fdma_plan *plan) {
    fdma_cuda_window w;
    fdma_cuda_sparse_view view;
    fdma_params pa;
    fdma_status st = fdma_cuda_window_prepare(p, fdma_fwd_rows(plan->variant), p->probs != NULL, &w, &view, &pa);
    if (st != FDMA_STATUS_OK) return st;
    return fwd_run_attention(&pa, plan, static_cast<char *>(p->workspace) + w.bytes, &view);
}

extern "C" fdma_status fdma_cuda_topk_create_mask(const fdma_topk_params *p);

extern "C" fdma_status fdma_cuda_create_mask(const fdma_topk_params *p) {
    fdma_status st = fdma_cuda_check_device_ptr(p->bias.ptr, "bias");
    if (st == FDMA_STATUS_OK && p->mask.ptr) st = fdma_cuda_check_device_ptr(p->mask.ptr, "mask");
    if (st == FDMA_STATUS_OK) st = fdma_cuda_check_device_ptr(p->out, "out");
    return st != FDMA_STATUS_OK ? st : fdma_cuda_topk_create_mask(p);
}

fdma_status fdma_cuda_check_device_ptr(const void *ptr, const char *name) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) {
        cudaError_t e = cudaGetLastError();
        return fdma_set_error(FDMA_STATUS_CUDA_ERROR, "device: no usable CUDA device (%s)", cudaGetErrorString(e));
    }
    return check_ptr(ptr, name, dev);
}
