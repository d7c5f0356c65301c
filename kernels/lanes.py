"""Batch-in-lanes activations (CHWN, "lanes" in the plan) and the conv, pools and conversions on them.

Layout: channel c is a plane of (H + 2b) x (W + 2b) cells with a zero border of b cells; each cell holds
L >= N lanes, the batch (L is N rounded up to whole vectors; lanes past N carry values no real lane
reads). Element (c, n, y, x) sits at c * plane + ((y + b) * wq + x + b) * L + n, with wq = W + 2b.

Why: at batch 16 and up, the batch itself is the contiguous vector each nonzero weight is broadcast
against. Every tap (dy, dx) of every conv moves by whole cells, i.e. whole cache lines, so no vector
load splits a line (the pixel-major grid's +-1 shifts split ~15 of 16 loads and capped the strip
kernel at ~31 GMAC/s per core, vs ~52 aligned). Strides need no phase split, the border supplies the
padding without masks, and no border cell is ever computed. Pixel-major layouts stay for small batches,
where a cell's lanes would be mostly empty.
"""
import numpy as np
from numba import prange

from ._jit import twin
from .strip import STRIP_VECTORS, VECTOR_BYTES, wide_strip

LANE_VECTOR = VECTOR_BYTES // 4  # float32 lanes per vector: the batch is padded to a multiple of it


def lane_count(n_img: int) -> int:
    """Lanes per cell for a batch of n_img: n_img rounded up to whole float32 vectors."""
    return -(-n_img // LANE_VECTOR) * LANE_VECTOR


def _lane_conv(block_ptr, offsets, data, x, origin, step_y, step_x, bias, residual, has_residual, relu, out, wq_out,
               out_origin, out_h, out_w, lanes, cells_per_strip, co_block):
    """out[co, cell(oy, ox)] = relu?(bias[co] + sum_k data[k] * x.flat[src(oy, ox) + offsets[k]] + residual[co, cell])
    for the out_h x out_w block of output cells whose first cell is out_origin (cell(oy, ox) = out_origin + oy *
    wq_out + ox): a whole map's interior, or one region of it (plan.lane_regions).

    In: x, a lanes activation as one flat array; offsets[k] = c * plane_in + (dy * wq_in + dx) * L for
    nonzero k at input channel c, tap (dy, dx); src(oy, ox) = (origin + oy * step_y + ox * step_x) * L,
    with origin the input cell of output (0, 0)'s top-left tap (step_y = stride * wq_in, step_x = stride).
    block_ptr[co, b]: the CSR row pointers split by input-channel block (row co's nonzeros in block b are
    block_ptr[co, b] to block_ptr[co, b + 1]); the blocks run outermost so one block's input window
    (channels x taps x cells) stays in L1 while every output channel of the item reads it; each block
    after the first adds to the partial sums in `out`.
    Out: out[C_out, plane_out] (and residual alike), the block's cells written; borders are `zero_border`'s
    job. Work items: one output row segment of cells_per_strip cells (at stride 1 neighbouring cells read
    neighbouring inputs, so up to 128 lanes share one 8-vector strip; 1.1-1.25x on ResNet convs at batch
    64) for co_block output channels."""
    n_out = out.shape[0]
    n_blocks = block_ptr.shape[1] - 1
    width = 2 * STRIP_VECTORS * VECTOR_BYTES // x.itemsize  # `wide_strip`: up to 8 vectors
    segments = (out_w + cells_per_strip - 1) // cells_per_strip
    blocks = (n_out + co_block - 1) // co_block
    zero = data[:0].sum()  # 0 in the weights' dtype
    for item in prange(out_h * segments * blocks):
        block = item % blocks
        ox = (item // blocks % segments) * cells_per_strip
        oy = item // blocks // segments
        n_valid = min(cells_per_strip, out_w - ox) * lanes
        src = (origin + oy * step_y + ox * step_x) * lanes
        dst = (out_origin + oy * wq_out + ox) * lanes
        for b in range(n_blocks):
            first, last = b == 0, b == n_blocks - 1
            # The first block starts from the bias and the residual, later ones from the partial sums in out;
            # one call site either way (each inlines the whole strip kernel).
            add = residual if first else out
            for co in range(block * co_block, min(n_out, (block + 1) * co_block)):
                row = co * out.shape[1] + dst
                init = bias[co] if first else zero
                for j in range(0, n_valid, width):
                    wide_strip(x, src + j, 1, offsets, data, block_ptr[co, b], block_ptr[co, b + 1], init, out, row + j,
                               min(width, n_valid - j), add, row + j, has_residual or not first, relu and last, data,
                               0, False)


def channel_block_ptr(indptr, columns, taps: int, chans_per_block: int, n_chan: int) -> np.ndarray:
    """block_ptr[row, b]: where row's nonzeros at input channels >= b * chans_per_block start (CSR columns
    are c * taps + tap, sorted within each row). Shape [rows, n_blocks + 1]."""
    n_blocks = max(1, -(-n_chan // chans_per_block))
    rows = len(indptr) - 1
    out = np.empty((rows, n_blocks + 1), np.uint32)
    columns = np.asarray(columns).astype(np.int64)
    for r in range(rows):
        lo, hi = int(indptr[r]), int(indptr[r + 1])
        bounds = np.arange(n_blocks + 1) * chans_per_block * taps
        out[r] = lo + np.searchsorted(columns[lo:hi], bounds, side="left")
        out[r, -1] = hi
    return out


def _zero_border(out, hq, wq, border, lanes):
    """Zero the border cells of every channel of a lanes activation out[C, plane]."""
    for c in prange(out.shape[0]):
        plane = out[c]
        for y in range(hq):
            inner = border <= y < hq - border
            for xx in range(wq):
                if inner and border <= xx < wq - border:
                    continue
                base = (y * wq + xx) * lanes
                plane[base:base + lanes] = 0.0


def _to_lanes(x, strides, n_img, height, width, border, lanes, out):
    """out[c] = the lanes plane of channel c of x, border and spare lanes zeroed.

    In: x flat, element (n, c, y, x) at strides (n, c, y, x) (NCHW input or a CNHW buffer). Out: out[C, plane]."""
    wq = width + 2 * border
    sn, sc, sy, sx = strides[0], strides[1], strides[2], strides[3]
    for c in prange(out.shape[0]):
        plane = out[c]
        for q in range(plane.shape[0]):
            plane[q] = 0.0
        for y in range(height):
            for xx in range(width):
                base = ((y + border) * wq + xx + border) * lanes
                src = c * sc + y * sy + xx * sx
                for n in range(n_img):
                    plane[base + n] = x[src + n * sn]


def _from_lanes(x, n_img, height, width, border, lanes, out):
    """out[c, n, y, x] = lanes activation x[c, plane] at (n, y, x). Out: out[C, N, H, W] (CNHW)."""
    wq = width + 2 * border
    for c in prange(out.shape[0]):
        plane = x[c]
        for y in range(height):
            for xx in range(width):
                base = ((y + border) * wq + xx + border) * lanes
                for n in range(n_img):
                    out[c, n, y, xx] = plane[base + n]


def _lane_maxpool(x, height, width, border, kernel, stride, pad, out, out_h, out_w, lanes):
    """Max over each window of a lanes activation (window cells outside the image never win; NaN
    propagates, as in torch). Out: out[C, plane_out], interior cells only (border 1 zeroed by the caller).
    The running max lives in a local row of lanes, not in `out`, which may alias x as far as LLVM knows
    (torchvision resnet18's pool at batch 64: 1.1 -> 0.8 ms). Cells are read and written through slice
    views: indexing the plane with a signed `base + n` kept Numba's negative-index wraparound, which LLVM
    vectorised as a gather (0.6 -> 0.21 ms)."""
    wq, wq_out = width + 2 * border, out_w + 2
    for cy in prange(out.shape[0] * out_h):
        c, oy = cy // out_h, cy % out_h
        src, dst = x[c], out[c]
        best = np.empty(lanes, dtype=x.dtype)
        y_lo, y_hi = max(oy * stride - pad, 0), min(oy * stride - pad + kernel, height)
        for ox in range(out_w):
            x_lo, x_hi = max(ox * stride - pad, 0), min(ox * stride - pad + kernel, width)
            first = ((y_lo + border) * wq + x_lo + border) * lanes
            best[:] = src[first:first + lanes]
            for y in range(y_lo, y_hi):
                for xx in range(x_lo, x_hi):
                    s = ((y + border) * wq + xx + border) * lanes
                    cell = src[s:s + lanes]
                    for n in range(lanes):
                        v, b = cell[n], best[n]
                        best[n] = v if v > b or v != v else b
            o = ((oy + 1) * wq_out + ox + 1) * lanes
            dst[o:o + lanes] = best


def _lane_avgpool(x, n_img, height, width, border, lanes, out):
    """out[c, n] = mean over the image of lanes activation x[c, plane]. Out: out[C, N] (feature-major)."""
    wq = width + 2 * border
    for c in prange(out.shape[0]):
        plane = x[c]
        acc = np.zeros(lanes, dtype=np.float64)
        for y in range(height):
            for xx in range(width):
                base = ((y + border) * wq + xx + border) * lanes
                for n in range(lanes):
                    acc[n] += plane[base + n]
        for n in range(n_img):
            out[c, n] = acc[n] / (height * width)


lane_conv_par, lane_conv_seq = twin(_lane_conv)
zero_border_par, zero_border_seq = twin(_zero_border)
to_lanes_par, to_lanes_seq = twin(_to_lanes)
from_lanes_par, from_lanes_seq = twin(_from_lanes)
lane_maxpool_par, lane_maxpool_seq = twin(_lane_maxpool)
lane_avgpool_par, lane_avgpool_seq = twin(_lane_avgpool)


def lane_offsets(columns, kernel_size, dilation, plane: int, wq: int, lanes: int):
    """Per nonzero (column = c * kh * kw + i * kw + j of the conv's CSR), its shift into a lanes
    activation: c * plane + (i * dh * wq + j * dw) * L (uint32, or uint64 past 2**32)."""
    kh, kw = kernel_size
    cols = np.asarray(columns).astype(np.uint64)
    chan, tap = cols // np.uint64(kh * kw), cols % np.uint64(kh * kw)
    dy, dx = (tap // np.uint64(kw)) * np.uint64(dilation[0]), (tap % np.uint64(kw)) * np.uint64(dilation[1])
    offsets = chan * np.uint64(plane) + (dy * np.uint64(wq) + dx) * np.uint64(lanes)
    return offsets.astype(np.uint32) if offsets.size == 0 or offsets.max() < 2 ** 32 else offsets


__all__ = ["LANE_VECTOR", "channel_block_ptr", "lane_count", "lane_offsets", "lane_conv_par", "lane_conv_seq", "zero_border_par",
           "zero_border_seq", "to_lanes_par", "to_lanes_seq", "from_lanes_par", "from_lanes_seq", "lane_maxpool_par",
           "lane_maxpool_seq", "lane_avgpool_par", "lane_avgpool_seq"]
