"""Direct sparse convolution (no im2col). Pure functions on raw arrays; the caller allocates `out`.

Layout: the input is packed once per layer into `xq[C*s*s, N*Hq*Wq + slack]`: zero-padded,
split into s*s stride phases, batch folded into the flat pixel axis. In that layout every
nonzero weight (out channel co, phase channel c, tap offset dy, dx) adds `w * xq[c, q + dy*Wq + dx]`
to output grid position q, so each nonzero is one contiguous multiply-add over many pixels,
whatever the kernel size, stride, dilation or groups. Grid positions with ow >= OW or oh >= OH
are computed and discarded; the epilogue writes only valid pixels, fusing bias, residual and ReLU.
"""
import numpy as np
from numba import get_thread_id, njit, prange

from ._jit import OPTIONS, relu_or_identity, thread_count, twin
from .layout import masked_move
from .strip import STRIP_VECTORS, VECTOR_BYTES, row_strip

# Zero cells around each image of a grid activation (see `_grid_conv`): the padding of the 3x3 'same'
# convs. The one definition of the layout; the kernels write and read a border of exactly this one cell.
GRID_BORDER = 1


def _pack_input(x, x_strides, n_img, n_chan, height, width, pad_top, pad_left, stride_h, stride_w, hq, wq, out):
    """out[(c*sh + py)*sw + px, n*hq*wq + i*wq + j] = x_padded[n, c, i*sh + py, j*sw + px] (0 outside x).

    In: x, a flat array holding x[N, C, H, W] at element strides x_strides (n, c, h, w).
    Out: out[C*sh*sw, >= N*hq*wq], fully written (slack zeroed). Flat unsigned indexing: per-row
    array views cost more than the copy on small maps, and signed offsets add wraparound checks."""
    phases = stride_h * stride_w
    sn, sc, sh, sw_ = np.uintp(x_strides[0]), np.uintp(x_strides[1]), np.uintp(x_strides[2]), np.uintp(x_strides[3])
    for cq in prange(n_chan * phases):
        c = cq // phases
        py = (cq % phases) // stride_w
        px = cq % stride_w
        row = out[cq]
        # columns j with 0 <= j*sw + px - pad_left < width; everything else is padding (zero)
        j_lo = min(wq, max(0, (pad_left - px + stride_w - 1) // stride_w))
        j_hi = max(j_lo, min(wq, (width - 1 + pad_left - px) // stride_w + 1))
        step = np.uintp(stride_w) * sw_
        for n in range(n_img):
            for i in range(hq):
                base = np.uintp((n * hq + i) * wq)
                h = i * stride_h + py - pad_top
                if h < 0 or h >= height:
                    for j in range(wq):
                        row[base + np.uintp(j)] = 0.0
                    continue
                for j in range(j_lo):
                    row[base + np.uintp(j)] = 0.0
                src = np.uintp(n) * sn + np.uintp(c) * sc + np.uintp(h) * sh + \
                    np.uintp(j_lo * stride_w + px - pad_left) * sw_
                dst = base + np.uintp(j_lo)
                if step == 1:  # contiguous source row: a plain vectorisable copy
                    for q in range(j_hi - j_lo):
                        row[dst + np.uintp(q)] = x[src + np.uintp(q)]
                else:
                    for q in range(j_hi - j_lo):
                        row[dst + np.uintp(q)] = x[src + np.uintp(q) * step]
                for j in range(j_hi, wq):
                    row[base + np.uintp(j)] = 0.0
        for j in range(n_img * hq * wq, row.shape[0]):  # slack read by the last tiles' shifted taps
            row[j] = 0.0


def _sparse_conv(indptr, offsets, data, xq, hq, wq, bias, residual, has_residual, relu, rows_per_tile, scratch,
                 n_img, out_h, out_w, grid_out, out):
    """Direct sparse conv over the packed input; epilogue out = relu?(acc + bias + residual).

    In: CSR rows = output channels; per nonzero k, offsets[k] = chan * xq_len + dy * wq + dx (its tap's
    shift into the flat packed input) and data[k]; xq[rows, xq_len] from `_pack_input`, C-contiguous;
    scratch[n_threads, >= rows_per_tile*wq]. Out: out[Cout, row_len] holding N images of out_h x out_w,
    dense CNHW (row_len = N*out_h*out_w) or, with grid_out, a grid activation (see `_grid_conv`; its
    border cells are written as zeros here). residual: same layout as out (read unless has_residual is
    False). Cost: O(nnz * N * hq * wq)."""
    n_out = out.shape[0]
    grid_rows = n_img * hq
    n_tiles = (grid_rows + rows_per_tile - 1) // rows_per_tile
    width = STRIP_VECTORS * VECTOR_BYTES // xq.itemsize
    out_wg = out_w + 2 * GRID_BORDER  # grid row length of a grid output
    cells = (out_h + 2 * GRID_BORDER) * out_wg
    # Tile-major order: consecutive items share one tile of grid rows, so that tile's slice of every
    # input channel stays in L2 while all output channels read it (co-major streamed it from L3).
    for item in prange(n_out * n_tiles):
        co = item % n_out
        r0 = (item // n_out) * rows_per_tile
        r1 = min(r0 + rows_per_tile, grid_rows)
        q0 = r0 * wq
        length = (r1 - r0) * wq
        thread = get_thread_id()
        base = thread * scratch.shape[1]
        # The tile's grid values in strips of register-held accumulators (`strip.row_strip`).
        for s0 in range(0, length, width):
            row_strip(xq, q0 + s0, 1, offsets, data, indptr[co], indptr[co + 1], bias[co], scratch, base + s0,
                      min(width, length - s0), scratch, 0, False, False, scratch, 0, False)
        acc = scratch[thread]
        dst_row, res_row = out[co], residual[co]
        for r in range(r0, r1):
            n = r // hq
            oh = r - n * hq
            if oh >= out_h:
                continue
            if grid_out:
                pos = n * cells + (oh + 1) * out_wg + 1
                dst_row[pos - 1] = 0.0
                dst_row[pos + out_w] = 0.0
                if oh == 0:
                    dst_row[n * cells:n * cells + out_wg] = 0.0
                if oh == out_h - 1:
                    dst_row[pos + out_w + 1:pos + out_w + 1 + out_wg] = 0.0
            else:
                pos = (n * out_h + oh) * out_w
            # Flat unsigned indices, no per-row views: on small maps (torchvision resnet18's stem at batch 1, 64
            # channels of 16 rows) the views cost more than the row's values.
            a, d = np.uintp((r - r0) * wq), np.uintp(pos)
            if has_residual:
                for ow in range(np.uintp(out_w)):
                    dst_row[d + ow] = relu_or_identity(acc[a + ow] + res_row[d + ow], relu)
            elif relu:
                for ow in range(np.uintp(out_w)):
                    dst_row[d + ow] = relu_or_identity(acc[a + ow], True)
            else:
                for ow in range(np.uintp(out_w)):
                    dst_row[d + ow] = acc[a + ow]


def _grid_conv(indptr, offsets, data, x, shift, bias, residual, has_residual, relu, mask, n_img, co_block, out):
    """A stride-1 'same' conv (3x3 pad 1, 1x1 pad 0) from one grid activation into another.

    Grid layout (the plan's activations between such convs): channel c holds N images of (H+2) x (W+2)
    cells with a zero border, flat in x[c, :] (row length >= N*cells), so the next conv's padding is
    already in place and needs no pack pass. Output cell g of channel co is
        relu?(bias + sum_k data[k] * x.flat[g - shift + offsets[k]] + residual[co, g]), zeroed on border cells,
    with offsets[k] = chan * row_len + dy * (W+2) + dx and shift = pad * (W+3). Border cells read
    past their image (into the neighbour or the buffer's guard floats, `shift` before x[0, 0] and after
    the last image): whatever they hold, the mask's select writes an exact 0 there.

    In: x[C_in, row_len_in], residual/out[C_out, row_len_out] (C-contiguous), mask[cells] (1 interior,
    0 border). Work items: one strip of an image's cells for `co_block` output channels in turn, each
    written from register accumulators straight into `out` (no scratch). Output channels inner: the
    strip's window of every input channel (~64 x 9 lines at 64 channels) stays in L1 while they all
    read it; channel-outer order reloaded it from L2 per channel (1.1-1.3x slower, A/B-measured)."""
    n_out = out.shape[0]
    row_out = out.shape[1]
    cells = mask.shape[0]
    width = STRIP_VECTORS * VECTOR_BYTES // x.itemsize
    strips = (cells + width - 1) // width
    blocks = (n_out + co_block - 1) // co_block
    for item in prange(n_img * strips * blocks):
        block = item % blocks
        n = item // blocks // strips
        s0 = (item // blocks % strips) * width
        cell = n * cells + s0
        n_valid = min(width, cells - s0)
        for co in range(block * co_block, min(n_out, (block + 1) * co_block)):
            o = co * row_out + cell
            row_strip(x, cell - shift, 1, offsets, data, indptr[co], indptr[co + 1], bias[co], out, o, n_valid,
                      residual, o, has_residual, relu, mask, s0, True)


def tap_offsets(chan, dy, dx, row_len: int, wq: int):
    """Per nonzero, its shift into the flat packed input: chan * row_len + dy * wq + dx (unsigned)."""
    offsets = chan.astype(np.uint64) * np.uint64(row_len) + dy.astype(np.uint64) * np.uint64(wq) + dx.astype(np.uint64)
    return offsets.astype(np.uint32) if offsets.size == 0 or offsets.max() < 2 ** 32 else offsets


@njit(inline="always", **{k: v for k, v in OPTIONS.items() if k != "cache"})
def _gather_channels(planes, table, out, c0, c1, shifted):
    """out[c*taps + t, p] = planes[c, table[t, p]], or 0 where table holds PADDING, for channels c0 <= c < c1;
    from a `shift_table` where shifted."""
    if shifted:
        _gather_shifted(planes, table, out, c0, c1)
        return
    taps = table.shape[0]
    n_pix = table.shape[1]
    plane_len, row_len = planes.shape[1], out.shape[1]
    src_flat, idx_flat, dst_flat = planes.reshape(-1), table.reshape(-1), out.reshape(-1)
    for c in range(c0, c1):
        # Flat offsets, channel-outer: per-row array views and a division per row were most of the cost
        # of the 4-pixel rows of small maps; padding mixes with pixels irregularly there, so it is
        # selected, not branched on (13 -> 9.5 us for 256 channels x 9 taps x 4 pixels).
        src = np.uintp(c * plane_len)
        for t in range(taps):
            idx = np.uintp(t * n_pix)
            dst = np.uintp((c * taps + t) * row_len)
            for p in range(n_pix):
                i = idx_flat[idx + np.uintp(p)]
                pad = i == PADDING
                v = src_flat[src + np.uintp(0 if pad else i)]
                dst_flat[dst + np.uintp(p)] = 0.0 if pad else v


@njit(inline="always", **{k: v for k, v in OPTIONS.items() if k != "cache"})
def _gather_shifted(planes, shifts, out, c0, c1):
    """`_gather_channels` from a `shift_table`: per channel, tap and 16 outputs, one masked load and store."""
    taps = shifts.shape[0]
    n_vec = shifts.shape[1] // 3
    plane_len, row_len = planes.shape[1], out.shape[1]
    src_flat, dst_flat = planes.reshape(-1), out.reshape(-1)
    for t in range(taps):  # channels inner: a tap's masks and shift serve every channel
        for j in range(n_vec):
            start = np.int64(np.int32(shifts[t, 3 * j]))  # may lie before the plane: those lanes are left out
            keep, n = np.int64(shifts[t, 3 * j + 1]), np.int64(shifts[t, 3 * j + 2])
            dst = t * row_len + j * SHIFT_LANES
            for c in range(c0, c1):
                masked_move(src_flat, c * plane_len + start, dst_flat, c * taps * row_len + dst, keep, n)


SHIFT_LANES = 16  # float32 outputs per masked move (kernels.layout.masked_move)


def shift_table(table: np.ndarray):
    """An im2col table in shift form, or None where it has none.

    A stride-1 conv whose output has its input's size (3x3 pad 1, 1x1) reads, for tap t, input pixel p + shift_t for
    output pixel p wherever it reads a pixel at all: each tap's row is then its input shifted, with the padding
    lanes zeroed, and a masked load and store move 16 of its values at once (~0.1 ns a value against ~0.35-0.85 for
    the lookup of each, which took three quarters of a 4x4 map's conv at batch 1).
    Out: u32[taps, 3 * n_vec], per 16 outputs j: the first input pixel (int32 bits), the lanes that read a pixel
    (bit mask), and how many outputs the row has there (16, fewer in the last)."""
    taps, n_pix = table.shape
    n_vec = -(-n_pix // SHIFT_LANES)
    pixel = np.arange(n_pix, dtype=np.int64)
    out = np.zeros((taps, n_vec, 3), np.int64)
    first = np.arange(n_vec, dtype=np.int64) * SHIFT_LANES
    for t in range(taps):
        reads = table[t] != PADDING
        shift = table[t][reads].astype(np.int64) - pixel[reads]
        if shift.size and (shift != shift[0]).any():
            return None
        padded = np.zeros(n_vec * SHIFT_LANES, bool)
        padded[:n_pix] = reads
        out[t, :, 0] = first + (shift[0] if shift.size else 0)
        out[t, :, 1] = padded.reshape(n_vec, SHIFT_LANES) @ (1 << np.arange(SHIFT_LANES, dtype=np.int64))
        out[t, :, 2] = np.minimum(SHIFT_LANES, n_pix - first)
    if np.abs(out[:, :, 0]).max(initial=0) >= 2 ** 31:
        return None
    return out.astype(np.int32).view(np.uint32).reshape(taps, 3 * n_vec)


def _gather_columns(planes, table, out, shifted):
    """im2col: out[c*taps + t, p] = planes[c, table[t, p]], or 0 where table holds PADDING.

    In: planes[C, N*H*W] (a CNHW activation, unpadded), table[taps, P] from `im2col_table`.
    Out: out[C*taps, >= P] (the first P columns written). One table lookup per value and no branch, and no
    packed copy of the input is needed (per-pixel bounds logic ran at ~2 ns per value on 4x4 maps). Where
    shifted, table is the `shift_table` of such a table."""
    n_chan = planes.shape[0]
    # Channel chunks, one per thread: a reshape per call costs ~35 ns, more than a 1x1 map's channel.
    n_chunks = min(n_chan, thread_count())
    for chunk in prange(n_chunks):
        _gather_channels(planes, table, out, chunk * n_chan // n_chunks, (chunk + 1) * n_chan // n_chunks, shifted)


@njit(inline="always", **{k: v for k, v in OPTIONS.items() if k != "cache"})
def _split_row(indptr, part, n_parts):
    """The first CSR row of `part` when the rows are cut into n_parts runs of about equal nonzeros."""
    if part == 0:
        return 0
    n_row = indptr.shape[0] - 1
    if part >= n_parts:
        return n_row
    target = indptr[n_row] * part // n_parts
    lo, hi = 0, n_row
    while lo < hi:  # the first row whose nonzeros start at or past the target
        mid = (lo + hi) // 2
        if indptr[mid] < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _private_gather_gemm(planes, table, shifted, cols, indptr, indices, data, bias, residual, has_residual, relu,
                         out):
    """im2col and its CSR SpMM in one parallel region: each thread gathers every column into its own copy,
    then computes its share of the output channels from it (an equal share of the nonzeros).

    The gather is done twice, once per core, so that no core reads the columns another one wrote. With the
    gather serial and the product split, the second core pulled the whole column matrix over from the
    first: ~0.3 us a cache line when the two cores sit on different dies of the host, which this VM's
    vCPUs do for minutes at a time (torchvision resnet18 global-98 at batch 1: 0.35 ms -> 0.70; round
    trip between the cores 55 -> 330 ns, bench/RESULTS.md).

    In: planes[C, N*H*W] and table[taps, P] as in `_gather_columns` (its `shift_table` where shifted);
    cols[parts, C*taps, >= P] (scratch, one copy per part; the serial twin runs the parts in turn, so the plan gives
    it one); the CSR of the conv (rows = out channels, columns c*taps + t). Out: out[Cout, P] = relu?(bias + W cols + residual); residual
    like out (read unless has_residual)."""
    n_parts = min(cols.shape[0], thread_count())
    n_pix = out.shape[1]
    width = STRIP_VECTORS * VECTOR_BYTES // cols.itemsize
    for part in prange(n_parts):
        mine = cols[part]
        _gather_channels(planes, table, mine, 0, planes.shape[0], shifted)
        row_len = mine.shape[1]
        for i in range(_split_row(indptr, part, n_parts), _split_row(indptr, part + 1, n_parts)):
            if n_pix == 1:  # a 1x1 map: one dot product (a strip would fill one lane of a vector)
                acc = bias[i]
                for k in range(indptr[i], indptr[i + 1]):
                    acc += data[k] * mine[indices[k], 0]
                if has_residual:
                    acc += residual[i, 0]
                out[i, 0] = relu_or_identity(acc, relu)
                continue
            for j0 in range(0, n_pix, width):
                o = i * n_pix + j0
                row_strip(mine, j0, row_len, indices, data, indptr[i], indptr[i + 1], bias[i], out, o,
                          min(width, n_pix - j0), residual, o, has_residual, relu, data, 0, False)


pack_input_par, pack_input_seq = twin(_pack_input)
gather_columns_par, gather_columns_seq = twin(_gather_columns)
private_gather_gemm_par, private_gather_gemm_seq = twin(_private_gather_gemm)
sparse_conv_par, sparse_conv_seq = twin(_sparse_conv)
grid_conv_par, grid_conv_seq = twin(_grid_conv)

__all__ = ["GRID_BORDER", "grid_conv_par", "grid_conv_seq", "gather_columns_par", "gather_columns_seq", "im2col_table", "tap_offsets", "pack_input_par", "pack_input_seq", "private_gather_gemm_par", "private_gather_gemm_seq", "shift_table", "sparse_conv_par", "sparse_conv_seq"]


PADDING = np.uint32(0xFFFFFFFF)  # im2col table entry for a pixel that reads zero padding


def im2col_table(n_img, height, width, out_h, out_w, kernel_size, stride, dilation, pads) -> np.ndarray:
    """table[t, (n*OH + oh)*OW + ow] = n*H*W + h*W + w, the unpadded input pixel that output pixel
    (n, oh, ow) reads for tap t = (i, j), with h = oh*sh + i*dh - pad_top (w likewise); PADDING
    where (h, w) falls outside the input."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    pad_top, pad_left = pads[0], pads[2]
    taps = []
    for i in range(kh):
        h = (np.arange(out_h) * sh + i * dh - pad_top).reshape(1, -1, 1)
        for j in range(kw):
            w = (np.arange(out_w) * sw + j * dw - pad_left).reshape(1, 1, -1)
            n = np.arange(n_img).reshape(-1, 1, 1)
            index = n * (height * width) + h * width + w
            inside = (h >= 0) & (h < height) & (w >= 0) & (w < width)
            taps.append(np.where(inside, index, int(PADDING)).reshape(-1))
    return np.stack(taps).astype(np.uint32)
