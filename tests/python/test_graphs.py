"""
test_graphs.py -- dropout inside CUDA-graph capture (GPU only): the CUDA backend (flash_dmattn_func, and the
low-level flash_dma.fwd / flash_dma.bwd), the Triton backend (triton_dmattn_func) and torch.compile's
cudagraphs mode.

Under capture the Python layer draws the dropout pair (seed, offset) on the GPU (flash_dmattn._ops.draw_rng: a
captured torch.randint into an int64[2] CUDA tensor, which torch redraws on every replay) and the kernels read
it when they run (fdma_params.rng_state; the Triton kernels' drop tensor). Each test captures forward and
backward once (after a warm-up on a side stream, as torch documents), replays 3 times on the same inputs and
checks:
  * the replays' outputs and gradients differ from each other (a new keep mask on every replay);
  * each replay equals the float64 reference (reference.py, SPEC section 8 rule) computed with the
    (seed, offset) that replay actually used, read back from the rng_state tensor after the replay.
flash_dmattn_func and triton_dmattn_func do not return rng_state: the tests find it by wrapping _ops.draw_rng,
the one function both backends draw through.

Shapes: q (B, Sq, H, D); k, v (B, Sk, Hkv, D); bias (B, Hkv, 1, Sk) with a gradient; causal with Sq != Sk.
Run: FDMA_LIBRARY=build/libflashdma.so pytest tests/python/test_graphs.py -m gpu
"""
import itertools

import pytest
import torch

import flash_dma
import flash_dmattn
import reference as R
from cases import capture_graph, qkv
from flash_dmattn import _ops, flash_dmattn_func

BF16 = torch.bfloat16
P_DROP = 0.3
B, SQ, SK, H, HKV, D = 2, 77, 130, 4, 2, 64
NAMES = ("out", "dq", "dk", "dv", "dbias")

pytestmark = pytest.mark.gpu
cuda_backend = pytest.mark.skipif(not flash_dmattn.CUDA_AVAILABLE,
                                  reason="libflashdma.so has no usable CUDA backend here")
triton_backend = pytest.mark.skipif(not flash_dmattn.TRITON_AVAILABLE, reason="Triton backend unavailable")


def _inputs():
    q, k, v = qkv(B, SQ, SK, H, HKV, D, BF16, "cuda", requires_grad=True)
    bias = torch.randn(B, HKV, 1, SK, device="cuda").to(BF16).requires_grad_()
    dout = torch.randn(B, SQ, H, D, device="cuda").to(BF16)
    return q, k, v, bias, dout


def _spy_draws(monkeypatch):
    """Wrap _ops.draw_rng; returns the list of the device rng_state tensors it hands out (one per capture)."""
    drawn = []
    real = _ops.draw_rng

    def spy(device, gen=None):
        seed, offset, rng_dev = real(device, gen)
        if rng_dev is not None:
            drawn.append(rng_dev)
        return seed, offset, rng_dev

    monkeypatch.setattr(_ops, "draw_rng", spy)
    return drawn


def _replay_and_check(g, results, rng_state, q, k, v, bias, dout):
    """Replay 3 times: each replay's results (out, dq, dk, dv, dbias) must equal the reference for the pair it
    drew, and the replays must differ from each other. results() -> the static tensors, rng_state() -> the
    static int64[2] pair."""
    kw = dict(bias=bias.detach(), causal=True, p_drop=P_DROP, dout=dout)
    runs, pairs = [], []
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        got = [x.detach().clone() for x in results()]
        seed, offset = _ops.rng_state_values(rng_state())
        ref = R.attention_ref(q.detach(), k.detach(), v.detach(), seed=seed, offset=offset, **kw)
        low = R.attention_ref(q.detach(), k.detach(), v.detach(), seed=seed, offset=offset, precision="lowp", **kw)
        for name, x in zip(NAMES, got):
            R.assert_spec_close(name, x.cpu(), ref[name].cpu(), low[name].cpu())
        runs.append(got)
        pairs.append((seed, offset))
    assert len(set(pairs)) == 3, f"replays reused a (seed, offset): {pairs}"
    for a, b in itertools.combinations(runs, 2):
        for name, x, y in zip(NAMES, a, b):
            assert not torch.equal(x, y), f"two replays gave the same {name}: one keep mask reused"


@cuda_backend
def test_cuda_graph_dropout_new_keep_bits_every_replay(monkeypatch):
    drawn = _spy_draws(monkeypatch)
    q, k, v, bias, dout = _inputs()

    def step():
        out = flash_dmattn_func(q, k, v, attn_bias=bias, is_causal=True, dropout_p=P_DROP)
        return [out, *torch.autograd.grad(out, (q, k, v, bias), dout)]

    g, static = capture_graph(step)
    assert len(drawn) == 1 and drawn[0].is_cuda
    _replay_and_check(g, lambda: static, lambda: drawn[0], q, k, v, bias, dout)


@cuda_backend
def test_cuda_graph_dropout_flash_dma_fwd_bwd():
    """The low-level interface: fwd returns the device rng_state under capture, bwd reads it by pointer."""
    q, k, v, bias, dout = _inputs()
    q, k, v, bias = (t.detach() for t in (q, k, v, bias))

    def step():
        out, lse, _, rng_state = flash_dma.fwd(q, k, v, bias, None, p_dropout=P_DROP, is_causal=True)
        dq, dk, dv, dbias = flash_dma.bwd(dout, q, k, v, bias, None, out, lse, p_dropout=P_DROP, is_causal=True,
                                          rng_state=rng_state)
        return [out, dq, dk, dv, dbias, rng_state]

    g, static = capture_graph(step)
    assert static[5].is_cuda
    _replay_and_check(g, lambda: static[:5], lambda: static[5], q, k, v, bias, dout)


@triton_backend
def test_triton_graph_dropout_new_keep_bits_every_replay(monkeypatch):
    drawn = _spy_draws(monkeypatch)
    q, k, v, bias, dout = _inputs()

    def step():
        out = flash_dmattn.triton_dmattn_func(q, k, v, attn_bias=bias, is_causal=True, dropout_p=P_DROP)
        return [out, *torch.autograd.grad(out, (q, k, v, bias), dout)]

    g, static = capture_graph(step)
    assert len(drawn) == 1 and drawn[0].is_cuda
    _replay_and_check(g, lambda: static, lambda: drawn[0], q, k, v, bias, dout)


@cuda_backend
@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="known gap: under torch.compile(mode='reduce-overhead') the op's CUDA rng_state (drawn "
                          "inside the recorded graph) is not a tracked output of inductor's cudagraph tree (fake "
                          "says CPU): 'tensor(s) in the cudagraph pool not tracked as outputs' (H200, torch 2.11)")
def test_compile_cudagraphs_dropout_not_frozen():
    """torch.compile(mode="reduce-overhead"): whether inductor records the op in a CUDA graph or runs it
    outside one (the fake rng_state is a CPU tensor, see _ops), successive calls must draw new keep bits:
    outputs and gradients differ from call to call and stay finite."""
    q, k, v, bias, dout = _inputs()
    f = torch.compile(lambda q, k, v, b: flash_dmattn_func(q, k, v, attn_bias=b, is_causal=True, dropout_p=P_DROP),
                      mode="reduce-overhead")
    runs = []
    for _ in range(5):
        out = f(q, k, v, bias)
        grads = torch.autograd.grad(out, (q, k, v, bias), dout)
        runs.append([x.detach().clone() for x in (out, *grads)])
    torch.cuda.synchronize()
    for a, b in itertools.combinations(runs[2:], 2):           # after the warm-up and recording calls
        assert not torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    for r in runs:
        assert all(torch.isfinite(x).all() for x in r)
