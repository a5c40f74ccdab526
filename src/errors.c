/*
 * errors.c -- status strings, the thread-local last-error message, version numbers, params initialisation,
 * the contiguous-stride helper and the CPU thread-count setting.
 *
 * The last error is one fixed buffer per thread (C11 _Thread_local): fdma_set_error() formats into it and
 * returns the status, so that every failing path reads `return fdma_set_error(STATUS, "q: ...", ...)`.
 * Nothing here allocates, exits or aborts.
 */
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"

static _Thread_local char fdma_error_buf[1024];

fdma_status fdma_set_error(fdma_status status, const char *fmt, ...) {
    /* format into a local buffer first: an argument may be fdma_last_error() itself */
    char msg[sizeof(fdma_error_buf)];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    memcpy(fdma_error_buf, msg, sizeof(msg));
    return status;
}

const char *fdma_last_error(void) { return fdma_error_buf; }

void fdma_clear_error(void) { fdma_error_buf[0] = '\0'; }

const char *fdma_status_string(fdma_status s) {
    switch (s) {
    case FDMA_STATUS_OK: return "FDMA_STATUS_OK";
    case FDMA_STATUS_INVALID_ARGUMENT: return "FDMA_STATUS_INVALID_ARGUMENT";
    case FDMA_STATUS_UNSUPPORTED: return "FDMA_STATUS_UNSUPPORTED";
    case FDMA_STATUS_WORKSPACE_TOO_SMALL: return "FDMA_STATUS_WORKSPACE_TOO_SMALL";
    case FDMA_STATUS_OUT_OF_MEMORY: return "FDMA_STATUS_OUT_OF_MEMORY";
    case FDMA_STATUS_CUDA_ERROR: return "FDMA_STATUS_CUDA_ERROR";
    case FDMA_STATUS_INTERNAL: return "FDMA_STATUS_INTERNAL";
    }
    return "FDMA_STATUS_UNKNOWN";
}

int fdma_version(void) { return FDMA_VERSION; }

#define FDMA_STR2(x) #x
#define FDMA_STR(x) FDMA_STR2(x)
const char *fdma_version_string(void) {
    return FDMA_STR(FDMA_VERSION_MAJOR) "." FDMA_STR(FDMA_VERSION_MINOR) "." FDMA_STR(FDMA_VERSION_PATCH);
}

size_t fdma_params_size(void) { return sizeof(fdma_params); }

void fdma_params_init(fdma_params *p) {
    if (!p) return;
    memset(p, 0, sizeof(*p));
    p->device = FDMA_DEVICE_CPU;
    p->dtype = FDMA_DTYPE_F32;
    p->scale = NAN;
}

void fdma_topk_params_init(fdma_topk_params *p) {
    if (!p) return;
    memset(p, 0, sizeof(*p));
    p->device = FDMA_DEVICE_CPU;
    p->dtype = FDMA_DTYPE_F32;
}

void fdma_strides_contiguous(int64_t stride[4], int64_t n0, int64_t n1, int64_t n2, int64_t n3) {
    (void)n0;
    stride[3] = 1;
    stride[2] = n3;
    stride[1] = n2 * n3;
    stride[0] = n1 * n2 * n3;
}

/* 0 = not set: use FDMA_NUM_THREADS from the environment, else every online core. */
static atomic_int fdma_num_threads_set;

void fdma_set_num_threads(int n) { atomic_store(&fdma_num_threads_set, n > 0 ? n : 0); }

int fdma_get_num_threads(void) {
    int n = atomic_load(&fdma_num_threads_set);
    if (n > 0) return n;
    const char *env = getenv("FDMA_NUM_THREADS");
    if (env && *env) {
        long e = strtol(env, NULL, 10);
        if (e > 0) return e > 1024 ? 1024 : (int)e;
    }
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    return cores > 0 ? (cores > 1024 ? 1024 : (int)cores) : 1;
}
