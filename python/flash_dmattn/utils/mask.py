"""
mask.py -- create_mask: the dynamic top-k keep mask of SPEC section 6, as a bool tensor.

    keep = create_mask(attention_bias, attention_mask=None, is_causal=False, keep_window_size=2048,
                       query_len=None)

For each row (b, hx, i) the candidates are the keys j that the base mask allows and (when is_causal) that
satisfy j <= i + Sk - Sq (bottom-right aligned). A row with at most keep_window_size candidates keeps them
all; otherwise it keeps the keep_window_size candidates with the largest (bias[b, hx, i, j], j): ties in bias
go to the larger key index (the more recent key) and NaN ranks below every number, -inf included.

Shapes: attention_bias 4-D ({B|1}, {Hx|1}, {Sq|1}, Sk), 3-D (B, Hx, Sk) or 2-D (B, Sk), dtype fp16/bf16/fp32;
attention_mask the same forms (bool, or numeric with nonzero = attend), dims 0 and 1 equal to the bias's or 1
(a head count that divides the other's is expanded as GQA: head h reads h / (larger / smaller)). The result
has dims (max batch, max heads, R, Sk) with R = Sq when is_causal or either input has Sq rows, else 1.
Sq is query_len, or the row count of whichever input has more than one row; it must be given when
is_causal and neither input has rows.

Runs the C library (fdma_create_mask) on CPU tensors and on CUDA tensors when the library has the CUDA path;
otherwise (a library without CUDA) an equivalent torch path: one int64 key per element that orders
(candidate, bias with NaN lowest, j) lexicographically, and one torch.topk over it.
"""
import torch

from .. import _lib

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _as4d(name, x):
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        return x[:, :, None, :]
    if x.dim() == 2:
        return x[:, None, None, :]
    raise ValueError(f"{name}: expected 2 dims (batch, seqlen_k), 3 dims (batch, heads, seqlen_k) or 4 dims "
                     f"(batch, heads, seqlen_q, seqlen_k), got shape {tuple(x.shape)}")


def _match_heads(bias, mask):
    """Make dim 1 of bias and mask equal or 1 (GQA: repeat the one with fewer heads)."""
    hb, hm = bias.shape[1], mask.shape[1]
    if hb == hm or 1 in (hb, hm):
        return bias, mask
    if hm % hb == 0:
        return bias.repeat_interleave(hm // hb, dim=1), mask
    if hb % hm == 0:
        return bias, mask.repeat_interleave(hb // hm, dim=1)
    raise ValueError(f"attention_mask: {hm} heads do not broadcast with attention_bias's {hb} heads "
                     f"(equal, 1, or one dividing the other)")


def _sortable_key(bias, cand):
    """int64 key per element: non-candidates lowest, then NaN, then bias ascending, then j ascending."""
    x = bias.float() + 0.0                                    # exact for fp16/bf16/fp32; -0.0 -> +0.0
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)      # monotone in the float value
    key = torch.where(torch.isnan(x), torch.full_like(key, -(2**31) + 1), key)
    key = torch.where(cand, key, torch.full_like(key, -(2**31)))
    j = torch.arange(x.shape[-1], device=x.device, dtype=torch.int64)
    return key * (2**32) + j


def _create_mask_torch(bias, mask, Sq, causal, window, out_dims):
    b0, h0, R, Sk = out_dims
    cand = torch.ones(1, 1, 1, Sk, dtype=torch.bool, device=bias.device)
    if mask is not None:
        cand = cand & mask
    if causal:
        i = torch.arange(Sq, device=bias.device).view(Sq, 1)
        j = torch.arange(Sk, device=bias.device).view(1, Sk)
        cand = cand & (j <= i + (Sk - Sq)).view(1, 1, Sq, Sk)
    cand = cand.expand(out_dims)
    if window >= Sk:
        return cand.clone()
    key = _sortable_key(bias.expand(out_dims), cand)
    top = torch.topk(key, window, dim=-1, largest=True, sorted=False).indices
    keep = torch.zeros(out_dims, dtype=torch.bool, device=bias.device)
    keep.scatter_(-1, top, True)
    return keep & cand


def create_mask(attention_bias, attention_mask=None, is_causal=False, keep_window_size=2048, query_len=None):
    """SPEC section 6 keep mask (bool, dims (B, Hx, R, Sk)); see the module doc."""
    if not isinstance(attention_bias, torch.Tensor):
        raise TypeError(f"attention_bias: expected a torch.Tensor, got {type(attention_bias).__name__}")
    if attention_bias.dtype not in _DTYPES:
        raise TypeError(f"attention_bias: expected dtype float16, bfloat16 or float32, got {attention_bias.dtype}")
    if isinstance(keep_window_size, bool) or int(keep_window_size) != keep_window_size or keep_window_size < 1:
        raise ValueError(f"keep_window_size: expected an integer >= 1, got {keep_window_size!r}")
    window = int(keep_window_size)
    bias = _as4d("attention_bias", attention_bias.detach())
    Sk = bias.shape[3]
    mask = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask: expected a torch.Tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.device != attention_bias.device:
            raise ValueError(f"attention_mask: expected device {attention_bias.device} (attention_bias's), "
                             f"got {attention_mask.device}")
        mask = _as4d("attention_mask", attention_mask.detach())
        if mask.dtype != torch.bool:
            mask = mask != 0
        if mask.shape[3] != Sk:
            raise ValueError(f"attention_mask: expected last dim seqlen_k={Sk} (attention_bias's), "
                             f"got shape {tuple(attention_mask.shape)}")
        if mask.shape[0] not in (1, bias.shape[0]) and bias.shape[0] != 1:
            raise ValueError(f"attention_mask: batch {mask.shape[0]} does not broadcast with attention_bias's "
                             f"{bias.shape[0]}")
        bias, mask = _match_heads(bias, mask)
    rows = [t.shape[2] for t in (bias, mask) if t is not None and t.shape[2] > 1]
    if query_len is not None:
        Sq = int(query_len)
        if Sq < 1:
            raise ValueError(f"query_len: expected >= 1, got {query_len}")
        for r, name in zip((bias.shape[2], mask.shape[2] if mask is not None else 1),
                           ("attention_bias", "attention_mask")):
            if r not in (1, Sq):
                raise ValueError(f"{name}: {r} query rows, expected query_len={Sq} or 1")
    elif rows:
        Sq = rows[0]
        if any(r != Sq for r in rows):
            raise ValueError(f"attention_mask: {rows[-1]} query rows do not match attention_bias's {rows[0]}")
    elif is_causal:
        raise ValueError("query_len: required with is_causal=True when neither attention_bias nor attention_mask "
                         "has a query dim > 1")
    else:
        Sq = 1
    R = Sq if (is_causal or rows) else 1
    b0 = max(bias.shape[0], mask.shape[0] if mask is not None else 1)
    h0 = max(bias.shape[1], mask.shape[1] if mask is not None else 1)
    out_dims = (b0, h0, R, Sk)
    if bias.device.type in ("cpu", "cuda") and _lib.try_load() is not None:
        out = torch.empty(out_dims, dtype=torch.bool, device=bias.device)
        if _lib.create_mask_c(bias, mask, Sq, bool(is_causal), window, out) == _lib.STATUS_OK:
            return out
    return _create_mask_torch(bias, mask, Sq, bool(is_causal), window, out_dims)
