"""The register-tiled micro-kernel under every SpMM and direct conv: one sparse row times a dense strip.

    out[o + t] = keep?(relu?(init + sum_k values[k] * x[x0 + indices[k] * stride + t] + res[r + t])),  t < n_valid

where keep? zeroes lanes whose mask[m + t] is 0 (the padding cells of a grid activation, see conv.py).

The strip is 1-4 (or 6-8, `wide_strip`) vectors of 64 bytes (16 float32 / 8 float64 lanes per vector)
held in vector registers for the whole sum, so each nonzero costs one broadcast and one fused
multiply-add per vector, straight from the input row. Strips of 1-2 vectors split the nonzeros over
4 or 2 sets of accumulators, so that at least 4 FMA chains run at once (a single chain waits out
each FMA's latency: the 4-pixel GEMMs of a 90% resnet18's layer 3 at batch 1, 0.050 -> 0.033 ms). A strip of
exactly 4 outputs (a 2x2 map) packs four nonzeros into each vector instead (`quad_strip`: that same product,
one core, 38.6 -> 18.2 us). Numba's own loops kept the accumulator in memory (load, FMA, store per
nonzero); this runs 1.6x faster on the same SpMM (bench/RESULTS.md) and ~30 GMAC/s per core on
L1-resident data.

Numba has no vector types, so the loop is written in LLVM IR through `numba.extending.intrinsic`; it
inlines into the calling kernel and is cached on disk with it. The last vector is masked, so any
n_valid <= the strip width is exact and nothing past n_valid is read or written. Strips whose callers
only ever pass whole vectors (`whole`: the lanes conv's cells, the column-blocked Linear's full 64-column
strips) skip that mask: AVX2 has no mask registers, and a mask known only at run time made each nonzero's
last load a vmaskmovps pair (Zen 3, one core, x in L1, 19-nonzero strips through `wide_strip`: 23 -> 37 GMAC/s
in a quiet minute; bench/strip_ceiling.py's short-strip rows measure the same pair).

Arrays must be C-contiguous (addressed flat from their first element); x, out and res share one
float dtype; indices are unsigned integers. Callers keep n_valid within the arrays' bounds, and call
`row_strip`, which picks the vector count for n_valid (1 <= n_valid <= STRIP_VECTORS vectors).

Numba's disk cache is keyed on each kernel's own source file; `kernels/__init__` empties it whenever
any kernel source changes, so the kernels that inline the strip recompile with it.
"""
from llvmlite import ir
from numba import njit, types
from numba.core.errors import TypingError
from numba.extending import intrinsic

from ._jit import declare_function

VECTOR_BYTES = 64


def lanes(dtype) -> int:
    """Elements per vector for a Numba float type (16 for float32)."""
    return VECTOR_BYTES * 8 // dtype.bitwidth


def _check_types(x, indices, values, out, res, mask):
    for name, a in (("x", x), ("indices", indices), ("values", values), ("out", out), ("res", res), ("mask", mask)):
        if not isinstance(a, types.Array) or a.layout != "C":
            raise TypingError(f"sparse_row_strip: {name} must be a C-contiguous array, got {a}")
    if not isinstance(indices.dtype, types.Integer) or indices.dtype.signed:
        raise TypingError(f"sparse_row_strip: indices must be unsigned, got {indices.dtype}")
    if not (x.dtype == values.dtype == out.dtype == res.dtype == mask.dtype) or not isinstance(x.dtype, types.Float):
        raise TypingError("sparse_row_strip: x, values, out, res and mask must share one float dtype")


def _merge(builder, values_a, block_a, values_b, block_b):
    """Per value, a phi: values_a arriving from block_a, values_b from block_b."""
    phis = []
    for a, b in zip(values_a, values_b):
        phi = builder.phi(a.type)
        phi.add_incoming(a, block_a)
        phi.add_incoming(b, block_b)
        phis.append(phi)
    return phis


def _counted_loop(builder, k_from, k_to, step: int, inits, body):
    """Emit `for k in range(k_from, k_to, step)` carrying the values inits through body(k, values) -> values
    ((k_to - k_from) a multiple of step); returns the values after it (inits if it never ran)."""
    entry = builder.block
    loop = builder.append_basic_block("strip.loop")
    exit_ = builder.append_basic_block("strip.exit")
    builder.cbranch(builder.icmp_signed("<", k_from, k_to), loop, exit_)
    builder.position_at_end(loop)
    k = builder.phi(k_from.type)
    k.add_incoming(k_from, entry)
    phis = [builder.phi(v.type) for v in inits]
    for phi, value in zip(phis, inits):
        phi.add_incoming(value, entry)
    stepped = body(k, phis)
    k_next = builder.add(k, ir.Constant(k_from.type, step))
    end = builder.block
    k.add_incoming(k_next, end)
    for phi, value in zip(phis, stepped):
        phi.add_incoming(value, end)
    builder.cbranch(builder.icmp_signed("<", k_next, k_to), loop, exit_)
    builder.position_at_end(exit_)
    return _merge(builder, inits, entry, stepped, end)


def sum_in_sets(builder, k0, k1, n_sets: int, first, zero, step):
    """Emit the sum over nonzeros k0 <= k < k1 into vectors shaped like `first` (set 0's start; the other sets start
    at `zero`): n_sets nonzeros a trip, each into its own set of accumulators (independent FMA chains), the sets
    summed, then the remaining < n_sets nonzeros one by one. step(k, accs) -> accs adds nonzero k."""
    n_vec, i64 = len(first), k0.type

    def accumulate(k_from, k_to, inits):
        """`for k in range(k_from, k_to, len(inits))`, set s adding nonzero k + s into inits[s]; the sets after it."""
        flat = _counted_loop(builder, k_from, k_to, len(inits), [v for init in inits for v in init],
                             lambda k, phis: [v for s in range(len(inits)) for v in step(
                                 builder.add(k, ir.Constant(i64, s)), phis[s * n_vec:(s + 1) * n_vec])])
        return [flat[s * n_vec:(s + 1) * n_vec] for s in range(len(inits))]

    count = builder.sub(k1, k0)
    k_main = builder.add(k0, builder.mul(builder.sdiv(count, ir.Constant(i64, n_sets)), ir.Constant(i64, n_sets)))
    sets = accumulate(k0, k_main, [list(first)] + [[zero] * n_vec] * (n_sets - 1))
    total = sets[0]
    for other in sets[1:]:
        total = [builder.fadd(a, b) for a, b in zip(total, other)]
    return accumulate(k_main, k1, [total])[0]


def _epilogue(builder, results, lane_vectors, res_ptr, r_v, has_res_v, relu_v, mask_ptr, m_v, has_mask_v):
    """The strip's sums with the residual added, ReLU as `v < 0 ? 0 : v` (NaN stays NaN, as in torch) and the
    mask applied, in registers; lane_vectors(ptr, start) loads vectors shaped like results."""
    zero = ir.Constant(results[0].type, None)

    def when(flag, values, transform, name):
        """values, or transform(values) where flag is set: a branch, so unused arrays are never read."""
        before = builder.block
        taken = builder.append_basic_block(f"strip.{name}")
        joined = builder.append_basic_block(f"strip.{name}.done")
        builder.cbranch(flag, taken, joined)
        builder.position_at_end(taken)
        changed = transform(values)
        after = builder.block
        builder.branch(joined)
        builder.position_at_end(joined)
        return _merge(builder, values, before, changed, after)

    values = when(has_res_v, results,
                  lambda vs: [builder.fadd(a, b) for a, b in zip(vs, lane_vectors(res_ptr, r_v))], "residual")
    values = [builder.select(relu_v, builder.select(builder.fcmp_ordered("<", v, zero), zero, v), v) for v in values]
    return when(has_mask_v, values, lambda vs: [builder.select(builder.fcmp_unordered("!=", k, zero), v, zero)
                                                for v, k in zip(vs, lane_vectors(mask_ptr, m_v))], "mask")


def _make_strip(n_vec: int, n_sets: int = 0, gapped: bool = False, whole: bool = False, two_rows: bool = False,
                cell_vectors: int = 1, cell_stride: int = 1):
    # Independent accumulator chains: an FMA waits ~4 cycles for the previous one into the same register,
    # so strips of fewer than 4 vectors also split the nonzeros over n_sets accumulator sets.
    # gapped: the second half of the vectors reads x `gap` elements further on (two cells of a strided conv).
    # two_rows: the same, and the second half also writes out (reads res and mask) `out_gap` further on: two
    # output rows of a lanes conv, whose nonzeros then load their index and weight once for both. Within a row,
    # output cells of cell_vectors vectors each read input cells cell_stride cells apart (a strided conv's).
    # whole: n_valid is always n_vec full vectors (the caller's promise), so no load or store is masked. A mask
    # known only at run time costs AVX2 a vmaskmovps pair per nonzero: 6 vectors in L1 ran 44.6 GMAC/s with a
    # constant mask (folded away), 36.7 with a run-time one.
    n_sets = n_sets or max(1, 4 // n_vec)

    def signature_of(x, indices, values, out, res, mask):
        _check_types(x, indices, values, out, res, mask)
        return (x, types.intp, types.intp, indices, values, types.intp, types.intp, x.dtype, out, types.intp,
                types.intp, res, types.intp, types.boolean, types.boolean, mask, types.intp, types.boolean)

    def codegen(context, builder, signature, args):
        (x_v, x0_v, stride_v, idx_v, val_v, k0_v, k1_v, init_v, out_v, o_v, n_v, res_v, r_v, has_res_v,
         relu_v, mask_v, m_v, has_mask_v) = args[:18]
        gap_v = args[18] if gapped or two_rows else None
        out_gap_v = args[19] if two_rows else None
        aty = signature.args
        elem = context.get_value_type(aty[0].dtype)
        n_lanes = lanes(aty[0].dtype)
        vec = ir.VectorType(elem, n_lanes)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        mask_ty = ir.VectorType(ir.IntType(1), n_lanes)
        suffix = f"v{n_lanes}{'f32' if n_lanes == 16 else 'f64'}"
        mod = builder.module
        fma = declare_function(mod, f"llvm.fma.{suffix}", vec, [vec, vec, vec])
        mload = declare_function(mod, f"llvm.masked.load.{suffix}.p0", vec, [ir.PointerType(), i32, mask_ty, vec])
        mstore = declare_function(mod, f"llvm.masked.store.{suffix}.p0", ir.VoidType(), [vec, ir.PointerType(), i32, mask_ty])

        def data(i):
            return context.make_array(aty[i])(context, builder, args[i]).data

        x_ptr, idx_ptr, val_ptr, out_ptr, res_ptr, mask_ptr = data(0), data(3), data(4), data(8), data(11), data(15)

        # Lanes of the last vector inside n_valid; the others are full (row_strip picks n_vec so).
        n_last = builder.sub(n_v, ir.Constant(i64, n_lanes * (n_vec - 1)))
        lane_ids = ir.Constant(ir.VectorType(i64, n_lanes), list(range(n_lanes)))
        last_mask = builder.icmp_signed("<", lane_ids, splat(builder, n_last, n_lanes))
        align = ir.Constant(i32, aty[0].dtype.bitwidth // 8)

        def load(ptr, v, passthru):
            if v == n_vec - 1 and not whole:
                return builder.call(mload, [ptr, align, last_mask, passthru])
            return builder.load(builder.bitcast(ptr, vec.as_pointer()), align=aty[0].dtype.bitwidth // 8)

        def store(value, ptr, v):
            if v == n_vec - 1 and not whole:
                builder.call(mstore, [value, ptr, align, last_mask])
            else:
                builder.store(value, builder.bitcast(ptr, vec.as_pointer()), align=aty[0].dtype.bitwidth // 8)

        zero = ir.Constant(vec, None)
        start = splat(builder, init_v, n_lanes)

        def fma_step(kk, accs):
            index = builder.zext(builder.load(builder.gep(idx_ptr, [kk])), i64) \
                if aty[3].dtype.bitwidth < 64 else builder.load(builder.gep(idx_ptr, [kk]))
            row = builder.gep(x_ptr, [builder.add(x0_v, builder.mul(index, stride_v))])
            w = splat(builder, builder.load(builder.gep(val_ptr, [kk])), n_lanes)
            if gapped or two_rows:  # vectors n_vec/2.. gap on; within each half, cells cell_stride cells apart
                half = n_vec // 2
                far = builder.gep(row, [gap_v])

                def offset(j):
                    return n_lanes * ((j // cell_vectors) * cell_stride * cell_vectors + j % cell_vectors)
                return [builder.call(fma, [w, load(builder.gep(row if v < half else far,
                                                               [ir.Constant(i64, offset(v % half))]), v, zero), acc])
                        for v, acc in enumerate(accs)]
            return [builder.call(fma, [w, load(builder.gep(row, [ir.Constant(i64, n_lanes * v)]), v, zero), acc])
                    for v, acc in enumerate(accs)]

        results = sum_in_sets(builder, k0_v, k1_v, n_sets, [start] * n_vec, zero, fma_step)
        def at(ptr, start, v):  # where output vector v sits (two rows: the second half out_gap further on)
            if two_rows and v >= n_vec // 2:
                start, v = builder.add(start, out_gap_v), v - n_vec // 2
            return builder.gep(ptr, [builder.add(start, ir.Constant(i64, n_lanes * v))])

        def lane_vectors(ptr, start):
            return [load(at(ptr, start, v), v, zero) for v in range(n_vec)]

        values = _epilogue(builder, results, lane_vectors, res_ptr, r_v, has_res_v, relu_v, mask_ptr, m_v, has_mask_v)
        for v, value in enumerate(values):
            store(value, at(out_ptr, o_v, v), v)
        return context.get_dummy_value()

    if two_rows:
        @intrinsic
        def strip(typingctx, x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu,
                  mask, m, has_mask, gap, out_gap):
            """Two output rows of n_vec / 2 vectors each: the second row reads x `gap` and writes out, res and mask
            `out_gap` elements after the first."""
            return types.void(*signature_of(x, indices, values, out, res, mask), types.intp, types.intp), codegen
    elif gapped:
        @intrinsic
        def strip(typingctx, x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu,
                  mask, m, has_mask, gap):
            """As the plain strip, but its second half of vectors reads x `gap` elements further on: two output
            cells of a strided lanes conv, whose inputs are not adjacent, share each nonzero's loads."""
            return types.void(*signature_of(x, indices, values, out, res, mask), types.intp), codegen
    else:
        @intrinsic
        def strip(typingctx, x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu,
                  mask, m, has_mask):
            return types.void(*signature_of(x, indices, values, out, res, mask)), codegen

    return strip


def splat(builder, value, n_lanes):
    """value in every lane of an n_lanes vector of its type."""
    vec = ir.VectorType(value.type, n_lanes)
    i32 = ir.IntType(32)
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(i32, 0))
    return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(i32, n_lanes), [0] * n_lanes))


# 4 vectors (64 float32): 8 measured no faster on the pixel-major layouts, whose loads mostly split cache
# lines. On aligned batch-in-lanes rows, 8 (`wide_strip`) ran stride-1 ResNet convs 1.1-1.25x faster.
STRIP_VECTORS = 4
strip1, strip2, strip3, strip4 = (_make_strip(n) for n in range(1, STRIP_VECTORS + 1))
# The wide strips of the lanes conv: 8 vectors where AVX-512 has 32 registers. On AVX2 a 64-byte vector takes two
# of the 16 registers and 8 vectors' accumulators spill; 6 ran fastest there (bench/strip_ceiling.py, one core,
# Zen 3: 4 vectors 30.4 GMAC/s, 6 32.0, 8 22.4), with a third fewer index and weight loads than 4. The plan picks
# the width through the cells a work item covers (plan.LANE_STRIP_VECTORS).
# Every cell of a lanes activation holds whole vectors, so these strips never mask (`whole`).
WIDE_VECTORS = 2 * STRIP_VECTORS
strip1_whole, strip2_whole, strip3_whole, strip4_whole, strip6, strip8 = (
    _make_strip(n, whole=True) for n in (1, 2, 3, 4, 6, WIDE_VECTORS))
# 4 vectors over 2 accumulator sets: 4 FMA chains wait on each other's latency only when x is in L1 (a
# 128-column slab at batch 64: 40 -> 55 GMAC/s on one core; from L2 both run ~28). For column-blocked SpMMs.
# Whole vectors only: its caller runs it on full 64-column strips.
strip4_split = _make_strip(STRIP_VECTORS, n_sets=2, whole=True)
# Two cells of a strided lanes conv (batch 16, 32 or 64 per cell) per strip: one vector per cell left the
# FMA chains waiting on each other (the 4-vector strip of one 64-lane cell ran at half the FMA rate).
strip2_gap, strip4_gap, strip8_gap = (_make_strip(n, gapped=True, whole=True) for n in (2, 4, 2 * STRIP_VECTORS))
PAIR_CELL_SIZES = (16, 32, 64)  # floats a cell may hold for `cell_pair_strip`
# Two output rows of WIDE_VECTORS whole vectors each (16 accumulators: AVX-512's 32 registers hold them): a stride-1
# conv's (cells adjacent), or a stride-2 conv's with cells of 1, 2 or 4 vectors (16, 32 or 64 lanes).
strip16_rows = _make_strip(2 * WIDE_VECTORS, two_rows=True, whole=True)
strip16_rows_s2c1, strip16_rows_s2c2, strip16_rows_s2c4 = (
    _make_strip(2 * WIDE_VECTORS, two_rows=True, whole=True, cell_vectors=c, cell_stride=2) for c in (1, 2, 4))


# Pixels a quad strip covers: the 4 outputs of a 2x2 map (torchvision resnet18's layer 3 at 32x32, batch 1).
QUAD = 4


def _make_quad_strip():
    """The strip for exactly QUAD outputs, four nonzeros to a vector: each lane group of 4 holds one nonzero's
    4 input values times its weight, so one FMA does 16 multiply-adds where the 1-vector strip's masked
    FMA did 4. The groups are summed once at the end of the row."""

    def codegen(context, builder, signature, args):
        (x_v, x0_v, stride_v, idx_v, val_v, k0_v, k1_v, init_v, out_v, o_v, n_v, res_v, r_v, has_res_v,
         relu_v, mask_v, m_v, has_mask_v) = args
        aty = signature.args
        elem = context.get_value_type(aty[0].dtype)
        width = 4 * QUAD
        vec, wide = ir.VectorType(elem, QUAD), ir.VectorType(elem, width)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        kind = "f32" if aty[0].dtype.bitwidth == 32 else "f64"
        fma = declare_function(builder.module, f"llvm.fma.v{QUAD}{kind}", vec, [vec, vec, vec])
        fma_wide = declare_function(builder.module, f"llvm.fma.v{width}{kind}", wide, [wide, wide, wide])
        align = aty[0].dtype.bitwidth // 8

        def data(i):
            return context.make_array(aty[i])(context, builder, args[i]).data

        x_ptr, idx_ptr, val_ptr, out_ptr, res_ptr, mask_ptr = data(0), data(3), data(4), data(8), data(11), data(15)

        def load(ptr, start, ty):
            return builder.load(builder.bitcast(builder.gep(ptr, [start]), ty.as_pointer()), align=align)

        def shuffle(a, b, lanes_):
            return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, len(lanes_)), lanes_))

        def x_at(kk):  # the QUAD input values nonzero kk multiplies
            index = builder.load(builder.gep(idx_ptr, [kk]))
            index = builder.zext(index, i64) if aty[3].dtype.bitwidth < 64 else index
            return load(x_ptr, builder.add(x0_v, builder.mul(index, stride_v)), vec)

        def quad_step(kk, acc):  # nonzeros kk .. kk + 3 into one wide accumulator
            xs = [x_at(builder.add(kk, ir.Constant(i64, s))) for s in range(4)]
            x_all = shuffle(shuffle(xs[0], xs[1], list(range(2 * QUAD))), shuffle(xs[2], xs[3], list(range(2 * QUAD))),
                            list(range(width)))
            w = load(val_ptr, kk, vec)
            w_all = shuffle(w, ir.Constant(vec, ir.Undefined), [s for s in range(4) for _ in range(QUAD)])
            return builder.call(fma_wide, [w_all, x_all, acc])

        def single_step(kk, acc):
            w = builder.load(builder.gep(val_ptr, [kk]))
            w_all = shuffle(builder.insert_element(ir.Constant(vec, ir.Undefined), w, ir.Constant(i32, 0)),
                            ir.Constant(vec, ir.Undefined), [0] * QUAD)
            return builder.call(fma, [w_all, x_at(kk), acc])

        def round_down(multiple):
            count = builder.sub(k1_v, k0_v)
            return builder.add(k0_v, builder.mul(builder.sdiv(count, ir.Constant(i64, multiple)),
                                                 ir.Constant(i64, multiple)))

        zero_wide = ir.Constant(wide, None)
        # Two wide accumulators, 8 nonzeros a trip (FMA latency), then one more group of 4, then one by one.
        k_pairs, k_quads = round_down(8), round_down(4)
        acc_a, acc_b = _counted_loop(builder, k0_v, k_pairs, 8, [zero_wide, zero_wide], lambda k, accs: [
            quad_step(k, accs[0]), quad_step(builder.add(k, ir.Constant(i64, 4)), accs[1])])
        acc, = _counted_loop(builder, k_pairs, k_quads, 4, [builder.fadd(acc_a, acc_b)],
                             lambda k, accs: [quad_step(k, accs[0])])
        half = builder.fadd(shuffle(acc, acc, list(range(2 * QUAD))), shuffle(acc, acc, list(range(2 * QUAD, width))))
        total = builder.fadd(shuffle(half, half, list(range(QUAD))), shuffle(half, half, list(range(QUAD, 2 * QUAD))))
        init = shuffle(builder.insert_element(ir.Constant(vec, ir.Undefined), init_v, ir.Constant(i32, 0)),
                       ir.Constant(vec, ir.Undefined), [0] * QUAD)
        result, = _counted_loop(builder, k_quads, k1_v, 1, [builder.fadd(total, init)],
                                lambda k, accs: [single_step(k, accs[0])])
        value, = _epilogue(builder, [result], lambda ptr, start: [load(ptr, start, vec)], res_ptr, r_v, has_res_v,
                           relu_v, mask_ptr, m_v, has_mask_v)
        builder.store(value, builder.bitcast(builder.gep(out_ptr, [o_v]), vec.as_pointer()), align=align)
        return context.get_dummy_value()

    @intrinsic
    def quad_strip(typingctx, x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu,
                   mask, m, has_mask):
        """The strip's contract for n_valid == QUAD (n_valid is not read)."""
        _check_types(x, indices, values, out, res, mask)
        return types.void(x, types.intp, types.intp, indices, values, types.intp, types.intp, x.dtype, out,
                          types.intp, types.intp, res, types.intp, types.boolean, types.boolean, mask, types.intp,
                          types.boolean), codegen

    return quad_strip


quad_strip = _make_quad_strip()


@njit(inline="always", nogil=True)
def row_strip(x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu, mask, m,
              has_mask):
    """The strip kernel with as many vectors as n_valid needs (the last one masked); the quad strip for 4."""
    n_lanes = VECTOR_BYTES // x.itemsize
    if n_valid == QUAD:
        quad_strip(x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu, mask, m,
                   has_mask)
    elif n_valid <= n_lanes:
        strip1(x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu, mask, m,
               has_mask)
    elif n_valid <= 2 * n_lanes:
        strip2(x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu, mask, m,
               has_mask)
    elif n_valid <= 3 * n_lanes:
        strip3(x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu, mask, m,
               has_mask)
    else:
        strip4(x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu, mask, m,
               has_mask)


@njit(inline="always", nogil=True)
def _whole_short_strip(x, x0, stride, indices, values, k0, k1, init, out, o, n_vec, res, r, has_res, relu, mask, m,
                       has_mask):
    """`row_strip` for n_vec (1-4) whole vectors: no mask."""
    n = n_vec * (VECTOR_BYTES // x.itemsize)
    if n_vec == 1:
        strip1_whole(x, x0, stride, indices, values, k0, k1, init, out, o, n, res, r, has_res, relu, mask, m, has_mask)
    elif n_vec == 2:
        strip2_whole(x, x0, stride, indices, values, k0, k1, init, out, o, n, res, r, has_res, relu, mask, m, has_mask)
    elif n_vec == 3:
        strip3_whole(x, x0, stride, indices, values, k0, k1, init, out, o, n, res, r, has_res, relu, mask, m, has_mask)
    else:
        strip4_whole(x, x0, stride, indices, values, k0, k1, init, out, o, n, res, r, has_res, relu, mask, m, has_mask)


@njit(inline="always", nogil=True)
def wide_strip(x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu, mask, m,
               has_mask):
    """Up to WIDE_VECTORS whole vectors (n_valid a multiple of the vector length: the lanes conv's cells): 6 or 8
    accumulators share each nonzero's index and weight loads and hide the FMA latency; a strip too short for that
    runs as one or two of up to 4 vectors."""
    n_lanes = VECTOR_BYTES // x.itemsize
    n_vec = n_valid // n_lanes
    if n_vec == WIDE_VECTORS:
        strip8(x, x0, stride, indices, values, k0, k1, init, out, o, n_valid, res, r, has_res, relu, mask, m,
               has_mask)
        return
    head = 6 if n_vec >= 6 else min(n_vec, STRIP_VECTORS)
    if head == 6:
        strip6(x, x0, stride, indices, values, k0, k1, init, out, o, 6 * n_lanes, res, r, has_res, relu, mask, m,
               has_mask)
    else:
        _whole_short_strip(x, x0, stride, indices, values, k0, k1, init, out, o, head, res, r, has_res, relu, mask, m,
                           has_mask)
    if n_vec > head:
        step = head * n_lanes
        _whole_short_strip(x, x0 + step, stride, indices, values, k0, k1, init, out, o + step, n_vec - head, res,
                           r + step, has_res, relu, mask, m + step, has_mask)


@njit(inline="always", nogil=True)
def cell_pair_strip(x, x0, gap, indices, values, k0, k1, init, out, o, cell, res, r, has_res, relu):
    """Two output cells of `cell` floats each (one of PAIR_CELL_SIZES), adjacent in out and res, whose
    inputs lie `gap` elements apart in x: one gapped strip."""
    if cell == 4 * VECTOR_BYTES // x.itemsize:
        strip8_gap(x, x0, 1, indices, values, k0, k1, init, out, o, 2 * cell, res, r, has_res, relu, res, 0, False,
                   gap)
    elif cell == 2 * VECTOR_BYTES // x.itemsize:
        strip4_gap(x, x0, 1, indices, values, k0, k1, init, out, o, 2 * cell, res, r, has_res, relu, res, 0, False,
                   gap)
    else:
        strip2_gap(x, x0, 1, indices, values, k0, k1, init, out, o, 2 * cell, res, r, has_res, relu, res, 0, False,
                   gap)


@njit(inline="always", nogil=True)
def row_pair_strip(x, x0, x_gap, indices, values, k0, k1, init, out, o, out_gap, res, has_res, relu, step_x, cell):
    """Two output rows of WIDE_VECTORS whole vectors each (cells of `cell` floats, whose inputs lie step_x cells
    apart: 1, or 2 where cell is 16, 32 or 64), the second row reading x x_gap and writing out (reading res) out_gap
    elements after the first: each nonzero's index and weight load serve twice the multiply-adds, and a work
    item's input window covers 4 input rows for 2 output rows where one row's covers 3 (at stride 1)."""
    n = 2 * WIDE_VECTORS * VECTOR_BYTES // x.itemsize
    vectors = cell * x.itemsize // VECTOR_BYTES
    if step_x == 1:
        strip16_rows(x, x0, 1, indices, values, k0, k1, init, out, o, n, res, o, has_res, relu, res, 0, False, x_gap,
                     out_gap)
    elif vectors == 1:
        strip16_rows_s2c1(x, x0, 1, indices, values, k0, k1, init, out, o, n, res, o, has_res, relu, res, 0, False,
                          x_gap, out_gap)
    elif vectors == 2:
        strip16_rows_s2c2(x, x0, 1, indices, values, k0, k1, init, out, o, n, res, o, has_res, relu, res, 0, False,
                          x_gap, out_gap)
    else:
        strip16_rows_s2c4(x, x0, 1, indices, values, k0, k1, init, out, o, n, res, o, has_res, relu, res, 0, False,
                          x_gap, out_gap)
