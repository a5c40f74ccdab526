"""
_lib.py -- ctypes binding of the flash-dmattn C API (include/flash_dma.h) and the calls that run it on torch
tensors.

Where the library comes from (first hit wins):
  1. the environment variable FDMA_LIBRARY (a path to libflashdma.so, e.g. build/libflashdma.so), so that the
     tests run from a plain CMake build without installing anything;
  2. `_lib/libflashdma.so` inside the package (where `pip install .` puts it; in an editable install every
     directory of the package's __path__ is searched).
The loader refuses a library whose fdma_version() differs from FDMA_VERSION below, and one whose
sizeof(fdma_params) differs from the ctypes layout here (the structs mirror the header field by field).

Calls (shapes as in the header: q, out (B, Sq, H, D); k, v (B, Sk, Hkv, D); mask, bias 4-D views with dims
({B|1}, {H|Hkv|1}, {Sq|1}, Sk); lse (B, H, Sq) fp32):
  run_fwd(...)  -> (out, lse, probs)         torch allocates out, lse, probs and the workspace
  run_bwd(...)  -> (dq, dk, dv, dbias)
  create_mask(...)                            SPEC section 6 keep mask
Dropout's (seed, offset) go by value (fdma_params.seed / .offset), or, with rng_state= an int64[2] tensor on
q's device, as its pointer (fdma_params.rng_state), read by the kernels when they run (CUDA graphs: _ops).
A top-k window that the library's CUDA build reports UNSUPPORTED is run as an explicit keep mask from
utils.mask.create_mask (same SPEC section 6 selection; see resolve_window).
On CUDA tensors the current torch stream of the tensors' device is passed on every call; nothing here
synchronizes. A non-OK status raises ValueError (invalid argument), TypeError (invalid argument about a
dtype) or RuntimeError (anything else), each carrying fdma_last_error().
"""
import ctypes
import os
from pathlib import Path

import torch

FDMA_VERSION = 200  # 0.2.0, FDMA_VERSION_MAJOR * 10000 + MINOR * 100 + PATCH

STATUS_OK = 0
STATUS_INVALID_ARGUMENT = 1
STATUS_UNSUPPORTED = 2
STATUS_NAMES = {
    0: "FDMA_STATUS_OK", 1: "FDMA_STATUS_INVALID_ARGUMENT", 2: "FDMA_STATUS_UNSUPPORTED",
    3: "FDMA_STATUS_WORKSPACE_TOO_SMALL", 4: "FDMA_STATUS_OUT_OF_MEMORY", 5: "FDMA_STATUS_CUDA_ERROR",
    6: "FDMA_STATUS_INTERNAL",
}

DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 2
DEVICE_CPU, DEVICE_CUDA = 0, 1
OP_FORWARD, OP_BACKWARD = 0, 1

TORCH_DTYPES = {torch.float32: DTYPE_F32, torch.float16: DTYPE_F16, torch.bfloat16: DTYPE_BF16}

_i64x4 = ctypes.c_int64 * 4


class View4(ctypes.Structure):
    """fdma_view4: a strided 4-D view broadcast to (B, H, Sq, Sk); ptr NULL = absent."""
    _fields_ = [("ptr", ctypes.c_void_p), ("dim", _i64x4), ("stride", _i64x4)]


class Params(ctypes.Structure):
    """fdma_params, field for field."""
    _fields_ = [
        ("device", ctypes.c_int), ("stream", ctypes.c_void_p), ("dtype", ctypes.c_int),
        ("B", ctypes.c_int64), ("Sq", ctypes.c_int64), ("Sk", ctypes.c_int64),
        ("H", ctypes.c_int64), ("Hkv", ctypes.c_int64), ("D", ctypes.c_int64),
        ("q", ctypes.c_void_p), ("q_stride", _i64x4),
        ("k", ctypes.c_void_p), ("k_stride", _i64x4),
        ("v", ctypes.c_void_p), ("v_stride", _i64x4),
        ("mask", View4), ("bias", View4),
        ("scale", ctypes.c_float), ("softcap", ctypes.c_float), ("causal", ctypes.c_int32),
        ("window", ctypes.c_int64), ("p_drop", ctypes.c_float),
        ("seed", ctypes.c_uint64), ("offset", ctypes.c_uint64), ("rng_state", ctypes.c_void_p),
        ("deterministic", ctypes.c_int32),
        ("out", ctypes.c_void_p), ("out_stride", _i64x4),
        ("lse", ctypes.c_void_p), ("probs", ctypes.c_void_p),
        ("dout", ctypes.c_void_p), ("dout_stride", _i64x4),
        ("dq", ctypes.c_void_p), ("dq_stride", _i64x4),
        ("dk", ctypes.c_void_p), ("dk_stride", _i64x4),
        ("dv", ctypes.c_void_p), ("dv_stride", _i64x4),
        ("dbias", ctypes.c_void_p), ("dbias_stride", _i64x4),
        ("mask_summary", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p), ("workspace_bytes", ctypes.c_size_t),
    ]


class KernelInfo(ctypes.Structure):
    """fdma_kernel_info."""
    _fields_ = [("name", ctypes.c_char * 64), ("workspace_bytes", ctypes.c_size_t)]


class TopkParams(ctypes.Structure):
    """fdma_topk_params."""
    _fields_ = [
        ("device", ctypes.c_int), ("stream", ctypes.c_void_p), ("dtype", ctypes.c_int),
        ("Sq", ctypes.c_int64), ("Sk", ctypes.c_int64),
        ("bias", View4), ("mask", View4),
        ("causal", ctypes.c_int32), ("window", ctypes.c_int64),
        ("out", ctypes.c_void_p), ("out_dim", _i64x4), ("out_stride", _i64x4),
    ]


# ---------------------------------------------------------------------------------------------------------
# Loading.

_LIB = None
LOAD_ERROR = None  # why the library could not be loaded (str), None when loaded
LIBRARY_PATH = None


def _candidates():
    env = os.environ.get("FDMA_LIBRARY")
    if env:
        return [Path(env)]
    dirs = [Path(__file__).resolve().parent]
    try:
        import flash_dmattn
        dirs += [Path(p) for p in getattr(flash_dmattn, "__path__", [])]
    except ImportError:
        pass
    seen, out = set(), []
    for d in dirs:
        c = (d / "_lib" / "libflashdma.so").resolve()
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def _declare(lib):
    P = ctypes.POINTER
    sig = {
        "fdma_version": (ctypes.c_int, []),
        "fdma_version_string": (ctypes.c_char_p, []),
        "fdma_status_string": (ctypes.c_char_p, [ctypes.c_int]),
        "fdma_last_error": (ctypes.c_char_p, []),
        "fdma_clear_error": (None, []),
        "fdma_params_size": (ctypes.c_size_t, []),
        "fdma_params_init": (None, [P(Params)]),
        "fdma_fwd_workspace_size": (ctypes.c_int, [P(Params), P(ctypes.c_size_t)]),
        "fdma_fwd": (ctypes.c_int, [P(Params)]),
        "fdma_bwd_workspace_size": (ctypes.c_int, [P(Params), P(ctypes.c_size_t)]),
        "fdma_bwd": (ctypes.c_int, [P(Params)]),
        "fdma_query": (ctypes.c_int, [P(Params), ctypes.c_int, P(KernelInfo)]),
        "fdma_device_available": (ctypes.c_int, [ctypes.c_int]),
        "fdma_topk_params_init": (None, [P(TopkParams)]),
        "fdma_create_mask": (ctypes.c_int, [P(TopkParams)]),
        "fdma_dropout_keep": (ctypes.c_int, [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64,
                                             ctypes.c_uint64, ctypes.c_float]),
        "fdma_philox4x32_10": (None, [P(ctypes.c_uint32), P(ctypes.c_uint32), P(ctypes.c_uint32)]),
        "fdma_set_num_threads": (None, [ctypes.c_int]),
        "fdma_get_num_threads": (ctypes.c_int, []),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args


def _load_from(path):
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    version = lib.fdma_version()
    if version != FDMA_VERSION:
        raise ImportError(f"{path}: library version {version} ({lib.fdma_version_string().decode()}) differs "
                          f"from the version this package binds ({FDMA_VERSION}); rebuild or reinstall")
    size = lib.fdma_params_size()
    if size != ctypes.sizeof(Params):
        raise ImportError(f"{path}: sizeof(fdma_params) is {size} in the library but {ctypes.sizeof(Params)} in "
                          f"the Python binding; header and binding disagree")
    return lib


def load():
    """Load the library once; returns it or raises ImportError saying where it looked and why it failed."""
    global _LIB, LOAD_ERROR, LIBRARY_PATH
    if _LIB is not None:
        return _LIB
    errors = []
    for path in _candidates():
        if not path.exists():
            errors.append(f"{path}: no such file")
            continue
        try:
            _LIB = _load_from(path)
            LIBRARY_PATH = str(path)
            LOAD_ERROR = None
            return _LIB
        except (OSError, AttributeError, ImportError) as e:
            errors.append(str(e))
    LOAD_ERROR = "libflashdma.so not loaded: " + "; ".join(errors) + \
        " (set FDMA_LIBRARY to a built libflashdma.so or install the package with pip)"
    raise ImportError(LOAD_ERROR)


def try_load():
    try:
        return load()
    except ImportError:
        return None


def device_available(device):
    """fdma_device_available: CPU always; CUDA when built with CUDA and a cc >= 8.0 device is visible."""
    lib = try_load()
    if lib is None:
        return False
    code = DEVICE_CUDA if device == "cuda" else DEVICE_CPU
    return bool(lib.fdma_device_available(code))


# ---------------------------------------------------------------------------------------------------------
# Status -> Python exception.

def last_error():
    return load().fdma_last_error().decode(errors="replace")


def check(status, what):
    if status == STATUS_OK:
        return
    raise_status(status, what, last_error())


def raise_status(status, what, msg):
    msg = msg or "(no message)"
    text = f"{what}: {STATUS_NAMES.get(status, status)}: {msg}"
    if status == STATUS_INVALID_ARGUMENT:
        raise (TypeError if "dtype" in msg.lower() else ValueError)(text)
    raise RuntimeError(text)


# ---------------------------------------------------------------------------------------------------------
# Filling the structs from torch tensors.

def _stride4(arr, t):
    for i in range(4):
        arr[i] = t.stride(i)


def _view4(view, t):
    if t is None:
        view.ptr = None
        return
    view.ptr = t.data_ptr()
    for i in range(4):
        view.dim[i] = t.shape[i]
        view.stride[i] = t.stride(i)


def _device_and_stream(t):
    if t.device.type == "cuda":
        return DEVICE_CUDA, ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream)
    if t.device.type == "cpu":
        return DEVICE_CPU, None
    raise ValueError(f"query: expected a CPU or CUDA tensor, got device {t.device}")


def dtype_code(t, name):
    code = TORCH_DTYPES.get(t.dtype)
    if code is None:
        raise TypeError(f"{name}: expected dtype float16, bfloat16 (or float32 on CPU), got {t.dtype}")
    return code


def _params(q, k, v, mask, bias, scale, causal, softcap, window, p_drop, seed, offset, deterministic,
            rng_state=None):
    lib = load()
    p = Params()
    lib.fdma_params_init(ctypes.byref(p))
    p.device, p.stream = _device_and_stream(q)
    p.dtype = dtype_code(q, "query")
    p.B, p.Sq, p.H, p.D = q.shape
    p.Sk, p.Hkv = k.shape[1], k.shape[2]
    p.q, p.k, p.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
    _stride4(p.q_stride, q)
    _stride4(p.k_stride, k)
    _stride4(p.v_stride, v)
    _view4(p.mask, mask)
    _view4(p.bias, bias)
    p.scale = float("nan") if scale is None else float(scale)
    p.softcap = float(softcap)
    p.causal = int(bool(causal))
    p.window = int(window)
    p.p_drop = float(p_drop)
    p.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    p.offset = int(offset) & 0xFFFFFFFFFFFFFFFF
    p.rng_state = None if rng_state is None else _rng_state_ptr(rng_state, q)
    p.deterministic = int(bool(deterministic))
    return p


def _rng_state_ptr(rng_state, q):
    """fdma_params.rng_state from an int64[2] tensor (seed, offset) on q's device (CPU: host memory), which
    the kernels read when they run (a CUDA graph's replay refills it before they do)."""
    if (not isinstance(rng_state, torch.Tensor) or rng_state.dtype != torch.int64 or rng_state.numel() != 2
            or not rng_state.is_contiguous() or rng_state.device != q.device):
        got = (f"{rng_state.dtype} {tuple(rng_state.shape)} on {rng_state.device}"
               if isinstance(rng_state, torch.Tensor) else type(rng_state).__name__)
        raise ValueError(f"rng_state: expected a contiguous int64 tensor of 2 elements (seed, offset) on "
                         f"{q.device}, got {got}")
    return rng_state.data_ptr()


def _workspace(p, size_fn, what, device):
    nbytes = ctypes.c_size_t(0)
    check(size_fn(ctypes.byref(p), ctypes.byref(nbytes)), what)
    if nbytes.value == 0:
        return None
    ws = torch.empty(nbytes.value, dtype=torch.uint8, device=device)
    p.workspace = ws.data_ptr()
    p.workspace_bytes = nbytes.value
    return ws


def _device_guard(t):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return _NullGuard()


class _NullGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def resolve_window(q, k, v, mask, bias, causal, softcap, window, p_drop, backward):
    """(mask, window) to run with. The kernels do the top-k selection themselves (fused) where the library
    supports it for these inputs; where it answers UNSUPPORTED for the window (a CUDA build without the fused
    selection), the same SPEC section 6 keep mask is built by create_mask and passed as the mask instead."""
    if window <= 0 or q.device.type != "cuda":
        return mask, window
    status, _ = query_status(q, k, v, mask, bias, causal, softcap, window, p_drop, backward)
    if status != STATUS_UNSUPPORTED:
        return mask, window
    status, _ = query_status(q, k, v, mask, bias, causal, softcap, 0, p_drop, backward)
    if status != STATUS_OK:
        return mask, window                      # unsupported for another reason: let the call report it
    from .utils.mask import create_mask
    keep = create_mask(bias, mask, is_causal=causal, keep_window_size=window, query_len=q.shape[1])
    return keep, 0


def run_fwd(q, k, v, mask, bias, scale, causal, softcap, window, p_drop, seed, offset, return_probs,
            out=None, rng_state=None):
    """One forward call. q (B, Sq, H, D), k/v (B, Sk, Hkv, D), mask (bool) / bias 4-D views or None.
    Writes `out` when given (shape of q, last dim contiguous), else allocates it. Returns (out, lse, probs);
    probs is (B, H, Sq, Sk) in q's dtype when return_probs, else None. Dropout keep bits come from
    (seed, offset), or, when rng_state (int64[2] on q's device) is given, from the pair the kernels read there."""
    lib = load()
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    mask, window = resolve_window(q, k, v, mask, bias, causal, softcap, window, p_drop, False)
    with _device_guard(q):
        p = _params(q, k, v, mask, bias, scale, causal, softcap, window, p_drop, seed, offset, False, rng_state)
        if out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
        probs = torch.empty(B, H, Sq, Sk, dtype=q.dtype, device=q.device) if return_probs else None
        p.out = out.data_ptr()
        _stride4(p.out_stride, out)
        p.lse = lse.data_ptr()
        p.probs = None if probs is None else probs.data_ptr()
        ws = _workspace(p, lib.fdma_fwd_workspace_size, "fdma_fwd_workspace_size", q.device)
        check(lib.fdma_fwd(ctypes.byref(p)), "fdma_fwd")
        del ws  # the caching allocator keeps the block for the stream's queued kernels
    return out, lse, probs


def run_bwd(dout, q, k, v, mask, bias, out, lse, scale, causal, softcap, window, p_drop, seed, offset,
            deterministic, need_dbias, dq=None, dk=None, dv=None, dbias=None, rng_state=None):
    """One backward call: returns (dq, dk, dv, dbias); dbias has the bias view's dims (own contiguous
    strides) when need_dbias and a bias is given, else None. Given dq/dk/dv/dbias are written in place.
    (seed, offset) / rng_state as in run_fwd."""
    lib = load()
    mask, window = resolve_window(q, k, v, mask, bias, causal, softcap, window, p_drop, True)
    with _device_guard(q):
        p = _params(q, k, v, mask, bias, scale, causal, softcap, window, p_drop, seed, offset, deterministic,
                    rng_state)
        p.out = out.data_ptr()
        _stride4(p.out_stride, out)
        p.lse = lse.data_ptr()
        p.dout = dout.data_ptr()
        _stride4(p.dout_stride, dout)
        if dq is None:
            dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        if dk is None:
            dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        if dv is None:
            dv = torch.empty_like(v, memory_format=torch.contiguous_format)
        p.dq, p.dk, p.dv = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
        _stride4(p.dq_stride, dq)
        _stride4(p.dk_stride, dk)
        _stride4(p.dv_stride, dv)
        if need_dbias and bias is not None:
            if dbias is None:
                dbias = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)
            p.dbias = dbias.data_ptr()
            _stride4(p.dbias_stride, dbias)
        else:
            dbias = None
        ws = _workspace(p, lib.fdma_bwd_workspace_size, "fdma_bwd_workspace_size", q.device)
        check(lib.fdma_bwd(ctypes.byref(p)), "fdma_bwd")
        del ws
    return dq, dk, dv, dbias


def query_status(q, k, v, mask=None, bias=None, causal=False, softcap=0.0, window=0, p_drop=0.0, backward=False):
    """fdma_query without raising: (status, kernel name or the error message)."""
    lib = load()
    with _device_guard(q):
        p = _params(q, k, v, mask, bias, None, causal, softcap, window, p_drop, 0, 0, False)
        # placeholders for the outputs: fdma_query validates the params but runs nothing
        p.out, p.lse = q.data_ptr(), q.data_ptr()
        _stride4(p.out_stride, q)
        if backward:
            p.dout, p.dq, p.dk, p.dv = q.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr()
            for arr, t in ((p.dout_stride, q), (p.dq_stride, q), (p.dk_stride, k), (p.dv_stride, v)):
                _stride4(arr, t)
        info = KernelInfo()
        status = lib.fdma_query(ctypes.byref(p), OP_BACKWARD if backward else OP_FORWARD, ctypes.byref(info))
    return status, (info.name.decode() if status == STATUS_OK else last_error())


def query(q, k, v, mask=None, bias=None, causal=False, softcap=0.0, window=0, p_drop=0.0, backward=False):
    """fdma_query: the kernel name that would run (or raises with the message the call would give)."""
    status, text = query_status(q, k, v, mask, bias, causal, softcap, window, p_drop, backward)
    if status != STATUS_OK:
        load().fdma_clear_error()
        raise_status(status, "fdma_query", text)
    return text


def create_mask_c(bias, mask, Sq, causal, window, out):
    """fdma_create_mask into `out` (uint8/bool, dims per the header). Returns the status (does not raise on
    UNSUPPORTED, so that the caller can choose another path); raises on any other failure."""
    lib = load()
    t = TopkParams()
    lib.fdma_topk_params_init(ctypes.byref(t))
    t.device, t.stream = _device_and_stream(bias)
    t.dtype = dtype_code(bias, "attention_bias")
    t.Sq, t.Sk = int(Sq), bias.shape[3]
    _view4(t.bias, bias)
    _view4(t.mask, mask)
    t.causal = int(bool(causal))
    t.window = int(window)
    t.out = out.data_ptr()
    for i in range(4):
        t.out_dim[i] = out.shape[i]
        t.out_stride[i] = out.stride(i)
    with _device_guard(bias):
        status = lib.fdma_create_mask(ctypes.byref(t))
    if status == STATUS_UNSUPPORTED:
        return status
    check(status, "fdma_create_mask")
    return status


def dropout_keep(seed, offset, row, j, p_drop):
    return bool(load().fdma_dropout_keep(seed, offset, row, j, p_drop))


def set_num_threads(n):
    load().fdma_set_num_threads(int(n))


def get_num_threads():
    return load().fdma_get_num_threads()
