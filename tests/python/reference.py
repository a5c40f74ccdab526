"""
reference.py -- SPEC.md written out in PyTorch, for every Python test of every backend.

Two precisions from one set of formulas:
  * precision="f64":  every step in float64 on the (already rounded) inputs: the reference `ref`.
  * precision="lowp": what a user would write in PyTorch at the inputs' dtype: matmul operands in the input
    dtype, softmax in float32, outputs rounded to the input dtype: `x_torch` in the SPEC section 8 rule
        max|x - ref| <= 2 * max|x_torch - ref| + 1e-5.

Shapes: q (B, Sq, H, D); k, v (B, Sk, Hkv, D); mask, bias 4-D views broadcastable to (B, H, Sq, Sk) with
dims ({B|1}, {H|Hkv|1}, {Sq|1}, Sk). The backward is written from SPEC section 4 line by line, not from
autograd, so that fully masked rows and -inf biases follow the contract exactly.
"""
import math

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------
# Philox4x32-10 and the dropout keep bits (SPEC section 5), vectorised in numpy uint64 (wrapping arithmetic).

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)


def philox4x32_10(key, counter):
    """key: 2 uint32 values (scalars or arrays), counter: 4 arrays of uint32 -> list of 4 uint64 arrays."""
    c = [np.asarray(x, dtype=np.uint64) & _LO for x in counter]
    k0, k1 = (np.asarray(x, dtype=np.uint64) & _LO for x in key)
    for r in range(10):
        if r > 0:
            k0, k1 = (k0 + _W0) & _LO, (k1 + _W1) & _LO
        p0 = _M0 * c[0]
        p1 = _M1 * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _LO
        hi1, lo1 = p1 >> np.uint64(32), p1 & _LO
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return c


def dropout_keep(B, H, Sq, Sk, p_drop, seed, offset):
    """z[b, h, i, j] as a (B, H, Sq, Sk) bool tensor: 1 = kept."""
    t = np.uint64(int(math.floor(float(np.float32(p_drop)) * 2.0**32)))
    row = np.arange(B * H * Sq, dtype=np.uint64).reshape(B, H, Sq, 1)
    j = np.arange(Sk, dtype=np.uint64).reshape(1, 1, 1, Sk)
    row, j = np.broadcast_arrays(row, j)
    key = (np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32))
    ctr = (j >> np.uint64(2), row, np.uint64(offset & 0xFFFFFFFF), np.uint64(offset >> 32))
    words = philox4x32_10(key, ctr)
    sel = (j & np.uint64(3)).astype(np.int64)
    r = np.choose(sel, words)
    return torch.from_numpy(r >= t)


# ---------------------------------------------------------------------------------------------------------
# Broadcasting helpers (SPEC section 2).

def expand_heads(x, H, Hkv):
    """(b0, {H|Hkv|1}, q0, Sk) -> (b0, H, q0, Sk) view; query head h reads head h // (H // Hkv)."""
    hx = x.shape[1]
    if hx == H:
        return x
    if hx == 1:
        return x.expand(-1, H, -1, -1)
    assert hx == Hkv, f"head dim {hx} is neither H={H}, Hkv={Hkv} nor 1"
    return x.repeat_interleave(H // Hkv, dim=1)


def reduce_to_shape(full, shape, H, Hkv):
    """Sum a (B, H, Sq, Sk) gradient over the dims that `shape` broadcasts (dbias, SPEC section 4)."""
    b0, h0, q0, _ = shape
    x = full
    if q0 == 1:
        x = x.sum(2, keepdim=True)
    if h0 == 1:
        x = x.sum(1, keepdim=True)
    elif h0 != H:
        x = x.reshape(x.shape[0], Hkv, H // Hkv, x.shape[2], x.shape[3]).sum(2)
    if b0 == 1:
        x = x.sum(0, keepdim=True)
    return x


def causal_visible(Sq, Sk, device=None):
    i = torch.arange(Sq, device=device).view(Sq, 1)
    j = torch.arange(Sk, device=device).view(1, Sk)
    return j <= i + Sk - Sq


# ---------------------------------------------------------------------------------------------------------
# Dynamic top-k window (SPEC section 6).

def topk_keep(bias, candidates, window):
    """Keep, per row of the last dim, the `window` candidates with the largest (bias, j); ties go to the
    larger j, NaN is the smallest value. bias and candidates broadcast together; returns their shape, bool."""
    bias, candidates = torch.broadcast_tensors(bias.double(), candidates.bool())
    Sk = bias.shape[-1]
    j = torch.arange(Sk, dtype=torch.float64, device=bias.device).expand_as(bias)
    # Order key: candidates by (bias, j) with NaN lowest; non-candidates below everything.
    b = torch.where(torch.isnan(bias), torch.full_like(bias, -math.inf), bias)
    nan_rank = (~torch.isnan(bias)).double()  # NaN < -inf
    # Lexicographic sort: by candidate, then nan_rank, then b, then j (stable sorts from last key to first).
    order = torch.argsort(j, dim=-1, stable=True)
    for key in (b, nan_rank, candidates.double()):
        kk = torch.gather(key, -1, order)
        order = torch.gather(order, -1, torch.argsort(kk, dim=-1, stable=True))
    rank_from_top = torch.empty_like(order)
    rank_from_top.scatter_(-1, order.flip(-1), torch.arange(Sk, device=bias.device).expand_as(order).contiguous())
    return candidates & (rank_from_top < window)


def create_mask_ref(bias, mask=None, causal=False, window=1, Sq=None):
    """SPEC section 6 create_mask: bias ({B|1}, Hx, {Sq|1}, Sk), optional base mask; returns the keep mask
    with rows = Sq when causal or either input has Sq rows."""
    Sk = bias.shape[-1]
    cand = torch.ones(1, 1, 1, Sk, dtype=torch.bool, device=bias.device)
    if mask is not None:
        cand = cand & mask.bool()
    if causal:
        assert Sq is not None
        cand = cand & causal_visible(Sq, Sk, bias.device).view(1, 1, Sq, Sk)
    return topk_keep(bias, cand, window)


# ---------------------------------------------------------------------------------------------------------
# Forward and backward (SPEC sections 3 and 4).

def _mm(a, b, precision, dtype):
    if precision == "f64":
        return a.double() @ b.double()
    return (a.to(dtype) @ b.to(dtype)).float()


def attention_ref(q, k, v, mask=None, bias=None, scale=None, causal=False, softcap=0.0, window=0,
                  p_drop=0.0, seed=0, offset=0, dout=None, precision="f64"):
    """Returns dict(out, lse, probs[, dq, dk, dv, dbias]) in float64 ("f64") or rounded to q.dtype with
    lse in float32 ("lowp"). Gradients are computed when dout is given."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = H // Hkv
    dtype = q.dtype
    f = torch.float64 if precision == "f64" else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    qh = q.permute(0, 2, 1, 3)                                          # (B, H, Sq, D)
    kh = k.permute(0, 2, 1, 3).repeat_interleave(g, dim=1)              # (B, H, Sk, D)
    vh = v.permute(0, 2, 1, 3).repeat_interleave(g, dim=1)

    # s = scale * q k^T ; softcap ; + bias
    s_pre = scale * _mm(qh, kh.transpose(-1, -2), precision, dtype).to(f)
    s = softcap * torch.tanh(s_pre / softcap) if softcap > 0 else s_pre
    visible = torch.ones(B, H, Sq, Sk, dtype=torch.bool, device=q.device)
    if bias is not None:
        s = s + expand_heads(bias, H, Hkv).to(f)
    if mask is not None:
        visible = visible & expand_heads(mask, H, Hkv).bool()
    if causal:
        visible = visible & causal_visible(Sq, Sk, q.device)
    if window and window > 0:
        assert bias is not None, "window needs a bias"
        visible = topk_keep(expand_heads(bias, H, Hkv).expand(B, H, Sq, Sk), visible, window)

    # lse over visible keys; rows with nothing visible (or only -inf scores) get lse = -inf, p = 0
    s_m = s.masked_fill(~visible, -math.inf)
    row_max = s_m.amax(-1, keepdim=True)
    row_ok = torch.isfinite(row_max)
    shift = torch.where(row_ok, row_max, torch.zeros_like(row_max))
    lse = (torch.log(torch.exp(s_m - shift).sum(-1, keepdim=True)) + shift).masked_fill(~row_ok, -math.inf)
    p = torch.where(row_ok, torch.exp(s_m - torch.where(row_ok, lse, torch.zeros_like(lse))), torch.zeros_like(s))

    zs = torch.ones_like(p)
    if p_drop > 0:
        zs = dropout_keep(B, H, Sq, Sk, p_drop, seed, offset).to(q.device).to(f) / (1.0 - p_drop)
    pd = p * zs
    out = _mm(pd if precision == "f64" else pd.to(dtype), vh, precision, dtype).to(f)   # (B, H, Sq, D)

    res = {"lse": lse.squeeze(-1).float() if precision != "f64" else lse.squeeze(-1)}
    res["out"] = out.permute(0, 2, 1, 3) if precision == "f64" else out.permute(0, 2, 1, 3).to(dtype)
    res["probs"] = p if precision == "f64" else p.to(dtype)
    if dout is None:
        return res

    doh = dout.permute(0, 2, 1, 3)
    out_used = out if precision == "f64" else out.to(dtype).to(f)
    # dp = dout v^T * z / (1 - p_drop) ; D_i = dout . out ; ds = p (dp - D_i)
    dp = _mm(doh, vh.transpose(-1, -2), precision, dtype).to(f) * zs
    Di = (doh.to(f) * out_used).sum(-1, keepdim=True)
    ds = p * (dp - Di)
    dsc = ds * (1.0 - torch.tanh(s_pre / softcap) ** 2) if softcap > 0 else ds
    # dq = scale dsc k ; dk = scale dsc^T q ; dv = (p z)^T dout ; dk, dv summed over each head group
    lo = (lambda x: x) if precision == "f64" else (lambda x: x.to(dtype))
    dq = scale * _mm(lo(dsc), kh, precision, dtype).to(f)
    dk = scale * _mm(lo(dsc).transpose(-1, -2), qh, precision, dtype).to(f)
    dv = _mm(lo(pd).transpose(-1, -2), doh, precision, dtype).to(f)
    dk = dk.reshape(B, Hkv, g, Sk, D).sum(2)
    dv = dv.reshape(B, Hkv, g, Sk, D).sum(2)
    fin = (lambda x: x) if precision == "f64" else (lambda x: x.to(dtype))
    res["dq"] = fin(dq.permute(0, 2, 1, 3))
    res["dk"] = fin(dk.permute(0, 2, 1, 3))
    res["dv"] = fin(dv.permute(0, 2, 1, 3))
    if bias is not None:
        res["dbias"] = fin(reduce_to_shape(ds, bias.shape, H, Hkv))
    return res


# ---------------------------------------------------------------------------------------------------------
# The SPEC section 8 accuracy rule.

def spec_tolerance(ref, x_torch):
    """Allowed max abs error for a fp16/bf16 backend: 2 * max|x_torch - ref| + 1e-5."""
    return 2.0 * _maxdiff(x_torch, ref) + 1e-5


def _maxdiff(x, ref):
    x = x.double().cpu()
    ref = ref.double().cpu()
    both_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    d = (x - ref).abs().masked_fill(both_inf, 0.0)
    d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
    return d.max().item() if d.numel() else 0.0


def assert_spec_close(name, x, ref, x_torch=None):
    """SPEC section 8: lowp backends against 2*max|x_torch - ref| + 1e-5; fp32 against 1e-4 (1 + max|ref|).
    NaN anywhere in x fails (outputs are poisoned with NaN before each run)."""
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(x).any(), f"{name}: NaN in result (unwritten or invalid element)"
    err = _maxdiff(x, ref)
    if x.dtype == torch.float32 and x_torch is None:
        finite = ref[torch.isfinite(ref)]
        tol = 1e-4 * (1.0 + (finite.abs().max().item() if finite.numel() else 0.0))
    else:
        assert x_torch is not None, f"{name}: a {x.dtype} result needs the lowp torch result for the rule"
        tol = spec_tolerance(ref, x_torch)
    assert err <= tol, f"{name}: max|x - ref| = {err:.3e} > tolerance {tol:.3e}"
