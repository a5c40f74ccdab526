"""
flash_dmattn_triton.py -- the Triton backend: `triton_dmattn_func`, forward and backward, computing SPEC.md
exactly (scale, softcap, bias, bool mask, bottom-right causal, GQA, Philox dropout, top-k window).

Shapes: query (B, Sq, H, D); key, value (B, Sk, Hkv, D), H % Hkv == 0, D <= 256 (padded in-kernel to a power
of two >= 16 with masked loads); attn_mask / attn_bias 4-D views with dims ({B|1}, {H|Hkv|1}, {Sq|1}, Sk) read
through their strides (never expanded); out (B, Sq, H, D) in query's dtype; lse (B, H, Sq) fp32.
dtypes: fp16 and bf16; fp32 too (dots in IEEE fp32, not TF32). CUDA tensors, or CPU tensors when Triton runs
in its interpreter (TRITON_INTERPRET=1 set before import; that is how the CPU tests run).

Layers, top to bottom:
  triton_dmattn_func     validates, normalises mask/bias (flash_dmattn._inputs.prepare_mask_bias), selects
                         the top-k keep mask with flash_dmattn.utils.mask.create_mask (SPEC section 6) and
                         passes it as the mask, draws the dropout (seed, offset) (flash_dmattn._ops.draw_rng:
                         host values, or under CUDA-graph capture an int64[2] CUDA tensor that every replay
                         redraws; the kernels read the pair from device memory either way).
  _TritonDMAttnFunction  torch.autograd.Function: saves q, k, v, out in fp32 (so that the backward's
                         delta = dout . out carries no fp16/bf16 rounding error; memory: 4 bytes per output
                         element), lse and the views; backward returns dq, dk, dv (dk, dv summed over each
                         GQA group) and dbias in the bias's own shape.
  attention_forward / attention_backward / attention_probs / dropout_keep_bits
                         kernel-level functions on already normalised 4-D views, with optional caller-owned
                         output buffers (the tests poison them with NaN).
The backward never uses atomics: dk/dv, dq and dbias each come from their own kernel with a fixed summation
order, so `deterministic=True` holds for every call (bitwise identical gradients run to run).
"""
import contextlib
import math

import torch

from ._inputs import check_qkv, prepare_mask_bias
from .utils.mask import create_mask

try:
    import triton
    from . import _triton_kernels as _k
    _TRITON_IMPORT_ERROR = None
except ImportError as exc:
    triton = None
    _k = None
    _TRITON_IMPORT_ERROR = exc

__all__ = ["triton_dmattn_func", "attention_forward", "attention_backward", "attention_probs",
           "dropout_keep_bits"]

_MAX_D = 256
_INTERPRETER_BLOCK = 32      # tile size in the interpreter: large tiles mean fewer (slow, sequential) programs


def _interpreting():
    return _k._interpreting()


def _config(D, dtype, backward=False):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for head dim D. Picked so that ptxas (sm90) keeps
    each kernel within 255 registers per thread with no or small spills; not autotuned, so the summation
    order, and with it every result, is fixed for a given (D, dtype). fp32 uses IEEE (non tensor-core) dots,
    hence smaller tiles."""
    BD = max(16, triton.next_power_of_2(D))
    if _interpreting():
        return _INTERPRETER_BLOCK, _INTERPRETER_BLOCK, BD, 1, 1
    if dtype == torch.float32:
        return (32, 32, BD, 4, 2) if BD <= 64 else (32, 32, BD, 8, 2) if BD <= 128 else (32, 16, BD, 8, 2)
    if backward:
        return (32, 64, BD, 8, 2) if BD <= 128 else (32, 32, BD, 8, 2)
    return (128, 64, BD, 8, 2) if BD <= 64 else (64, 64, BD, 8, 2) if BD <= 128 else (64, 32, BD, 8, 2)


def _dot_mode(dtype):
    """_triton_kernels._mm mode: 1 for fp32 (IEEE), 2 for bf16 in the interpreter (widened), else 0."""
    if dtype == torch.float32:
        return 1
    return 2 if dtype == torch.bfloat16 and _interpreting() else 0


def _strides4(x):
    return tuple(int(s) for s in x.stride())


def _view_args(x, q, B, H, Hkv, Sq, Sk, name):
    """(tensor, s_b, s_h, s_q, s_k, hdiv) for a 4-D mask/bias view; a size-1 dim gets stride 0."""
    if x is None:
        return q, 0, 0, 0, 0, 1
    b0, h0, q0, k0 = x.shape
    if b0 not in (1, B) or h0 not in (1, H, Hkv) or q0 not in (1, Sq) or k0 != Sk:
        raise ValueError(f"{name}: shape {tuple(x.shape)} does not broadcast as ({{B|1}}, {{H|Hkv|1}}, "
                         f"{{Sq|1}}, Sk) = ({{{B}|1}}, {{{H}|{Hkv}|1}}, {{{Sq}|1}}, {Sk})")
    st = [0 if n == 1 else s for n, s in zip(x.shape, x.stride())]
    hdiv = 1 if h0 in (1, H) else H // Hkv
    return x, st[0], st[1], st[2], st[3], hdiv


def _signed64(x):
    x &= 0xFFFFFFFFFFFFFFFF
    return x - (1 << 64) if x >= (1 << 63) else x


def _drop_tensor(dropout_p, seed, offset, device, rng_state=None):
    """int64[3] (seed, offset, threshold = floor(float32(p) * 2^32)) on the device (SPEC section 5); seed and
    offset are uint64 values stored as their int64 bit patterns. With rng_state (an int64[2] (seed, offset)
    tensor on the device) the pair is copied from there by device ops, which a CUDA graph captures: every
    replay then uses the pair that its own captured RNG op wrote into rng_state."""
    t = int(math.floor(float(torch.tensor(dropout_p, dtype=torch.float32).item()) * 2.0**32))
    if rng_state is not None:
        thr = torch.full((1,), t, dtype=torch.int64, device=device)
        return torch.cat((rng_state.to(device=device, dtype=torch.int64).reshape(2), thr))
    return torch.tensor([_signed64(seed), _signed64(offset), t], dtype=torch.int64, device=device)


def _device_of(t):
    """Launch on t's GPU (Triton launches on the current device); nothing to do for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def attention_forward(q, k, v, mask=None, bias=None, scale=None, causal=False, softcap=0.0,
                      dropout_p=0.0, seed=0, offset=0, out=None, lse=None, out_f32=None, rng_state=None):
    """Forward on normalised inputs: q (B, Sq, H, D), k/v (B, Sk, Hkv, D), mask a bool 4-D view or None,
    bias a 4-D view of q's dtype or None. Writes out (B, Sq, H, D) and lse (B, H, Sq) fp32 (allocated when
    None) and returns (out, lse). With out_f32 (a contiguous fp32 (B, Sq, H, D) tensor) it also writes out
    before rounding there: attention_backward's `out` should be that tensor (exact delta = dout . out).
    Dropout's pair is (seed, offset), or the int64[2] tensor rng_state on q's device when given."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    m = _view_args(None if mask is None else mask.view(torch.uint8), q, B, H, Hkv, Sq, Sk, "attn_mask")
    bi = _view_args(bias, q, B, H, Hkv, Sq, Sk, "attn_bias")
    drop = _drop_tensor(dropout_p, seed, offset, q.device, rng_state) if dropout_p > 0 else lse
    BM, BN, BD, warps, stages = _config(D, q.dtype)
    if out_f32 is not None and (out_f32.shape != q.shape or out_f32.dtype != torch.float32
                                or not out_f32.is_contiguous()):
        raise ValueError(f"out_f32: expected a contiguous float32 tensor of shape {tuple(q.shape)}, got "
                         f"{out_f32.dtype} {tuple(out_f32.shape)} strides {out_f32.stride()}")
    with _device_of(q):
        _k._fwd_kernel[(triton.cdiv(Sq, BM) * B * H,)](
            q, k, v, out, lse, m[0], bi[0], drop, lse if out_f32 is None else out_f32,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(out),
            *m[1:], *bi[1:],
            H, H // Hkv, Sq, Sk, D, scale, float(softcap or 0.0), 1.0 / (1.0 - dropout_p),
            HAS_MASK=mask is not None, HAS_BIAS=bias is not None, IS_CAUSAL=bool(causal),
            HAS_SOFTCAP=bool(softcap and softcap > 0), HAS_DROPOUT=dropout_p > 0, DOT=_dot_mode(q.dtype),
            STORE_F32=out_f32 is not None, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_warps=warps, num_stages=stages)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, mask=None, bias=None, scale=None, causal=False, softcap=0.0,
                       dropout_p=0.0, seed=0, offset=0, need_dbias=True, dq=None, dk=None, dv=None, dbias=None,
                       rng_state=None):
    """Backward (SPEC section 4) on the forward's normalised inputs and its out (preferably the fp32 out_f32 of
    attention_forward; the rounded out works with a little more error), lse. Returns (dq, dk, dv, dbias);
    dbias has bias's shape and dtype (None without a bias or with need_dbias=False). Dropout's pair as in
    attention_forward."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    m = _view_args(None if mask is None else mask.view(torch.uint8), q, B, H, Hkv, Sq, Sk, "attn_mask")
    bi = _view_args(bias, q, B, H, Hkv, Sq, Sk, "attn_bias")
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    drop = _drop_tensor(dropout_p, seed, offset, q.device, rng_state) if dropout_p > 0 else delta
    softcap = float(softcap or 0.0)
    flags = dict(HAS_MASK=mask is not None, IS_CAUSAL=bool(causal), HAS_SOFTCAP=softcap > 0,
                 HAS_DROPOUT=dropout_p > 0, DOT=_dot_mode(q.dtype))
    drop_scale = 1.0 / (1.0 - dropout_p)
    BM, BN, BD, warps, stages = _config(D, q.dtype, backward=True)
    launch = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_warps=warps, num_stages=stages)
    with_dbias = bias is not None and need_dbias
    if with_dbias and dbias is None:
        dbias = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)
    with _device_of(q):
        _k._delta_kernel[(triton.cdiv(Sq, BM) * B * H,)](
            out, dout, delta, *_strides4(out), *_strides4(dout), H, Sq, D,
            BLOCK_M=BM, BLOCK_D=BD, num_warps=warps)
        _k._dkdv_kernel[(triton.cdiv(Sk, BN) * B * Hkv,)](
            q, k, v, dout, lse, delta, dk, dv, m[0], bi[0], drop,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(dout), *_strides4(dk), *_strides4(dv),
            *m[1:], *bi[1:], H, Hkv, G, Sq, Sk, D, scale, softcap, drop_scale,
            HAS_BIAS=bias is not None, **flags, **launch)
        _k._dq_kernel[(triton.cdiv(Sq, BM) * B * H,)](
            q, k, v, dout, lse, delta, dq, m[0], bi[0], drop,
            *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(dout), *_strides4(dq),
            *m[1:], *bi[1:], H, G, Sq, Sk, D, scale, softcap, drop_scale,
            HAS_BIAS=bias is not None, **flags, **launch)
        if with_dbias:
            Bb, Hb, Qb, _ = bias.shape
            reduce_q = Qb == 1
            n_m = 1 if reduce_q else triton.cdiv(Sq, BM)
            _k._dbias_kernel[(triton.cdiv(Sk, BN) * n_m * Bb * Hb,)](
                q, k, v, dout, lse, delta, dbias, m[0], bi[0], drop,
                *_strides4(q), *_strides4(k), *_strides4(v), *_strides4(dout), *_strides4(dbias),
                *m[1:], *bi[1:], B, H, G, Sq, Sk, D, Bb, Hb, scale, softcap, drop_scale,
                REDUCE_Q=reduce_q, **flags, **launch)
    return dq, dk, dv, (dbias if with_dbias else None)


def attention_probs(q, k, lse, mask=None, bias=None, scale=None, causal=False, softcap=0.0, probs=None):
    """p = exp(s - lse) at visible entries (before dropout) as (B, H, Sq, Sk) in q's dtype (debug only)."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if probs is None:
        probs = torch.empty((B, H, Sq, Sk), dtype=q.dtype, device=q.device)
    m = _view_args(None if mask is None else mask.view(torch.uint8), q, B, H, Hkv, Sq, Sk, "attn_mask")
    bi = _view_args(bias, q, B, H, Hkv, Sq, Sk, "attn_bias")
    BM, BN, BD, warps, stages = _config(D, q.dtype)
    with _device_of(q):
        _k._probs_kernel[(triton.cdiv(Sk, BN) * triton.cdiv(Sq, BM) * B * H,)](
            q, k, lse, probs, m[0], bi[0], *_strides4(q), *_strides4(k), *m[1:], *bi[1:],
            H, H // Hkv, Sq, Sk, D, scale, float(softcap or 0.0),
            HAS_MASK=mask is not None, HAS_BIAS=bias is not None, IS_CAUSAL=bool(causal),
            HAS_SOFTCAP=bool(softcap and softcap > 0), DOT=_dot_mode(q.dtype),
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_warps=warps)
    return probs


def dropout_keep_bits(B, H, Sq, Sk, dropout_p, seed, offset, device="cuda", rng_state=None):
    """The keep bits z[b, h, i, j] the kernels use, as a (B, H, Sq, Sk) bool tensor (for tests)."""
    z = torch.empty((B, H, Sq, Sk), dtype=torch.uint8, device=device)
    drop = _drop_tensor(dropout_p, seed, offset, device, rng_state)
    BM, BN = 16, 16
    with _device_of(z):
        _k._keep_kernel[(triton.cdiv(B * H * Sq, BM) * triton.cdiv(Sk, BN),)](
            z, drop, B * H * Sq, Sk, BLOCK_M=BM, BLOCK_N=BN)
    return z.bool()


# ---------------------------------------------------------------------------------------------------------
# Autograd and the public function.

class _TritonDMAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, bias, scale, causal, softcap, dropout_p, seed, offset, rng_state):
        grads = any(ctx.needs_input_grad[:5])
        out32 = torch.empty(q.shape, dtype=torch.float32, device=q.device) if grads else None
        out, lse = attention_forward(q, k, v, mask, bias, scale, causal, softcap, dropout_p, seed, offset,
                                     out_f32=out32, rng_state=rng_state)
        ctx.save_for_backward(q, k, v, out32, lse, mask, bias, rng_state)
        ctx.args = (scale, causal, softcap, dropout_p, seed, offset)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask, bias, rng_state = ctx.saved_tensors
        scale, causal, softcap, dropout_p, seed, offset = ctx.args
        dq, dk, dv, dbias = attention_backward(dout, q, k, v, out, lse, mask, bias, scale, causal, softcap,
                                               dropout_p, seed, offset, need_dbias=ctx.needs_input_grad[4],
                                               rng_state=rng_state)
        return dq, dk, dv, None, dbias, None, None, None, None, None, None, None


def _check_qkv(query, key, value):
    """The shared q/k/v checks (_inputs.check_qkv), then this backend's limits: D <= 256, CUDA tensors (CPU
    tensors only under the interpreter)."""
    D = check_qkv(query, key, value)[3]
    if D > _MAX_D:
        raise ValueError(f"query: head dim D={D} exceeds the Triton backend's maximum {_MAX_D}")
    if _interpreting():
        if query.device.type != "cpu":
            raise ValueError(f"query: the Triton interpreter (TRITON_INTERPRET=1) needs CPU tensors, got {query.device}")
    elif query.device.type != "cuda":
        raise ValueError(f"query: the Triton backend needs CUDA tensors, got device {query.device}")


def _draw_rng(device):
    """(seed, offset, rng_state or None) for one dropout call from torch's default generator of `device`
    (SPEC section 5; under CUDA-graph capture rng_state is a CUDA tensor redrawn by every replay)."""
    from . import _ops
    return _ops.draw_rng(device)


def triton_dmattn_func(query, key, value, attn_mask=None, attn_bias=None, scale=None, is_causal=None,
                       softcap=None, deterministic=None, return_attn_probs=None, dropout_p=0.0,
                       keep_window_size=None):
    """Dynamic-mask attention with Triton kernels (SPEC.md).

    query (B, Sq, H, D); key, value (B, Sk, Hkv, D); attn_mask (bool/float/int, nonzero = attend) and
    attn_bias (query's dtype) broadcastable as ({B|1}, {H|Hkv|1}, {Sq|1}, Sk) (also 3-D (B, Hx, Sk) and 2-D
    (B, Sk)); is_causal is bottom-right aligned; softcap > 0 caps scores with softcap * tanh(s / softcap);
    dropout_p in [0, 1) uses the SPEC section 5 Philox stream (seed from torch's generator);
    keep_window_size keeps, per query row, the top-k keys by bias among the visible ones (SPEC section 6);
    deterministic=True is always honoured (the backward uses no atomics).
    Returns out (B, Sq, H, D), or (out, lse (B, H, Sq) fp32, probs (B, H, Sq, Sk)) with return_attn_probs.
    """
    if _k is None:
        raise ImportError(f"triton_dmattn_func needs triton: {_TRITON_IMPORT_ERROR}")
    _check_qkv(query, key, value)
    B, Sq, H, D = query.shape
    Sk, Hkv = key.shape[1], key.shape[2]
    attn_mask, attn_bias = prepare_mask_bias(query, key, attn_mask, attn_bias)
    for name, x in (("attn_mask", attn_mask), ("attn_bias", attn_bias)):
        if x is not None:
            _view_args(x, query, B, H, Hkv, Sq, Sk, name)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float or None, got {scale!r}")
    if softcap is None:
        softcap = 0.0
    elif not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap: expected a finite float >= 0 or None, got {softcap!r}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if dropout_p > 0 and B * H * Sq >= 2**32:
        raise ValueError(f"dropout_p: dropout needs B*H*Sq < 2^32, got {B * H * Sq}")
    if keep_window_size is not None:
        if isinstance(keep_window_size, bool) or not isinstance(keep_window_size, int) or keep_window_size < 1:
            raise ValueError(f"keep_window_size: expected an int >= 1 or None, got {keep_window_size!r}")
        if keep_window_size < Sk:
            if attn_bias is None:
                raise ValueError(f"keep_window_size={keep_window_size} < seqlen_k={Sk} selects keys by attn_bias, "
                                 f"but attn_bias is None")
            attn_mask = create_mask(attn_bias.detach(), attn_mask, bool(is_causal), keep_window_size, query_len=Sq)
    seed, offset, rng_state = _draw_rng(query.device) if dropout_p > 0 else (0, 0, None)
    out, lse = _TritonDMAttnFunction.apply(query, key, value, attn_mask, attn_bias, float(scale),
                                           bool(is_causal), float(softcap), float(dropout_p), seed, offset,
                                           rng_state)
    if return_attn_probs:
        with torch.no_grad():
            probs = attention_probs(query, key, lse, attn_mask, attn_bias, scale, bool(is_causal), softcap)
        return out, lse, probs
    return out
