"""Shared Numba settings: every kernel is cached on disk and compiled in a parallel and a serial twin.

Numba's cache is keyed on each kernel's own source file; `kernels/__init__` empties it whenever any
kernel source changes, so kernels that inline these helpers recompile with them."""
import types

import numpy as np

from llvmlite import ir
from numba import njit
from numba.core import cgutils

# 'contract' lets LLVM fuse multiply-add; 'reassoc' lets it vectorise the batch-1 dot products.
# No 'nnan'/'ninf': NaN and Inf in activations must propagate as they do in dense torch.
FASTMATH = {"contract", "reassoc", "nsz"}
OPTIONS = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy", boundscheck=False)


def twin(py_func):
    """(parallel, serial) compiled versions of one kernel; prange runs as range in the serial one.

    The serial copy gets its own qualname so the two never share an on-disk cache entry."""
    serial = types.FunctionType(py_func.__code__, py_func.__globals__, py_func.__name__ + "_seq",
                                py_func.__defaults__, py_func.__closure__)
    serial.__qualname__ = py_func.__qualname__ + "_seq"
    serial.__module__ = py_func.__module__
    return njit(parallel=True, **OPTIONS)(py_func), njit(**OPTIONS)(serial)


@njit(inline="always", **{k: v for k, v in OPTIONS.items() if k != "cache"})
def relu_or_identity(v, relu):
    """ReLU matching torch.relu: NaN stays NaN (it fails `v < 0`), -inf becomes 0."""
    if not relu or not v < 0.0:
        return v
    return np.float32(0.0)  # unifies with v's own dtype: float32 kernels stay float32


def declare_function(module, name, return_type, arg_types):
    """The LLVM function `name` (an intrinsic such as llvm.fma.v16f32) in `module`, declared once: for the
    kernels written in LLVM IR (strip.py, sliced.py)."""
    return cgutils.get_or_insert_function(module, ir.FunctionType(return_type, arg_types), name)
