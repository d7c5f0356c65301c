"""Batch-1 3x3 convs on small maps: each tap's sum in registers, shifted into place once.

A 3x3 'same' conv (stride 1, pad 1) on one H x W map whose pixels fill 1-4 whole vectors (TAP_MAPS: 4x4 and 8x8, as
torchvision resnet18's layer2 and layer1 at 32x32 input) computes output channel co as

    out[co, p] = bias + sum_t valid_t(p) * Y_t[p + s_t],   Y_t = sum_c w[co, c, t] * x[c, :],   s_t = dy * W + dx

The shift s_t is the same for every input channel of a tap, so Y_t is a sum of whole input maps: one aligned load
per vector and nonzero, from an input of C x H x W floats (L1-sized). Each tap's sum is then shifted by s_t lanes
and masked (the pixels whose tap falls outside the map) in registers, once per output channel and tap. The other
ways to reach the taps lost on these maps: the grid conv computes border cells too (100 cells for 64 pixels) and
its +-1 shifts split cache lines on every load, and im2col's columns are 9x the input, out of L1 (at 8x8, 10%
dense: 11 us grid, 18 us im2col for a 64-channel conv with a 4-vector strip reading L2; this kernel 6 us, and
27% dense 23 -> 11 us against the grid, both cores, in whole calls of torchvision resnet18).

Each output channel's nonzeros are ordered by tap, then channel (`tap_order`); bounds[co * 9 + t] is where tap t
of row co starts.
"""
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core.errors import TypingError
from numba.extending import intrinsic

from ._jit import declare_function, thread_count, twin
from .conv import _split_row
from .strip import _epilogue, splat, sum_in_sets

TAPS = 9  # a 3x3 kernel's taps, row-major: t = (dy + 1) * 3 + (dx + 1), as im2col orders a CSR's columns
TAP_MAPS = ((8, 8), (4, 4))  # (H, W) the kernel is compiled for: whole vectors, at most 4 (the sums' registers)
LANES = 16  # float32 per 64-byte vector


def _make_tap_row(height: int, width: int):
    """The intrinsic computing one output channel of the conv on a height x width map (see the module doc)."""
    n_pix = height * width
    n_vec = n_pix // LANES
    assert n_pix % LANES == 0 and 1 <= n_vec <= 4
    n_sets = max(1, 4 // n_vec)  # independent FMA chains, at least 4 (an FMA waits ~4 cycles on the one before)
    taps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]

    def codegen(context, builder, signature, args):
        x_v, plane_v, chans_v, values_v, bounds_v, b0_v, init_v, out_v, o_v, res_v, r_v, has_res_v, relu_v = args
        aty = signature.args
        f32, i64, i32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
        vec = ir.VectorType(f32, LANES)
        fma = declare_function(builder.module, "llvm.fma.v16f32", vec, [vec, vec, vec])
        zero = ir.Constant(vec, None)

        def data(i):
            return context.make_array(aty[i])(context, builder, args[i]).data

        x_ptr, chan_ptr, val_ptr, bound_ptr, out_ptr, res_ptr = data(0), data(2), data(3), data(4), data(7), data(9)

        def load_vec(ptr, start):
            return builder.load(builder.bitcast(builder.gep(ptr, [start]), vec.as_pointer()), align=4)

        def widen(value):
            return builder.zext(value, i64) if value.type.width < 64 else value

        def fma_step(k, accs):  # nonzero k: its weight times the whole map of its channel
            row = builder.mul(widen(builder.load(builder.gep(chan_ptr, [k]))), plane_v)
            w = splat(builder, builder.load(builder.gep(val_ptr, [k])), LANES)
            return [builder.call(fma, [w, load_vec(x_ptr, builder.add(row, ir.Constant(i64, LANES * v))), acc])
                    for v, acc in enumerate(accs)]

        def shifted(sums, dy, dx, j):
            """Output vector j's lanes of shift_t(Y_t): lane l reads pixel 16 j + l + s, or 0 where the tap falls
            outside the map."""
            s = dy * width + dx
            first = (LANES * j + s) // LANES  # the vector pixel 16 j + s lies in
            pair = [sums[v] if 0 <= v < n_vec else zero for v in (first, first + 1)]
            picks, keep = [], []
            for lane in range(LANES):
                p = LANES * j + lane
                y, x = divmod(p, width)
                inside = 0 <= y + dy < height and 0 <= x + dx < width
                picks.append(p + s - LANES * first if inside else 0)
                keep.append(inside)
            if s == 0:
                return pair[0]
            moved = builder.shuffle_vector(pair[0], pair[1], ir.Constant(ir.VectorType(i32, LANES), picks))
            mask = ir.Constant(ir.VectorType(ir.IntType(1), LANES), [int(k) for k in keep])
            return builder.select(mask, moved, zero)

        accs = [splat(builder, init_v, LANES)] * n_vec
        for t, (dy, dx) in enumerate(taps):
            at = builder.add(b0_v, ir.Constant(i64, t))
            k0 = widen(builder.load(builder.gep(bound_ptr, [at])))
            k1 = widen(builder.load(builder.gep(bound_ptr, [builder.add(at, ir.Constant(i64, 1))])))
            sums = sum_in_sets(builder, k0, k1, n_sets, [zero] * n_vec, zero, fma_step)  # Y_t
            accs = [builder.fadd(acc, shifted(sums, dy, dx, j)) for j, acc in enumerate(accs)]
        no_mask = ir.Constant(ir.IntType(1), 0)
        values = _epilogue(builder, accs, lambda ptr, start: [
            load_vec(ptr, builder.add(start, ir.Constant(i64, LANES * v))) for v in range(n_vec)],
            res_ptr, r_v, has_res_v, relu_v, res_ptr, r_v, no_mask)
        for v, value in enumerate(values):
            builder.store(value, builder.bitcast(builder.gep(out_ptr, [builder.add(o_v, ir.Constant(i64, LANES * v))]),
                                                 vec.as_pointer()), align=4)
        return context.get_dummy_value()

    @intrinsic
    def tap_row(typingctx, x, plane, chans, values, bounds, b0, init, out, o, res, r, has_res, relu):
        """out[o + p] = relu?(init + sum over taps t and their nonzeros k (bounds[b0 + t] <= k < bounds[b0 + t + 1])
        of values[k] * x[chans[k] * plane + p + s_t] (0 where tap t of pixel p falls outside the map) + res[r + p])."""
        for name, a in (("x", x), ("values", values), ("out", out), ("res", res)):
            if not isinstance(a, types.Array) or a.layout != "C" or a.dtype != types.float32:
                raise TypingError(f"tap_row: {name} must be a C-contiguous float32 array, got {a}")
        for name, a in (("chans", chans), ("bounds", bounds)):
            if not isinstance(a, types.Array) or not isinstance(a.dtype, types.Integer) or a.dtype.signed:
                raise TypingError(f"tap_row: {name} must be an unsigned integer array, got {a}")
        return types.void(x, types.intp, chans, values, bounds, types.intp, types.float32, out, types.intp, res,
                          types.intp, types.boolean, types.boolean), codegen

    return tap_row


tap_row_8x8, tap_row_4x4 = (_make_tap_row(h, w) for h, w in TAP_MAPS)


def _tap_conv(x, bounds, chans, values, bias, residual, has_residual, relu, height, width, out):
    """The conv of the module doc for every output channel.

    In: x[C_in, H*W] (CNHW, batch 1), bounds[C_out * 9 + 1] and chans/values (`tap_order`), bias[C_out],
    residual like out (read where has_residual). Out: out[C_out, H*W]. Threads take runs of output channels
    with about equal nonzeros."""
    if not ((height == 8 and width == 8) or (height == 4 and width == 4)) or out.shape[1] != height * width:
        raise ValueError("tap conv: the map must be 8x8 or 4x4 (TAP_MAPS), out[C_out, H*W]")
    n_out = out.shape[0]
    plane, n_pix = x.shape[1], out.shape[1]
    x_flat, out_flat, res_flat = x.reshape(-1), out.reshape(-1), residual.reshape(-1)
    rows = bounds[::TAPS]
    n_parts = min(n_out, thread_count())
    for part in prange(n_parts):
        for co in range(_split_row(rows, part, n_parts), _split_row(rows, part + 1, n_parts)):
            o = co * n_pix
            if height == 8:  # TAP_MAPS, checked above
                tap_row_8x8(x_flat, plane, chans, values, bounds, co * TAPS, bias[co], out_flat, o, res_flat, o,
                            has_residual, relu)
            else:
                tap_row_4x4(x_flat, plane, chans, values, bounds, co * TAPS, bias[co], out_flat, o, res_flat, o,
                            has_residual, relu)


def phase_columns(columns: np.ndarray, kernel_size, pads) -> np.ndarray:
    """A stride-2 conv's CSR columns (c * kh * kw + ky * kw + kx) as columns of the stride-1 tap conv over its input's
    stride phases (`kernels.conv` pack, stride 2, no padding: channel c * 4 + py * 2 + px holds input pixels
    (2 y + py, 2 x + px), a map of the output's size): tap (ky, kx) reads input row 2 y + ky - pad, i.e. phase row
    py = (ky - pad) mod 2 shifted by dy = (ky - pad - py) / 2, likewise for columns. Kernels of at most 3 and pads of
    at most 1 keep every shift within -1..1."""
    (kh, kw), pad_top, pad_left = kernel_size, pads[0], pads[2]
    columns = np.asarray(columns, np.int64)
    chan, tap = columns // (kh * kw), columns % (kh * kw)
    ry, rx = tap // kw - pad_top, tap % kw - pad_left
    py, px = ry % 2, rx % 2
    dy, dx = (ry - py) // 2, (rx - px) // 2
    if kh > 3 or kw > 3 or np.abs(dy).max(initial=0) > 1 or np.abs(dx).max(initial=0) > 1:
        raise ValueError(f"phase_columns: kernel {kernel_size} with pads {pads} shifts phases by more than one pixel")
    return (chan * 4 + py * 2 + px) * TAPS + (dy + 1) * 3 + dx + 1


def tap_order(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray):
    """A 3x3 conv's CSR (columns c * 9 + t) as the tap conv reads it: (bounds[C_out * 9 + 1], channels, values),
    each row's nonzeros sorted by tap, then channel; tap t of row co holds bounds[co * 9 + t] up to
    bounds[co * 9 + t + 1]."""
    indptr = np.asarray(indptr, np.int64)
    indices = np.asarray(indices, np.int64)
    n_out = len(indptr) - 1
    row = np.repeat(np.arange(n_out), np.diff(indptr))
    tap, chan = indices % TAPS, indices // TAPS
    order = np.lexsort((chan, tap, row))
    bounds = np.zeros(n_out * TAPS + 1, np.int64)
    np.add.at(bounds, row * TAPS + tap + 1, 1)
    return np.cumsum(bounds).astype(np.uint32), chan[order], np.asarray(values)[order]


tap_conv_par, tap_conv_seq = twin(_tap_conv)

__all__ = ["TAP_MAPS", "TAPS", "phase_columns", "tap_conv_par", "tap_conv_seq", "tap_order"]
