"""
test_transformers.py -- the transformers integration (flash_dmattn.integrations) and the DynamicMaskAttention
example, on tiny randomly initialised models built from configs (no downloads).

For Llama and Doge (GQA, a left-padded batch; Doge with S > keep_window_size so its dynamic top-k window is
active and a random A so the bias differs between keys), attn_implementation="flash_dmattn" must match
attn_implementation="eager":
  * logits at the non-padded positions (padded query rows attend to nothing: eager spreads them uniformly,
    flash_dmattn returns 0 (SPEC section 3), and no valid position reads them);
  * every parameter gradient of a loss over the valid positions;
  * greedy generation with the KV cache (Sq = 1 steps): the same tokens.
fp32 models on CPU run flash_dmattn's C CPU backend (auto selection), and also the Flex backend
(implementation="flex"); gpu-marked variants run bf16 models on CUDA. Also: the mask split rule, the mask
function, the forward's kwargs, and that the example's loss decreases and equals its eager twin.
Shapes: transformers' query (B, H, Sq, D), key/value (B, Hkv, Sk, D); the forward returns (B, Sq, H, D).
"""
import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import reference as R

transformers = pytest.importorskip("transformers")
from transformers import DogeConfig, DogeForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from flash_dmattn import integrations as I  # noqa: E402
from flash_dmattn.integrations import flash_dynamic_mask_attention as FDA  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
V = 97


def _configs():
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    return {"llama": (LlamaForCausalLM, LlamaConfig(**common)),
            "doge": (DogeForCausalLM, DogeConfig(keep_window_size=8, **common))}


def _pair(name, device="cpu", dtype=torch.float32):
    """(eager model, flash_dmattn model) with the same random weights."""
    cls, cfg = _configs()[name]
    torch.manual_seed(0)
    me = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager", dtype=dtype)
    mf = cls._from_config(copy.deepcopy(cfg), attn_implementation="flash_dmattn", dtype=dtype)
    assert mf.config._attn_implementation == "flash_dmattn"
    if name == "doge":
        with torch.no_grad():
            for layer in me.model.layers:
                layer.self_attn.A.normal_()
    mf.load_state_dict(me.state_dict())
    return me.to(device), mf.to(device)


def _batch(device, B=3, S=21):
    torch.manual_seed(1)
    ids = torch.randint(3, V, (B, S), device=device)
    am = torch.ones(B, S, dtype=torch.long, device=device)
    am[1, :5] = 0                                           # left padding
    am[2, :1] = 0
    return ids, am


def _compare_model(name, device="cpu", dtype=torch.float32, tol=1e-4, gtol=1e-3, **kwargs):
    me, mf = _pair(name, device, dtype)
    ids, am = _batch(device)
    valid = am.bool()
    le = me(input_ids=ids, attention_mask=am).logits
    lf = mf(input_ids=ids, attention_mask=am, **kwargs).logits
    scale = le[valid].abs().max().item()
    err = (le - lf)[valid].abs().max().item()
    assert err <= tol * (1 + scale), f"{name}: logits max diff {err:.3e} (max |logit| {scale:.2f})"
    assert not torch.isnan(lf).any()
    target = torch.randint(0, V, ids.shape, device=device)
    for model, logits in ((me, le), (mf, lf)):
        torch.nn.functional.cross_entropy(logits[valid].float(), target[valid]).backward()
    for (pname, pe), pf in zip(me.named_parameters(), mf.parameters()):
        if pe.grad is None:
            assert pf.grad is None, pname
            continue
        assert pf.grad is not None, f"{name}: no gradient reached {pname}"
        gmax = pe.grad.abs().max().item()
        gerr = (pe.grad - pf.grad).abs().max().item()
        assert gerr <= gtol * (1 + gmax), \
            f"{name}: {pname} grad max diff {gerr:.3e} (max |grad| {gmax:.3e})"
    return me, mf, ids, am


@pytest.mark.parametrize("name", ["llama", "doge"])
def test_logits_and_grads_match_eager(name):
    _compare_model(name)


@pytest.mark.no_library
@pytest.mark.parametrize("name", ["llama", "doge"])
def test_flex_backend_matches_eager(name):
    _compare_model(name, implementation="flex")


def test_custom_4d_additive_mask_matches_eager():
    """A user's own 4-D float mask (0 = attend, dtype min = masked) goes through unchanged to both models."""
    me, mf = _pair("llama")
    ids, am = _batch("cpu")
    B, S = ids.shape
    vis = torch.ones(S, S, dtype=torch.bool).tril()[None, None] & am.bool()[:, None, None, :]
    vis = vis & (torch.rand(B, 1, S, S) > 0.2)
    vis[..., 0] = True
    idx = torch.arange(S)
    vis[:, :, idx, idx] = True
    additive = torch.where(vis, 0.0, torch.finfo(torch.float32).min)
    valid = am.bool()
    le = me(input_ids=ids, attention_mask=additive).logits
    lf = mf(input_ids=ids, attention_mask=additive).logits
    assert (le - lf)[valid].abs().max().item() <= 1e-4 * (1 + le[valid].abs().max().item())


@pytest.mark.parametrize("name", ["llama", "doge"])
def test_greedy_generation_matches_eager(name):
    me, mf = _pair(name)
    ids, am = _batch("cpu")
    with torch.no_grad():
        ge = me.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False)
        gf = mf.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False)
    assert torch.equal(ge, gf), f"{name}: greedy tokens differ\n{ge[:, -8:]}\n{gf[:, -8:]}"


# ---------------------------------------------------------------------------------------------------------
# The mask rule, the mask function, the forward's kwargs.

@pytest.mark.no_library
def test_split_attention_mask_rule():
    B, H, Sq, Sk = 2, 4, 5, 7
    lo = torch.finfo(torch.float32).min
    boolm = torch.rand(B, 1, Sq, Sk) > 0.5
    m, b = FDA.split_attention_mask(boolm, Sk)
    assert m is boolm and b is None
    pad = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7])
    m, b = FDA.split_attention_mask(pad, Sk)
    assert m.dtype == torch.bool and torch.equal(m, pad != 0) and b is None
    m, b = FDA.split_attention_mask(torch.cat([torch.ones(B, 3, dtype=torch.long), pad], 1), Sk)
    assert torch.equal(m, pad != 0)                          # a longer 2-D mask keeps its last Sk columns
    additive = torch.where(boolm, 0.0, lo)
    m, b = FDA.split_attention_mask(additive, Sk)
    assert torch.equal(m, boolm) and b is None               # a plain 0/min mask carries no bias
    additive[:, :, 0, 0] = -math.inf
    m, _ = FDA.split_attention_mask(additive, Sk)
    assert not m[:, :, 0, 0].any()
    bcast = torch.where(boolm[:, :, :1], 0.0, lo).expand(B, H, Sq, Sk)
    m, b = FDA.split_attention_mask(bcast, Sk)
    assert m.shape == (B, 1, 1, Sk) and b is None            # computed on the collapsed view: no (Sq, Sk) copy
    dyn = torch.randn(B, H, Sq, Sk).masked_fill(~boolm, lo)  # Doge: bias values, dtype min where masked
    m, b = FDA.split_attention_mask(dyn, Sk)
    assert torch.equal(m, boolm.expand(B, H, Sq, Sk)) and b is dyn
    m, b = FDA.split_attention_mask(torch.zeros(B, H, Sq, Sk + 3), Sk)
    assert m.shape[-1] == Sk and m.all()


@pytest.mark.no_library
def test_mask_function():
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function
    cfg = _configs()["llama"][1]
    full = torch.ones(2, 9, dtype=torch.bool)
    assert FDA.flash_dmattn_mask(2, 9, 9, 0, 0, causal_mask_function, full, config=cfg) is None
    assert FDA.flash_dmattn_mask(2, 9, 9, 0, 0, causal_mask_function, None, config=cfg) is None
    pad = full.clone()
    pad[1, :3] = False
    m = FDA.flash_dmattn_mask(2, 1, 9, 8, 0, causal_mask_function, pad, config=cfg)
    assert torch.equal(m, pad)                              # decode step: the (B, Sk) padding mask
    m = FDA.flash_dmattn_mask(2, 9, 9, 0, 0, sliding_window_causal_mask_function(4), pad, config=cfg)
    assert m.shape == (2, 1, 9, 9) and m.dtype == torch.bool
    assert not m[0, 0, 8, 3] and m[0, 0, 8, 5] and not m[1, 0, 4, 2]
    doge = _configs()["doge"][1]
    m = FDA.flash_dmattn_mask(2, 9, 9, 0, 0, causal_mask_function, None, config=doge)
    assert m.shape == (2, 1, 9, 9) and torch.equal(m[0, 0], torch.ones(9, 9, dtype=torch.bool).tril())


class _Module(torch.nn.Module):
    def __init__(self, keep_window_size=None, is_causal=True):
        super().__init__()
        self.config = type("Cfg", (), {"keep_window_size": keep_window_size})()
        self.is_causal = is_causal
        self.attention_dropout = 0.5


def test_forward_kwargs_against_reference():
    B, H, Hkv, Sq, Sk, D = 2, 4, 2, 6, 19, 16
    torch.manual_seed(2)
    q = torch.randn(B, H, Sq, D, requires_grad=True)
    k = torch.randn(B, Hkv, Sk, D, requires_grad=True)
    v = torch.randn(B, Hkv, Sk, D, requires_grad=True)
    dt = torch.randn(B, Hkv, Sk, requires_grad=True)
    bias = dt[:, :, None, :].expand(B, Hkv, Sq, Sk)          # the example's stride-0 bias
    pad = torch.ones(B, Sk, dtype=torch.bool)
    pad[0, :4] = False
    mod = _Module(keep_window_size=5).eval()
    out, w = FDA.flash_dynamic_mask_attention_forward(mod, q, k, v, pad, attention_bias=bias, scaling=0.2)
    assert w is None and out.shape == (B, Sq, H, D)
    dout = torch.randn_like(out)
    dq, ddt = torch.autograd.grad(out, (q, dt), dout)
    ref = R.attention_ref(q.detach().transpose(1, 2), k.detach().transpose(1, 2), v.detach().transpose(1, 2),
                          mask=pad[:, None, None, :], bias=dt.detach()[:, :, None, :], scale=0.2, causal=True,
                          window=5, dout=dout)
    R.assert_spec_close("out", out.detach(), ref["out"])
    R.assert_spec_close("dq", dq.transpose(1, 2), ref["dq"])
    R.assert_spec_close("dbias", ddt, ref["dbias"][:, :, 0])
    out2, _ = FDA.flash_dynamic_mask_attention_forward(mod, q, k, v, pad, attention_bias=bias, scale=0.2,
                                                       keep_window_size=Sk, is_causal=False)
    ref2 = R.attention_ref(q.detach().transpose(1, 2), k.detach().transpose(1, 2), v.detach().transpose(1, 2),
                           mask=pad[:, None, None, :], bias=dt.detach()[:, :, None, :], scale=0.2)
    R.assert_spec_close("out", out2.detach(), ref2["out"])
    with pytest.raises(ValueError, match="keep_window_size"):
        FDA.flash_dynamic_mask_attention_forward(mod, q, k, v, pad)
    with pytest.raises(ValueError, match="implementation"):
        FDA.flash_dynamic_mask_attention_forward(_Module(), q, k, v, None, implementation="nope")
    with pytest.raises(TypeError, match="attention_mask"):
        FDA.flash_dynamic_mask_attention_forward(_Module(), q, k, v, object())


@pytest.mark.no_library
@pytest.mark.no_library
def test_forward_defaults(monkeypatch):
    """dropout from module.training / attention_dropout; is_causal from the module unless a per-row 4-D mask
    carries it; keep_window_size from module.keep_window_size, then module.config; implementation routing."""
    seen = {}

    def fake(query, key, value, **kw):
        seen.update(kw)
        return query
    monkeypatch.setattr(FDA, "_attention_function", lambda impl: seen.update(impl=impl) or fake)
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)
    bias = torch.randn(1, 2, 3, 5)
    mod = _Module(keep_window_size=4).train()
    FDA.flash_dynamic_mask_attention_forward(mod, q, k, k, None, attention_bias=bias, implementation="flex")
    assert seen["dropout_p"] == 0.5 and seen["is_causal"] and seen["keep_window_size"] == 4
    assert seen["impl"] == "flex"
    mod.eval()
    mod.keep_window_size = 2
    FDA.flash_dynamic_mask_attention_forward(mod, q, k, k, torch.ones(1, 1, 3, 5, dtype=torch.bool),
                                             attention_bias=bias)
    assert seen["dropout_p"] == 0.0 and not seen["is_causal"] and seen["keep_window_size"] == 2
    FDA.flash_dynamic_mask_attention_forward(_Module(is_causal=False), q, k, k, None, dropout=0.25)
    assert seen["dropout_p"] == 0.25 and not seen["is_causal"] and seen["keep_window_size"] is None
    FDA.flash_dynamic_mask_attention_forward(_Module(keep_window_size=9), q, k, k, None, attention_bias=bias,
                                             is_causal=True)
    assert seen["keep_window_size"] is None and seen["is_causal"]      # Sk <= window: no selection


@pytest.mark.no_library
def test_register_idempotent():
    assert I.register() and I.register()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert AttentionInterface._global_mapping["flash_dmattn"] is FDA.flash_dynamic_mask_attention_forward
    assert AttentionMaskInterface._global_mapping["flash_dmattn"] is FDA.flash_dmattn_mask


# ---------------------------------------------------------------------------------------------------------
# The example.

def _example():
    spec = importlib.util.spec_from_file_location("dma_example", ROOT / "examples" / "dynamic_mask_attention.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_loss_decreases_and_matches_eager():
    ex = _example()
    losses = ex.train(steps=8, log=None)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses
    eager = ex.train(steps=3, log=None, eager=True)
    assert max(abs(a - b) for a, b in zip(losses, eager)) < 1e-3 * (1 + abs(losses[0]))


# ---------------------------------------------------------------------------------------------------------
# CUDA: bf16 models on the best GPU backend.

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "doge"])
def test_gpu_models_match_eager(name):
    _compare_model(name, device="cuda", dtype=torch.bfloat16, tol=3e-2, gtol=1e-1)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["llama", "doge"])
def test_gpu_flex_models_match_eager(name):
    _compare_model(name, device="cuda", dtype=torch.bfloat16, tol=3e-2, gtol=1e-1, implementation="flex")


@pytest.mark.gpu
def test_gpu_example_trains():
    losses = _example().train(steps=8, device="cuda", log=None)
    assert losses[-1] < 0.8 * losses[0], losses
