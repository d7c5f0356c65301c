"""Direct sparse convolution (no im2col). Pure functions on raw arrays; the caller allocates `out`.

Layout: the input is packed once per layer into `xq[C*s*s, N*Hq*Wq + slack]`: zero-padded,
split into s*s stride phases, batch folded into the flat pixel axis. In that layout every
nonzero weight (out channel co, phase channel c, tap offset dy, dx) adds `w * xq[c, q + dy*Wq + dx]`
to output grid position q, so each nonzero is one contiguous multiply-add over many pixels,
whatever the kernel size, stride, dilation or groups. Grid positions with ow >= OW or oh >= OH
are computed and discarded; the epilogue writes only valid pixels, fusing bias, residual and ReLU.
"""
from numba import get_thread_id, prange

from ._jit import twin


def _pack_input(x, pad_top, pad_left, stride_h, stride_w, hq, wq, out):
    """out[(c*sh + py)*sw + px, n*hq*wq + i*wq + j] = x_padded[n, c, i*sh + py, j*sw + px] (0 outside x).

    In: x[N, C, H, W] with any strides. Out: out[C*sh*sw, >= N*hq*wq], fully written (slack zeroed)."""
    n_img, n_chan, height, width = x.shape
    phases = stride_h * stride_w
    for cq in prange(n_chan * phases):
        c = cq // phases
        py = (cq % phases) // stride_w
        px = cq % stride_w
        row = out[cq]
        row[:] = 0.0
        # columns j with 0 <= j*sw + px - pad_left < width
        j_lo = max(0, (pad_left - px + stride_w - 1) // stride_w)
        j_hi = min(wq, (width - 1 + pad_left - px) // stride_w + 1)
        for n in range(n_img):
            for i in range(hq):
                h = i * stride_h + py - pad_top
                if h < 0 or h >= height:
                    continue
                base = n * hq * wq + i * wq
                for j in range(j_lo, j_hi):
                    row[base + j] = x[n, c, h, j * stride_w + px - pad_left]


def _sparse_conv(indptr, chan, dy, dx, data, xq, hq, wq, bias, residual, has_residual, relu,
                 rows_per_tile, scratch, out):
    """Direct sparse conv over the packed input; epilogue out = relu?(acc + bias + residual).

    In: CSR rows = output channels with per-nonzero (chan, dy, dx, data); xq from `_pack_input`;
    residual[Cout, N, OH, OW] (ignored unless has_residual); scratch[n_threads, rows_per_tile*wq].
    Out: out[Cout, N, OH, OW]. Cost: O(nnz * N * hq * wq)."""
    n_out, n_img, out_h, out_w = out.shape
    grid_rows = n_img * hq
    n_tiles = (grid_rows + rows_per_tile - 1) // rows_per_tile
    for item in prange(n_out * n_tiles):
        co = item // n_tiles
        r0 = (item % n_tiles) * rows_per_tile
        r1 = min(r0 + rows_per_tile, grid_rows)
        q0 = r0 * wq
        length = (r1 - r0) * wq
        acc = scratch[get_thread_id()]
        for t in range(length):
            acc[t] = 0.0
        for k in range(indptr[co], indptr[co + 1]):
            w = data[k]
            src = xq[chan[k]]
            start = q0 + dy[k] * wq + dx[k]
            for t in range(length):
                acc[t] += w * src[start + t]
        b = bias[co]
        for r in range(r0, r1):
            n = r // hq
            oh = r - n * hq
            if oh >= out_h:
                continue
            tile_row = (r - r0) * wq
            dst = out[co, n, oh]
            if has_residual:
                res = residual[co, n, oh]
                for ow in range(out_w):
                    v = acc[tile_row + ow] + b + res[ow]
                    dst[ow] = max(v, 0.0) if relu else v
            else:
                for ow in range(out_w):
                    v = acc[tile_row + ow] + b
                    dst[ow] = max(v, 0.0) if relu else v


pack_input_par, pack_input_seq = twin(_pack_input)
sparse_conv_par, sparse_conv_seq = twin(_sparse_conv)

__all__ = ["pack_input_par", "pack_input_seq", "sparse_conv_par", "sparse_conv_seq"]
