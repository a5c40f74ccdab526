/*
 * api.c -- the public entry points. Each one follows the same four steps (src/backend.h):
 *
 *   1. validate (src/validate.c): nothing is computed or written before every argument passes;
 *   2. CUDA only: fdma_cuda_check_pointers (every pointer is device memory);
 *   3. plan: the backend's one selector says which kernel runs and how much workspace it needs;
 *   4. workspace check, then run.
 *
 * fdma_query and the *_workspace_size functions stop after step 3, so "is it supported?", "how much
 * workspace?" and "what runs" come from the same code as the call itself. (They do not check p->workspace:
 * their job is to say how big it must be.)
 */
#include <string.h>

#include "backend.h"
#include "philox.h"
#include "validate.h"

/* Steps 1-3: validate, check CUDA pointers, plan. `v` receives the validated params (scale resolved). */
static fdma_status prepare(const fdma_params *p, fdma_op op, fdma_params *v, fdma_plan *plan) {
    fdma_status st = fdma_validate_attn(p, op, v);
    if (st != FDMA_STATUS_OK) return st;
    memset(plan, 0, sizeof(*plan));
    if (v->device == FDMA_DEVICE_CUDA) {
        if ((st = fdma_cuda_check_pointers(v)) != FDMA_STATUS_OK) return st;
        return op == FDMA_OP_FORWARD ? fdma_cuda_fwd_plan(v, plan) : fdma_cuda_bwd_plan(v, plan);
    }
    return op == FDMA_OP_FORWARD ? fdma_cpu_fwd_plan(v, plan) : fdma_cpu_bwd_plan(v, plan);
}

static fdma_status run(const fdma_params *p, fdma_op op) {
    fdma_params v;
    fdma_plan plan;
    fdma_status st = prepare(p, op, &v, &plan);
    if (st != FDMA_STATUS_OK) return st;
    if (plan.workspace_bytes > 0) {
        if (v.workspace_bytes < plan.workspace_bytes)
            return fdma_set_error(FDMA_STATUS_WORKSPACE_TOO_SMALL,
                                  "workspace_bytes: kernel %s needs %zu bytes, got %zu (ask "
                                  "fdma_%s_workspace_size)",
                                  plan.name, plan.workspace_bytes, v.workspace_bytes,
                                  op == FDMA_OP_FORWARD ? "fwd" : "bwd");
        if (!v.workspace)
            return fdma_set_error(FDMA_STATUS_WORKSPACE_TOO_SMALL,
                                  "workspace: NULL, but kernel %s needs %zu bytes", plan.name, plan.workspace_bytes);
    }
    if (v.device == FDMA_DEVICE_CUDA)
        return op == FDMA_OP_FORWARD ? fdma_cuda_fwd_run(&v, &plan) : fdma_cuda_bwd_run(&v, &plan);
    return op == FDMA_OP_FORWARD ? fdma_cpu_fwd_run(&v, &plan) : fdma_cpu_bwd_run(&v, &plan);
}

fdma_status fdma_fwd(const fdma_params *p) { return run(p, FDMA_OP_FORWARD); }

fdma_status fdma_bwd(const fdma_params *p) { return run(p, FDMA_OP_BACKWARD); }

static fdma_status workspace_size(const fdma_params *p, fdma_op op, size_t *bytes) {
    if (!bytes) return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "bytes: output pointer is NULL");
    fdma_params v;
    fdma_plan plan;
    fdma_status st = prepare(p, op, &v, &plan);
    if (st != FDMA_STATUS_OK) return st;
    *bytes = plan.workspace_bytes;
    return FDMA_STATUS_OK;
}

fdma_status fdma_fwd_workspace_size(const fdma_params *p, size_t *bytes) {
    return workspace_size(p, FDMA_OP_FORWARD, bytes);
}

fdma_status fdma_bwd_workspace_size(const fdma_params *p, size_t *bytes) {
    return workspace_size(p, FDMA_OP_BACKWARD, bytes);
}

fdma_status fdma_query(const fdma_params *p, fdma_op op, fdma_kernel_info *info) {
    if (!info) return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "info: output pointer is NULL");
    if (op != FDMA_OP_FORWARD && op != FDMA_OP_BACKWARD)
        return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT,
                              "op: expected FDMA_OP_FORWARD (0) or FDMA_OP_BACKWARD (1), got %d", (int)op);
    fdma_params v;
    fdma_plan plan;
    fdma_status st = prepare(p, op, &v, &plan);
    if (st != FDMA_STATUS_OK) return st;
    memset(info, 0, sizeof(*info));
    memcpy(info->name, plan.name, sizeof(info->name));
    info->name[sizeof(info->name) - 1] = '\0';
    info->workspace_bytes = plan.workspace_bytes;
    return FDMA_STATUS_OK;
}

int fdma_device_available(fdma_device device) {
    if (device == FDMA_DEVICE_CPU) return 1;
    if (device == FDMA_DEVICE_CUDA) return fdma_cuda_available();
    return 0;
}

/* Mask summary: (dim0, dim1, ceil(dim2 / 64), ceil(Sk / 64)) bytes of the mask's own dims. */
static size_t summary_bytes(const fdma_params *p) {
    const int64_t tm = FDMA_SUMMARY_TILE_M, tn = FDMA_SUMMARY_TILE_N;
    return (size_t)(p->mask.dim[0] * p->mask.dim[1] * ((p->mask.dim[2] + tm - 1) / tm) * ((p->Sk + tn - 1) / tn));
}

fdma_status fdma_mask_summary_size(const fdma_params *p, size_t *bytes) {
    if (!bytes) return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "bytes: output pointer is NULL");
    fdma_status st = fdma_validate_mask_summary(p);
    if (st != FDMA_STATUS_OK) return st;
    *bytes = summary_bytes(p);
    return FDMA_STATUS_OK;
}

fdma_status fdma_mask_summarize(const fdma_params *p, uint8_t *summary, size_t bytes) {
    fdma_status st = fdma_validate_mask_summary(p);
    if (st != FDMA_STATUS_OK) return st;
    if (!summary) return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "summary: output pointer is NULL");
    if (bytes < summary_bytes(p))
        return fdma_set_error(FDMA_STATUS_INVALID_ARGUMENT, "bytes: summary needs %zu bytes, got %zu",
                              summary_bytes(p), bytes);
    if (p->device != FDMA_DEVICE_CUDA)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED,
                              "device: the mask summary is a CUDA-only optimisation; the CPU backend reads the "
                              "mask directly and needs none");
    return fdma_cuda_mask_summarize(p, summary, bytes);
}

fdma_status fdma_create_mask(const fdma_topk_params *p) {
    fdma_status st = fdma_validate_topk(p);
    if (st != FDMA_STATUS_OK) return st;
    return p->device == FDMA_DEVICE_CUDA ? fdma_cuda_create_mask(p) : fdma_cpu_create_mask(p);
}

int fdma_dropout_keep(uint64_t seed, uint64_t offset, uint64_t row, uint64_t j, float p_drop) {
    return fdma_dropout_keep_bit(seed, offset, row, j, fdma_dropout_threshold(p_drop));
}

void fdma_philox4x32_10(const uint32_t key[2], const uint32_t counter[4], uint32_t out[4]) {
    fdma_philox(key, counter, out);
}
