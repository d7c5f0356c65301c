"""Row-major [B, F] activations to the kernels' feature-major [F, B] layout, 16x16 tiles in registers.

A scalar tiled loop moved one float per load and store: 4096 features x 64 took ~0.2 ms, as long as
torch's own `.t().contiguous()`, and a third of a 2%-dense Linear(4096, 4096) at batch 64. Here each
16x16 tile is 16 vector loads, 64 shuffles and 16 vector stores; edges narrower than a tile go through
the scalar loop.
"""
from llvmlite import ir
from numba import prange, types
from numba.core.errors import TypingError
from numba.extending import intrinsic

from ._jit import declare_function, twin
from .strip import splat

TILE = 16


@intrinsic
def masked_move(typingctx, src, s0, dst, d0, keep, n):
    """dst[d0 + t] = src[s0 + t] where bit t of keep is set, else 0, for t < min(n, 16); nothing else is written.

    float32, flat C arrays. One masked load and one masked store: the lanes keep leaves out are never read, so
    s0 may sit before src's first element or run past its last where those lanes are left out (a shifted copy
    of a row whose taps fall into the padding: `conv.shift_table`)."""
    for name, a in (("src", src), ("dst", dst)):
        if not isinstance(a, types.Array) or a.layout != "C" or a.dtype != types.float32:
            raise TypingError(f"masked_move: {name} must be a C-contiguous float32 array, got {a}")
    sig = types.void(src, types.intp, dst, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        src_v, s0_v, dst_v, d0_v, keep_v, n_v = args
        vec = ir.VectorType(ir.FloatType(), TILE)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        mask_ty = ir.VectorType(ir.IntType(1), TILE)
        mod = builder.module
        mload = declare_function(mod, "llvm.masked.load.v16f32.p0", vec, [ir.PointerType(), i32, mask_ty, vec])
        mstore = declare_function(mod, "llvm.masked.store.v16f32.p0", ir.VoidType(),
                                  [vec, ir.PointerType(), i32, mask_ty])
        src_ptr = context.make_array(signature.args[0])(context, builder, src_v).data
        dst_ptr = context.make_array(signature.args[2])(context, builder, dst_v).data
        lane = ir.Constant(ir.VectorType(i64, TILE), list(range(TILE)))
        inside = builder.icmp_signed("<", lane, splat(builder, n_v, TILE))
        kept = builder.and_(inside, builder.bitcast(builder.trunc(keep_v, ir.IntType(TILE)), mask_ty))
        align = ir.Constant(i32, 4)
        values = builder.call(mload, [builder.gep(src_ptr, [s0_v]), align, kept, ir.Constant(vec, None)])
        dst_at = builder.gep(dst_ptr, [d0_v])
        with builder.if_else(builder.icmp_signed(">=", n_v, ir.Constant(i64, TILE))) as (full, part):
            with full:  # a plain store where all 16 lanes are written
                builder.store(values, builder.bitcast(dst_at, vec.as_pointer()), align=4)
            with part:
                builder.call(mstore, [values, dst_at, align, inside])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def transpose_tile(typingctx, src, s0, src_stride, dst, d0, dst_stride):
    """dst[d0 + j * dst_stride + i] = src[s0 + i * src_stride + j] for i, j < 16 (float32, flat C arrays)."""
    for name, a in (("src", src), ("dst", dst)):
        if not isinstance(a, types.Array) or a.layout != "C" or a.dtype != types.float32:
            raise TypingError(f"transpose_tile: {name} must be a C-contiguous float32 array, got {a}")
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        src_v, s0_v, ss_v, dst_v, d0_v, ds_v = args
        vec = ir.VectorType(ir.FloatType(), TILE)
        i32 = ir.IntType(32)
        src_ptr = context.make_array(signature.args[0])(context, builder, src_v).data
        dst_ptr = context.make_array(signature.args[3])(context, builder, dst_v).data

        def row_ptr(base, first, stride, r):
            flat = builder.add(first, builder.mul(stride, ir.Constant(stride.type, r)))
            return builder.bitcast(builder.gep(base, [flat]), vec.as_pointer())

        rows = [builder.load(row_ptr(src_ptr, s0_v, ss_v, r), align=4) for r in range(TILE)]
        # Swap the off-diagonal s x s blocks of every 2s x 2s block, s = 8, 4, 2, 1: the transpose.
        for s in (8, 4, 2, 1):
            low = ir.Constant(ir.VectorType(i32, TILE), [j if not j & s else TILE + j - s for j in range(TILE)])
            high = ir.Constant(ir.VectorType(i32, TILE), [j + s if not j & s else TILE + j for j in range(TILE)])
            for r in range(TILE):
                if not r & s:
                    a, b = rows[r], rows[r + s]
                    rows[r] = builder.shuffle_vector(a, b, low)
                    rows[r + s] = builder.shuffle_vector(a, b, high)
        for r, value in enumerate(rows):
            builder.store(value, row_ptr(dst_ptr, d0_v, ds_v, r), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _rows_to_features(src, dst):
    """dst[f, b] = src[b, f]. In: src[B, F] float32. Out: dst[F, B]. Work items: column bands of 16
    features (prange), each walking down the batch in 16-row tiles."""
    n_batch, n_feat = src.shape
    flat_src, flat_dst = src.reshape(-1), dst.reshape(-1)
    full_b = n_batch - n_batch % TILE
    for band in prange((n_feat + TILE - 1) // TILE):
        f0 = band * TILE
        if f0 + TILE <= n_feat:
            for b0 in range(0, full_b, TILE):
                transpose_tile(flat_src, b0 * n_feat + f0, n_feat, flat_dst, f0 * n_batch + b0, n_batch)
            first_scalar = full_b
        else:
            first_scalar = 0
        for f in range(f0, min(f0 + TILE, n_feat)):
            for b in range(first_scalar, n_batch):
                dst[f, b] = src[b, f]


rows_to_features_par, rows_to_features_seq = twin(_rows_to_features)

__all__ = ["masked_move", "rows_to_features_par", "rows_to_features_seq", "transpose_tile"]
