"""Whole-network executor: runs a compiled plan (an op table) in one Numba call.

At batch 1 a pruned network's arithmetic takes microseconds per layer, while a Python-level call
costs ~50 us (module call, torch allocations, Numba argument typing). The plan builder
(`sparsert.plan`) lowers the network into rows of int64 parameters; this loop walks them.

Activations live in one float32 arena. Layouts: conv activations are CNHW (channel rows with
batch folded into the pixel axis); Linear activations are feature-major [features, batch].
Weights live in two concatenated arrays (float32 values + biases, uint32 indices).
"""
import threading

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, prange, types
from numba.extending import intrinsic

from ._jit import OPTIONS, relu_or_identity, thread_count, twin
from .conv import (GRID_BORDER, SHIFT_LANES, gather_columns_par, gather_columns_seq, grid_conv_par, grid_conv_seq, pack_input_par, pack_input_seq,
                   private_gather_gemm_par, private_gather_gemm_seq,
                   sparse_conv_par, sparse_conv_seq)
from .lanes import (from_lanes_par, from_lanes_seq, lane_avgpool_par, lane_avgpool_seq, lane_conv_maxpool_par,
                    lane_conv_maxpool_seq, lane_conv_par, lane_conv_seq,
                    lane_maxpool_par, lane_maxpool_seq, to_lanes_par, to_lanes_seq, zero_border_par, zero_border_seq,
                    from_tiles_par, from_tiles_seq, to_tiles_par, to_tiles_seq)
from .layout import rows_to_features_par, rows_to_features_seq
from .taps import TAPS as _TAPS, tap_conv_par, tap_conv_seq
from .sliced import sliced_matvec
from .unrolled import unrolled_conv_par, unrolled_conv_seq
from .linear import bsr_spmm_par, bsr_spmm_seq, csr_spmm_blocked_par, csr_spmm_blocked_seq, csr_spmm_dispatch

# Op codes; each row of the op table is [code, parallel, p0, p1, ...] (see sparsert/plan.py).
NCHW_TO_CNHW, ROWS_TO_FEATURES, PACK, CONV, LINEAR_CSR, LINEAR_BSR = 1, 2, 3, 4, 5, 6
MAXPOOL, GLOBAL_AVGPOOL, ADD, RELU, CNHW_TO_FEATURES, IM2COL, CONV_GEMM, GRID_CONV = 8, 9, 10, 11, 12, 13, 14, 15
TO_LANES, FROM_LANES, LANE_CONV, LANE_MAXPOOL, LANE_AVGPOOL, LINEAR_SLICED, LANE_CONV_MAXPOOL = 16, 17, 18, 19, 20, 21, 22
TO_TILES, FROM_TILES, GATHER_GEMM, TAP_CONV = 23, 24, 25, 26
N_PARAMS = 32


def _maxpool(x, kernel, stride, pad, out):
    """out[c, n, i, j] = max over the window of x[c, n] (padding never wins; NaN propagates, as in torch).
    In: x[C, N, H, W]. Out: out[C, N, OH, OW]. Per output row, the window's rows are first reduced column by
    column, then each output takes the max of its window's columns, with flat unsigned offsets and the NaN test as
    a select: torchvision resnet18's pool at batch 1 (64 planes of 16x16) took 13-14 us on two threads (19 on one),
    where the 9-compare window loop with a branch for NaN took 22."""
    n_chan, n_img, height, width = x.shape
    out_h, out_w = out.shape[2], out.shape[3]
    n_planes = n_chan * n_img
    src_flat, dst_flat = x.reshape(-1), out.reshape(-1)
    n_chunks = min(n_planes, thread_count())  # a run of planes per thread: one scratch row each
    for chunk in prange(n_chunks):
        column_max = np.empty(width, x.dtype)
        for plane in range(chunk * n_planes // n_chunks, (chunk + 1) * n_planes // n_chunks):
            src = np.uintp(plane * height * width)
            dst = np.uintp(plane * out_h * out_w)
            for i in range(out_h):
                h_lo = max(i * stride - pad, 0)
                h_hi = min(i * stride - pad + kernel, height)
                first = src + np.uintp(h_lo * width)
                for w in range(width):
                    column_max[w] = src_flat[first + np.uintp(w)]
                for h in range(h_lo + 1, h_hi):
                    row = src + np.uintp(h * width)
                    for w in range(width):
                        v, best = src_flat[row + np.uintp(w)], column_max[w]
                        column_max[w] = v if (v > best) | (v != v) else best
                for j in range(out_w):
                    w_lo = max(j * stride - pad, 0)
                    w_hi = min(j * stride - pad + kernel, width)
                    best = column_max[w_lo]
                    for w in range(w_lo + 1, w_hi):
                        v = column_max[w]
                        best = v if (v > best) | (v != v) else best
                    dst_flat[dst + np.uintp(i * out_w + j)] = best


def _global_avgpool(x, out):
    """out[c, n] = mean(x[c, n]). In: x[C, N, H*W]. Out: out[C, N] (feature-major for a Linear)."""
    n_chan, n_img, n_pix = x.shape
    for c in prange(n_chan):
        for n in range(n_img):
            row = x[c, n]
            acc = 0.0
            for p in range(n_pix):
                acc += row[p]
            out[c, n] = acc / n_pix


maxpool_par, maxpool_seq = twin(_maxpool)
global_avgpool_par, global_avgpool_seq = twin(_global_avgpool)


@njit(inline="always", **{k: v for k, v in OPTIONS.items() if k != "cache"})
def _gather_gemm(planes, table, shifted, cols, indptr, indices, values, bias, res, has_res, relu, out, par):
    """GATHER_GEMM: one gather per thread beside its share of the product, or, run serially, one gather into
    the first copy and the whole product."""
    if par:
        private_gather_gemm_par(planes, table, shifted, cols, indptr, indices, values, bias, res, has_res, relu, out)
    else:
        private_gather_gemm_seq(planes, table, shifted, cols[:1], indptr, indices, values, bias, res, has_res, relu,
                                out)


@njit(inline="always", **{k: v for k, v in OPTIONS.items() if k != "cache"})
def _tap_conv(x, bounds, chans, values, bias, res, has_res, relu, height, width, out, par):
    if par:
        tap_conv_par(x, bounds, chans, values, bias, res, has_res, relu, height, width, out)
    else:
        tap_conv_seq(x, bounds, chans, values, bias, res, has_res, relu, height, width, out)


@njit(inline="always", **{k: v for k, v in OPTIONS.items() if k != "cache"})
def _table_width(n_pix, shifted):
    """Columns of an im2col conv's u32 table: one per pixel, or 3 per 16 pixels in shift form (conv.shift_table)."""
    return 3 * ((n_pix + SHIFT_LANES - 1) // SHIFT_LANES) if shifted else n_pix


@njit(inline="always", **{k: v for k, v in OPTIONS.items() if k != "cache"})
def _product_operands(arena, u32, f32, out_at, n_out, n_pix, residual_at, indptr_at, nnz, values_at, bias_at):
    """The arrays of an im2col conv's CSR product (CONV_GEMM, GATHER_GEMM): out[n_out, n_pix] and its residual (out
    itself when residual_at < 0) in the arena, the CSR's indptr, values and the bias in the weights."""
    out = arena[out_at:out_at + n_out * n_pix].reshape((n_out, n_pix))
    has_res = residual_at >= 0
    res = arena[residual_at:residual_at + n_out * n_pix].reshape((n_out, n_pix)) if has_res else out
    return out, res, has_res, u32[indptr_at:indptr_at + n_out + 1], f32[values_at:values_at + nnz], f32[bias_at:bias_at + n_out]


@njit(**OPTIONS)
def run_plan(ops, arena, f32, u32, u16, u8, x):
    """Execute `ops` in order. x: the network input (flattened); arena: activations and scratch;
    f32 / u32 / u16 / u8: weights (u16 holds the index arrays that fit it: 2 bytes a nonzero fewer to
    stream, 1.3x on weight-bound layers, and the sliced matvec's 2-byte column steps; u8 its 1-byte ones). Every buffer is a slice of arena at an offset the builder chose."""
    for r in range(ops.shape[0]):
        op = ops[r]
        code, par = op[0], op[1] != 0
        p = op[2:]
        if code == NCHW_TO_CNHW:  # p: out, N, C, H, W
            n_img, n_chan, hw = p[1], p[2], p[3] * p[4]
            src = x[:n_img * n_chan * hw].reshape((n_img, n_chan, hw))
            dst = arena[p[0]:p[0] + n_img * n_chan * hw].reshape((n_chan, n_img, hw))
            for c in range(n_chan):
                for n in range(n_img):
                    d, s = dst[c, n], src[n, c]
                    for q in range(hw):
                        d[q] = s[q]
        elif code == ROWS_TO_FEATURES:  # p: out, B, F  (x[B, F] -> out[F, B])
            n_batch, n_feat = p[1], p[2]
            src = x[:n_batch * n_feat].reshape((n_batch, n_feat))
            dst = arena[p[0]:p[0] + n_batch * n_feat].reshape((n_feat, n_batch))
            if par:
                rows_to_features_par(src, dst)
            else:
                rows_to_features_seq(src, dst)
        elif code == PACK:
            # p: in, out, C, N, H, W, pad_t, pad_l, sh, sw, hq, wq, row_len, from_grid, grid_row_len
            n_chan, n_img, height, width = p[2], p[3], p[4], p[5]
            if p[13]:  # a grid activation: read its interior cells (see kernels.conv._grid_conv)
                wg = width + 2 * GRID_BORDER
                first = p[0] + GRID_BORDER * (wg + 1)
                src = arena[first:p[0] + n_chan * p[14]]
                strides = np.array([(height + 2 * GRID_BORDER) * wg, p[14], wg, 1])
            else:  # dense CNHW read as (n, c, h, w)
                src = arena[p[0]:p[0] + n_chan * n_img * height * width]
                strides = np.array([height * width, n_img * height * width, width, 1])
            rows = n_chan * p[8] * p[9]
            dst = arena[p[1]:p[1] + rows * p[12]].reshape((rows, p[12]))
            if par:
                pack_input_par(src, strides, n_img, n_chan, height, width, p[6], p[7], p[8], p[9], p[10], p[11], dst)
            else:
                pack_input_seq(src, strides, n_img, n_chan, height, width, p[6], p[7], p[8], p[9], p[10], p[11], dst)
        elif code == GRID_CONV:
            # p: x, C_in, row_len, out, C_out, residual (-1: none), relu, shift, mask (f32), cells, N,
            #    co_block, indptr, tap offsets, nnz, values, bias
            x_grid = arena[p[0]:p[0] + p[1] * p[2]].reshape((p[1], p[2]))
            out = arena[p[3]:p[3] + p[4] * p[2]].reshape((p[4], p[2]))
            has_res = p[5] >= 0
            res = arena[p[5]:p[5] + p[4] * p[2]].reshape((p[4], p[2])) if has_res else out
            mask = f32[p[8]:p[8] + p[9]]
            indptr, offsets = u32[p[12]:p[12] + p[4] + 1], u32[p[13]:p[13] + p[14]]
            values, bias = f32[p[15]:p[15] + p[14]], f32[p[16]:p[16] + p[4]]
            if par:
                grid_conv_par(indptr, offsets, values, x_grid, p[7], bias, res, has_res, p[6] != 0, mask, p[10], p[11],
                              out)
            else:
                grid_conv_seq(indptr, offsets, values, x_grid, p[7], bias, res, has_res, p[6] != 0, mask, p[10], p[11],
                              out)
        elif code == TAP_CONV:
            # p: x (CNHW, batch 1), C_in, out, C_out, residual (-1: none), relu, H, W, bounds (u32 [C_out * 9 + 1]),
            #    channels, nnz, values, bias, channels_u16 (1: the channels live in u16)
            n_pix = p[6] * p[7]
            x_maps = arena[p[0]:p[0] + p[1] * n_pix].reshape((p[1], n_pix))
            out = arena[p[2]:p[2] + p[3] * n_pix].reshape((p[3], n_pix))
            has_res = p[4] >= 0
            res = arena[p[4]:p[4] + p[3] * n_pix].reshape((p[3], n_pix)) if has_res else out
            bounds, values, bias = u32[p[8]:p[8] + p[3] * _TAPS + 1], f32[p[11]:p[11] + p[10]], f32[p[12]:p[12] + p[3]]
            if p[13]:
                _tap_conv(x_maps, bounds, u16[p[9]:p[9] + p[10]], values, bias, res, has_res, p[5] != 0, p[6], p[7],
                          out, par)
            else:
                _tap_conv(x_maps, bounds, u32[p[9]:p[9] + p[10]], values, bias, res, has_res, p[5] != 0, p[6], p[7],
                          out, par)
        elif code == TO_LANES:  # p: in (CNHW), out, C, N, H, W, border, lanes, plane
            n_chan, n_img, height, width = p[2], p[3], p[4], p[5]
            src = arena[p[0]:p[0] + n_chan * n_img * height * width]
            strides = np.array([height * width, n_img * height * width, width, 1])
            dst = arena[p[1]:p[1] + n_chan * p[8]].reshape((n_chan, p[8]))
            if par:
                to_lanes_par(src, strides, n_img, height, width, p[6], p[7], dst)
            else:
                to_lanes_seq(src, strides, n_img, height, width, p[6], p[7], dst)
        elif code == FROM_LANES:  # p: in (lanes, border 1), out (CNHW), C, N, H, W, lanes, plane
            n_chan, n_img, height, width = p[2], p[3], p[4], p[5]
            src = arena[p[0]:p[0] + n_chan * p[7]].reshape((n_chan, p[7]))
            dst = arena[p[1]:p[1] + n_chan * n_img * height * width].reshape((n_chan, n_img, height, width))
            if par:
                from_lanes_par(src, n_img, height, width, 1, p[6], dst)
            else:
                from_lanes_seq(src, n_img, height, width, 1, p[6], dst)
        elif code == TO_TILES or code == FROM_TILES:
            # p: image (batch-1 CNHW) for TO_TILES, else tiles; the other, C, H, W, tiles_y, tiles_x, lanes, plane
            #    (kernels.lanes._to_tiles)
            n_chan, height, width = p[2], p[3], p[4]
            image = arena[p[0] if code == TO_TILES else p[1]:][:n_chan * height * width].reshape((n_chan, height, width))
            tiles = arena[p[1] if code == TO_TILES else p[0]:][:n_chan * p[8]].reshape((n_chan, p[8]))
            if code == TO_TILES:
                if par:
                    to_tiles_par(image, p[5], p[6], p[7], tiles)
                else:
                    to_tiles_seq(image, p[5], p[6], p[7], tiles)
            elif par:
                from_tiles_par(tiles, p[5], p[6], p[7], image)
            else:
                from_tiles_seq(tiles, p[5], p[6], p[7], image)
        elif code == LANE_CONV:
            # p: x, C_in, plane_in, out, C_out, plane_out, residual (-1: none), relu, origin, step_y, step_x,
            #    OH, OW, lanes, cells_per_strip, co_block, block bounds (u32 [C_out, 2 n_blocks]), n_blocks, tap offsets,
            #    nnz, values, bias, first output cell, output rows with border (0: leave the border, another region op zeroes it),
            #    output cells per row with border, tiles per row of a tiled map (0: not tiled), its halo masks (u32 [9]),
            #    the rows [p27, p28) whose border cells it zeroes (all rows, or one row band's: sparsert.bands),
            #    output rows a work item covers (1 or 2), the unrolled code's table (u32: functions, rows a band, input channel
            #    blocks, output rows and columns, whether to prefetch, their address words, their weight starts, the rows' and
            #    columns' tap masks; -1: the strip kernels run) and its weights (f32, kernels.unrolled)
            x_lanes = arena[p[0]:p[0] + p[1] * p[2]]
            out = arena[p[3]:p[3] + p[4] * p[5]].reshape((p[4], p[5]))
            has_res = p[6] >= 0
            res = arena[p[6]:p[6] + p[4] * p[5]].reshape((p[4], p[5])) if has_res else out
            if par:
                if p[23]:
                    zero_border_par(out, p[27], p[28], p[23], p[24], 1, p[13])
            elif p[23]:
                zero_border_seq(out, p[27], p[28], p[23], p[24], 1, p[13])
            if p[30] >= 0:  # unrolled code (its op stores no strip-kernel arrays)
                t = p[30]
                n_functions, block_rows, n_blocks, map_rows, map_cols = u32[t], u32[t + 1], u32[t + 2], u32[t + 3], u32[t + 4]
                prefetch_next = u32[t + 5] != 0
                w_at = t + 6  # the address words, then the weight starts, the row masks, the column masks
                s_at = w_at + 2 * n_functions
                m_at = s_at + n_functions
                words, starts = u32[w_at:s_at], u32[s_at:m_at]
                row_masks, col_masks = u32[m_at:m_at + map_rows], u32[m_at + map_rows:m_at + map_rows + map_cols]
                if par:
                    unrolled_conv_par(words, starts, n_blocks, f32[p[31]:], x_lanes, p[8], p[9], p[10], res.reshape(-1),
                                      out.reshape(-1), p[24], p[22], p[11], p[12], p[13], block_rows, False,
                                      row_masks, col_masks, prefetch_next)
                else:
                    unrolled_conv_seq(words, starts, n_blocks, f32[p[31]:], x_lanes, p[8], p[9], p[10], res.reshape(-1),
                                      out.reshape(-1), p[24], p[22], p[11], p[12], p[13], block_rows, True,
                                      row_masks, col_masks, prefetch_next)
            else:
                bounds = u32[p[16]:p[16] + p[4] * 2 * p[17]].reshape((p[4], 2 * p[17]))
                offsets, values, bias = u32[p[18]:p[18] + p[19]], f32[p[20]:p[20] + p[19]], f32[p[21]:p[21] + p[4]]
                keep = u32[p[26]:p[26] + 9]
                if par:
                    lane_conv_par(bounds, offsets, values, x_lanes, p[8], p[9], p[10], bias, res, has_res, p[7] != 0,
                                  out, p[24], p[22], p[11], p[12], p[13], p[14], p[15], p[25], keep, p[29])
                else:
                    lane_conv_seq(bounds, offsets, values, x_lanes, p[8], p[9], p[10], bias, res, has_res, p[7] != 0,
                                  out, p[24], p[22], p[11], p[12], p[13], p[14], p[15], p[25], keep, p[29])
        elif code == LANE_CONV_MAXPOOL:
            # p: x, C_in, plane_in, out (pooled, lanes), C_out, plane_out, relu, origin, step_y, step_x, conv OH, conv OW,
            #    lanes, cells_per_strip, block bounds (u32), n_blocks, tap offsets, nnz, values, bias, pool kernel,
            #    pool stride, pool pad, pooled OH, pooled OW, co_block, scratch, scratch rows (threads), item rows
            x_lanes = arena[p[0]:p[0] + p[1] * p[2]]
            out = arena[p[3]:p[3] + p[4] * p[5]].reshape((p[4], p[5]))
            bounds = u32[p[14]:p[14] + p[4] * 2 * p[15]].reshape((p[4], 2 * p[15]))
            offsets, values, bias = u32[p[16]:p[16] + p[17]], f32[p[18]:p[18] + p[17]], f32[p[19]:p[19] + p[4]]
            maps_len = p[25] * p[10] * p[11] * p[12]
            scratch = arena[p[26]:p[26] + p[27] * maps_len].reshape((p[27], maps_len))
            if par:
                zero_border_par(out, 0, p[23] + 2, p[23] + 2, p[24] + 2, 1, p[12])
                lane_conv_maxpool_par(bounds, offsets, values, x_lanes, p[7], p[8], p[9], bias, p[6] != 0, p[10],
                                      p[11], p[12], p[13], p[25], p[20], p[21], p[22], out, p[23], p[24], scratch, p[28])
            else:
                zero_border_seq(out, 0, p[23] + 2, p[23] + 2, p[24] + 2, 1, p[12])
                lane_conv_maxpool_seq(bounds, offsets, values, x_lanes, p[7], p[8], p[9], bias, p[6] != 0, p[10],
                                      p[11], p[12], p[13], p[25], p[20], p[21], p[22], out, p[23], p[24], scratch, p[28])
        elif code == LANE_MAXPOOL:
            # p: in, out, C, H, W, OH, OW, kernel, stride, pad, lanes, plane_in, plane_out (border 1 in and out)
            src = arena[p[0]:p[0] + p[2] * p[11]].reshape((p[2], p[11]))
            dst = arena[p[1]:p[1] + p[2] * p[12]].reshape((p[2], p[12]))
            if par:
                zero_border_par(dst, 0, p[5] + 2, p[5] + 2, p[6] + 2, 1, p[10])
                lane_maxpool_par(src, p[3], p[4], 1, p[7], p[8], p[9], dst, p[5], p[6], p[10])
            else:
                zero_border_seq(dst, 0, p[5] + 2, p[5] + 2, p[6] + 2, 1, p[10])
                lane_maxpool_seq(src, p[3], p[4], 1, p[7], p[8], p[9], dst, p[5], p[6], p[10])
        elif code == LANE_AVGPOOL:  # p: in (lanes, border 1), out [C, N], C, N, H, W, lanes, plane
            src = arena[p[0]:p[0] + p[2] * p[7]].reshape((p[2], p[7]))
            dst = arena[p[1]:p[1] + p[2] * p[3]].reshape((p[2], p[3]))
            if par:
                lane_avgpool_par(src, p[3], p[4], p[5], 1, p[6], dst)
            else:
                lane_avgpool_seq(src, p[3], p[4], p[5], 1, p[6], dst)
        elif code == CONV:
            # p: xq, xq_rows, xq_len, out, Cout, N, OH, OW, residual (-1: none), relu, hq, wq,
            #    rows_per_tile, scratch, scratch_rows, indptr, tap offsets, nnz, values, bias, scratch_row_len,
            #    out_row_len, grid_out (out and residual are grid activations)
            xq = arena[p[0]:p[0] + p[1] * p[2]].reshape((p[1], p[2]))
            out = arena[p[3]:p[3] + p[4] * p[21]].reshape((p[4], p[21]))
            has_res = p[8] >= 0
            res = arena[p[8]:p[8] + p[4] * p[21]].reshape((p[4], p[21])) if has_res else out
            scratch = arena[p[13]:p[13] + p[14] * p[20]].reshape((p[14], p[20]))
            indptr, offsets = u32[p[15]:p[15] + p[4] + 1], u32[p[16]:p[16] + p[17]]
            values, bias = f32[p[18]:p[18] + p[17]], f32[p[19]:p[19] + p[4]]
            if par:
                sparse_conv_par(indptr, offsets, values, xq, p[10], p[11], bias, res, has_res, p[9] != 0, p[12],
                                scratch, p[5], p[6], p[7], p[22] != 0, out)
            else:
                sparse_conv_seq(indptr, offsets, values, xq, p[10], p[11], bias, res, has_res, p[9] != 0, p[12],
                                scratch, p[5], p[6], p[7], p[22] != 0, out)
        elif code == IM2COL:
            # p: activation (CNHW), plane_len (N*H*W), out, C, taps, P, table (u32 offset), row_len, shifted (1: the
            #    table is in shift form)
            planes = arena[p[0]:p[0] + p[3] * p[1]].reshape((p[3], p[1]))
            cols = arena[p[2]:p[2] + p[3] * p[4] * p[7]].reshape((p[3] * p[4], p[7]))
            width = _table_width(p[5], p[8] != 0)
            table = u32[p[6]:p[6] + p[4] * width].reshape((p[4], width))
            if par:
                gather_columns_par(planes, table, cols, p[8] != 0)
            else:
                gather_columns_seq(planes, table, cols, p[8] != 0)
        elif code == CONV_GEMM:
            # p: cols, rows, pixels, out, Cout, residual (-1: none), relu, indptr, indices, nnz, values, bias, row_len,
            #    indices_u16 (1: indices live in u16)
            cols = arena[p[0]:p[0] + p[1] * p[12]].reshape((p[1], p[12]))
            out, res, has_res, indptr, values, bias = _product_operands(arena, u32, f32, p[3], p[4], p[2], p[5], p[7],
                                                                        p[9], p[10], p[11])
            if p[13]:
                csr_spmm_dispatch(indptr, u16[p[8]:p[8] + p[9]], values, cols, bias, res, has_res, p[6] != 0, out, par)
            else:
                csr_spmm_dispatch(indptr, u32[p[8]:p[8] + p[9]], values, cols, bias, res, has_res, p[6] != 0, out, par)
        elif code == GATHER_GEMM:
            # p: activation (CNHW), plane_len (N*H*W), C, taps, P, table (u32), row_len, cols (one copy per part),
            #    parts, out, Cout, residual (-1: none), relu, indptr, indices, nnz, values, bias, indices_u16, shifted
            planes = arena[p[0]:p[0] + p[2] * p[1]].reshape((p[2], p[1]))
            width = _table_width(p[4], p[19] != 0)
            table = u32[p[5]:p[5] + p[3] * width].reshape((p[3], width))
            cols = arena[p[7]:p[7] + p[8] * p[2] * p[3] * p[6]].reshape((p[8], p[2] * p[3], p[6]))
            out, res, has_res, indptr, values, bias = _product_operands(arena, u32, f32, p[9], p[10], p[4], p[11], p[13],
                                                                        p[15], p[16], p[17])
            if p[18]:
                _gather_gemm(planes, table, p[19] != 0, cols, indptr, u16[p[14]:p[14] + p[15]], values, bias, res,
                             has_res, p[12] != 0, out, par)
            else:
                _gather_gemm(planes, table, p[19] != 0, cols, indptr, u32[p[14]:p[14] + p[15]], values, bias, res,
                             has_res, p[12] != 0, out, par)
        elif code == LINEAR_CSR or code == LINEAR_BSR:
            # p: in, out, in_f, out_f, B, relu, indptr, n_ptr, indices, n_idx, values, n_values, bias, br, bc,
            #    indices_u16 (1: indices live in u16), column blocks (0: plain CSR; else indptr is
            #    `formats.column_blocks`' ptr)
            n_batch = p[4]
            xt = arena[p[0]:p[0] + p[2] * n_batch].reshape((p[2], n_batch))
            out = arena[p[1]:p[1] + p[3] * n_batch].reshape((p[3], n_batch))
            indptr = u32[p[6]:p[6] + p[7]]
            values, bias, relu = f32[p[10]:p[10] + p[11]], f32[p[12]:p[12] + p[3]], p[5] != 0
            if code == LINEAR_BSR:
                blocks = values.reshape((p[9], p[13], p[14]))
                if par:
                    bsr_spmm_par(indptr, u32[p[8]:p[8] + p[9]], blocks, xt, bias, relu, out)
                else:
                    bsr_spmm_seq(indptr, u32[p[8]:p[8] + p[9]], blocks, xt, bias, relu, out)
            elif p[16] and p[15]:
                if par:
                    csr_spmm_blocked_par(indptr, u16[p[8]:p[8] + p[9]], values, p[16], xt, bias, relu, out)
                else:
                    csr_spmm_blocked_seq(indptr, u16[p[8]:p[8] + p[9]], values, p[16], xt, bias, relu, out)
            elif p[16]:
                if par:
                    csr_spmm_blocked_par(indptr, u32[p[8]:p[8] + p[9]], values, p[16], xt, bias, relu, out)
                else:
                    csr_spmm_blocked_seq(indptr, u32[p[8]:p[8] + p[9]], values, p[16], xt, bias, relu, out)
            elif p[15]:
                csr_spmm_dispatch(indptr, u16[p[8]:p[8] + p[9]], values, xt, bias, out, False, relu, out, par)
            else:
                csr_spmm_dispatch(indptr, u32[p[8]:p[8] + p[9]], values, xt, bias, out, False, relu, out, par)
        elif code == LINEAR_SLICED:
            # p: in, out, in_f, out_f, relu, slice_ptr, n_ptr, steps, values, n_stored, first_col, lengths,
            #    rows, lanes, bias, sums (arena scratch of `lanes` floats), steps in u16 (else u8); see
            #    kernels/sliced.py
            n_lanes = p[13]
            x_in, out, sums = arena[p[0]:p[0] + p[2]], arena[p[1]:p[1] + p[3]], arena[p[15]:p[15] + n_lanes]
            slice_ptr, values = u32[p[5]:p[5] + p[6]], f32[p[8]:p[8] + p[9]]
            first_col, lengths, rows = u32[p[10]:p[10] + n_lanes], u32[p[11]:p[11] + n_lanes], u32[p[12]:p[12] + n_lanes]
            bias = f32[p[14]:p[14] + p[3]]
            if p[16]:
                sliced_matvec(slice_ptr, u16[p[7]:p[7] + p[9]], values, first_col, lengths, rows, bias, x_in, p[4] != 0,
                              sums, out, par)
            else:
                sliced_matvec(slice_ptr, u8[p[7]:p[7] + p[9]], values, first_col, lengths, rows, bias, x_in, p[4] != 0,
                              sums, out, par)
        elif code == MAXPOOL:  # p: in, out, C, N, H, W, OH, OW, kernel, stride, pad
            src = arena[p[0]:p[0] + p[2] * p[3] * p[4] * p[5]].reshape((p[2], p[3], p[4], p[5]))
            dst = arena[p[1]:p[1] + p[2] * p[3] * p[6] * p[7]].reshape((p[2], p[3], p[6], p[7]))
            if par:
                maxpool_par(src, p[8], p[9], p[10], dst)
            else:
                maxpool_seq(src, p[8], p[9], p[10], dst)
        elif code == GLOBAL_AVGPOOL:  # p: in, out, C, N, H*W
            src = arena[p[0]:p[0] + p[2] * p[3] * p[4]].reshape((p[2], p[3], p[4]))
            dst = arena[p[1]:p[1] + p[2] * p[3]].reshape((p[2], p[3]))
            if par:
                global_avgpool_par(src, dst)
            else:
                global_avgpool_seq(src, dst)
        elif code == ADD:  # p: a, b, out, size, relu
            a, b, dst = arena[p[0]:p[0] + p[3]], arena[p[1]:p[1] + p[3]], arena[p[2]:p[2] + p[3]]
            for q in range(p[3]):
                v = a[q] + b[q]
                dst[q] = relu_or_identity(v, p[4] != 0)
        elif code == RELU:  # p: in, out, size
            src, dst = arena[p[0]:p[0] + p[2]], arena[p[1]:p[1] + p[2]]
            for q in range(p[2]):
                v = src[q]
                dst[q] = relu_or_identity(v, True)
        elif code == CNHW_TO_FEATURES:  # p: in, out, C, N, H*W  -> out[C*HW, N] (torch.flatten order)
            n_chan, n_img, hw = p[2], p[3], p[4]
            src = arena[p[0]:p[0] + n_chan * n_img * hw].reshape((n_chan, n_img, hw))
            dst = arena[p[1]:p[1] + n_chan * n_img * hw].reshape((n_chan * hw, n_img))
            for c in range(n_chan):
                for n in range(n_img):
                    for q in range(hw):
                        dst[c * hw + q, n] = src[c, n, q]


# A batch split between the threads runs `run_plan` once per share, each on its own thread, through a C
# function's address: a direct call from the parallel loop linked run_plan's code (every kernel) into the loop
# and optimized it all again, 44 s the first time a machine ran a split batch. Through the address the loop
# compiles in under a second and the C wrapper in 12 s; calls run as fast (paired turns, resnet18 98% at batch
# 64: 0.99x). The address travels as an integer: passed as a Numba function object, each call spent 16 us
# typing it.
_ADDRESS = types.uintp
_RUN_PLAN_AT = types.void(_ADDRESS, types.intp, types.intp, _ADDRESS, types.intp, _ADDRESS, types.intp, _ADDRESS,
                          types.intp, _ADDRESS, types.intp, _ADDRESS, types.intp, _ADDRESS, types.intp)


@intrinsic
def _pointer(typingctx, address):
    """An address (uintp) as a void pointer, for carray."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))
    return types.voidptr(_ADDRESS), codegen


@intrinsic
def _call_run_plan_at(typingctx, function, ops, n_rows, n_cols, arena, n_arena, f32, n_f32, u32, n_u32, u16, n_u16,
                      u8, n_u8, x, n_x):
    """Call the C function at address `function` (`_run_plan_at`, signature _RUN_PLAN_AT): integers all."""
    args = (ops, n_rows, n_cols, arena, n_arena, f32, n_f32, u32, n_u32, u16, n_u16, u8, n_u8, x, n_x)
    if not all(isinstance(a, types.Integer) for a in (function, *args)):
        return None

    def codegen(context, builder, signature, values):
        i64 = context.get_value_type(types.intp)
        c_function = ir.FunctionType(ir.VoidType(), [i64] * len(args))
        target = builder.inttoptr(values[0], c_function.as_pointer())
        builder.call(target, [context.cast(builder, v, t, types.intp) for v, t in zip(values[1:], signature.args[1:])])
        return context.get_dummy_value()
    return types.void(function, *args), codegen


def _run_plan_at(ops, n_rows, n_cols, arena, n_arena, f32, n_f32, u32, n_u32, u16, n_u16, u8, n_u8, x, n_x):
    """`run_plan` on C-contiguous arrays given as address and length (the caller keeps them alive)."""
    run_plan(carray(_pointer(ops), (n_rows, n_cols), dtype=np.int64), carray(_pointer(arena), n_arena, dtype=np.float32),
             carray(_pointer(f32), n_f32, dtype=np.float32), carray(_pointer(u32), n_u32, dtype=np.uint32),
             carray(_pointer(u16), n_u16, dtype=np.uint16), carray(_pointer(u8), n_u8, dtype=np.uint8),
             carray(_pointer(x), n_x, dtype=np.float32))


_pointer_lock = threading.Lock()
_run_plan_pointer = []


def run_plan_pointer():
    """`_run_plan_at` as a C function, compiled (or loaded from the disk cache) on first use: compiled at import,
    it would compile every kernel before anyone asked for a split batch."""
    if not _run_plan_pointer:  # every split call asks: the lock only until it exists
        with _pointer_lock:
            if not _run_plan_pointer:
                _run_plan_pointer.append(cfunc(_RUN_PLAN_AT, cache=True)(_run_plan_at))
    return _run_plan_pointer[0]


@njit(parallel=True, **OPTIONS)
def run_plan_parts(run_plan_at, ops, arena, part_len, f32, u32, u16, u8, x, parts):
    """A batch split into `parts` equal shares (sparsert.plan.batch_parts): each thread runs the serial plan
    `ops` on its share of x (batch-major, so a contiguous slice) in its own part_len floats of arena.
    run_plan_at: `run_plan_pointer().address`; every array C-contiguous."""
    share = x.size // parts
    for t in prange(parts):
        part, xs = arena[t * part_len:(t + 1) * part_len], x[t * share:(t + 1) * share]
        _call_run_plan_at(run_plan_at, ops.ctypes.data, ops.shape[0], ops.shape[1], part.ctypes.data, part.size,
                          f32.ctypes.data, f32.size, u32.ctypes.data, u32.size, u16.ctypes.data, u16.size,
                          u8.ctypes.data, u8.size, xs.ctypes.data, xs.size)
