"""CSR/BSR containers: round trips, counts, index dtypes, invariant checks, format choice."""
import numpy as np
import pytest
import torch

from sparsert.formats import BSR, CSR, block_density, choose_format, column_blocks, index_dtype, sliced_ell

from conftest import DENSITIES, sparse_matrix

SHAPES = [(1, 1), (3, 5), (17, 33), (64, 48), (8, 128)]


def _ids(shape):
    return "x".join(map(str, shape))


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d:g}")
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_csr_round_trip(shape, density, gen):
    dense = sparse_matrix(shape, density, gen).numpy()
    csr = CSR.from_dense(dense)
    csr.check()
    np.testing.assert_array_equal(csr.to_dense(), dense)
    assert csr.nnz == np.count_nonzero(dense)
    assert csr.density == pytest.approx(np.count_nonzero(dense) / dense.size)
    assert csr.shape == shape and csr.block_shape == (1, 1)
    assert csr.indptr.shape == (shape[0] + 1,) and csr.indptr.dtype == np.int32
    assert csr.indices.shape == (csr.nnz,) and csr.data.shape == (csr.nnz,)
    assert csr.data.dtype == np.float32
    assert csr.nbytes == csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes
    assert np.all(csr.data != 0), "from_dense must store no explicit zeros"


@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d:g}")
@pytest.mark.parametrize("shape,block", [((4, 4), (4, 4)), ((16, 32), (4, 8)), ((64, 48), (16, 16)),
                                         ((6, 9), (2, 3)), ((32, 32), (1, 1))], ids=lambda v: _ids(v))
def test_bsr_round_trip(shape, block, density, gen):
    dense = sparse_matrix(shape, density, gen, block=block).numpy()
    bsr = BSR.from_dense(dense, block)
    bsr.check()
    np.testing.assert_array_equal(bsr.to_dense(), dense)
    n_blocks = int(np.any(dense.reshape(shape[0] // block[0], block[0], shape[1] // block[1], block[1]) != 0,
                          axis=(1, 3)).sum())
    assert bsr.data.shape == (n_blocks, *block)
    assert bsr.nnz == n_blocks * block[0] * block[1]
    assert bsr.density == pytest.approx(bsr.nnz / dense.size)
    assert bsr.indptr.shape == (shape[0] // block[0] + 1,)
    assert bsr.shape == shape and bsr.block_shape == block


def test_bsr_nnz_counts_explicit_zeros_inside_kept_blocks():
    dense = np.zeros((8, 8), np.float32)
    dense[0, 0] = 1.0  # one value keeps a whole 4x4 block
    bsr = BSR.from_dense(dense, (4, 4))
    assert bsr.nnz == 16 and bsr.density == pytest.approx(16 / 64)
    assert CSR.from_dense(dense).nnz == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_from_torch_tensor(dtype, gen):
    dense = sparse_matrix((12, 20), 0.3, gen).to(dtype)
    csr = CSR.from_dense(dense)
    expected = dense.float() if dtype in (torch.float16, torch.bfloat16) else dense
    np.testing.assert_array_equal(csr.to_dense(), expected.numpy())
    assert csr.data.dtype == (np.float64 if dtype == torch.float64 else np.float32)


def test_from_dense_transposed_view(gen):
    dense = sparse_matrix((20, 12), 0.3, gen)
    view = dense.t()  # non-contiguous
    np.testing.assert_array_equal(CSR.from_dense(view).to_dense(), view.contiguous().numpy())
    np.testing.assert_array_equal(BSR.from_dense(view, (4, 4)).to_dense(), view.contiguous().numpy())


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)], ids=_ids)
def test_empty_matrix(shape):
    csr = CSR.from_dense(np.zeros(shape, np.float32))
    csr.check()
    assert csr.nnz == 0 and csr.density == 0.0 and csr.to_dense().shape == shape


def test_all_zero_rows_and_columns(gen):
    dense = sparse_matrix((10, 12), 0.8, gen).numpy()
    dense[[0, 3, 9]] = 0
    dense[:, [0, 5, 11]] = 0
    csr = CSR.from_dense(dense)
    csr.check()
    np.testing.assert_array_equal(csr.to_dense(), dense)
    assert np.diff(csr.indptr)[[0, 3, 9]].tolist() == [0, 0, 0]
    assert not np.isin(csr.indices, [0, 5, 11]).any()


def test_from_dense_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        CSR.from_dense(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="2-D"):
        BSR.from_dense(np.zeros(4), (2, 2))


@pytest.mark.parametrize("shape,block", [((6, 8), (4, 4)), ((8, 6), (4, 4)), ((8, 8), (0, 4))],
                         ids=["rows", "cols", "zero-block"])
def test_bsr_block_must_tile(shape, block):
    with pytest.raises(ValueError, match="does not tile"):
        BSR.from_dense(np.ones(shape, np.float32), block)


# ------------------------------------------------------------------------------------ index dtypes
@pytest.mark.parametrize("n_cols,expected", [(1, np.int16), (32767, np.int16), (32768, np.int16),
                                             (32769, np.int32), (70000, np.int32)], ids=lambda v: str(v))
def test_csr_index_dtype_fits_columns(n_cols, expected):
    dense = np.zeros((2, n_cols), np.float32)
    dense[0, 0] = 1.0
    dense[1, n_cols - 1] = 2.0  # the largest column index is stored
    csr = CSR.from_dense(dense)
    assert csr.indices.dtype == expected
    assert int(csr.indices.max()) == n_cols - 1  # no wraparound at the int16 boundary
    csr.check()
    np.testing.assert_array_equal(csr.to_dense(), dense)


@pytest.mark.parametrize("n_block_cols,expected", [(32768, np.int16), (32769, np.int32)], ids=str)
def test_bsr_index_dtype_counts_block_columns(n_block_cols, expected):
    dense = np.zeros((2, 2 * n_block_cols), np.float32)
    dense[0, -1] = 1.0
    bsr = BSR.from_dense(dense, (2, 2))
    assert bsr.indices.dtype == expected and int(bsr.indices.max()) == n_block_cols - 1
    np.testing.assert_array_equal(bsr.to_dense(), dense)


def test_index_dtype_helper():
    assert index_dtype(0) == np.int16 and index_dtype(32767) == np.int16 and index_dtype(32768) == np.int32


# ------------------------------------------------------------------------------------ invariant checks
# dense = [[1, 0, 2, 0, 0], [0, 0, 0, 0, 0], [0, 3, 0, 4, 5]]
DATA = np.array([1, 2, 3, 4, 5], np.float32)
INDICES = np.array([0, 2, 1, 3, 4], np.int16)
INDPTR = np.array([0, 2, 2, 5], np.int32)


def test_hand_built_csr_is_valid():
    csr = CSR(DATA, INDICES, INDPTR, (3, 5))
    csr.check()
    np.testing.assert_array_equal(csr.to_dense(), [[1, 0, 2, 0, 0], [0, 0, 0, 0, 0], [0, 3, 0, 4, 5]])


@pytest.mark.parametrize("indices,indptr,match", [
    (INDICES, [0, 3, 2, 5], "non-decreasing"),
    ([0, 2, 1, 3, 5], INDPTR, r"column indices must lie in \[0, 5\)"),
    ([-1, 2, 1, 3, 4], INDPTR, r"column indices must lie in \[0, 5\)"),
    ([2, 0, 1, 3, 4], INDPTR, "sorted and unique"),
    ([0, 2, 3, 1, 4], INDPTR, "sorted and unique"),
    ([0, 2, 1, 3, 3], INDPTR, "sorted and unique"),
], ids=["indptr-non-monotone", "index-too-large", "index-negative", "unsorted-row0", "unsorted-row2",
        "duplicate"])
def test_csr_check_full_scan(indices, indptr, match):
    csr = CSR(DATA, np.asarray(indices, np.int16), np.asarray(indptr, np.int32), (3, 5))  # cheap checks pass
    with pytest.raises(ValueError, match=match):
        csr.check()


@pytest.mark.parametrize("data,indices,indptr,match", [
    (DATA, INDICES, [0, 2, 5], "indptr must have length 4"),
    (DATA, INDICES[:4], INDPTR, "indices must have length 5"),
    (DATA[:4], INDICES, INDPTR, "indices must have length 4"),
    (DATA, INDICES, [0, 2, 2, 4], "end at 5"),
    (DATA, INDICES, [1, 2, 2, 5], "start at 0"),
    (DATA, INDICES.astype(np.float32), INDPTR, "must be integers"),
    (DATA.reshape(5, 1), INDICES, INDPTR, "1-D"),
], ids=["indptr-length", "indices-short", "data-short", "indptr-end", "indptr-start", "float-indices",
        "data-2d"])
def test_csr_wrong_lengths_raise_at_construction(data, indices, indptr, match):
    with pytest.raises(ValueError, match=match):
        CSR(np.asarray(data), np.asarray(indices), np.asarray(indptr, np.int32), (3, 5))


def test_bsr_check_errors():
    good = BSR.from_dense(np.eye(8, dtype=np.float32), (4, 4))
    with pytest.raises(ValueError, match="does not tile"):
        BSR(good.data, good.indices, good.indptr, (8, 8), (3, 4))
    with pytest.raises(ValueError, match=r"shape \(n_blocks, 4, 4\)"):
        BSR(good.data[:, :2], good.indices, good.indptr, (8, 8), (4, 4))
    with pytest.raises(ValueError, match="indices must have length 2"):
        BSR(good.data, good.indices[:1], good.indptr, (8, 8), (4, 4))
    bad = BSR(good.data, np.array([0, 2], np.int16), good.indptr, (8, 8), (4, 4))
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        bad.check()
    unsorted = BSR(np.ones((2, 4, 4), np.float32), np.array([1, 0], np.int16), np.array([0, 2, 2], np.int32),
                   (8, 8), (4, 4))
    with pytest.raises(ValueError, match="sorted and unique"):
        unsorted.check()


# ------------------------------------------------------------------------------------ format choice
@pytest.mark.parametrize("shape,block,density", [((64, 64), 4, 0.5), ((64, 128), 8, 0.3), ((64, 64), 16, 0.25),
                                                 ((36, 36), 4, 0.5), ((96, 64), 32, 0.5)],
                         ids=lambda v: _ids(v) if isinstance(v, tuple) else str(v))
def test_choose_format_block_pruned_is_bsr(shape, block, density, gen):
    dense = sparse_matrix(shape, density, gen, block=(block, block))
    fmt = choose_format(dense)
    assert isinstance(fmt, BSR)
    assert fmt.block_shape == (block, block)
    np.testing.assert_array_equal(fmt.to_dense(), dense.numpy())


@pytest.mark.parametrize("shape,density", [((64, 64), 0.5), ((64, 64), 0.1), ((128, 96), 0.3), ((30, 30), 0.5),
                                           ((64, 64), 0.0)], ids=lambda v: _ids(v) if isinstance(v, tuple) else str(v))
def test_choose_format_unstructured_is_csr(shape, density, gen):
    dense = sparse_matrix(shape, density, gen)
    fmt = choose_format(dense)
    assert isinstance(fmt, CSR)
    np.testing.assert_array_equal(fmt.to_dense(), dense.numpy())


def test_choose_format_block_structure_not_tiling_is_csr(gen):
    # 4x4 blocks on a 30x30 matrix: no candidate block tiles it -> CSR, never an error.
    dense = torch.zeros(30, 30)
    dense[:28, :28] = sparse_matrix((28, 28), 0.5, gen, block=(4, 4))
    assert isinstance(choose_format(dense), CSR)


@pytest.mark.parametrize("block,expected", [(2, 1 / 16), (4, 1 / 4), (8, 1.0), (3, 1.0)], ids=str)
def test_block_density(block, expected):
    dense = np.zeros((8, 8), np.float32)
    dense[0, 0] = dense[1, 1] = 1.0  # all nonzeros in the top-left 2x2 block
    assert block_density(dense, block) == pytest.approx(expected)


# ------------------------------------------------------------------------------------ column blocks
@pytest.mark.parametrize("width", [1, 16, 100, 1000])
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (64, 300), (5, 0)], ids=_ids)
def test_column_blocks_hold_every_nonzero_once_in_its_block(shape, width, gen):
    w = sparse_matrix(shape, 0.3, gen).numpy()
    w[1::3] = 0  # empty rows
    csr = CSR.from_dense(w)
    ptr, indices, data, n_blocks = column_blocks(csr.indptr, csr.indices, csr.data, shape[0], width)
    assert ptr.shape == (n_blocks * shape[0] + 1,) and ptr[0] == 0 and ptr[-1] == csr.nnz
    rebuilt = np.zeros_like(w)
    for q in range(n_blocks):
        for i in range(shape[0]):
            cols = indices[ptr[q * shape[0] + i]:ptr[q * shape[0] + i + 1]].astype(np.int64)
            assert np.all((cols >= q * width) & (cols < (q + 1) * width)) and np.all(np.diff(cols) > 0)
            assert np.all(rebuilt[i, cols] == 0)
            rebuilt[i, cols] = data[ptr[q * shape[0] + i]:ptr[q * shape[0] + i + 1]]
    np.testing.assert_array_equal(rebuilt, w)
    assert indices.dtype == csr.indices.dtype and data.dtype == csr.data.dtype


@pytest.mark.parametrize("shape, density", [((1, 1), 0.3), ((17, 33), 0.3), ((40, 255), 0.3), ((33, 0), 0.3),
                                            ((20, 3000), 0.01)], ids=lambda v: _ids(v) if isinstance(v, tuple) else None)
def test_sliced_ell_rebuilds_the_matrix(shape, density, gen):
    w = sparse_matrix(shape, density, gen).numpy()
    w[1::4] = 0
    csr = CSR.from_dense(w)
    slice_ptr, steps, values, first_col, lengths, rows = sliced_ell(csr.indptr, csr.indices, csr.data, shape[0])
    # 1% of 3000 columns steps past 255 somewhere: 2-byte steps
    assert steps.dtype == (np.uint16 if shape[1] == 3000 else np.uint8)
    n_slices = slice_ptr.size - 1
    assert n_slices == -(-shape[0] // 16) and lengths.size == rows.size == first_col.size == 16 * n_slices
    assert sorted(rows[:shape[0]].tolist()) == list(range(shape[0])) and np.all(lengths[shape[0]:] == 0)
    rebuilt = np.zeros_like(w)
    for lane in range(shape[0]):
        q, slot = divmod(lane, 16)
        at = slice_ptr[q] + 16 * np.arange(lengths[lane]) + slot
        cols = first_col[lane] + np.cumsum(steps[at].astype(np.int64))
        rebuilt[rows[lane], cols] = values[at]
    np.testing.assert_array_equal(rebuilt, w)


def test_sliced_ell_step_width():
    """Steps up to 255 columns take 1 byte, up to 65535 two; past that there is no sliced form."""
    def sliced(w):
        csr = CSR.from_dense(w)
        return sliced_ell(csr.indptr, csr.indices, csr.data, 3)

    w = np.zeros((3, 70000), np.float32)
    w[1, [0, 255]] = 1
    assert sliced(w)[1].dtype == np.uint8
    w[2, [10, 266]] = 1
    assert sliced(w)[1].dtype == np.uint16
    w[2, 266 + 65535] = 1
    assert sliced(w)[1].dtype == np.uint16
    w[0, [5, 5 + 65536]] = 1
    assert sliced(w) is None
