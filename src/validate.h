/*
 * validate.h -- argument validation shared by the C entry points (src/api.c). Internal, not installed.
 * Each function checks everything SPEC section 7 asks of its call and, on failure, leaves a message naming
 * the argument (expected and actual) via fdma_set_error() and returns the status. Nothing is written.
 */
#ifndef FDMA_VALIDATE_H
#define FDMA_VALIDATE_H

#include "flash_dma.h"

/* Validate p for `op` (forward or backward). On success *resolved is a copy of *p with scale resolved
 * (1/sqrt(D) when p->scale is NaN). The workspace is not checked here (api.c does it after the plan). */
fdma_status fdma_validate_attn(const fdma_params *p, fdma_op op, fdma_params *resolved);

/* Validate the sizes and the (required) mask of p for the mask summary. */
fdma_status fdma_validate_mask_summary(const fdma_params *p);

/* Validate fdma_create_mask's params, including out_dim against the dims SPEC section 6 implies. */
fdma_status fdma_validate_topk(const fdma_topk_params *p);

#endif /* FDMA_VALIDATE_H */
