"""
flash_dmattn_flex.py -- the Flex Attention backend: SPEC.md computed with torch.nn.attention.flex_attention.

    flex_dmattn_func(query, key, value, attn_mask=None, attn_bias=None, scale=None, is_causal=None,
                     softcap=None, deterministic=None, return_attn_probs=None, dropout_p=0.0,
                     keep_window_size=None) -> out

Shapes: query (B, Sq, H, D); key, value (B, Sk, Hkv, D); attn_mask / attn_bias any form that
flash_dmattn._inputs.prepare_mask_bias accepts, normalised to 4-D views ({B|1}, {H|Hkv|1}, {Sq|1}, Sk);
out (B, Sq, H, D). flex_attention wants (B, H, S, D): q/k/v go in as transposed views, out comes back as one.

How each part of SPEC section 3 maps onto flex_attention:
  * score = scale * q.k is flex's own score; score_mod applies softcap, then adds bias[b, hb, ib, j] read by
    index from the caller's (broadcast) view, so no (Sq, Sk) bias is made and dbias reaches the caller's tensor
    in its own shape through autograd (flex differentiates the captured buffer, summing over broadcast dims).
  * The mask is exact: mask_mod returns mask[b, hm, im, j] and (causal) j <= i + Sk - Sq, bottom-right aligned.
    On CUDA a BlockMask is built from the mask's tiles (any/all per 128x128 tile) so that empty tiles are
    skipped and full tiles skip the mask_mod; the mask_mod keeps partial tiles exact.
  * GQA: enable_gqa=True (query head h reads key/value head h // (H / Hkv)); a bias or mask with Hkv heads is
    read at h // (H / Hkv), with 1 head at 0.
  * keep_window_size: the keep mask of SPEC section 6 (top-k of (bias, j) among the visible keys per row) is
    computed first by flash_dmattn.utils.mask.create_mask and used as the mask; it carries no gradient.
  * A row with no visible key: flex returns out 0 and lse -inf; the result is also passed through
    where(lse == -inf, 0, out) so that such rows are 0 with zero gradients on every device.

Devices:
  * CUDA: torch.compile(flex_attention, dynamic=False), made once per process; torch reuses the compiled
    kernels for calls with the same shapes, dtypes and options (dynamo guards), so only a new shape compiles.
    A causal-only BlockMask is cached per (Sq, Sk, device). Decoding with a growing KV cache is a new Sk per
    step: each compiles once, and past dynamo's recompile limit torch runs its unfused flex path instead.
    Two kernel_options work around Inductor failures seen with torch 2.11 / triton 3.6 (issue 6, measured
    by dev/flex/probe.py on an H200 and an H100; dev/flex/NOTES.md); FDMA_FLEX_LEGACY=1 in the environment
    turns both off:
      - FORCE_USE_FLEX_ATTENTION when a BlockMask is passed, H != Hkv and Sq < 128 < Sq * (H / Hkv).
        Inductor's flex-decoding forward (taken for Sq < 128 under GQA) tiles the G * Sq packed query rows
        with BLOCK_M = next_pow2(G * Sq) > 128, which the BlockMask's 128-row blocks do not divide: every
        config is dropped and the forward's lowering raises NoValidChoicesError. The main kernel is used.
      - bwd_num_stages=2 on sm90 / sm100 when D > 64 (fp16 / bf16) and both the bias and the mask have Sq
        rows: the default sm90 backward config (BLOCK 64, 128, 128, 64; 3 stages) pipelines both 2-D tiles
        and asks for 240 KB of shared memory (limit 227 KB): "out of resource" at the first backward. Either
        tile alone fits, and so does D = 64. (sm100's default has the same blocks and stages; not measured.)
  * CPU: torch 2.11's flex_attention refuses inputs that require grad on CPU, and its compiled CPU path
    (inductor C++) is inference-only, cannot return the lse and compiles for tens of seconds per shape. The
    CPU path therefore calls the flex_attention operator (torch._higher_order_ops.flex_attention) directly,
    which runs torch's unfused reference implementation forward and backward (it materialises the
    (B, H, Sq, Sk) scores: use it for tests and small sizes). The score_mod / mask_mod buffers are passed
    explicitly so that autograd reaches the bias.

Not available on this backend (ValueError naming the option): dropout_p > 0, return_attn_probs=True, and
deterministic=True on CUDA (flex's backward accumulates the bias gradient with atomics). The CPU path is
deterministic.
"""
import functools
import math
import os

import torch

from ._inputs import check_qkv, prepare_mask_bias
from .utils.mask import create_mask

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from torch._higher_order_ops.flex_attention import flex_attention as _flex_attention_op
    FLEX_IMPORT_ERROR = None
except ImportError as _e:
    BlockMask = flex_attention = _flex_attention_op = None
    FLEX_IMPORT_ERROR = f"torch.nn.attention.flex_attention is unavailable ({_e}); flex needs torch >= 2.5"

_BLOCK = 128
_compiled_flex = None


def _compiled():
    """torch.compile(flex_attention) made once; dynamo caches one kernel per shape/dtype/option set."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


# ---------------------------------------------------------------------------------------------------------
# Broadcast views and index maps (SPEC section 2).

def _collapse(x, dims=4):
    """View of a 4-D tensor with every stride-0 dim (among the first `dims`) of size > 1 reduced to size 1."""
    idx = tuple(slice(0, 1) if (d < dims and x.stride(d) == 0 and x.shape[d] > 1) else slice(None)
                for d in range(4))
    return x[idx]


def _index_fn(shape, H, Hkv):
    """(x, b, h, i, j) -> x[b or 0, head map of h, i or 0, j or 0] for a view of `shape`
    ({B|1}, {H|Hkv|1}, {Sq|1}, {Sk|1})."""
    b0, hx, q0, k0 = shape
    g = H // Hkv

    def read(x, b, h, i, j):
        bi = b if b0 > 1 else 0
        hi = h if hx == H else (h // g if hx > 1 else 0)
        ii = i if q0 > 1 else 0
        ji = j if k0 > 1 else 0
        return x[bi, hi, ii, ji]

    return read


def _make_mods(bias_shape, mask_shape, H, Hkv, Sq, Sk, causal, softcap):
    """score_mod(score, b, h, i, j, *bias) and mask_mod(b, h, i, j, *mask) for SPEC section 3.

    The bias / mask are explicit trailing arguments so that both the closure form (CUDA, compiled) and the
    explicit-buffer form (CPU operator call) can be made from these two functions."""
    read_bias = _index_fn(bias_shape, H, Hkv) if bias_shape is not None else None
    read_mask = _index_fn(mask_shape, H, Hkv) if mask_shape is not None else None
    offset = Sk - Sq

    def score_mod(score, b, h, i, j, *bias):
        if softcap > 0:
            score = softcap * torch.tanh(score / softcap)
        if read_bias is not None:
            score = score + read_bias(bias[0], b, h, i, j)
        return score

    def mask_mod(b, h, i, j, *mask):
        keep = None
        if read_mask is not None:
            keep = read_mask(mask[0], b, h, i, j)
        if causal:
            c = j <= i + offset
            keep = c if keep is None else keep & c
        if keep is None:
            keep = j >= 0
        return keep

    return score_mod, mask_mod


# ---------------------------------------------------------------------------------------------------------
# Dynamic top-k window (SPEC section 6).

def create_keep_mask(bias, mask, causal, window, Sq):
    """SPEC section 6 keep mask (bool ({B|1}, Hx, {Sq|1}, Sk)) for views bias / mask ({B|1}, {H|Hkv|1}, {Sq|1},
    Sk), by flash_dmattn.utils.mask.create_mask; None when Sk <= window (every visible key is kept)."""
    if bias.shape[3] <= window:
        return None
    return create_mask(bias, mask, is_causal=causal, keep_window_size=window, query_len=Sq)


# ---------------------------------------------------------------------------------------------------------
# BlockMask from the mask's tiles (CUDA path).

def _tile_any_all(m, BQ, BK):
    """m bool (b, h, r, Sk) -> (any, all) per (BQ, BK) tile, shape (b, h, ceil(r/BQ), ceil(Sk/BK)). Tiles that
    run past the end are padded with False, so they are never 'all'."""
    b, h, r, Sk = m.shape
    nq, nk = -(-r // BQ), -(-Sk // BK)
    p = torch.zeros(b, h, nq * BQ, nk * BK, dtype=torch.bool, device=m.device)
    p[:, :, :r, :Sk] = m
    p = p.view(b, h, nq, BQ, nk, BK)
    return p.any(dim=5).any(dim=3), p.all(dim=5).all(dim=3)


def _range_tiles(Sq, Sk, BQ, BK, causal, device):
    """(any, all) per tile of the pattern 'in range' (and, if causal, j <= i + Sk - Sq), shape (1, 1, nq, nk)."""
    nq, nk = -(-Sq // BQ), -(-Sk // BK)
    q0 = torch.arange(nq, device=device).view(nq, 1) * BQ
    q1 = torch.clamp(q0 + BQ - 1, max=Sq - 1)
    k0 = torch.arange(nk, device=device).view(1, nk) * BK
    k1 = k0 + BK - 1
    any_ = torch.ones(nq, nk, dtype=torch.bool, device=device)
    all_ = (k1 < Sk) & (q0 + BQ <= Sq)
    if causal:
        any_ = any_ & (k0 <= q1 + (Sk - Sq))
        all_ = all_ & (k1 <= q0 + (Sk - Sq))
    return any_.view(1, 1, nq, nk), all_.view(1, 1, nq, nk)


def _kv_blocks(listed):
    """bool (b, h, nq, nk) -> (num int32 (b, h, nq), indices int32 (b, h, nq, nk)) with listed blocks first."""
    num = listed.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~listed).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def _block_mask(mask, causal, Sq, Sk, H, Hkv, device, mask_mod):
    """BlockMask for a bool mask view ({B|1}, {H|Hkv|1}, {Sq|1}, Sk) (and causality): tiles with some visible
    entry are listed, as 'full' (mask_mod skipped) when every entry of the tile is visible."""
    BQ = BK = _BLOCK
    any_, all_ = _range_tiles(Sq, Sk, BQ, BK, causal, device)
    m = mask if mask.shape[1] in (1, H) else mask.repeat_interleave(H // Hkv, dim=1)
    if m.shape[2] == 1:                       # one row for every query: tile the keys only
        m_any, m_all = _tile_any_all(m, 1, BK)
    else:
        m_any, m_all = _tile_any_all(m, BQ, BK)
    any_, all_ = any_ & m_any, all_ & m_all
    num, idx = _kv_blocks(any_ & ~all_)
    fnum, fidx = _kv_blocks(all_)
    return BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=(BQ, BK), mask_mod=mask_mod,
                                    seq_lengths=(Sq, Sk))


@functools.lru_cache(maxsize=64)
def _causal_block_mask(Sq, Sk, device):
    """The causal-only BlockMask depends on (Sq, Sk, device) alone: made once per triple (64 kept)."""
    offset = Sk - Sq

    def causal_mod(b, h, i, j):
        return j <= i + offset

    any_, all_ = _range_tiles(Sq, Sk, _BLOCK, _BLOCK, True, device)
    num, idx = _kv_blocks(any_ & ~all_)
    fnum, fidx = _kv_blocks(all_)
    return BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=(_BLOCK, _BLOCK), mask_mod=causal_mod,
                                    seq_lengths=(Sq, Sk))


# ---------------------------------------------------------------------------------------------------------
# kernel_options against Inductor failures (module docstring, Devices; issue 6).

def _legacy():
    """FDMA_FLEX_LEGACY=1: no workaround kernel_options (the behaviour before issue 6), for comparisons."""
    return os.environ.get("FDMA_FLEX_LEGACY", "") not in ("", "0")


def _kernel_options(H, Hkv, Sq, D, dtype, bias_rows, mask_rows, blocked, capability):
    """kernel_options for the compiled call (module docstring, Devices), or None. H / Hkv query / key heads, Sq
    query rows, D head dim, bias_rows / mask_rows rows of the bias / mask views (0 when absent), blocked: a
    BlockMask (128-row blocks) is passed, capability: the CUDA device's (major, minor)."""
    opts = {}
    g = H // Hkv
    if blocked and g > 1 and Sq < _BLOCK < Sq * g:
        opts["FORCE_USE_FLEX_ATTENTION"] = True
    if (bias_rows > 1 and mask_rows > 1 and D > 64 and dtype in (torch.float16, torch.bfloat16)
            and capability[0] in (9, 10)):
        opts["bwd_num_stages"] = 2
    return opts or None


# ---------------------------------------------------------------------------------------------------------
# The two execution paths.

def _run_cpu(q, k, v, score_mod, mask_mod, bias, mask, scale):
    """flex_attention operator called directly: torch's unfused implementation, forward and backward, with the
    bias / mask as explicit buffers (autograd reaches the bias). q (B, H, Sq, D), k/v (B, Hkv, Sk, D)."""
    Sq, Sk = q.shape[2], k.shape[2]
    one = torch.ones(1, 1, 1, dtype=torch.int32, device=q.device)
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=q.device)
    blocks = BlockMask.from_kv_blocks(one, zero, BLOCK_SIZE=(Sq, Sk), mask_mod=mask_mod, seq_lengths=(Sq, Sk))
    sbuf = (bias,) if bias is not None else ()
    mbuf = (mask,) if mask is not None else ()
    out, lse2, _ = _flex_attention_op(q, k, v, score_mod, blocks.as_tuple(), scale, {}, sbuf, mbuf)
    return out, lse2 * math.log(2.0)           # the operator's lse is in base 2


def _run_compiled(q, k, v, score_mod, mask_mod, bias, mask, scale, causal, has_score_mod):
    """torch.compile(flex_attention) with closures over the bias / mask and a BlockMask from the mask's tiles."""
    from torch.nn.attention.flex_attention import AuxRequest

    H, Sq = q.shape[1], q.shape[2]
    Hkv, Sk = k.shape[1], k.shape[2]
    bm = None
    if mask is not None:
        def mm(b, h, i, j):
            return mask_mod(b, h, i, j, mask)
        bm = _block_mask(mask, causal, Sq, Sk, H, Hkv, q.device, mm)
    elif causal:
        bm = _causal_block_mask(Sq, Sk, q.device)
    sm = None
    if has_score_mod:
        if bias is not None:
            def sm(score, b, h, i, j):
                return score_mod(score, b, h, i, j, bias)
        else:
            sm = score_mod
    opts = None
    if not _legacy():
        opts = _kernel_options(H, Hkv, Sq, q.shape[3], q.dtype, 0 if bias is None else bias.shape[2],
                               0 if mask is None else mask.shape[2], bm is not None,
                               torch.cuda.get_device_capability(q.device))
    out, aux = _compiled()(q, k, v, score_mod=sm, block_mask=bm, scale=scale, enable_gqa=(H != Hkv),
                           return_aux=AuxRequest(lse=True), kernel_options=opts)
    return out, aux.lse


def flex_attention_core(query, key, value, mask=None, bias=None, scale=None, causal=False, softcap=0.0,
                        keep_window_size=None):
    """SPEC sections 3 and 6 on flex_attention for normalised inputs.

    query (B, Sq, H, D), key/value (B, Sk, Hkv, D); mask bool / bias 4-D views ({B|1}, {H|Hkv|1}, {Sq|1}, Sk)
    or None. Returns (out (B, Sq, H, D), lse (B, H, Sq) float32, natural log, -inf for rows with no key)."""
    B, Sq, H, D = query.shape
    Sk, Hkv = key.shape[1], key.shape[2]
    if mask is not None:
        mask = _collapse(mask, dims=3)
    if keep_window_size is not None:
        keep = create_keep_mask(bias, mask, causal, int(keep_window_size), Sq)
        if keep is not None:
            mask = keep
    if bias is not None:
        bias = _collapse(bias)                 # a stride-0 last dim (a (.., 1) bias) is read at index 0
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    softcap = float(softcap or 0.0)
    score_mod, mask_mod = _make_mods(None if bias is None else tuple(bias.shape),
                                     None if mask is None else tuple(mask.shape), H, Hkv, Sq, Sk, causal, softcap)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if query.device.type == "cpu":
        out, lse = _run_cpu(q, k, v, score_mod, mask_mod, bias, mask, scale)
    else:
        out, lse = _run_compiled(q, k, v, score_mod, mask_mod, bias, mask, scale, causal,
                                 bias is not None or softcap > 0)
    if mask is not None or causal or bias is not None:
        out = torch.where(torch.isneginf(lse).unsqueeze(-1), out.new_zeros(()), out)
    return out.transpose(1, 2), lse


def _check_options(query, scale, softcap, deterministic, return_attn_probs, dropout_p, keep_window_size,
                   attn_bias):
    if FLEX_IMPORT_ERROR is not None:
        raise RuntimeError(f"flex_dmattn_func: {FLEX_IMPORT_ERROR}")
    if dropout_p is None or not isinstance(dropout_p, (int, float)) or dropout_p != 0:
        raise ValueError(f"dropout_p: the Flex backend has no dropout (flex_attention cannot drop attention "
                         f"probabilities); expected 0.0, got {dropout_p!r}. Use the CUDA, Triton or CPU backend.")
    if return_attn_probs:
        raise ValueError("return_attn_probs: the Flex backend cannot return attention probabilities "
                         "(flex_attention never forms them); expected None or False, got True")
    if deterministic and query.device.type != "cpu":
        raise ValueError(f"deterministic: the Flex backend on {query.device.type} cannot guarantee bitwise "
                         f"reproducible gradients (flex_attention's backward accumulates with atomics); "
                         f"expected None or False, got True")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite number or None, got {scale!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not softcap >= 0 or not math.isfinite(softcap)):
        raise ValueError(f"softcap: expected a finite number >= 0 or None, got {softcap!r}")
    if keep_window_size is not None:
        if isinstance(keep_window_size, bool) or not isinstance(keep_window_size, int) or keep_window_size < 1:
            raise ValueError(f"keep_window_size: expected an int >= 1 or None, got {keep_window_size!r}")
        if attn_bias is None:
            raise ValueError("keep_window_size: the top-k window selects by attn_bias; expected an attn_bias, "
                             "got None")


def flex_dmattn_func(query, key, value, attn_mask=None, attn_bias=None, scale=None, is_causal=None, softcap=None,
                     deterministic=None, return_attn_probs=None, dropout_p=0.0, keep_window_size=None):
    """Flash dynamic mask attention on torch's flex_attention (SPEC.md).

    query (B, Sq, H, D); key, value (B, Sk, Hkv, D); attn_mask bool/int/float (nonzero = attend) and attn_bias
    (query's dtype) in any form of prepare_mask_bias: 4-D broadcastable ({B|1}, {H|Hkv|1}, {Sq|1}, {Sk|1}),
    3-D ({B|1}, {H|Hkv|1}, Sk), 2-D ({B|1}, Sk). is_causal: bottom-right aligned. softcap: s = c tanh(s / c)
    before the bias. keep_window_size: keep per row the top-k keys by (bias, j) (SPEC section 6).
    Returns out (B, Sq, H, D). Raises ValueError for dropout_p > 0, return_attn_probs, deterministic on CUDA."""
    check_qkv(query, key, value)
    _check_options(query, scale, softcap, deterministic, return_attn_probs, dropout_p, keep_window_size,
                   attn_bias)
    mask, bias = prepare_mask_bias(query, key, attn_mask, attn_bias)
    out, _ = flex_attention_core(query, key, value, mask, bias, scale, bool(is_causal), softcap or 0.0,
                                 keep_window_size)
    return out
