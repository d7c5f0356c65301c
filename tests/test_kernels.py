"""Numba kernels called directly on raw arrays, the ops layer that dispatches them, and the on-disk cache."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numba
from numba import prange
import numpy as np
import pytest
import torch

from sparsert import kernels, ops
from sparsert.formats import BSR, CSR
from sparsert.modules import SparseConv2d, SparseLinear

from conftest import DENSITIES, assert_close, force_conv_algorithm, set_sparse_weight, sparse_matrix

PAR_SEQ = ["par", "seq"]
LINEAR_SHAPES = [(1, 1), (17, 33), (64, 48)]  # (out, in)


def _kernel(name, variant):
    return getattr(kernels, f"{name}_{variant}")


def _ix(a):
    """An index array as ops hands it to the kernels (an unsigned view where ops does that), so these
    direct calls run the very specializations the library runs."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    to_kernel = getattr(ops, "unsigned_view", None)
    return to_kernel(t) if to_kernel is not None else t.numpy()


def _has_param(kernel, name):
    code = kernel.py_func.__code__
    return name in code.co_varnames[:code.co_argcount]


def _csr_spmm(variant, csr, xt, bias, relu, out, residual=None):
    """Call csr_spmm with or without its fused-residual arguments, whichever this version takes."""
    kernel = _kernel("csr_spmm", variant)
    if _has_param(kernel, "residual"):
        res = out if residual is None else residual
        return kernel(_ix(csr.indptr), _ix(csr.indices), csr.data, xt, bias, res, residual is not None, relu, out)
    assert residual is None, "this csr_spmm has no residual epilogue"
    return kernel(_ix(csr.indptr), _ix(csr.indices), csr.data, xt, bias, relu, out)


def _dense_linear(w, x, b, relu):
    y = x @ w.T + b
    return np.maximum(y, 0) if relu else y


# ------------------------------------------------------------------------------------ column-blocked SpMM
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize(("shape", "batch", "width"), [((300, 200), 64, 16), ((17, 33), 70, 8), ((40, 48), 1, 48),
                                                       ((5, 64), 129, 1000), ((600, 40), 64, 7)],
                         ids=["300x200-B64-w16", "17x33-B70-w8", "40x48-B1-one-block", "5x64-B129", "600x40-B64-w7"])
@pytest.mark.parametrize("variant", PAR_SEQ)
def test_csr_spmm_blocked(variant, shape, batch, width, relu, gen):
    """Every block adds onto out in turn (bias first, ReLU after the last), over full and partial
    strips, more rows than one work item, empty rows and empty blocks; out starts as NaN."""
    from sparsert.formats import column_blocks
    w = sparse_matrix(shape, 0.3, gen)
    w[::4] = 0
    csr = CSR.from_dense(w)
    ptr, indices, data, n_blocks = column_blocks(csr.indptr, csr.indices, csr.data, shape[0], width)
    xt = torch.randn(shape[1], batch, generator=gen).numpy()
    b = torch.randn(shape[0], generator=gen).numpy()
    out = np.full((shape[0], batch), np.nan, np.float32)
    _kernel("csr_spmm_blocked", variant)(ptr.astype(np.uint32), _ix(indices), data, n_blocks, xt, b, relu, out)
    assert_close(torch.from_numpy(out), torch.from_numpy(_dense_linear(w.numpy(), xt.T, b, relu).T))


def test_linear_takes_column_blocks_where_they_pay_and_sees_weight_updates(gen, monkeypatch):
    """A batch-64 Linear with enough nonzeros per block runs blocked (counted), matches dense, and a
    weight changed in place reaches the blocked copy."""
    monkeypatch.setattr(ops, "BLOCKED_WIDTH", 32)
    w = sparse_matrix((48, 256), 0.6, gen)
    layer = SparseLinear(CSR.from_dense(w), torch.randn(48, generator=gen), backend="numba")
    x = torch.randn(64, 256, generator=gen)
    before = ops.CALLS["numba.csr_spmm_blocked"]
    assert_close(layer(x), x @ w.T + layer.bias)
    with torch.no_grad():
        layer.values.mul_(2)
    assert_close(layer(x), x @ (2 * w).T + layer.bias)
    assert ops.CALLS["numba.csr_spmm_blocked"] == before + 2
    monkeypatch.setattr(ops, "BLOCKED_MIN_SEGMENT", 10**6)  # too few per block: the plain SpMM
    assert_close(layer(x), x @ (2 * w).T + layer.bias)
    assert ops.CALLS["numba.csr_spmm_blocked"] == before + 2


# ------------------------------------------------------------------------------------ sliced matvec
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (40, 600), (300, 64), (40, 3000)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", PAR_SEQ)
def test_sliced_matvec(variant, shape, relu, gen):
    """Rows of unequal length share slices (masked lanes), empty rows get the bias, a partial last
    slice writes only real rows; out starts as NaN. 3000 columns at 1%: 2-byte steps."""
    from sparsert.formats import sliced_ell
    w = sparse_matrix(shape, 0.01 if shape[1] == 3000 else 0.3, gen)
    w[::5] = 0
    if shape[0] > 2:
        w[2] = torch.randn(shape[1], generator=gen)  # one full row: the slice's other lanes pad
    csr = CSR.from_dense(w)
    sliced = sliced_ell(csr.indptr, csr.indices, csr.data, shape[0])
    assert sliced[1].dtype == (np.uint16 if shape[1] == 3000 else np.uint8)
    x = torch.randn(shape[1], generator=gen).numpy()
    b = torch.randn(shape[0], generator=gen).numpy()
    out = np.full(shape[0], np.nan, np.float32)
    _kernel("sliced_matvec", variant)(sliced[0].astype(np.uint32), *sliced[1:], b, x, relu,
                                      np.empty(sliced[3].shape[0], np.float32), out)
    assert_close(torch.from_numpy(out), torch.from_numpy(_dense_linear(w.numpy(), x[None], b, relu)[0]))


def test_sliced_matvec_propagates_nan_only_through_stored_weights(gen):
    """A NaN input feature reaches exactly the rows that store a weight for it, as in dense torch;
    padded lanes never read it."""
    from sparsert.formats import sliced_ell
    w = torch.zeros(20, 40)
    w[3, 7] = 2.0
    w[5, 7:40] = 1.0
    w[11, 0] = 1.0
    csr = CSR.from_dense(w)
    sliced = sliced_ell(csr.indptr, csr.indices, csr.data, 20)
    x = torch.randn(40, generator=gen)
    x[7] = float("nan")
    out = np.empty(20, np.float32)
    kernels.sliced_matvec_seq(sliced[0].astype(np.uint32), *sliced[1:], np.zeros(20, np.float32), x.numpy(), False,
                              np.empty(sliced[3].shape[0], np.float32), out)
    assert np.isnan(out).nonzero()[0].tolist() == [3, 5]
    assert out[11] == x[0].item()


def test_linear_batch1_takes_the_sliced_matvec(gen, monkeypatch):
    """Where the sliced matvec is chosen (ops.SLICED_MATVEC: AVX-512 hosts), float32 rows run on it (counted),
    with 1-byte steps and, once a row steps 300 columns, 2-byte ones; in-place weight updates seen. float64
    weights, or a row stepping past 65535 columns: the CSR matvec."""
    monkeypatch.setattr(ops, "SLICED_MATVEC", True)
    w = sparse_matrix((24, 400), 0.3, gen)
    layer = SparseLinear(CSR.from_dense(w), torch.randn(24, generator=gen), backend="numba")
    x = torch.randn(1, 400, generator=gen)
    before = dict(ops.CALLS)
    assert_close(layer(x), x @ w.T + layer.bias)
    with torch.no_grad():
        layer.values.mul_(-1)
    assert_close(layer(x), -(x @ w.T) + layer.bias)
    w[7] = 0
    w[7, 0] = w[7, 300] = 1.0  # one step of 300 columns
    layer = SparseLinear(CSR.from_dense(w), backend="numba")
    assert layer.sliced_arrays()[1].dtype == np.uint16
    assert_close(layer(x), x @ w.T)
    assert ops.CALLS["numba.sliced_matvec"] == before.get("numba.sliced_matvec", 0) + 3
    wide = torch.zeros(24, 70000)
    wide[:, :400] = w
    wide[3, 66000] = 2.0  # a step of 65600 columns
    xw = torch.randn(1, 70000, generator=gen)
    for layer in (SparseLinear(CSR.from_dense(w.double()), backend="numba"),
                  SparseLinear(CSR.from_dense(wide), backend="numba")):
        assert layer.sliced_arrays() is None
        xx = (x if layer.in_features == 400 else xw).to(layer.values.dtype)
        weight = w if layer.in_features == 400 else wide
        assert_close(layer(xx), xx @ weight.to(xx.dtype).T)
    assert ops.CALLS["numba.csr_matvec"] == before.get("numba.csr_matvec", 0) + 2


# ------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("shape", [(1, 1), (1, 4096), (16, 16), (17, 33), (64, 4096), (5, 1000), (100, 48)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", PAR_SEQ)
def test_rows_to_features(variant, shape, gen):
    """Full 16x16 register tiles and scalar edges on both sides: every element lands exactly once."""
    x = torch.randn(shape, generator=gen).numpy()
    out = np.full(shape[::-1], np.nan, np.float32)
    _kernel("rows_to_features", variant)(x, out)
    np.testing.assert_array_equal(out, x.T)


@pytest.mark.parametrize(("n_img", "height", "width", "border"), [(64, 32, 32, 1), (20, 5, 37, 3), (16, 16, 16, 2),
                                                                    (3, 4, 4, 1)],
                         ids=["64x32x32-b1", "20x5x37-b3", "16x16x16-b2", "3x4x4-b1"])
@pytest.mark.parametrize("source", ["nchw", "cnhw"])
@pytest.mark.parametrize("variant", PAR_SEQ)
def test_to_lanes(variant, source, n_img, height, width, border, gen):
    """Register tiles (16 images x 16 pixels), scalar edges (images past the last full tile, pixels past the
    last full 16) and zeros (border cells, lanes past the batch, the plane's padding) over a NaN output: every
    value of the plane is written, and each from the right pixel."""
    n_chan = 3
    x = torch.randn(n_img, n_chan, height, width, generator=gen).numpy()
    hw = height * width
    if source == "nchw":
        flat, strides = x.reshape(-1), np.array([n_chan * hw, hw, width, 1])
    else:
        flat, strides = x.transpose(1, 0, 2, 3).copy().reshape(-1), np.array([hw, n_img * hw, width, 1])
    lanes = kernels.lane_count(n_img)
    hq, wq = height + 2 * border, width + 2 * border
    out = np.full((n_chan, hq * wq * lanes + 16), np.nan, np.float32)
    _kernel("to_lanes", variant)(flat, strides, n_img, height, width, border, lanes, out)
    expected = np.zeros((n_chan, hq, wq, lanes), np.float32)
    expected[:, border:border + height, border:border + width, :n_img] = x.transpose(1, 2, 3, 0)
    np.testing.assert_array_equal(out[:, :hq * wq * lanes].reshape(n_chan, hq, wq, lanes), expected)
    np.testing.assert_array_equal(out[:, hq * wq * lanes:], 0)


def test_transposed_input_reaches_the_kernel_unchanged(gen):
    """A batch-64 float32 Linear input goes through the register transpose, a feature-major view does not."""
    layer = SparseLinear(CSR.from_dense(sparse_matrix((40, 70), 0.3, gen)), torch.randn(40, generator=gen),
                         backend="numba")
    x = torch.randn(64, 70, generator=gen)
    expected = x @ layer.dense_weight_2d().T + layer.bias
    assert_close(layer(x), expected)
    assert_close(layer(x.t().contiguous().t()), expected)
    assert_close(layer(x.double().float()[:, :70]), expected)


# ------------------------------------------------------------------------------------ linear kernels
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d:g}")
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", PAR_SEQ)
def test_csr_matvec(variant, shape, density, relu, gen):
    w = sparse_matrix(shape, density, gen)
    csr = CSR.from_dense(w)
    x = torch.randn(shape[1], generator=gen).numpy()
    b = torch.randn(shape[0], generator=gen).numpy()
    out = np.full(shape[0], np.nan, np.float32)
    _kernel("csr_matvec", variant)(_ix(csr.indptr), _ix(csr.indices), csr.data, x, b, relu, out)
    assert_close(torch.from_numpy(out), torch.from_numpy(_dense_linear(w.numpy(), x[None], b, relu)[0]))


@pytest.mark.parametrize("batch", [0, 1, 7, 64], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d:g}")
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", PAR_SEQ)
def test_csr_spmm(variant, shape, density, batch, gen):
    w = sparse_matrix(shape, density, gen)
    csr = CSR.from_dense(w)
    x = torch.randn(batch, shape[1], generator=gen).numpy()
    b = torch.randn(shape[0], generator=gen).numpy()
    for relu in (False, True):
        out = np.full((shape[0], batch), np.nan, np.float32)
        _csr_spmm(variant, csr, np.ascontiguousarray(x.T), b, relu, out)
        assert_close(torch.from_numpy(out.T.copy()), torch.from_numpy(_dense_linear(w.numpy(), x, b, relu)))


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("batch", [1, 7, 130], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("variant", PAR_SEQ)
def test_csr_spmm_residual_epilogue(variant, batch, relu, gen):
    if not _has_param(_kernel("csr_spmm", variant), "residual"):
        pytest.skip("this csr_spmm has no residual epilogue")
    w = sparse_matrix((24, 40), 0.3, gen)
    csr = CSR.from_dense(w)
    x = torch.randn(batch, 40, generator=gen)
    b = torch.randn(24, generator=gen)
    res = torch.randn(24, batch, generator=gen)
    out = np.full((24, batch), np.nan, np.float32)
    _csr_spmm(variant, csr, np.ascontiguousarray(x.numpy().T), b.numpy(), relu, out, residual=res.numpy())
    expected = (x @ w.T + b) + res.T
    assert_close(torch.from_numpy(out.T.copy()), torch.relu(expected) if relu else expected)


@pytest.mark.parametrize("batch", [0, 1, 7, 64], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d:g}")
@pytest.mark.parametrize("shape,block", [((8, 12), (4, 4)), ((64, 48), (16, 8)), ((6, 10), (3, 5)), ((5, 7), (1, 1))],
                         ids=["8x12-b4", "64x48-b16x8", "6x10-b3x5", "5x7-b1"])
@pytest.mark.parametrize("variant", PAR_SEQ)
def test_bsr_spmm(variant, shape, block, density, batch, gen):
    w = sparse_matrix(shape, density, gen, block=block)
    bsr = BSR.from_dense(w, block)
    x = torch.randn(batch, shape[1], generator=gen).numpy()
    b = torch.randn(shape[0], generator=gen).numpy()
    for relu in (False, True):
        out = np.full((shape[0], batch), np.nan, np.float32)
        _kernel("bsr_spmm", variant)(_ix(bsr.indptr), _ix(bsr.indices), bsr.data, np.ascontiguousarray(x.T), b,
                                     relu, out)
        assert_close(torch.from_numpy(out.T.copy()), torch.from_numpy(_dense_linear(w.numpy(), x, b, relu)))


@pytest.mark.parametrize("variant", PAR_SEQ)
def test_linear_kernels_fp64(variant, gen):
    w = sparse_matrix((24, 40), 0.3, gen, block=(4, 4), dtype=torch.float64)
    x = torch.randn(5, 40, generator=gen, dtype=torch.float64).numpy()
    b = torch.randn(24, generator=gen, dtype=torch.float64).numpy()
    expected = torch.from_numpy(_dense_linear(w.numpy(), x, b, False))
    csr, bsr = CSR.from_dense(w), BSR.from_dense(w, (4, 4))
    out = np.empty((24, 5))
    _csr_spmm(variant, csr, np.ascontiguousarray(x.T), b, False, out)
    torch.testing.assert_close(torch.from_numpy(out.T.copy()), expected, rtol=1e-12, atol=1e-12)
    out = np.empty((24, 5))
    _kernel("bsr_spmm", variant)(_ix(bsr.indptr), _ix(bsr.indices), bsr.data, np.ascontiguousarray(x.T), b, False, out)
    torch.testing.assert_close(torch.from_numpy(out.T.copy()), expected, rtol=1e-12, atol=1e-12)
    out = np.empty(24)
    _kernel("csr_matvec", variant)(_ix(csr.indptr), _ix(csr.indices), csr.data, x[0].copy(), b, False, out)
    torch.testing.assert_close(torch.from_numpy(out), expected[0], rtol=1e-12, atol=1e-12)


def _relu_special_values(variant, gen, special):
    w = sparse_matrix((8, 12), 0.5, gen, block=(4, 4))
    b = torch.randn(8, generator=gen)
    for row, value in special.items():
        b[row] = value
    x = torch.randn(3, 12, generator=gen)
    expected = torch.relu(x @ w.T + b)
    csr, bsr = CSR.from_dense(w), BSR.from_dense(w, (4, 4))
    out = np.empty(8, np.float32)
    _kernel("csr_matvec", variant)(_ix(csr.indptr), _ix(csr.indices), csr.data, x[0].numpy(), b.numpy(), True, out)
    torch.testing.assert_close(torch.from_numpy(out), expected[0], equal_nan=True)
    out = np.empty((8, 3), np.float32)
    _csr_spmm(variant, csr, np.ascontiguousarray(x.numpy().T), b.numpy(), True, out)
    torch.testing.assert_close(torch.from_numpy(out.T.copy()), expected, equal_nan=True)
    out = np.empty((8, 3), np.float32)
    _kernel("bsr_spmm", variant)(_ix(bsr.indptr), _ix(bsr.indices), bsr.data, np.ascontiguousarray(x.numpy().T),
                                 b.numpy(), True, out)
    torch.testing.assert_close(torch.from_numpy(out.T.copy()), expected, equal_nan=True)


@pytest.mark.parametrize("variant", PAR_SEQ)
def test_fused_relu_keeps_nan_and_inf(variant, gen):
    """torch.relu(NaN) is NaN and relu(+inf) is +inf: the fused ReLU must agree."""
    _relu_special_values(variant, gen, {2: float("nan"), 5: float("inf")})


@pytest.mark.parametrize("variant", PAR_SEQ)
def test_fused_relu_of_minus_inf_is_zero(variant, gen):
    _relu_special_values(variant, gen, {6: -float("inf")})


# ------------------------------------------------------------------------------------ every kernel, through ops
def _dispatchers():
    """Every Numba kernel sparsert.kernels exports, by name."""
    return {name: obj for name, obj in vars(kernels).items() if isinstance(obj, numba.core.dispatcher.Dispatcher)}


@pytest.fixture
def spy_all(monkeypatch):
    """Record every kernel launch (ops looks kernels up on the kernels module at call time)."""
    launched = []
    for name, disp in _dispatchers().items():
        monkeypatch.setattr(kernels, name, lambda *a, _n=name, _d=disp: launched.append(_n) or _d(*a))
    return launched


@pytest.fixture(params=["seq", "par"])
def force_parallel(request, monkeypatch):
    """Force ops to pick the serial or the parallel twin (it normally decides by work size)."""
    monkeypatch.setattr(ops, "PARALLEL_MIN_WORK", 0 if request.param == "par" else 1 << 60)
    return request.param


@pytest.fixture(params=["direct", "im2col"])
def conv_algorithm(request, monkeypatch):
    """Force the numba conv algorithm: direct sparse conv, or im2col + CSR SpMM (small feature maps)."""
    force_conv_algorithm(monkeypatch, request.param)
    return request.param


def _conv_layer(conv_kw, density, gen, cin=4, cout=6):
    conv = torch.nn.Conv2d(cin, cout, **conv_kw)
    with torch.no_grad():
        conv.weight.copy_(sparse_matrix(tuple(conv.weight.shape), density, gen))
        conv.bias.copy_(torch.randn(cout, generator=gen))
    return conv, SparseConv2d.from_dense(conv, backend="numba")


def test_every_kernel_runs_and_matches_dense(monkeypatch, spy_all, gen):
    """Each exported kernel (serial and parallel twin) runs in at least one of these forwards, and every
    forward matches dense torch: linear CSR/BSR at batch 1..200, direct conv (packed and in-place 1x1
    input), im2col conv on tiny and larger maps, with bias, residual and ReLU epilogues."""
    lin = torch.nn.Linear(48, 32)
    conv3 = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
    conv1 = torch.nn.Conv2d(6, 6, 1)
    for m in (lin, conv3, conv1):
        set_sparse_weight(m, 0.4, gen)
    with torch.no_grad():
        lin.weight.mul_(sparse_matrix((32, 48), 0.5, gen, block=(8, 8)) != 0)
    for variant in ("seq", "par"):
        monkeypatch.setattr(ops, "PARALLEL_MIN_WORK", 0 if variant == "par" else 1 << 60)
        for fmt in ("csr", "bsr8"):
            layer = SparseLinear.from_dense(lin, backend="numba", format=fmt)
            for batch in (1, 3, 16, 17, 200):
                for relu in (False, True):
                    layer.relu = relu
                    x = torch.randn(batch, 48, generator=gen)
                    expected = lin(x).detach()
                    assert_close(layer(x), torch.relu(expected) if relu else expected)
        for algorithm in ("direct", "im2col"):
            force_conv_algorithm(monkeypatch, algorithm)
            s3, s1 = SparseConv2d.from_dense(conv3), SparseConv2d.from_dense(conv1)
            for shape in ((1, 4, 2, 2), (1, 4, 7, 8), (3, 4, 9, 10)):
                x = torch.randn(shape, generator=gen)
                mid = s3(x)
                assert_close(mid, conv3(x).detach())
                res = torch.randn(mid.shape, generator=gen)
                s1.relu = True
                assert_close(s1(mid, residual=res), torch.relu(conv1(mid.contiguous()) + res).detach())
                s1.relu = False
    missing = set(_dispatchers()) - set(spy_all)
    assert not missing, f"kernels never exercised here (extend this test): {sorted(missing)}"


def _conv_spy_names(launched, variant):
    other = "seq" if variant == "par" else "par"
    assert launched, "no kernel launched"
    assert not [n for n in launched if n.endswith("_" + other)], launched


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("conv_kw", [dict(kernel_size=1), dict(kernel_size=3, padding=1, stride=2),
                                     dict(kernel_size=5, padding="same", dilation=(1, 2)),
                                     dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), groups=2)],
                         ids=["k1", "k3s2", "k5same-d12", "k3x2-s21-g2"])
def test_conv2d_numba_dispatch(force_parallel, conv_algorithm, conv_kw, residual, relu, gen, spy_all):
    conv, layer = _conv_layer(conv_kw, 0.4, gen)
    name = "numba.sparse_conv" if conv_algorithm == "direct" else "numba.im2col_conv"
    for x in (torch.randn(3, 4, 10, 9, generator=gen), torch.randn(1, 4, 10, 9, generator=gen),
              torch.randn(2, 4, 9, 10, generator=gen).transpose(2, 3),
              torch.randn(1, 4, 10, 9, generator=gen).to(memory_format=torch.channels_last)):
        ref = conv(x).detach()
        res = torch.randn(ref.shape, generator=gen) if residual else None
        expected = ref + res if residual else ref
        before = ops.CALLS[name]
        layer.relu = relu
        y = layer(x, residual=res)
        assert ops.CALLS[name] == before + 1
        assert_close(y, torch.relu(expected) if relu else expected)
    _conv_spy_names(spy_all, force_parallel)
    if conv_algorithm == "direct":
        assert f"sparse_conv_{force_parallel}" in spy_all


def test_linear_batch1_without_fast_gathers_takes_the_csr_matvec(gen, monkeypatch):
    """Hosts without AVX-512 (ops.SLICED_MATVEC False: its gathers measured slower than the CSR row loop on
    Zen 3) run a float32 batch-1 Linear on the CSR matvec, counted, and never build the sliced arrays."""
    monkeypatch.setattr(ops, "SLICED_MATVEC", False)
    w = sparse_matrix((24, 400), 0.3, gen)
    layer = SparseLinear(CSR.from_dense(w), torch.randn(24, generator=gen), backend="numba", relu=True)
    x = torch.randn(1, 400, generator=gen)
    before = dict(ops.CALLS)
    assert_close(layer(x), torch.relu(x @ w.T + layer.bias))
    assert ops.CALLS["numba.csr_matvec"] == before.get("numba.csr_matvec", 0) + 1
    assert ops.CALLS["numba.sliced_matvec"] == before.get("numba.sliced_matvec", 0)
    assert ("sliced",) not in layer.__dict__.get("_derived_cache", {})


def test_sliced_matvec_policy_follows_the_host(monkeypatch):
    """The policy default is AVX-512 itself, as the compiling target reports it: NUMBA_CPU_FEATURES where set
    (as Numba's codegen reads them), else the host's."""
    from sparsert.kernels._jit import target_has
    assert ops.SLICED_MATVEC == kernels.AVX512 == target_has("avx512f")
    assert target_has("avx2") or not target_has("avx512f")  # every AVX-512 target also has AVX2
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+avx512f")
    assert target_has("avx512f") and target_has("avx2")
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,-avx512f")
    assert not target_has("avx512f") and target_has("avx2")


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize("batch", [0, 1, 7, 64], ids=lambda b: f"B{b}")
def test_linear_numba_dispatch(force_parallel, fmt, batch, gen, spy_all):
    """SparseLinear on the numba backend launches only the twin ops was told to pick."""
    w = sparse_matrix((32, 48), 0.3, gen, block=(8, 8) if fmt == "bsr" else None)
    b = torch.randn(32, generator=gen)
    layer = SparseLinear(CSR.from_dense(w) if fmt == "csr" else BSR.from_dense(w, (8, 8)), b, backend="numba")
    x = torch.randn(batch, 48, generator=gen)
    batch1 = "sliced_matvec" if ops.SLICED_MATVEC else "csr_matvec"
    name = batch1 if (batch == 1 and fmt == "csr") else f"{fmt}_spmm"
    before = ops.CALLS[f"numba.{name}"]
    for relu in (False, True):
        layer.relu = relu
        expected = x @ w.T + b
        assert_close(layer(x), torch.relu(expected) if relu else expected)
    assert ops.CALLS[f"numba.{name}"] == before + 2
    _conv_spy_names(spy_all, force_parallel)
    # Batches of more than one row reach the kernel through the [B, F] -> [F, B] register transpose.
    assert all(n.startswith(name) or n.startswith("rows_to_features") for n in spy_all), spy_all
    assert (f"rows_to_features_{force_parallel}" in spy_all) == (batch > 1), spy_all


def test_conv2d_numba_fused_relu_keeps_nan(force_parallel, conv_algorithm, gen):
    conv, layer = _conv_layer(dict(kernel_size=3, padding=1), 0.4, gen)
    with torch.no_grad():
        conv.bias[1] = float("nan")
    layer = SparseConv2d.from_dense(conv, backend="numba")
    layer.relu = True
    x = torch.randn(2, 4, 6, 5, generator=gen)
    y = layer(x)
    expected = torch.relu(conv(x).detach())
    assert torch.isnan(y[:, 1]).all()
    torch.testing.assert_close(y, expected, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_conv2d_torch_residual_relu(relu, gen):
    conv, _ = _conv_layer(dict(kernel_size=3, padding=1, groups=2), 0.4, gen)
    x = torch.randn(2, 4, 6, 7, generator=gen)
    ref = conv(x).detach()
    res = torch.randn(ref.shape, generator=gen)
    layer = SparseConv2d.from_dense(conv, backend="torch")
    layer.relu = relu
    before = ops.CALLS["torch.conv.csr"]
    y = layer(x, residual=res)
    assert ops.CALLS["torch.conv.csr"] == before + 1
    assert_close(y, torch.relu(ref + res) if relu else ref + res)


def test_conv_chain_reads_previous_cnhw_output_without_packing(gen, monkeypatch, spy_all):
    """Direct algorithm: a 1x1 conv on the previous sparse conv's CNHW output uses it in place (no pack)."""
    force_conv_algorithm(monkeypatch, "direct")
    _, first = _conv_layer(dict(kernel_size=3, padding=1), 0.5, gen, cin=4, cout=4)
    conv2, second = _conv_layer(dict(kernel_size=1), 0.5, gen, cin=4, cout=6)
    x = torch.randn(2, 4, 5, 5, generator=gen)
    mid = first(x)
    assert mid.transpose(0, 1).is_contiguous()
    spy_all.clear()
    before = ops.CALLS["numba.sparse_conv"]
    assert_close(second(mid), conv2(mid.contiguous()).detach())
    assert ops.CALLS["numba.sparse_conv"] == before + 1
    assert [n for n in spy_all if n.startswith("pack_input")] == [] and spy_all, spy_all


def test_backend_resolution():
    x32, x64, xbf = torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.bfloat16)
    assert ops.resolve_backend("auto", x32, "l") == "numba"
    assert ops.resolve_backend("auto", x64, "l") == "numba"
    assert ops.resolve_backend("auto", xbf, "l") == "torch"
    assert ops.resolve_backend("torch", x32, "l") == "torch"
    with pytest.raises(NotImplementedError, match="l: the numba backend"):
        ops.resolve_backend("numba", xbf, "l")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.check_backend("mkl")


# ------------------------------------------------------------------------------------ on-disk cache
_CACHE_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    import numba
    if "--launch-threads" in sys.argv:
        numba.get_num_threads()  # starts Numba's threading layer (see test_cached_serial_kernels_...)
    from torch import nn
    from sparsert import SparseConv2d, SparseLinear, kernels, ops
    torch.manual_seed(0)
    lin = SparseLinear.from_dense(nn.Linear(16, 8), backend="numba", format="csr")
    lin(torch.randn(1, 16))
    lin(torch.randn(3, 16))
    conv = SparseConv2d.from_dense(nn.Conv2d(2, 3, 3, padding=1), backend="numba")
    for im2col in (False, True):  # the direct conv, then im2col + SpMM where this version has it
        ops.uses_im2col = lambda *args, _f=im2col, **kwargs: _f
        conv(torch.randn(1, 2, 5, 5))
    stats = {}
    for name in dir(kernels):
        disp = getattr(kernels, name)
        if hasattr(disp, "stats") and disp.signatures:
            stats[name] = dict(hits=sum(disp.stats.cache_hits.values()), misses=sum(disp.stats.cache_misses.values()),
                               path=disp.stats.cache_path, sigs=len(disp.signatures))
    print("STATS" + json.dumps(dict(stats=stats, kernels_dir=os.path.dirname(kernels.__file__))))
""")
# csr_spmm_dispatch carries csr_spmm_seq compiled into its own cache entry
# The probe's batch-1 Linear runs the host's matvec (ops.SLICED_MATVEC).
EXPECTED_CACHED = {"sliced_matvec_seq" if ops.SLICED_MATVEC else "csr_matvec_seq", "csr_spmm_dispatch", "pack_input_seq",
                   "sparse_conv_seq"}


def _run_cache_script(tmp_path, env_extra, launch_threads=True):
    script = tmp_path / "cache_probe.py"
    script.write_text(_CACHE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(env_extra)
    env["PYTHONFAULTHANDLER"] = "1"
    args = [sys.executable, str(script)] + (["--launch-threads"] if launch_threads else [])
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, f"exit status {proc.returncode}:\n{proc.stderr[-3000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("STATS")][-1]
    return json.loads(line[len("STATS"):])


def _cache_file_tag(name: str) -> str:
    """Cache files: <module>._<kernel>_seq- / <module>._<kernel>- for twins, <module>.<name>- otherwise."""
    if name.endswith("_seq"):
        return f"._{name[:-4]}_seq-"
    if name.endswith("_par"):
        return f"._{name[:-4]}-"
    return f".{name}-"


def test_numba_kernels_cached_next_to_installed_kernels(tmp_path):
    """Two processes: the second loads every kernel it runs from the on-disk cache in the installed
    kernels' __pycache__ (no compile: cache misses 0)."""
    _run_cache_script(tmp_path, {})  # makes sure the cache is current, whatever state it was in
    second = _run_cache_script(tmp_path, {})
    assert EXPECTED_CACHED <= set(second["stats"]), second["stats"].keys()
    cache_dir = os.path.join(second["kernels_dir"], "__pycache__")
    for name, st in second["stats"].items():
        assert os.path.realpath(st["path"]) == os.path.realpath(cache_dir), st["path"]
        assert st["misses"] == 0 and st["hits"] >= st["sigs"] >= 1, f"{name} was compiled again: {st}"
    files = os.listdir(cache_dir)
    for name in second["stats"]:  # <module>._<kernel>[_seq]-<line>.py<ver>.nbi / .<n>.nbc
        tag = _cache_file_tag(name)
        assert any(f.endswith(".nbi") and tag in f for f in files), (name, files)
        assert any(f.endswith(".nbc") and tag in f for f in files), (name, files)


@pytest.fixture(scope="module")
def compiled_cache(tmp_path_factory):
    """An empty NUMBA_CACHE_DIR filled by one process (which compiles every kernel it runs)."""
    work = tmp_path_factory.mktemp("numba_cache_probe")
    env = {"NUMBA_CACHE_DIR": str(work / "numba_cache")}
    return work, env, _run_cache_script(work, env)


def test_numba_cache_fresh_directory_compiles_once(compiled_cache):
    """With an empty NUMBA_CACHE_DIR the first process compiles (misses) and writes index/data files;
    the second process hits the cache for every kernel and compiles nothing."""
    work, env, first = compiled_cache
    assert EXPECTED_CACHED <= set(first["stats"]), first["stats"].keys()
    for name, st in first["stats"].items():
        assert st["misses"] >= 1 and st["hits"] == 0, (name, st)  # compiled here
    found = [f for _, _, fs in os.walk(env["NUMBA_CACHE_DIR"]) for f in fs]
    assert any(f.endswith(".nbi") for f in found) and any(f.endswith(".nbc") for f in found), found
    second = _run_cache_script(work, env)
    # The first process also compiles kernels called from inside others (csr_spmm_dispatch's); the
    # second loads those compiled into their caller's entry, so it sees a subset, never a new one.
    assert EXPECTED_CACHED <= set(second["stats"]) <= set(first["stats"])
    for name, st in second["stats"].items():
        assert st["misses"] == 0 and st["hits"] >= 1, (name, st)


def test_cached_serial_kernels_run_in_a_fresh_process(compiled_cache):
    """A user's second run (warm cache) of a small model must not crash: here nothing starts Numba's
    threading layer before the cached kernels run."""
    work, env, _ = compiled_cache
    _run_cache_script(work, env, launch_threads=False)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("has_residual,relu", [(False, False), (False, True), (True, False), (True, True)])
def test_spmm_dispatch_single_column_matches_dense(parallel, has_residual, relu, gen):
    """One output column (a 1x1 map at batch 1) takes the matvec; the input may be a wider im2col
    buffer whose first column holds the pixel."""
    dense_t = sparse_matrix((40, 70), 0.2, gen)
    csr = CSR.from_dense(dense_t)
    dense = dense_t.numpy().astype(np.float64)
    xt = torch.randn(70, 16, generator=gen).numpy()  # row length 16: one pixel used, as im2col pads rows
    bias = torch.randn(40, generator=gen).numpy()
    residual = torch.randn(40, 1, generator=gen).numpy()
    out = np.full((40, 1), 7.0, np.float32)
    kernels.csr_spmm_dispatch(_ix(csr.indptr), _ix(csr.indices), np.asarray(csr.data), xt, bias, residual,
                              has_residual, relu, out, parallel)
    expected = dense @ xt[:, :1].astype(np.float64) + bias[:, None]
    if has_residual:
        expected = expected + residual
    if relu:
        expected = np.maximum(expected, 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [16, 9, 1, 0])
def test_masked_move_writes_n_lanes_and_zeroes_the_left_out(n, gen):
    """kernels.layout.masked_move: lanes < n get the source value where keep has their bit and 0 elsewhere, lanes
    from n on keep what they held; a source start before the array's first element reads only kept lanes."""
    from numba import njit
    from sparsert.kernels.layout import masked_move

    @njit
    def move(src, s0, dst, d0, keep, count):
        masked_move(src, s0, dst, d0, keep, count)

    src = torch.randn(40, generator=gen).numpy()
    keep = 0b1011_0000_1111_0110
    dst = np.full(24, np.nan, np.float32)
    move(src, 5, dst, 3, keep, n)
    lanes = np.arange(16)
    kept = (keep >> lanes) & 1 == 1
    expected = np.full(24, np.nan, np.float32)
    expected[3:3 + n] = np.where(kept, src[5:21], 0.0)[:n]
    np.testing.assert_array_equal(dst, expected)
    dst = np.full(16, np.nan, np.float32)
    move(src, -4, dst, 0, 0xFFF0, 16)  # lanes 0-3 would read before src: left out, so never read
    np.testing.assert_array_equal(dst, np.concatenate([np.zeros(4, np.float32), src[:12]]))


@pytest.mark.parametrize("images,hw,kernel,stride,pad,shifted", [
    (1, (8, 8), 3, 1, 1, True), (2, (5, 7), 3, 1, 1, True), (1, (4, 4), 1, 1, 0, True), (1, (1, 1), 3, 1, 1, True),
    (1, (8, 8), 3, 2, 1, False), (1, (6, 6), 3, 1, 0, False), (1, (6, 6), 3, 1, 2, False)])
def test_shift_table_covers_exactly_the_same_size_stride1_tables(images, hw, kernel, stride, pad, shifted):
    """A table has a shift form where each tap reads pixel p + shift for output p (stride 1, output the input's
    size); then per 16 outputs it holds the first pixel read, the lanes that read one and the outputs there, and
    replaying it gives the table back. A strided, shrinking ('valid') or growing conv has none."""
    h, w = hw
    out_h, out_w = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
    table = kernels.im2col_table(images, h, w, out_h, out_w, (kernel, kernel), (stride, stride), (1, 1), (pad,) * 4)
    shifts = kernels.shift_table(table)
    assert (shifts is not None) == shifted
    if shifts is None:
        return
    taps, n_pix = table.shape
    n_vec = -(-n_pix // 16)
    assert shifts.shape == (taps, 3 * n_vec) and shifts.dtype == np.uint32
    rows = shifts.reshape(taps, n_vec, 3)
    replayed = np.full((taps, n_vec * 16), int(kernels.PADDING), np.int64)
    for t in range(taps):
        for j in range(n_vec):
            first, keep, count = int(rows[t, j, 0].view(np.int32)), int(rows[t, j, 1]), int(rows[t, j, 2])
            assert count == min(16, n_pix - 16 * j)
            for lane in range(count):
                if keep >> lane & 1:
                    replayed[t, 16 * j + lane] = first + lane
            assert keep >> count == 0  # no lane past the row's end reads
    np.testing.assert_array_equal(replayed[:, :n_pix], table.astype(np.int64))


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("images,hw,stride,kernel", [(1, (1, 1), 1, 3), (1, (2, 2), 1, 3), (1, (4, 4), 1, 3),
                                                     (1, (7, 5), 2, 3), (1, (6, 6), 1, 1), (1, (8, 8), 1, 3),
                                                     (3, (5, 7), 1, 3)])
@pytest.mark.parametrize("has_residual,relu", [(False, False), (True, True)])
@pytest.mark.parametrize("twin", ["par", "seq"])
@pytest.mark.parametrize("form", ["lookup", "shifted"])
def test_private_gather_gemm_matches_dense(parts, images, hw, stride, kernel, has_residual, relu, twin, form, gen):
    """im2col and its SpMM in one parallel region, each part gathering into its own copy of the columns (more
    parts than threads run in turn, as all do in the serial twin): every output channel equals the dense
    product of the weights and the gathered columns, and each part that ran holds the whole column matrix.
    The shifted form (a stride-1 'same' conv's table as `shift_table`: masked moves of 16 values) gathers the
    same columns, over rows of 1-105 pixels, several images and a last vector of 1-15 pixels."""
    h, w = hw
    pad = kernel // 2
    out_h, out_w = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
    table = kernels.im2col_table(images, h, w, out_h, out_w, (kernel, kernel), (stride, stride), (1, 1), (pad,) * 4)
    taps, pixels = table.shape
    shifts = kernels.shift_table(table)
    assert (shifts is None) == (stride != 1)
    if form == "shifted" and shifts is None:
        return  # a strided conv's rows are no shifted copies of its input: only the lookup form applies
    n_chan, n_out = 6, 11
    planes = torch.randn(n_chan, images * h * w, generator=gen).numpy()
    dense_t = sparse_matrix((n_out, n_chan * taps), 0.3, gen)
    dense_t[3] = 0.0  # an empty output channel: bias (and residual) only
    csr = CSR.from_dense(dense_t)
    bias = torch.randn(n_out, generator=gen).numpy()
    residual = torch.randn(n_out, pixels, generator=gen).numpy()
    cols = np.full((parts, n_chan * taps, pixels + 3), np.nan, np.float32)  # rows padded, as the plan pads them
    out = np.full((n_out, pixels), np.nan, np.float32)
    run = kernels.private_gather_gemm_par if twin == "par" else kernels.private_gather_gemm_seq
    run(planes, shifts if form == "shifted" else table, form == "shifted", cols, _ix(csr.indptr), _ix(csr.indices),
        np.asarray(csr.data), bias, residual, has_residual, relu, out)
    padded = np.concatenate([np.zeros((n_chan, 1), np.float32), planes], axis=1)  # table's PADDING -> 0
    gathered = padded[:, np.where(table == kernels.PADDING, 0, table.astype(np.int64) + 1)].reshape(n_chan * taps, pixels)
    expected = dense_t.numpy().astype(np.float64) @ gathered + bias[:, None]
    if has_residual:
        expected = expected + residual
    if relu:
        expected = np.maximum(expected, 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    ran = min(parts, numba.get_num_threads())
    for part in range(ran):
        np.testing.assert_array_equal(cols[part, :, :pixels], gathered)
    assert np.isnan(cols[ran:]).all()


@pytest.mark.parametrize("variant", PAR_SEQ)
@pytest.mark.parametrize("kernel,stride,pad,hw", [(3, 2, 1, (16, 16)), (3, 2, 1, (7, 10)), (2, 2, 0, (9, 8)),
                                                  (3, 1, 1, (5, 5)), (1, 1, 0, (3, 4))])
def test_plan_maxpool_matches_torch_with_nan_and_inf(variant, kernel, stride, pad, hw, gen):
    """The plan's CNHW max pool (columns reduced first, then each output's window of them) against torch:
    NaN anywhere in a window wins, -inf loses to everything but itself, padding never wins."""
    from sparsert.kernels import executor as ex
    x = torch.randn(3, 2, *hw, generator=gen)  # N, C, H, W for torch
    x[0, 0, 1, 1] = float("nan")
    x[1, 1, :2, :] = float("-inf")
    x[2, 0, -1, -1] = float("nan")
    expected = torch.nn.functional.max_pool2d(x, kernel, stride, pad)
    out = np.full((2, 3, *expected.shape[2:]), 7.0, np.float32)
    getattr(ex, f"maxpool_{variant}")(np.ascontiguousarray(x.permute(1, 0, 2, 3).numpy()), kernel, stride, pad, out)
    torch.testing.assert_close(torch.from_numpy(out).permute(1, 0, 2, 3), expected, equal_nan=True)


def test_split_row_cuts_rows_into_equal_nonzeros():
    """Each part starts at the first row whose nonzeros reach its share; empty rows and one heavy row hold."""
    from sparsert.kernels.conv import _split_row
    indptr = np.array([0, 10, 10, 20, 30, 40], np.uint32)  # row 1 empty
    assert [_split_row(indptr, part, 2) for part in range(3)] == [0, 3, 5]
    assert [_split_row(indptr, part, 4) for part in range(5)] == [0, 1, 3, 4, 5]
    heavy = np.array([0, 0, 100, 101], np.uint32)
    assert [_split_row(heavy, part, 2) for part in range(3)] == [0, 2, 3]
    assert [_split_row(np.zeros(4, np.uint32), part, 2) for part in range(3)] == [0, 0, 3]


def test_cache_is_emptied_when_any_kernel_source_changes(tmp_path):
    """Kernels inline code from other kernel files, which Numba's per-file cache key misses: a stamp of
    all kernel sources guards the cache. A stale stamp (sources edited since) empties it."""
    cache = tmp_path / "numba_cache"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    probe = ("import pathlib, sparsert.kernels as k; "
             "print(pathlib.Path(k._executor.run_plan._cache._cache_path))")
    run = lambda: subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120,
                                 check=True).stdout.strip()
    cache_dir = pathlib.Path(run())
    stamp = cache_dir / "sparsert-kernels.sha256"
    digest = stamp.read_text()
    stale = cache_dir / "conv._grid_conv-1.py311.nbi"
    stale.write_bytes(b"compiled from an older conv.py")
    run()
    assert stale.exists()  # same sources: the cache is kept
    stamp.write_text("sources as they were before an edit")
    run()
    assert not stale.exists() and stamp.read_text() == digest


@pytest.mark.parametrize("rows,n_chan,taps,chans_per_block,group", [(10, 7, 9, 3, 4), (64, 64, 9, 14, 64), (5, 4, 1, 8, 2),
                                                                     (3, 6, 9, 2, 1)])
def test_channel_blocks_order_each_block_pass_contiguously(rows, n_chan, taps, chans_per_block, group):
    """Every nonzero lands once; (row, block) segments hold exactly that row's nonzeros of that block, in CSR
    order; inside a group of rows, block b's segments follow each other row by row."""
    from sparsert.kernels import channel_blocks
    dense = np.random.default_rng(rows).random((rows, n_chan * taps)) < 0.3
    dense[0] = False  # an empty row
    indptr = np.concatenate([[0], np.cumsum(dense.sum(axis=1))])
    columns = np.nonzero(dense)[1]
    bounds, order = channel_blocks(indptr, columns, taps, chans_per_block, n_chan, group)
    n_blocks = -(-n_chan // chans_per_block)
    assert bounds.shape == (rows, 2 * n_blocks) and bounds.dtype == np.uint32
    assert sorted(order.tolist()) == list(range(len(columns)))
    position = 0
    for first in range(0, rows, group):
        for b in range(n_blocks):
            for r in range(first, min(rows, first + group)):
                start, end = int(bounds[r, 2 * b]), int(bounds[r, 2 * b + 1])
                assert start == position
                want = [k for k in range(indptr[r], indptr[r + 1]) if columns[k] // (chans_per_block * taps) == b]
                assert order[start:end].tolist() == want
                position = end
    assert position == len(columns)


def _thread_ids(out):
    for i in prange(out.size):  # the bare name, as in the kernels: the serial twin loads `range` in its place
        out[i] = numba.get_thread_id()


_thread_ids_par, _thread_ids_seq = kernels._jit.twin(_thread_ids)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two Numba threads")
@pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")  # this twin's file is not under kernels/
def test_serial_twin_runs_on_the_calling_thread():
    """The serial twin compiles through the parallel pipeline (kernels/_jit.py) with every transformation off:
    its prange must stay a plain loop, or a split batch would launch threads inside its threads."""
    saved = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        ids = np.full(4096, -1, dtype=np.int64)
        _thread_ids_par(ids)
        assert set(ids.tolist()) == {0, 1}  # the parallel twin does use both
        _thread_ids_seq(ids)
        assert set(ids.tolist()) == {0}
        ids32 = np.full(4096, -1, dtype=np.int32)  # a second compile: Numba once emptied the options it read
        _thread_ids_seq(ids32)
        assert set(ids32.tolist()) == {0}
    finally:
        numba.set_num_threads(saved)
