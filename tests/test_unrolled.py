"""The unrolled lanes conv (kernels/unrolled.py): its encoder, its kernel against torch, its plan ops."""
import numpy as np
import pytest
import torch
from torch import nn

import sparsert
from sparsert import kernels
from sparsert import plan as plan_module
from sparsert.kernels import executor as ex
from sparsert.kernels import unrolled

pytestmark = pytest.mark.skipif(not unrolled.available(), reason="unrolled code needs x86-64 with AVX-512F")


def test_encoder_writes_the_instructions_an_assembler_writes():
    """Bytes as GNU objdump decodes them (checked once by hand: operands in every register bank, negative
    displacements, r8 as a base)."""
    e = unrolled._evex
    assert e(unrolled._VBROADCASTSS, 5, 0, unrolled._RDX, True, 8).hex() == "62f27d4818aa08000000"
    assert e(unrolled._VBROADCASTSS, 23, 0, unrolled._RDX, True, 92).hex() == "62e27d4818ba5c000000"
    assert e(unrolled._VMOVUPS_LOAD, 24, 0, unrolled._RDI, True, 123456).hex() == "62617c48108740e20100"
    assert e(unrolled._VFMADD231PS, 17, 24, unrolled._RDX, True, 400, broadcast=True).hex() == "62e23d50b88a90010000"
    assert e(unrolled._VFMADD231PS, 3, 24, unrolled._RDX, True, -8, broadcast=True).hex() == "62f23d50b89af8ffffff"
    assert e(unrolled._VPXORD, 31, 31, 31, False).hex() == "62010540efff"
    assert e(unrolled._VADDPS, 9, 9, unrolled._RCX, True, 2048).hex() == "62713448588900080000"
    assert e(unrolled._VMOVUPS_STORE, 19, 0, unrolled._RSI, True, 65536).hex() == "62e17c48119e00000100"
    assert e(unrolled._VMOVUPS_LOAD, 2, 0, 8, True, 64).hex() == "62d17c48109040000000"
    # compressed one-byte displacements (disp8 x the operand size) where they fit, and the base moves
    assert e(unrolled._VMOVUPS_LOAD, 24, 0, unrolled._RDI, True, -8192, scale=64).hex() == "62617c48104780"
    assert e(unrolled._VMOVUPS_LOAD, 24, 0, unrolled._RDI, True, 8128, scale=64).hex() == "62617c4810477f"
    assert e(unrolled._VMOVUPS_LOAD, 24, 0, unrolled._RDI, True, 8192, scale=64).hex() == "62617c48108700200000"
    assert e(unrolled._VFMADD231PS, 17, 24, unrolled._RDX, True, 508, broadcast=True, scale=4).hex() == "62e23d50b84a7f"
    assert e(unrolled._VFMADD231PS, 3, 24, unrolled._RDX, True, -512, broadcast=True, scale=4).hex() == "62f23d50b85a80"
    assert e(unrolled._VBROADCASTSS, 23, 0, unrolled._RDX, True, 92, scale=4).hex() == "62e27d48187a17"
    assert unrolled._add_imm32(unrolled._RDI, 12345).hex() == "4881c739300000"
    assert unrolled._add_imm32(unrolled._RDX, -1024).hex() == "4881c200fcffff"
    with pytest.raises(ValueError, match="SIB"):
        e(unrolled._VMOVUPS_LOAD, 2, 0, 4, True, 0)  # rsp as a base
    with pytest.raises(ValueError, match="1-30 channels"):
        unrolled.group_code(np.zeros(0, np.int64), np.zeros(0, np.int64), 31, np.zeros(31, np.int64), False, False)


def test_vectorised_rows_match_the_scalar_encoder():
    regs = np.arange(32)
    disps = np.arange(-128, 128, 8)
    rows = unrolled._disp8_rows(unrolled._VFMADD231PS, regs, unrolled._X, unrolled._RDX, disps, True)
    for reg, disp, row in zip(regs, disps, rows):
        assert row.tobytes() == unrolled._evex(unrolled._VFMADD231PS, int(reg), unrolled._X, unrolled._RDX, True,
                                               4 * int(disp), broadcast=True, scale=4)
    loads = unrolled._disp8_rows(unrolled._VMOVUPS_LOAD, regs, 0, unrolled._RDI, disps, False)
    for reg, disp, row in zip(regs, disps, loads):
        assert row.tobytes() == unrolled._evex(unrolled._VMOVUPS_LOAD, int(reg), 0, unrolled._RDI, True, 64 * int(disp),
                                               scale=64)
    adds = unrolled._add_rows(unrolled._RDX, np.array([1024, -4, 2 ** 31 - 1]))
    assert [r.tobytes() for r in adds] == [unrolled._add_imm32(unrolled._RDX, v) for v in (1024, -4, 2 ** 31 - 1)]


def _aligned(n):
    raw = np.zeros(n + 16, np.float32)
    k = (-raw.ctypes.data // 4) % 16
    return raw[k:k + n]


def _to_lanes(t, plane_shape):
    a = _aligned(int(np.prod(plane_shape)))
    a.reshape(plane_shape)[:, 1:-1, 1:-1, :] = t.permute(1, 2, 3, 0).numpy()
    return a


@pytest.mark.parametrize("c_in,c_out,hw,stride,kernel,density", [
    (8, 5, 6, 1, 3, 0.3),     # fewer channels than one group
    (16, 50, 5, 1, 3, 0.15),  # two groups, the last of 20 channels; input and weights span several base windows
    (12, 30, 8, 2, 3, 0.4),   # stride 2
    (20, 26, 4, 1, 1, 0.5),   # 1x1
    (6, 24, 4, 1, 3, 0.0),    # no nonzeros: bias only
    (4, 7, 5, 1, 3, 1.0),     # dense: a NaN input reaches every output whose window holds it, as in torch
])
@pytest.mark.parametrize("has_residual,relu", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("parallel,block_rows", [(False, 1), (True, 2), (False, 100)])
def test_unrolled_conv_matches_torch(c_in, c_out, hw, stride, kernel, density, has_residual, relu, parallel, block_rows):
    """A 32-lane activation (two vectors a cell), lanes.py's addressing; one output channel with no nonzeros,
    nothing written outside the output cells. Dense weights: a NaN input pixel must reach every output it feeds,
    through the ReLU as well (sparse weights spread it through their nonzeros only, torch through every weight)."""
    g = torch.Generator().manual_seed(c_in * 100 + c_out)
    lanes, pad = 32, kernel // 2
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=g) * (
        torch.rand(c_out, c_in, kernel, kernel, generator=g) < density)
    if density < 1.0:
        weight[min(1, c_out - 1)] = 0.0
    bias = torch.randn(c_out, generator=g)
    x = torch.randn(lanes, c_in, hw, hw, generator=g)
    if density == 1.0:
        x[3, 0, hw // 2, hw // 2] = float("nan")
    out_hw = (hw + 2 * pad - kernel) // stride + 1
    residual = torch.randn(lanes, c_out, out_hw, out_hw, generator=g)
    wq_in, wq_out = hw + 2, out_hw + 2
    x_lanes = _to_lanes(x, (c_in, hw + 2, wq_in, lanes))
    res_lanes = _to_lanes(residual, (c_out, out_hw + 2, wq_out, lanes))
    if 0.0 < density < 1.0 and c_in > 6:
        weight[:, 3:6] = 0.0  # every group's second block of 3 input channels empty: no function for it
    csr = sparsert.formats.CSR.from_dense(weight.reshape(c_out, -1))
    indptr = np.asarray(csr.indptr, np.int64)
    plane_in = (hw + 2) * wq_in * lanes
    positions = kernels.lane_offsets(np.asarray(csr.indices), (kernel, kernel), (1, 1), plane_in, wq_in,
                                     lanes).astype(np.int64)
    plane_out = (out_hw + 2) * wq_out * lanes
    origin = (1 - pad) * wq_in + 1 - pad
    run = unrolled.unrolled_conv_par if parallel else unrolled.unrolled_conv_seq
    outs = {}
    taps = np.asarray(csr.indices, np.int64) % (kernel * kernel)
    all_taps = np.full(hw + 2, 0xFFFFFFFF, np.uint32)
    masks = unrolled.tap_masks(hw, hw, out_hw, out_hw, (kernel, kernel), (stride, stride), (1, 1), (pad,) * 4)
    # One block, blocks of 3 input channels (partial sums through the output), and blocks run tap by tap, each
    # cell skipping the taps that read the zero border: their input's border holds NaN, which no output may see.
    x_nan_border = x_lanes.copy()
    x_nan_border.reshape(c_in, hw + 2, wq_in, lanes)[:, [0, -1], :, :] = np.nan
    x_nan_border.reshape(c_in, hw + 2, wq_in, lanes)[:, :, [0, -1], :] = np.nan
    for block_channels, sections in ((0, False), (3, False), (3, True)):
        functions, weights, starts, n_blocks = unrolled.conv_functions(
            indptr, positions, np.asarray(csr.data, np.float32), bias.numpy(), plane_out, has_residual, relu,
            block_channels * plane_in, taps if sections else None)
        code = unrolled.UnrolledCode(functions)
        n_groups = -(-c_out // unrolled.ACCUMULATORS)
        assert n_blocks == (1 if block_channels == 0 or csr.nnz == 0 else -(-c_in // block_channels))
        assert len(starts) == len(functions) == n_groups * n_blocks
        if block_channels and 0.0 < density < 1.0 and c_in > 6:
            assert all(functions[g * n_blocks + 1] is None for g in range(n_groups))
            assert (code.addresses.reshape(n_groups, n_blocks)[:, 1] == 0).all()
        out = _aligned(c_out * (out_hw + 2) * wq_out * lanes)
        out[:] = 7.0  # the border cells must keep it
        run(unrolled.address_words(code), starts.astype(np.uint32), n_blocks, weights,
            x_nan_border if sections else x_lanes, origin, stride * wq_in,
            stride, res_lanes, out, wq_out, wq_out + 1, out_hw, out_hw, lanes, block_rows, not parallel,
            *(masks if sections else (all_taps, all_taps)), sections)
        outs[block_channels, sections] = out
    # The same sums in the same order: blocks change where partial sums live, not the result (bit for bit).
    np.testing.assert_array_equal(outs[0, False], outs[3, False])
    out = outs[3, True]  # checked against torch below (its sums run in another order)
    expected = nn.functional.conv2d(x, weight, bias, stride=stride, padding=pad)
    if has_residual:
        expected = expected + residual
    if relu:
        expected = torch.relu(expected)
    got = out.reshape(c_out, out_hw + 2, wq_out, lanes)
    torch.testing.assert_close(torch.from_numpy(got[:, 1:-1, 1:-1, :].copy()), expected.permute(1, 2, 3, 0),
                               rtol=1e-4, atol=1e-4, equal_nan=True)
    border = np.ones(got.shape[1:3], bool)
    border[1:-1, 1:-1] = False
    assert (got[:, border, :] == 7.0).all()
    if density == 1.0:
        assert np.isnan(got[:, 1:-1, 1:-1, 3]).any()  # the NaN went through (a vmaxps with swapped sources drops it)


def _block(channels=64, density=0.2):
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
            self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
            self.down = nn.Conv2d(channels, channels, 3, 2, 1)

        def forward(self, x):
            y = torch.relu(self.conv1(x))
            return self.down(torch.relu(self.conv2(y) + x))

    model = Block().eval()
    with torch.no_grad():
        for conv in (model.conv1, model.conv2, model.down):
            conv.weight.mul_((torch.rand_like(conv.weight) < density).float())
    return model


@pytest.mark.parametrize("batch", [16, 20, 64])  # 16 lanes (one vector a cell), 32, and two 32-lane shares
def test_plan_runs_small_lanes_convs_unrolled(batch, monkeypatch):
    """Lanes convs on small maps at density >= UNROLLED_MIN_DENSITY run as unrolled code (the op's table offset is
    set and the plan keeps the code), with the same result as torch and as the strip kernels; with UNROLLED_CONV
    off no op does."""
    model = _block()
    x = torch.randn(batch, 64, 8, 8)
    with torch.no_grad():
        expected = model(x)
        plan = sparsert.sparsify(model).plan_for(x)
        lane_convs = plan.ops[plan.ops[:, 0] == ex.LANE_CONV]
        assert len(lane_convs) and (lane_convs[:, 2 + 30] >= 0).all() and plan.code
        got = plan(x)
        monkeypatch.setattr(plan_module, "UNROLLED_CONV", 0)
        strip_plan = sparsert.sparsify(model).plan_for(x)
        assert (strip_plan.ops[strip_plan.ops[:, 0] == ex.LANE_CONV][:, 2 + 30] == -1).all() and not strip_plan.code
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got, strip_plan(x), rtol=1e-5, atol=1e-5)


def _unrolled_tables(plan, layer):
    """(rows, input-channel blocks) of each unrolled LANE_CONV op lowered from `layer`."""
    return [(int(row[2 + 11]), int(plan.u32[row[2 + 30] + 2])) for row, name in zip(plan.ops, plan.op_layers)
            if name == layer and row[0] == ex.LANE_CONV and row[2 + 30] >= 0]


def test_serial_plan_runs_unrolled_convs_in_channel_blocks(monkeypatch):
    """One share of a split batch (a serial plan) runs its unrolled convs block of input channels by block
    (plan.unrolled_bands): without tap sections, the same sums in the same order as one block, so the same output
    bit for bit; a per-op plan keeps one block."""
    model, x = _block(), torch.randn(64, 64, 8, 8)
    with torch.no_grad():
        gm = sparsert.sparsify(model)
        blocked = plan_module.build_plan(gm, tuple(x.shape), parts=2)
        tables = _unrolled_tables(blocked, "conv1")
        assert tables and all(blocks > 1 for _, blocks in tables)
        per_op = plan_module.build_plan(gm, tuple(x.shape), parts=1)
        assert all(blocks == 1 for _, blocks in _unrolled_tables(per_op, "conv1"))
        torch.testing.assert_close(blocked(x), model(x), rtol=1e-4, atol=1e-4)
        monkeypatch.setattr(plan_module, "UNROLLED_TAP_SECTIONS", 0)  # (tap by tap, a block's sums run in tap order)
        blocked = plan_module.build_plan(gm, tuple(x.shape), parts=2)
        monkeypatch.setattr(plan_module, "UNROLLED_BLOCK_BYTES", 0)
        one_block = plan_module.build_plan(gm, tuple(x.shape), parts=2)
        assert all(blocks == 1 for _, blocks in _unrolled_tables(one_block, "conv1"))
        got = blocked(x)
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)
        assert torch.equal(got, one_block(x))


def test_unrolled_convs_run_whole_maps_skipping_border_taps(monkeypatch):
    """An unrolled 3x3 conv on a 4x4 map runs as one op whose cells skip the taps that read the zero border (its
    table's masks: kernels.unrolled.tap_masks), where without tap sections a per-op plan cuts it into regions,
    each with its own code; both match torch."""
    model, x = _block(channels=32, density=0.3), torch.randn(32, 32, 4, 4)
    with torch.no_grad():
        gm = sparsert.sparsify(model)
        plan = plan_module.build_plan(gm, tuple(x.shape))
        convs = [row for row, name in zip(plan.ops, plan.op_layers) if name == "conv1" and row[0] == ex.LANE_CONV]
        assert len(convs) == 1 and convs[0][2 + 30] >= 0 and convs[0][2 + 11] == 4
        t = convs[0][2 + 30]
        n_functions, rows, cols = (int(v) for v in plan.u32[[t, t + 3, t + 4]])
        masks = plan.u32[t + 6 + 3 * n_functions:t + 6 + 3 * n_functions + rows + cols]
        expected = np.concatenate(kernels.unrolled_tap_masks(4, 4, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)))
        np.testing.assert_array_equal(masks, expected)
        assert masks[0] == 0b111111000 and masks[rows] == 0b110110110  # top row: no kernel row 0; left: no column 0
        torch.testing.assert_close(plan(x), model(x), rtol=1e-4, atol=1e-4)
        monkeypatch.setattr(plan_module, "UNROLLED_TAP_SECTIONS", 0)
        regions = plan_module.build_plan(gm, tuple(x.shape))
        assert sum(name == "conv1" and row[0] == ex.LANE_CONV for row, name in zip(regions.ops, regions.op_layers)) > 1
        torch.testing.assert_close(regions(x), model(x), rtol=1e-4, atol=1e-4)


def test_unrolled_blocks_hold_enough_nonzeros_to_pay_their_partial_sums():
    """plan.unrolled_bands, 512 channels on a 4x4 map (one 16-lane vector a cell): a serial plan's 3x3 conv at 10%
    gets blocks whose window fits UNROLLED_BLOCK_BYTES (here more than the UNROLLED_BLOCK_MIN_NNZ floor), a 1x1 conv
    at 10% blocks of that floor (a window-sized block would hold a nonzero or two an output channel), a per-op plan
    one block, and a map too wide for a block of UNROLLED_MIN_BLOCK_CHANNELS one block."""
    bands = plan_module.unrolled_bands
    rows, channels = bands(512, 512, 4, 4, 6, 3, 1, True, 9 * 0.1)
    assert 1 <= rows <= 4 and 0 < channels < 512
    assert channels >= plan_module.UNROLLED_BLOCK_MIN_NNZ / 0.9
    assert channels * ((rows - 1) + 3) * 6 * 64 <= plan_module.UNROLLED_BLOCK_BYTES
    assert bands(512, 512, 4, 4, 6, 1, 1, True, 0.1)[1] == plan_module.UNROLLED_BLOCK_MIN_NNZ * 10
    assert bands(128, 128, 4, 4, 6, 1, 1, True, 0.1)[1] == 0  # the floor holds every channel: one block
    assert bands(512, 512, 4, 4, 6, 3, 1, False, 0.9)[1] == 0
    assert bands(64, 64, 32, 32, 34, 3, 1, True, 0.9)[1] == 0


def test_plan_keeps_strip_kernels_for_large_or_very_sparse_maps():
    with torch.no_grad():
        x = torch.randn(16, 64, 48, 48)  # 48x48 maps: past UNROLLED_MAX_CELLS
        plan = sparsert.sparsify(_block()).plan_for(x)
        ops = plan.ops[plan.ops[:, 0] == ex.LANE_CONV]
        out_w = ops[:, 2 + 12]
        assert (ops[out_w == 24][:, 2 + 30] >= 0).all() and (out_w == 24).any()  # the stride-2 conv's 24x24 output
        assert (ops[out_w > 24][:, 2 + 30] == -1).all() and (out_w > 24).any()
        sparse_plan = sparsert.sparsify(_block(density=0.005)).plan_for(torch.randn(32, 64, 8, 8))
        assert not sparse_plan.code  # 0.5% < UNROLLED_MIN_DENSITY
        tiny_maps = sparsert.sparsify(_block(density=0.005)).plan_for(torch.randn(32, 64, 2, 2))
        assert tiny_maps.code  # maps of at most UNROLLED_SMALL_CELLS cells unroll at any density


def test_unavailable_where_the_os_refuses_executable_memory(monkeypatch):
    """SELinux (execmem) or a hardened runtime refuses PROT_EXEC mappings: the plans then keep the strip kernels
    instead of failing to build."""
    def refuse(*args, **kwargs):
        raise PermissionError("mmap: Operation not permitted")

    unrolled.available.cache_clear()
    monkeypatch.setattr(unrolled.mmap, "mmap", refuse)
    try:
        assert not unrolled.available()
        with torch.no_grad():
            plan = sparsert.sparsify(_block()).plan_for(torch.randn(20, 64, 8, 8))
        assert not plan.code and (plan.ops[plan.ops[:, 0] == ex.LANE_CONV][:, 2 + 30] == -1).all()
    finally:
        monkeypatch.undo()
        unrolled.available.cache_clear()
    assert unrolled.available()
