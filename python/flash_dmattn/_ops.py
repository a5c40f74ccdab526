"""
_ops.py -- the torch operators over the C library: "flash_dmattn::fwd" and "flash_dmattn::bwd"
(torch.library.custom_op, with fake implementations for torch.compile and an autograd formula), and the
dropout random-number state.

  fwd(q, k, v, mask?, bias?, scale, causal, softcap, window, p_drop, return_probs, deterministic, rng_in?)
      -> (out (B, Sq, H, D), lse (B, H, Sq) fp32, probs (B, H, Sq, Sk) or empty, rng_state int64[2] on CPU)
  bwd(dout, q, k, v, mask?, bias?, out, lse, scale, causal, softcap, window, p_drop, rng_state,
      deterministic, need_dbias) -> (dq, dk, dv, dbias (bias's dims) or empty)

mask is a bool 4-D view and bias a 4-D view of q's dtype with dims ({B|1}, {H|Hkv|1}, {Sq|1}, Sk)
(see _inputs.prepare_mask_bias); both are read through their strides, never copied. The autograd formula
returns dbias in the bias view's dims; the caller's view ops (unsqueeze/expand) carry it back to the shape the
caller passed.

Dropout random numbers (SPEC section 5): keep bits are Philox4x32-10 of (seed, offset, b, h, i, j). With
rng_in None the operator draws (seed, offset) itself when p_drop > 0, from the default generator of q's device:
  CUDA: seed = generator.initial_seed(), offset = generator's philox offset / 4, and the generator's offset is
        advanced by 4 (one unit of ours), so every call draws new bits and torch.manual_seed / get_rng_state /
        set_rng_state reproduce them.
  CPU:  torch's CPU generator (mt19937) has no offset: seed = initial_seed(), offset = a 62-bit value drawn
        from the generator, which advances its state the same way.
The pair is returned as rng_state (int64[2], CPU) and handed to the backward, so backward and forward use the
same bits (a CPU tensor: the backward reads it without a device synchronization).

CUDA graphs: without dropout, forward and backward capture and replay normally (every call uses the current
stream, allocates through torch and never synchronizes). With dropout, a host (seed, offset) would be frozen
into the captured kernel arguments and every replay would repeat the same keep bits. Replays can only draw new
bits if the kernels read (seed, offset) from device memory at run time (e.g. an int64[2] tensor filled by a
graph-safe torch RNG op such as torch.randint on the CUDA generator, which torch re-seeds per replay); the C
API (fdma_params.seed / .offset) takes them by value only, so dropout inside a capture raises RuntimeError
instead of silently repeating bits.
"""
from typing import Optional, Tuple

import numpy as np
import torch

from . import _lib

Tensor = torch.Tensor


def _default_generator(device):
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[idx]
    return torch.default_generator


def draw_rng_state(device, gen=None):
    """(seed, offset) for one dropout call, drawn from `gen` (default: the device's default generator)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("dropout_p > 0 inside CUDA-graph capture: the C API takes the dropout seed/offset by "
                           "value, so every replay would repeat the captured keep bits; capture with "
                           "dropout_p=0 or run dropout outside the graph")
    if gen is None:
        gen = _default_generator(device)
    seed = gen.initial_seed() & 0xFFFFFFFFFFFFFFFF
    if gen.device.type == "cuda":
        off = gen.get_offset()
        gen.set_offset(off + 4)
        offset = off // 4
    else:
        offset = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
    return seed, offset


def rng_state_tensor(seed, offset):
    """int64[2] (seed, offset) as the bit patterns of the uint64 values."""
    words = np.array([seed & 0xFFFFFFFFFFFFFFFF, offset & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    return torch.from_numpy(words.view(np.int64))


def rng_state_values(rng_state):
    seed, offset = (int(x) for x in rng_state.cpu().tolist())
    return seed & 0xFFFFFFFFFFFFFFFF, offset & 0xFFFFFFFFFFFFFFFF


# mask / bias views are read through their strides: ask torch.compile to hand them over unchanged
_TAGS = tuple(t for t in (getattr(torch.Tag, "needs_exact_strides", None),) if t is not None)


@torch.library.custom_op("flash_dmattn::fwd", mutates_args=(), tags=_TAGS + (torch.Tag.nondeterministic_seeded,))
def fwd_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], bias: Optional[Tensor], scale: float,
           causal: bool, softcap: float, window: int, p_drop: float, return_probs: bool, deterministic: bool,
           rng_in: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if p_drop > 0:
        seed, offset = rng_state_values(rng_in) if rng_in is not None else draw_rng_state(q.device)
    else:
        seed, offset = 0, 0
    out, lse, probs = _lib.run_fwd(q, k, v, mask, bias, scale, causal, softcap, window, p_drop, seed, offset,
                                   return_probs)
    if probs is None:
        probs = q.new_empty(0)
    return out, lse, probs, rng_state_tensor(seed, offset)


def fwd_eager(q, k, v, mask, bias, scale, causal, softcap, window, p_drop, return_probs):
    """The forward without the operator (no autograd graph): (out, lse, probs or an empty tensor)."""
    seed, offset = draw_rng_state(q.device) if p_drop > 0 else (0, 0)
    out, lse, probs = _lib.run_fwd(q, k, v, mask, bias, scale, causal, softcap, window, p_drop, seed, offset,
                                   return_probs)
    return out, lse, (q.new_empty(0) if probs is None else probs)


@fwd_op.register_fake
def _fwd_fake(q, k, v, mask, bias, scale, causal, softcap, window, p_drop, return_probs, deterministic, rng_in):
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((B, H, Sq), dtype=torch.float32)
    probs = q.new_empty((B, H, Sq, Sk)) if return_probs else q.new_empty(0)
    return out, lse, probs, torch.empty(2, dtype=torch.int64, device="cpu")


@torch.library.custom_op("flash_dmattn::bwd", mutates_args=(), tags=_TAGS)
def bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], bias: Optional[Tensor],
           out: Tensor, lse: Tensor, scale: float, causal: bool, softcap: float, window: int, p_drop: float,
           rng_state: Tensor, deterministic: bool, need_dbias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    seed, offset = rng_state_values(rng_state) if p_drop > 0 else (0, 0)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv, dbias = _lib.run_bwd(dout, q, k, v, mask, bias, out, lse, scale, causal, softcap, window, p_drop,
                                     seed, offset, deterministic, need_dbias)
    if dbias is None:
        dbias = q.new_empty(0)
    return dq, dk, dv, dbias


@bwd_op.register_fake
def _bwd_fake(dout, q, k, v, mask, bias, out, lse, scale, causal, softcap, window, p_drop, rng_state,
              deterministic, need_dbias):
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dbias = bias.new_empty(bias.shape) if (need_dbias and bias is not None) else q.new_empty(0)
    return dq, dk, dv, dbias


def _setup_context(ctx, inputs, output):
    q, k, v, mask, bias, scale, causal, softcap, window, p_drop, return_probs, deterministic, rng_in = inputs
    out, lse, probs, rng_state = output
    ctx.save_for_backward(q, k, v, mask, bias, out, lse, rng_state)
    ctx.opts = (scale, causal, softcap, window, p_drop, deterministic)
    ctx.mark_non_differentiable(lse, probs, rng_state)


def _backward(ctx, dout, dlse, dprobs, drng):
    q, k, v, mask, bias, out, lse, rng_state = ctx.saved_tensors
    scale, causal, softcap, window, p_drop, deterministic = ctx.opts
    need_dbias = bias is not None and ctx.needs_input_grad[4]
    dq, dk, dv, dbias = bwd_op(dout, q, k, v, mask, bias, out, lse, scale, causal, softcap, window, p_drop,
                               rng_state, deterministic, need_dbias)
    return dq, dk, dv, None, (dbias if need_dbias else None), None, None, None, None, None, None, None, None


fwd_op.register_autograd(_backward, setup_context=_setup_context)
