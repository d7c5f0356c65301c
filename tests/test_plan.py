"""Both conv algorithms, epilogue fusion, and the whole-network plan, each against dense torch."""
import numba
import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

import sparsert
from sparsert import ops
from sparsert.fuse import fuse_epilogues
from sparsert.modules import SparseConv2d, SparseLinear
from sparsert.ops import CALLS

CONV_CONFIGS = {
    "3x3": dict(kernel_size=3, padding=1),
    "3x3-s2": dict(kernel_size=3, stride=2, padding=1),
    "5x3-s(2,1)-d(1,2)": dict(kernel_size=(5, 3), stride=(2, 1), padding=(2, 2), dilation=(1, 2)),
    "1x1-s2": dict(kernel_size=1, stride=2, bias=False),
    "1x1": dict(kernel_size=1),
    "7x7-s2": dict(kernel_size=7, stride=2, padding=3),
    "depthwise": dict(kernel_size=3, padding=1, groups=8),
    "grouped-same": dict(kernel_size=3, padding="same", groups=2),
    "valid-4x4": dict(kernel_size=4, padding="valid"),
}


def _masked(module, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.mul_((torch.rand(module.weight.shape, generator=g) < density).float())
    return module


def force(monkeypatch, path):
    """Make every conv take one algorithm, whatever its size (in a plan too: grid or im2col, never the tap conv)."""
    from sparsert import plan as plan_module
    monkeypatch.setattr(plan_module, "TAP_CONV", False)
    monkeypatch.setattr(ops, "IM2COL_MAX_PIXELS", 10**9 if path == "im2col" else -1)
    for module, name in ((ops, "IM2COL_GATHER_COST"), (plan_module, "GRID_GATHER_COST")):
        monkeypatch.setattr(module, name, -float("inf") if path == "im2col" else float("inf"))


@pytest.mark.parametrize("path", ["direct", "im2col"])
@pytest.mark.parametrize("config", list(CONV_CONFIGS), ids=list(CONV_CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_paths_match_dense(monkeypatch, path, config, batch):
    force(monkeypatch, path)
    torch.manual_seed(0)
    conv = _masked(nn.Conv2d(8, 16, **CONV_CONFIGS[config]), 0.3)
    layer = SparseConv2d.from_dense(conv)
    x = torch.randn(batch, 8, 13, 11)
    residual = torch.randn_like(conv(x))
    name = "numba.im2col_conv" if path == "im2col" else "numba.sparse_conv"
    before = CALLS[name]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
        layer.relu = True  # fused epilogue: relu(conv(x) + residual)
        torch.testing.assert_close(layer(x, residual=residual), torch.relu(conv(x) + residual), rtol=1e-5, atol=1e-5)
    assert CALLS[name] == before + 2


@pytest.mark.parametrize("path", ["direct", "im2col"])
def test_conv_paths_on_channels_last_and_strided_input(monkeypatch, path):
    force(monkeypatch, path)
    conv = _masked(nn.Conv2d(6, 5, 3, padding=1), 0.4)
    layer = SparseConv2d.from_dense(conv)
    base = torch.randn(2, 6, 10, 18)
    for x in (base.to(memory_format=torch.channels_last), base[:, :, :, ::2], base.transpose(2, 3)):
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


def _pruned(model, amount=0.9, example=None):
    if example is not None:
        model.train()
        with torch.no_grad():  # non-trivial BatchNorm statistics, so folding is really exercised
            model(example)
    model.eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            prune.l1_unstructured(m, "weight", amount)
            prune.remove(m, "weight")
    return model


def test_fusion_puts_relu_and_residual_in_the_epilogue():
    model = _pruned(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Block(8)),
                    example=torch.randn(4, 3, 16, 16))
    sparse = sparsert.sparsify(model)
    assert isinstance(sparse, torch.fx.GraphModule)
    assert sparse.get_submodule("0").relu and sparse.get_submodule("2.conv1").relu
    conv2 = [n for n in sparse.graph.nodes if n.target == "2.conv2"][0]
    assert "residual" in conv2.kwargs and sparse.get_submodule("2.conv2").relu
    assert not any(n.op == "call_module" and isinstance(sparse.get_submodule(n.target), (nn.ReLU, nn.BatchNorm2d))
                   for n in sparse.graph.nodes)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-4, atol=1e-5)


def test_broadcast_residual_is_not_fused_into_the_kernel():
    class BiasAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("shift", torch.randn(1, 4, 1, 1))

        def forward(self, x):
            return torch.relu(self.conv(x) + self.shift)

    model = _pruned(BiasAdd(), 0.8)
    sparse = sparsert.sparsify(model)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-5)


def test_module_called_twice_is_not_fused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))  # the ReLU follows only the first call

    model = _pruned(Shared(), 0.8)
    model.fc.bias.data.normal_()
    sparse = sparsert.sparsify(model)
    assert not sparse.get_submodule("fc").relu
    x = torch.randn(5, 16)
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-5)


def test_fuse_keeps_untraceable_models_as_they_are():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -x  # data-dependent: fx cannot trace

    model = Branchy()
    with pytest.warns(UserWarning, match="could not trace"):
        assert fuse_epilogues(model) is model


def _models():
    torch.manual_seed(0)
    yield "resnet18", lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)
    yield "cifar_resnet18", sparsert.models.cifar_resnet18, (3, 32, 32)
    yield "mlp", lambda: sparsert.models.mlp((32, 64, 64, 10)), (32,)


@pytest.mark.parametrize("name,factory,shape", list(_models()), ids=[m[0] for m in _models()])
@pytest.mark.parametrize("batch", [1, 5, 20])  # 20: batch-in-lanes, 12 of its 32 lanes spare
def test_plan_runs_whole_network_and_matches_dense(name, factory, shape, batch):
    torch.manual_seed(0)
    model = factory()
    model.train()
    with torch.no_grad():
        model(torch.randn(4, *shape))
    model.eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            prune.l1_unstructured(m, "weight", 0.95)
    sparse = sparsert.sparsify(model)
    x = torch.randn(batch, *shape)
    plan = sparse.plan_for(x)
    assert plan is not None
    out = _run_on_nan_arena(sparse, x)  # nothing may read arena memory its op did not write (grid borders, padding)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_plan_falls_back_to_eager_where_it_cannot_run():
    model = _pruned(nn.Sequential(nn.Linear(32, 64), nn.Sigmoid(), nn.Linear(64, 8)))
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(3, 32)
    assert sparse.plan_for(x) is None  # Sigmoid is not a plan op
    before = CALLS["numba.plan"]
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-5)
    assert CALLS["numba.plan"] == before
    assert sparse.plan_for(torch.randn(3, 32, dtype=torch.float64)) is None
    assert sparse.plan_for(torch.randn(3, 32, requires_grad=True)) is None


def test_plan_is_rebuilt_after_the_weights_move():
    model = _pruned(sparsert.models.mlp((32, 64, 10)))
    sparse = sparsert.sparsify(model)
    x = torch.randn(2, 32)
    first = sparse.plan_for(x)
    assert first is not None and sparse.plan_for(x) is first
    sparse = sparse.to(torch.float64)
    torch.testing.assert_close(sparse(x.double()), model.double()(x.double()), rtol=1e-9, atol=1e-9)
    sparse = sparse.to(torch.float32)
    assert sparse.plan_for(x) is not first
    torch.testing.assert_close(sparse(x), model.float()(x), rtol=1e-5, atol=1e-5)


def test_relu_keeps_nan_like_torch():
    lin = nn.Linear(4, 3)
    layer = SparseLinear.from_dense(lin)
    layer.relu = True
    x = torch.tensor([[float("nan"), 1.0, 2.0, 3.0]])
    assert torch.isnan(layer(x)).all() == torch.isnan(torch.relu(lin(x))).all()


def test_plan_runs_layers_kept_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 7 * 7, 10)).eval()
    for m in (model[0], model[5]):
        prune.l1_unstructured(m, "weight", 0.9)
    sparse = sparsert.sparsify(model)  # model[2] stays dense: it was not pruned
    assert isinstance(sparse.get_submodule("2"), nn.Conv2d)
    x = torch.randn(2, 3, 16, 16)
    assert sparse.plan_for(x) is not None
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-4, atol=1e-5)


def test_measured_decision_keeps_layers_dense_when_sparse_is_slower(monkeypatch):
    from sparsert import convert

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    for m in (model[0], model[2]):
        prune.l1_unstructured(m, "weight", 0.9)
    # Timing is the machine's business; the decision logic is ours: make layer "2" lose.
    monkeypatch.setattr(convert, "_time_pair",
                        lambda dense, sparse, x: (1.0, 2.0) if sparse.layer_name == "2" else (2.0, 1.0))
    x = torch.randn(4, 64)
    sparse = sparsert.sparsify(model, example_inputs=x, fuse=False)  # per-layer choice only
    assert isinstance(sparse.get_submodule("0"), SparseLinear)
    assert type(sparse.get_submodule("2")) is nn.Linear
    assert sparse.get_submodule("0").measured == dict(dense_ms=2.0, sparse_ms=1.0)
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("min_sparsity,timed", [(None, {"0", "2"}), (0.7, {"2"})])
def test_measured_mode_times_layers_the_rule_would_skip(monkeypatch, min_sparsity, timed):
    """Without an explicit min_sparsity, example inputs make every layer >= MEASURE_MIN_SPARSITY a
    candidate (a 50%-sparse layer can measure faster sparse); an explicit threshold still applies."""
    from sparsert import convert

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    prune.l1_unstructured(model[0], "weight", 0.5)
    prune.l1_unstructured(model[2], "weight", 0.9)
    seen = set()

    def fake_pair(dense, sparse, x):
        seen.add(sparse.layer_name)
        return 2.0, 1.0

    monkeypatch.setattr(convert, "_time_pair", fake_pair)
    sparse = sparsert.sparsify(model, example_inputs=torch.randn(4, 64), fuse=False, min_sparsity=min_sparsity)
    assert seen == timed
    assert isinstance(sparse.get_submodule("0"), SparseLinear) == ("0" in timed)
    assert convert.MEASURE_MIN_SPARSITY < 0.5 < convert.DEFAULT_MIN_SPARSITY


def test_plan_stores_indices_in_uint16_when_they_fit():
    from sparsert.plan import _Builder

    b = _Builder()
    small, flag_small = b.indices(np.array([0, 7, 65535], np.int32))
    big, flag_big = b.indices(np.array([3, 65536], np.int64))
    assert (flag_small, flag_big) == (1, 0)
    assert b.u16[0].dtype == np.uint16 and b.u16[0].tolist() == [0, 7, 65535]
    assert b.u32[-1].tolist() == [3, 65536]


def test_plan_integer_pools_refuse_values_they_cannot_hold():
    """A cast to uint32/uint16/uint8 would wrap silently; the builder raises Unsupported instead, so the
    model runs eagerly (slower, never wrong)."""
    from sparsert.plan import Unsupported, _Builder

    b = _Builder()
    assert b.weights_u32(np.array([0, 2**32 - 1], np.int64)) == 0
    with pytest.raises(Unsupported, match=r"u32 weight pool: values in \[0, 4294967296\] do not fit uint32"):
        b.weights_u32(np.array([0, 2**32], np.int64))
    with pytest.raises(Unsupported, match="u32 weight pool: values in \\[-1, 3\\]"):
        b.weights_u32(np.array([-1, 3], np.int64))
    with pytest.raises(Unsupported, match="do not fit uint8"):
        b.weights_u8(np.array([256], np.int64))
    assert b.n_u32 == 2 and b.n_u8 == 0  # nothing half-stored
    assert b.weights_f32(np.array([-1.5], np.float32)) == 0  # float pools take any value


def test_plan_runs_a_linear_wider_than_uint16_indices():
    torch.manual_seed(0)
    model = _pruned(nn.Sequential(nn.Linear(70_000, 4)), 0.99)
    sparse = sparsert.sparsify(model)
    x = torch.randn(3, 70_000)
    plan = sparse.plan_for(x)
    assert plan is not None and plan.u16.size == 1  # nothing fit u16 but the placeholder
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-4, atol=1e-5)


def test_model_with_no_sparse_layer_runs_eagerly():
    """Nothing to gain from the plan without a sparse layer: torch's dense kernels beat our CSR-full ones."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4)).eval()
    sparse = sparsert.sparsify(model)  # unpruned: every layer stays dense
    x = torch.randn(2, 3, 8, 8)
    assert sparse.plan_for(x) is None
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule_ms,dense_ms,measured_ms,expected", [
    (1.5, 1.0, 0.95, "dense"), (1.5, 1.0, 0.85, "measured"),  # a sparse model must beat dense by AUTO_MIN_GAIN
    (1.0, 2.0, 0.95, "rule"), (1.0, 2.0, 0.85, "measured")])  # ... and the per-layer one the rule's by as much
def test_example_inputs_pick_a_model_only_where_it_wins_by_the_margin(monkeypatch, rule_ms, dense_ms, measured_ms,
                                                                      expected):
    from sparsert import convert

    model = _pruned(sparsert.models.mlp((32, 64, 10)))
    x = torch.randn(3, 32)
    monkeypatch.setattr(convert, "_time_pair", lambda dense, sparse, x: (2.0, 1.0))
    monkeypatch.setattr(convert, "_time_models", lambda models, args, **timing:
                        {"measured": measured_ms, "rule": rule_ms, "dense": dense_ms})
    assert sparsert.sparsify(model, example_inputs=x).sparsert_choice["choice"] == expected


def test_bare_layer_is_converted():
    lin = nn.Linear(32, 16)
    prune.l1_unstructured(lin, "weight", 0.9)
    sparse = sparsert.sparsify(lin)
    assert isinstance(sparse, SparseLinear)
    x = torch.randn(3, 32)
    torch.testing.assert_close(sparse(x), lin(x), rtol=1e-5, atol=1e-6)


def test_wrong_input_shape_raises_the_layer_error_quietly(capsys):
    model = _pruned(sparsert.models.mlp((64, 32, 10)))
    sparse = sparsert.sparsify(model)
    with pytest.raises(ValueError, match=r"input has 48 features, layer expects 64"):
        sparse(torch.randn(2, 48))
    assert "Traceback" not in capsys.readouterr().err


def test_load_state_dict_refreshes_taps_and_plans():
    torch.manual_seed(0)
    a = _pruned(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)), 0.7)
    b = _pruned(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)), 0.7)
    sparse_a, sparse_b = sparsert.sparsify(a), sparsert.sparsify(b)
    x = torch.randn(2, 4, 6, 6)
    sparse_a(x), sparse_a.get_submodule("0")(x)  # build the plan and the eager caches first
    sparse_a.load_state_dict(sparse_b.state_dict())  # same nnz count, different positions and values
    torch.testing.assert_close(sparse_a(x), b(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_a.get_submodule("0")(x), b[1](b[0](x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("winner", ["measured", "rule", "dense"])
def test_example_inputs_return_the_fastest_whole_model(monkeypatch, winner):
    from sparsert import convert

    model = _pruned(sparsert.models.mlp((32, 64, 10)))
    monkeypatch.setattr(convert, "_time_models",
                        lambda models, args, **timing: {name: 1.0 if name == winner else 2.0 for name in models})
    x = torch.randn(3, 32)
    chosen = sparsert.sparsify(model, example_inputs=x)
    assert chosen.sparsert_choice["choice"] == winner
    has_sparse = any(isinstance(m, SparseLinear) for m in chosen.modules())
    if winner != "measured":  # the measured candidate's layers depend on real per-layer timings
        assert has_sparse == (winner == "rule")
    torch.testing.assert_close(chosen(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["resnet18", "mlp"])
def test_torch_backend_matches_dense_on_resnet18_and_mlp(name, dtype):
    """The torch.sparse path (the CUDA code, run here on CPU tensors) on the issue's models."""
    torch.manual_seed(0)
    if name == "resnet18":
        model, x = torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)
        model.train()
        with torch.no_grad():
            model(torch.randn(4, 3, 32, 32))
    else:
        model, x = sparsert.models.mlp((64, 128, 128, 10)), torch.randn(3, 64)
    model.eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            prune.l1_unstructured(m, "weight", 0.9)
            prune.remove(m, "weight")
    sparse = sparsert.sparsify(model, backend="torch").to(dtype)
    before = sum(v for k, v in CALLS.items() if k.startswith("torch."))
    with torch.no_grad():
        out = sparse(x.to(dtype)).float()
        ref = model.to(torch.float64)(x.double()).float()
    assert sum(v for k, v in CALLS.items() if k.startswith("torch.")) > before
    scale = ref.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * scale)
    else:  # bf16 keeps 8 bits of mantissa: ~1% per op, a few ops deep
        torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2 * scale)


# ------------------------------------------------------------------------------- grid activations
class _GridNet(nn.Module):
    """Every grid transition: same convs (3x3, 1x1, grouped) grid to grid with fused ReLU and
    residual, a strided conv reading a grid and writing one, a strided 1x1 downsample, an unfused add
    of a grid and a dense tensor, then dense-only readers (maxpool, flatten, linear)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(8, 16, 1, stride=2)
        self.d = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.fc = nn.Linear(16 * 17 * 17, 5)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = torch.relu(self.b(y) + y)
        y = self.c(y)
        z = torch.relu(self.down(y))
        z = self.d(z) + self.skip(y)
        z = z + self.pool(z)
        return self.fc(torch.flatten(z, 1))


def _grid_ops(plan):
    from sparsert.kernels import executor as ex
    codes = plan.ops[:, 0].tolist()
    grid_out_convs = [row for row in plan.ops if row[0] == ex.CONV and row[2 + 22]]
    packs_from_grid = [row for row in plan.ops if row[0] == ex.PACK and row[2 + 13]]
    return codes.count(ex.GRID_CONV), len(grid_out_convs), len(packs_from_grid)


@pytest.mark.parametrize("private", [True, False])
@pytest.mark.parametrize("shifted", [True, False])
def test_small_gathers_before_a_parallel_product_run_once_per_thread(monkeypatch, private, shifted):
    """plan.PRIVATE_GATHER: a 3x3 conv on a 4x4 map at batch 1 whose gather is below PARALLEL_MIN_WORK and whose
    product is above it runs as one GATHER_GEMM op (each thread gathers its own copy of the columns) with more
    than one thread, else as IM2COL + CONV_GEMM; both match torch over a NaN arena. plan.SHIFTED_GATHER: the
    gathers move shifted rows (the ops' shift flag), or look each value up; the same outputs either way."""
    from sparsert import plan as plan_module
    from sparsert.kernels import executor as ex
    force(monkeypatch, "im2col")
    monkeypatch.setattr(plan_module, "PRIVATE_GATHER", private)
    monkeypatch.setattr(plan_module, "SHIFTED_GATHER", shifted)
    torch.manual_seed(0)
    model = nn.Sequential(_masked(nn.Conv2d(128, 128, 3, padding=1), 0.1), nn.ReLU(),
                          _masked(nn.Conv2d(128, 64, 3, padding=1), 0.1)).eval()
    x = torch.randn(1, 128, 4, 4)
    assert 128 * 9 * 16 < ops.PARALLEL_MIN_WORK <= 0.1 * 128 * 128 * 9 * 16 * 0.9
    ops_ = sparsert.sparsify(model).plan_for(x).ops
    codes = ops_[:, 0].tolist()
    if private and numba.config.NUMBA_NUM_THREADS > 1:
        assert codes.count(ex.GATHER_GEMM) == 2 and ex.IM2COL not in codes
        assert [row[2 + 19] for row in ops_ if row[0] == ex.GATHER_GEMM] == [int(shifted)] * 2
    else:
        assert codes.count(ex.IM2COL) == 2 and ex.GATHER_GEMM not in codes
        assert [row[2 + 8] for row in ops_ if row[0] == ex.IM2COL] == [int(shifted)] * 2
    torch.testing.assert_close(_run_on_nan_arena(sparsert.sparsify(model), x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw,kernel,padding,gathers", [(1, 3, 1, 0), (2, 1, 0, 0), (2, 3, 1, 1), (1, 1, 0, 0)])
def test_a_conv_whose_pixels_read_themselves_takes_its_columns_from_the_input(monkeypatch, hw, kernel, padding,
                                                                              gathers):
    """A 3x3 conv on a 1x1 map (only its centre tap reads the input) or a 1x1 conv on a small map needs no
    gather: its product reads the input as it lies (torchvision resnet18's layer 4 at batch 1). A 2x2 map's 3x3
    conv still gathers. All match torch over a NaN arena, the residual and ReLU included."""
    from sparsert.kernels import executor as ex
    force(monkeypatch, "im2col")
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = _masked(nn.Conv2d(96, 96, kernel, padding=padding), 0.3)

        def forward(self, x):
            return torch.relu(self.conv(x) + x)

    model = Block().eval()
    x = torch.randn(1, 96, hw, hw)
    codes = sparsert.sparsify(model).plan_for(x).ops[:, 0].tolist()
    assert codes.count(ex.IM2COL) + codes.count(ex.GATHER_GEMM) == gathers
    assert codes.count(ex.CONV_GEMM) + codes.count(ex.GATHER_GEMM) == 1
    torch.testing.assert_close(_run_on_nan_arena(sparsert.sparsify(model), x), model(x), rtol=1e-4, atol=1e-4)


def test_plan_runs_small_stride1_maps_on_the_grid_where_eager_takes_im2col(monkeypatch):
    """plan.GRID_GATHER_COST: a 10%-dense 64-channel 3x3 conv on an 8x8 map at batch 1 (torchvision resnet18's
    layer1 on 32x32 input) runs grid to grid in a plan, where the eager op's cost model picks im2col (the grid
    conv reads its taps in place; its im2col gathers ran 1.3x slower whole calls on Zen 4)."""
    from sparsert import plan as plan_module
    from sparsert.kernels import executor as ex
    monkeypatch.setattr(plan_module, "TAP_CONV", False)  # which takes these maps first
    conv = _masked(nn.Conv2d(64, 64, 3, padding=1), 0.1)
    model = nn.Sequential(conv, nn.ReLU(), _masked(nn.Conv2d(64, 64, 3, padding=1), 0.1)).eval()
    x = torch.randn(1, 64, 8, 8)
    assert ops.uses_im2col(1, 8, 8, 10, 10, 64, 0.1)
    assert not ops.uses_im2col(1, 8, 8, 10, 10, 64, 0.1, plan_module.GRID_GATHER_COST)
    sparse = sparsert.sparsify(model)
    codes = sparse.plan_for(x).ops[:, 0].tolist()
    assert codes.count(ex.GRID_CONV) == 2 and ex.IM2COL not in codes
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_grid_path_matches_dense_through_every_layout_transition(batch):
    torch.manual_seed(0)
    model = _GridNet().eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            _masked(m, 0.3)
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(batch, 3, 34, 34)  # 34x34 and 17x17 maps at 30% density: the direct paths run
    plan = sparse.plan_for(x)
    assert plan is not None
    grid_convs, grid_out_convs, packs_from_grid = _grid_ops(plan)
    assert grid_convs == 4  # a, b, c, d
    assert grid_out_convs >= 1  # down feeds d, so it writes a grid (skip takes d's output as its residual)
    assert packs_from_grid >= 2  # down and skip read c's grid output through PACK
    # every border a kernel fails to write would show as NaN
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


def test_grid_borders_stay_zero_over_a_nan_filled_arena():
    """Border cells compute from neighbouring images and the guard floats, which hold whatever the arena
    held: the mask must write exact zeros there, or garbage (here NaN everywhere) would leak into the
    next conv's padding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).eval()
    for m in model:
        if isinstance(m, nn.Conv2d):
            _masked(m, 0.5)
    sparse = sparsert.sparsify(model, min_sparsity=0.3)
    x = torch.randn(3, 2, 17, 17)
    plan = sparse.plan_for(x)
    assert _grid_ops(plan)[0] == 2
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


def test_grid_conv_as_the_last_layer_returns_dense_nchw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1)).eval()
    _masked(model[0], 0.4)
    sparse = sparsert.sparsify(model, min_sparsity=0.3)
    x = torch.randn(2, 3, 20, 20)
    assert _grid_ops(sparse.plan_for(x))[0] == 1
    with torch.no_grad():
        out = sparse(x)
    assert out.shape == (2, 6, 20, 20)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- batch-in-lanes activations
def _lane_convs(plan):
    """Convs run on lanes. A conv split into regions is several LANE_CONV ops; its first starts at output cell
    (0, 0) (first output cell, param 22, one row plus one cell past the plane's start; param 24: cells per row).
    A conv fused with its max pool is one LANE_CONV_MAXPOOL op."""
    from sparsert.kernels import executor as ex
    return sum(1 for row in plan.ops if (row[0] == ex.LANE_CONV and row[2 + 22] == row[2 + 24] + 1)
               or row[0] == ex.LANE_CONV_MAXPOOL)


def _run_on_nan_arena(sparse, x):
    """Call through the plan over an arena full of NaN: any cell or lane an op reads without some op
    having written it shows up in the result."""
    from sparsert.plan import aligned_empty
    plan = sparse.plan_for(x)
    plan._arena = aligned_empty(plan.arena_size)
    plan._arena[:] = np.nan
    before = CALLS["numba.plan"]
    with torch.no_grad():
        out = sparse(x)
    assert CALLS["numba.plan"] == before + 1
    return out


class _ConvResidual(nn.Module):
    """relu(conv(x) + skip(x)), both convs of one geometry: the add fuses into one conv's epilogue."""

    def __init__(self, **config):
        super().__init__()
        self.conv = _masked(nn.Conv2d(8, 16, **config), 0.3)
        self.skip = _masked(nn.Conv2d(8, 16, **config), 0.3, seed=1)

    def forward(self, x):
        return torch.relu(self.conv(x) + self.skip(x))


def _force_region_grid(monkeypatch):
    """Every lanes conv whose map has pixels with fewer live taps runs as the grid of regions (`lane_regions`),
    however narrow or many: cost by work alone, any saving enough."""
    from sparsert import plan as plan_module
    monkeypatch.setattr(plan_module, "LANE_REGION_GAIN", 1.0)
    monkeypatch.setattr(plan_module, "LANE_STRIDED_REGION_GAIN", 1.0)
    monkeypatch.setattr(plan_module, "LANE_STRIP_EXPONENT", 0.0)
    monkeypatch.setattr(plan_module, "LANE_MAX_REGIONS", 10 ** 6)


@pytest.mark.parametrize("kernel", ["strips", "unrolled"])
@pytest.mark.parametrize("regions", ["by-gain", "always"])
@pytest.mark.parametrize("config", list(CONV_CONFIGS), ids=list(CONV_CONFIGS))
@pytest.mark.parametrize("batch", [16, 20, 40, 64])
def test_lane_conv_matches_dense(config, batch, regions, kernel, monkeypatch):
    """Every conv geometry through the lanes kernels (the strip kernels, and the unrolled code where the plan
    takes it: these 13x11 maps at 30% density), with fused bias, residual and ReLU; batch 20 leaves
    12 spare lanes. The 7x7 pad-3 input is converted with a 3-cell border. "always": every conv whose
    map has edge pixels with fewer live taps is split into regions (`lane_regions`), however many.
    Convs strided along the row run two cells a gapped strip at 16, 32 and 64 lanes (not 48: batch 40), or on
    AVX-512 two rows' wide strips (pairs of cells where a segment or a row is left over: 13 x 11 maps)."""
    from sparsert import plan as plan_module
    if regions == "always":
        _force_region_grid(monkeypatch)
    monkeypatch.setattr(plan_module, "UNROLLED_CONV", int(kernel == "unrolled"))
    if batch == 40:  # 40 lanes in one plan (split, each share would have 20: batch 20's geometry)
        monkeypatch.setattr(plan_module, "SPLIT_MIN_SHARE", 32)
    torch.manual_seed(0)
    model = _ConvResidual(**CONV_CONFIGS[config]).eval()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(batch, 8, 13, 11)
    plan = sparse.plan_for(x)
    assert _lane_convs(plan) == 2
    from sparsert.kernels import executor as ex
    unrolled = plan.ops[plan.ops[:, 0] == ex.LANE_CONV][:, 2 + 30] >= 0
    if kernel == "strips":
        assert not unrolled.any()
    elif config != "depthwise":  # (whose block-diagonal weights, ~4% dense, unroll only in a corner region or two)
        assert unrolled.all()
    cells_per_strip = {int(row[2 + 14]) for row in plan.ops if row[0] == ex.LANE_CONV}
    item_rows = {int(row[2 + 29]) for row in plan.ops if row[0] == ex.LANE_CONV}
    if kernel == "strips" and CONV_CONFIGS[config].get("stride", 1) in (2, (2, 2)):
        lanes = {int(row[2 + 13]) for row in plan.ops if row[0] == ex.LANE_CONV}.pop()  # (a split batch's share)
        if batch == 40:
            assert cells_per_strip == {1} and item_rows == {1}
        elif plan_module.LANE_STRIDED_ITEM_ROWS == 2:  # two rows' wide strips, cells two input cells apart
            assert cells_per_strip == {plan_module.lane_strip_cells(lanes)} and item_rows == {2}
        else:
            assert cells_per_strip == {2} and item_rows == {1}
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


class _LaneNet(nn.Module):
    """A ResNet's pieces on lanes: stem with fused ReLU, maxpool, a residual block, a strided conv with a
    1x1 downsample, a conv kept dense, an unfused add with a ReLU, average pool and a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 5, stride=2, padding=2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(16, 32, 1, stride=2, bias=False)
        self.dense = nn.Conv2d(32, 32, 3, padding=1)  # left unpruned: stays dense
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(self.b(torch.relu(self.a(x))) + x)
        y = self.down(x) + self.skip(x)
        y = torch.relu(y + self.dense(y))
        return self.fc(torch.flatten(self.avg(y), 1))


def _masked_but(model, dense: str, density: float):
    """model (eval) with every Conv2d and Linear but the one named `dense` masked to `density`."""
    model = model.eval()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name != dense:
            _masked(m, density)
    return model


def kernels_avx512():
    from sparsert import kernels
    return kernels.AVX512


def _lane_net(density=0.3):
    torch.manual_seed(0)
    return _masked_but(_LaneNet(), "dense", density)


@pytest.mark.parametrize("regions", ["by-gain", "always"])
@pytest.mark.parametrize("batch", [16, 33])
def test_lane_network_matches_dense_over_a_nan_arena(batch, regions, monkeypatch):
    if regions == "always":  # every conv cut into regions: ReLUs folded into all of a conv's region ops
        _force_region_grid(monkeypatch)
    model = _lane_net()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(batch, 3, 30, 26)
    assert _lane_convs(sparse.plan_for(x)) == 6  # every conv, the dense one included
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not kernels_avx512(), reason="row pairs need AVX-512's 32 registers")
@pytest.mark.parametrize("batch", [16, 33])
def test_lanes_convs_compute_rows_in_pairs_with_the_same_sums(batch, monkeypatch):
    """A lanes conv's work items cover two output rows (plan.LANE_ITEM_ROWS, LANE_STRIDED_ITEM_ROWS at stride 2,
    POOLED_ITEM_ROWS in a conv fused with its max pool: one
    row_pair_strip where both rows fill a wide strip, the rows one by one elsewhere: odd heights, short segments). Each output is the same
    sum in the same order as with one row an item, so the two plans agree bit for bit, over a NaN arena. (The strip
    kernels: the unrolled code, which these maps would take, has no row items.)"""
    from sparsert import plan as plan_module
    from sparsert.kernels import executor as ex
    monkeypatch.setattr(plan_module, "UNROLLED_CONV", 0)
    model = _lane_net()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(batch, 3, 30, 26)
    paired = sparse.plan_for(x)
    convs = paired.ops[paired.ops[:, 0] == ex.LANE_CONV]
    strided = convs[:, 2 + 10] != 1  # step_x
    stem = paired.ops[paired.ops[:, 0] == ex.LANE_CONV_MAXPOOL]  # the stride-2 stem fused with its pool
    if batch == 16:  # (48 lanes, batch 33: a wide strip holds 2 cells, 96 lanes: never a whole 8-vector one)
        assert (convs[~strided, 2 + 29] == 2).any() and (convs[strided, 2 + 29] == 2).any()
        assert len(stem) == 1 and stem[0, 2 + 28] == 2  # (POOLED_ITEM_ROWS: 15 rows, 13 cells of 16 lanes)
    out = _run_on_nan_arena(sparse, x)
    sparse.__dict__["_plans"].clear()
    monkeypatch.setattr(plan_module, "LANE_ITEM_ROWS", 1)
    monkeypatch.setattr(plan_module, "LANE_STRIDED_ITEM_ROWS", 1)
    single = sparse.plan_for(x)
    assert (single.ops[single.ops[:, 0] == ex.LANE_CONV][:, 2 + 29] == 1).all()
    assert torch.equal(_run_on_nan_arena(sparse, x), out)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    # The fused stem one row at a time: its lone rows' 16-lane cells go two to a gapped strip, whose 2 accumulator
    # sets sum in another order than the pair strip's one, so the same within rounding.
    sparse.__dict__["_plans"].clear()
    monkeypatch.setattr(plan_module, "POOLED_ITEM_ROWS", 1)
    single = sparse.plan_for(x)
    assert (single.ops[single.ops[:, 0] == ex.LANE_CONV_MAXPOOL][:, 2 + 28] == 1).all()
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), out, rtol=1e-5, atol=1e-5)


def test_every_op_names_the_layer_it_was_lowered_from(monkeypatch):
    """Plan.op_layers (bench/profile_plan.py's layer column): one label per op row, a conv cut into regions
    labelling all of its ops with its own name, and only the graph's own module and node names used."""
    from sparsert.kernels import executor as ex
    _force_region_grid(monkeypatch)
    sparse = sparsert.sparsify(_lane_net(), min_sparsity=0.5)
    plan = sparse.plan_for(torch.randn(16, 3, 30, 26))
    assert len(plan.op_layers) == plan.ops.shape[0]
    assert plan.op_layers[0] == "input" and plan.ops[0, 0] == ex.NCHW_TO_CNHW
    lane_conv_layers = [name for name, code in zip(plan.op_layers, plan.ops[:, 0]) if code == ex.LANE_CONV]
    convs = {"stem", "a", "b", "down", "skip", "dense"}
    assert set(lane_conv_layers) == convs
    assert len(lane_conv_layers) > len(convs)  # regions: several ops under one conv's name
    graph_names = {n.target if n.op == "call_module" else n.name for n in sparse.graph.nodes}
    assert set(plan.op_layers) - {"input", "output"} <= graph_names
    assert [name for name, code in zip(plan.op_layers, plan.ops[:, 0]) if code == ex.LINEAR_CSR] == ["fc"]


def test_split_batch_runs_each_share_serially_and_matches_dense_over_a_nan_arena(monkeypatch):
    """A batch split between threads: every op serial, each share in its own part of the arena, the shares'
    outputs joined in batch order (a swapped or doubled share differs from torch)."""
    from sparsert import plan as plan_module
    monkeypatch.setattr(plan_module, "batch_parts", lambda shape: 2)
    monkeypatch.setattr(plan_module, "SPLIT_MIN_ARENA_PER_WEIGHT", 0.0)
    model = _lane_net()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(64, 3, 30, 26)
    plan = sparse.plan_for(x)
    assert (plan.parts, plan.input_shape, plan.arena_size) == (2, tuple(x.shape), 2 * plan.part_len)
    assert not plan.ops[:, 1].any()  # one thread per share: no op launches threads of its own
    assert _lane_convs(plan) == 6  # a 32-image share still runs batch-in-lanes
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_run_on_nan_arena(sparse, x[:48]), model(x[:48]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("regions", ["by-gain", "always"])
def test_split_plan_runs_its_lanes_convs_depth_first_in_row_bands(regions, monkeypatch):
    """sparsert.bands: a split plan's runs of lanes convs are cut into one-row bands (BAND_BYTES 1) and interleaved,
    a conv's band running as soon as the rows it reads are written and no earlier op still reads the rows it
    writes. Every output cell is the same sum in the same order, so the result equals the unbanded plan's bit
    for bit; over a NaN arena, a band that ran before its input rows were written, overwrote rows another op had
    yet to read, or left its border rows unzeroed would show."""
    from sparsert import plan as plan_module
    from sparsert.kernels import executor as ex
    if regions == "always":  # grid regions (not whole rows) stay whole ops, and interleave with the bands
        _force_region_grid(monkeypatch)
    monkeypatch.setattr(plan_module, "batch_parts", lambda shape: 2)
    monkeypatch.setattr(plan_module, "SPLIT_MIN_ARENA_PER_WEIGHT", 0.0)
    model = _lane_net()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(64, 3, 30, 26)

    def lane_layers(plan):
        return [layer for layer, code in zip(plan.op_layers, plan.ops[:, 0]) if code == ex.LANE_CONV]

    monkeypatch.setattr(plan_module, "BAND_BYTES", 0)
    whole = sparse.plan_for(x)
    with torch.no_grad():
        expected = whole(x)
    sparse.__dict__["_plans"].clear()
    monkeypatch.setattr(plan_module, "BAND_BYTES", 1)
    banded = sparse.plan_for(x)
    assert banded is not whole and banded.parts == 2
    assert sorted(set(lane_layers(banded))) == sorted(set(lane_layers(whole)))
    if regions == "by-gain":
        layers = lane_layers(banded)
        # 8 x 7 map: one band per work item's rows (a row, or a pair of rows)
        assert layers.count("a") == 8 // plan_module.LANE_ITEM_ROWS and lane_layers(whole).count("a") == 1
        assert layers.index("b") < len(layers) - 1 - layers[::-1].index("a")  # b's first band before a's last
    assert len(lane_layers(banded)) > len(lane_layers(whole))
    out = _run_on_nan_arena(sparse, x)
    assert torch.equal(out, expected)
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    if regions == "by-gain":  # a per-op plan (one share) gets no bands: the same ops as with BAND_BYTES 0
        sparse.__dict__["_plans"].clear()
        monkeypatch.setattr(plan_module, "batch_parts", lambda shape: 1)
        per_op = lane_layers(sparse.plan_for(x))
        sparse.__dict__["_plans"].clear()
        monkeypatch.setattr(plan_module, "BAND_BYTES", 0)
        assert per_op == lane_layers(sparse.plan_for(x))


def test_lane_strips_cover_six_vectors_on_avx2_and_eight_on_avx512(monkeypatch):
    """plan.lane_strip_cells: the cells of a stride-1 lanes conv's strip fill LANE_STRIP_VECTORS vectors (6 where
    Numba targets AVX2, whose 16 registers 8 vectors' accumulators overflow; 8 on AVX-512): as many whole cells as
    fit, at least one (a 64-lane cell is 4 vectors: 1 cell on AVX2, not 2 in the spilling 8-vector strip)."""
    from sparsert import kernels
    from sparsert import plan as plan_module
    assert plan_module.LANE_STRIP_VECTORS == (8 if kernels.AVX512 else 6)
    cells = {}
    for vectors in (6, 8):
        monkeypatch.setattr(plan_module, "LANE_STRIP_VECTORS", vectors)
        cells[vectors] = [plan_module.lane_strip_cells(lanes) for lanes in (16, 32, 48, 64, 80, 128)]
    assert cells == {6: [6, 3, 2, 1, 1, 1], 8: [8, 4, 2, 2, 1, 1]}


def test_band_accesses_meet_exactly_where_their_arena_floats_do():
    """bands._meet, the schedule's dependency test, against the explicit sets of floats two accesses touch: one
    range per plane, rows first..end-1; same layout and base, or two layouts over reused arena memory."""
    import random

    from sparsert.bands import _access, _meet
    rng = random.Random(0)

    def access(base=None):
        planes, row_len, rows = rng.randint(1, 5), rng.randint(1, 6), rng.randint(1, 5)
        first = rng.randint(0, rows - 1)
        return _access(rng.randint(0, 60) if base is None else base, planes, rows * row_len + rng.randint(0, 3),
                       row_len, first, rng.randint(first + 1, rows))

    def floats(a):
        base, extent, plane, row_len, first, end = a
        return {f for p in range(extent // plane) for f in range(base + p * plane + row_len * first,
                                                                  base + p * plane + row_len * end)}

    met = 0
    for _ in range(3000):
        a = access()
        b = access(a[0] if rng.random() < 0.3 else None)
        truth = bool(floats(a) & floats(b))
        assert _meet(a, b) == truth and _meet(b, a) == truth, (a, b)
        met += truth
    assert 500 < met < 2500  # both answers well exercised


def test_zero_border_zeroes_the_border_cells_of_its_rows_only():
    """kernels.lanes._zero_border over rows y0..y1-1 (a band's): the border cells of those rows, every cell of the
    top and bottom border rows among them, nothing else."""
    from sparsert.kernels.lanes import zero_border_seq
    hq, wq, lanes = 6, 5, 16
    out = np.ones((2, hq * wq * lanes + 16), np.float32)
    zero_border_seq(out, 0, 3, hq, wq, 1, lanes)
    cells = out[:, :hq * wq * lanes].reshape(2, hq, wq, lanes)
    expected = np.ones((hq, wq), bool)
    expected[0, :] = False
    expected[1:3, 0] = expected[1:3, -1] = False
    assert (cells == expected[None, :, :, None]).all() and (out[:, hq * wq * lanes:] == 1).all()
    zero_border_seq(out, 3, hq, hq, wq, 1, lanes)
    expected[-1, :] = False
    expected[3:, 0] = expected[3:, -1] = False
    assert (cells == expected[None, :, :, None]).all()


def test_split_executor_reaches_run_plan_through_its_address_compiled_on_first_use():
    """run_plan_parts calls run_plan through a C function's address (the direct call took 44 s to compile); that C
    function is built when a split batch first runs, never at import, where it would compile every kernel."""
    import subprocess
    import sys

    from sparsert.kernels import executor as ex
    probe = ("import sparsert, sparsert.kernels.executor as ex; assert ex._run_plan_pointer == []; "
             "print(type(ex.run_plan_pointer().address).__name__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "int"
    arena = np.full(2 * 24, np.nan, np.float32)
    x = np.arange(8, dtype=np.float32)
    ops = np.zeros((1, 2 + ex.N_PARAMS), np.int64)
    ops[0, :4] = (ex.ROWS_TO_FEATURES, 0, 0, 1)  # out 0, 1 row: x's share as one feature-major column
    ops[0, 4] = 4
    empty = (np.zeros(1, np.float32), np.zeros(1, np.uint32), np.zeros(1, np.uint16), np.zeros(1, np.uint8))
    ex.run_plan_parts(ex.run_plan_pointer().address, ops, arena, 24, *empty, x, 2)
    assert np.array_equal(arena[0:4], x[:4]) and np.array_equal(arena[24:28], x[4:])  # each share in its part
    assert np.isnan(arena[4:24]).all() and np.isnan(arena[28:]).all()  # nothing else written


@pytest.mark.parametrize("shape, threads, parts", [
    ((64, 3, 32, 32), 2, 2), ((128, 3, 8, 8), 4, 4), ((64, 3, 32, 32), 1, 1),  # shares of >= 16 images
    ((32, 3, 32, 32), 2, 2), ((48, 3, 32, 32), 2, 2),                           # 16 and 24 a share
    ((48, 3, 32, 32), 4, 1), ((65, 3, 32, 32), 2, 1),                           # 12 a share; uneven
    ((64, 1024), 2, 1)])                                                        # an MLP's input
def test_batch_parts(monkeypatch, shape, threads, parts):
    from sparsert import plan as plan_module
    monkeypatch.setattr(plan_module.numba, "get_num_threads", lambda: threads)
    assert plan_module.batch_parts(shape) == parts


@pytest.mark.parametrize("ratio, parts", [(0.0, 2), (1e9, 1)])
def test_split_only_where_activations_outweigh_the_weights(monkeypatch, ratio, parts):
    from sparsert import plan as plan_module
    monkeypatch.setattr(plan_module, "SPLIT_MIN_ARENA_PER_WEIGHT", ratio)
    sparse = sparsert.sparsify(_lane_net(), min_sparsity=0.5)
    plan = plan_module.plan_for_shape(sparse, (64, 3, 30, 26), 2)
    assert plan.parts == parts and plan.ops[:, 1].any() == (parts == 1)
    with pytest.raises(ValueError, match="does not split"):
        plan_module.build_plan(sparse, (63, 3, 30, 26), 2)


@pytest.mark.parametrize("budget_images, parts_a_thread", [(10 ** 6, 1), (32, 2), (20, 4), (1, 4)])
def test_a_share_runs_in_parts_of_whole_vectors_where_its_largest_map_outgrows_the_budget(
        monkeypatch, budget_images, parts_a_thread):
    """plan.thread_parts: a thread's 64 images run as 1 part, 2 of 32 or 4 of 16 (never 8 of 8: a part keeps whole
    lane vectors), the fewest whose largest activation map fits SPLIT_MAX_MAP_BYTES (here in images' worth of
    the model's largest map), else 4 of 16; each part in its own part of the arena, outputs joined in batch order."""
    from sparsert import plan as plan_module
    from sparsert.kernels import executor as ex
    model = _lane_net()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(128, 3, 30, 26)
    sizes = [x[0].numel()]
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o[0].numel())) for m in model.modules() if m is not model]
    with torch.no_grad():
        model(x[:1])
    for hook in hooks:
        hook.remove()
    monkeypatch.setattr(plan_module, "batch_parts", lambda shape: 2)
    monkeypatch.setattr(plan_module, "SPLIT_MIN_ARENA_PER_WEIGHT", 0.0)
    monkeypatch.setattr(plan_module, "SPLIT_MAX_MAP_BYTES", budget_images * 4 * max(sizes))
    plan = sparse.plan_for(x)
    parts = 2 * parts_a_thread
    assert (plan.parts, plan.arena_size) == (parts, parts * plan.part_len)
    assert {int(row[2 + 13]) for row in plan.ops if row[0] == ex.LANE_CONV} == {128 // parts}  # lanes: a part's images
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)
    assert plan_module.thread_parts(sparse, (48, 3, 30, 26), 2) == 1  # 24 a thread: no part of whole vectors


class _ResidualOfItsInput(nn.Module):
    """relu(conv(x) + x), x read again afterwards or not: either way the conv must not write over x, which
    its own strips still read."""

    def __init__(self, read_again: bool):
        super().__init__()
        self.read_again = read_again
        self.conv = _masked(nn.Conv2d(8, 8, 3, padding=1), 0.3)
        self.stem = _masked(nn.Conv2d(8, 8, 1), 0.3, seed=1)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.conv(x) + x)
        return y + x if self.read_again else y


def _in_place_lane_convs(plan):
    from sparsert.kernels import executor as ex
    rows = plan.ops[plan.ops[:, 0] == ex.LANE_CONV, 2:]
    return int(((rows[:, 6] >= 0) & (rows[:, 3] == rows[:, 6])).sum())


def test_lane_conv_writes_over_a_residual_only_when_it_reads_it_last():
    """In place: the residual block's second conv over the block input, its last reader. Not a conv whose
    residual is its own input (read again later, or not)."""
    model = _lane_net()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(16, 3, 30, 26)
    assert _in_place_lane_convs(sparse.plan_for(x)) == 1
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)

    for read_again in (True, False):
        torch.manual_seed(0)
        model = _ResidualOfItsInput(read_again).eval()
        sparse = sparsert.sparsify(model, min_sparsity=0.5)
        assert "residual" in sparse.code
        x = torch.randn(16, 8, 9, 7)
        plan = sparse.plan_for(x)
        assert _lane_convs(plan) == 2 and _in_place_lane_convs(plan) == 0
        torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


def test_small_batches_stay_pixel_major():
    from sparsert.plan import LANE_MIN_BATCH
    model = _lane_net()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    assert _lane_convs(sparse.plan_for(torch.randn(LANE_MIN_BATCH - 1, 3, 30, 26))) == 0
    assert _lane_convs(sparse.plan_for(torch.randn(LANE_MIN_BATCH, 3, 30, 26))) == 6


def test_lane_regions_cover_the_map_once_with_their_live_taps():
    from sparsert.plan import lane_regions
    regions = lane_regions(4, 4, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    covered = np.zeros((4, 4), int)
    for y0, rows, x0, cols, live in regions:
        covered[y0:y0 + rows, x0:x0 + cols] += 1
        corner_y, corner_x = y0 in (0, 3), x0 in (0, 3)
        assert live.sum() == (2 if corner_y else 3) * (2 if corner_x else 3)
    assert (covered == 1).all() and len(regions) == 9
    # stride 2 from 4x4 to 2x2: the first output row and column read one padding tap, the second none
    regions = lane_regions(4, 4, 2, 2, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1))
    assert [int(live.sum()) for *_, live in regions] == [4, 6, 6, 9]


@pytest.mark.parametrize("map_size,lanes,stride,expected", [
    (4, 32, 1, "rows"),    # 9 grid regions would run 1-2 cell strips of 2-4 vectors: 3 full-width rows
    (2, 32, 1, "grid"),    # 4 one-cell regions with 4 live taps beat 2 rows that keep 6 (2 read the border)
    (4, 64, 1, "grid"),    # 64 lanes: a one-cell region is already a 4-vector strip
    (8, 32, 1, "whole"),   # edges save too little on 8x8
    (8, 64, 1, "whole"),
    (8, 32, 2, "whole"),   # strided: the grid only where it saves 1.3x the work
])
def test_lane_region_split_choice(map_size, lanes, stride, expected):
    from sparsert.plan import lane_region_split, lane_regions, live_taps
    n = map_size
    out = (n + 2 - 3) // stride + 1
    geometry = (n, n, out, out, (3, 3), (stride, stride), (1, 1), (1, 1, 1, 1))
    whole = (0, out, 0, out, live_taps(*geometry))
    tap_nnz = np.full(9, 100)
    cells_per_strip = max(1, 128 // lanes) if stride == 1 else 2
    regions = lane_region_split(*geometry, tap_nnz, lanes, cells_per_strip, whole)
    if expected == "whole":
        assert len(regions) == 1 and regions[0][:4] == (0, out, 0, out)
    else:
        assert [r[:4] for r in regions] == [r[:4] for r in lane_regions(*geometry, whole_rows=expected == "rows")]
        assert len(regions) > 1


def test_row_regions_read_the_zeroed_border_and_match_dense(monkeypatch):
    """A 3x3 conv on a 4x4 map at 32 lanes runs as 3 regions of whole rows: each keeps the taps that read the
    input for any of its pixels, so its edge pixels read the zero border through the others. Over a NaN-filled
    arena a border left unzeroed would show; the residual and ReLU stay fused. (The strip kernels': unrolled code
    runs the map whole, each cell skipping its border taps, test_unrolled.)"""
    from sparsert import plan as plan_module
    from sparsert.kernels import executor as ex
    monkeypatch.setattr(plan_module, "UNROLLED_CONV", 0)
    torch.manual_seed(0)
    model = _ConvResidual(kernel_size=3, padding=1).eval()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(32, 8, 4, 4)
    rows = [row[2:] for row in sparse.plan_for(x).ops if row[0] == ex.LANE_CONV]
    assert len(rows) == 6  # two convs, 3 row regions each
    assert sorted({(int(r[11]), int(r[12])) for r in rows}) == [(1, 4), (2, 4)]  # rows x cells of each region
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


def test_small_map_conv_splits_into_regions_without_padding_taps(monkeypatch):
    """A 3x3 conv on a 2x2 map reads the input through 4 taps per pixel: the strip kernels run it as 4 one-cell
    region ops, each holding only the nonzeros of its live taps, and still match torch (residual and ReLU fused)."""
    from sparsert import plan as plan_module
    from sparsert.kernels import executor as ex
    monkeypatch.setattr(plan_module, "UNROLLED_CONV", 0)
    torch.manual_seed(0)
    model = _ConvResidual(kernel_size=3, padding=1).eval()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(16, 8, 2, 2)
    plan = sparse.plan_for(x)
    rows = [row[2:] for row in plan.ops if row[0] == ex.LANE_CONV]
    assert len(rows) == 8 and _lane_convs(plan) == 2  # two convs, 4 regions each
    assert {(int(r[11]), int(r[12])) for r in rows} == {(1, 1)}  # one cell each

    def live_nnz(conv):  # output (y, x) of a 2x2 map reads taps 1-y..2-y, 1-x..2-x
        w = conv.weight.detach()
        return sorted(int((w[:, :, 1 - y:3 - y, 1 - x:3 - x] != 0).sum()) for y in (0, 1) for x in (0, 1))
    stored = sorted([sorted(int(r[19]) for r in rows[:4]), sorted(int(r[19]) for r in rows[4:])])
    assert stored == sorted([live_nnz(model.conv), live_nnz(model.skip)])
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


def test_lane_conv_sums_channel_blocks_before_the_relu(monkeypatch):
    """Force one input channel per block: every block after the first adds to the partial sums in the
    output, and the ReLU (and nothing else) waits for the last block. A ReLU applied per block, or a
    residual or bias added twice, would change the result. (The strip kernels: the unrolled code, which these maps
    would take, sums all channels in registers.)"""
    from sparsert import plan as plan_module
    monkeypatch.setattr(plan_module, "UNROLLED_CONV", 0)
    monkeypatch.setattr(plan_module, "LANE_WINDOW_BYTES", 1)
    monkeypatch.setattr(plan_module, "LANE_BLOCK_MIN_NNZ", 0.0)
    monkeypatch.setattr(plan_module, "LANE_BLOCK_STRIP_NNZ", 0)
    model = _lane_net(density=0.6)
    sparse = sparsert.sparsify(model, min_sparsity=0.3)
    x = torch.randn(16, 3, 30, 26)
    plan = sparse.plan_for(x)
    from sparsert.kernels import executor as ex
    blocks = [row[2 + 17] for row in plan.ops if row[0] == ex.LANE_CONV]
    assert max(blocks) == 32  # the dense conv's 32 input channels, one block each
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


def test_lane_maxpool_and_relu_keep_nan_like_torch():
    model = _lane_net()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(16, 3, 30, 26)
    x[3, :, 4:9, 4:9] = float("nan")
    with torch.no_grad():
        out, ref = sparse(x), model(x)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(ref[3]).all()
    torch.testing.assert_close(out[~torch.isnan(ref)], ref[~torch.isnan(ref)], rtol=1e-4, atol=1e-4)


def _pool_ops(plan):
    from sparsert.kernels import executor as ex
    codes = list(plan.ops[:, 0])
    return codes.count(ex.LANE_CONV_MAXPOOL), codes.count(ex.LANE_MAXPOOL)


@pytest.mark.parametrize("co_block", [None, 1, 3])
def test_lane_conv_computes_its_only_max_pool(co_block, monkeypatch):
    """The stem conv, whose only reader is the max pool, runs as one fused op that never writes its map to the
    arena. Work items of 1 and 3 of its 16 channels (the last item holds 1) too."""
    from sparsert import plan as plan_module
    if co_block is not None:
        monkeypatch.setattr(plan_module, "pool_co_block", lambda n_out, map_len: co_block)
    model = _lane_net()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(20, 3, 30, 26)
    plan = sparse.plan_for(x)
    assert _pool_ops(plan) == (1, 0)
    fused = next(row[2:] for row in plan.ops if row[0] == plan_module.ex.LANE_CONV_MAXPOOL)
    assert fused[25] == (co_block or plan_module.pool_co_block(16, 15 * 13 * 32))
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


class _PooledTwice(nn.Module):
    """A conv whose map two max pools read, then a conv with a residual whose map a max pool reads: neither
    conv may fuse with a pool (the first pool would leave the second nothing to read; a fused conv takes no
    residual)."""

    def __init__(self):
        super().__init__()
        self.conv = _masked(nn.Conv2d(3, 8, 3, padding=1), 0.3)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.wide = nn.MaxPool2d(2, 2)
        self.res = _masked(nn.Conv2d(8, 8, 3, padding=1), 0.3, seed=1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        z = self.pool(y) + self.wide(y)
        return self.pool(torch.relu(self.res(z) + z))


def test_lane_conv_leaves_a_shared_or_residual_map_to_the_max_pool():
    torch.manual_seed(0)
    model = _PooledTwice().eval()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(16, 3, 12, 10)
    plan = sparse.plan_for(x)
    assert _lane_convs(plan) == 2 and _pool_ops(plan) == (0, 3)
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


def test_lane_channel_block_rule():
    from sparsert.plan import LANE_BLOCK_MIN_NNZ, LANE_BLOCK_STRIP_NNZ, LANE_WINDOW_BYTES, lane_channel_block
    window = LANE_WINDOW_BYTES // (9 * 32 * 4)  # 3x3 at 32 lanes
    assert window * 9 * 0.5 >= LANE_BLOCK_STRIP_NNZ and window * 9 * 0.1 >= LANE_BLOCK_MIN_NNZ  # cases as named
    # 50% dense: a block of about L1 of input already holds enough nonzeros per row
    assert lane_channel_block(256, 9, 32, 0.5) == window
    # 10% dense: the block grows past the window until a row holds LANE_BLOCK_STRIP_NNZ nonzeros in it
    block = lane_channel_block(256, 9, 32, 0.1)
    assert block > window and (block - 1) * 9 * 0.1 < LANE_BLOCK_STRIP_NNZ <= block * 9 * 0.1
    # 2% dense: a window-sized block holds ~2.5 nonzeros per row, too few to pay a pass: one block
    assert lane_channel_block(512, 9, 32, 0.02) == 512
    assert lane_channel_block(8, 9, 32, 0.5) == 8  # never more than all channels


class _DenseThenRelu(nn.Module):
    """A conv kept dense (fuse.py leaves it alone) followed by a ReLU; with `reuse`, the pre-ReLU output
    is read again, so the ReLU must not fold into the conv."""

    def __init__(self, reuse):
        super().__init__()
        self.reuse = reuse
        self.dense = nn.Conv2d(3, 8, 3, padding=1)
        self.sparse = _masked(nn.Conv2d(8, 8, 3, padding=1), 0.2)

    def forward(self, x):
        y = self.dense(x)
        z = self.sparse(torch.relu(y))
        return z + y if self.reuse else z


@pytest.mark.parametrize("size", [12, 2])
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("reuse", [False, True])
def test_relu_folds_into_a_dense_layer_only_when_it_is_the_sole_reader(batch, reuse, size):
    """On 2x2 maps at batch 16 the dense conv runs as 4 region ops: the ReLU folds into all of them."""
    from sparsert.kernels import executor as ex
    torch.manual_seed(0)
    model = _DenseThenRelu(reuse).eval()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(batch, 3, size, size)
    plan = sparse.plan_for(x)
    assert (ex.RELU in plan.ops[:, 0].tolist()) == reuse
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


def test_live_taps_follow_the_geometry():
    from sparsert.plan import live_taps
    center = np.zeros(9, bool)
    center[4] = True
    assert (live_taps(1, 1, 1, 1, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)) == center).all()  # 1x1 map: center only
    assert live_taps(2, 2, 2, 2, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)).all()
    # stride 2 from 2x2 to 1x1: rows and columns -1 are padding, 0 and 1 are pixels
    assert live_taps(2, 2, 1, 1, (3, 3), (2, 2), (1, 1), (1, 1, 1, 1)).reshape(3, 3).tolist() == \
        [[False, False, False], [False, True, True], [False, True, True]]


@pytest.mark.parametrize("batch", [1, 16])
def test_taps_that_read_only_padding_are_dropped(batch):
    """On a 1x1 map a 3x3 'same' conv reads one live tap of nine: the plan keeps only its nonzeros (8/9
    of the work was multiplying zeros) and still matches torch."""
    from sparsert.kernels import executor as ex
    torch.manual_seed(0)
    model = nn.Sequential(_masked(nn.Conv2d(16, 32, 3, padding=1), 0.5), nn.ReLU(),
                          _masked(nn.Conv2d(32, 8, 3, padding=1), 0.5)).eval()
    sparse = sparsert.sparsify(model, min_sparsity=0.3)
    x = torch.randn(batch, 16, 1, 1)
    plan = sparse.plan_for(x)
    center_nnz = sum(int((m.weight[:, :, 1, 1] != 0).sum()) for m in model if isinstance(m, nn.Conv2d))
    nnz_param = {ex.CONV_GEMM: 9, ex.GATHER_GEMM: 15, ex.LANE_CONV: 19}
    stored = sum(row[2 + nnz_param[row[0]]] for row in plan.ops if row[0] in nnz_param)
    assert stored == center_nnz
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


def test_plan_runs_column_blocked_linear_with_fused_relu(monkeypatch):
    """A batch-64 Linear + ReLU with enough nonzeros per column block runs blocked inside the plan
    (its op carries the block count); NaN arena, against dense."""
    monkeypatch.setattr(ops, "BLOCKED_WIDTH", 100)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    prune.l1_unstructured(model[0], "weight", 0.8)  # 20 nonzeros per row and 100-column block
    sparse = sparsert.sparsify(model)
    x = torch.randn(64, 256)
    plan = sparse.plan_for(x)
    from sparsert.kernels import executor as ex
    linear_ops = plan.ops[plan.ops[:, 0] == ex.LINEAR_CSR]
    assert linear_ops[0, 2 + 16] == 3 and linear_ops[0, 2 + 5] == 1  # 256 columns in 3 blocks, ReLU fused
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


def _pruned_mlp():
    """Linear(300, 64), ReLU, Linear(64, 10), both L1-pruned to 90% with the masks baked in (seed 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    for m in model:
        if isinstance(m, nn.Linear):
            prune.l1_unstructured(m, "weight", 0.9)
            prune.remove(m, "weight")
    return model


def test_plan_runs_batch1_linears_on_the_csr_matvec_without_fast_gathers(monkeypatch):
    """Without AVX-512 (ops.SLICED_MATVEC False) a batch-1 plan's Linears are LINEAR_CSR ops, over a NaN arena."""
    from sparsert.kernels import executor as ex
    monkeypatch.setattr(sparsert.ops, "SLICED_MATVEC", False)
    model = _pruned_mlp()
    sparse = sparsert.sparsify(model)
    x = torch.randn(1, 300)
    codes = list(sparse.plan_for(x).ops[:, 0])
    assert codes.count(ex.LINEAR_CSR) == 2 and ex.LINEAR_SLICED not in codes
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-5)


def test_plan_runs_batch1_linears_on_the_sliced_matvec(monkeypatch):
    """Where the sliced matvec is chosen (AVX-512), the plan's batch-1 Linears run as LINEAR_SLICED ops (ReLU
    folded into the first), over a NaN arena, against dense; one whose rows step past 255 columns takes 2-byte
    steps."""
    from sparsert.kernels import executor as ex
    monkeypatch.setattr(sparsert.ops, "SLICED_MATVEC", True)
    model = _pruned_mlp()
    with torch.no_grad():
        model[2].weight[3] = 0
        model[2].weight[3, 0] = 1.0
        model[2].weight[3, 63] = 1.0  # steps of 63: fits
    sparse = sparsert.sparsify(model)
    x = torch.randn(1, 300)
    plan = sparse.plan_for(x)
    sliced = plan.ops[plan.ops[:, 0] == ex.LINEAR_SLICED]
    assert len(sliced) == 2 and sliced[0, 2 + 4] == 1 and sliced[1, 2 + 4] == 0
    assert sliced[0, 2 + 16] == sliced[1, 2 + 16] == 0  # 1-byte steps
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model[0].weight[5] = 0
        model[0].weight[5, 0] = model[0].weight[5, 299] = 1.0  # a step of 299 columns
    sparse = sparsert.sparsify(model)
    plan = sparse.plan_for(x)
    sliced = plan.ops[plan.ops[:, 0] == ex.LINEAR_SLICED]
    assert len(sliced) == 2 and sliced[0, 2 + 16] == 1 and sliced[1, 2 + 16] == 0
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-5)


class _BorderReaders(nn.Module):
    """Three convs: a (3x3), b (3x3) and c (1x1).
    "chain": a feeds b (3x3, whole map: reads a's zero border); b feeds only c (1x1: interior); c only the
    output. On a 1x1 map a 3x3 conv keeps its centre tap alone, which never reads the border either.
    "relu beside": y = a(x) has two readers, so relu(y) runs as its own op (elementwise over whole planes,
    border cells included) before b, which reads relu(y)'s border: a must zero y's border for it; c reads
    y's interior only."""

    def __init__(self, wiring="chain"):
        super().__init__()
        self.wiring = wiring
        self.a = _masked(nn.Conv2d(4, 8, 3, padding=1), 0.3)
        self.b = _masked(nn.Conv2d(8, 8, 3, padding=1), 0.3)
        self.c = _masked(nn.Conv2d(8, 8, 1), 0.3)

    def forward(self, x):
        y = self.a(x)
        if self.wiring == "chain":
            return self.c(torch.relu(self.b(torch.relu(y))))
        return self.b(torch.relu(y)) + self.c(y)


@pytest.mark.parametrize("size", [9, 1])
def test_lane_convs_zero_their_output_border_only_where_a_reader_reads_it(size):
    """Zeroing a border no reader reads costs memory bandwidth: a 512-channel 1x1 map at batch 64 is 8/9
    border. Over a NaN arena, an unzeroed border that some conv does read would show as NaN."""
    from sparsert.kernels import executor as ex
    torch.manual_seed(0)
    model = _BorderReaders().eval()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(16, 4, size, size)
    plan = sparse.plan_for(x)
    convs = [row for row in plan.ops if row[0] == ex.LANE_CONV]
    assert len(convs) == 3  # whole-map ops: 9x9 maps gain too little from regions, a 1x1 map has one
    zeroes = [int(row[2 + 23] != 0) for row in convs]
    assert zeroes == ([1, 0, 0] if size == 9 else [0, 0, 0])
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


class _AddBefore(nn.Module):
    """A conv kept dense stays out of fuse.py, so the add of its output runs as its own op: the sum's border is
    the inputs' borders added, and the 3x3 conv after it reads that border."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Conv2d(4, 8, 3, padding=1)
        self.sparse = _masked(nn.Conv2d(8, 8, 3, padding=1), 0.3)
        self.after = _masked(nn.Conv2d(8, 8, 3, padding=1), 0.3)

    def forward(self, x):
        y = self.dense(x)
        return self.after(self.sparse(torch.relu(y)) + y)


@pytest.mark.parametrize("make,op", [(lambda: _BorderReaders("relu beside"), "RELU"), (_AddBefore, "ADD")],
                         ids=["relu", "add"])
def test_an_elementwise_reader_keeps_its_inputs_border_zeroed(make, op):
    from sparsert.kernels import executor as ex
    torch.manual_seed(0)
    model = make().eval()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(16, 4, 9, 9)
    plan = sparse.plan_for(x)
    assert getattr(ex, op) in plan.ops[:, 0].tolist()
    assert [int(row[2 + 23] != 0) for row in plan.ops if row[0] == ex.LANE_CONV][:2] == [1, 1]
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- batch 1 on tiles
class _TileNet(nn.Module):
    """A CIFAR ResNet's first stages at batch 1: a stem kept dense, a residual block, a strided conv with a 1x1
    downsample, an unfused add with a ReLU, then a stride-2 conv to a map too small for tiles, average pool, fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)  # left unpruned: stays dense
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(16, 32, 1, stride=2, bias=False)
        self.c = nn.Conv2d(32, 32, 3, padding=1)
        self.small = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.b(torch.relu(self.a(x))) + x)
        y = self.down(x) + self.skip(x)
        y = torch.relu(y + self.c(y))
        return self.fc(torch.flatten(self.avg(torch.relu(self.small(y))), 1))


def _tile_net(density):
    torch.manual_seed(0)
    return _masked_but(_TileNet(), "stem", density)


def _tiled_convs(plan):
    """LANE_CONV ops on tiles (param 25: tiles per row of a tiled map, 0 otherwise)."""
    from sparsert.kernels import executor as ex
    return sum(1 for row in plan.ops if row[0] == ex.LANE_CONV and row[2 + 25] != 0)


@pytest.mark.parametrize("size", [(32, 32), (32, 48), (48, 32)])
def test_tiled_network_matches_dense_over_a_nan_arena(size):
    """Every conv whose map fits the tiles runs on them, also the dense stem and the strided ones; the add of two
    tiled maps keeps their halos; the stride-2 conv to an 8-pixel-wide map converts back. Over a NaN arena: a halo
    cell no op wrote would show."""
    from sparsert.kernels import executor as ex
    model = _tile_net(density=0.5)
    sparse = sparsert.sparsify(model, min_sparsity=0.3)
    x = torch.randn(1, 3, *size)
    plan = sparse.plan_for(x)
    codes = [int(row[0]) for row in plan.ops]
    assert _tiled_convs(plan) == 6 and codes.count(ex.TO_TILES) == 1 and codes.count(ex.FROM_TILES) == 1
    assert ex.GRID_CONV not in codes and ex.CONV not in codes[:codes.index(ex.FROM_TILES)]
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)


def test_plans_tile_batch_1_only_where_convs_hold_enough_nonzeros_per_channel():
    """`plan._tile_plan`: the tiled convs' nonzeros per output channel, averaged by work, against
    TILE_MIN_ROW_NNZ (16 x 9 x 0.05 = 7 a row here, 72 at half density); a batch of two never tiles."""
    x = torch.randn(1, 3, 32, 32)
    for density, tiled in ((0.5, True), (0.05, False)):
        sparse = sparsert.sparsify(_tile_net(density), min_sparsity=0.3)
        assert (_tiled_convs(sparse.plan_for(x)) > 0) is tiled
    sparse = sparsert.sparsify(_tile_net(0.5), min_sparsity=0.3)
    assert _tiled_convs(sparse.plan_for(torch.randn(2, 3, 32, 32))) == 0


@pytest.mark.parametrize("h,w,kernel,stride,pads,fits", [
    (32, 32, (3, 3), (1, 1), (1, 1, 1, 1), True),
    (32, 32, (3, 3), (2, 2), (1, 1, 1, 1), True),    # output tile 4x4 reads its 8x8 input tile and the top halo
    (32, 32, (1, 1), (2, 2), (0, 0, 0, 0), True),
    (32, 32, (7, 7), (2, 2), (3, 3, 3, 3), False),   # padding past the one-cell halo
    (32, 32, (5, 5), (1, 1), (2, 2, 2, 2), False),
    (32, 32, (4, 4), (1, 1), (0, 0, 0, 0), False),   # output 29x29 does not split into 4 tiles
    (12, 12, (3, 3), (1, 1), (1, 1, 1, 1), False),   # 3x3 tiles: under TILE_MIN_CELLS
    (30, 32, (3, 3), (1, 1), (1, 1, 1, 1), False),
])
def test_which_convs_fit_tiles(h, w, kernel, stride, pads, fits):
    from sparsert.plan import _fits_tiles
    assert _fits_tiles(h, w, kernel, stride, (1, 1), pads) is fits


def test_tiles_hold_each_pixel_once_and_their_neighbours_edges_as_halo():
    """kernels.lanes._to_tiles against a zero-padded copy of the image: frame cell (y, x) of tile (ty, tx) is
    padded pixel (ty * th + y, tx * tw + x); _from_tiles reads the interior back."""
    from sparsert.kernels.lanes import from_tiles_seq, to_tiles_par
    from sparsert.plan import tile_geometry
    g = torch.Generator().manual_seed(0)
    image = torch.randn(5, 16, 24, generator=g).numpy()
    lanes, th, tw, plane = tile_geometry(16, 24)
    tiles = np.full((5, plane), np.nan, np.float32)
    to_tiles_par(image, 4, 4, lanes, tiles)
    padded = np.pad(image, ((0, 0), (1, 1), (1, 1)))
    frames = tiles[:, :(th + 2) * (tw + 2) * lanes].reshape(5, th + 2, tw + 2, 4, 4)
    for ty in range(4):
        for tx in range(4):
            np.testing.assert_array_equal(frames[:, :, :, ty, tx],
                                          padded[:, ty * th:ty * th + th + 2, tx * tw:tx * tw + tw + 2])
    assert not np.isnan(tiles).any()
    back = np.full_like(image, np.nan)
    from_tiles_seq(tiles, 4, 4, lanes, back)
    np.testing.assert_array_equal(back, image)


@pytest.mark.parametrize("config", list(CONV_CONFIGS), ids=list(CONV_CONFIGS))
def test_tiled_conv_matches_dense_for_every_geometry_that_fits(config, monkeypatch):
    """Each conv geometry at batch 1 with tiles forced on (any density): those that fit the tiles and their halo
    (3x3 and 1x1, strided, grouped, depthwise) run tiled, with fused bias, residual and ReLU; the others do not."""
    from sparsert import plan as plan_module
    from sparsert.plan import _fits_tiles
    monkeypatch.setattr(plan_module, "TILE_MIN_ROW_NNZ", 0)
    torch.manual_seed(0)
    model = _ConvResidual(**CONV_CONFIGS[config]).eval()
    sparse = sparsert.sparsify(model, min_sparsity=0.5)
    x = torch.randn(1, 8, 32, 32)
    conv = sparse.get_submodule("conv")
    fits = _fits_tiles(32, 32, conv.kernel_size, conv.stride, conv.dilation, conv.pads)
    assert fits is (config in ("3x3", "3x3-s2", "1x1-s2", "1x1", "depthwise", "grouped-same"))
    assert _tiled_convs(sparse.plan_for(x)) == (2 if fits else 0)
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)
