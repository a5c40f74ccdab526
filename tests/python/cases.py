"""
cases.py -- inputs for the Python tests: q/k/v, masks and biases in every accepted form, and the matching
4-D views for reference.py (built here by explicit reshapes, independently of flash_dmattn._inputs).

Forms (X = mask or bias; Hx = heads of the form):
  "full"     (B, H, Sq, Sk)            "hkv"     (B, Hkv, Sq, Sk)        "shared"  (1, 1, Sq, Sk)
  "row"      (B, H, 1, Sk)             "3d"      (B, Hkv, Sk)            "2d"      (B, Sk)
  "expand"   (B, Hkv, Sq, Sk) stride-0 view of (B, Hkv, 1, Sk)           "lastdim1" (B, H, Sq, 1) (bias only)
  "float"    mask only: (B, H, Sq, Sk) float 0/1 (nonzero = attend)
Masks have a few fully masked rows (every row of query index 1 and, for row forms, nothing else).
"""
import torch

MASK_FORMS = ["full", "hkv", "shared", "row", "3d", "2d", "expand", "float"]
BIAS_FORMS = ["full", "hkv", "shared", "row", "3d", "2d", "expand", "lastdim1"]


def qkv(B, Sq, Sk, H, Hkv, D, dtype, device, requires_grad=False, gen=None):
    q = torch.randn(B, Sq, H, D, generator=gen).to(dtype).to(device)
    k = torch.randn(B, Sk, Hkv, D, generator=gen).to(dtype).to(device)
    v = torch.randn(B, Sk, Hkv, D, generator=gen).to(dtype).to(device)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_()
    return q, k, v


def _shape(form, B, H, Hkv, Sq, Sk):
    return {"full": (B, H, Sq, Sk), "hkv": (B, Hkv, Sq, Sk), "shared": (1, 1, Sq, Sk), "row": (B, H, 1, Sk),
            "3d": (B, Hkv, Sk), "2d": (B, Sk), "expand": (B, Hkv, 1, Sk), "lastdim1": (B, H, Sq, 1),
            "float": (B, H, Sq, Sk)}[form]


def as_ref4(x, form, Sq, Sk):
    """The caller's tensor in the reference's 4-D broadcast form ({B|1}, {H|Hkv|1}, {Sq|1}, Sk)."""
    if form == "3d":
        return x[:, :, None, :]
    if form == "2d":
        return x[:, None, None, :]
    if form == "lastdim1":
        return x.expand(*x.shape[:3], Sk)
    return x


def make_mask(form, B, H, Hkv, Sq, Sk, device, gen=None):
    """(mask as the caller passes it, its bool 4-D reference view)."""
    shape = _shape(form, B, H, Hkv, Sq, Sk)
    m = torch.rand(shape, generator=gen) > 0.3
    if len(shape) == 4 and shape[2] == Sq and Sq > 1:
        m[:, :, 1, :] = False                       # fully masked rows
    elif Sk > 1:
        m[..., 0] = True
    if form == "float":
        m_user = m.float().to(device)
    elif form == "expand":
        m_user = m.to(device).expand(B, Hkv, Sq, Sk)
    else:
        m_user = m.to(device)
    ref = as_ref4(m_user, form, Sq, Sk)
    return m_user, (ref != 0 if ref.dtype != torch.bool else ref)


def make_bias(form, B, H, Hkv, Sq, Sk, dtype, device, requires_grad=False, gen=None):
    """(leaf bias tensor, the tensor the caller passes (maybe a view of the leaf))."""
    shape = _shape(form, B, H, Hkv, Sq, Sk)
    leaf = (torch.randn(shape, generator=gen) * 2).to(dtype).to(device)
    if requires_grad:
        leaf.requires_grad_()
    user = leaf.expand(B, Hkv, Sq, Sk) if form == "expand" else leaf
    return leaf, user


def ref_dbias(ref_db4, form, leaf_shape):
    """Reference dbias (from reference.py in the 4-D form) -> the leaf's shape."""
    if form == "lastdim1":
        return ref_db4.sum(-1, keepdim=True)
    if form == "expand":
        return ref_db4.sum(2, keepdim=True) if ref_db4.shape[2] != 1 else ref_db4
    return ref_db4.reshape(leaf_shape)


def capture_graph(step):
    """Warm `step` up twice on a side stream (as torch documents for CUDA graphs), then capture one call of it:
    returns (graph, the tensors that call returned). CUDA only."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static = step()
    return g, static
