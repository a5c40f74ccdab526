"""
test_ops.py -- the torch operator layer and the package surface:
  * torch.library.opcheck on flash_dmattn::fwd and flash_dmattn::bwd (schema, fake tensors, autograd
    registration, AOT dispatch), with and without mask / bias / dropout;
  * torch.compile(fullgraph=True) through forward and backward equals eager;
  * dropout: bits follow the torch generator (manual_seed / get_rng_state reproduce them, successive calls
    differ) and equal reference.dropout_keep for the (seed, offset) the generator gives;
  * errors: ValueError / TypeError naming the argument, from Python checks and from the C library's status;
  * the ctypes binding: struct size, version refusal, fdma_dropout_keep against reference.dropout_keep;
  * get_available_backends / flash_dmattn_func_auto / availability flags;
  * fdma_params.rng_state (the pair read from memory at run time) against the pair by value;
  * GPU: CUDA-graph capture and replay (forward and backward), the current stream; dropout inside a capture:
    test_graphs.py.
"""
import ctypes

import numpy as np
import pytest
import torch

import flash_dmattn
import reference as R
from cases import capture_graph, qkv
from conftest import devices
from flash_dmattn import _lib, _ops, flash_dmattn_func

F32, BF16 = torch.float32, torch.bfloat16
cuda_backend = pytest.mark.skipif(not flash_dmattn.CUDA_AVAILABLE,
                                  reason="libflashdma.so has no usable CUDA backend here")


def _dt(device):
    return BF16 if device == "cuda" else F32


def _close(name, x, ref, low):
    R.assert_spec_close(name, x.detach().cpu(), ref.cpu(), None if x.dtype == F32 else low.cpu())


# ---------------------------------------------------------------------------------------------------------
# opcheck

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("variant", ["plain", "mask_bias", "dropout", "window_softcap"])
def test_opcheck(variant, device):
    dt = _dt(device)
    B, Sq, Sk, H, Hkv, D = 2, 9, 13, 4, 2, 16
    q, k, v = qkv(B, Sq, Sk, H, Hkv, D, dt, device, requires_grad=True)
    mask = bias = rng = None
    p_drop, window, softcap = 0.0, 0, 0.0
    if variant != "plain":
        mask = torch.rand(B, 1, Sq, Sk, device=device) > 0.3
        bias = torch.randn(B, Hkv, 1, Sk).to(dt).to(device).requires_grad_()
    if variant == "dropout":
        p_drop, rng = 0.25, _ops.rng_state_tensor(11, 3)
    if variant == "window_softcap":
        window, softcap = 5, 2.0
    args = (q, k, v, mask, bias, 0.3, True, softcap, window, p_drop, variant == "mask_bias", False, rng)
    torch.library.opcheck(_ops.fwd_op, args)
    out, lse, _, rng_state = _ops.fwd_op(*args)
    dout = torch.randn_like(out)
    bargs = (dout, q.detach(), k.detach(), v.detach(), mask, None if bias is None else bias.detach(),
             out.detach(), lse, 0.3, True, softcap, window, p_drop, rng_state, False, bias is not None)
    torch.library.opcheck(_ops.bwd_op, bargs)


@pytest.mark.parametrize("device", devices())
def test_eager_no_grad_path_equals_operator(device):
    """Calls that need no autograd graph skip the operator's dispatch: same results, same dropout bits."""
    dt = _dt(device)
    q, k, v = qkv(2, 19, 23, 4, 2, 16, dt, device)
    bias = torch.randn(2, 2, 1, 23).to(dt).to(device)
    kw = dict(attn_bias=bias, is_causal=True, dropout_p=0.3, return_attn_probs=True, keep_window_size=9)
    torch.manual_seed(5)
    eager = flash_dmattn_func(q, k, v, **kw)
    torch.manual_seed(5)
    with torch.enable_grad():
        op = flash_dmattn_func(q, k, v.clone().requires_grad_(), **kw)
    assert op[0].requires_grad and not eager[0].requires_grad
    for a, b in zip(eager, op):
        assert torch.equal(a, b.detach())


# ---------------------------------------------------------------------------------------------------------
# torch.compile

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_forward_backward(backend, device):
    dt = _dt(device)
    B, Sq, Sk, H, Hkv, D = 2, 17, 23, 4, 2, 12
    q, k, v = qkv(B, Sq, Sk, H, Hkv, D, dt, device, requires_grad=True)
    bias = torch.randn(B, Hkv, Sk).to(dt).to(device).requires_grad_()       # 3-D form: reshaped inside
    mask = torch.rand(B, Sk, device=device) > 0.2                            # 2-D padding mask

    def f(q, k, v, mask, bias):
        return flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True, softcap=4.0)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend=backend)
    grads = []
    for fn in (cf, f):
        for t in (q, k, v, bias):
            t.grad = None
        out = fn(q, k, v, mask, bias)
        out.backward(torch.ones_like(out))
        grads.append([out.detach()] + [t.grad.clone() for t in (q, k, v, bias)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_with_dropout_draws_at_run_time():
    q, k, v = qkv(1, 8, 8, 2, 2, 16, F32, "cpu")
    f = torch.compile(lambda q, k, v: flash_dmattn_func(q, k, v, dropout_p=0.5), fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    a = f(q, k, v)
    b = f(q, k, v)
    torch.manual_seed(3)
    c = f(q, k, v)
    assert torch.equal(a, c) and not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# dropout and the torch generator

@pytest.mark.parametrize("device", devices())
def test_dropout_follows_generator_and_matches_reference(device):
    dt = _dt(device)
    B, Sq, Sk, H, Hkv, D, pd = 2, 21, 34, 4, 2, 16, 0.2
    q, k, v = qkv(B, Sq, Sk, H, Hkv, D, dt, device, requires_grad=True)
    bias = torch.randn(B, H, Sq, Sk).to(dt).to(device).requires_grad_()
    torch.manual_seed(77)
    seed, offset = _ops.draw_rng_state(q.device)
    torch.manual_seed(77)
    out = flash_dmattn_func(q, k, v, attn_bias=bias, is_causal=True, dropout_p=pd)
    dout = torch.randn(out.shape).to(dt).to(device)
    out.backward(dout)
    kw = dict(bias=bias.detach(), causal=True, p_drop=pd, seed=seed, offset=offset, dout=dout)
    ref = R.attention_ref(q.detach(), k.detach(), v.detach(), **kw)
    low = R.attention_ref(q.detach(), k.detach(), v.detach(), precision="lowp", **kw) if dt != F32 else {}
    _close("out", out, ref["out"], low.get("out"))
    for name, t in (("dq", q), ("dk", k), ("dv", v), ("dbias", bias)):
        _close(name, t.grad, ref[name], low.get(name))
    # successive calls differ; restoring the generator state repeats them
    gen = _ops._default_generator(q.device)
    state = gen.get_state()
    a = flash_dmattn_func(q, k, v, dropout_p=pd)
    b = flash_dmattn_func(q, k, v, dropout_p=pd)
    gen.set_state(state)
    c = flash_dmattn_func(q, k, v, dropout_p=pd)
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_keep_bits_library_vs_reference():
    """fdma_dropout_keep (the library's SPEC section 5 function) == reference.dropout_keep, bit for bit."""
    B, H, Sq, Sk = 2, 3, 5, 37
    for seed, offset, pd in ((0, 0, 0.5), (2**63 + 12345, 2**40 + 7, 0.1), (987654321, 3, 0.9)):
        want = R.dropout_keep(B, H, Sq, Sk, pd, seed, offset)
        got = torch.tensor([[[[_lib.dropout_keep(seed, offset, (b * H + h) * Sq + i, j, pd) for j in range(Sk)]
                              for i in range(Sq)] for h in range(H)] for b in range(B)])
        assert torch.equal(got, want)


def test_philox_known_answer():
    """Random123 known-answer vector through fdma_philox4x32_10 and reference.philox4x32_10."""
    lib = _lib.load()
    key = (ctypes.c_uint32 * 2)(0xA4093822, 0x299F31D0)
    ctr = (ctypes.c_uint32 * 4)(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
    out = (ctypes.c_uint32 * 4)()
    lib.fdma_philox4x32_10(key, ctr, out)
    want = [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    assert list(out) == want
    ref = R.philox4x32_10((0xA4093822, 0x299F31D0), [np.uint64(x) for x in (0x243F6A88, 0x85A308D3, 0x13198A2E,
                                                                             0x03707344)])
    assert [int(x) for x in ref] == want


# ---------------------------------------------------------------------------------------------------------
# errors

def test_python_errors_name_the_argument():
    q, k, v = qkv(1, 8, 8, 4, 2, 16, F32, "cpu")
    cases = [
        (ValueError, "query", lambda: flash_dmattn_func(q[0], k, v)),
        (TypeError, "key", lambda: flash_dmattn_func(q, k.double(), v)),
        (ValueError, "value", lambda: flash_dmattn_func(q, k, v[:, :4])),
        (ValueError, "key", lambda: flash_dmattn_func(q, k[:, :, :1].expand(1, 8, 3, 16), v[:, :, :1].expand(1, 8, 3, 16))),
        (ValueError, "attn_mask", lambda: flash_dmattn_func(q, k, v, attn_mask=torch.ones(1, 3, 8, 8))),
        (ValueError, "attn_mask", lambda: flash_dmattn_func(q, k, v, attn_mask=torch.ones(8))),
        (TypeError, "attn_bias", lambda: flash_dmattn_func(q, k, v, attn_bias=torch.zeros(1, 4, 8, 8).half())),
        (ValueError, "attn_bias", lambda: flash_dmattn_func(q, k, v, attn_bias=torch.zeros(2, 4, 8, 8))),
        (ValueError, "dropout_p", lambda: flash_dmattn_func(q, k, v, dropout_p=1.0)),
        (ValueError, "softcap", lambda: flash_dmattn_func(q, k, v, softcap=-1.0)),
        (ValueError, "keep_window_size", lambda: flash_dmattn_func(q, k, v, keep_window_size=0)),
        (ValueError, "keep_window_size", lambda: flash_dmattn_func(q, k, v, keep_window_size=3)),
        (TypeError, "query", lambda: flash_dmattn_func(q.double(), k.double(), v.double())),
    ]
    for exc, name, fn in cases:
        with pytest.raises(exc, match=name):
            fn()


def test_library_errors_carry_the_message():
    """Errors found by the C library come back as ValueError with fdma_last_error()."""
    q, k, v = qkv(1, 8, 8, 2, 2, 300, F32, "cpu")
    with pytest.raises(ValueError, match="FDMA_STATUS_INVALID_ARGUMENT.*D: head dim"):
        flash_dmattn_func(q, k, v)
    q, k, v = qkv(1, 8, 8, 2, 2, 16, F32, "cpu")
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)                 # last dim not contiguous
    with pytest.raises(ValueError, match="q: last dim must be contiguous"):
        _lib.run_fwd(qt, k, v, None, None, None, False, 0.0, 0, 0.0, 0, 0, False)
    with pytest.raises(ValueError, match="window"):
        _lib.run_fwd(q, k, v, None, None, None, False, 0.0, 3, 0.0, 0, 0, False)


# ---------------------------------------------------------------------------------------------------------
# binding and package surface

def test_binding_layout_and_version_refusal(monkeypatch):
    lib = _lib.load()
    assert lib.fdma_params_size() == ctypes.sizeof(_lib.Params)
    assert lib.fdma_version() == _lib.FDMA_VERSION
    monkeypatch.setattr(_lib, "FDMA_VERSION", _lib.FDMA_VERSION + 1)
    with pytest.raises(ImportError, match="version"):
        _lib._load_from(_lib.LIBRARY_PATH)


@pytest.mark.parametrize("device", devices())
def test_rng_state_pointer_equals_by_value(device):
    """fdma_params.rng_state (an int64[2] (seed, offset) tensor on the call's device, read by the kernels when
    they run) gives bitwise the forward and backward of the same pair by value, whatever the by-value fields
    say; another pair gives other keep bits; fwd_op's rng_in takes the same path and comes back as a copy."""
    assert _lib.Params.rng_state.offset == _lib.Params.offset.offset + 8        # right after offset
    dt = _dt(device)
    B, Sq, Sk, H, Hkv, D, pd = 2, 17, 31, 4, 2, 16, 0.3
    q, k, v = qkv(B, Sq, Sk, H, Hkv, D, dt, device)
    bias = torch.randn(B, Hkv, 1, Sk).to(dt).to(device)
    dout = torch.randn(B, Sq, H, D).to(dt).to(device)
    seed, offset = 2**63 + 12345, 2**40 + 7

    def run(s, o, rng):
        out, lse, _ = _lib.run_fwd(q, k, v, None, bias, None, True, 0.0, 0, pd, s, o, False, rng_state=rng)
        grads = _lib.run_bwd(dout, q, k, v, None, bias, out, lse, None, True, 0.0, 0, pd, s, o, False, True,
                             rng_state=rng)
        return [out, lse, *grads]

    byval = run(seed, offset, None)
    byptr = run(seed + 1, offset + 3, _ops.rng_state_tensor(seed, offset).to(device))
    other = run(seed, offset, _ops.rng_state_tensor(seed, offset + 1).to(device))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dbias"), byval, byptr):
        assert torch.equal(a, b), name
    assert not torch.equal(byval[0], other[0]) and not torch.equal(byval[2], other[2])
    kw = dict(bias=bias, causal=True, p_drop=pd, seed=seed, offset=offset, dout=dout)
    ref = R.attention_ref(q, k, v, **kw)
    low = R.attention_ref(q, k, v, precision="lowp", **kw) if dt != F32 else {}
    for name, x in zip(("out", "dq", "dk", "dv", "dbias"), byptr[:1] + byptr[2:]):
        _close(name, x, ref[name], low.get(name))

    rng_in = _ops.rng_state_tensor(seed, offset).to(device)
    out, _, _, rng_out = _ops.fwd_op(q, k, v, None, bias, D**-0.5, True, 0.0, 0, pd, False, False, rng_in)
    assert torch.equal(out, byval[0])
    assert rng_out.device == rng_in.device and rng_out.data_ptr() != rng_in.data_ptr()
    assert _ops.rng_state_values(rng_out) == (seed, offset)
    for bad in (torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int32)):
        with pytest.raises(ValueError, match="rng_state"):
            _lib.run_fwd(q, k, v, None, bias, None, True, 0.0, 0, pd, 0, 0, False, rng_state=bad.to(device))


def test_backends_and_flags():
    names = flash_dmattn.get_available_backends()
    assert flash_dmattn.CPU_AVAILABLE and "cpu" in names
    assert flash_dmattn.CUDA_AVAILABLE == ("cuda" in names) == _lib.device_available("cuda")
    assert flash_dmattn.TRITON_AVAILABLE == ("triton" in names)
    assert flash_dmattn.FLEX_AVAILABLE == ("flex" in names)
    if not torch.cuda.is_available():
        assert not flash_dmattn.CUDA_AVAILABLE and not flash_dmattn.TRITON_AVAILABLE
    q, k, v = qkv(1, 10, 12, 2, 1, 16, F32, "cpu")
    auto = flash_dmattn.flash_dmattn_func_auto()
    assert torch.equal(auto(q, k, v, is_causal=True), flash_dmattn_func(q, k, v, is_causal=True))
    assert flash_dmattn.flash_dmattn_func_auto(backend="cpu") is flash_dmattn_func
    with pytest.raises(ValueError, match="backend"):
        flash_dmattn.flash_dmattn_func_auto(backend="tpu")
    for name in ("cuda", "triton", "flex"):
        if name not in names:
            with pytest.raises(RuntimeError, match=name):
                flash_dmattn.flash_dmattn_func_auto(backend=name)


# ---------------------------------------------------------------------------------------------------------
# GPU only: streams and CUDA graphs

@pytest.mark.gpu
@cuda_backend
def test_runs_on_the_current_stream():
    q, k, v = qkv(2, 300, 300, 4, 2, 64, BF16, "cuda")
    want = flash_dmattn_func(q, k, v, is_causal=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = flash_dmattn_func(q, k, v, is_causal=True)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(got, want)


@pytest.mark.gpu
@cuda_backend
def test_cuda_graph_capture_and_replay_forward_backward():
    dt = BF16
    B, Sq, Sk, H, Hkv, D = 2, 77, 130, 4, 2, 64
    q, k, v = qkv(B, Sq, Sk, H, Hkv, D, dt, "cuda", requires_grad=True)
    bias = torch.randn(B, Hkv, 1, Sk, device="cuda", dtype=dt, requires_grad=True)
    dout = torch.randn(B, Sq, H, D, device="cuda", dtype=dt)

    def step():
        for t in (q, k, v, bias):
            t.grad = None
        out = flash_dmattn_func(q, k, v, attn_bias=bias, is_causal=True)
        out.backward(dout)
        return out

    g, static_out = capture_graph(step)
    for _ in range(2):
        with torch.no_grad():
            for t in (q, k, v, bias, dout):
                t.copy_(torch.randn_like(t))
        g.replay()
        torch.cuda.synchronize()
        got = [static_out.clone()] + [t.grad.clone() for t in (q, k, v, bias)]
        ref = R.attention_ref(q.detach(), k.detach(), v.detach(), bias=bias.detach(), causal=True, dout=dout)
        low = R.attention_ref(q.detach(), k.detach(), v.detach(), bias=bias.detach(), causal=True, dout=dout,
                              precision="lowp")
        for name, x in zip(("out", "dq", "dk", "dv", "dbias"), got):
            _close(name, x, ref[name], low[name])


@pytest.mark.gpu
def test_cuda_float32_is_a_type_error():
    q, k, v = qkv(1, 8, 8, 2, 2, 16, F32, "cuda")
    with pytest.raises(TypeError, match="query"):
        flash_dmattn_func(q, k, v)


@pytest.mark.gpu
@cuda_backend
@pytest.mark.parametrize("D", [8, 13, 36, 100, 250])
def test_cuda_head_dims_padded(D):
    """D not a multiple of 8 is padded to one; the default scale stays 1/sqrt(D)."""
    q, k, v = qkv(2, 33, 47, 4, 2, D, BF16, "cuda", requires_grad=True)
    out = flash_dmattn_func(q, k, v, is_causal=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    kw = dict(causal=True, dout=dout)
    ref = R.attention_ref(q.detach(), k.detach(), v.detach(), **kw)
    low = R.attention_ref(q.detach(), k.detach(), v.detach(), precision="lowp", **kw)
    assert out.shape == q.shape
    _close("out", out, ref["out"], low["out"])
    for name, t in (("dq", q), ("dk", k), ("dv", v)):
        _close(name, t.grad, ref[name], low[name])
