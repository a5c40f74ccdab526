/*
 * topk.cu -- SPEC section 6 keep mask on the GPU (fdma_cuda_topk_create_mask), and the per-row select kernel
 * that topk_sparse.cu reuses for the non-causal expiry.
 *
 * Algorithm: one thread block per output row (b, hx, i) of the mask (out dims (D0, D1, R, Sk)). The block maps
 * each key j < n (n = lim_i + 1 = i + Sk - Sq + 1 clamped to [0, Sk] when causal, else Sk) to its 16-bit code
 * (fdma_topk_ord; 0 where the base mask is false), radix-selects the threshold (T, jT) of the `window`-th
 * largest (code, j) (fdma_topk_select in topk.cuh; codes cached in shared memory when the row fits, else
 * re-read from global memory/L2, with the ties of the threshold's high byte kept in a shared list so that the
 * index passes do not re-read the row), then writes 0/1 for every j < Sk (8 bytes per store when the
 * output row is contiguous). Block size by Sk: 32 threads (a warp per row) up to 256 keys, 128 up to 2048,
 * 512 up to 16384, 1024 above.
 *
 * Shapes: bias ({B|1}, {Hx|1}, {Sq|1}, Sk) fp16/bf16 through its strides; mask the same, uint8; out (D0, D1,
 * R, Sk) uint8 through out_stride, R = Sq or 1 (src/validate.c checks the dims). Head mapping: an input with
 * dim1 == 1 broadcasts, else head hx reads hx / (D1 / dim1).
 *
 * Build: nvcc -c -arch=sm_90 -Iinclude -Isrc src/cuda/topk.cu
 */
#include <string.h>

#include <cuda_runtime.h>

#include "topk.cuh"

#define FDMA_TOPK_CACHE_MAX_BYTES (160 * 1024)
#define FDMA_TOPK_LIST_CAP 16384  /* 80 KB of shared memory for rows longer than the cache */

typedef struct fdma_topk_kargs {
    const uint16_t *bias; int64_t bdim[4]; int64_t bstr[4];
    const uint8_t *mask;  int64_t mdim[4]; int64_t mstr[4];
    int is_bf16;
    int64_t Sq, Sk, window;
    int causal;
    int64_t odim[3];      /* rows enumerated as (D0, D1, R) */
    uint8_t *out; int64_t ostr[4];   /* mode 0: keep mask */
    int32_t *expiry;                 /* mode 1: e[row * Sk + j] = kept ? Sk : j */
    int use_cache;
    uint32_t list_cap;    /* entries of the shared-memory tie list when there is no cache */
} fdma_topk_kargs;

static __device__ __forceinline__ int64_t fdma_topk_off(const int64_t dim[4], const int64_t str[4], int64_t D1,
                                                        int64_t b, int64_t hx, int64_t i)
{
    const int64_t bb = dim[0] == 1 ? 0 : b;
    const int64_t bh = dim[1] == 1 ? 0 : (int64_t)((uint32_t)hx / ((uint32_t)D1 / (uint32_t)dim[1]));
    const int64_t bi = dim[2] == 1 ? 0 : i;
    return bb * str[0] + bh * str[1] + bi * str[2];
}

template <int NT, int MODE>
__global__ void __launch_bounds__(NT, 1) fdma_topk_rows_kernel(const fdma_topk_kargs a)
{
    extern __shared__ __align__(16) uint16_t fdma_topk_cache[];
    __shared__ fdma_topk_smem s;
    const int64_t nrows = a.odim[0] * a.odim[1] * a.odim[2];
    uint16_t *cache = a.use_cache ? fdma_topk_cache : NULL;
    fdma_topk_list lst;
    lst.cap = a.use_cache ? 0u : a.list_cap;
    lst.j = reinterpret_cast<uint32_t *>(fdma_topk_cache);
    lst.lo = reinterpret_cast<uint8_t *>(lst.j + lst.cap);

    for (int64_t row = blockIdx.x; row < nrows; row += gridDim.x) {  /* one iteration: grid = nrows */
        const uint32_t rr = (uint32_t)row, n2 = (uint32_t)a.odim[2], n1 = (uint32_t)a.odim[1];
        const int64_t i = rr % n2;
        const int64_t hx = (rr / n2) % n1;
        const int64_t b = rr / n2 / n1;
        fdma_topk_row r;
        r.bias = a.bias + fdma_topk_off(a.bdim, a.bstr, a.odim[1], b, hx, i);
        r.bs = a.bstr[3];
        r.mask = a.mask ? a.mask + fdma_topk_off(a.mdim, a.mstr, a.odim[1], b, hx, i) : NULL;
        r.ms = a.mstr[3];
        r.is_bf16 = a.is_bf16;
        int64_t n = a.Sk;
        if (a.causal) {
            const int64_t lim = i + a.Sk - a.Sq;
            n = lim < 0 ? 0 : (lim + 1 < a.Sk ? lim + 1 : a.Sk);
        }
        fdma_topk_select<NT>(r, n, a.window, cache, s, lst);

        const int64_t nch_n = (n + 7) / 8;
        const int64_t nch = (a.Sk + 7) / 8;
        for (int64_t c = threadIdx.x; c < nch; c += NT) {
            uint32_t k[8];
            if (c < nch_n) {
                fdma_topk_chunk(r, n, cache, c, k);
            } else {
#pragma unroll
                for (int q = 0; q < 8; q++) k[q] = 0;
            }
            const int64_t j0 = 8 * c;
            if (MODE == 0) {
                uint8_t *o = a.out + b * a.ostr[0] + hx * a.ostr[1] + i * a.ostr[2];
                uint32_t lo = 0, hi = 0;
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    lo |= (uint32_t)fdma_topk_kept(s, k[q], j0 + q) << (8 * q);
                    hi |= (uint32_t)fdma_topk_kept(s, k[4 + q], j0 + 4 + q) << (8 * q);
                }
                if (a.ostr[3] == 1 && j0 + 8 <= a.Sk && ((uintptr_t)(o + j0) & 7) == 0) {
                    *reinterpret_cast<uint2 *>(o + j0) = make_uint2(lo, hi);
                } else {
#pragma unroll
                    for (int q = 0; q < 8; q++)
                        if (j0 + q < a.Sk)
                            o[(j0 + q) * a.ostr[3]] = (uint8_t)(((q < 4 ? lo : hi) >> (8 * (q & 3))) & 1u);
                }
            } else {
                int32_t *e = a.expiry + row * a.Sk;
#pragma unroll
                for (int q = 0; q < 8; q++)
                    if (j0 + q < a.Sk)
                        e[j0 + q] = fdma_topk_kept(s, k[q], j0 + q) ? (int32_t)a.Sk : (int32_t)(j0 + q);
            }
        }
        __syncthreads();
    }
}

template <int NT, int MODE>
static cudaError_t fdma_topk_launch_nt(const fdma_topk_kargs &a, int64_t nrows, cudaStream_t st)
{
    size_t smem = (size_t)a.list_cap * 5;
    if (a.use_cache) smem = (size_t)((a.Sk + 7) / 8) * 16;
    if (smem > 48 * 1024) {
        cudaError_t err = cudaFuncSetAttribute(fdma_topk_rows_kernel<NT, MODE>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (err != cudaSuccess) return err;
    }
    fdma_topk_rows_kernel<NT, MODE><<<(unsigned)nrows, NT, smem, st>>>(a);
    return cudaGetLastError();
}

/* Launch the row kernel for nrows = odim[0]*odim[1]*odim[2] rows; chooses the block size and the cache. */
template <int MODE>
static cudaError_t fdma_topk_launch(fdma_topk_kargs a, cudaStream_t st)
{
    const int64_t nrows = a.odim[0] * a.odim[1] * a.odim[2];
    if (nrows == 0 || a.Sk == 0) return cudaSuccess;
    if (nrows > 0x7FFFFFFF) return cudaErrorInvalidValue;
    a.use_cache = ((a.Sk + 7) / 8) * 16 <= FDMA_TOPK_CACHE_MAX_BYTES;
    a.list_cap = a.use_cache ? 0u : FDMA_TOPK_LIST_CAP;
    if (a.Sk <= 256) { a.use_cache = 0; a.list_cap = 0; return fdma_topk_launch_nt<32, MODE>(a, nrows, st); }
    if (a.Sk <= 2048) return fdma_topk_launch_nt<128, MODE>(a, nrows, st);
    if (a.Sk <= 16384) return fdma_topk_launch_nt<512, MODE>(a, nrows, st);
    return fdma_topk_launch_nt<1024, MODE>(a, nrows, st);
}

static void fdma_topk_fill_args(const fdma_topk_params *p, fdma_topk_kargs *a)
{
    memset(a, 0, sizeof(*a));
    a->bias = (const uint16_t *)p->bias.ptr;
    a->mask = (const uint8_t *)p->mask.ptr;
    for (int d = 0; d < 4; d++) {
        a->bdim[d] = p->bias.dim[d];
        a->bstr[d] = p->bias.stride[d];
        a->mdim[d] = p->mask.ptr ? p->mask.dim[d] : 1;
        a->mstr[d] = p->mask.ptr ? p->mask.stride[d] : 0;
    }
    a->is_bf16 = p->dtype == FDMA_DTYPE_BF16;
    a->Sq = p->Sq;
    a->Sk = p->Sk;
    a->window = p->window;
    a->causal = p->causal != 0;
}

extern "C" fdma_status fdma_cuda_topk_create_mask(const fdma_topk_params *p)
{
    if (p->dtype != FDMA_DTYPE_F16 && p->dtype != FDMA_DTYPE_BF16)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED, "create_mask: CUDA bias dtype must be F16 or BF16, got %d",
                              (int)p->dtype);
    if (p->out_dim[0] * p->out_dim[1] * p->out_dim[2] > 0x7FFFFFFF)
        return fdma_set_error(FDMA_STATUS_UNSUPPORTED,
                              "create_mask: CUDA supports out_dim[0] * out_dim[1] * out_dim[2] < 2^31 rows, got %lld",
                              (long long)(p->out_dim[0] * p->out_dim[1] * p->out_dim[2]));
    fdma_topk_kargs a;
    fdma_topk_fill_args(p, &a);
    a.odim[0] = p->out_dim[0];
    a.odim[1] = p->out_dim[1];
    a.odim[2] = p->out_dim[2];
    a.out = p->out;
    for (int d = 0; d < 4; d++) a.ostr[d] = p->out_stride[d];
    const cudaError_t err = fdma_topk_launch<0>(a, (cudaStream_t)p->stream);
    if (err != cudaSuccess)
        return fdma_set_error(FDMA_STATUS_CUDA_ERROR, "create_mask: CUDA top-k kernel: %s", cudaGetErrorString(err));
    return FDMA_STATUS_OK;
}

/* Non-causal per-key expiry: e[r * Sk + j] = Sk if j is among the kept keys of row r = b * D1 + hx, else j. */
extern "C" cudaError_t fdma_cuda_topk_expiry_noncausal(const fdma_topk_params *p, int64_t D0, int64_t D1,
                                                       int32_t *expiry)
{
    fdma_topk_kargs a;
    fdma_topk_fill_args(p, &a);
    a.causal = 0;
    a.odim[0] = D0;
    a.odim[1] = D1;
    a.odim[2] = 1;
    a.expiry = expiry;
    return fdma_topk_launch<1>(a, (cudaStream_t)p->stream);
}
