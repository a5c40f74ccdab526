"""
flash_dma -- the first API document's low-level interface: one forward and one backward call on the C
library, no autograd (use flash_dmattn.flash_dmattn_func for autograd).

    out, softmax_lse, p, rng_state = flash_dma.fwd(q, k, v, zoh, active_mask, out=None, p_dropout=0.0,
        softmax_scale=None, is_causal=False, keep_window_size=2048, softcap=0.0, return_softmax=False, gen=None)

    dq, dk, dv, dbias = flash_dma.bwd(dout, q, k, v, zoh, active_mask, out, softmax_lse, dq=None, dk=None,
        dv=None, dbias=None, p_dropout=0.0, softmax_scale=None, is_causal=False, keep_window_size=2048,
        softcap=0.0, deterministic=False, gen=None, rng_state=None)

Shapes: q, out, dout, dq (B, Sq, H, D); k, v, dk, dv (B, Sk, Hkv, D); softmax_lse (B, H, Sq) fp32 (natural
log; -inf for a row with nothing visible); p (B, H, Sq, Sk) in q's dtype (the softmax before dropout) when
return_softmax, else None; rng_state int64[2] = (seed, offset) on the CPU (under CUDA-graph capture: on the GPU,
redrawn by every replay; see flash_dmattn._ops).
zoh (the bias, "ZOH states") and active_mask: any form of flash_dmattn._inputs.prepare_mask_bias, e.g. the
document's (B, Hkv, Sq, Sk), or (B, H, Sq, Sk), broadcast views, (B, Hx, Sk), (B, Sk); either may be None.
active_mask is bool or q's dtype (nonzero = active).

Devices: the document says CUDA only; CPU tensors run the CPU backend too (fp16/bf16/fp32). On CUDA a head
dim that is not a multiple of 8 is zero-padded internally and the results sliced back.

keep_window_size (SPEC section 6): with active_mask=None and a zoh, each query row attends only to the
keep_window_size keys with the largest zoh (ties to the more recent key; causality applied first), selected
inside the kernels; it has no effect when Sk <= keep_window_size. An explicit active_mask is used exactly as
given and keep_window_size is then ignored.

Dropout: p_dropout in [0, 1). fwd draws (seed, offset) from `gen` (default: the default generator of q's
device; see flash_dmattn._ops) and returns them as rng_state; bwd must get that rng_state back (its `gen`
argument is accepted for symmetry with fwd and not used: the keep bits come from rng_state alone).

bwd returns dbias in zoh's own shape (summed over the dims zoh broadcasts) when zoh is given, else None; dq,
dk, dv, dbias given by the caller are written in place and returned.
"""
import torch

from flash_dmattn import _lib, _ops
from flash_dmattn._inputs import check_qkv, prepare_mask_bias
from flash_dmattn.flash_dmattn_interface import padded_head_dim, pad_head_dim, resolve_options

__all__ = ["fwd", "bwd"]


def _inputs(q, k, v, zoh, active_mask, softmax_scale, softcap, p_dropout, keep_window_size):
    B, Sq, H, D, Sk, Hkv = check_qkv(q, k, v)
    mask, bias = prepare_mask_bias(q, k, active_mask, zoh)
    kws = keep_window_size if (active_mask is None and zoh is not None) else None
    scale, softcap, p_drop, window = resolve_options(D, Sk, bias, softmax_scale, softcap, p_dropout, kws,
                                                     name_drop="p_dropout")
    return (B, Sq, H, D, Sk, Hkv), mask, bias, scale, softcap, p_drop, window


def _check_out(name, t, shape, like):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {t.device}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name}: last dim must be contiguous, got strides {tuple(t.stride())}")


def fwd(q, k, v, zoh, active_mask, out=None, p_dropout=0.0, softmax_scale=None, is_causal=False,
        keep_window_size=2048, softcap=0.0, return_softmax=False, gen=None):
    """Forward: returns [out, softmax_lse, p (or None), rng_state]. See the module doc."""
    (B, Sq, H, D, Sk, Hkv), mask, bias, scale, softcap, p_drop, window = _inputs(
        q, k, v, zoh, active_mask, softmax_scale, softcap, p_dropout, keep_window_size)
    if out is not None:
        _check_out("out", out, q.shape, q)
    seed, offset, rng_dev = _ops.draw_rng(q.device, gen) if p_drop > 0 else (0, 0, None)
    D8 = padded_head_dim(q)
    with torch.no_grad():
        qp, kp, vp = (pad_head_dim(t.detach(), D8) for t in (q, k, v))
        mask_d = mask
        bias_d = None if bias is None else bias.detach()
        target = out if (out is not None and D8 == D) else None
        o, lse, probs = _lib.run_fwd(qp, kp, vp, mask_d, bias_d, scale, bool(is_causal), softcap, window, p_drop,
                                     seed, offset, bool(return_softmax), out=target, rng_state=rng_dev)
        if D8 != D:
            o = o[..., :D]
            if out is not None:
                out.copy_(o)
                o = out
    return [o, lse, probs, _ops.rng_state_of(seed, offset, rng_dev)]


def _dbias_to_zoh(dbias4, zoh):
    """dbias in the 4-D view's dims -> zoh's shape (sum over a last dim that zoh broadcast)."""
    if zoh.dim() == 4 and zoh.shape[3] == 1 and dbias4.shape[3] != 1:
        dbias4 = dbias4.sum(3, keepdim=True)
    return dbias4.reshape(zoh.shape)


def bwd(dout, q, k, v, zoh, active_mask, out, softmax_lse, dq=None, dk=None, dv=None, dbias=None, p_dropout=0.0,
        softmax_scale=None, is_causal=False, keep_window_size=2048, softcap=0.0, deterministic=False, gen=None,
        rng_state=None):
    """Backward: returns [dq, dk, dv, dbias (zoh's shape, or None without zoh)]. See the module doc."""
    (B, Sq, H, D, Sk, Hkv), mask, bias, scale, softcap, p_drop, window = _inputs(
        q, k, v, zoh, active_mask, softmax_scale, softcap, p_dropout, keep_window_size)
    for name, t in (("dout", dout), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        _check_out(name, t if t.stride(-1) == 1 else t.contiguous(), q.shape, q)
    if not isinstance(softmax_lse, torch.Tensor) or tuple(softmax_lse.shape) != (B, H, Sq) \
            or softmax_lse.dtype != torch.float32:
        got = (tuple(softmax_lse.shape), softmax_lse.dtype) if isinstance(softmax_lse, torch.Tensor) else softmax_lse
        raise ValueError(f"softmax_lse: expected a float32 tensor of shape {(B, H, Sq)}, got {got}")
    if p_drop > 0:
        if rng_state is None:
            raise ValueError("rng_state: required when p_dropout > 0 (pass the rng_state returned by fwd)")
        seed, offset, rng_dev = _ops.rng_args(rng_state, q.device)
    else:
        seed, offset, rng_dev = 0, 0, None
    for name, t, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if t is not None:
            _check_out(name, t, like.shape, like)
    if dbias is not None:
        if zoh is None:
            raise ValueError("dbias: given, but zoh is None (dbias is the gradient of zoh)")
        _check_out("dbias", dbias, zoh.shape, zoh)
    D8 = padded_head_dim(q)
    with torch.no_grad():
        qp, kp, vp, op, dop = (pad_head_dim(t.detach(), D8) for t in (q, k, v, out, dout))
        lse = softmax_lse.contiguous()
        bias_d = None if bias is None else bias.detach()
        direct = D8 == D
        dbias_direct = dbias if (dbias is not None and dbias.dim() == 4 and tuple(dbias.shape) == tuple(bias.shape)
                                 and all(dbias.stride(d) != 0 or dbias.shape[d] == 1 for d in range(4))) else None
        gq, gk, gv, gb = _lib.run_bwd(dop, qp, kp, vp, mask, bias_d, op, lse, scale, bool(is_causal), softcap, window,
                                      p_drop, seed, offset, bool(deterministic), zoh is not None,
                                      dq=dq if direct else None, dk=dk if direct else None,
                                      dv=dv if direct else None, dbias=dbias_direct, rng_state=rng_dev)
        if not direct:
            gq, gk, gv = gq[..., :D], gk[..., :D], gv[..., :D]
            for given, g in ((dq, gq), (dk, gk), (dv, gv)):
                if given is not None:
                    given.copy_(g)
            gq, gk, gv = (g if given is None else given for given, g in ((dq, gq), (dk, gk), (dv, gv)))
        if gb is not None and gb is not dbias:
            gb = _dbias_to_zoh(gb, zoh)
            if dbias is not None:
                dbias.copy_(gb)
                gb = dbias
    return [gq, gk, gv, gb]
