"""
_inputs.py -- checks of q/k/v and the conversion of every accepted attention mask / bias form into the 4-D
views the backends take (SPEC sections 1, 2 and 7). Every backend's public function calls it.

Shapes: query (B, Sq, H, D); key, value (B, Sk, Hkv, D). Accepted mask / bias forms:
  4-D   ({B|1}, {H|Hkv|1}, {Sq|1}, {Sk|1})   any strides (stride-0 broadcast views stay views)
  3-D   ({B|1}, {H|Hkv|1}, Sk)               = (B, Hx, 1, Sk)   per-key values for every query row
  2-D   ({B|1}, Sk)                          = (B, 1, 1, Sk)    padding mask / per-key bias
The result has dims ({B|1}, {H|Hkv|1}, {Sq|1}, Sk): a view of the caller's tensor (a last dim of size 1 is
expanded with stride 0). Masks become bool (nonzero = attend); for a non-bool mask the comparison runs on the
mask with its stride-0 dims collapsed, so no (Sq, Sk) tensor is made that the caller did not pass. The bias
keeps its dtype, which must be the query's; it stays in the autograd graph (the views are differentiable).
"""
import torch


def check_qkv(query, key, value):
    """Validate q, k, v; returns (B, Sq, H, D, Sk, Hkv). Raises ValueError / TypeError naming the argument."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}")
    B, Sq, H, D = query.shape
    Bk, Sk, Hkv, Dk = key.shape
    if tuple(value.shape) != tuple(key.shape):
        raise ValueError(f"value: expected shape {tuple(key.shape)} (key's), got {tuple(value.shape)}")
    if Bk != B:
        raise ValueError(f"key: expected batch {B} (query's), got {Bk}")
    if Dk != D:
        raise ValueError(f"key: expected head_dim {D} (query's), got {Dk}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"key: num_heads_k must divide num_heads ({H}), got {Hkv}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name}: expected dtype {query.dtype} (query's), got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name}: expected device {query.device} (query's), got {t.device}")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"query: expected dtype float16, bfloat16 or float32, got {query.dtype}")
    if min(B, Sq, H, D, Sk, Hkv) < 1:
        raise ValueError(f"query/key: every dim must be >= 1, got query {tuple(query.shape)}, key {tuple(key.shape)}")
    return B, Sq, H, D, Sk, Hkv


def _to4d(name, x, B, H, Hkv, Sq, Sk):
    """Any accepted form -> 4-D view ({B|1}, {H|Hkv|1}, {Sq|1}, Sk)."""
    if x.dim() == 2:
        x4 = x[:, None, None, :]
    elif x.dim() == 3:
        x4 = x[:, :, None, :]
    elif x.dim() == 4:
        x4 = x
    else:
        raise ValueError(f"{name}: expected 2 dims (batch, seqlen_k), 3 dims (batch, heads, seqlen_k) or 4 dims "
                         f"(batch, heads, seqlen_q, seqlen_k), got shape {tuple(x.shape)}")
    b0, h0, q0, k0 = x4.shape
    heads = sorted({H, Hkv, 1}, reverse=True)
    form = {2: "({B|1}, Sk)", 3: "({B|1}, {H|Hkv|1}, Sk)", 4: "({B|1}, {H|Hkv|1}, {Sq|1}, {Sk|1})"}[x.dim()]
    ok = b0 in (B, 1) and h0 in heads and q0 in (Sq, 1) and k0 in (Sk, 1)
    if x.dim() < 4:
        ok = ok and k0 == Sk
    if not ok:
        raise ValueError(f"{name}: expected shape {form} with B={B}, H={H}, Hkv={Hkv}, Sq={Sq}, Sk={Sk}, "
                         f"got {tuple(x.shape)}")
    if k0 != Sk:
        x4 = x4.expand(b0, h0, q0, Sk)
    return x4


def _collapse_broadcast(x):
    """View with every stride-0 dim of size > 1 (except the last) reduced to size 1; returns (view, dims)."""
    dims = tuple(x.shape)
    idx = tuple(slice(0, 1) if (x.stride(d) == 0 and x.shape[d] > 1) else slice(None) for d in range(3))
    return x[idx], dims


def _mask_to_bool(x):
    """nonzero = attend, without growing the tensor: compare on the collapsed view, keep size-1 dims."""
    if x.dtype == torch.bool:
        return x
    if x.is_complex():
        raise TypeError(f"attn_mask: expected a bool, integer or floating mask, got {x.dtype}")
    base, _ = _collapse_broadcast(x)
    last_bcast = base.stride(3) == 0 and base.shape[3] > 1
    if last_bcast:
        base = base[..., :1]
    m = base != 0
    if last_bcast:
        m = m.expand(*m.shape[:3], x.shape[3])
    return m


def prepare_mask_bias(query, key, attn_mask=None, attn_bias=None):
    """Return (mask, bias) as 4-D views ({B|1}, {H|Hkv|1}, {Sq|1}, Sk) (mask bool) or None.

    Raises ValueError / TypeError naming attn_mask / attn_bias with the expected and actual value."""
    B, Sq, H, _ = query.shape
    Sk, Hkv = key.shape[1], key.shape[2]
    mask = bias = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask: expected device {query.device} (query's), got {attn_mask.device}")
        mask = _mask_to_bool(_to4d("attn_mask", attn_mask, B, H, Hkv, Sq, Sk))
        mask, _ = _collapse_broadcast(mask)
    if attn_bias is not None:
        if not isinstance(attn_bias, torch.Tensor):
            raise TypeError(f"attn_bias: expected a torch.Tensor or None, got {type(attn_bias).__name__}")
        if attn_bias.device != query.device:
            raise ValueError(f"attn_bias: expected device {query.device} (query's), got {attn_bias.device}")
        if attn_bias.dtype != query.dtype:
            raise TypeError(f"attn_bias: expected dtype {query.dtype} (query's), got {attn_bias.dtype}")
        bias = _to4d("attn_bias", attn_bias, B, H, Hkv, Sq, Sk)
    return mask, bias
