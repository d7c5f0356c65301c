"""Shared Numba settings: every kernel is cached on disk and compiled in a parallel and a serial twin.

Numba's cache is keyed on each kernel's own source file; `kernels/__init__` empties it whenever any
kernel source changes, so kernels that inline these helpers recompile with them."""
import types
import warnings

import numpy as np

import numba
from llvmlite import binding as llvm_binding, ir
from numba import njit, types as nb_types
from numba.core import cgutils
from numba.core.cpu_options import ParallelOptions
from numba.extending import intrinsic


def target_has(feature: str) -> bool:
    """Whether the machine code Numba emits here may use an x86 feature ('avx512f'): the features it compiles for,
    NUMBA_CPU_FEATURES where set, else the host CPU's (as numba.core.codegen picks them; NUMBA_CPU_NAME alone
    leaves the host's features on)."""
    if numba.config.CPU_FEATURES is not None:
        return f"+{feature}" in numba.config.CPU_FEATURES.split(",")
    return bool(llvm_binding.get_host_cpu_features().get(feature))


# Without AVX-512 the kernels' 64-byte vectors become two AVX2 registers each, and a 16-lane gather two slow
# ones: on Zen 3 the gather-based sliced matvec ran 1.4-1.9x slower than the CSR row loop (ops.SLICED_MATVEC).
# The lanes conv's strips narrow there from 8 vectors to 6 (plan.LANE_STRIP_VECTORS: 8 vectors' accumulators spill);
# the column-blocked Linear keeps its 4-vector strips (a plain 4-vector strip measured no faster, bench/RESULTS.md).
AVX512 = target_has("avx512f")

# 'contract' lets LLVM fuse multiply-add; 'reassoc' lets it vectorise the batch-1 dot products.
# No 'nnan'/'ninf': NaN and Inf in activations must propagate as they do in dense torch.
FASTMATH = {"contract", "reassoc", "nsz"}
OPTIONS = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy", boundscheck=False)


# The serial twin compiles through Numba's parallel pipeline with every transformation off, its prange
# turned into range (this pipeline would still run a prange in parallel). The plain pipeline's code for the
# same loops ran ~2x slower: resnet18 98% at batch 32 on one thread, a lanes conv took 0.12 ms against 0.057,
# and its lanes ops 1.7-5x longer than their parallel twins on one thread. Serial twins carry small layers,
# and every op of a batch split between threads.
# An options object, not a dict: Numba pops a dict's keys as it reads them, so the next compile would find it
# empty and turn every slice assignment into a parallel loop.
SERIAL_PIPELINE = ParallelOptions(dict(comprehension=False, prange=False, setitem=False, reduction=False,
                                       numpy=False, stencil=False, fusion=False, inplace_binop=False))


def twin(py_func):
    """(parallel, serial) compiled versions of one kernel; prange runs as range in the serial one.

    The serial copy gets its own qualname so the two never share an on-disk cache entry."""
    # Its code loads the global `range` wherever the kernel's loads `prange` (same module globals, read live;
    # kernels use the bare name `prange`).
    code = py_func.__code__
    code = code.replace(co_names=tuple("range" if name == "prange" else name for name in code.co_names))
    serial = types.FunctionType(code, py_func.__globals__, py_func.__name__ + "_seq", py_func.__defaults__,
                                py_func.__closure__)
    serial.__qualname__ = py_func.__qualname__ + "_seq"
    serial.__module__ = py_func.__module__
    return njit(parallel=True, **OPTIONS)(py_func), njit(parallel=SERIAL_PIPELINE, **OPTIONS)(serial)


# Numba warns that a serial twin has nothing to run in parallel: that is its point. Only for our kernels' files.
warnings.filterwarnings("ignore", message=r"(?s)\s*The keyword argument 'parallel=True' was specified but no "
                        r"transformation.*File \"[^\"]*kernels[/\\]")


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


@intrinsic
def thread_count(typingctx):
    """numba.get_num_threads() for kernels cached on disk: Numba's own reads the count through a ctypes pointer,
    which its cache refuses ('dynamic globals'); this calls the threading layer's symbol, as Numba's
    get_thread_id does. The layer must be running (kernels/__init__ starts it)."""
    def codegen(context, builder, signature, args):
        # Declared as Numba's parfor lowering declares it (returning intp): one module may hold both.
        intp = context.get_value_type(nb_types.intp)
        return builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(intp, []), "get_num_threads"), [])
    return nb_types.intp(), codegen
