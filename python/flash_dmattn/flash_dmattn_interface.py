"""
flash_dmattn_interface.py -- flash_dmattn_func: dynamic-mask attention through the C library, with autograd.

    out = flash_dmattn_func(query, key, value, attn_mask=None, attn_bias=None, scale=None, is_causal=None,
                            softcap=None, deterministic=None, return_attn_probs=None, dropout_p=0.0,
                            keep_window_size=None)

Shapes: query (B, Sq, H, D); key, value (B, Sk, Hkv, D), H % Hkv == 0; attn_mask / attn_bias in any form of
_inputs.prepare_mask_bias (4-D broadcastable ({B|1}, {H|Hkv|1}, {Sq|1}, {Sk|1}), 3-D (B, Hx, Sk), 2-D (B, Sk));
the mask may be bool or numeric (nonzero = attend), the bias has query's dtype.

Device picks the backend: CUDA tensors run the CUDA kernels (fp16/bf16), CPU tensors the CPU backend
(fp16/bf16/fp32). On CUDA a head dim that is not a multiple of 8 is zero-padded to the next multiple of 8 and
the output (and gradients) sliced back; the default scale stays 1/sqrt(D) of the caller's D.

Options (SPEC.md sections 3-6): scale (default 1/sqrt(D)); is_causal (bottom-right aligned when Sq != Sk);
softcap (> 0: softcap * tanh(s / softcap) before the bias); deterministic (bitwise reproducible backward);
dropout_p in [0, 1) (keep bits from the torch generator, see _ops.py); keep_window_size: per query row keep
only the keep_window_size visible keys with the largest bias (ties to the more recent key), fused in the kernel
(the C `window` field) so no mask needs to be built; it needs attn_bias and has no effect when
keep_window_size >= Sk.

Returns out (B, Sq, H, D); with return_attn_probs=True returns (out, lse, probs): lse (B, H, Sq) fp32 natural
log-sum-exp and probs (B, H, Sq, Sk) in query's dtype before dropout (debug only: it is (Sq, Sk) sized).
Gradients flow to query, key, value and attn_bias (dbias in the bias's own shape, summed over its broadcast
dims); lse and probs carry no gradient.
"""
import math

import torch
import torch.nn.functional as F

from . import _ops
from ._inputs import check_qkv, prepare_mask_bias


def resolve_options(D, Sk, attn_bias, scale, softcap, dropout_p, keep_window_size, name_window="keep_window_size",
                    name_drop="dropout_p"):
    """Checked (scale, softcap, p_drop, window) for the C params."""
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    softcap = 0.0 if softcap is None else float(softcap)
    if not (softcap >= 0.0 and math.isfinite(softcap)):
        raise ValueError(f"softcap: expected a finite value >= 0 (0 = off), got {softcap}")
    p_drop = 0.0 if dropout_p is None else float(dropout_p)
    if not 0.0 <= p_drop < 1.0:
        raise ValueError(f"{name_drop}: expected a probability in [0, 1), got {p_drop}")
    window = 0
    if keep_window_size is not None:
        if isinstance(keep_window_size, bool) or int(keep_window_size) != keep_window_size or keep_window_size < 1:
            raise ValueError(f"{name_window}: expected an integer >= 1 (or None = off), got {keep_window_size!r}")
        if int(keep_window_size) < Sk:
            if attn_bias is None:
                raise ValueError(f"{name_window}={keep_window_size} < seqlen_k={Sk} selects keys by the attention "
                                 f"bias, but no bias was given")
            window = int(keep_window_size)
    return scale, softcap, p_drop, window


def pad_head_dim(x, D8):
    """(..., D) -> (..., D8) zero-padded (differentiable); last dim made contiguous."""
    D = x.shape[-1]
    if D8 != D:
        return F.pad(x, (0, D8 - D))
    return x if x.stride(-1) == 1 else x.contiguous()


def padded_head_dim(query):
    D = query.shape[-1]
    if query.device.type == "cuda" and D % 8 != 0:
        return (D + 7) // 8 * 8
    return D


def _eager_no_grad(*tensors):
    """True for a plain eager call that needs no autograd graph: the operator's dispatch (autograd, fake
    tensors, torch.compile) is then skipped and the library is called directly, saving its per-call overhead
    (inference, decoding). Tensor subclasses (fake / functional tensors) and tracing always take the operator."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or (grad and t.requires_grad):
            return False
    return True


def flash_dmattn_func(query, key, value, attn_mask=None, attn_bias=None, scale=None, is_causal=None, softcap=None,
                      deterministic=None, return_attn_probs=None, dropout_p=0.0, keep_window_size=None):
    """Dynamic-mask attention on the C library (CUDA or CPU by the tensors' device). See the module doc."""
    B, Sq, H, D, Sk, Hkv = check_qkv(query, key, value)
    if query.dtype == torch.float32 and query.device.type != "cpu":
        raise TypeError(f"query: float32 runs on the CPU backend only; on {query.device} use float16 or bfloat16 "
                        f"(or triton_dmattn_func, which takes float32)")
    mask, bias = prepare_mask_bias(query, key, attn_mask, attn_bias)
    scale, softcap, p_drop, window = resolve_options(D, Sk, bias, scale, softcap, dropout_p, keep_window_size)
    D8 = padded_head_dim(query)
    q, k, v = (pad_head_dim(t, D8) for t in (query, key, value))
    args = (q, k, v, mask, bias, scale, bool(is_causal), softcap, window, p_drop, bool(return_attn_probs))
    if _eager_no_grad(q, k, v, mask, bias):
        out, lse, probs = _ops.fwd_eager(*args)
    else:
        out, lse, probs, _ = _ops.fwd_op(*args, bool(deterministic), None)
    if D8 != D:
        out = out[..., :D]
    if return_attn_probs:
        return out, lse, probs
    return out
