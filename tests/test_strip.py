"""The register-tiled strip micro-kernel (kernels.strip) on its own: every vector count, masked tails,
both float dtypes, the fused epilogue, and the layout helpers that keep its loads on cache lines."""
import numpy as np
import pytest
from numba import njit

from sparsert import kernels, ops
from sparsert.plan import aligned_empty


@njit(cache=False)
def _strip(x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu, mask=None, m=0):
    if mask is None:
        kernels.row_strip(x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu,
                          values, 0, False)
    else:
        kernels.row_strip(x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu,
                          mask, m, True)


@njit(cache=False)
def _wide(x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu):
    kernels.strip.wide_strip(x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu,
                             values, 0, False)


def _reference(x, x0, stride, indices, values, k0, k1, init, n_valid, res, r, has_res, relu):
    acc = np.full(n_valid, init, dtype=np.float64)
    for k in range(k0, k1):
        start = x0 + int(indices[k]) * stride
        acc += float(values[k]) * x[start:start + n_valid].astype(np.float64)
    if has_res:
        acc += res[r:r + n_valid]
    if relu:
        acc = np.where(acc < 0, 0.0, acc)
    return acc


def _widths(dtype):
    lanes = kernels.VECTOR_BYTES // np.dtype(dtype).itemsize
    top = kernels.STRIP_VECTORS * lanes
    return sorted({1, 2, kernels.strip.QUAD, lanes - 1, lanes, lanes + 1, 2 * lanes + 3, top - 1, top})


def _wide_widths(dtype):
    """wide_strip takes whole vectors (a lanes activation's cells): the 8-accumulator kernel at 8, the
    6-accumulator one at 6 and 7 (plus one vector), one or two strips of up to 4 vectors below."""
    lanes = kernels.VECTOR_BYTES // np.dtype(dtype).itemsize
    return [n * lanes for n in range(1, kernels.WIDE_VECTORS + 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("index_dtype", [np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("has_res,relu", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("kernel,widths", [(_strip, _widths), (_wide, _wide_widths)], ids=["row_strip", "wide_strip"])
def test_strip_matches_reference_at_every_width(dtype, index_dtype, has_res, relu, kernel, widths, gen):
    rng = np.random.default_rng(int(gen.initial_seed()))
    x = rng.standard_normal(6000).astype(dtype)
    indices = rng.integers(0, 30, 23).astype(index_dtype)
    values = rng.standard_normal(23).astype(dtype)
    res = rng.standard_normal(400).astype(dtype)
    for n_valid in widths(dtype):
        out = np.full(400, 7.0, dtype=dtype)
        kernel(x, 5, 150, indices, values, 3, 20, 0.25, out, 11, n_valid, res, 40, has_res, relu)
        expected = _reference(x, 5, 150, indices, values, 3, 20, 0.25, n_valid, res, 40, has_res, relu)
        np.testing.assert_allclose(out[11:11 + n_valid], expected, rtol=1e-5, atol=1e-5)
        # the masked last vector writes nothing past n_valid, nothing before o
        assert (out[:11] == 7.0).all() and (out[11 + n_valid:] == 7.0).all(), n_valid


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_strip_mask_zeroes_masked_lanes_even_when_they_are_nan(dtype, gen):
    rng = np.random.default_rng(int(gen.initial_seed()))
    x = rng.standard_normal(600).astype(dtype)
    x[40] = np.nan  # reaches output lane 0 through index 1 (x0 3 + 1 * 37)
    indices = np.array([0, 1, 2], np.uint32)
    values = np.ones(3, dtype)
    for n_valid in _widths(dtype):
        mask = (rng.random(200) < 0.5).astype(dtype)
        mask[9] = 0.0
        out = np.full(300, 7.0, dtype)
        _strip(x, 3, 37, indices, values, 0, 3, 0.5, out, 2, n_valid, out, 0, False, True, mask, 9)
        expected = _reference(x, 3, 37, indices, values, 0, 3, 0.5, n_valid, out, 0, False, True)
        expected = np.where(mask[9:9 + n_valid] != 0, expected, 0.0)
        np.testing.assert_allclose(out[2:2 + n_valid], expected, rtol=1e-5, atol=1e-5)
        assert out[2] == 0.0 and (out[:2] == 7.0).all() and (out[2 + n_valid:] == 7.0).all()


def test_strip_with_no_nonzeros_writes_init():
    x = np.ones(64, np.float32)
    out = np.full(40, 7.0, np.float32)
    _strip(x, 0, 1, np.zeros(4, np.uint32), np.ones(4, np.float32), 2, 2, 1.5, out, 3, 5, out, 0, False, False)
    assert (out[3:8] == 1.5).all() and (out[:3] == 7.0).all() and (out[8:] == 7.0).all()


def test_strip_relu_keeps_nan_and_zeroes_minus_inf():
    x = np.array([np.nan, -np.inf, -1.0, 2.0] + [0.0] * 12, np.float32)
    out = np.zeros(16, np.float32)
    _strip(x, 0, 1, np.zeros(1, np.uint32), np.ones(1, np.float32), 0, 1, 0.0, out, 0, 4, out, 0, False, True)
    assert np.isnan(out[0]) and out[1] == 0.0 and out[2] == 0.0 and out[3] == 2.0


def test_strip_refuses_signed_indices_and_strided_arrays():
    x = np.ones(64, np.float32)
    out = np.zeros(64, np.float32)
    with pytest.raises(Exception, match="unsigned"):
        _strip(x, 0, 1, np.zeros(2, np.int32), np.ones(2, np.float32), 0, 2, 0.0, out, 0, 4, out, 0, False, False)
    with pytest.raises(Exception, match="C-contiguous"):
        _strip(x[::2], 0, 1, np.zeros(2, np.uint32), np.ones(2, np.float32), 0, 2, 0.0, out, 0, 4, out, 0, False,
               False)


def test_tap_offsets_are_flat_shifts_and_widen_past_uint32():
    chan, dy, dx = np.array([0, 2, 1], np.uint32), np.array([0, 1, 2], np.uint32), np.array([1, 0, 2], np.uint32)
    offsets = kernels.tap_offsets(chan, dy, dx, 1000, 34)
    assert offsets.dtype == np.uint32 and offsets.tolist() == [1, 2034, 1070]
    wide = kernels.tap_offsets(np.array([5], np.uint32), np.zeros(1, np.uint32), np.zeros(1, np.uint32), 2 ** 30, 8)
    assert wide.dtype == np.uint64 and int(wide[0]) == 5 * 2 ** 30


@pytest.mark.parametrize("length", [1, 15, 16, 17, 1000, 1024, 1040, 4096])
def test_packed_row_len_is_an_odd_number_of_cache_lines(length):
    row = ops.packed_row_len(length)
    assert row >= length and row % 16 == 0 and (row // 16) % 2 == 1 and row - length < 32


@pytest.mark.parametrize("size", [1, 17, 1000, 1 << 20])
def test_plan_arena_starts_on_a_cache_line(size):
    a = aligned_empty(size)
    assert a.shape == (size,) and a.dtype == np.float32 and a.ctypes.data % 64 == 0


@pytest.mark.parametrize("n_valid", [1, 4, 5, 16, 17, 32])
def test_split_accumulators_sum_every_nonzero_count(n_valid, gen):
    """Strips of 1-2 vectors split the nonzeros over 4 or 2 accumulator sets (FMA latency), and the quad strip
    (4 outputs) takes 8, then 4, then 1 at a time: every count, fewer than the sets included, must sum all of
    them exactly once."""
    rng = np.random.default_rng(int(gen.initial_seed()))
    x = rng.standard_normal(3000).astype(np.float32)
    indices = rng.integers(0, 40, 22).astype(np.uint32)
    values = rng.standard_normal(22).astype(np.float32)
    for count in range(20):
        out = np.full(100, 7.0, np.float32)
        _strip(x, 2, 64, indices, values, 1, 1 + count, -0.5, out, 3, n_valid, out, 0, False, False)
        expected = _reference(x, 2, 64, indices, values, 1, 1 + count, -0.5, n_valid, out, 0, False, False)
        np.testing.assert_allclose(out[3:3 + n_valid], expected, rtol=1e-5, atol=1e-5)
        assert (out[:3] == 7.0).all() and (out[3 + n_valid:] == 7.0).all()


def test_row_strip_runs_the_quad_strip_for_four_outputs():
    """Four outputs (a 2x2 map's pixels) take the quad strip, four nonzeros to a vector: its 4-lane FMA for the
    last nonzeros is in the compiled code, which the 16-lane strips never emit."""
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(16, np.float32)
    _strip(x, 0, 4, np.arange(9, dtype=np.uint32), np.ones(9, np.float32), 0, 9, 0.0, out, 0, 4, out, 0, False, False)
    np.testing.assert_array_equal(out[:4], x[:36].reshape(9, 4).sum(axis=0))
    ir_text = "".join(_strip.inspect_llvm().values())
    assert "llvm.fma.v4f32" in ir_text and "llvm.fma.v16f32" in ir_text


@njit(cache=False)
def _row_pair(x, x0, x_gap, indices, values, k0, k1, init, out, o, out_gap, res, has_res, relu, step_x, cell):
    kernels.strip.row_pair_strip(x, x0, x_gap, indices, values, k0, k1, init, out, o, out_gap, res, has_res, relu,
                                 step_x, cell)


@pytest.mark.parametrize("dtype,step_x,cell", [(np.float32, 1, 16), (np.float64, 1, 8), (np.float32, 2, 16),
                                               (np.float32, 2, 32), (np.float32, 2, 64)])
@pytest.mark.parametrize("has_res,relu", [(False, False), (True, True)])
def test_row_pair_strip_computes_two_rows_apart(dtype, step_x, cell, has_res, relu, gen):
    """Two output rows of one wide strip each: the second reads x x_gap and writes out (reads res) out_gap elements
    after the first; within a row, output cells of `cell` floats read input cells step_x cells apart (a stride-2
    conv's). Every nonzero count (0 included) sums each output as the one-row strip would, and nothing outside the
    two rows is written."""
    rng = np.random.default_rng(int(gen.initial_seed()))
    width = kernels.WIDE_VECTORS * kernels.VECTOR_BYTES // np.dtype(dtype).itemsize
    x = rng.standard_normal(8000).astype(dtype)
    indices = rng.integers(0, 30, 23).astype(np.uint32)
    values = rng.standard_normal(23).astype(dtype)
    x_gap, out_gap, o = 3 * width * step_x + 16, 2 * width + 48, 16
    t = np.arange(width)
    reads = t // cell * cell * step_x + t % cell  # where output t of a row reads, from the row's first input cell
    for count in (0, 1, 7, 20):
        res = rng.standard_normal(600).astype(dtype)
        out = res.copy() if has_res else np.full(600, 7.0, dtype=dtype)
        before = out.copy()
        # the residual may be the output itself (a later channel block adds onto its partial sums)
        _row_pair(x, 5, x_gap, indices, values, 2, 2 + count, 0.25, out, o, out_gap, out, has_res, relu, step_x, cell)
        for r in range(2):
            expected = np.full(width, 0.25)
            for k in range(2, 2 + count):
                expected += float(values[k]) * x[5 + r * x_gap + int(indices[k]) + reads].astype(np.float64)
            if has_res:
                expected += before[o + r * out_gap:o + r * out_gap + width]
            if relu:
                expected = np.where(expected < 0, 0.0, expected)
            np.testing.assert_allclose(out[o + r * out_gap:o + r * out_gap + width], expected, rtol=1e-5, atol=1e-5)
        untouched = np.ones(600, bool)
        untouched[o:o + width] = untouched[o + out_gap:o + out_gap + width] = False
        np.testing.assert_array_equal(out[untouched], before[untouched])
