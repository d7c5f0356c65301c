"""Sparse x dense products for Linear layers. Pure functions on raw arrays; the caller allocates `out`.

Batched inputs arrive feature-major (`xt[n_col, B]`) so each nonzero weight is broadcast
against a contiguous vector of B activations (the XNNPACK CHW-SpMM idea applied to Linear).
Index arrays arrive as unsigned views (uint16/uint32) of the stored int16/int32 arrays: Numba
adds a negative-index wraparound check to every signed access, which made these loops 2-3x slower.
Each kernel exists twice: `*_par` (Numba prange over rows) and `*_seq` (one thread), because
a parallel launch costs ~10 us, more than the whole product for small layers at batch 1.
"""
import numpy as np
from numba import njit, prange

from ._jit import OPTIONS, relu_or_identity, twin
from .strip import STRIP_VECTORS, VECTOR_BYTES, row_strip, strip4_split


def _csr_matvec(indptr, indices, data, x, bias, relu, out):
    """out[i] = bias[i] + sum(data[k] * x[indices[k]]), optional ReLU.

    In: indptr[n_row+1], indices[nnz], data[nnz], x[n_col], bias[n_row]. Out: out[n_row]. Cost: O(nnz)."""
    for i in prange(out.shape[0]):
        acc = bias[i]
        for k in range(indptr[i], indptr[i + 1]):
            acc += data[k] * x[indices[k]]  # unsigned k and index: no wraparound check
        out[i] = relu_or_identity(acc, relu)


def _csr_spmm(indptr, indices, data, xt, bias, residual, has_residual, relu, out):
    """out[i, :] = relu?(bias[i] + sum(data[k] * xt[indices[k], :]) + residual[i, :]).

    In: xt[n_col, >= B] (its first B columns are read), residual[n_row, B] (ignored unless has_residual),
    all C-contiguous. Out: out[n_row, B]. Cost: O(nnz * B). Also the GEMM half of im2col convs (B = pixels).
    Each work item is one row times one strip of up to 64 columns (`strip.row_strip`, accumulators in
    registers); items run strip-major, so consecutive items share one slab of xt in L2."""
    n_row, n_batch = out.shape
    width = STRIP_VECTORS * VECTOR_BYTES // xt.itemsize
    n_strips = (n_batch + width - 1) // width
    for item in prange(n_strips * n_row):
        i = item % n_row
        j0 = (item // n_row) * width
        row_start = i * n_batch + j0
        row_strip(xt, j0, xt.shape[1], indices, data, indptr[i], indptr[i + 1], bias[i], out, row_start,
                  min(width, n_batch - j0), residual, row_start, has_residual, relu, data, 0, False)


# Rows per work item of the column-blocked SpMM: each item reloads every column slab once, so up to 256
# rows amortise that; fewer when the layer would otherwise give the threads fewer than 8 items.
BLOCKED_ROW_CHUNK = 256
BLOCKED_MIN_ITEMS = 8


def _csr_spmm_blocked(ptr, indices, data, n_blocks, xt, bias, relu, out):
    """`_csr_spmm` over column blocks (`sparsert.formats.column_blocks`): out[i, :] = relu?(bias[i] +
    sum over blocks q of block q's row i times xt), q-major within each chunk of rows.

    In: ptr[n_blocks * n_row + 1] (block q's row i spans ptr[q * n_row + i] to the next entry), indices
    (absolute columns), data, xt[n_col, >= B]. Out: out[n_row, B]. Cost: O(nnz * B) plus one load and
    store of out per block and row. A block's slab of xt (its columns x one strip: 64 KB at 256 columns
    and batch 64) stays near the 48 KB L1 while the chunk's rows read it; without blocking the 4096 x 64
    input came from L2 and the strip ran at ~28 GMAC/s per core, against ~55 from L1."""
    n_row, n_batch = out.shape
    width = STRIP_VECTORS * VECTOR_BYTES // xt.itemsize
    n_strips = (n_batch + width - 1) // width
    chunk = min(BLOCKED_ROW_CHUNK, max(16, -(-n_row * n_strips // BLOCKED_MIN_ITEMS)))
    n_chunks = (n_row + chunk - 1) // chunk
    zero = np.zeros(1, bias.dtype)[0]  # of bias's type: float32 kernels stay float32
    for item in prange(n_strips * n_chunks):
        j0 = (item // n_chunks) * width
        n_valid = min(width, n_batch - j0)
        first = (item % n_chunks) * chunk
        for q in range(n_blocks):
            partial = q > 0  # blocks after the first add onto the sum so far in out
            last_relu = relu and q == n_blocks - 1
            for i in range(first, min(n_row, first + chunk)):
                s = q * n_row + i
                o = i * n_batch + j0
                init = zero if partial else bias[i]
                if n_valid == width:
                    strip4_split(xt, j0, xt.shape[1], indices, data, ptr[s], ptr[s + 1], init, out, o, n_valid,
                                 out, o, partial, last_relu, data, 0, False)
                else:
                    row_strip(xt, j0, xt.shape[1], indices, data, ptr[s], ptr[s + 1], init, out, o, n_valid,
                              out, o, partial, last_relu, data, 0, False)


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
csr_spmm_blocked_par, csr_spmm_blocked_seq = twin(_csr_spmm_blocked)
bsr_spmm_par, bsr_spmm_seq = twin(_bsr_spmm)


@njit(**OPTIONS)
def csr_spmm_dispatch(indptr, indices, data, xt, bias, residual, has_residual, relu, out, parallel):
    """`_csr_spmm`, or the matvec for a single column, on the parallel twin when asked: the one
    place that choice is made, for the eager ops and the plan executor alike. A single column (a 1x1
    map at batch 1) would fill one lane of each strip vector; the matvec's gathers fill all of them
    (layer 4 of a 90% resnet18 at batch 1: 0.18 -> 0.07 ms per conv)."""
    if out.shape[1] == 1:
        column = out[:, 0]
        fused_relu = relu and not has_residual
        if parallel:
            csr_matvec_par(indptr, indices, data, xt[:, 0], bias, fused_relu, column)
        else:
            csr_matvec_seq(indptr, indices, data, xt[:, 0], bias, fused_relu, column)
        if has_residual:
            res = residual[:, 0]
            for i in range(column.shape[0]):
                column[i] = relu_or_identity(column[i] + res[i], relu)
    elif parallel:
        csr_spmm_par(indptr, indices, data, xt, bias, residual, has_residual, relu, out)
    else:
        csr_spmm_seq(indptr, indices, data, xt, bias, residual, has_residual, relu, out)


__all__ = ["csr_matvec_par", "csr_matvec_seq", "csr_spmm_blocked_par", "csr_spmm_blocked_seq", "csr_spmm_dispatch", "csr_spmm_par", "csr_spmm_seq", "bsr_spmm_par",
           "bsr_spmm_seq"]
