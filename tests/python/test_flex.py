"""
test_flex.py -- the Flex backend (flash_dmattn_flex.py) against reference.py by the SPEC section 8 rule:
fp32 max|x - ref| <= 1e-4 (1 + max|ref|); fp16/bf16 max|x - ref| <= 2 max|x_torch - ref| + 1e-5, with ref the
float64 reference and x_torch the same math in PyTorch at the inputs' precision.

Covered: forward (out, lse) and backward (dq, dk, dv, dbias in the caller's bias shape) for every mask and bias
form of cases.py, exact masks with fully masked rows, -inf biases, causal with Sq < Sk and Sq > Sk, GQA / MQA,
softcap, keep_window_size (SPEC section 6), the errors for options flex cannot do, that repeated calls do
not recompile, and the kernel_options that work around torch 2.11 Inductor failures (issue 6). CPU runs
torch's unfused flex_attention operator (small sizes, a minute or so on 2 cores); gpu-marked cases run the
compiled kernels on CUDA at larger sizes:  pytest tests/python/test_flex.py -m gpu

flex_attention allocates its own outputs, so the NaN poisoning of SPEC section 8 cannot reach them; a missing
element still shows up as a mismatch against the reference (and NaN anywhere fails assert_spec_close).
Shapes: q (B, Sq, H, D); k, v (B, Sk, Hkv, D).
"""
import math

import pytest
import torch

import cases as C
import reference as R
from flash_dmattn import flash_dmattn_flex as FX

pytestmark = pytest.mark.no_library          # the Flex backend does not need libflashdma.so

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
CPU_DTYPES = [F32, pytest.param(BF16, id="bf16"), pytest.param(F16, id="fp16")]


def _run(q, k, v, mask=None, bias=None, scale=None, causal=False, softcap=0.0, window=None, grads=True):
    """flex_attention_core on normalised inputs; returns dict(out, lse[, dq, dk, dv, dbias]) and dout."""
    out, lse = FX.flex_attention_core(q, k, v, mask, bias, scale, causal, softcap, window)
    res = {"out": out.detach(), "lse": lse.detach()}
    dout = None
    if grads:
        dout = torch.randn_like(out)
        inputs = [q, k, v] + ([bias] if bias is not None and bias.requires_grad else [])
        g = torch.autograd.grad(out, inputs, dout)
        res.update(dq=g[0], dk=g[1], dv=g[2])
        if len(g) > 3:
            res["dbias"] = g[3]
    return res, dout


def _check(res, q, k, v, mask4, bias4, dout, scale=None, causal=False, softcap=0.0, window=None, dbias=None):
    """Compare res against reference.py; dbias: (value, reference reducer) when the bias form needs one."""
    args = dict(mask=mask4, bias=None if bias4 is None else bias4.detach(), scale=scale, causal=causal,
                softcap=softcap, window=window or 0, dout=dout)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    ref = R.attention_ref(qd, kd, vd, **args)
    low = None if q.dtype == F32 else R.attention_ref(qd, kd, vd, precision="lowp", **args)
    for name in ("out", "lse", "dq", "dk", "dv"):
        if name in res:
            R.assert_spec_close(name, res[name], ref[name], None if low is None else low[name])
    if dbias is not None:
        x, reduce = dbias
        R.assert_spec_close("dbias", x, reduce(ref["dbias"]), None if low is None else reduce(low["dbias"]))


# ---------------------------------------------------------------------------------------------------------
# Every mask form and every bias form through the public function (prepare_mask_bias wiring included).

SIZES = [(2, 17, 31, 4, 2, 16), (1, 1, 33, 4, 1, 40), (2, 33, 17, 2, 2, 8)]


@pytest.mark.parametrize("form", C.MASK_FORMS)
def test_mask_forms(form):
    B, Sq, Sk, H, Hkv, D = 2, 17, 31, 4, 2, 16
    torch.manual_seed(1)
    q, k, v = C.qkv(B, Sq, Sk, H, Hkv, D, F32, "cpu", requires_grad=True)
    m_user, m4 = C.make_mask(form, B, H, Hkv, Sq, Sk, "cpu")
    out = FX.flex_dmattn_func(q, k, v, attn_mask=m_user)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    _check({"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}, q, k, v, m4, None, dout)


@pytest.mark.parametrize("form", C.BIAS_FORMS)
@pytest.mark.parametrize("dtype", [F32, pytest.param(BF16, id="bf16")])
def test_bias_forms_dbias(form, dtype):
    B, Sq, Sk, H, Hkv, D = 2, 17, 31, 4, 2, 16
    torch.manual_seed(2)
    q, k, v = C.qkv(B, Sq, Sk, H, Hkv, D, dtype, "cpu", requires_grad=True)
    leaf, user = C.make_bias(form, B, H, Hkv, Sq, Sk, dtype, "cpu", requires_grad=True)
    out = FX.flex_dmattn_func(q, k, v, attn_bias=user, is_causal=True)
    dout = torch.randn_like(out)
    dq, dk, dv, db = torch.autograd.grad(out, (q, k, v, leaf), dout)
    assert db.shape == leaf.shape and db.dtype == leaf.dtype
    b4 = C.as_ref4(leaf, form, Sq, Sk)
    _check({"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}, q, k, v, None, b4, dout, causal=True,
           dbias=(db, lambda r: C.ref_dbias(r, form, leaf.shape)))


# ---------------------------------------------------------------------------------------------------------
# The core on 4-D views: sizes, dtypes, causal, GQA, softcap, window, fully masked rows.

@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,D", SIZES)
@pytest.mark.parametrize("causal", [False, True])
def test_mask_bias_causal(dtype, B, Sq, Sk, H, Hkv, D, causal):
    torch.manual_seed(3)
    q, k, v = C.qkv(B, Sq, Sk, H, Hkv, D, dtype, "cpu", requires_grad=True)
    mask = torch.rand(B, 1, Sq, Sk) > 0.3
    if Sq > 2:
        mask[:, :, 2] = False                                   # a fully masked row
    bias = (torch.randn(B, Hkv, 1, Sk) * 2).to(dtype).requires_grad_()
    res, dout = _run(q, k, v, mask, bias, causal=causal)
    _check(res, q, k, v, mask, bias, dout, causal=causal, dbias=(res["dbias"], lambda r: r))


@pytest.mark.parametrize("dtype", [F32, pytest.param(F16, id="fp16")])
def test_softcap_scale(dtype):
    B, Sq, Sk, H, Hkv, D = 1, 13, 29, 4, 4, 24
    torch.manual_seed(4)
    q, k, v = C.qkv(B, Sq, Sk, H, Hkv, D, dtype, "cpu", requires_grad=True)
    bias = torch.randn(B, H, Sq, Sk).to(dtype).requires_grad_()
    res, dout = _run(q, k, v, None, bias, scale=0.3, softcap=1.5)
    _check(res, q, k, v, None, bias, dout, scale=0.3, softcap=1.5, dbias=(res["dbias"], lambda r: r))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias_rows", [1, 19])
def test_keep_window(causal, bias_rows):
    B, Sq, Sk, H, Hkv, D = 2, 19, 45, 4, 2, 16
    torch.manual_seed(5)
    q, k, v = C.qkv(B, Sq, Sk, H, Hkv, D, F32, "cpu", requires_grad=True)
    bias = torch.randn(B, Hkv, bias_rows, Sk)
    bias[..., 5:9] = bias[..., 5:6]                             # ties: the more recent key wins
    bias.requires_grad_()
    mask = torch.rand(B, 1, 1, Sk) > 0.2
    res, dout = _run(q, k, v, mask, bias, causal=causal, window=7)
    _check(res, q, k, v, mask, bias, dout, causal=causal, window=7, dbias=(res["dbias"], lambda r: r))


def test_keep_window_public_and_noop():
    B, Sq, Sk, H, Hkv, D = 1, 9, 20, 2, 1, 8
    torch.manual_seed(6)
    q, k, v = C.qkv(B, Sq, Sk, H, Hkv, D, F32, "cpu")
    bias = torch.randn(B, Hkv, Sk)
    out = FX.flex_dmattn_func(q, k, v, attn_bias=bias, is_causal=True, keep_window_size=5)
    ref = R.attention_ref(q, k, v, bias=bias[:, :, None], causal=True, window=5)
    R.assert_spec_close("out", out, ref["out"])
    big = FX.flex_dmattn_func(q, k, v, attn_bias=bias, is_causal=True, keep_window_size=Sk)
    R.assert_spec_close("out", big, R.attention_ref(q, k, v, bias=bias[:, :, None], causal=True)["out"])


def test_fully_masked_rows_and_inf_bias():
    """Rows with no visible key (mask, causal with Sq > Sk, or only -inf biases): out 0, lse -inf, grads 0."""
    B, Sq, Sk, H, Hkv, D = 1, 12, 7, 2, 1, 16
    torch.manual_seed(7)
    q, k, v = C.qkv(B, Sq, Sk, H, Hkv, D, F32, "cpu", requires_grad=True)
    mask = torch.ones(B, H, Sq, Sk, dtype=torch.bool)
    mask[:, 0, 9] = False
    bias = torch.randn(B, H, Sq, Sk)
    bias[:, 1, 10] = -math.inf                                  # visible but all -inf
    bias[:, 0, 11, :3] = -math.inf                              # some -inf in an otherwise live row
    bias.requires_grad_()
    res, dout = _run(q, k, v, mask, bias, causal=True)
    dead_causal = torch.arange(Sq) + Sk - Sq < 0                # rows 0..4
    assert torch.isneginf(res["lse"][:, :, dead_causal]).all()
    assert torch.isneginf(res["lse"][:, 0, 9]).all() and torch.isneginf(res["lse"][:, 1, 10]).all()
    assert (res["out"][:, dead_causal] == 0).all() and (res["out"][:, 9, 0] == 0).all()
    assert (res["out"][:, 10, 1] == 0).all() and (res["dq"][:, 10, 1] == 0).all()
    assert (res["dbias"][:, 1, 10] == 0).all() and (res["dbias"][:, 0, 11, :3] == 0).all()
    for x in res.values():
        assert not torch.isnan(x).any()
    _check(res, q, k, v, mask, bias, dout, causal=True, dbias=(res["dbias"], lambda r: r))


@pytest.mark.parametrize("Hkv", [1, 2, 6])
def test_gqa_head_maps(Hkv):
    """Bias with Hkv heads and mask with H heads under GQA / MQA / MHA."""
    B, Sq, Sk, H, D = 2, 5, 11, 6, 16
    torch.manual_seed(8)
    q, k, v = C.qkv(B, Sq, Sk, H, Hkv, D, F32, "cpu", requires_grad=True)
    mask = torch.rand(B, H, Sq, Sk) > 0.4
    bias = torch.randn(B, Hkv, Sq, Sk).requires_grad_()
    res, dout = _run(q, k, v, mask, bias)
    _check(res, q, k, v, mask, bias, dout, dbias=(res["dbias"], lambda r: r))


def test_layout_and_dtype():
    """out is (B, Sq, H, D) in query's dtype; non-contiguous (but last-dim-contiguous) inputs are fine."""
    B, Sq, Sk, H, Hkv, D = 2, 6, 10, 4, 2, 8
    torch.manual_seed(9)
    q = torch.randn(B, H, Sq, D, dtype=BF16).transpose(1, 2)
    k = torch.randn(B, Hkv, Sk, D, dtype=BF16).transpose(1, 2)
    v = torch.randn(B, Hkv, Sk, D, dtype=BF16).transpose(1, 2)
    out = FX.flex_dmattn_func(q, k, v, is_causal=True)
    assert out.shape == (B, Sq, H, D) and out.dtype == BF16
    ref = R.attention_ref(q, k, v, causal=True)
    low = R.attention_ref(q, k, v, causal=True, precision="lowp")
    R.assert_spec_close("out", out, ref["out"], low["out"])


# ---------------------------------------------------------------------------------------------------------
# Errors and caching.

def test_unsupported_options_raise():
    q, k, v = C.qkv(1, 4, 4, 2, 2, 8, F32, "cpu")
    with pytest.raises(ValueError, match="dropout_p"):
        FX.flex_dmattn_func(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="return_attn_probs"):
        FX.flex_dmattn_func(q, k, v, return_attn_probs=True)
    with pytest.raises(ValueError, match="keep_window_size"):
        FX.flex_dmattn_func(q, k, v, keep_window_size=2)
    with pytest.raises(ValueError, match="keep_window_size"):
        FX.flex_dmattn_func(q, k, v, attn_bias=torch.zeros(1, 4), keep_window_size=0)
    with pytest.raises(ValueError, match="softcap"):
        FX.flex_dmattn_func(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="attn_mask"):
        FX.flex_dmattn_func(q, k, v, attn_mask=torch.ones(1, 3, 4, 4, dtype=torch.bool))
    with pytest.raises((ValueError, TypeError), match="key"):
        FX.flex_dmattn_func(q, k[:, :, :1].expand(1, 4, 3, 8), v)
    out = FX.flex_dmattn_func(q, k, v, deterministic=True)      # the CPU path is deterministic
    assert torch.equal(out, FX.flex_dmattn_func(q, k, v, deterministic=True))


def test_cpu_path_does_not_compile():
    """The CPU path calls the flex operator eagerly: repeated calls trace and compile nothing."""
    from torch._dynamo.utils import counters
    q, k, v = C.qkv(1, 9, 9, 2, 1, 8, F32, "cpu", requires_grad=True)
    bias = torch.randn(1, 1, 9, requires_grad=True)
    FX.flex_dmattn_func(q, k, v, attn_bias=bias, is_causal=True).sum().backward()
    before = sum(counters["frames"].values())
    for _ in range(3):
        FX.flex_dmattn_func(q, k, v, attn_bias=bias, is_causal=True).sum().backward()
    assert sum(counters["frames"].values()) == before


def test_kernel_options_rule(monkeypatch):
    """The issue-6 kernel_options (flash_dmattn_flex._kernel_options) are chosen where torch 2.11's Inductor
    needs them, and FDMA_FLEX_LEGACY=1 turns them off. Arguments: H, Hkv, Sq, D, dtype, bias rows, mask rows,
    BlockMask passed, device capability."""
    ko = FX._kernel_options
    force = {"FORCE_USE_FLEX_ATTENTION": True}
    # flex-decoding forward (Sq < 128, GQA): BLOCK_M = next_pow2(G * Sq) must divide the 128-row blocks
    assert ko(4, 2, 113, 64, F16, 1, 113, True, (9, 0)) == force
    assert ko(8, 2, 65, 64, BF16, 0, 65, True, (8, 0)) == force
    assert ko(8, 2, 32, 64, F16, 1, 32, True, (9, 0)) is None            # G * Sq = 128: one block
    assert ko(4, 4, 113, 64, F16, 1, 113, True, (9, 0)) is None          # no GQA: BLOCK_M = next_pow2(Sq)
    assert ko(4, 2, 128, 64, F16, 1, 128, True, (9, 0)) is None          # Sq >= 128: the main kernel
    assert ko(4, 2, 113, 64, F16, 1, 0, False, (9, 0)) is None           # no BlockMask: no 128-row blocks
    # backward shared memory: bias and mask both with Sq rows, D > 64, fp16 / bf16, sm90 / sm100
    stages = {"bwd_num_stages": 2}
    assert ko(16, 4, 4096, 128, BF16, 4096, 4096, True, (9, 0)) == stages
    assert ko(16, 4, 4096, 96, F16, 4096, 4096, True, (10, 0)) == stages
    assert ko(4, 2, 113, 128, F16, 113, 113, True, (9, 0)) == {**force, **stages}
    for bias_rows, mask_rows, D, dtype, cap in [(4096, 1, 128, BF16, (9, 0)), (1, 4096, 128, BF16, (9, 0)),
                                                (4096, 0, 128, BF16, (9, 0)), (4096, 4096, 64, BF16, (9, 0)),
                                                (4096, 4096, 128, F32, (9, 0)), (4096, 4096, 128, BF16, (8, 0))]:
        assert ko(16, 4, 4096, D, dtype, bias_rows, mask_rows, True, cap) is None
    monkeypatch.delenv("FDMA_FLEX_LEGACY", raising=False)
    assert not FX._legacy()
    monkeypatch.setenv("FDMA_FLEX_LEGACY", "1")
    assert FX._legacy()
    monkeypatch.setenv("FDMA_FLEX_LEGACY", "0")
    assert not FX._legacy()


def test_package_export():
    import flash_dmattn
    assert flash_dmattn.flex_dmattn_func is FX.flex_dmattn_func
    assert flash_dmattn.FLEX_AVAILABLE


# ---------------------------------------------------------------------------------------------------------
# CUDA: compiled kernels, BlockMask from tiles, no recompilation for the same shapes.

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("B,Sq,Sk,H,Hkv,D", [(2, 113, 257, 4, 2, 64), (1, 1000, 4095, 2, 1, 128),
                                             (2, 257, 113, 4, 4, 32), (1, 1, 257, 8, 2, 64),
                                             (1, 65, 300, 8, 2, 64), (1, 32, 300, 8, 2, 64)])
def test_gpu_forward_backward(dtype, B, Sq, Sk, H, Hkv, D):
    """Per-key bias with grad, (B, 1, Sq, Sk) mask, causal. Sq < 128 with GQA and Sq * G > 128 (113 x 2,
    65 x 4) is where torch 2.11's flex-decoding forward found no config (issue 6); 32 x 4 = 128 still decodes."""
    torch.manual_seed(10)
    q, k, v = C.qkv(B, Sq, Sk, H, Hkv, D, dtype, "cuda", requires_grad=True)
    mask = torch.rand(B, 1, Sq, Sk, device="cuda") > 0.3
    mask[:, :, Sq // 2] = False
    mask[:, :, :, : Sk // 3] = False                            # whole empty tiles
    bias = (torch.randn(B, Hkv, 1, Sk, device="cuda") * 2).to(dtype).requires_grad_()
    res, dout = _run(q, k, v, mask, bias, causal=True)
    _check(res, q, k, v, mask, bias, dout, causal=True, dbias=(res["dbias"], lambda r: r))


@pytest.mark.gpu
@pytest.mark.parametrize("Sq,Sk", [(384, 384), (300, 445)])
def test_gpu_full_bias_full_mask_d128(Sq, Sk):
    """W2's form at D = 128: bias (B, Hkv, Sq, Sk) with grad and mask (B, Hkv, Sq, Sk). At 384 x 384 torch 2.11's
    default sm90 backward config asked for 240 KB of shared memory (issue 6); 300 x 445 (not multiples of
    128) compiled even without the workaround, and checks the awkward sizes."""
    B, H, Hkv, D = 1, 4, 2, 128
    torch.manual_seed(12)
    q, k, v = C.qkv(B, Sq, Sk, H, Hkv, D, BF16, "cuda", requires_grad=True)
    mask = torch.rand(B, Hkv, Sq, Sk, device="cuda") > 0.6
    bias = torch.randn(B, Hkv, Sq, Sk, device="cuda").to(BF16).requires_grad_()
    res, dout = _run(q, k, v, mask, bias, causal=True)
    _check(res, q, k, v, mask, bias, dout, causal=True, dbias=(res["dbias"], lambda r: r))


@pytest.mark.gpu
def test_gpu_keep_window_softcap():
    B, Sq, Sk, H, Hkv, D = 1, 200, 300, 4, 2, 64
    torch.manual_seed(11)
    q, k, v = C.qkv(B, Sq, Sk, H, Hkv, D, BF16, "cuda", requires_grad=True)
    bias = torch.randn(B, Hkv, Sq, Sk, device="cuda").to(BF16).requires_grad_()
    res, dout = _run(q, k, v, None, bias, causal=True, softcap=5.0, window=64)
    _check(res, q, k, v, None, bias, dout, causal=True, softcap=5.0, window=64, dbias=(res["dbias"], lambda r: r))


@pytest.mark.gpu
def test_gpu_no_recompile_and_deterministic_error():
    from torch._dynamo.utils import counters
    q, k, v = C.qkv(2, 130, 200, 4, 2, 64, F16, "cuda", requires_grad=True)
    bias = torch.randn(2, 2, 1, 200, device="cuda", dtype=F16, requires_grad=True)
    mask = torch.rand(2, 1, 130, 200, device="cuda") > 0.5
    FX.flex_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True).sum().backward()
    before = dict(counters["stats"])
    for _ in range(3):
        mask = torch.rand(2, 1, 130, 200, device="cuda") > 0.5     # new contents, same shapes
        FX.flex_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True).sum().backward()
    assert dict(counters["stats"]).get("unique_graphs", 0) == before.get("unique_graphs", 0)
    assert FX._causal_block_mask(130, 200, q.device) is FX._causal_block_mask(130, 200, q.device)
    with pytest.raises(ValueError, match="deterministic"):
        FX.flex_dmattn_func(q, k, v, deterministic=True)
