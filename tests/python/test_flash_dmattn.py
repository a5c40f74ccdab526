"""
test_flash_dmattn.py -- flash_dmattn_func (the C library: CPU backend for CPU tensors, CUDA kernels for CUDA
tensors) against reference.py, SPEC section 8: fp32 CPU within 1e-4 * (1 + max|ref|); fp16/bf16 within
2 * max|x_torch - ref| + 1e-5. Every case prints its parameters in its test id.

Grid: awkward sizes (Sq 1, 17, 113, 1000; Sk 1, 31, 257, 4095), GQA and MQA, every mask and bias form of
cases.py, causal with Sq < Sk and Sq > Sk (rows with nothing visible), fully masked rows, D not a multiple of
8, softcap, return_attn_probs (lse, probs), keep_window_size. Gradients (dq, dk, dv, dbias in the bias's own
shape) for every bias form. GPU-marked copies run the same cases in bf16/fp16 on CUDA.
"""
import math
import zlib

import pytest
import torch

import reference as R
from cases import BIAS_FORMS, MASK_FORMS, as_ref4, make_bias, make_mask, qkv, ref_dbias
from conftest import devices
from flash_dmattn import flash_dmattn_func

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# B, Sq, Sk, H, Hkv, D, causal, mask form, bias form, softcap, dtype (fp32 becomes bf16 on CUDA)
GRID = [
    (1, 1, 1, 1, 1, 8, False, None, None, 0.0, F32),
    (1, 1, 31, 2, 1, 16, True, "2d", "row", 0.0, F32),
    (2, 17, 31, 4, 2, 24, True, "full", "full", 0.0, F32),
    (2, 113, 31, 4, 1, 40, True, "hkv", "row", 0.0, F32),
    (1, 1000, 257, 2, 2, 16, False, "2d", "3d", 0.0, F32),
    (1, 17, 4095, 2, 1, 64, True, "shared", "2d", 5.0, F32),
    (3, 31, 17, 6, 3, 36, False, "expand", "expand", 0.0, F32),
    (2, 17, 1, 2, 2, 8, True, "float", "lastdim1", 0.0, F32),
    (2, 33, 65, 4, 4, 128, True, "float", "lastdim1", 30.0, BF16),
    (2, 20, 50, 3, 1, 13, False, "3d", "shared", 0.0, F16),
    (1, 64, 64, 8, 2, 256, True, "row", "hkv", 0.0, BF16),
    (2, 45, 45, 2, 1, 96, False, None, "full", 0.0, F16),
]


def _id(c):
    B, Sq, Sk, H, Hkv, D, causal, mf, bf, sc, dt = c
    return f"B{B}-Sq{Sq}-Sk{Sk}-H{H}-Hkv{Hkv}-D{D}-{'causal' if causal else 'full'}-m{mf}-b{bf}-cap{sc}-{str(dt)[6:]}"


def _dtype_for(device, dtype):
    return BF16 if (device == "cuda" and dtype == F32) else dtype


def _check(name, x, ref, lowp):
    R.assert_spec_close(name, x.detach().cpu(), ref.cpu(), None if x.dtype == F32 else lowp.cpu())


def _run_case(case, device, grads, window=None, dropout=None):
    B, Sq, Sk, H, Hkv, D, causal, mf, bf, softcap, dtype = case
    dtype = _dtype_for(device, dtype)
    g = torch.Generator().manual_seed(zlib.crc32(_id(case).encode()))  # stable across runs: a failure repeats
    q, k, v = qkv(B, Sq, Sk, H, Hkv, D, dtype, device, requires_grad=grads, gen=g)
    mask_user = mask_ref = None
    if mf is not None:
        mask_user, mask_ref = make_mask(mf, B, H, Hkv, Sq, Sk, device, gen=g)
    leaf = bias_user = bias_ref = None
    if bf is not None:
        leaf, bias_user = make_bias(bf, B, H, Hkv, Sq, Sk, dtype, device, requires_grad=grads, gen=g)
        bias_ref = as_ref4(bias_user.detach(), bf, Sq, Sk)
    out, lse, probs = flash_dmattn_func(q, k, v, attn_mask=mask_user, attn_bias=bias_user, is_causal=causal,
                                        softcap=softcap, return_attn_probs=True, keep_window_size=window)
    dout = torch.randn(out.shape, generator=g).to(dtype).to(device) if grads else None
    kw = dict(mask=mask_ref, bias=bias_ref, causal=causal, softcap=softcap, window=window or 0, dout=dout)
    ref = R.attention_ref(q.detach(), k.detach(), v.detach(), **kw)
    low = R.attention_ref(q.detach(), k.detach(), v.detach(), precision="lowp", **kw) if dtype != F32 else {}
    _check("out", out, ref["out"], low.get("out"))
    _check("lse", lse, ref["lse"], low.get("lse"))
    _check("probs", probs, ref["probs"], low.get("probs"))
    if not grads:
        return
    out.backward(dout)
    for name, t in (("dq", q), ("dk", k), ("dv", v)):
        _check(name, t.grad, ref[name], low.get(name))
    if leaf is not None:
        want = ref_dbias(ref["dbias"], bf, leaf.shape)
        want_low = ref_dbias(low["dbias"], bf, leaf.shape) if low else None
        assert leaf.grad.shape == leaf.shape
        _check("dbias", leaf.grad, want, want_low)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", GRID, ids=_id)
def test_forward_grid(case, device):
    _run_case(case, device, grads=False)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", [c for c in GRID if c[1] * c[2] * c[3] <= 200_000], ids=_id)
def test_backward_grid(case, device):
    _run_case(case, device, grads=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("form", BIAS_FORMS)
def test_dbias_every_bias_form(form, device):
    _run_case((2, 19, 37, 4, 2, 16, True, "row", form, 0.0, F32), device, grads=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("form", MASK_FORMS)
def test_every_mask_form(form, device):
    _run_case((2, 23, 29, 4, 2, 16, False, form, "full", 0.0, F32), device, grads=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("window,causal,bf", [(1, False, "full"), (7, True, "full"), (16, True, "3d"),
                                              (5, False, "hkv"), (40, True, "row")])
def test_keep_window_size(window, causal, bf, device):
    """keep_window_size selects per row the top-`window` keys by (bias, j) (SPEC section 6), with gradients."""
    _run_case((2, 21, 37, 4, 2, 16, causal, "row", bf, 0.0, F32), device, grads=True, window=window)


@pytest.mark.parametrize("device", devices())
def test_window_ties_go_to_recent_keys(device):
    """A constant bias ties every key: the window keeps the `window` most recent visible keys of each row."""
    dtype = _dtype_for(device, F32)
    B, Sq, Sk, H, D, W = 1, 9, 20, 2, 8, 4
    q, k, v = qkv(B, Sq, Sk, H, H, D, dtype, device)
    bias = torch.zeros(B, H, 1, Sk, dtype=dtype, device=device)
    _, _, probs = flash_dmattn_func(q, k, v, attn_bias=bias, is_causal=True, keep_window_size=W,
                                    return_attn_probs=True)
    for i in range(Sq):
        last = i + Sk - Sq
        kept = (probs[0, 0, i] > 0).nonzero().flatten().tolist()
        assert kept == list(range(last - W + 1, last + 1)), (i, kept)


@pytest.mark.parametrize("device", devices())
def test_fully_masked_and_neg_inf_bias_rows(device):
    """Rows with nothing visible (mask, causal Sq > Sk, all -inf bias): out 0, lse -inf, grads 0, no NaN."""
    dtype = _dtype_for(device, F32)
    B, Sq, Sk, H, D = 1, 12, 5, 2, 16
    q, k, v = qkv(B, Sq, Sk, H, H, D, dtype, device, requires_grad=True)
    bias = torch.randn(B, H, Sq, Sk).to(dtype).to(device)
    bias[:, :, 10] = -math.inf
    bias = bias.requires_grad_()
    mask = torch.ones(B, H, Sq, Sk, dtype=torch.bool, device=device)
    mask[:, :, 9] = False
    out, lse, _ = flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True,
                                    return_attn_probs=True)
    dead = [i for i in range(Sq) if i + Sk - Sq < 0] + [9, 10]
    assert torch.all(out[:, dead] == 0) and torch.all(lse[:, :, dead] == -math.inf)
    out.sum().backward()
    for t in (q, k, v, bias):
        assert not torch.isnan(t.grad).any()
    assert torch.all(q.grad[:, dead] == 0) and torch.all(bias.grad[:, :, dead] == 0)


@pytest.mark.parametrize("device", devices())
def test_noncontiguous_qkv_and_scale(device):
    """q/k/v as transposed views of (B, H, S, D) tensors; an explicit scale."""
    dtype = _dtype_for(device, F32)
    B, Sq, Sk, H, D = 2, 13, 27, 3, 32
    qh = torch.randn(B, H, Sq, D).to(dtype).to(device)
    kh = torch.randn(B, H, Sk, D).to(dtype).to(device)
    vh = torch.randn(B, H, Sk, D).to(dtype).to(device)
    q, k, v = (t.transpose(1, 2) for t in (qh, kh, vh))
    out = flash_dmattn_func(q, k, v, scale=0.3, is_causal=True)
    ref = R.attention_ref(q, k, v, scale=0.3, causal=True)
    low = R.attention_ref(q, k, v, scale=0.3, causal=True, precision="lowp") if dtype != F32 else {}
    _check("out", out, ref["out"], low.get("out"))


@pytest.mark.parametrize("device", devices())
def test_deterministic_backward_is_bitwise(device):
    dtype = _dtype_for(device, F32)
    q, k, v = qkv(2, 50, 70, 4, 2, 32, dtype, device, requires_grad=True)
    bias = torch.randn(2, 2, 1, 70).to(dtype).to(device).requires_grad_()
    grads = []
    for _ in range(2):
        for t in (q, k, v, bias):
            t.grad = None
        flash_dmattn_func(q, k, v, attn_bias=bias, is_causal=True, deterministic=True).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v, bias)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
