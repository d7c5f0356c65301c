"""Micro benchmark: one L1-unstructured-pruned nn.Linear(4096, 4096), fp32, every engine side by side.

    pytest bench/ --benchmark-only                      # timings, one table per (density, bs)
    pytest bench/ --benchmark-only -k "0.02 and not bsr"  # a subset (-k takes no "=")
    pytest bench/ --benchmark-disable                   # correctness only (each engine called once)

Every engine computes y[B, 4096] = x[B, 4096] @ W.T + b from the same x, W, b, and every case checks
its result against the dense float64 product, never a timing. Threads: bench/conftest.py (default 2;
scipy.sparse is single-threaded). Engines:
  torch_dense     F.linear (MKL sgemm / sgemv)
  torch_csr       torch.sparse.mm on a CSR tensor (MKL), bias added after
  torch_bsr16     torch.sparse.mm on a 16x16 BSR tensor; an unstructured mask keeps most blocks, so
                  BSR stores mostly zeros here (density_b16 in the case's extra_info)
  scipy_csr       scipy.sparse.csr_matrix @ x.T (one thread)
  sparsert_numba  SparseLinear.from_dense(..., backend="numba") (format chosen by sparsert: CSR here)
  sparsert_auto   sparsert.sparsify(nn.Sequential(linear), example_inputs=x): the `auto` policy
                  measured at this batch size (sparse or dense, whichever is faster here)
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import sparsert
from sparsert.formats import block_density

pytest.importorskip("pytest_benchmark")

FEATURES = 4096
DENSITIES = (0.5, 0.3, 0.1, 0.02)
BATCH_SIZES = (1, 64)
BSR_BLOCK = 16
ENGINES = ("torch_dense", "torch_csr", f"torch_bsr{BSR_BLOCK}", "scipy_csr", "sparsert_numba", "sparsert_auto")
CASES = [(density, bs, engine) for density in DENSITIES for bs in BATCH_SIZES for engine in ENGINES]


@functools.lru_cache(maxsize=None)
def pruned_linear(density: float) -> nn.Linear:
    """Linear(4096, 4096) with default init, L1-unstructured-pruned to `density`, mask baked in."""
    torch.manual_seed(0)
    layer = nn.Linear(FEATURES, FEATURES)
    prune.l1_unstructured(layer, "weight", amount=1.0 - density)
    prune.remove(layer, "weight")
    return layer.eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def make_input(bs: int) -> torch.Tensor:
    return torch.randn(bs, FEATURES, generator=torch.Generator().manual_seed(bs))


def make_engine(engine: str, layer: nn.Linear, x: torch.Tensor):
    """A zero-argument callable computing x @ W.T + b with `engine` (setup done here, untimed)."""
    w, b = layer.weight, layer.bias
    if engine == "torch_dense":
        return lambda: F.linear(x, w, b)
    if engine in ("torch_csr", f"torch_bsr{BSR_BLOCK}"):
        with warnings.catch_warnings():  # "sparse CSR/BSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            ws = w.to_sparse_csr() if engine == "torch_csr" else w.to_sparse_bsr((BSR_BLOCK, BSR_BLOCK))
        return lambda: torch.sparse.mm(ws, x.t()).t() + b
    if engine == "scipy_csr":
        ws = scipy.sparse.csr_matrix(w.numpy())
        xn, bn = x.numpy(), b.numpy()
        if x.shape[0] == 1:
            return lambda: (ws @ xn[0] + bn)[None]
        return lambda: (ws @ xn.T).T + bn
    if engine == "sparsert_numba":
        return sparsert.SparseLinear.from_dense(layer, backend="numba")
    if engine == "sparsert_auto":
        return sparsert.sparsify(nn.Sequential(layer), example_inputs=x)
    raise ValueError(f"unknown engine {engine!r}")


def _call(fn, x):
    return fn(x) if isinstance(fn, nn.Module) else fn()


@pytest.mark.parametrize(("density", "bs", "engine"), CASES,
                         ids=[f"{density=}-{bs=}-{engine}" for density, bs, engine in CASES])
def test_linear(benchmark, density, bs, engine):
    layer, x = pruned_linear(density), make_input(bs)
    fn = make_engine(engine, layer, x)
    benchmark.group = f"{density=}-{bs=}"
    benchmark.extra_info.update(engine=engine, density=density, batch_size=bs, threads=torch.get_num_threads(),
                                nnz=int(torch.count_nonzero(layer.weight)))
    if engine.startswith("torch_bsr"):
        benchmark.extra_info["density_b16"] = block_density(layer.weight, BSR_BLOCK)
    if engine == "sparsert_auto":
        benchmark.extra_info["layer_format"] = sparsert.report(fn)[0]["format"]
    with torch.no_grad():
        _call(fn, x)  # first call outside the timings (Numba compile or disk-cache load, MKL setup)
        y = benchmark(_call, fn, x)
        expected = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    y = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
