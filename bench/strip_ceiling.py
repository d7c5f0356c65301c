"""Ceiling of the strip micro-kernel on this machine: one thread, input in L1, aligned or not.

    python bench/strip_ceiling.py

Each nonzero broadcasts one weight against 4 or 8 vectors loaded from x, so a strip issues one vector
load per FMA. This measures how fast that runs when nothing else limits it (no cache misses, no
epilogue), for x on a cache line and x one float off it (every load then splits two lines), and for
4 accumulators (one per vector) against 8 (the same 4 vectors over two sets, or 8 vectors) and 6 (6 vectors, the
lanes conv's strip on AVX2, where 8 vectors' accumulators overflow its 16 registers). It prints
GMAC/s per core; compare them with dense sgemm, the last line, which keeps its inputs in registers.
The two rows before it run short strips, as a lanes conv's channel blocks do, with and without a last vector
masked by a run-time n_valid (the `whole` strips skip that mask).
"""

import numba
import numpy as np
import torch
from numba import njit

from sparsert.kernels.strip import _make_strip, strip4, strip4_split, strip6, strip8
from sparsert.plan import aligned_empty
from sparsert.timing import fastest_seconds

NONZEROS = 2000   # one row's nonzeros, each a random whole-vector offset into x
X_FLOATS = 2048   # 8 KB of input: L1-resident
REPEATS = 1000


# Not cached on disk: Numba keys a cache on this file alone, so a changed strip.py would be measured stale.
@njit(boundscheck=False)
def _run4(x, indices, values, out, repeats):
    for _ in range(repeats):
        strip4(x, 0, 1, indices, values, 0, indices.shape[0], 0.0, out, 0, 64, out, 0, False, False, out, 0, False)


@njit(boundscheck=False)
def _run4_split(x, indices, values, out, repeats):
    for _ in range(repeats):
        strip4_split(x, 0, 1, indices, values, 0, indices.shape[0], 0.0, out, 0, 64, out, 0, False, False, out, 0,
                     False)


@njit(boundscheck=False)
def _run6(x, indices, values, out, repeats):
    for _ in range(repeats):
        strip6(x, 0, 1, indices, values, 0, indices.shape[0], 0.0, out, 0, 96, out, 0, False, False, out, 0, False)


@njit(boundscheck=False)
def _run8(x, indices, values, out, repeats):
    for _ in range(repeats):
        strip8(x, 0, 1, indices, values, 0, indices.shape[0], 0.0, out, 0, 128, out, 0, False, False, out, 0, False)


# The 6-vector strip as it was before `whole` strips: its last vector masked by a run-time n_valid.
_strip6_masked = _make_strip(6)
SHORT = 19  # nonzeros a strip: a lanes conv's channel block at 10% density


@njit(boundscheck=False)
def _run6_short(x, indices, values, out, repeats, n_valid):
    for _ in range(repeats):
        for k in range(0, indices.shape[0] - SHORT + 1, SHORT):
            strip6(x, 0, 1, indices, values, k, k + SHORT, 0.0, out, 0, n_valid, out, 0, False, True, out, 0, False)


@njit(boundscheck=False)
def _run6_short_masked(x, indices, values, out, repeats, n_valid):
    for _ in range(repeats):
        for k in range(0, indices.shape[0] - SHORT + 1, SHORT):
            _strip6_masked(x, 0, 1, indices, values, k, k + SHORT, 0.0, out, 0, n_valid, out, 0, False, True, out, 0,
                           False)


def main(repeats: int = REPEATS) -> list:
    """Print the table; returns its rows (name, GMAC/s aligned, GMAC/s one float off)."""
    threads = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    try:
        return _table(repeats)
    finally:
        numba.set_num_threads(threads[0])
        torch.set_num_threads(threads[1])


def _table(repeats: int) -> list:
    rng = np.random.default_rng(0)
    indices = (rng.integers(0, X_FLOATS - 256, NONZEROS) // 16 * 16).astype(np.uint32)
    values = rng.random(NONZEROS, dtype=np.float32)
    out = aligned_empty(256)
    kernels = (("4 vectors, 4 accumulators", _run4, 64), ("4 vectors, 2 x 4 accumulators", _run4_split, 64),
               ("6 vectors, 6 accumulators", _run6, 96), ("8 vectors, 8 accumulators", _run8, 128))
    rows = []
    print(f"{'strip':32s} {'x on a line':>14s} {'x 4 B off':>14s}   (GMAC/s, one core)")
    for name, kernel, width in kernels:
        rates = []
        for shift in (0, 1):
            x = aligned_empty(X_FLOATS + 16)[shift:shift + X_FLOATS]
            x[:] = rng.random(X_FLOATS, dtype=np.float32)
            seconds = fastest_seconds(lambda: kernel(x, indices, values, out, repeats), 15)
            rates.append(NONZEROS * width * repeats / seconds / 1e9)
        print(f"{name:32s} {rates[0]:14.1f} {rates[1]:14.1f}")
        rows.append((name, *rates))
    short = NONZEROS // SHORT * SHORT
    for name, kernel in ((f"6 vectors, {SHORT} nonzeros a strip", _run6_short),
                         (f"  the same, run-time masked tail", _run6_short_masked)):
        x = aligned_empty(X_FLOATS)
        x[:] = rng.random(X_FLOATS, dtype=np.float32)
        seconds = fastest_seconds(lambda: kernel(x, indices, values, out, repeats, 96), 15)
        rate = short * 96 * repeats / seconds / 1e9
        print(f"{name:32s} {rate:14.1f}")
        rows.append((name, rate, float("nan")))
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    seconds = fastest_seconds(lambda: [a @ b for _ in range(20)], 5)
    print(f"{'dense sgemm 512^3 (torch)':32s} {512 ** 3 * 20 / seconds / 1e9:14.1f}")
    return rows


if __name__ == "__main__":
    main()
