"""
flash_dmattn -- dynamic-mask attention (SPEC.md) with four backends behind one signature:

    f(query, key, value, attn_mask=None, attn_bias=None, scale=None, is_causal=None, softcap=None,
      deterministic=None, return_attn_probs=None, dropout_p=0.0, keep_window_size=None)

query (B, Sq, H, D); key, value (B, Sk, Hkv, D); output (B, Sq, H, D).

  flash_dmattn_func   the C library: CUDA kernels for CUDA tensors, the CPU backend for CPU tensors
  triton_dmattn_func  Triton kernels (flash_dmattn_triton.py)
  flex_dmattn_func    torch flex_attention (flash_dmattn_flex.py)
  flash_dmattn_func_auto(backend=None) -> a callable; backend None picks per call by the tensors' device:
                      CUDA tensors: "cuda" > "triton" > "flex" (the first available); CPU tensors: "cpu".
  get_available_backends() -> e.g. ["cuda", "triton", "flex", "cpu"]

Availability flags say whether a backend works here, not merely whether it imports:
  CPU_AVAILABLE     libflashdma.so loaded (FDMA_LIBRARY or the installed package's _lib/)
  CUDA_AVAILABLE    the library was built with CUDA and fdma_device_available(CUDA): a GPU of compute
                    capability >= 8.0 is visible
  TRITON_AVAILABLE  triton_dmattn_func imports (triton installed) and torch sees a CUDA GPU (Triton kernels
                    run on GPUs; the CPU interpreter is a debugging aid, not a backend)
  FLEX_AVAILABLE    flex_dmattn_func imports and torch has torch.nn.attention.flex_attention
A function whose backend cannot be loaded at all is None (flash_dmattn_func when the library is missing,
triton_dmattn_func / flex_dmattn_func when their modules fail to import).
"""
import torch

from . import _lib
from .flash_dmattn_interface import flash_dmattn_func as _flash_dmattn_func
from .utils.mask import create_mask

__version__ = "0.2.0"

CPU_AVAILABLE = _lib.try_load() is not None
CUDA_AVAILABLE = bool(CPU_AVAILABLE and torch.cuda.is_available() and _lib.device_available("cuda"))
flash_dmattn_func = _flash_dmattn_func if CPU_AVAILABLE else None

try:
    from .flash_dmattn_triton import triton_dmattn_func
except Exception:  # triton missing or the module absent/broken: the backend is unavailable, not fatal
    triton_dmattn_func = None
TRITON_AVAILABLE = bool(triton_dmattn_func is not None and torch.cuda.is_available())
try:
    import triton  # noqa: F401
except ImportError:
    TRITON_AVAILABLE = False

try:
    from .flash_dmattn_flex import flex_dmattn_func
except Exception:
    flex_dmattn_func = None
try:
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention  # noqa: F401
    _HAS_FLEX = True
except ImportError:
    _HAS_FLEX = False
FLEX_AVAILABLE = bool(flex_dmattn_func is not None and _HAS_FLEX)

_BACKENDS = ("cuda", "triton", "flex", "cpu")


def get_available_backends():
    """Names of the backends that work in this process, in the auto-selection priority order."""
    flags = {"cuda": CUDA_AVAILABLE, "triton": TRITON_AVAILABLE, "flex": FLEX_AVAILABLE, "cpu": CPU_AVAILABLE}
    return [b for b in _BACKENDS if flags[b]]


def _backend_func(name):
    available = get_available_backends()
    if name not in available:
        why = {"cuda": f"libflashdma.so without CUDA or no GPU of compute capability >= 8.0 "
                       f"({_lib.LOAD_ERROR or 'library ' + str(_lib.LIBRARY_PATH)})",
               "cpu": f"{_lib.LOAD_ERROR}",
               "triton": "triton or a CUDA GPU missing, or flash_dmattn_triton failed to import",
               "flex": "torch without flex_attention, or flash_dmattn_flex failed to import"}[name]
        raise RuntimeError(f"backend {name!r} is not available here ({why}); available: {available}")
    return {"cuda": flash_dmattn_func, "cpu": flash_dmattn_func, "triton": triton_dmattn_func,
            "flex": flex_dmattn_func}[name]


def _select_for(query):
    if query.device.type == "cuda":
        order = ("cuda", "triton", "flex")
    else:
        order = ("cpu",)
    available = get_available_backends()
    for name in order:
        if name in available:
            return _backend_func(name)
    raise RuntimeError(f"no backend for tensors on {query.device}: tried {list(order)}, available: {available}")


def _auto(query, key, value, *args, **kwargs):
    """Dynamic-mask attention on the best available backend for query's device (see flash_dmattn_func_auto)."""
    return _select_for(query)(query, key, value, *args, **kwargs)


def flash_dmattn_func_auto(backend=None):
    """Return an attention callable with the common signature.

    backend None: pick per call by the tensors' device (CUDA: cuda > triton > flex; CPU: cpu).
    backend "cuda" / "cpu" (both the C library; it runs on the tensors' device), "triton", "flex": that
    backend, or RuntimeError now when it is not available."""
    if backend is None:
        return _auto
    if not isinstance(backend, str) or backend.lower() not in _BACKENDS:
        raise ValueError(f"backend: expected None or one of {list(_BACKENDS)}, got {backend!r}")
    return _backend_func(backend.lower())


__all__ = [
    "get_available_backends", "flash_dmattn_func_auto", "flash_dmattn_func", "triton_dmattn_func",
    "flex_dmattn_func", "create_mask", "CUDA_AVAILABLE", "TRITON_AVAILABLE", "FLEX_AVAILABLE", "CPU_AVAILABLE",
]
