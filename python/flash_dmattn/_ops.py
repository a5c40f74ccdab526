"""
_ops.py -- the torch operators over the C library: "flash_dmattn::fwd" and "flash_dmattn::bwd"
(torch.library.custom_op, with fake implementations for torch.compile and an autograd formula), and the
dropout random-number state.

  fwd(q, k, v, mask?, bias?, scale, causal, softcap, window, p_drop, return_probs, deterministic, rng_in?)
      -> (out (B, Sq, H, D), lse (B, H, Sq) fp32, probs (B, H, Sq, Sk) or empty, rng_state int64[2] (below))
  bwd(dout, q, k, v, mask?, bias?, out, lse, scale, causal, softcap, window, p_drop, rng_state,
      deterministic, need_dbias) -> (dq, dk, dv, dbias (bias's dims) or empty)

mask is a bool 4-D view and bias a 4-D view of q's dtype with dims ({B|1}, {H|Hkv|1}, {Sq|1}, Sk)
(see _inputs.prepare_mask_bias); both are read through their strides, never copied. The autograd formula
returns dbias in the bias view's dims; the caller's view ops (unsqueeze/expand) carry it back to the shape the
caller passed.

Dropout random numbers (SPEC section 5): keep bits are Philox4x32-10 of (seed, offset, b, h, i, j). With
rng_in None the operator draws (seed, offset) itself when p_drop > 0 (draw_rng), from the default generator
of q's device:
  CUDA: seed = generator.initial_seed(), offset = generator's philox offset / 4, and the generator's offset is
        advanced by 4 (one unit of ours), so every call draws new bits and torch.manual_seed / get_rng_state /
        set_rng_state reproduce them.
  CPU:  torch's CPU generator (mt19937) has no offset: seed = initial_seed(), offset = a 62-bit value drawn
        from the generator, which advances its state the same way.
The pair is returned as rng_state (int64[2], on the CPU) and handed to the backward, so backward and forward
use the same bits (a CPU tensor: the backward reads it without a device synchronization). rng_in replays a
given pair and comes back as a copy on its own device: a CPU pair goes to the kernels by value, a CUDA pair by
pointer (fdma_params.rng_state, read when the kernels run).

CUDA graphs: without dropout, forward and backward capture and replay normally (every call uses the current
stream, allocates through torch and never synchronizes). With dropout, a host (seed, offset) would be frozen
into the captured kernel arguments and every replay would repeat one keep mask. So under capture
(torch.cuda.is_current_stream_capturing()) draw_rng draws the pair on the GPU instead: torch.randint(0, 2^62)
on the CUDA generator into an int64[2] CUDA tensor, a graph-safe op (torch gives every replay of a captured
RNG op a new philox offset), and the kernels read it through fdma_params.rng_state when they run. That tensor
is the op's rng_state output (so under capture rng_state is a CUDA tensor) and the captured backward reads
the same memory: each replay draws one new pair, used by its forward and its backward alike; reading
rng_state after a replay gives that replay's (seed, offset). A caller that wants one keep mask on every
replay passes it as rng_in.

torch.compile: the fake implementation gives rng_state on the CPU (rng_in's device when rng_in is given),
which is what the real op returns whenever it runs outside a capture, i.e. everywhere but inside a graph that
torch.cuda.graph (or inductor's cudagraphs) records. There the real op returns the CUDA tensor described
above; the backward op accepts either device (CPU: values, CUDA: pointer), so compiled graphs stay correct.
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


def _capturing(device):
    """True while the current stream of this CUDA device is recording a CUDA graph."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def draw_rng_state(device, gen=None):
    """Host (seed, offset) for one dropout call, drawn from `gen` (default: the device's default generator).
    Not under CUDA-graph capture, where host values would be frozen into the graph: see draw_rng."""
    device = torch.device(device)
    if _capturing(device):
        raise RuntimeError("draw_rng_state: host (seed, offset) inside CUDA-graph capture would repeat the same keep "
                           "bits on every replay; use draw_rng, which draws them on the GPU there")
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


def draw_rng(device, gen=None):
    """(seed, offset, rng_dev) for one dropout call (see the module doc). Outside CUDA-graph capture: host
    values from draw_rng_state and rng_dev None. Inside capture: seed = offset = 0 and rng_dev an int64[2]
    CUDA tensor that a captured torch.randint on `gen` (default: the device's default generator; another
    generator must be registered with the graph) refills on every replay; pass it as rng_state to _lib."""
    device = torch.device(device)
    if not _capturing(device):
        return (*draw_rng_state(device, gen), None)
    if gen is None:
        gen = _default_generator(device)
    return 0, 0, torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device, generator=gen)


def rng_state_of(seed, offset, rng_dev):
    """The rng_state tensor a call returns: rng_dev when the pair lives on the GPU, else the host pair."""
    return rng_dev if rng_dev is not None else rng_state_tensor(seed, offset)


def rng_args(rng_state, device):
    """(seed, offset, rng_dev) to run with a given rng_state on `device`: a CPU rng_state (or any rng_state for
    a CPU call) by value, a CUDA one as an int64[2] tensor on `device` whose pointer the kernels read."""
    device = torch.device(device)
    if device.type == "cuda" and rng_state.device.type == "cuda":
        return 0, 0, rng_state.to(device=device, dtype=torch.int64).reshape(2).contiguous()
    return (*rng_state_values(rng_state), None)


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
    if rng_in is not None:
        rng_state = rng_in.to(torch.int64, copy=True).reshape(2)        # an output may not alias an input
        seed, offset, rng_dev = rng_args(rng_state, q.device) if p_drop > 0 else (0, 0, None)
    elif p_drop > 0:
        seed, offset, rng_dev = draw_rng(q.device)
        rng_state = rng_state_of(seed, offset, rng_dev)
    else:
        seed, offset, rng_dev = 0, 0, None
        rng_state = rng_state_tensor(0, 0)
    out, lse, probs = _lib.run_fwd(q, k, v, mask, bias, scale, causal, softcap, window, p_drop, seed, offset,
                                   return_probs, rng_state=rng_dev)
    if probs is None:
        probs = q.new_empty(0)
    return out, lse, probs, rng_state


def fwd_eager(q, k, v, mask, bias, scale, causal, softcap, window, p_drop, return_probs):
    """The forward without the operator (no autograd graph): (out, lse, probs or an empty tensor)."""
    seed, offset, rng_dev = draw_rng(q.device) if p_drop > 0 else (0, 0, None)
    out, lse, probs = _lib.run_fwd(q, k, v, mask, bias, scale, causal, softcap, window, p_drop, seed, offset,
                                   return_probs, rng_state=rng_dev)
    return out, lse, (q.new_empty(0) if probs is None else probs)


@fwd_op.register_fake
def _fwd_fake(q, k, v, mask, bias, scale, causal, softcap, window, p_drop, return_probs, deterministic, rng_in):
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((B, H, Sq), dtype=torch.float32)
    probs = q.new_empty((B, H, Sq, Sk)) if return_probs else q.new_empty(0)
    rng_device = rng_in.device if rng_in is not None else torch.device("cpu")   # see the module doc
    return out, lse, probs, torch.empty(2, dtype=torch.int64, device=rng_device)


@torch.library.custom_op("flash_dmattn::bwd", mutates_args=(), tags=_TAGS)
def bwd_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], bias: Optional[Tensor],
           out: Tensor, lse: Tensor, scale: float, causal: bool, softcap: float, window: int, p_drop: float,
           rng_state: Tensor, deterministic: bool, need_dbias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    seed, offset, rng_dev = rng_args(rng_state, q.device) if p_drop > 0 else (0, 0, None)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv, dbias = _lib.run_bwd(dout, q, k, v, mask, bias, out, lse, scale, causal, softcap, window, p_drop,
                                     seed, offset, deterministic, need_dbias, rng_state=rng_dev)
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
