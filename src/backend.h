/*
 * backend.h -- the internal interface between the C entry points (src/api.c) and the backends
 * (src/cpu/, src/cuda/). Not installed; not part of the public API.
 *
 * Flow of one call (fdma_fwd, fdma_bwd, fdma_query, *_workspace_size):
 *   1. api.c validates the params once (src/validate.c, SPEC section 7). Nothing is computed or written
 *      before validation passes.
 *   2. api.c asks the backend of p->device for a plan: which kernel runs and how much workspace it needs.
 *      The plan function is the ONE selector: it answers fdma_query and drives the run, so "supported?"
 *      and "what runs" cannot disagree. A plan function that cannot run the input returns
 *      FDMA_STATUS_UNSUPPORTED after fdma_set_error() names the option and the backend.
 *   3. api.c checks the workspace against the plan, then calls the backend's run function with the plan.
 *
 * Backends see only validated params: shapes consistent, strides in range, last dims contiguous,
 * scale already resolved (never NaN), mask/bias dims legal for (B, H, Hkv, Sq, Sk).
 */
#ifndef FDMA_BACKEND_H
#define FDMA_BACKEND_H

#include "flash_dma.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct fdma_plan {
    char name[64];           /* copied into fdma_kernel_info.name */
    size_t workspace_bytes;  /* required p->workspace_bytes */
    int32_t variant;         /* backend-private selector result (tile config, dense/gathered, ...) */
    int32_t flags;           /* backend-private */
} fdma_plan;

/* Record a message for fdma_last_error() and return `status` (printf-style). */
fdma_status fdma_set_error(fdma_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Element loads shared by the C backends (fp16 / bf16 <-> fp32, round to nearest even). */
float fdma_half_to_float(uint16_t h);
uint16_t fdma_float_to_half(float f);
float fdma_bf16_to_float(uint16_t h);
uint16_t fdma_float_to_bf16(float f);

/* ---- CPU backend (src/cpu/) ---- */
fdma_status fdma_cpu_fwd_plan(const fdma_params *p, fdma_plan *plan);
fdma_status fdma_cpu_fwd_run(const fdma_params *p, const fdma_plan *plan);
fdma_status fdma_cpu_bwd_plan(const fdma_params *p, fdma_plan *plan);
fdma_status fdma_cpu_bwd_run(const fdma_params *p, const fdma_plan *plan);
fdma_status fdma_cpu_create_mask(const fdma_topk_params *p);

/* ---- CUDA backend (src/cuda/); when the library is built without CUDA, src/cuda_stub.c provides these
 *      and they return FDMA_STATUS_UNSUPPORTED with "built without CUDA". ---- */
int fdma_cuda_available(void);
fdma_status fdma_cuda_check_pointers(const fdma_params *p);       /* every non-NULL pointer on the device */
fdma_status fdma_cuda_fwd_plan(const fdma_params *p, fdma_plan *plan);
fdma_status fdma_cuda_fwd_run(const fdma_params *p, const fdma_plan *plan);
fdma_status fdma_cuda_bwd_plan(const fdma_params *p, fdma_plan *plan);
fdma_status fdma_cuda_bwd_run(const fdma_params *p, const fdma_plan *plan);
fdma_status fdma_cuda_create_mask(const fdma_topk_params *p);
fdma_status fdma_cuda_mask_summarize(const fdma_params *p, uint8_t *summary, size_t bytes);

#ifdef __cplusplus
}
#endif

#endif /* FDMA_BACKEND_H */
