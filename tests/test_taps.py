"""The batch-1 tap conv on small maps (kernels/taps.py): kernel against torch, its weight order, its plan ops."""
import numpy as np
import pytest
import torch
from torch import nn

import sparsert
from sparsert import kernels
from sparsert.formats import CSR

from test_plan import _masked, _run_on_nan_arena


def _tap_inputs(c_in, c_out, hw, density, gen, empty_row=None, dense_tap=None):
    weight = torch.randn(c_out, c_in, 3, 3, generator=gen) * (torch.rand(c_out, c_in, 3, 3, generator=gen) < density)
    if empty_row is not None:
        weight[empty_row] = 0.0
    if dense_tap is not None:  # one row whose nonzeros all sit in one tap: the other 8 sums are empty
        weight[dense_tap] = 0.0
        weight[dense_tap, :, 0, 2] = torch.randn(c_in, generator=gen)
    csr = CSR.from_dense(weight.reshape(c_out, -1))
    x = torch.randn(1, c_in, *hw, generator=gen)
    bias = torch.randn(c_out, generator=gen)
    residual = torch.randn(1, c_out, *hw, generator=gen)
    return weight, csr, x, bias, residual


@pytest.mark.parametrize("hw", kernels.TAP_MAPS)
@pytest.mark.parametrize("density", [0.0, 0.03, 0.3, 1.0])
@pytest.mark.parametrize("has_residual,relu", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("twin", ["par", "seq"])
@pytest.mark.parametrize("chans_dtype", [np.uint16, np.uint32])
def test_tap_conv_matches_torch(hw, density, has_residual, relu, twin, chans_dtype, gen):
    """Every output channel equals torch's 3x3 pad-1 conv (bias, residual, ReLU), tap sums shifted into place with
    the map's edges masked, for 1-3 nonzeros a tap up to all of them, a row with none (bias only) and a row whose
    nonzeros all sit in one corner tap; nothing outside out[C_out, H*W] is written."""
    c_in, c_out = 21, 13  # odd counts: rows of unequal nonzeros, split unevenly between threads
    weight, csr, x, bias, residual = _tap_inputs(c_in, c_out, hw, density, gen, empty_row=4, dense_tap=7)
    bounds, chans, values = kernels.tap_order(np.asarray(csr.indptr), np.asarray(csr.indices), np.asarray(csr.data))
    n_pix = hw[0] * hw[1]
    maps = x[0].reshape(c_in, n_pix).numpy().copy()
    res = residual[0].reshape(c_out, n_pix).numpy().copy()
    out = np.full((c_out + 1, n_pix), np.nan, np.float32)  # one row past C_out: must stay untouched
    run = kernels.tap_conv_par if twin == "par" else kernels.tap_conv_seq
    run(maps, bounds, chans.astype(chans_dtype), values.astype(np.float32), bias.numpy(), res, has_residual, relu,
        hw[0], hw[1], out[:c_out])
    expected = nn.functional.conv2d(x, weight, bias, padding=1) + (residual if has_residual else 0.0)
    if relu:
        expected = torch.relu(expected)
    torch.testing.assert_close(torch.from_numpy(out[:c_out]).reshape(1, c_out, *hw), expected, rtol=1e-4, atol=1e-4)
    assert np.isnan(out[c_out]).all()


def test_tap_conv_refuses_a_map_it_is_not_compiled_for():
    """The kernel holds TAP_MAPS' geometry in its code: another map is an error, not a wrong result."""
    out = np.zeros((2, 36), np.float32)
    with pytest.raises(ValueError, match="8x8 or 4x4"):
        kernels.tap_conv_seq(np.zeros((3, 36), np.float32), np.zeros(19, np.uint32), np.zeros(0, np.uint16),
                             np.zeros(0, np.float32), np.zeros(2, np.float32), out, False, False, 6, 6, out)


def test_tap_order_sorts_each_row_by_tap_then_channel():
    """A CSR over columns c * 9 + t comes back per row tap by tap (bounds[co * 9 + t] where tap t starts), each tap's
    channels ascending, every nonzero kept with its value."""
    indptr = np.array([0, 4, 4, 7])
    indices = np.array([2 * 9 + 4, 0 * 9 + 8, 1 * 9 + 4, 3 * 9 + 0,  # row 0: taps 4, 8, 4, 0
                        5 * 9 + 1, 0 * 9 + 1, 2 * 9 + 7])           # row 2: taps 1, 1, 7 (row 1 empty)
    values = np.arange(7, dtype=np.float32) + 1
    bounds, chans, vals = kernels.tap_order(indptr, indices, values)
    assert bounds.dtype == np.uint32 and bounds.shape == (3 * 9 + 1,)
    np.testing.assert_array_equal(chans, [3, 1, 2, 0, 0, 5, 2])
    np.testing.assert_array_equal(vals, [4, 3, 1, 2, 6, 5, 7])
    row0 = [0, 1, 1, 1, 1, 3, 3, 3, 3]  # tap 0: one; taps 1-3: none; tap 4: two; taps 5-7: none; tap 8: one
    row2 = [4, 4, 6, 6, 6, 6, 6, 6, 7]
    np.testing.assert_array_equal(bounds, row0 + [4] * 9 + row2 + [7])


class _Block(nn.Module):
    """A ResNet basic block on one map size: conv-ReLU-conv, the input added, ReLU."""

    def __init__(self, channels, density):
        super().__init__()
        self.conv1 = _masked(nn.Conv2d(channels, channels, 3, padding=1), density)
        self.conv2 = _masked(nn.Conv2d(channels, channels, 3, padding=1), density, seed=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


@pytest.mark.parametrize("hw", kernels.TAP_MAPS)
@pytest.mark.parametrize("tap_conv", [True, False])
def test_plan_runs_batch1_small_maps_on_the_tap_conv(monkeypatch, hw, tap_conv):
    """plan.TAP_CONV: at batch 1 both 3x3 convs of a block on an 8x8 or 4x4 map run as TAP_CONV ops (the residual add
    and ReLU in the second one's epilogue), and the result matches torch over a NaN arena; switched off, the same
    block runs on other ops to the same result. Batch 2 never takes it (the kernel holds one map)."""
    from sparsert import plan as plan_module
    from sparsert.kernels import executor as ex
    monkeypatch.setattr(plan_module, "TAP_CONV", tap_conv)
    torch.manual_seed(0)
    model = _Block(48, 0.2).eval()
    x = torch.randn(1, 48, *hw)
    sparse = sparsert.sparsify(model)
    codes = sparse.plan_for(x).ops[:, 0].tolist()
    assert codes.count(ex.TAP_CONV) == (2 if tap_conv else 0)
    if tap_conv:
        assert ex.GRID_CONV not in codes and ex.IM2COL not in codes and ex.GATHER_GEMM not in codes
        assert ex.ADD not in codes and ex.RELU not in codes
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)
    x2 = torch.randn(2, 48, *hw)
    assert ex.TAP_CONV not in sparse.plan_for(x2).ops[:, 0].tolist()
    torch.testing.assert_close(_run_on_nan_arena(sparse, x2), model(x2), rtol=1e-4, atol=1e-4)


def test_plan_tap_conv_serial_table_gives_the_same_result(monkeypatch):
    """The split choice's serial table runs the tap conv on one thread: the same sums, so the same output."""
    torch.manual_seed(0)
    model = _Block(64, 0.1).eval()
    x = torch.randn(1, 64, 8, 8)
    sparse = sparsert.sparsify(model)
    plan = sparse.plan_for(x)
    if plan.choice is None:
        pytest.skip("one thread: no split table")
    from sparsert.kernels import executor as ex
    from sparsert.plan import aligned_empty
    assert ex.TAP_CONV in plan.ops[:, 0].tolist() and plan.ops[plan.ops[:, 0] == ex.TAP_CONV, 1].all()
    x_flat = x.contiguous().numpy().reshape(-1)
    results = []
    for table in (plan.ops, plan.serial_ops):
        arena = aligned_empty(plan.arena_size)
        arena[:] = np.nan
        plan.run_ops(table, arena, x_flat)
        results.append(plan._output(arena).clone())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(results[0], model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel,pad", [(3, 1), (1, 0)])
@pytest.mark.parametrize("hw", kernels.TAP_MAPS)
def test_phase_columns_turn_a_stride2_conv_into_a_tap_conv_over_phases(kernel, pad, hw, gen):
    """A stride-2 conv (3x3 pad 1, 1x1) equals the tap conv over its input's four stride phases (channel c * 4 +
    py * 2 + px holding pixels (2 y + py, 2 x + px)) with its columns remapped by phase_columns."""
    c_in, c_out = 7, 10
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=gen)
    weight *= torch.rand(c_out, c_in, kernel, kernel, generator=gen) < 0.5
    x = torch.randn(1, c_in, 2 * hw[0], 2 * hw[1], generator=gen)
    bias = torch.randn(c_out, generator=gen)
    csr = CSR.from_dense(weight.reshape(c_out, -1))
    columns = kernels.phase_columns(np.asarray(csr.indices), (kernel, kernel), (pad,) * 4)
    bounds, chans, values = kernels.tap_order(np.asarray(csr.indptr), columns, np.asarray(csr.data))
    phases = torch.stack([x[0, :, py::2, px::2] for py in (0, 1) for px in (0, 1)], dim=1)  # [C, 4, H/2, W/2]
    maps = phases.reshape(c_in * 4, hw[0] * hw[1]).numpy().copy()
    out = np.full((c_out, hw[0] * hw[1]), np.nan, np.float32)
    kernels.tap_conv_seq(maps, bounds, chans.astype(np.uint16), values.astype(np.float32), bias.numpy(), out, False,
                         False, hw[0], hw[1], out)
    expected = nn.functional.conv2d(x, weight, bias, stride=2, padding=pad)
    torch.testing.assert_close(torch.from_numpy(out).reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)


def test_phase_columns_refuse_shifts_past_one_pixel():
    with pytest.raises(ValueError, match="more than one pixel"):
        kernels.phase_columns(np.arange(25), (5, 5), (2, 2, 2, 2))


class _Downsample(nn.Module):
    """A ResNet block that halves the map: 3x3 stride-2 conv, 3x3 conv, plus a 1x1 stride-2 shortcut."""

    def __init__(self, c_in, c_out, density):
        super().__init__()
        self.conv1 = _masked(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), density)
        self.conv2 = _masked(nn.Conv2d(c_out, c_out, 3, padding=1), density, seed=1)
        self.down = _masked(nn.Conv2d(c_in, c_out, 1, stride=2), density, seed=2)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.down(x))


@pytest.mark.parametrize("size,strided", [(16, True), (8, False)])
def test_plan_runs_batch1_stride2_convs_over_shared_phases(monkeypatch, size, strided):
    """plan.STRIDED_TAP_MAPS: at batch 1 a block halving a 16x16 map to 8x8 runs its stride-2 3x3 conv and its 1x1
    shortcut as tap convs over one shared pack of the input's stride phases (three TAP_CONV ops, one PACK); halving
    an 8x8 map to 4x4 keeps the strided convs elsewhere (only conv2 is a tap conv). Both match torch over a NaN
    arena."""
    from sparsert.kernels import executor as ex
    torch.manual_seed(0)
    model = _Downsample(24, 40, 0.2).eval()
    x = torch.randn(1, 24, size, size)
    sparse = sparsert.sparsify(model)
    codes = sparse.plan_for(x).ops[:, 0].tolist()
    assert codes.count(ex.TAP_CONV) == (3 if strided else 1)
    if strided:
        assert codes.count(ex.PACK) == 1 and ex.IM2COL not in codes and ex.GATHER_GEMM not in codes
    torch.testing.assert_close(_run_on_nan_arena(sparse, x), model(x), rtol=1e-4, atol=1e-4)
