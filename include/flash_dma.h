/*
 * flash_dma.h -- the public C API of flash-dmattn (dynamic-mask attention).
 *
 * What it computes (the contract is SPEC.md; this is the summary):
 *
 *   s[i,j]   = scale * q[b,i,h,:] . k[b,j,hk,:]                hk = h / (H / Hkv)
 *   s[i,j]   = softcap * tanh(s[i,j] / softcap)                if softcap > 0
 *   s[i,j]  += bias[b,h,i,j]                                    if bias
 *   visible  = mask[b,h,i,j] && (j <= i + Sk - Sq if causal) && (j in top-window of row i if window > 0)
 *   lse[i]   = log sum_{visible j} exp(s[i,j])                  (-inf for a row with nothing visible)
 *   out[i,:] = sum_j exp(s[i,j] - lse[i]) * keep[i,j] / (1 - p_drop) * v[b,j,hk,:]
 *
 * Shapes (names used everywhere in this library):
 *   q, out, dout, dq   (B, Sq, H,   D)     last dim contiguous, other strides arbitrary (in elements)
 *   k, v, dk, dv       (B, Sk, Hkv, D)     H % Hkv == 0
 *   mask, bias, dbias  4-D views broadcastable to (B, H, Sq, Sk): dims ({B|1}, {H|Hkv|1}, {Sq|1}, Sk)
 *   lse                (B, H, Sq)          fp32, contiguous
 *   probs              (B, H, Sq, Sk)      dtype of q, contiguous (debug output only)
 *
 * Memory: the caller owns every buffer, the CUDA stream, and the workspace. The library never allocates
 * device memory and never synchronizes; on the CPU backend it may allocate small per-thread rows.
 *
 * Errors: every entry point validates all of its arguments before it computes or writes anything. A non-OK
 * status leaves a message in fdma_last_error() (thread-local) naming the argument, expected and actual.
 * Nothing in the library calls exit() or abort().
 *
 * Usage (CPU, forward only):
 *
 *   fdma_params p;
 *   fdma_params_init(&p);
 *   p.device = FDMA_DEVICE_CPU; p.dtype = FDMA_DTYPE_F32;
 *   p.B = 1; p.Sq = 3; p.Sk = 5; p.H = 2; p.Hkv = 1; p.D = 4;
 *   p.q = q; fdma_strides_contiguous(p.q_stride, p.B, p.Sq, p.H, p.D);  ... likewise k, v, out
 *   p.lse = lse; p.causal = 1;
 *   if (fdma_fwd(&p) != FDMA_STATUS_OK) fprintf(stderr, "%s\n", fdma_last_error());
 *
 * Workspace: call fdma_fwd_workspace_size / fdma_bwd_workspace_size with the filled params, allocate that
 * many bytes on the params' device (CUDA: 256-byte aligned, e.g. from cudaMalloc or torch), set
 * p.workspace / p.workspace_bytes, then call fdma_fwd / fdma_bwd.
 */
#ifndef FLASH_DMA_H
#define FLASH_DMA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define FDMA_API __declspec(dllexport)
#else
#define FDMA_API __attribute__((visibility("default")))
#endif

/* ------------------------------------------------------------------------------------------------------- */
/* Version. The Python loader refuses a shared library whose fdma_version() differs from what it expects.    */

#define FDMA_VERSION_MAJOR 0
#define FDMA_VERSION_MINOR 2
#define FDMA_VERSION_PATCH 0
#define FDMA_VERSION (FDMA_VERSION_MAJOR * 10000 + FDMA_VERSION_MINOR * 100 + FDMA_VERSION_PATCH)

FDMA_API int fdma_version(void);                /* FDMA_VERSION of the library actually loaded */
FDMA_API const char *fdma_version_string(void); /* "0.2.0" */

/* ------------------------------------------------------------------------------------------------------- */
/* Status codes and errors.                                                                                 */

typedef enum fdma_status {
    FDMA_STATUS_OK = 0,
    FDMA_STATUS_INVALID_ARGUMENT = 1,    /* violates SPEC.md (shape, dtype, stride, range): message names it */
    FDMA_STATUS_UNSUPPORTED = 2,         /* valid input that this backend or build cannot run (says which)   */
    FDMA_STATUS_WORKSPACE_TOO_SMALL = 3, /* p->workspace_bytes below what the *_workspace_size call returned  */
    FDMA_STATUS_OUT_OF_MEMORY = 4,       /* a host allocation for CPU scratch rows failed                     */
    FDMA_STATUS_CUDA_ERROR = 5,          /* a CUDA runtime call or launch failed; message has the CUDA text   */
    FDMA_STATUS_INTERNAL = 6,            /* a bug in this library: please report the message                  */
} fdma_status;

FDMA_API const char *fdma_status_string(fdma_status s); /* "FDMA_STATUS_INVALID_ARGUMENT", ... */
FDMA_API const char *fdma_last_error(void);             /* this thread's last message, "" if none */
FDMA_API void fdma_clear_error(void);

/* ------------------------------------------------------------------------------------------------------- */
/* Element types and devices.                                                                               */

typedef enum fdma_dtype {
    FDMA_DTYPE_F32 = 0,  /* CPU backend only */
    FDMA_DTYPE_F16 = 1,
    FDMA_DTYPE_BF16 = 2,
} fdma_dtype;

typedef enum fdma_device {
    FDMA_DEVICE_CPU = 0,
    FDMA_DEVICE_CUDA = 1, /* pointers on the calling thread's current CUDA device; stream is a cudaStream_t */
} fdma_device;

/* A strided 4-D view broadcast to (B, H, Sq, Sk): the mask (uint8/bool elements, nonzero = attend) or the
 * bias (elements of params.dtype). dim = ({B|1}, {H|Hkv|1}, {Sq|1}, Sk); stride in elements, any sign-free
 * value (0 = broadcast); the stride of a dim of size 1 is ignored. ptr == NULL means "absent". */
typedef struct fdma_view4 {
    const void *ptr;
    int64_t dim[4];
    int64_t stride[4];
} fdma_view4;

/* ------------------------------------------------------------------------------------------------------- */
/* The params struct: everything one forward or backward call needs, passed by pointer, never retained.     */

typedef struct fdma_params {
    /* where it runs */
    fdma_device device;
    void *stream;         /* CUDA: cudaStream_t (NULL = legacy default stream). CPU: ignored. */
    fdma_dtype dtype;     /* of q, k, v, out, bias, probs, dout, dq, dk, dv, dbias */

    /* sizes */
    int64_t B, Sq, Sk, H, Hkv, D;

    /* inputs; each stride array is (batch, seq, head, dim) in elements and stride[3] must be 1 */
    const void *q;  int64_t q_stride[4];  /* (B, Sq, H, D)   */
    const void *k;  int64_t k_stride[4];  /* (B, Sk, Hkv, D) */
    const void *v;  int64_t v_stride[4];  /* (B, Sk, Hkv, D) */
    fdma_view4 mask;                      /* optional; uint8 elements                         */
    fdma_view4 bias;                      /* optional; params.dtype elements                  */

    /* options */
    float scale;          /* NaN (fdma_params_init's value) means 1/sqrt(D); any finite value is used as is */
    float softcap;        /* 0 = off; > 0 applies softcap * tanh(s / softcap) before the bias          */
    int32_t causal;       /* bottom-right aligned: key j visible to row i iff j <= i + Sk - Sq          */
    int64_t window;       /* 0 = off; >= 1 keeps per row the top-`window` candidates by (bias, j) (SPEC
                             section 6) and needs a bias. Same selection in forward and backward.         */
    float p_drop;         /* dropout probability in [0, 1); keep bits from Philox4x32-10 (SPEC section 5) */
    uint64_t seed;        /* dropout key */
    uint64_t offset;      /* dropout counter offset (advance by one per call) */
    const uint64_t *rng_state; /* NULL = use seed/offset; else two uint64 {seed, offset} (8-byte aligned) read
                                  by the kernels at run time, in memory on the params' device (CUDA: device
                                  memory; CPU: host memory). A captured CUDA graph then draws new keep bits on
                                  every replay when a captured op (e.g. a graph-safe RNG) refills them first. */
    int32_t deterministic;/* backward: bitwise reproducible dq/dk/dv/dbias (no float atomics) */

    /* forward outputs (written by fdma_fwd; out, lse also read by fdma_bwd) */
    void *out;      int64_t out_stride[4];   /* (B, Sq, H, D) */
    float *lse;                              /* (B, H, Sq) contiguous; optional in forward, required in backward */
    void *probs;                             /* (B, H, Sq, Sk) contiguous; optional, forward only */

    /* backward: input dout, outputs dq, dk, dv, dbias (dbias optional, same dims as bias, own strides) */
    const void *dout; int64_t dout_stride[4];
    void *dq;         int64_t dq_stride[4];
    void *dk;         int64_t dk_stride[4];
    void *dv;         int64_t dv_stride[4];
    void *dbias;      int64_t dbias_stride[4];

    /* optional per-tile mask summary from fdma_mask_summarize (CUDA: lets kernels skip all-False tiles
       without reading the mask twice); NULL = the kernel reads the mask itself */
    const uint8_t *mask_summary;

    /* caller-provided scratch, size from fdma_fwd_workspace_size / fdma_bwd_workspace_size */
    void *workspace;
    size_t workspace_bytes;
} fdma_params;

/* sizeof(fdma_params) in this build: bindings compare it with their own layout before the first call. */
FDMA_API size_t fdma_params_size(void);

/* Zero every field, then: scale = NaN (default 1/sqrt(D)), device CPU, dtype F32. */
FDMA_API void fdma_params_init(fdma_params *p);

/* Fill stride[4] for a contiguous (n0, n1, n2, n3) tensor. */
FDMA_API void fdma_strides_contiguous(int64_t stride[4], int64_t n0, int64_t n1, int64_t n2, int64_t n3);

/* ------------------------------------------------------------------------------------------------------- */
/* Attention.                                                                                               */

FDMA_API fdma_status fdma_fwd_workspace_size(const fdma_params *p, size_t *bytes);
FDMA_API fdma_status fdma_fwd(const fdma_params *p);

/* Backward: reads q, k, v, out, lse, dout (and mask, bias, options exactly as in the forward call);
 * writes dq, dk, dv and, if dbias != NULL, dbias summed over every broadcast dim of the bias. */
FDMA_API fdma_status fdma_bwd_workspace_size(const fdma_params *p, size_t *bytes);
FDMA_API fdma_status fdma_bwd(const fdma_params *p);

/* ------------------------------------------------------------------------------------------------------- */
/* Capability query: the same selector that fdma_fwd / fdma_bwd dispatch through, so "is this supported?"   */
/* and "what runs" cannot disagree. OK: info says which kernel would run. Otherwise the status and message  */
/* are exactly what the call itself would return.                                                           */

typedef enum fdma_op { FDMA_OP_FORWARD = 0, FDMA_OP_BACKWARD = 1 } fdma_op;

typedef struct fdma_kernel_info {
    char name[64];            /* e.g. "cpu_fwd_f32", "cuda_fwd_bf16_d128_dense" */
    size_t workspace_bytes;   /* what *_workspace_size returns */
} fdma_kernel_info;

FDMA_API fdma_status fdma_query(const fdma_params *p, fdma_op op, fdma_kernel_info *info);

/* Is this device usable by this build at all? (CPU: always 1. CUDA: built with CUDA and a device of
 * compute capability >= 8.0 is visible.) */
FDMA_API int fdma_device_available(fdma_device device);

/* ------------------------------------------------------------------------------------------------------- */
/* Mask tile summary (optional, CUDA only): one byte per (64-row x 64-key) tile of the mask, in the mask's    */
/* own (un-broadcast) dims: (dim0, dim1, ceil(dim2 / 64), ceil(Sk / 64)), contiguous. 0 = all False,         */
/* 1 = mixed, 2 = all True. Compute once per mask, reuse across layers that share it.                       */

#define FDMA_SUMMARY_TILE_M 64
#define FDMA_SUMMARY_TILE_N 64
FDMA_API fdma_status fdma_mask_summary_size(const fdma_params *p, size_t *bytes);
FDMA_API fdma_status fdma_mask_summarize(const fdma_params *p, uint8_t *summary, size_t bytes);

/* ------------------------------------------------------------------------------------------------------- */
/* Dynamic top-k window (SPEC section 6): writes the keep mask.                                             */
/*   candidates of row (b, hx, i): keys j with base mask true and (j <= i + Sk - Sq if causal)               */
/*   keep: all candidates if at most `window`, else the `window` largest by (bias, j): ties in bias go to   */
/*   the larger j; NaN is the smallest value.                                                               */
/* out dims must equal (max(bias.dim0, mask.dim0), max(bias.dim1, mask.dim1), R, Sk) where R = Sq if causal */
/* or either input has Sq rows, else 1; a dim where both inputs have size 1 stays 1.                        */

typedef struct fdma_topk_params {
    fdma_device device;
    void *stream;
    fdma_dtype dtype;       /* of bias */
    int64_t Sq, Sk;         /* query and key lengths (Sq matters for causal even when bias has 1 row) */
    fdma_view4 bias;        /* required: ({B|1}, {Hx|1}, {Sq|1}, Sk) */
    fdma_view4 mask;        /* optional base mask, same broadcast rules, uint8 elements */
    int32_t causal;
    int64_t window;         /* >= 1 */
    uint8_t *out;           /* keep mask, 0/1 */
    int64_t out_dim[4];
    int64_t out_stride[4];
} fdma_topk_params;

FDMA_API void fdma_topk_params_init(fdma_topk_params *p);
FDMA_API fdma_status fdma_create_mask(const fdma_topk_params *p);

/* ------------------------------------------------------------------------------------------------------- */
/* Dropout keep bit (SPEC section 5), the same function every backend uses: 1 = kept.                       */

FDMA_API int fdma_dropout_keep(uint64_t seed, uint64_t offset, uint64_t row, uint64_t j, float p_drop);

/* Philox4x32-10 with the given key and counter, for known-answer tests. */
FDMA_API void fdma_philox4x32_10(const uint32_t key[2], const uint32_t counter[4], uint32_t out[4]);

/* ------------------------------------------------------------------------------------------------------- */
/* CPU threads: default = FDMA_NUM_THREADS from the environment, else every online core.                    */

FDMA_API void fdma_set_num_threads(int n); /* n <= 0 restores the default */
FDMA_API int fdma_get_num_threads(void);

#ifdef __cplusplus
}
#endif

#endif /* FLASH_DMA_H */
