"""
test_mask.py -- flash_dmattn.utils.mask.create_mask (SPEC section 6) against reference.create_mask_ref, on the
C path (CPU; CUDA when the library has it) and on the torch path (_create_mask_torch, what CUDA tensors use with
a library built without CUDA), with ties, NaN, -inf, -0.0, causal with a per-key bias, base masks, GQA heads.
"""
import math
import zlib

import pytest
import torch

import reference as R
from conftest import devices
from flash_dmattn.utils import create_mask
from flash_dmattn.utils.mask import _create_mask_torch

# bias shape, mask shape (or None), causal, window, Sq
CASES = [
    ((2, 3, 17, 31), None, False, 5, 17),
    ((2, 3, 1, 31), None, True, 4, 17),              # per-key bias + causal: differs per row
    ((1, 2, 1, 50), (2, 1, 1, 50), False, 10, 1),
    ((2, 2, 13, 40), (2, 2, 13, 40), True, 7, 13),
    ((1, 1, 1, 4095), (1, 1, 1, 4095), True, 2048, 113),
    ((2, 4, 9, 9), (1, 4, 9, 9), False, 9, 9),       # window == Sk: keep all candidates
    ((1, 2, 30, 20), None, True, 3, 30),             # causal with Sq > Sk: empty rows
]


def _bias(shape, dtype, device, special):
    b = torch.randn(shape)
    if special:
        b = torch.round(b * 2) / 2                   # many ties
        flat = b.view(-1)
        flat[::7] = math.nan
        flat[3::11] = -math.inf
        flat[5::13] = -0.0
        flat[6::13] = 0.0
    return b.to(dtype).to(device)


@pytest.mark.parametrize("device", devices(library_cuda=False))
@pytest.mark.parametrize("path", ["library", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-m{c[1]}-c{int(c[2])}-w{c[3]}-Sq{c[4]}")
def test_create_mask(case, special, dtype, path, device):
    bshape, mshape, causal, window, Sq = case
    g = torch.Generator().manual_seed(zlib.crc32(repr((case, special)).encode()))
    torch.manual_seed(zlib.crc32(repr((case, special)).encode()))
    bias = _bias(bshape, dtype, device, special)
    mask = None if mshape is None else (torch.rand(mshape, generator=g) > 0.3).to(device)
    want = R.create_mask_ref(bias, mask, causal=causal, window=window, Sq=Sq)
    if path == "library":
        got = create_mask(bias, mask, is_causal=causal, keep_window_size=window, query_len=Sq)
    else:
        dims = tuple(want.shape)
        got = _create_mask_torch(bias, mask, Sq, causal, window, dims)
    assert got.dtype == torch.bool and tuple(got.shape) == tuple(want.shape)
    assert (got.view(torch.uint8) <= 1).all(), "unwritten (poisoned) elements in the keep mask"
    assert torch.equal(got.cpu(), want.cpu())


def test_create_mask_forms_and_errors():
    bias = torch.randn(2, 3, 20)
    got = create_mask(bias, torch.ones(2, 20), keep_window_size=4)        # 3-D bias, 2-D mask
    assert got.shape == (2, 3, 1, 20) and (got.sum(-1) == 4).all()
    got = create_mask(torch.randn(2, 2, 1, 20), torch.ones(2, 4, 1, 20, dtype=torch.bool), keep_window_size=3)
    assert got.shape == (2, 4, 1, 20)                                       # GQA heads
    with pytest.raises(ValueError, match="query_len"):
        create_mask(torch.randn(1, 1, 1, 8), is_causal=True, keep_window_size=2)
    with pytest.raises(ValueError, match="keep_window_size"):
        create_mask(torch.randn(1, 1, 1, 8), keep_window_size=0)
    with pytest.raises(TypeError, match="attention_bias"):
        create_mask(torch.randn(1, 1, 1, 8, dtype=torch.float64), keep_window_size=2)
    with pytest.raises(ValueError, match="attention_mask"):
        create_mask(torch.randn(1, 1, 1, 8), torch.ones(1, 1, 1, 9), keep_window_size=2)
