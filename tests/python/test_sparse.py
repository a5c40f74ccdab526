"""
test_sparse.py -- issue 8 on the CUDA backend: keep_window_size with is_causal=True and a per-key bias
(B|1, H|Hkv|1, 1, Sk) runs the fused sparse path (per-row causal top-w of SPEC section 6, selected inside the
call, no (Sq, Sk) mask), and a bias with Sq rows runs the window path; both must equal the dense-mask path given
the materialised selection. Every test is GPU-marked (the device machine runs them):

    FDMA_LIBRARY=build/libflashdma.so pytest -m gpu tests/python/test_sparse.py -q

Shapes: q (B, Sq, H, D); k, v (B, Sk, Hkv, D); bias forms "kv" (B, Hkv, 1, Sk), "b1" (B, 1, 1, Sk), "h1"
(1, H, 1, Sk), "full" (B, Hkv, Sq, Sk); base mask (B, Hkv, 1, Sk) bool; sel = create_mask(bias, base mask,
is_causal, w, query_len=Sq) with dims ({B|1}, Hx, Sq, Sk) for causal (Hx: the larger head count of the two).

Tests:
  kernel names     fdma_query says "_sparse" (forward and backward) for a causal per-key bias, "_window" for a
                   bias with Sq rows and for a non-causal per-key bias
  grid             sel computed by the CPU backend (C library) and moved to the GPU; out, lse, dq, dk, dv,
                   dbias of the fused call (attn_mask=base, keep_window_size=w) and of the dense-mask call
                   (attn_mask=sel, no window) each pass SPEC section 8 against reference.py in float64 with
                   mask=sel; dk, dv, dbias exactly 0 at keys that no row selected
  selection        the GPU selection read out exactly through dv (dout one-hot per query row: dv[b, j, hk, i] =
                   sum over the group's heads of p[b, h, i, j], nonzero iff key j is selected for row i) equals
                   the CPU selection, with ties (constant bias, few distinct values)
  deterministic    deterministic=True gives bitwise equal out and grads over 3 runs
  flash_dma        fwd/bwd with active_mask=None and keep_window_size=w vs the same calls with the materialised
                   active mask, both against the reference
  memory           Sq=Sk=32768, w=512: peak allocation of forward+backward <= 3x the bytes of the call's own
                   tensors + 64 MiB (a (Sq, Sk) bool mask alone is 1 GiB); last 64 rows' out, dq against float64
The grid is a hand-picked subset of the product (dtype x B x heads x bias form x base mask x sizes x D x w x
bias values) that covers every value of every axis; its ids print each case's parameters.
"""
import gc
import zlib
from collections import namedtuple

import pytest
import torch

import flash_dma
import flash_dmattn
import reference as R
from cases import qkv
from flash_dmattn import _lib, flash_dmattn_func
from flash_dmattn._inputs import prepare_mask_bias
from flash_dmattn.flash_dmattn_interface import pad_head_dim, padded_head_dim, resolve_options
from flash_dmattn.utils import create_mask

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not flash_dmattn.CUDA_AVAILABLE,
                                 reason="libflashdma.so has no usable CUDA backend here")]

BF16, F16 = torch.bfloat16, torch.float16
DEV = "cuda"  # where the tests run (a module constant: the checks' logic can be dry-run on the CPU backend)

# w: an int, or "Sk-1" / "Sk" (relative to the case's Sk). vals: "randn" (N(0, 2^2)), "const" (every key ties),
# "few" (values in {-0.5, 0, 0.5}: many ties). mask: a per-key base mask (B, Hkv, 1, Sk) whose (b=0, hk=0)
# slice is all False (rows with no candidate: out 0, lse -inf, zero grads).
Case = namedtuple("Case", "dtype B H Hkv bias mask Sq Sk D w vals")

GRID = [
    Case(BF16, 1, 4, 4, "kv", False, 1, 1000, 128, 64, "randn"),
    Case(F16, 2, 8, 2, "b1", True, 1, 1000, 64, 7, "few"),
    Case(F16, 1, 4, 1, "kv", True, 1, 1000, 40, "Sk-1", "const"),
    Case(BF16, 2, 8, 2, "kv", True, 77, 300, 64, 1, "randn"),
    Case(F16, 1, 4, 1, "h1", False, 77, 300, 128, 7, "const"),
    Case(BF16, 2, 4, 4, "h1", True, 77, 300, 40, "Sk-1", "randn"),
    Case(BF16, 1, 8, 2, "kv", False, 77, 300, 64, 1000, "few"),           # w > Sk: no selection at all
    Case(BF16, 1, 8, 2, "kv", False, 300, 77, 128, 7, "randn"),           # Sq > Sk: leading rows see nothing
    Case(F16, 2, 4, 1, "b1", True, 300, 77, 64, "Sk", "randn"),
    Case(BF16, 2, 4, 4, "kv", True, 257, 257, 64, 64, "few"),
    Case(F16, 1, 8, 2, "h1", False, 257, 257, 40, 1, "randn"),
    Case(BF16, 1, 4, 1, "kv", False, 257, 257, 128, "Sk-1", "const"),
    Case(BF16, 1, 4, 1, "kv", True, 1000, 4095, 128, 1000, "randn"),
    Case(F16, 1, 8, 2, "b1", False, 1000, 4095, 64, 64, "few"),
    Case(BF16, 2, 4, 4, "h1", False, 1000, 4095, 64, 7, "const"),
    Case(BF16, 1, 4, 4, "kv", False, 1000, 4095, 36, "Sk-1", "randn"),    # D=36: padded to 40 by the Python layer
    Case(BF16, 2, 8, 2, "full", True, 77, 300, 64, 7, "randn"),           # bias with Sq rows: the window path
    Case(F16, 1, 4, 1, "full", False, 257, 257, 128, 64, "few"),
]


def _w(c):
    return {"Sk-1": c.Sk - 1, "Sk": c.Sk}.get(c.w, c.w)


def _id(c):
    return (f"{str(c.dtype)[6:]}-B{c.B}-H{c.H}-Hkv{c.Hkv}-b{c.bias}-{'m' if c.mask else 'nom'}-Sq{c.Sq}-Sk{c.Sk}"
            f"-D{c.D}-w{_w(c)}-{c.vals}")


def _bias_shape(c):
    return {"kv": (c.B, c.Hkv, 1, c.Sk), "b1": (c.B, 1, 1, c.Sk), "h1": (1, c.H, 1, c.Sk),
            "full": (c.B, c.Hkv, c.Sq, c.Sk)}[c.bias]


def _make(c, qk_scale=1.0, bias_scale=2.0):
    """(q, k, v, bias, base mask or None, dout) on the GPU; q, k, v, bias require grad. Stable seed per case."""
    g = torch.Generator().manual_seed(zlib.crc32(_id(c).encode()))
    q, k, v = qkv(c.B, c.Sq, c.Sk, c.H, c.Hkv, c.D, torch.float32, "cpu", gen=g)
    q, k = q * qk_scale, k * qk_scale
    q, k, v = (t.to(c.dtype).to(DEV).requires_grad_() for t in (q, k, v))
    shape = _bias_shape(c)
    if c.vals == "const":
        b = torch.full(shape, 0.75)
    elif c.vals == "few":
        b = torch.randint(0, 3, shape, generator=g).float() * 0.5 - 0.5
    else:
        b = torch.randn(shape, generator=g) * bias_scale
    bias = b.to(c.dtype).to(DEV).requires_grad_()
    mask = None
    if c.mask:
        m = torch.rand(c.B, c.Hkv, 1, c.Sk, generator=g) > 0.3
        m[0, 0] = False
        mask = m.to(DEV)
    dout = torch.randn(c.B, c.Sq, c.H, c.D, generator=g).to(c.dtype).to(DEV)
    return q, k, v, bias, mask, dout


def _cpu_selection(bias, mask, Sq, causal, w):
    """SPEC section 6 keep mask computed by the CPU backend (fdma_create_mask), moved to the GPU."""
    sel = create_mask(bias.detach().cpu(), None if mask is None else mask.cpu(), is_causal=causal,
                      keep_window_size=w, query_len=Sq)
    return sel.to(DEV)


def _lib_args(q, k, v, mask, bias, w):
    """What flash_dmattn_func hands to the C library: padded q/k/v, 4-D mask/bias views, scale, window."""
    D, Sk = q.shape[-1], k.shape[1]
    mask4, bias4 = prepare_mask_bias(q, k, mask, bias)
    bias4 = None if bias4 is None else bias4.detach()
    scale, _, _, window = resolve_options(D, Sk, bias4, None, None, 0.0, w)
    D8 = padded_head_dim(q)
    qp, kp, vp = (pad_head_dim(t.detach(), D8) for t in (q, k, v))
    return qp, kp, vp, mask4, bias4, scale, window


def _kernel_names(q, k, v, mask, bias, w, causal=True):
    qp, kp, vp, mask4, bias4, _, window = _lib_args(q, k, v, mask, bias, w)
    return (_lib.query(qp, kp, vp, mask4, bias4, causal=causal, window=window),
            _lib.query(qp, kp, vp, mask4, bias4, causal=causal, window=window, backward=True))


def _lse(q, k, v, mask, bias, w, causal=True):
    """lse of the same library call flash_dmattn_func makes (it returns lse only with return_attn_probs, which
    would also ask the library for the (B, H, Sq, Sk) probabilities)."""
    qp, kp, vp, mask4, bias4, scale, window = _lib_args(q, k, v, mask, bias, w)
    with torch.no_grad():
        _, lse, _ = _lib.run_fwd(qp, kp, vp, mask4, bias4, scale, causal, 0.0, window, 0.0, 0, 0, False)
    return lse


def _run(q, k, v, bias, mask, dout, causal=True, **kw):
    """out and (dq, dk, dv, dbias) of flash_dmattn_func (autograd)."""
    for t in (q, k, v, bias):
        t.grad = None
    out = flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=causal, **kw)
    out.backward(dout)
    return out.detach(), {"dq": q.grad.clone(), "dk": k.grad.clone(), "dv": v.grad.clone(),
                          "dbias": bias.grad.clone()}


def _close(name, x, ref, low):
    R.assert_spec_close(name, x.detach().cpu(), ref.cpu(), low.cpu())


def _selected_per_head(sel, B, H, Hkv):
    """sel ({B|1}, Hx, R, Sk) -> (B, H, R, Sk): the selection each query head uses."""
    s = R.expand_heads(sel, H, Hkv)
    return s.expand(B, H, s.shape[2], s.shape[3])


def _check_unselected_zero(tag, sel, grads, bias_shape, B, H, Hkv):
    """dk, dv: exactly 0 at (b, j, hk) that no row of any head of the group selected; dbias: exactly 0 at the
    elements that no selected (b, h, i, j) maps to."""
    selh = _selected_per_head(sel, B, H, Hkv)                                # (B, H, R, Sk)
    Sk = selh.shape[-1]
    used_kv = selh.any(2).view(B, Hkv, H // Hkv, Sk).any(2).transpose(1, 2)  # (B, Sk, Hkv)
    for name in ("dk", "dv"):
        g = grads[name]
        assert not torch.isnan(g).any(), f"{tag} {name}: NaN"
        bad = (g[~used_kv] != 0).any(-1)
        assert not bad.any(), f"{tag} {name}: {int(bad.sum())} never-selected keys have a nonzero gradient"
    used_b = R.reduce_to_shape(selh.double(), bias_shape, H, Hkv) > 0
    db = grads["dbias"]
    assert not torch.isnan(db).any(), f"{tag} dbias: NaN"
    bad = db[~used_b] != 0
    assert not bad.any(), f"{tag} dbias: {int(bad.sum())} never-selected entries are nonzero"


def _check_against_dense_path(c, causal):
    w = _w(c)
    q, k, v, bias, mask, dout = _make(c)
    sel = _cpu_selection(bias, mask, c.Sq, causal, w)

    fused_out, fused_g = _run(q, k, v, bias, mask, dout, causal=causal, keep_window_size=w)
    fused_lse = _lse(q, k, v, mask, bias, w, causal=causal)
    dense_out, dense_g = _run(q, k, v, bias, sel, dout, causal=causal)
    dense_lse = _lse(q, k, v, sel, bias, None, causal=causal)

    kw = dict(mask=sel, bias=bias.detach(), causal=causal, dout=dout)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    ref = R.attention_ref(qd, kd, vd, **kw)
    low = R.attention_ref(qd, kd, vd, precision="lowp", **kw)
    for tag, out, lse, g in (("fused", fused_out, fused_lse, fused_g), ("dense-mask", dense_out, dense_lse, dense_g)):
        _close(f"{tag} out", out, ref["out"], low["out"])
        _close(f"{tag} lse", lse, ref["lse"], low["lse"])
        for name in ("dq", "dk", "dv", "dbias"):
            _close(f"{tag} {name}", g[name], ref[name], low[name])
    _check_unselected_zero("fused", sel, fused_g, tuple(bias.shape), c.B, c.H, c.Hkv)


# ---------------------------------------------------------------------------------------------------------
# Which kernel runs

@pytest.mark.parametrize("case", [c for c in GRID if _w(c) < c.Sk], ids=_id)
def test_kernel_names(case):
    """Causal per-key bias -> "_sparse" forward and backward; a bias with Sq rows -> "_window"."""
    q, k, v, bias, mask, _ = _make(case)
    fwd, bwd = _kernel_names(q, k, v, mask, bias, _w(case))
    want = "_window" if case.bias == "full" else "_sparse"
    assert want in fwd, f"forward runs {fwd!r}, expected a name containing {want!r}"
    assert want in bwd, f"backward runs {bwd!r}, expected a name containing {want!r}"


# ---------------------------------------------------------------------------------------------------------
# Results: fused path == dense-mask path with the CPU selection, both against float64

@pytest.mark.parametrize("case", GRID, ids=_id)
def test_fused_equals_dense_mask_path(case):
    _check_against_dense_path(case, causal=True)


NONCAUSAL = [
    Case(BF16, 2, 8, 2, "kv", True, 77, 300, 64, 7, "randn"),
    Case(F16, 1, 4, 1, "b1", False, 1000, 4095, 128, 1000, "few"),
]


@pytest.mark.parametrize("case", NONCAUSAL, ids=_id)
def test_noncausal_per_key_window(case):
    """Non-causal per-key bias: one selection (B, Hx, 1, Sk) for every row, the "_window" path."""
    q, k, v, bias, mask, _ = _make(case)
    fwd, bwd = _kernel_names(q, k, v, mask, bias, _w(case), causal=False)
    assert "_window" in fwd and "_window" in bwd, (fwd, bwd)
    _check_against_dense_path(case, causal=False)


# ---------------------------------------------------------------------------------------------------------
# Selection equality, exact

SELECTION = [
    Case(BF16, 2, 4, 4, "kv", False, 77, 300, 128, 7, "const"),
    Case(F16, 1, 4, 2, "h1", True, 128, 4095, 128, 64, "few"),    # heads of a group select differently
    Case(BF16, 2, 8, 2, "b1", True, 1, 1000, 128, 1, "few"),
    Case(BF16, 1, 4, 1, "kv", False, 100, 77, 128, 7, "randn"),   # Sq > Sk
    Case(F16, 1, 4, 4, "kv", False, 128, 4095, 128, 1000, "randn"),
]


@pytest.mark.parametrize("case", SELECTION, ids=_id)
def test_selection_equals_cpu_exactly(case):
    """dout[b, i, h, :] = e_i (one-hot at d = i; needs Sq <= D) makes dv[b, j, hk, i] = sum over the group's
    heads h of p[b, h, i, j]: nonzero exactly where row i selected key j. Scores are kept small (q, k scaled by
    0.5, bias N(0, 0.5^2)) so that no selected p underflows in the output dtype."""
    c = case
    assert c.Sq <= c.D
    q, k, v, bias, mask, _ = _make(c, qk_scale=0.5, bias_scale=0.5)
    w = _w(c)
    dout = torch.zeros(c.B, c.Sq, c.H, c.D, dtype=c.dtype, device=DEV)
    idx = torch.arange(c.Sq, device=DEV)
    dout[:, idx, :, idx] = 1
    _, g = _run(q, k, v, bias, mask, dout, keep_window_size=w)
    got = g["dv"][..., :c.Sq] != 0                                           # (B, Sk, Hkv, Sq)
    sel = _cpu_selection(bias, mask, c.Sq, True, w)
    selh = _selected_per_head(sel, c.B, c.H, c.Hkv)                          # (B, H, Sq, Sk)
    want = selh.view(c.B, c.Hkv, c.H // c.Hkv, c.Sq, c.Sk).any(2).permute(0, 3, 1, 2)
    if not torch.equal(got, want):
        b, j, hk, i = (int(x) for x in (got != want).nonzero()[0])
        gpu = got[b, :, hk, i].nonzero().flatten().tolist()
        cpu = want[b, :, hk, i].nonzero().flatten().tolist()
        raise AssertionError(f"{int((got != want).sum())} (row, key) pairs differ; first at b={b} hk={hk} row {i}: "
                             f"GPU keys {gpu[:20]}{'...' if len(gpu) > 20 else ''} ({len(gpu)}), "
                             f"CPU keys {cpu[:20]}{'...' if len(cpu) > 20 else ''} ({len(cpu)})")


# ---------------------------------------------------------------------------------------------------------
# deterministic=True

@pytest.mark.parametrize("case", [Case(BF16, 1, 8, 2, "kv", True, 1000, 4095, 128, 64, "randn"),
                                  Case(F16, 2, 4, 1, "b1", False, 257, 257, 64, 7, "few")], ids=_id)
def test_deterministic_is_bitwise(case):
    q, k, v, bias, mask, dout = _make(case)
    runs = [_run(q, k, v, bias, mask, dout, keep_window_size=_w(case), deterministic=True) for _ in range(3)]
    out0, g0 = runs[0]
    for out, g in runs[1:]:
        assert torch.equal(out, out0), "out differs between runs"
        for name in g0:
            assert torch.equal(g[name], g0[name]), f"{name} differs between runs with deterministic=True"


# ---------------------------------------------------------------------------------------------------------
# flash_dma (first API document): active_mask=None selects from zoh

@pytest.mark.parametrize("case,zform", [(Case(BF16, 2, 8, 2, "kv", False, 77, 300, 64, 7, "randn"), "4d"),
                                        (Case(F16, 1, 4, 1, "kv", False, 257, 257, 128, 64, "few"), "3d")],
                         ids=lambda x: _id(x) if isinstance(x, Case) else x)
def test_flash_dma_active_mask_none(case, zform):
    """fwd/bwd(zoh, None, keep_window_size=w) vs fwd/bwd(zoh, create_mask(zoh)): both against the reference."""
    c = case
    w = _w(c)
    q, k, v, bias, _, dout = _make(c)
    q, k, v, zoh4 = (t.detach() for t in (q, k, v, bias))
    zoh = zoh4[:, :, 0] if zform == "3d" else zoh4                          # (B, Hkv, Sk) or (B, Hkv, 1, Sk)
    assert "_sparse" in _kernel_names(q, k, v, None, zoh4, w)[0]
    active = _cpu_selection(zoh4, None, c.Sq, True, w)                       # (B, Hkv, Sq, Sk)
    kw = dict(mask=active, bias=zoh4, causal=True, dout=dout)
    ref = R.attention_ref(q, k, v, **kw)
    low = R.attention_ref(q, k, v, precision="lowp", **kw)
    for tag, am in (("active_mask=None", None), ("materialised", active)):
        o, lse, p, _ = flash_dma.fwd(q, k, v, zoh, am, is_causal=True, keep_window_size=w)
        assert p is None
        _close(f"{tag} out", o, ref["out"], low["out"])
        _close(f"{tag} lse", lse, ref["lse"], low["lse"])
        dq, dk, dv, dbias = flash_dma.bwd(dout, q, k, v, zoh, am, o, lse, is_causal=True, keep_window_size=w)
        assert dbias.shape == zoh.shape
        for name, x in (("dq", dq), ("dk", dk), ("dv", dv)):
            _close(f"{tag} {name}", x, ref[name], low[name])
        _close(f"{tag} dbias", dbias.reshape(zoh4.shape), ref["dbias"], low["dbias"])


# ---------------------------------------------------------------------------------------------------------
# Memory: nothing of size (Sq, Sk)

def test_memory_long_context_no_dense_mask():
    """Sq = Sk = 32768, B=1, H=4, Hkv=1, D=64, w=512, bf16: peak allocation over forward + backward.

    Own tensors (bytes): q, out, dout, dq 4 x 16 MiB (B*S*H*D*2); k, v, dk, dv 4 x 4 MiB; lse 0.5 MiB; bias and
    dbias 2 x 64 KiB: about 80.6 MiB in all. Bound: 3x that (room for fp32 accumulators and the selected-key
    lists, O(Sq * w) ints = 64 MiB here) plus 64 MiB, about 306 MiB. A (Sq, Sk) bool mask alone would be 1 GiB,
    a (Sq, Sk) bf16 score tile per head 2 GiB."""
    B, S, H, Hkv, D, w = 1, 32768, 4, 1, 64, 512
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(8)
    q, k, v = qkv(B, S, S, H, Hkv, D, BF16, DEV, requires_grad=True, gen=g)
    bias = (torch.randn(B, Hkv, 1, S, generator=g) * 2).to(BF16).to(DEV).requires_grad_()
    dout = torch.randn(B, S, H, D, generator=g).to(BF16).to(DEV)
    assert "_sparse" in _kernel_names(q, k, v, None, bias, w)[0]
    out = flash_dmattn_func(q, k, v, attn_bias=bias, keep_window_size=w, is_causal=True)
    out.backward(dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    own = sum(t.numel() * t.element_size() for t in (q, k, v, bias, out, dout, q.grad, k.grad, v.grad, bias.grad))
    own += B * H * S * 4                                                     # lse (fp32), saved for backward
    bound = 3 * own + 64 * 2**20
    assert peak <= bound, (f"peak {peak / 2**20:.1f} MiB over forward+backward > bound {bound / 2**20:.1f} MiB "
                           f"(3 x {own / 2**20:.1f} MiB of q, k, v, bias, out, dout, lse, grads + 64 MiB)")
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad), ("dbias", bias.grad)):
        assert not torch.isnan(t).any(), f"{name}: NaN"

    # Spot check of the last 64 rows (bottom-right causal: rows S-64..S-1 of the full problem) against float64,
    # selection by reference.topk_keep: out and dq of a row depend on that row alone.
    n = 64
    qs, ds = q.detach()[:, -n:], dout[:, -n:]
    kw = dict(bias=bias.detach(), causal=True, window=w, dout=ds)
    ref = R.attention_ref(qs, k.detach(), v.detach(), **kw)
    low = R.attention_ref(qs, k.detach(), v.detach(), precision="lowp", **kw)
    _close("out[-64:]", out[:, -n:], ref["out"], low["out"])
    _close("dq[-64:]", q.grad[:, -n:], ref["dq"], low["dq"])
