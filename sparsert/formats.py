"""CSR and BSR weight containers: data plus invariants, no compute.

Both store a 2-D matrix of shape (n_rows, n_cols). Conv weights are stored as
(out_channels, in_channels * kh * kw); see `sparsert.modules.SparseConv2d`.
Index arrays use the smallest dtype that fits (int16 when the column count allows).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INT16_MAX = np.iinfo(np.int16).max


def index_dtype(max_value: int) -> np.dtype:
    """Smallest index dtype that holds values up to `max_value` (int16 or int32)."""
    return np.dtype(np.int16) if max_value <= INT16_MAX else np.dtype(np.int32)


def _as_numpy_2d(dense) -> np.ndarray:
    if isinstance(dense, torch.Tensor):
        dense = dense.detach().to("cpu")
        if dense.dtype in (torch.float16, torch.bfloat16):
            dense = dense.float()
        dense = dense.numpy()
    dense = np.asarray(dense)
    if dense.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(dense.shape)}")
    return dense


@dataclass(frozen=True, eq=False)
class CSR:
    """Compressed sparse rows. data[nnz], indices[nnz] (column of each value), indptr[n_rows+1]."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]
    block_shape: tuple[int, int] = (1, 1)

    def __post_init__(self):
        self.check(full=False)

    @classmethod
    def from_dense(cls, dense) -> "CSR":
        dense = _as_numpy_2d(dense)
        n_rows, n_cols = dense.shape
        rows, cols = np.nonzero(dense)  # row-major order: rows sorted, columns sorted within a row
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
        return cls(
            data=np.ascontiguousarray(dense[rows, cols]),
            indices=cols.astype(index_dtype(max(n_cols - 1, 0))),
            indptr=indptr.astype(np.int32 if len(rows) <= np.iinfo(np.int32).max else np.int64),
            shape=(n_rows, n_cols),
        )

    @property
    def nnz(self) -> int:
        return int(self.data.shape[0])

    @property
    def density(self) -> float:
        size = self.shape[0] * self.shape[1]
        return self.nnz / size if size else 0.0

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.indices.nbytes + self.indptr.nbytes

    def to_dense(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=self.data.dtype)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr.astype(np.int64)))
        out[rows, self.indices.astype(np.int64)] = self.data
        return out

    def check(self, full: bool = True) -> None:
        """Raise ValueError naming the broken invariant. `full` also scans the index arrays."""
        n_rows, n_cols = self.shape
        _check_compressed(self.indptr, self.indices, n_rows, n_cols, self.data.shape[0], "CSR", full)
        if self.data.ndim != 1:
            raise ValueError(f"CSR data must be 1-D, got shape {self.data.shape}")


@dataclass(frozen=True, eq=False)
class BSR:
    """Block sparse rows. data[n_blocks, br, bc], indices[n_blocks] (block column), indptr[n_block_rows+1]."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]
    block_shape: tuple[int, int]

    def __post_init__(self):
        self.check(full=False)

    @classmethod
    def from_dense(cls, dense, block_shape: tuple[int, int]) -> "BSR":
        dense = _as_numpy_2d(dense)
        br, bc = block_shape
        n_rows, n_cols = dense.shape
        if br <= 0 or bc <= 0 or n_rows % br or n_cols % bc:
            raise ValueError(f"block shape {block_shape} does not tile a {n_rows}x{n_cols} matrix")
        blocks = dense.reshape(n_rows // br, br, n_cols // bc, bc).transpose(0, 2, 1, 3)
        keep = np.any(blocks != 0, axis=(2, 3))
        block_rows, block_cols = np.nonzero(keep)
        indptr = np.zeros(n_rows // br + 1, dtype=np.int64)
        np.cumsum(np.bincount(block_rows, minlength=n_rows // br), out=indptr[1:])
        return cls(
            data=np.ascontiguousarray(blocks[block_rows, block_cols]),
            indices=block_cols.astype(index_dtype(max(n_cols // bc - 1, 0))),
            indptr=indptr.astype(np.int32 if len(block_rows) <= np.iinfo(np.int32).max else np.int64),
            shape=(n_rows, n_cols),
            block_shape=(br, bc),
        )

    @property
    def nnz(self) -> int:
        """Stored values, explicit zeros inside kept blocks included."""
        return int(self.data.size)

    @property
    def density(self) -> float:
        size = self.shape[0] * self.shape[1]
        return self.nnz / size if size else 0.0

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.indices.nbytes + self.indptr.nbytes

    def to_dense(self) -> np.ndarray:
        br, bc = self.block_shape
        n_rows, n_cols = self.shape
        blocks = np.zeros((n_rows // br, n_cols // bc, br, bc), dtype=self.data.dtype)
        block_rows = np.repeat(np.arange(n_rows // br), np.diff(self.indptr.astype(np.int64)))
        blocks[block_rows, self.indices.astype(np.int64)] = self.data
        return blocks.transpose(0, 2, 1, 3).reshape(n_rows, n_cols)

    def check(self, full: bool = True) -> None:
        br, bc = self.block_shape
        n_rows, n_cols = self.shape
        if br <= 0 or bc <= 0 or n_rows % br or n_cols % bc:
            raise ValueError(f"BSR block shape {self.block_shape} does not tile shape {self.shape}")
        if self.data.ndim != 3 or self.data.shape[1:] != (br, bc):
            raise ValueError(f"BSR data must have shape (n_blocks, {br}, {bc}), got {self.data.shape}")
        _check_compressed(self.indptr, self.indices, n_rows // br, n_cols // bc, self.data.shape[0], "BSR", full)


def _check_compressed(indptr, indices, n_rows, n_cols, n_stored, fmt, full):
    if indptr.ndim != 1 or indptr.shape[0] != n_rows + 1:
        raise ValueError(f"{fmt} indptr must have length {n_rows + 1}, got shape {indptr.shape}")
    if indices.ndim != 1 or indices.shape[0] != n_stored:
        raise ValueError(f"{fmt} indices must have length {n_stored} (one per stored row entry), got {indices.shape}")
    if not (np.issubdtype(indptr.dtype, np.integer) and np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"{fmt} index arrays must be integers, got {indptr.dtype} and {indices.dtype}")
    if n_rows + 1 and (int(indptr[0]) != 0 or int(indptr[-1]) != n_stored):
        raise ValueError(f"{fmt} indptr must start at 0 and end at {n_stored}, got {int(indptr[0])}..{int(indptr[-1])}")
    if not full:
        return
    ptr = indptr.astype(np.int64)
    if np.any(np.diff(ptr) < 0):
        raise ValueError(f"{fmt} indptr must be non-decreasing")
    idx = indices.astype(np.int64)
    if n_stored and (idx.min() < 0 or idx.max() >= n_cols):
        raise ValueError(f"{fmt} column indices must lie in [0, {n_cols}), got {idx.min()}..{idx.max()}")
    # Sorted and unique within each row: each step inside a row must be strictly increasing.
    step_ok = np.diff(idx) > 0
    row_start = np.zeros(n_stored, dtype=bool)
    row_start[ptr[:-1][ptr[:-1] < n_stored]] = True
    if n_stored > 1 and np.any(~step_ok & ~row_start[1:]):
        raise ValueError(f"{fmt} column indices must be sorted and unique within each row")


def column_blocks(indptr, indices, data, n_rows: int, width: int):
    """A CSR's nonzeros regrouped by column block: block q (columns [q * width, (q + 1) * width)) holds a
    CSR over all rows, and the blocks follow each other. Returns (ptr, indices, data, n_blocks) with
    ptr[n_blocks * n_rows + 1]; row i of block q spans ptr[q * n_rows + i] to ptr[q * n_rows + i + 1].
    Indices stay absolute columns; order within a row is kept. For `kernels.csr_spmm_blocked_*`."""
    indices = np.asarray(indices)
    n_cols_used = int(indices.max()) + 1 if indices.size else 0
    n_blocks = max(1, -(-n_cols_used // width))
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(np.asarray(indptr, dtype=np.int64)))
    segment = indices.astype(np.int64) // width * n_rows + rows
    order = np.argsort(segment, kind="stable")
    ptr = np.zeros(n_blocks * n_rows + 1, np.int64)
    np.cumsum(np.bincount(segment, minlength=n_blocks * n_rows), out=ptr[1:])
    return ptr, indices[order], np.asarray(data)[order], n_blocks


def sliced_ell(indptr, indices, data, n_rows: int):
    """A CSR as sliced ELLPACK with column steps, for `kernels.sliced_matvec_*`: 1-byte steps where every
    row steps at most 255 columns between two nonzeros, else 2-byte ones (a 2%-dense row of 4096 columns
    steps past 255 somewhere in most matrices); None past 65535 or when the stored entries would pass
    2^32 (slice_ptr is uint32).

    Rows are sorted by length (longest first) into slices of 16 lanes; entry s of lane l of slice q sits
    at slice_ptr[q] + 16 s + l, padded with zero values up to the slice's longest row. Returns
    (slice_ptr uint32[n_slices + 1], steps uint8 or uint16, values, first_col int32[16 n_slices],
    lengths int32[16 n_slices], rows int32[16 n_slices]): a lane's first nonzero is at column
    first_col (its step is 0), each later one `steps` further on; rows[l] is the lane's row."""
    indptr = np.asarray(indptr, dtype=np.int64)
    columns = np.asarray(indices, dtype=np.int64)
    lengths = np.diff(indptr)
    row_of = np.repeat(np.arange(n_rows), lengths)
    steps = np.diff(columns, prepend=0)
    starts = indptr[:-1][lengths > 0]
    steps[starts] = 0
    widest = int(steps.max()) if steps.size else 0
    if widest > np.iinfo(np.uint16).max:
        return None
    step_dtype = np.uint8 if widest <= np.iinfo(np.uint8).max else np.uint16
    order = np.argsort(-lengths, kind="stable")
    n_slices = -(-n_rows // 16)
    lane_of_row = np.empty(n_rows, np.int64)
    lane_of_row[order] = np.arange(n_rows)
    lane_lengths = np.zeros(n_slices * 16, np.int32)
    lane_lengths[:n_rows] = lengths[order]
    rows = np.zeros(n_slices * 16, np.int32)
    rows[:n_rows] = order
    first_col = np.zeros(n_slices * 16, np.int32)
    first_col[lane_of_row[lengths > 0]] = columns[starts]
    slice_ptr = np.zeros(n_slices + 1, np.int64)
    np.cumsum(lane_lengths.reshape(n_slices, 16).max(axis=1).astype(np.int64) * 16, out=slice_ptr[1:])
    if slice_ptr[-1] >= 2**32:
        return None
    lane = lane_of_row[row_of]
    position = slice_ptr[lane // 16] + (np.arange(columns.size) - indptr[row_of]) * 16 + lane % 16
    stored_steps = np.zeros(slice_ptr[-1], step_dtype)
    stored_steps[position] = steps
    stored_values = np.zeros(slice_ptr[-1], np.asarray(data).dtype)
    stored_values[position] = data
    return slice_ptr.astype(np.uint32), stored_steps, stored_values, first_col, lane_lengths, rows


def block_density(dense, block: int) -> float:
    """Fraction of values a BSR with square `block` would store (1.0 when the block does not tile)."""
    dense = _as_numpy_2d(dense)
    n_rows, n_cols = dense.shape
    if n_rows % block or n_cols % block or dense.size == 0:
        return 1.0
    blocks = dense.reshape(n_rows // block, block, n_cols // block, block)
    return float(np.any(blocks != 0, axis=(1, 3)).mean())


def choose_format(dense, candidates=(4, 8, 16, 32, 64), min_fill: float = 0.7):
    """CSR, or BSR when the nonzeros come in dense blocks (block fill >= `min_fill`).

    Fill = nonzeros / values stored in the kept blocks: 1.0 after block or channel pruning,
    about the density itself for unstructured pruning. Larger blocks win ties (fewer indices)."""
    dense = _as_numpy_2d(dense)
    nnz = int(np.count_nonzero(dense))
    best = None
    for block in sorted(candidates, reverse=True):
        stored = block_density(dense, block) * dense.size
        if nnz and dense.shape[0] % block == 0 and dense.shape[1] % block == 0 and nnz / stored >= min_fill:
            best = block
            break
    if best is None:
        return CSR.from_dense(dense)
    return BSR.from_dense(dense, (best, best))
