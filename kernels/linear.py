"""Sparse x dense products for Linear layers. Pure functions on raw arrays; the caller allocates `out`.

Batched inputs arrive feature-major (`xt[n_col, B]`) so each nonzero weight is broadcast
against a contiguous vector of B activations (the XNNPACK CHW-SpMM idea applied to Linear).
Index arrays arrive as unsigned views (uint16/uint32) of the stored int16/int32 arrays: Numba
adds a negative-index wraparound check to every signed access, which made these loops 2-3x slower.
Each kernel exists twice: `*_par` (Numba prange over rows) and `*_seq` (one thread), because
a parallel launch costs ~10 us, more than the whole product for small layers at batch 1.
"""
import numpy as np
from numba import prange

from numba import njit

from ._jit import OPTIONS, relu_or_identity, twin


def _csr_matvec(indptr, indices, data, x, bias, relu, out):
    """out[i] = bias[i] + sum(data[k] * x[indices[k]]), optional ReLU.

    In: indptr[n_row+1], indices[nnz], data[nnz], x[n_col], bias[n_row]. Out: out[n_row]. Cost: O(nnz)."""
    for i in prange(out.shape[0]):
        acc = bias[i]
        for k in range(indptr[i], indptr[i + 1]):
            acc += data[k] * x[indices[k]]  # unsigned k and index: no wraparound check
        out[i] = relu_or_identity(acc, relu)


# Columns per work item: a 64-column slab of xt (n_col x 256 B) stays in L2 while every row
# reads it; whole rows of a 1024-column im2col matrix came from L3 and ran 3-5x slower.
SPMM_CHUNK = 64


def _csr_spmm(indptr, indices, data, xt, bias, residual, has_residual, relu, out):
    """out[i, :] = relu?(bias[i] + sum(data[k] * xt[indices[k], :]) + residual[i, :]).

    In: xt[n_col, B] (C-contiguous), residual[n_row, B] (ignored unless has_residual).
    Out: out[n_row, B]. Cost: O(nnz * B). Also the GEMM half of im2col convs (B = pixels)."""
    n_row, n_batch = out.shape
    n_chunks = (n_batch + SPMM_CHUNK - 1) // SPMM_CHUNK
    for item in prange(n_chunks * n_row):  # chunk-major: consecutive items share one slab
        i = item % n_row
        j0 = (item // n_row) * SPMM_CHUNK
        j1 = min(j0 + SPMM_CHUNK, n_batch)
        width = j1 - j0
        acc = out[i, j0:j1]
        b = bias[i]
        for j in range(width):
            acc[j] = b
        # Four nonzeros per pass: one accumulator load/store serves four FMAs.
        k = indptr[i]
        end = indptr[i + 1]
        while k + 4 <= end:
            w0, w1, w2, w3 = data[k], data[k + 1], data[k + 2], data[k + 3]
            s0, s1 = xt[indices[k], j0:j1], xt[indices[k + 1], j0:j1]
            s2, s3 = xt[indices[k + 2], j0:j1], xt[indices[k + 3], j0:j1]
            for j in range(width):
                acc[j] += (w0 * s0[j] + w1 * s1[j]) + (w2 * s2[j] + w3 * s3[j])
            k += 4
        while k < end:
            w = data[k]
            src = xt[indices[k], j0:j1]
            for j in range(width):
                acc[j] += w * src[j]
            k += 1
        if has_residual:
            res = residual[i, j0:j1]
            for j in range(width):
                acc[j] = relu_or_identity(acc[j] + res[j], relu)
        elif relu:
            for j in range(width):
                acc[j] = relu_or_identity(acc[j], True)


NARROW_MAX_COLUMNS = 16


def _csr_spmm_narrow(indptr, indices, data, xt, bias, residual, has_residual, relu, out):
    """`_csr_spmm` for B <= NARROW_MAX_COLUMNS (1-4 pixel maps at batch 1): flat unsigned indexing,
    because building a row slice per nonzero costs more than its few multiply-adds."""
    n_row, n_batch = out.shape
    width = np.uintp(n_batch)
    flat = xt.ravel()
    for i in prange(n_row):
        acc = out[i]
        for j in range(n_batch):
            acc[j] = bias[i]
        for k in range(indptr[i], indptr[i + 1]):
            w = data[k]
            base = np.uintp(indices[k]) * width
            for j in range(n_batch):
                acc[j] += w * flat[base + np.uintp(j)]
        if has_residual:
            res = residual[i]
            for j in range(n_batch):
                acc[j] = relu_or_identity(acc[j] + res[j], relu)
        elif relu:
            for j in range(n_batch):
                acc[j] = relu_or_identity(acc[j], True)


def _bsr_spmm(indptr, indices, data, xt, bias, relu, out):
    """BSR version of `_csr_spmm`: data[n_blocks, br, bc], indices = block columns.

    In: xt[n_col, B]. Out: out[n_row, B]. Cost: O(n_blocks * br * bc * B)."""
    br = data.shape[1]
    bc = data.shape[2]
    n_batch = out.shape[1]
    for ib in prange(indptr.shape[0] - 1):
        for r in range(br):
            row = out[ib * br + r]
            b = bias[ib * br + r]
            for j in range(n_batch):
                row[j] = b
        for k in range(indptr[ib], indptr[ib + 1]):
            col0 = indices[k] * bc
            for r in range(br):
                acc = out[ib * br + r]
                for c in range(bc):
                    w = data[k, r, c]
                    src = xt[col0 + c]
                    for j in range(n_batch):
                        acc[j] += w * src[j]
        if relu:
            for r in range(br):
                acc = out[ib * br + r]
                for j in range(n_batch):
                    acc[j] = relu_or_identity(acc[j], True)


csr_matvec_par, csr_matvec_seq = twin(_csr_matvec)
csr_spmm_par, csr_spmm_seq = twin(_csr_spmm)
csr_spmm_narrow_par, csr_spmm_narrow_seq = twin(_csr_spmm_narrow)


@njit(**OPTIONS)
def csr_spmm_dispatch(indptr, indices, data, xt, bias, residual, has_residual, relu, out, parallel):
    """`_csr_spmm`, taking the narrow kernel for few columns and the parallel twin when asked:
    the one place that choice is made, for the eager ops and the plan executor alike."""
    if xt.shape[1] <= NARROW_MAX_COLUMNS:
        if parallel:
            csr_spmm_narrow_par(indptr, indices, data, xt, bias, residual, has_residual, relu, out)
        else:
            csr_spmm_narrow_seq(indptr, indices, data, xt, bias, residual, has_residual, relu, out)
    elif parallel:
        csr_spmm_par(indptr, indices, data, xt, bias, residual, has_residual, relu, out)
    else:
        csr_spmm_seq(indptr, indices, data, xt, bias, residual, has_residual, relu, out)
bsr_spmm_par, bsr_spmm_seq = twin(_bsr_spmm)

__all__ = ["NARROW_MAX_COLUMNS", "csr_matvec_par", "csr_matvec_seq", "csr_spmm_narrow_par", "csr_spmm_narrow_seq",
           "csr_spmm_dispatch",
           "csr_spmm_par", "csr_spmm_seq", "bsr_spmm_par", "bsr_spmm_seq"]
