/*
 * window.cu -- the top-k window (SPEC section 6) for the CUDA forward and backward: picks SPARSE (per-key expiry
 * and gathered tile lists) or MASK (materialised keep mask) for a call, sizes the workspace, runs the selection.
 * The modes and what the kernels read are described in window.cuh.
 */
#include <string.h>

#include <cuda_runtime.h>

#include "window.cuh"

static size_t win_align(size_t x) { return (x + 255) & ~(size_t)255; }

/* strides of a contiguous tensor of dims d (this file uses no C source of src/, so the CUDA harnesses link it) */
static void win_contiguous(int64_t st[4], const int64_t d[4]) {
    st[3] = 1;
    st[2] = d[3];
    st[1] = d[2] * d[3];
    st[0] = d[1] * d[2] * d[3];
}

/* elists[q] = e[r][lists[q]] for every list entry q of row r (0 for padding and for the unwritten tail). */
__global__ void fdma_window_elists_kernel(const int32_t *lists, const int32_t *counts, const int32_t *expiry,
                                          int32_t *elists, int64_t ntiles, int64_t cap, int64_t Sk, int64_t n) {
    const int64_t q = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (q >= n) return;
    const int64_t lt = q / cap, r = lt / ntiles;
    const int32_t j = q % cap < counts[lt] ? lists[q] : -1;
    elists[q] = j >= 0 ? expiry[r * Sk + j] : 0;
}

fdma_status fdma_cuda_window_plan(const fdma_params *p, int64_t tile_m, int want_rows_mask, fdma_cuda_window *w) {
    memset(w, 0, sizeof(*w));
    if (p->window <= 0 || p->window >= p->Sk) return FDMA_STATUS_OK;
    fdma_topk_params *t = &w->t; /* zeroed by the memset above */
    t->device = FDMA_DEVICE_CUDA;
    t->stream = p->stream;
    t->dtype = p->dtype;
    t->Sq = p->Sq;
    t->Sk = p->Sk;
    t->bias = p->bias;
    t->mask = p->mask;
    t->causal = p->causal;
    t->window = p->window;
    const int per_key = p->bias.dim[2] == 1 && (!p->mask.ptr || p->mask.dim[2] == 1);
    const int64_t m0 = p->mask.ptr ? p->mask.dim[0] : 1, m1 = p->mask.ptr ? p->mask.dim[1] : 1;
    if (per_key && p->causal && !want_rows_mask) {
        w->mode = FDMA_WIN_SPARSE;
        fdma_status st = fdma_cuda_sparse_layout(t, tile_m, &w->L);
        if (st != FDMA_STATUS_OK) return st;
        w->off_elists = win_align(w->L.bytes);
        w->bytes = w->off_elists + win_align((size_t)(w->L.R * w->L.ntiles * w->L.cap) * 4);
        return FDMA_STATUS_OK;
    }
    w->mode = FDMA_WIN_MASK;
    w->mdim[0] = p->bias.dim[0] > m0 ? p->bias.dim[0] : m0;
    w->mdim[1] = p->bias.dim[1] > m1 ? p->bias.dim[1] : m1;
    w->mdim[2] = (per_key && !p->causal && !want_rows_mask) ? 1 : p->Sq;
    w->mdim[3] = p->Sk;
    if (w->mdim[0] * w->mdim[1] * w->mdim[2] > 0x7FFFFFFF)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED, "window: the CUDA selection runs at most 2^31 - 1 rows, got "
                              "%lld x %lld x %lld", (long long)w->mdim[0], (long long)w->mdim[1], (long long)w->mdim[2]);
    w->bytes = win_align((size_t)(w->mdim[0] * w->mdim[1] * w->mdim[2] * w->mdim[3]));
    return FDMA_STATUS_OK;
}

void fdma_cuda_window_params(const fdma_cuda_window *w, const fdma_params *p, void *ws, fdma_params *out) {
    *out = *p;
    if (w->mode == FDMA_WIN_NONE) return;
    out->window = 0;
    out->mask_summary = NULL;
    memset(&out->mask, 0, sizeof(out->mask));
    if (w->mode == FDMA_WIN_MASK) {
        out->mask.ptr = ws;
        for (int d = 0; d < 4; d++) out->mask.dim[d] = w->mdim[d];
        win_contiguous(out->mask.stride, w->mdim);
    }
}

/* Run the selection into ws on p->stream; fill *view for SPARSE. */
static fdma_status window_run(const fdma_cuda_window *w, const fdma_params *p, void *ws, fdma_cuda_sparse_view *view) {
    memset(view, 0, sizeof(*view));
    if (w->mode == FDMA_WIN_NONE) return FDMA_STATUS_OK;
    if (((uintptr_t)ws & 255) != 0)
        return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "workspace: expected a 256-byte aligned address, got %p",
                              ws);
    if (w->mode == FDMA_WIN_MASK) {
        fdma_topk_params t = w->t;
        t.out = (uint8_t *)ws;
        for (int d = 0; d < 4; d++) t.out_dim[d] = w->mdim[d];
        win_contiguous(t.out_stride, w->mdim);
        return fdma_cuda_topk_create_mask(&t);
    }
    fdma_status st = fdma_cuda_sparse_build(&w->t, &w->L, ws, w->L.bytes);
    if (st != FDMA_STATUS_OK) return st;
    const char *base = (const char *)ws;
    view->expiry = (const int32_t *)(base + w->L.off_expiry);
    view->counts = (const int32_t *)(base + w->L.off_counts);
    view->lists = (const int32_t *)(base + w->L.off_lists);
    int32_t *elists = (int32_t *)(base + w->off_elists);
    view->elists = elists;
    const int64_t n = w->L.R * w->L.ntiles * w->L.cap;
    fdma_window_elists_kernel<<<(unsigned)((n + 255) / 256), 256, 0, (cudaStream_t)p->stream>>>(
        view->lists, view->counts, view->expiry, elists, w->L.ntiles, w->L.cap, w->L.Sk, n);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        return fdma_set_error(FDMA_STATUS_CUDA_ERROR, "window: expiry of the list entries: %s", cudaGetErrorString(err));
    view->cap = w->L.cap;
    view->ntiles = w->L.ntiles;
    view->rb = w->L.D0 > 1 ? w->L.D1 : 0;
    const int64_t D1 = w->L.D1;
    view->hmul = D1 > 1 ? 1 : 0;
    view->hdiv = (D1 > 1 && D1 != p->H) ? (int)(p->H / D1) : 1;
    return FDMA_STATUS_OK;
}

fdma_status fdma_cuda_window_prepare(const fdma_params *p, int64_t tile_m, int want_rows_mask, fdma_cuda_window *w,
                                     fdma_cuda_sparse_view *view, fdma_params *out) {
    fdma_status st = fdma_cuda_window_plan(p, tile_m, want_rows_mask, w);
    if (st != FDMA_STATUS_OK) return st;
    if (p->workspace_bytes < w->bytes || (w->bytes > 0 && p->workspace == NULL))
        return fdma_set_error(FDMA_STATUS_WORKSPACE_TOO_SMALL, "workspace: the top-k selection needs at least %zu "
                              "bytes, got %zu", w->bytes, p->workspace_bytes);
    if ((st = window_run(w, p, p->workspace, view)) != FDMA_STATUS_OK) return st;
    fdma_cuda_window_params(w, p, p->workspace, out);
    return FDMA_STATUS_OK;
}
