"""
test_flash_dma.py -- the first API document's flash_dma.fwd / flash_dma.bwd against reference.py.

Covers: the return list [out, softmax_lse, p, rng_state] (p None unless return_softmax), zoh / active_mask in
the document's (B, Hkv, Sq, Sk) shape and in broadcast forms, active_mask in q's dtype or bool, active_mask=None
selecting from zoh with keep_window_size (SPEC section 6) and an explicit active_mask used as given, the `out`
argument, dropout with `gen` and rng_state (keep bits equal to reference.dropout_keep), bwd with caller-given
NaN-poisoned dq/dk/dv/dbias, dbias in zoh's shape, and errors.
"""
import math

import pytest
import torch

import flash_dma
import reference as R
from cases import qkv
from conftest import devices

F32, BF16 = torch.float32, torch.bfloat16


def _dt(device):
    return BF16 if device == "cuda" else F32


def _close(name, x, ref, low):
    R.assert_spec_close(name, x.detach().cpu(), ref.cpu(), None if x.dtype == F32 else low.cpu())


def _ref(q, k, v, **kw):
    ref = R.attention_ref(q, k, v, **kw)
    low = R.attention_ref(q, k, v, precision="lowp", **kw) if q.dtype != F32 else {}
    return ref, low


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal", [False, True])
def test_fwd_bwd_document_shapes(device, causal):
    """zoh and active_mask (B, Hkv, Sq, Sk) in q's dtype, GQA, poisoned out/dq/dk/dv/dbias given by the caller."""
    dt = _dt(device)
    B, Sq, Sk, H, Hkv, D = 2, 37, 53, 4, 2, 32
    q, k, v = qkv(B, Sq, Sk, H, Hkv, D, dt, device)
    zoh = torch.randn(B, Hkv, Sq, Sk).to(dt).to(device)
    active = (torch.rand(B, Hkv, Sq, Sk) > 0.4).to(dt).to(device)
    out = torch.full_like(q, math.nan)
    res = flash_dma.fwd(q, k, v, zoh, active, out=out, is_causal=causal, softcap=3.0)
    assert isinstance(res, list) and len(res) == 4
    o, lse, p, rng = res
    assert o is out and p is None and rng.dtype == torch.int64 and rng.shape == (2,)
    kw = dict(mask=active != 0, bias=zoh, causal=causal, softcap=3.0)
    dout = torch.randn(q.shape).to(dt).to(device)
    ref, low = _ref(q, k, v, dout=dout, **kw)
    _close("out", o, ref["out"], low.get("out"))
    _close("lse", lse, ref["lse"], low.get("lse"))
    grads = [torch.full_like(t, math.nan) for t in (q, k, v, zoh)]
    dq, dk, dv, dbias = flash_dma.bwd(dout, q, k, v, zoh, active, o, lse, *grads, is_causal=causal, softcap=3.0)
    for name, got, given in (("dq", dq, grads[0]), ("dk", dk, grads[1]), ("dv", dv, grads[2]),
                             ("dbias", dbias, grads[3])):
        assert got is given
        _close(name, got, ref[name], low.get(name))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("zform", ["4d", "row", "3d", "2d", "lastdim1", "none"])
def test_zoh_forms_and_dbias_shape(device, zform):
    dt = _dt(device)
    B, Sq, Sk, H, Hkv, D = 2, 19, 41, 4, 2, 24
    q, k, v = qkv(B, Sq, Sk, H, Hkv, D, dt, device)
    shapes = {"4d": (B, H, Sq, Sk), "row": (B, Hkv, 1, Sk), "3d": (B, Hkv, Sk), "2d": (B, Sk),
              "lastdim1": (B, H, Sq, 1)}
    zoh = None if zform == "none" else torch.randn(shapes[zform]).to(dt).to(device)
    zref = None if zoh is None else {"3d": lambda z: z[:, :, None], "2d": lambda z: z[:, None, None],
                                     "lastdim1": lambda z: z.expand(B, H, Sq, Sk)}.get(zform, lambda z: z)(zoh)
    active = torch.rand(B, 1, Sq, Sk, device=device) > 0.3
    o, lse, _, _ = flash_dma.fwd(q, k, v, zoh, active, is_causal=True)
    dout = torch.randn(q.shape).to(dt).to(device)
    ref, low = _ref(q, k, v, mask=active, bias=zref, causal=True, dout=dout)
    _close("out", o, ref["out"], low.get("out"))
    dq, dk, dv, dbias = flash_dma.bwd(dout, q, k, v, zoh, active, o, lse, is_causal=True)
    _close("dq", dq, ref["dq"], low.get("dq"))
    if zoh is None:
        assert dbias is None
        return
    assert dbias.shape == zoh.shape
    want = ref["dbias"].sum(-1, keepdim=True) if zform == "lastdim1" else ref["dbias"].reshape(zoh.shape)
    want_low = None
    if low:
        want_low = low["dbias"].sum(-1, keepdim=True) if zform == "lastdim1" else low["dbias"].reshape(zoh.shape)
    _close("dbias", dbias, want, want_low)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal", [False, True])
def test_active_mask_none_selects_top_k_from_zoh(device, causal):
    """active_mask=None: the kernel keeps the keep_window_size keys with the largest zoh per row."""
    dt = _dt(device)
    B, Sq, Sk, H, Hkv, D, W = 1, 23, 71, 4, 2, 16, 9
    q, k, v = qkv(B, Sq, Sk, H, Hkv, D, dt, device)
    zoh = torch.randn(B, Hkv, Sq, Sk).to(dt).to(device)
    zoh[..., 5:9] = zoh[..., 5:6]                                    # ties: the larger key index wins
    o, lse, p, _ = flash_dma.fwd(q, k, v, zoh, None, keep_window_size=W, is_causal=causal, return_softmax=True)
    dout = torch.randn(q.shape).to(dt).to(device)
    ref, low = _ref(q, k, v, bias=zoh, causal=causal, window=W, dout=dout)
    _close("out", o, ref["out"], low.get("out"))
    _close("p", p, ref["probs"], low.get("probs"))
    assert ((p > 0).sum(-1) <= W).all()
    dq, dk, dv, dbias = flash_dma.bwd(dout, q, k, v, zoh, None, o, lse, keep_window_size=W, is_causal=causal)
    for name, x in (("dq", dq), ("dk", dk), ("dv", dv), ("dbias", dbias)):
        _close(name, x, ref[name], low.get(name))


@pytest.mark.parametrize("device", devices())
def test_explicit_active_mask_is_used_as_given(device):
    """With an active_mask, keep_window_size does not select anything (SPEC section 6)."""
    dt = _dt(device)
    q, k, v = qkv(1, 16, 40, 2, 2, 16, dt, device)
    zoh = torch.randn(1, 2, 16, 40).to(dt).to(device)
    active = torch.ones(1, 2, 16, 40, dtype=torch.bool, device=device)
    _, _, p, _ = flash_dma.fwd(q, k, v, zoh, active, keep_window_size=4, return_softmax=True)
    assert (p > 0).sum(-1).min().item() == 40


@pytest.mark.parametrize("device", devices())
def test_dropout_keep_bits_match_reference(device):
    """Dropout bits come from (seed, offset) in rng_state, identical to reference.dropout_keep; bwd reuses them."""
    dt = _dt(device)
    B, Sq, Sk, H, Hkv, D, pd = 2, 29, 45, 4, 2, 16, 0.3
    q, k, v = qkv(B, Sq, Sk, H, Hkv, D, dt, device)
    zoh = torch.randn(B, H, 1, Sk).to(dt).to(device)
    gen = torch.Generator(device=device).manual_seed(1234)
    o, lse, p, rng = flash_dma.fwd(q, k, v, zoh, None, p_dropout=pd, gen=gen, is_causal=True, return_softmax=True)
    seed, offset = (int(x) & (2**64 - 1) for x in rng.tolist())
    dout = torch.randn(q.shape).to(dt).to(device)
    ref, low = _ref(q, k, v, bias=zoh, causal=True, p_drop=pd, seed=seed, offset=offset, dout=dout)
    _close("out", o, ref["out"], low.get("out"))
    _close("p", p, ref["probs"], low.get("probs"))
    dq, dk, dv, dbias = flash_dma.bwd(dout, q, k, v, zoh, None, o, lse, p_dropout=pd, is_causal=True,
                                      rng_state=rng)
    for name, x in (("dq", dq), ("dk", dk), ("dv", dv), ("dbias", dbias)):
        _close(name, x, ref[name], low.get(name))
    gen2 = torch.Generator(device=device).manual_seed(1234)
    o2, _, _, rng2 = flash_dma.fwd(q, k, v, zoh, None, p_dropout=pd, gen=gen2, is_causal=True)
    assert torch.equal(rng, rng2) and torch.equal(o, o2)
    o3, _, _, rng3 = flash_dma.fwd(q, k, v, zoh, None, p_dropout=pd, gen=gen2, is_causal=True)
    assert not torch.equal(rng2, rng3) and not torch.equal(o2, o3)


def test_errors_name_the_argument():
    q, k, v = qkv(1, 8, 8, 2, 2, 16, F32, "cpu")
    with pytest.raises(ValueError, match="p_dropout"):
        flash_dma.fwd(q, k, v, None, None, p_dropout=1.0)
    with pytest.raises(ValueError, match="out"):
        flash_dma.fwd(q, k, v, None, None, out=torch.empty(1, 8, 2, 8))
    with pytest.raises(TypeError, match="attn_bias"):
        flash_dma.fwd(q, k, v, torch.zeros(1, 2, 8, 8, dtype=torch.float64), None)
    with pytest.raises(ValueError, match="attn_mask"):
        flash_dma.fwd(q, k, v, None, torch.ones(1, 3, 8, 8))
    o, lse, _, rng = flash_dma.fwd(q, k, v, None, None, p_dropout=0.5)
    with pytest.raises(ValueError, match="rng_state"):
        flash_dma.bwd(torch.ones_like(o), q, k, v, None, None, o, lse, p_dropout=0.5)
    with pytest.raises(ValueError, match="softmax_lse"):
        flash_dma.bwd(torch.ones_like(o), q, k, v, None, None, o, lse[:, :, :3])
    with pytest.raises(ValueError, match="dbias"):
        flash_dma.bwd(torch.ones_like(o), q, k, v, None, None, o, lse, dbias=torch.empty(1, 2, 8, 8))
