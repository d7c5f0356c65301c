"""SparseLinear / SparseConv2d against dense nn.Linear / nn.Conv2d on both backends.

Every forward runs under `run_sparse`: it must launch exactly one counted sparse kernel of the
expected backend, and dense F.linear/F.conv2d/weight rebuilding raise inside the sparse forward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsert import SparseConv2d, SparseLinear, ops
from sparsert.formats import CSR

from conftest import (BACKENDS, BATCHES, DENSITIES, _Tripwire, assert_close, assert_kernels_ran,
                      force_conv_algorithm, run_sparse, set_sparse_weight, sparse_guard, sparse_matrix)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths:UserWarning")


_F_LINEAR, _F_CONV2D = F.linear, F.conv2d


def _linear_kernel(backend, fmt, batch):
    if backend == "torch":
        return f"torch.linear.{fmt}"
    # Batch-1 float32 CSR rows that step at most 255 columns (all of these) take the sliced matvec on AVX-512
    # hosts, the CSR matvec elsewhere (ops.SLICED_MATVEC).
    batch1 = "numba.sliced_matvec" if ops.SLICED_MATVEC else "numba.csr_matvec"
    return batch1 if (fmt == "csr" and batch == 1) else f"numba.{fmt}_spmm"


ENGINES = ["numba-direct", "numba-im2col", "torch"]


def use_engine(engine, monkeypatch):
    """(backend, expected CALLS key) for a conv engine; the numba backend has two conv algorithms
    (direct sparse conv, im2col + SpMM for small feature maps), each forced here on any input size."""
    if engine == "torch":
        return "torch", "torch.conv.csr"
    algorithm = engine.split("-")[1]
    force_conv_algorithm(monkeypatch, algorithm)
    return "numba", "numba.im2col_conv" if algorithm == "im2col" else "numba.sparse_conv"


def make_linear(n_in, n_out, density, gen, block=None, bias=True):
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(sparse_matrix((n_out, n_in), density, gen, block=block))
        if bias:
            lin.bias.copy_(torch.randn(n_out, generator=gen))
    return lin.eval()


# ------------------------------------------------------------------------------------ Linear grid
LINEAR_CASES = [  # (in, out, format, block of the pruning mask, expected stored format)
    (1, 1, "csr", None, "csr"),
    (33, 17, "csr", None, "csr"),
    (64, 48, "csr", None, "csr"),
    (64, 48, "bsr8", (8, 8), "bsr"),
    (64, 48, "auto", (16, 16), "bsr"),
    (36, 20, "auto", (4, 4), "bsr"),   # 4x4 blocks tile 36x20
    (30, 22, "auto", (2, 2), "csr"),   # no candidate block tiles 30x22: CSR, still exact
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d:g}")
@pytest.mark.parametrize("n_in,n_out,fmt,block,stored", LINEAR_CASES,
                         ids=[f"{c[0]}to{c[1]}-{c[2]}-{c[4]}" for c in LINEAR_CASES])
def test_linear_matches_dense(n_in, n_out, fmt, block, stored, density, batch, backend, gen):
    lin = make_linear(n_in, n_out, density, gen, block=block)
    if fmt == "auto" and stored == "bsr" and not lin.weight.any():
        stored = "csr"  # nothing to block: choose_format keeps CSR for an all-zero matrix
    sparse = SparseLinear.from_dense(lin, backend=backend, format=fmt, layer_name="fc")
    assert sparse.format == stored
    x = torch.randn(batch, n_in, generator=gen)
    y = run_sparse(sparse, x, kernel=_linear_kernel(backend, stored, batch))
    assert_close(y, lin(x).detach())
    assert sparse.nnz == (torch.count_nonzero(lin.weight).item() if stored == "csr" else sparse.values.numel())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["csr", "bsr8"])
@pytest.mark.parametrize("layout", ["1d", "3d", "5d", "transposed", "sliced", "expanded", "batch0-3d"])
def test_linear_input_layouts(layout, fmt, backend, gen):
    lin = make_linear(24, 16, 0.3, gen, block=(8, 8))
    sparse = SparseLinear.from_dense(lin, backend=backend, format=fmt)
    x = {
        "1d": lambda: torch.randn(24, generator=gen),
        "3d": lambda: torch.randn(2, 5, 24, generator=gen),
        "5d": lambda: torch.randn(2, 1, 3, 2, 24, generator=gen),
        "transposed": lambda: torch.randn(24, 6, generator=gen).t(),
        "sliced": lambda: torch.randn(5, 48, generator=gen)[:, ::2],
        "expanded": lambda: torch.randn(1, 24, generator=gen).expand(4, 24),
        "batch0-3d": lambda: torch.randn(0, 3, 24, generator=gen),
    }[layout]()
    y = run_sparse(sparse, x, backend=backend)
    assert_close(y, lin(x).detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_zero_rows_and_columns(backend, gen):
    lin = make_linear(40, 32, 0.6, gen)
    with torch.no_grad():
        lin.weight[[0, 7, 31]] = 0
        lin.weight[:, [0, 13, 39]] = 0
    sparse = SparseLinear.from_dense(lin, backend=backend, format="csr")
    x = torch.randn(7, 40, generator=gen)
    x[:, 13] = float("nan")  # only ever multiplied by pruned weights: absent from the sparse product
    y = run_sparse(sparse, x, backend=backend)
    x[:, 13] = 0.0
    assert_close(y, lin(x).detach())
    assert_close(y[:, [0, 7, 31]], lin.bias.detach()[[0, 7, 31]].expand(7, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["csr", "bsr8", "auto"])
def test_linear_all_zero_layer_gives_bias(fmt, backend, gen):
    lin = make_linear(32, 16, 0.0, gen)
    sparse = SparseLinear.from_dense(lin, backend=backend, format=fmt)
    assert sparse.nnz == 0 and sparse.density == 0.0
    x = torch.randn(3, 32, generator=gen)
    y = run_sparse(sparse, x, backend=backend)
    assert_close(y, lin.bias.detach().expand(3, 16))
    no_bias = SparseLinear.from_dense(make_linear(32, 16, 0.0, gen, bias=False), backend=backend, format=fmt)
    assert no_bias.bias is None
    assert torch.equal(run_sparse(no_bias, x, backend=backend), torch.zeros(3, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_large_in_features_int32_indices(backend, gen):
    """More than 32768 input features: int32 column indices, still exact."""
    lin = make_linear(32769, 3, 0.001, gen)
    with torch.no_grad():
        lin.weight[1, 32768] = 2.5  # the largest column index
    sparse = SparseLinear.from_dense(lin, backend=backend, format="csr")
    assert sparse.indices.dtype == torch.int32
    for batch in (1, 3):
        x = torch.randn(batch, 32769, generator=gen)
        assert_close(run_sparse(sparse, x, backend=backend), lin(x).detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_fused_relu_flag(backend, gen):
    lin = make_linear(24, 16, 0.3, gen)
    for fmt in ("csr", "bsr8"):
        sparse = SparseLinear.from_dense(lin, backend=backend, format=fmt)
        sparse.relu = True
        for batch in (1, 5):
            x = torch.randn(batch, 24, generator=gen)
            assert_close(run_sparse(sparse, x, backend=backend), torch.relu(lin(x)).detach())
        assert "relu=True" in repr(sparse)


def test_linear_weight_property_rebuilds_dense(gen):
    lin = make_linear(24, 16, 0.3, gen, block=(8, 8))
    for fmt in ("csr", "bsr8"):
        sparse = SparseLinear.from_dense(lin, format=fmt)
        assert torch.equal(sparse.weight, lin.weight.detach())
        assert torch.equal(sparse.bias, lin.bias.detach())


# ------------------------------------------------------------------------------------ Conv2d grid
def make_conv(cin, cout, density, gen, **kw):
    conv = nn.Conv2d(cin, cout, **kw)
    return set_sparse_weight(conv, density, gen).eval()


KERNELS = [1, 3, 5, 7, (1, 3), (3, 1), (2, 3)]
STRIDES = [1, 2, (2, 1)]
PADDINGS = [0, 2, (1, 2), "same", "valid"]
GEOMETRY = [(k, s, p) for k in KERNELS for s in STRIDES for p in PADDINGS if not (p == "same" and s != 1)]


def _gid(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kernel_size,stride,padding", GEOMETRY,
                         ids=[f"k{_gid(k)}-s{_gid(s)}-p{_gid(p)}" for k, s, p in GEOMETRY])
def test_conv_geometry(kernel_size, stride, padding, engine, gen, monkeypatch):
    backend, conv_kernel = use_engine(engine, monkeypatch)
    conv = make_conv(3, 5, 0.5, gen, kernel_size=kernel_size, stride=stride, padding=padding)
    sparse = SparseConv2d.from_dense(conv, backend=backend, layer_name="conv")
    x = torch.randn(2, 3, 9, 11, generator=gen)
    y = run_sparse(sparse, x, kernel=conv_kernel)
    assert_close(y, conv(x).detach())


GROUPS = [(1, 4, 6), (2, 4, 6), (4, 4, 4), (4, 4, 8)]  # (groups, in, out): regular, grouped, depthwise, dw x2
GROUP_IDS = ["g1", "g2", "depthwise", "depthwise-x2"]
DILATIONS = [1, 2, (2, 1)]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("groups,cin,cout", GROUPS, ids=GROUP_IDS)
@pytest.mark.parametrize("dilation", DILATIONS, ids=lambda d: f"d{_gid(d)}")
def test_conv_dilation_groups_bias_padding_mode(dilation, groups, cin, cout, bias, padding_mode, engine, gen,
                                                monkeypatch):
    backend, conv_kernel = use_engine(engine, monkeypatch)
    conv = make_conv(cin, cout, 0.5, gen, kernel_size=3, padding=(2, 1), dilation=dilation, groups=groups,
                     bias=bias, padding_mode=padding_mode)
    sparse = SparseConv2d.from_dense(conv, backend=backend)
    assert sparse.has_bias is bias and (sparse.bias is None) is (not bias)
    x = torch.randn(2, cin, 8, 7, generator=gen)
    y = run_sparse(sparse, x, kernel=conv_kernel)
    assert_close(y, conv(x).detach())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_conv_same_padding_with_padding_mode(padding_mode, engine, gen, monkeypatch):
    backend, conv_kernel = use_engine(engine, monkeypatch)
    conv = make_conv(3, 4, 0.5, gen, kernel_size=(4, 3), padding="same", dilation=(1, 2), padding_mode=padding_mode)
    sparse = SparseConv2d.from_dense(conv, backend=backend)
    x = torch.randn(2, 3, 9, 8, generator=gen)
    assert_close(run_sparse(sparse, x, kernel=conv_kernel), conv(x).detach())


CONV_CONFIGS = {"k3s1p1": dict(kernel_size=3, padding=1),
                "k3s2p1-g2": dict(kernel_size=3, stride=2, padding=1, groups=2)}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"d{d:g}")
@pytest.mark.parametrize("config", list(CONV_CONFIGS))
def test_conv_density_batch(config, density, batch, engine, gen, monkeypatch):
    backend, conv_kernel = use_engine(engine, monkeypatch)
    conv = make_conv(4, 8, density, gen, **CONV_CONFIGS[config])
    sparse = SparseConv2d.from_dense(conv, backend=backend)
    assert sparse.nnz == torch.count_nonzero(conv.weight).item()
    x = torch.randn(batch, 4, 10, 9, generator=gen)
    y = run_sparse(sparse, x, kernel=conv_kernel)
    assert_close(y, conv(x).detach())


def _conv_input(layout, gen):
    if layout == "contiguous":
        return torch.randn(3, 4, 9, 8, generator=gen)
    if layout == "channels_last":
        return torch.randn(3, 4, 9, 8, generator=gen).to(memory_format=torch.channels_last)
    if layout == "transposed-hw":
        return torch.randn(3, 4, 8, 9, generator=gen).transpose(2, 3)
    if layout == "sliced":
        return torch.randn(3, 8, 18, 9, generator=gen)[:, 1::2, ::2]
    if layout == "batch-strided":
        return torch.randn(6, 4, 9, 8, generator=gen)[::2]
    if layout == "expanded":
        return torch.randn(1, 4, 9, 8, generator=gen).expand(3, 4, 9, 8)
    raise ValueError(layout)


LAYOUTS = ["contiguous", "channels_last", "transposed-hw", "sliced", "batch-strided", "expanded"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", ["k1", "k3s2p1", "k3p1-dw"])
def test_conv_input_layouts(config, layout, engine, gen, monkeypatch):
    backend, conv_kernel = use_engine(engine, monkeypatch)
    kw = {"k1": dict(kernel_size=1), "k3s2p1": dict(kernel_size=3, stride=2, padding=1),
          "k3p1-dw": dict(kernel_size=3, padding=1, groups=4)}[config]
    conv = make_conv(4, 4, 0.5, gen, **kw)
    sparse = SparseConv2d.from_dense(conv, backend=backend)
    x = _conv_input(layout, gen)
    assert layout == "contiguous" or not x.is_contiguous()
    assert_close(run_sparse(sparse, x, kernel=conv_kernel), conv(x.contiguous()).detach())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_unbatched_input(padding_mode, engine, gen, monkeypatch):
    backend, conv_kernel = use_engine(engine, monkeypatch)
    conv = make_conv(3, 5, 0.5, gen, kernel_size=3, padding=1, padding_mode=padding_mode)
    sparse = SparseConv2d.from_dense(conv, backend=backend)
    x = torch.randn(3, 7, 6, generator=gen)
    y = run_sparse(sparse, x, kernel=conv_kernel)
    assert y.shape == (5, 7, 6)
    assert_close(y, conv(x).detach())
    assert_close(run_sparse(sparse, x.transpose(1, 2), kernel=conv_kernel), conv(x.transpose(1, 2)).detach())


@pytest.mark.parametrize("engine", ENGINES)
def test_conv_all_zero_layer_and_zero_channels(engine, gen, monkeypatch):
    backend, conv_kernel = use_engine(engine, monkeypatch)
    conv = make_conv(4, 6, 0.0, gen, kernel_size=3, padding=1)
    sparse = SparseConv2d.from_dense(conv, backend=backend)
    x = torch.randn(2, 4, 5, 5, generator=gen)
    assert sparse.nnz == 0
    assert_close(run_sparse(sparse, x, kernel=conv_kernel), conv(x).detach())
    conv = make_conv(4, 6, 0.7, gen, kernel_size=3, padding=1)
    with torch.no_grad():
        conv.weight[[1, 4]] = 0          # all-zero output channels (rows)
        conv.weight[:, 2] = 0            # an input channel no weight reads (columns)
    sparse = SparseConv2d.from_dense(conv, backend=backend)
    assert_close(run_sparse(sparse, x, kernel=conv_kernel), conv(x).detach())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("residual", ["none", "same-shape", "broadcast"])
def test_conv_residual_and_relu_epilogue(residual, relu, engine, gen, monkeypatch):
    backend, conv_kernel = use_engine(engine, monkeypatch)
    conv = make_conv(4, 6, 0.5, gen, kernel_size=3, padding=1, groups=2)
    sparse = SparseConv2d.from_dense(conv, backend=backend)
    sparse.relu = relu
    x = torch.randn(2, 4, 6, 5, generator=gen)
    ref = conv(x).detach()
    r = {"none": None, "same-shape": torch.randn(ref.shape, generator=gen),
         "broadcast": torch.randn(1, 6, 1, 5, generator=gen)}[residual]
    expected = ref if r is None else ref + r
    expected = torch.relu(expected) if relu else expected
    with torch.no_grad(), sparse_guard(sparse) as guard:
        y = sparse(x, residual=r) if r is not None else sparse(x)
    assert_kernels_ran(guard, kernel=conv_kernel)
    assert_close(y, expected)
    # unbatched input with an unbatched residual
    if r is not None and residual == "same-shape":
        assert_close(sparse(x[0], residual=r[0]), expected[0])


def test_conv_chained_cnhw_outputs(gen):
    """Sparse conv -> sparse conv (1x1, 3x3 strided) -> sparse linear on the views each returns."""
    c1, c2, c3 = (make_conv(4, 8, 0.5, gen, kernel_size=3, padding=1), make_conv(8, 8, 0.5, gen, kernel_size=1),
                  make_conv(8, 6, 0.5, gen, kernel_size=3, stride=2, padding=1))
    lin = make_linear(6 * 3 * 3, 5, 0.5, gen)
    dense = nn.Sequential(c1, nn.ReLU(), c2, c3, nn.Flatten(), lin)
    sparse = nn.Sequential(*(SparseConv2d.from_dense(c) for c in (c1,)), nn.ReLU(), SparseConv2d.from_dense(c2),
                           SparseConv2d.from_dense(c3), nn.Flatten(), SparseLinear.from_dense(lin))
    for batch in (1, 3):
        x = torch.randn(batch, 4, 6, 6, generator=gen)
        assert_close(run_sparse(sparse, x, backend="numba", expected_calls=4), dense(x).detach())


def test_conv_weight_property_rebuilds_grouped_weight(gen):
    for groups, cin, cout in GROUPS:
        conv = make_conv(cin, cout, 0.5, gen, kernel_size=3, groups=groups)
        sparse = SparseConv2d.from_dense(conv)
        assert torch.equal(sparse.weight, conv.weight.detach())
        assert sparse.sparse_shape == (cout, cin * 9)


# ------------------------------------------------------------------------------------ backends and dtypes
def test_auto_backend_runs_numba_for_fp32_cpu(gen):
    lin = SparseLinear.from_dense(make_linear(16, 8, 0.5, gen))
    conv = SparseConv2d.from_dense(make_conv(2, 4, 0.5, gen, kernel_size=3))
    assert lin.backend == "auto" and lin.effective_backend() == "numba" and conv.effective_backend() == "numba"
    run_sparse(lin, torch.randn(3, 16, generator=gen), kernel="numba.csr_spmm")
    run_sparse(conv, torch.randn(1, 2, 5, 5, generator=gen), kernel=("numba.sparse_conv", "numba.im2col_conv"))


@pytest.mark.parametrize("backend", ["auto", "numba", "torch"])
def test_fp64_after_conversion(backend, gen):
    """A converted model moved to float64 runs fp64 (numba for auto) at fp64 precision."""
    lin, conv = make_linear(24, 16, 0.3, gen), make_conv(3, 4, 0.5, gen, kernel_size=3, padding=1, groups=1)
    slin = SparseLinear.from_dense(lin, backend=backend).double()
    sconv = SparseConv2d.from_dense(conv, backend=backend).to(torch.float64)
    assert slin.values.dtype == torch.float64 and slin.bias_or_zeros.dtype == torch.float64
    assert slin.indices.dtype == torch.int16 and sconv.indptr.dtype == torch.int32
    expected_backend = "torch" if backend == "torch" else "numba"
    assert slin.effective_backend() == expected_backend
    x = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    y = run_sparse(slin, x, backend=expected_backend)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, lin.double()(x).detach(), rtol=1e-12, atol=1e-12)
    xc = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    yc = run_sparse(sconv, xc, backend=expected_backend)
    torch.testing.assert_close(yc, conv.double()(xc).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fp64_layer_converts_without_precision_loss(kind, gen):
    if kind == "linear":
        dense = nn.Linear(64, 32).double()
        x = torch.randn(5, 64, generator=gen, dtype=torch.float64)
    else:
        dense = nn.Conv2d(3, 4, 3).double()
        x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(dense.weight.shape, generator=gen, dtype=torch.float64))
        dense.weight.mul_(torch.rand(dense.weight.shape, generator=gen, dtype=torch.float64) < 0.3)
        dense.bias.copy_(torch.randn(dense.bias.shape, generator=gen, dtype=torch.float64))
    cls = SparseLinear if kind == "linear" else SparseConv2d
    sparse = cls.from_dense(dense, backend="numba")
    assert sparse.values.dtype == torch.float64
    torch.testing.assert_close(run_sparse(sparse, x, backend="numba"), dense(x).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_to_dtype_converts_sparse_weights(dtype, gen):
    lin = make_linear(32, 16, 0.3, gen, block=(8, 8))
    for fmt in ("csr", "bsr8"):
        sparse = SparseLinear.from_dense(lin, format=fmt)
        idx_dtype, ptr_dtype = sparse.indices.dtype, sparse.indptr.dtype
        low = sparse.to(dtype)
        assert low is sparse
        assert sparse.values.dtype == dtype and sparse.bias_or_zeros.dtype == dtype
        assert sparse.indices.dtype == idx_dtype and sparse.indptr.dtype == ptr_dtype
        assert sparse.effective_backend() == "torch"
        assert torch.equal(sparse.values.float(), torch.from_numpy(SparseLinear.from_dense(lin, format=fmt)
                                                                   .to_format().data).to(dtype).float())
        back = sparse.float()
        assert back.values.dtype == torch.float32
        x = torch.randn(3, 32, generator=gen)
        # fp32 again after the round trip: the same kernel as before, values rounded through `dtype`
        expected = x @ lin.weight.detach().to(dtype).float().T + lin.bias.detach().to(dtype).float()
        assert_close(run_sparse(back, x, backend="numba"), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["linear-csr", "linear-bsr", "conv"])
def test_reduced_precision_through_torch_backend_on_cpu(kind, dtype, gen):
    """model.to(bf16/fp16): auto picks the torch backend (torch.sparse), output in that dtype, within
    that dtype's rounding of the dense result on the same rounded weights and input."""
    if kind == "conv":
        dense = make_conv(4, 6, 0.3, gen, kernel_size=3, padding=1, groups=2)
        sparse = SparseConv2d.from_dense(dense)
        x = torch.randn(2, 4, 5, 5, generator=gen)
        kernel = "torch.conv.csr"
    else:
        dense = make_linear(32, 16, 0.3, gen, block=(8, 8))
        sparse = SparseLinear.from_dense(dense, format="csr" if kind == "linear-csr" else "bsr8")
        x = torch.randn(3, 32, generator=gen)
        kernel = f"torch.linear.{sparse.format}"
    model = nn.Sequential(sparse).to(dtype)
    assert sparse.values.dtype == dtype and sparse.effective_backend() == "torch"
    y = run_sparse(model, x.to(dtype), kernel=kernel)
    assert y.dtype == dtype
    # fp32 math on the rounded operands, then one rounding to `dtype`
    expected = dense.to(dtype).float()(x.to(dtype).float()).detach()
    tol = 8 * torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    # and close to the dense layer run in `dtype` itself
    ref = dense.to(dtype)(x.to(dtype)).detach().float()
    torch.testing.assert_close(y.float(), ref, rtol=4 * tol, atol=4 * tol * float(ref.abs().max()))


# ------------------------------------------------------------------------------------ repr
def test_extra_repr_shows_shape_density_format_backend(gen):
    lin = SparseLinear.from_dense(make_linear(64, 48, 0.25, gen, block=(16, 16)), backend="torch", format="bsr16")
    text = repr(lin)
    for part in ("in_features=64", "out_features=48", "density=0.2500", "format=bsr", "block=16x16",
                 "backend=torch", "bias=True", "dtype=float32"):
        assert part in text, (part, text)
    lin = SparseLinear.from_dense(make_linear(10, 4, 0.5, gen), format="csr")
    assert "format=csr" in repr(lin) and "backend=auto" in repr(lin) and "density=0.5000" in repr(lin)
    conv = SparseConv2d.from_dense(make_conv(4, 8, 0.5, gen, kernel_size=(3, 5), stride=(2, 1), padding=1,
                                             groups=2), backend="numba")
    text = repr(conv)
    for part in ("4, 8", "kernel_size=(3, 5)", "stride=(2, 1)", "groups=2", "density=", "format=csr",
                 "backend=numba"):
        assert part in text, (part, text)
    density = conv.nnz / (8 * 4 * 15)
    assert f"density={density:.4f}" in text


# ------------------------------------------------------------------------------------ the guard itself
class _DenseFallbackLinear(SparseLinear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _SilentLinear(SparseLinear):
    """Computes the right answer from a dense copy kept outside the sparse buffers: no kernel runs."""

    def forward(self, x):
        return x @ self._dense.T + self.bias_or_zeros


def test_guard_catches_dense_fallbacks(gen):
    lin = make_linear(16, 8, 0.5, gen)
    fmt = CSR.from_dense(lin.weight.detach())
    x = torch.randn(2, 16, generator=gen)
    fallback = _DenseFallbackLinear(fmt, lin.bias.detach())
    with pytest.raises(_Tripwire):
        run_sparse(fallback, x)
    silent = _SilentLinear(fmt, lin.bias.detach())
    silent._dense = lin.weight.detach().clone()
    assert_close(silent(x), lin(x).detach())  # numerically right...
    with pytest.raises(AssertionError, match="expected one sparse kernel launch"):
        run_sparse(silent, x)  # ...but no sparse kernel ran
    good = SparseLinear.from_dense(lin, backend="torch")
    with pytest.raises(AssertionError, match="another backend"):
        run_sparse(good, x, backend="numba")
    # outside sparse forwards, dense layers still work under the guard
    model = nn.Sequential(lin, SparseLinear.from_dense(make_linear(8, 4, 0.5, gen)))
    run_sparse(model, x, expected_calls=1)
    assert F.linear is _F_LINEAR and F.conv2d is _F_CONV2D, "the guard must restore the dense functions"
