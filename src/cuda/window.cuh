/*
 * window.cuh -- the top-k window (SPEC section 6) in the CUDA forward and backward: how the selection runs for
 * one call, how much workspace it takes, and what the attention kernels read from it (window.cu).
 *
 * Modes (fdma_cuda_window_plan):
 *   NONE    window == 0, or window >= Sk (a row never has more than Sk candidates: every one is kept).
 *   SPARSE  causal with a per-key bias ({B|1}, {H|Hkv|1}, 1, Sk) and a per-key base mask or none (the Doge form):
 *           per (b, hx) row r the expiry e[r][j] (key j is kept by query row i iff j <= lim_i < e[r][j],
 *           lim_i = i + Sk - Sq) and, per query tile of tile_m rows, the ascending list of keys kept by any row of
 *           the tile (topk.cuh, topk_sparse.cu). Memory O(R * (Sk + ceil(Sq / tile_m) * (w + tile_m))); no
 *           (Sq, Sk) array. The base mask is inside e (a masked key has e[j] = j: never visible).
 *   MASK    every other case: the keep mask of fdma_create_mask in the workspace, contiguous (D0, D1, R, Sk) bytes
 *           with R = 1 when no input has Sq rows and the call is not causal (the forward then gathers the kept
 *           keys), else R = Sq -- a bias or mask with Sq rows, so the same order of memory as an input the caller
 *           passed -- or a forward that returns the probabilities (themselves (B, H, Sq, Sk)). The attention then
 *           runs the ordinary mask path with that mask in place of the caller's (the selection includes it).
 */
#ifndef FDMA_CUDA_WINDOW_CUH
#define FDMA_CUDA_WINDOW_CUH

#include "backend.h"
#include "topk.cuh"

enum { FDMA_WIN_NONE = 0, FDMA_WIN_SPARSE = 1, FDMA_WIN_MASK = 2 };

typedef struct fdma_cuda_window {
    int mode;                 /* FDMA_WIN_* */
    fdma_topk_params t;       /* the selection's inputs (bias, base mask, causal, window, stream) */
    fdma_sparse_layout L;     /* SPARSE: workspace layout of the expiry and the lists */
    int64_t mdim[4];          /* MASK: keep-mask dims, contiguous */
    size_t off_elists;        /* SPARSE: the lists' expiry (fdma_cuda_sparse_view.elists) after the layout's bytes */
    size_t bytes;             /* workspace taken by the selection (a multiple of 256), placed first */
} fdma_cuda_window;

/* What an attention kernel needs to read the SPARSE selection of (batch b, query head h): row
 * r = b * rb + (h / hdiv) * hmul; e = expiry + r * Sk; the list of query tile t at lists + (r * ntiles + t) * cap,
 * its length counts[r * ntiles + t] (t = 0 for every tile when ntiles == 1); elists has the same layout as lists
 * and holds e of each entry (0 for padding), so that a kernel reads an entry's expiry without the row offset. */
typedef struct fdma_cuda_sparse_view {
    const int32_t *expiry, *counts, *lists, *elists;
    int64_t cap, ntiles, rb;
    int hdiv, hmul;
} fdma_cuda_sparse_view;

/* Decide the mode for p (validated) and size its workspace. tile_m: the query rows per tile of the kernel that
 * reads the SPARSE lists. want_rows_mask: the caller needs MASK mode (e.g. the forward's probabilities). */
fdma_status fdma_cuda_window_plan(const fdma_params *p, int64_t tile_m, int want_rows_mask, fdma_cuda_window *w);

/* The params the attention kernels run with: *out = *p with window 0 and, for MASK, the keep mask at `ws` as the
 * mask (for planning, ws may be any non-NULL address). SPARSE: the mask is cleared (it is inside the expiry). */
void fdma_cuda_window_params(const fdma_cuda_window *w, const fdma_params *p, void *ws, fdma_params *out);

/* For a run: plan, check that p->workspace holds the selection, run the selection into it (w->bytes, 256-byte
 * aligned) on p->stream, and fill *out (the params the attention runs with) and *view (SPARSE); *w says how many
 * workspace bytes the selection took. */
fdma_status fdma_cuda_window_prepare(const fdma_params *p, int64_t tile_m, int want_rows_mask, fdma_cuda_window *w,
                                     fdma_cuda_sparse_view *view, fdma_params *out);

#endif /* FDMA_CUDA_WINDOW_CUH */
