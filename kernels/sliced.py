"""Batch-1 sparse matvec over sliced ELLPACK with column steps (`sparsert.formats.sliced_ell`).

At batch 1 a 10%-dense Linear(4096, 4096) streams its 10 MB of CSR (4-byte value, 2-byte column)
from memory on every call, and the CSR matvec already runs near the bandwidth. Here each row stores
its columns as steps of at most 255 from the previous one: 1 byte a nonzero instead of 2. Where some
row steps further (most 2%-dense rows of 4096 columns do, somewhere), the steps take 2 bytes: such a
layer's weights sit in L2 anyway, and the slices still beat the CSR matvec's row loop (1.4x on one core
at 2%, bench/RESULTS.md).

Rows go sorted by length into slices of 16, one row per vector lane; step s of a slice holds the s-th
nonzero of each of its 16 rows, contiguously. Each step is then one 16- or 32-byte load of column steps
added to the lanes' running columns, one masked gather of x, one 64-byte load of values and one
FMA: no horizontal sums and no per-row loop tails. Lanes past their row's length are masked off
(their values are 0 and they read nothing). The epilogue adds bias, applies ReLU and scatters the 16
sums to their rows.
"""
from llvmlite import ir
from numba import njit, prange, types
from numba.core.errors import TypingError
from numba.extending import intrinsic

from ._jit import OPTIONS, declare_function, relu_or_identity, twin

SLICE = 16


@intrinsic
def sliced_rows(typingctx, x, steps, values, first_col, lengths, k0, n_steps, lane0, sums):
    """sums[lane0 + l] = sum over s < lengths[lane0 + l] of values[k0 + 16 s + l] * x[col_s], with
    col_0 = first_col[lane0 + l] + steps[k0 + l] and col_s = col_(s-1) + steps[k0 + 16 s + l]."""
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in (x, steps, values, first_col, lengths, sums)):
        raise TypingError("sliced_rows: arrays must be C-contiguous")
    if x.dtype != types.float32 or values.dtype != types.float32 or sums.dtype != types.float32:
        raise TypingError("sliced_rows: x, values and sums must be float32")
    if steps.dtype not in (types.uint8, types.uint16) or not all(
            isinstance(a.dtype, types.Integer) and a.dtype.bitwidth == 32 for a in (first_col, lengths)):
        raise TypingError("sliced_rows: steps must be uint8 or uint16, first_col and lengths 32-bit integers")
    sig = types.void(x, steps, values, first_col, lengths, types.intp, types.intp, types.intp, sums)

    def codegen(context, builder, signature, args):
        x_v, steps_v, values_v, first_v, lengths_v, k0_v, n_v, lane0_v, sums_v = args
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        vec, ivec = ir.VectorType(f32, SLICE), ir.VectorType(i32, SLICE)
        mask_ty = ir.VectorType(ir.IntType(1), SLICE)

        def data(i):
            return context.make_array(signature.args[i])(context, builder, args[i]).data

        x_ptr, steps_ptr, values_ptr, first_ptr, lengths_ptr, sums_ptr = (data(i) for i in (0, 1, 2, 3, 4, 8))
        gather = declare_function(builder.module, "llvm.masked.gather.v16f32.v16p0", vec,
                          [ir.VectorType(x_ptr.type, SLICE), i32, mask_ty, vec])
        fma = declare_function(builder.module, "llvm.fma.v16f32", vec, [vec, vec, vec])

        def load(ptr, offset, ty):
            return builder.load(builder.bitcast(builder.gep(ptr, [offset]), ty.as_pointer()), align=1)

        lengths_vec = load(lengths_ptr, lane0_v, ivec)
        first_vec = load(first_ptr, lane0_v, ivec)
        zero = ir.Constant(vec, None)
        entry = builder.block
        body = builder.append_basic_block("sliced.loop")
        done = builder.append_basic_block("sliced.done")
        builder.cbranch(builder.icmp_signed(">", n_v, ir.Constant(i64, 0)), body, done)
        builder.position_at_end(body)
        s = builder.phi(i64)
        col = builder.phi(ivec)
        acc = builder.phi(vec)
        s.add_incoming(ir.Constant(i64, 0), entry)
        col.add_incoming(first_vec, entry)
        acc.add_incoming(zero, entry)
        k = builder.add(k0_v, builder.mul(s, ir.Constant(i64, SLICE)))
        step = builder.zext(load(steps_ptr, k, ir.VectorType(ir.IntType(steps.dtype.bitwidth), SLICE)), ivec)
        col_next = builder.add(col, step)
        s32 = builder.trunc(s, i32)
        s_vec = builder.shuffle_vector(builder.insert_element(ir.Constant(ivec, ir.Undefined), s32, ir.Constant(i32, 0)),
                                       ir.Constant(ivec, ir.Undefined), ir.Constant(ivec, [0] * SLICE))
        live = builder.icmp_signed("<", s_vec, lengths_vec)
        addresses = builder.gep(x_ptr, [col_next], source_etype=f32)
        addresses.type = ir.VectorType(x_ptr.type, SLICE)  # llvmlite types a GEP by its base pointer
        xs = builder.call(gather, [addresses, ir.Constant(i32, 4), live, zero])
        acc_next = builder.call(fma, [load(values_ptr, k, vec), xs, acc])
        s_next = builder.add(s, ir.Constant(i64, 1))
        s.add_incoming(s_next, builder.block)
        col.add_incoming(col_next, builder.block)
        acc.add_incoming(acc_next, builder.block)
        builder.cbranch(builder.icmp_signed("<", s_next, n_v), body, done)
        builder.position_at_end(done)
        result = builder.phi(vec)
        result.add_incoming(zero, entry)
        result.add_incoming(acc_next, body)
        builder.store(result, builder.bitcast(builder.gep(sums_ptr, [lane0_v]), vec.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _sliced_matvec(slice_ptr, steps, values, first_col, lengths, rows, bias, x, relu, sums, out):
    """out[rows[l]] = relu?(bias[rows[l]] + row rows[l] . x) for every lane l < out.shape[0].

    In: the `sliced_ell` arrays (slice_ptr[n_slices + 1] in elements; first_col, lengths, rows
    [n_slices * 16]), bias[n_rows], x[n_cols]. Scratch: sums[n_slices * 16]. Out: out[n_rows].
    Cost: O(stored entries), one slice of 16 rows per work item."""
    n_rows = out.shape[0]
    for sl in prange(slice_ptr.shape[0] - 1):
        k0 = slice_ptr[sl]
        lane0 = sl * SLICE
        sliced_rows(x, steps, values, first_col, lengths, k0, (slice_ptr[sl + 1] - k0) // SLICE, lane0, sums)
        for lane in range(lane0, min(lane0 + SLICE, n_rows)):
            r = rows[lane]
            out[r] = relu_or_identity(sums[lane] + bias[r], relu)


sliced_matvec_par, sliced_matvec_seq = twin(_sliced_matvec)


@njit(**OPTIONS)
def sliced_matvec(slice_ptr, steps, values, first_col, lengths, rows, bias, x, relu, sums, out, parallel):
    """`_sliced_matvec` on the parallel twin when asked: one call site per step width for the plan executor."""
    if parallel:
        sliced_matvec_par(slice_ptr, steps, values, first_col, lengths, rows, bias, x, relu, sums, out)
    else:
        sliced_matvec_seq(slice_ptr, steps, values, first_col, lengths, rows, bias, x, relu, sums, out)


__all__ = ["SLICE", "sliced_matvec", "sliced_matvec_par", "sliced_matvec_seq"]
