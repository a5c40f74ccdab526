"""
test_inputs.py -- flash_dmattn._inputs.prepare_mask_bias: every accepted form becomes a 4-D view
({B|1}, {H|Hkv|1}, {Sq|1}, Sk) of the caller's memory (no copy of a bias, no (Sq, Sk) tensor made from a
broadcast mask), and bad input raises ValueError / TypeError naming the argument.
"""
import pytest
import torch

from flash_dmattn._inputs import check_qkv, prepare_mask_bias

B, Sq, Sk, H, Hkv, D = 2, 7, 11, 4, 2, 8
q = torch.randn(B, Sq, H, D)
k = torch.randn(B, Sk, Hkv, D)


@pytest.mark.parametrize("shape,dims", [
    ((B, H, Sq, Sk), (B, H, Sq, Sk)), ((B, Hkv, Sq, Sk), (B, Hkv, Sq, Sk)), ((1, 1, Sq, Sk), (1, 1, Sq, Sk)),
    ((B, H, 1, Sk), (B, H, 1, Sk)), ((B, Hkv, Sk), (B, Hkv, 1, Sk)), ((B, Sk), (B, 1, 1, Sk)),
    ((1, Sk), (1, 1, 1, Sk)), ((B, H, Sq, 1), (B, H, Sq, Sk)),
])
def test_bias_forms_are_views(shape, dims):
    bias = torch.randn(shape)
    _, b4 = prepare_mask_bias(q, k, None, bias)
    assert tuple(b4.shape) == dims
    assert b4.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()


def test_broadcast_bias_view_stays_a_view():
    base = torch.randn(B, Hkv, 1, Sk)
    bias = base.expand(B, Hkv, Sq, Sk)
    _, b4 = prepare_mask_bias(q, k, None, bias)
    assert b4.stride(2) == 0 and b4.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.int64, torch.bfloat16])
def test_mask_forms(dtype):
    base = torch.rand(B, 1, 1, Sk) > 0.5
    for m, dims in ((base.to(dtype).expand(B, H, Sq, Sk), (B, 1, 1, Sk)),
                    (base[:, 0, 0].to(dtype), (B, 1, 1, Sk)),
                    (base[:, :, 0].to(dtype).expand(B, Hkv, Sk), (B, 1, 1, Sk))):
        m4, _ = prepare_mask_bias(q, k, m, None)
        assert m4.dtype == torch.bool and tuple(m4.shape) == dims
        assert m4.untyped_storage().nbytes() <= B * Sk * 8          # no (Sq, Sk) tensor was made
        assert torch.equal(m4.expand(B, H, Sq, Sk), base.expand(B, H, Sq, Sk))


def test_float_mask_nonzero_is_attend():
    m = torch.tensor([[0.0, 2.0, -1.0, 0.5] + [0.0] * (Sk - 4)] * B)
    m4, _ = prepare_mask_bias(q, k, m, None)
    assert m4[0, 0, 0, :4].tolist() == [False, True, True, True]


@pytest.mark.parametrize("arg,value,exc", [
    ("attn_mask", torch.ones(B, 3, Sq, Sk), ValueError),
    ("attn_mask", torch.ones(B, H, Sq + 1, Sk), ValueError),
    ("attn_mask", torch.ones(B + 1, Sk), ValueError),
    ("attn_mask", torch.ones(Sk), ValueError),
    ("attn_mask", torch.ones(B, H, Sq, Sk, dtype=torch.complex64), TypeError),
    ("attn_mask", [[1, 0]], TypeError),
    ("attn_bias", torch.ones(B, H, Sq, Sk, dtype=torch.float16), TypeError),
    ("attn_bias", torch.ones(B, H, Sq, Sk + 1), ValueError),
    ("attn_bias", torch.ones(B, Hkv, 3), ValueError),
    ("attn_bias", torch.ones(1, 1, 1, 1, 1), ValueError),
])
def test_errors_name_the_argument(arg, value, exc):
    with pytest.raises(exc, match=arg):
        prepare_mask_bias(q, k, **{arg: value})


def test_check_qkv_errors():
    v = torch.randn(B, Sk, Hkv, D)
    assert check_qkv(q, k, v) == (B, Sq, H, D, Sk, Hkv)
    with pytest.raises(ValueError, match="key"):
        check_qkv(q, torch.randn(B, Sk, 3, D), torch.randn(B, Sk, 3, D))
    with pytest.raises(ValueError, match="key"):
        check_qkv(q, torch.randn(B, Sk, Hkv, D + 1), torch.randn(B, Sk, Hkv, D + 1))
    with pytest.raises(TypeError, match="value"):
        check_qkv(q, k, v.half())
    with pytest.raises(TypeError, match="query"):
        check_qkv(q.int(), k.int(), v.int())
