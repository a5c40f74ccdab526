"""
conftest.py -- how the Python tests find the package and the library, and the shared test helpers.

Package: always this checkout's python/ (so that the tests test the working tree, not an older install).
Library: FDMA_LIBRARY if set; else build/libflashdma.so of this checkout (cmake -S . -B build && cmake --build
build, or `make`); else the _lib/libflashdma.so of an installed flash_dmattn (pip install . / -e .).

Markers: `gpu` tests need CUDA and are skipped without it (run them with `pytest -m gpu`).

Fixtures / helpers:
  poison (autouse)   every tensor the Python layer allocates for the C library to write (out, lse, probs,
                     dq, dk, dv, dbias, workspace, create_mask's out) starts NaN-filled (floats) or 0xAB bytes,
                     so an element the library fails to write shows up (SPEC section 8).
  _needs_library     (autouse) skips a test when libflashdma.so cannot be loaded, unless it is marked
                     `no_library` (backends that do not use the C library).
  devices()          ["cpu"] plus a gpu-marked "cuda" param.
"""
import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

_spec = importlib.util.find_spec("flash_dmattn")                  # an installed copy, if any (before the path)
_installed = [Path(p) for p in (_spec.submodule_search_locations or [])] if _spec is not None else []
sys.path.insert(0, str(ROOT / "python"))                          # the tests always test this checkout
if "FDMA_LIBRARY" not in os.environ:
    for _cand in [ROOT / "python" / "flash_dmattn" / "_lib" / "libflashdma.so", ROOT / "build" / "libflashdma.so"] + \
            [p / "_lib" / "libflashdma.so" for p in _installed]:
        if _cand.exists():
            os.environ["FDMA_LIBRARY"] = str(_cand)
            break

if not torch.cuda.is_available():
    # Triton's kernels can only run in its interpreter here; it must be chosen before triton is first imported
    # (importing flash_dmattn imports the Triton backend), see test_triton.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import flash_dmattn  # noqa: E402
from flash_dmattn import _lib  # noqa: E402
from flash_dmattn.utils import mask as _mask_mod  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when torch.cuda.is_available() is False)")
    config.addinivalue_line("markers", "no_library: runs without libflashdma.so (others are skipped without it)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    return (f"flash_dmattn from {Path(flash_dmattn.__file__).parent}; library {_lib.LIBRARY_PATH or _lib.LOAD_ERROR}; "
            f"backends {flash_dmattn.get_available_backends()}")


def _poison_tensor(t):
    if t.is_floating_point():
        t.fill_(math.nan)
    elif t.dtype == torch.bool:
        t.view(torch.uint8).fill_(0xAB)
    elif t.dtype == torch.uint8:
        t.fill_(0xAB)
    return t


class _PoisonTorch:
    """torch, except that empty / empty_like return poisoned tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return _poison_tensor(torch.empty(*args, **kwargs))

    @staticmethod
    def empty_like(*args, **kwargs):
        return _poison_tensor(torch.empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_lib, "torch", _PoisonTorch())
    monkeypatch.setattr(_mask_mod, "torch", _PoisonTorch())
    yield


@pytest.fixture(autouse=True)
def _needs_library(request):
    if _lib.try_load() is None and "no_library" not in request.keywords:
        pytest.skip(f"libflashdma.so not available: {_lib.LOAD_ERROR}")


def devices(library_cuda=True):
    """["cpu", "cuda" (gpu-marked)]. With library_cuda, the CUDA case is skipped unless the library runs on
    CUDA here (flash_dmattn.CUDA_AVAILABLE), so that a CPU-only build on a GPU machine skips with a reason."""
    marks = [pytest.mark.gpu]
    if library_cuda and HAS_CUDA and not flash_dmattn.CUDA_AVAILABLE:
        marks.append(pytest.mark.skip(reason="libflashdma.so has no usable CUDA backend here "
                                             "(built without CUDA, or no GPU of compute capability >= 8.0)"))
    return ["cpu", pytest.param("cuda", marks=marks)]
