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
from llvmlite import ir
from numba import get_thread_id, njit, prange, types
from numba.core.errors import TypingError
from numba.extending import intrinsic

from ._jit import twin
from .layout import TILE, masked_move, transpose_tile
from .strip import VECTOR_BYTES, WIDE_VECTORS, cell_pair_strip, row_pair_strip, wide_strip

LANE_VECTOR = VECTOR_BYTES // 4  # float32 lanes per vector: the batch is padded to a multiple of it


def lane_count(n_img: int) -> int:
    """Lanes per cell for a batch of n_img: n_img rounded up to whole float32 vectors."""
    return -(-n_img // LANE_VECTOR) * LANE_VECTOR


def _make_window_max(n_vec: int):
    @intrinsic
    def window_max(typingctx, src, s0, ny, nx, row_step, cell_step, dst, d):
        """dst[d + i] = max over y < ny, x < nx of src[s0 + y * row_step + x * cell_step + i], i < 16 * n_vec
        (float32; NaN propagates, and of equal values the first seen stays, as in torch's max pool)."""
        for name, a in (("src", src), ("dst", dst)):
            if not isinstance(a, types.Array) or a.layout != "C" or a.dtype != types.float32:
                raise TypingError(f"window_max: {name} must be a C-contiguous float32 array, got {a}")
        sig = types.void(src, types.intp, types.intp, types.intp, types.intp, types.intp, dst, types.intp)

        def codegen(context, builder, signature, args):
            src_v, s0_v, ny_v, nx_v, row_v, cell_v, dst_v, d_v = args
            vec = ir.VectorType(ir.FloatType(), LANE_VECTOR)
            i64 = ir.IntType(64)
            src_ptr = context.make_array(signature.args[0])(context, builder, src_v).data
            dst_ptr = context.make_array(signature.args[6])(context, builder, dst_v).data

            def load(offset, v):
                ptr = builder.gep(src_ptr, [builder.add(offset, ir.Constant(i64, LANE_VECTOR * v))])
                return builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4)

            first = [load(s0_v, v) for v in range(n_vec)]
            # One loop over the ny * nx cells; the position steps to the next row with a select, not a division.
            count = builder.mul(ny_v, nx_v)
            row_skip = builder.sub(row_v, builder.mul(nx_v, cell_v))
            entry = builder.block
            body = builder.append_basic_block("window.loop")
            done = builder.append_basic_block("window.done")
            builder.cbranch(builder.icmp_signed(">", count, ir.Constant(i64, 0)), body, done)
            builder.position_at_end(body)
            t, x, pos = builder.phi(i64), builder.phi(i64), builder.phi(i64)
            best = [builder.phi(vec) for _ in range(n_vec)]
            for phi, value in ((t, ir.Constant(i64, 0)), (x, ir.Constant(i64, 0)), (pos, s0_v)):
                phi.add_incoming(value, entry)
            for phi, value in zip(best, first):
                phi.add_incoming(value, entry)
            stepped = []
            for v, b in enumerate(best):
                cell = load(pos, v)
                wins = builder.or_(builder.fcmp_ordered(">", cell, b), builder.fcmp_unordered("uno", cell, cell))
                stepped.append(builder.select(wins, cell, b))
            t_next, x_next = builder.add(t, ir.Constant(i64, 1)), builder.add(x, ir.Constant(i64, 1))
            wrap = builder.icmp_signed("==", x_next, nx_v)
            pos_next = builder.add(builder.add(pos, cell_v), builder.select(wrap, row_skip, ir.Constant(i64, 0)))
            end = builder.block
            for phi, value in ((t, t_next), (x, builder.select(wrap, ir.Constant(i64, 0), x_next)), (pos, pos_next)):
                phi.add_incoming(value, end)
            for phi, value in zip(best, stepped):
                phi.add_incoming(value, end)
            builder.cbranch(builder.icmp_signed("<", t_next, count), body, done)
            builder.position_at_end(done)
            results = [builder.phi(vec) for _ in range(n_vec)]
            for v, result in enumerate(results):
                result.add_incoming(first[v], entry)
                result.add_incoming(stepped[v], end)
            for v, result in enumerate(results):
                ptr = builder.gep(dst_ptr, [builder.add(d_v, ir.Constant(i64, LANE_VECTOR * v))])
                builder.store(result, builder.bitcast(ptr, vec.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return window_max


_window_max = tuple(_make_window_max(n) for n in range(1, 5))
window_max1, window_max2, window_max3, window_max4 = _window_max


@njit(inline="always", nogil=True)
def window_max(src, s0, ny, nx, row_step, cell_step, dst, d, lanes):
    """`window_max` over `lanes` (a multiple of 16) floats, in register groups of up to 4 vectors."""
    for i in range(0, lanes, 4 * LANE_VECTOR):
        left = lanes - i
        if left >= 4 * LANE_VECTOR:
            window_max4(src, s0 + i, ny, nx, row_step, cell_step, dst, d + i)
        elif left == 3 * LANE_VECTOR:
            window_max3(src, s0 + i, ny, nx, row_step, cell_step, dst, d + i)
        elif left == 2 * LANE_VECTOR:
            window_max2(src, s0 + i, ny, nx, row_step, cell_step, dst, d + i)
        else:
            window_max1(src, s0 + i, ny, nx, row_step, cell_step, dst, d + i)


@njit(inline="always", nogil=True)
def pool_row(src, origin, height, width, row_step, kernel, stride, pad, oy, out_w, lanes, dst):
    """Max-pool output row oy of one channel: a map of height x width cells of `lanes` floats in src, cell
    (0, 0) at origin, rows row_step apart, cells adjacent; written to the interior of dst, a lanes plane of
    out_w + 2 cells a row (border 1). Window cells outside the map never win."""
    y_lo, y_hi = max(oy * stride - pad, 0), min(oy * stride - pad + kernel, height)
    for ox in range(out_w):
        x_lo, x_hi = max(ox * stride - pad, 0), min(ox * stride - pad + kernel, width)
        window_max(src, origin + y_lo * row_step + x_lo * lanes, y_hi - y_lo, x_hi - x_lo, row_step, lanes, dst,
                   ((oy + 1) * (out_w + 2) + ox + 1) * lanes, lanes)


@njit(inline="always", nogil=True)
def cells_strip(x, src, step_x, lanes, n_cells, offsets, data, k0, k1, init, out, dst, add, has_add, relu):
    """One row nonzeros' sum over n_cells neighbouring output cells, from src (their first input cell) into
    out at dst (adding add[dst..] when has_add). At stride 1 the cells' inputs are adjacent: strips of up to
    WIDE_VECTORS vectors. At other strides two cells share one gapped strip (`cell_pair_strip`), a last odd
    cell takes its own."""
    if step_x != 1:
        for j in range(0, n_cells, 2):
            if n_cells - j >= 2:
                cell_pair_strip(x, src + j * step_x * lanes, step_x * lanes, offsets, data, k0, k1, init, out,
                                dst + j * lanes, lanes, add, dst + j * lanes, has_add, relu)
            else:
                wide_strip(x, src + j * step_x * lanes, 1, offsets, data, k0, k1, init, out, dst + j * lanes, lanes,
                           add, dst + j * lanes, has_add, relu, data, 0, False)
    else:
        width = WIDE_VECTORS * VECTOR_BYTES // x.itemsize
        n_valid = n_cells * lanes
        for j in range(0, n_valid, width):
            wide_strip(x, src + j, 1, offsets, data, k0, k1, init, out, dst + j, min(width, n_valid - j), add, dst + j,
                       has_add, relu, data, 0, False)


@njit(inline="always", nogil=True)
def rows_strip(x, src, x_row, step_x, lanes, n_rows, n_cells, offsets, data, k0, k1, init, out, dst, out_row, add,
               has_add, relu):
    """`cells_strip` over n_rows (1 or 2) output rows' segments, row r reading x from src + r * x_row and writing out
    (reading add) at dst + r * out_row: both rows in one `row_pair_strip` where each fills a whole WIDE_VECTORS
    strip (stride 1, or 2 at up to 64 lanes), else row by row."""
    wide = WIDE_VECTORS * VECTOR_BYTES // x.itemsize
    if n_rows == 2 and n_cells * lanes == wide and (step_x == 1 or (step_x == 2 and lanes <= 64)):
        row_pair_strip(x, src, x_row, offsets, data, k0, k1, init, out, dst, out_row, add, has_add, relu, step_x,
                       lanes)
    else:
        for r in range(n_rows):
            cells_strip(x, src + r * x_row, step_x, lanes, n_cells, offsets, data, k0, k1, init, out, dst + r * out_row,
                        add, has_add, relu)


@njit(inline="always", nogil=True)
def write_halo(plane, sy, x0, n, th, tw, tiles_x, keep):
    """Copy cells x0 .. x0 + n - 1 of frame row sy (interior) of a tiled lanes plane (`_to_tiles`: 16 tiles, one
    per lane) to the halo cells that hold them: a tile's first row is the bottom border of the tile above it, its
    last row the top border of the tile below, its first and last cells the right and left border cells of its
    neighbours, corners alike. The copy shifts the lanes by dy * tiles_x + dx (the neighbour's lane) and zeroes
    the tiles past the image (keep[(dy + 1) * 3 + dx + 1], bit t: tile t has a neighbour at (dy, dx))."""
    wq = tw + 2
    for dy in range(-1, 2):  # the row this one feeds: the top border (-1), its own row's side cells (0), the bottom
        if (dy == -1 and sy != th) or (dy == 1 and sy != 1):
            continue
        src = sy * wq * LANE_VECTOR + dy * tiles_x
        dst = (sy + dy * th) * wq * LANE_VECTOR
        if dy != 0:
            for sx in range(x0, x0 + n):
                masked_move(plane, src + sx * LANE_VECTOR, plane, dst + sx * LANE_VECTOR, keep[(dy + 1) * 3 + 1], LANE_VECTOR)
        if x0 <= tw < x0 + n:  # the last cell: the left border cell of the tile to the right
            masked_move(plane, src + tw * LANE_VECTOR - 1, plane, dst, keep[(dy + 1) * 3], LANE_VECTOR)
        if x0 <= 1 < x0 + n:  # the first cell: the right border cell of the tile to the left
            masked_move(plane, src + LANE_VECTOR + 1, plane, dst + (wq - 1) * LANE_VECTOR, keep[(dy + 1) * 3 + 2],
                        LANE_VECTOR)


def _lane_conv(bounds, offsets, data, x, origin, step_y, step_x, bias, residual, has_residual, relu, out, wq_out,
               out_origin, out_h, out_w, lanes, cells_per_strip, co_block, tiles_x, keep, item_rows):
    """out[co, cell(oy, ox)] = relu?(bias[co] + sum_k data[k] * x.flat[src(oy, ox) + offsets[k]] + residual[co, cell])
    for the out_h x out_w block of output cells whose first cell is out_origin (cell(oy, ox) = out_origin + oy *
    wq_out + ox): a whole map's interior, or one region of it (plan.lane_regions).

    In: x, a lanes activation as one flat array; offsets[k] = c * plane_in + (dy * wq_in + dx) * L for
    nonzero k at input channel c, tap (dy, dx); src(oy, ox) = (origin + oy * step_y + ox * step_x) * L,
    with origin the input cell of output (0, 0)'s top-left tap (step_y = stride * wq_in, step_x = stride).
    bounds[co, 2b], bounds[co, 2b + 1]: where row co's nonzeros in input-channel block b start and end
    (`channel_blocks`, which orders them block by block); the blocks run outermost so one block's input window
    (channels x taps x cells) stays in L1 while every output channel of the item reads it; each block
    after the first adds to the partial sums in `out`.
    Out: out[C_out, plane_out] (and residual alike), the block's cells written; borders are `zero_border`'s
    job, except on a tiled map (tiles_x > 0: `_to_tiles`), whose halo cells each item copies from its cells
    (`write_halo`, keep its masks), so that every tiled activation carries its halo for the next conv.
    Work items: item_rows (1 or 2) output rows' segments of cells_per_strip cells (at stride 1 neighbouring cells
    read neighbouring inputs, so up to 128 lanes share one 8-vector strip; 1.1-1.25x on ResNet convs at batch
    64) for co_block output channels. Where two rows' segments fill two whole WIDE_VECTORS strips, one
    `row_pair_strip` computes both (stride 1, or 2 at up to 64 lanes)."""
    n_out = out.shape[0]
    n_blocks = bounds.shape[1] // 2
    segments = (out_w + cells_per_strip - 1) // cells_per_strip
    blocks = (n_out + co_block - 1) // co_block
    zero = data[:0].sum()  # 0 in the weights' dtype
    # output rows outermost: a static split gives each thread rows
    for item in prange((out_h + item_rows - 1) // item_rows * segments * blocks):
        block = item % blocks
        ox = (item // blocks % segments) * cells_per_strip
        oy = item // blocks // segments * item_rows
        n_rows = min(item_rows, out_h - oy)
        n_cells = min(cells_per_strip, out_w - ox)
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
                rows_strip(x, src, step_y * lanes, step_x, lanes, n_rows, n_cells, offsets, data, bounds[co, 2 * b],
                           bounds[co, 2 * b + 1], init, out, row, wq_out * lanes, add, has_residual or not first,
                           relu and last)
        if tiles_x:  # a tiled map (whole tile, out_origin its first interior cell): its halo, from the final values
            for co in range(block * co_block, min(n_out, (block + 1) * co_block)):
                for r in range(n_rows):
                    write_halo(out[co], oy + r + 1, ox + 1, n_cells, out_h, out_w, tiles_x, keep)


def _lane_conv_maxpool(bounds, offsets, data, x, origin, step_y, step_x, bias, relu, conv_h, conv_w, lanes,
                       cells_per_strip, co_block, kernel, stride, pad, out, out_h, out_w, scratch, item_rows):
    """out = maxpool(relu?(conv(x))): a lanes conv (as `_lane_conv`, whole map, no residual) whose only reader is
    a max pool, fused so that the conv's map never reaches the arena.

    The pool window: kernel x kernel cells at stride `stride`, padding `pad` (padding never wins; NaN propagates,
    as in torch). In: x and the conv's parameters as in `_lane_conv`, its output conv_h x conv_w cells.
    Out: out[C_out, plane_out], a lanes activation (border 1, zeroed by the caller) of out_h x out_w cells.
    scratch[threads, >= co_block * conv_h * conv_w * lanes]: each thread's conv maps.
    Work items: co_block output channels. Their conv maps go to the thread's scratch row (torchvision resnet18's
    stem at batch 64: 64 KB a channel, kept in L2), computed cell by cell with the channels innermost so that
    they all read the cell's input window from L1, then pooled from there. Unfused, that stem wrote a 5.3 MB map
    which the pool read back: both ran at memory speed. Rows go item_rows at a time (`rows_strip`), as in
    `_lane_conv`."""
    n_out = out.shape[0]
    n_blocks = bounds.shape[1] // 2
    map_len = conv_h * conv_w * lanes
    zero = data[:0].sum()  # 0 in the weights' dtype
    for item in prange((n_out + co_block - 1) // co_block):
        co_first = item * co_block
        n_co = min(co_block, n_out - co_first)
        maps = scratch[get_thread_id()]
        for oy in range(0, conv_h, item_rows):
            n_rows = min(item_rows, conv_h - oy)
            for ox in range(0, conv_w, cells_per_strip):
                n_cells = min(cells_per_strip, conv_w - ox)
                src = (origin + oy * step_y + ox * step_x) * lanes
                for b in range(n_blocks):
                    first, last = b == 0, b == n_blocks - 1
                    for i in range(n_co):
                        co = co_first + i
                        dst = i * map_len + (oy * conv_w + ox) * lanes
                        rows_strip(x, src, step_y * lanes, step_x, lanes, n_rows, n_cells, offsets, data,
                                   bounds[co, 2 * b], bounds[co, 2 * b + 1], bias[co] if first else zero, maps, dst,
                                   conv_w * lanes, maps, not first, relu and last)
        for i in range(n_co):
            for oy in range(out_h):
                pool_row(maps, i * map_len, conv_h, conv_w, conv_w * lanes, kernel, stride, pad, oy, out_w, lanes,
                         out[co_first + i])


def channel_blocks(indptr, columns, taps: int, chans_per_block: int, n_chan: int, group: int):
    """The nonzeros of a conv's CSR (columns c * taps + tap, sorted within each row) regrouped for the lanes
    kernels, which walk input-channel blocks outermost and, inside a block, `group` output rows (one work item's
    channels) in turn: (bounds, order). order: the new position's old nonzero index, so that within each group
    of rows block 0's nonzeros come first, row by row, then block 1's, and so on: a block pass then streams its
    weights instead of jumping from row to row (3-6% per conv at batch 64, A/B). bounds[row, 2b] and
    bounds[row, 2b + 1]: where row's nonzeros in block b start and end in that order (uint32)."""
    n_blocks = max(1, -(-n_chan // chans_per_block))
    indptr = np.asarray(indptr).astype(np.int64)
    rows = len(indptr) - 1

    def rank(row, block):  # position of a (row, block) segment in the new order
        return (row // group * n_blocks + block) * rows + row

    row = np.repeat(np.arange(rows), np.diff(indptr))
    nonzero_rank = rank(row, np.minimum(np.asarray(columns).astype(np.int64) // (chans_per_block * taps), n_blocks - 1))
    order = np.argsort(nonzero_rank, kind="stable")  # stable: CSR order within a segment
    segment_rank = rank(*np.meshgrid(np.arange(rows), np.arange(n_blocks), indexing="ij"))
    ranked = nonzero_rank[order]
    bounds = np.empty((rows, 2 * n_blocks), np.int64)
    bounds[:, 0::2] = np.searchsorted(ranked, segment_rank, side="left")
    bounds[:, 1::2] = np.searchsorted(ranked, segment_rank, side="right")
    return bounds.astype(np.uint32), order


def _zero_border(out, y0, y1, hq, wq, border, lanes):
    """Zero the border cells in rows y0..y1-1 (of hq, border included) of every channel of a lanes activation
    out[C, plane]: all of them, or one band's (sparsert.bands)."""
    for c in prange(out.shape[0]):
        plane = out[c]
        for y in range(y0, y1):
            inner = border <= y < hq - border
            for xx in range(wq):
                if inner and border <= xx < wq - border:
                    continue
                base = (y * wq + xx) * lanes
                plane[base:base + lanes] = 0.0


def _to_lanes(x, strides, n_img, height, width, border, lanes, out):
    """out[c] = the lanes plane of channel c of x, border and spare lanes zeroed.

    In: x flat, element (n, c, y, x) at strides (n, c, y, x) (NCHW input or a CNHW buffer). Out: out[C, plane].
    Work items: one plane row of one channel. Where pixels are contiguous (x stride 1), 16 images x 16 pixels
    move as one register-transposed tile (`layout.transpose_tile`); the scalar loop, one strided load per
    value, took 0.2 ms for a 64 x 3 x 32 x 32 input (torchvision resnet18 at batch 64: 6% of the plan)."""
    wq, hq = width + 2 * border, height + 2 * border
    plane_len = out.shape[1]
    sn, sc, sy, sx = strides[0], strides[1], strides[2], strides[3]
    full_n = n_img - n_img % TILE if sx == 1 else 0
    full_x = width - width % TILE
    flat_out = out.reshape(-1)
    for cy in prange(out.shape[0] * hq):
        c, y = cy // hq, cy % hq
        plane = out[c]
        row = y * wq * lanes
        if y < border or y >= hq - border:
            plane[row:row + wq * lanes] = 0.0
            if y == hq - 1:
                plane[hq * wq * lanes:] = 0.0  # the plane's padding past its last row
            continue
        plane[row:row + border * lanes] = 0.0
        plane[row + (wq - border) * lanes:row + wq * lanes] = 0.0
        src_row = c * sc + (y - border) * sy
        for n0 in range(0, full_n, TILE):
            for x0 in range(0, full_x, TILE):
                transpose_tile(x, src_row + n0 * sn + x0, sn, flat_out, c * plane_len + row + (x0 + border) * lanes + n0,
                               lanes)
        for xx in range(width):
            base = row + (xx + border) * lanes
            src = src_row + xx * sx
            for n in range(full_n if xx < full_x else 0, n_img):
                plane[base + n] = x[src + n * sn]
            plane[base + n_img:base + lanes] = 0.0


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
    Each window's running max stays in registers (`window_max`): Numba's own loop over a cell's lanes kept it
    in memory behind an aliasing check, ~1.3 values a cycle."""
    wq = width + 2 * border
    for cy in prange(out.shape[0] * out_h):
        c, oy = cy // out_h, cy % out_h
        pool_row(x[c], (border * wq + border) * lanes, height, width, wq * lanes, kernel, stride, pad, oy, out_w, lanes,
                 out[c])


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


def _to_tiles(x, tiles_y, tiles_x, lanes, out):
    """out[c] = the tiled lanes plane of channel c of a batch-1 image x[C, H, W]: the image cut into
    tiles_y x tiles_x tiles of th x tw pixels, tile t = ty * tiles_x + tx in lane t of every cell. Cell (y, xx)
    of the (th + 2) x (tw + 2) frame, lane t, holds pixel (ty * th + y - 1, tx * tw + xx - 1): the frame's border
    is the neighbouring tiles' edge pixels (the halo; zero past the image), so a 3x3 conv reads a tile's
    neighbourhood as it reads a batch image's zero padding. Spare lanes and the plane's padding are zeroed."""
    n_chan, height, width = x.shape
    th, tw = height // tiles_y, width // tiles_x
    hq, wq = th + 2, tw + 2
    for cy in prange(n_chan * hq):
        c, y = cy // hq, cy % hq
        plane = out[c]
        plane[y * wq * lanes:(y + 1) * wq * lanes] = 0.0
        if y == hq - 1:
            plane[hq * wq * lanes:] = 0.0
        for ty in range(tiles_y):
            iy = ty * th + y - 1
            if iy < 0 or iy >= height:
                continue
            for tx in range(tiles_x):
                t = ty * tiles_x + tx
                for xx in range(wq):
                    ix = tx * tw + xx - 1
                    if 0 <= ix < width:
                        plane[(y * wq + xx) * lanes + t] = x[c, iy, ix]


def _from_tiles(x, tiles_y, tiles_x, lanes, out):
    """out[c, Y, X] = the image pixel a tiled lanes activation x[C, plane] holds (see `_to_tiles`), interior cells
    only. Out: out[C, H, W] (batch-1 CNHW)."""
    n_chan, height, width = out.shape
    th, tw = height // tiles_y, width // tiles_x
    wq = tw + 2
    for c in prange(n_chan):
        plane = x[c]
        for ty in range(tiles_y):
            for y in range(th):
                for tx in range(tiles_x):
                    t = ty * tiles_x + tx
                    for xx in range(tw):
                        out[c, ty * th + y, tx * tw + xx] = plane[((y + 1) * wq + xx + 1) * lanes + t]


lane_conv_par, lane_conv_seq = twin(_lane_conv)
to_tiles_par, to_tiles_seq = twin(_to_tiles)
from_tiles_par, from_tiles_seq = twin(_from_tiles)
lane_conv_maxpool_par, lane_conv_maxpool_seq = twin(_lane_conv_maxpool)
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


__all__ = ["LANE_VECTOR", "channel_blocks", "lane_count", "lane_offsets", "lane_conv_par", "lane_conv_seq", "lane_conv_maxpool_par",
           "lane_conv_maxpool_seq", "zero_border_par",
           "zero_border_seq", "to_lanes_par", "to_lanes_seq", "from_lanes_par", "from_lanes_seq", "lane_maxpool_par",
           "lane_maxpool_seq", "lane_avgpool_par", "lane_avgpool_seq", "to_tiles_par", "to_tiles_seq", "from_tiles_par",
           "from_tiles_seq"]
