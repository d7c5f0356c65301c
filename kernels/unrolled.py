"""Per-layer machine code for the lanes conv: each nonzero weight unrolled into one AVX-512 instruction.

The strip kernels (strip.py) hold one output channel's strip in registers and reload an input vector for
every nonzero: one load per multiply-add. At batch 64 that load comes from L2 (a block's input window is
larger than L1), and the strip conv tops out near 32 GMAC/s per core. Holding G output channels' vectors
in registers instead (G = 30) lets one loaded input vector feed every nonzero of those channels at that input
position (about G x density of them: 3 at 10%). Which registers a position feeds is the sparsity pattern itself, so
the code is written per layer, the way sparse inference engines JIT their convs:

    for each input position (channel, tap) that any of the G channels reads:
        vmovups  zmm_x, [x + offset]                        ; one load
        vfmadd231ps zmm_acc[j], zmm_x, [w + 4k]{1to16}      ; per nonzero: weight broadcast from memory

with each accumulator starting at bias + residual, then per channel max(0, .) where relu, and a store. The
nonzeros run tap by tap, each tap's section skipped where the caller's mask says that tap reads the zero border at
this cell. One function per group of G channels (and block of input channels) computes one 16-lane vector of every
output cell it is called for; the caller passes the strip's input, output, weight and residual pointers (offsets
inside the layout are baked in as displacements) and the cell's mask of taps.

The encoder below writes these few EVEX instructions itself: LLVM took 4 s to compile the same code for a
128-channel layer and 23 s for a 256-channel one (bench/RESULTS.md); writing the bytes with numpy takes
milliseconds. x86-64 with AVX-512F only (`available`); the code lives in an executable anonymous mapping owned by
the `UnrolledCode` object.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from ._jit import AVX512, OPTIONS, twin

# Output channels per group: zmm0..29 hold their vectors (one core, 10%, 8x8 and 4x4 maps: 24 -> 30, 42 -> 46 GMAC/s).
ACCUMULATORS = 30
_X, _ZERO = 30, 31  # the loaded input, and zero for the ReLU
# SysV argument registers: f(x, out, w, res)
_RDI, _RSI, _RDX, _RCX = 7, 6, 2, 1
# (map, pp, opcode): map 1 = 0F, 2 = 0F38; pp 0 = none, 1 = 66
_VMOVUPS_LOAD, _VMOVUPS_STORE = (1, 0, 0x10), (1, 0, 0x11)
_VFMADD231PS, _VBROADCASTSS = (2, 1, 0xB8), (2, 1, 0x18)
_VADDPS, _VMAXPS, _VPXORD = (1, 0, 0x58), (1, 0, 0x5F), (1, 1, 0xEF)
_RET, _VZEROUPPER = b"\xc3", b"\xc5\xf8\x77"


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether this machine can run the unrolled code: x86-64 with AVX-512F, and an OS that maps memory executable
    (checked once by writing and calling a bare `ret`; SELinux or a hardened runtime may refuse it)."""
    if not (AVX512 and platform.machine().lower() in ("x86_64", "amd64") and hasattr(mmap, "PROT_EXEC")):
        return False
    try:
        probe = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        probe[:1] = _RET
        ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(probe)))()
        return True
    except (OSError, ValueError, TypeError):
        return False


def _evex(op, reg: int, vvvv: int, rm: int, memory: bool, disp: int = 0, broadcast: bool = False,
          scale: int = 0) -> bytes:
    """One 512-bit EVEX instruction: ModRM.reg = zmm `reg`, EVEX.vvvv = zmm `vvvv` (0 where unused), and either
    zmm `rm` (memory False) or [general register rm + disp] (memory True; {1to16} where broadcast). disp takes one
    byte where scale (the operand's size: 64 for a vector, 4 for a broadcast float) divides it into -128..127
    (EVEX's compressed displacement), else four."""
    map_, pp, opcode = op
    r, r2 = (reg >> 3) & 1, (reg >> 4) & 1
    if memory:
        if rm & 7 == 4:
            raise ValueError("base registers needing a SIB byte (rsp, r12) are not encoded")
        b, x = (rm >> 3) & 1, 0
    else:
        b, x = (rm >> 3) & 1, (rm >> 4) & 1
    p0 = ((1 - r) << 7) | ((1 - x) << 6) | ((1 - b) << 5) | ((1 - r2) << 4) | map_
    p1 = (((~vvvv) & 15) << 3) | 0x04 | pp  # W0
    p2 = (0b10 << 5) | (int(broadcast) << 4) | ((1 - ((vvvv >> 4) & 1)) << 3)  # L'L = 512, no mask
    if memory:
        if scale and disp % scale == 0 and -128 <= disp // scale <= 127:
            modrm = (0b01 << 6) | ((reg & 7) << 3) | (rm & 7)
            return bytes((0x62, p0, p1, p2, opcode, modrm)) + int(disp // scale).to_bytes(1, "little", signed=True)
        modrm = (0b10 << 6) | ((reg & 7) << 3) | (rm & 7)
        return bytes((0x62, p0, p1, p2, opcode, modrm)) + int(disp).to_bytes(4, "little", signed=True)
    modrm = (0b11 << 6) | ((reg & 7) << 3) | (rm & 7)
    return bytes((0x62, p0, p1, p2, opcode, modrm))


def _add_imm32(register: int, value: int) -> bytes:
    """add r64, imm32 (register 0-7: rax..rdi)."""
    return bytes((0x48, 0x81, 0xC0 | register)) + int(value).to_bytes(4, "little", signed=True)


# Tap sections (group_code): the entry pointers kept in r9 and r10, a section's bases set from them, its test
_MOV_R9_RDI, _MOV_R10_RDX = b"\x49\x89\xf9", b"\x49\x89\xd2"  # mov r9, rdi; mov r10, rdx
_LEA_RDI_R9, _LEA_RDX_R10 = b"\x49\x8d\xb9", b"\x49\x8d\x92"  # lea rdi, [r9 + disp32]; lea rdx, [r10 + disp32]
_TEST_R8D, _JZ_REL32 = b"\x41\xf7\xc0", b"\x0f\x84"  # test r8d, imm32; jz rel32


_X_WINDOW = 4080  # floats of input one rdi base reaches with one-byte displacements (-2048 .. +2032)
_W_WINDOW = 256   # weights one rdx base reaches (-128 .. +127)


def _disp8_rows(op, regs: np.ndarray, vvvv: int, base: int, disp8: np.ndarray, broadcast: bool) -> np.ndarray:
    """`_evex` with a one-byte displacement, for many ModRM.reg registers at once: uint8 [n, 7] (the same bytes)."""
    template = np.frombuffer(_evex(op, 0, vvvv, base, True, 0, broadcast, scale=1), np.uint8)  # disp 0: one byte
    rows = np.repeat(template[None, :], len(regs), axis=0)
    regs = np.asarray(regs, np.int64)
    rows[:, 1] &= 0x6F  # clear R (bit 7) and R' (bit 4), then set them inverted from the register
    rows[:, 1] |= (((1 - ((regs >> 3) & 1)) << 7) | ((1 - ((regs >> 4) & 1)) << 4)).astype(np.uint8)
    rows[:, 5] |= ((regs & 7) << 3).astype(np.uint8)
    rows[:, 6] = np.asarray(disp8, np.int64).astype(np.int8).view(np.uint8)
    return rows


def _imm32_rows(prefix: bytes, values: np.ndarray) -> np.ndarray:
    """A 7-byte instruction, its three bytes (REX, opcode, ModRM) then a four-byte immediate or displacement, for
    many values: uint8 [n, 7]."""
    rows = np.empty((len(values), 7), np.uint8)
    rows[:, :3] = np.frombuffer(prefix, np.uint8)
    rows[:, 3:] = np.asarray(values, np.int64).astype("<i4").view(np.uint8).reshape(-1, 4)
    return rows


def _add_rows(register: int, values: np.ndarray) -> np.ndarray:
    """`_add_imm32` for many values: uint8 [n, 7]."""
    return _imm32_rows(_add_imm32(register, 0)[:3], values)


def group_code(positions: np.ndarray, owners: np.ndarray, n_chan: int, out_offsets: np.ndarray,
               has_residual: bool, relu: bool, first: bool = True, last: bool = True,
               taps: np.ndarray | None = None) -> bytes:
    """Machine code of one group: out[out_offsets[j]] = relu?(w[j] + res[out_offsets[j]] + sum over nonzeros k of
    channel j of w[n_chan + k] * x[positions[k]]) for j < n_chan, each a 16-float vector (offsets in
    floats, positions multiples of 16). Nonzeros come sorted by position; owners[k] is nonzero k's channel.

    One block of the input channels among several (`conv_functions`): where not `first`, the sums start from the
    output's partial sums instead of the bias and residual (and w holds no biases: nonzero k's weight is w[k]);
    where not `last`, they are stored as they are (no ReLU).

    taps (each nonzero's tap, 0-31; nonzeros sorted by tap, then position): the code runs in one section per tap,
    each only where bit `tap` of the call's mask (its fifth argument, r8) is set. A cell at the map's edge passes
    the taps that read inside the input, so it skips the nonzeros that would multiply the zero border: on a 4x4
    map a 3x3 conv's border taps are 31% of its multiply-adds, which one section per tap skips without a second
    copy of the code (the strip kernels cut the map into regions instead, each with its own nonzeros).

    rdi and rdx step forward through the input and the weights (add r64, imm32 at each new window) so that every
    load and FMA takes a one-byte displacement: all 7-byte instructions (10 with four-byte ones), written for all
    nonzeros at once with numpy: per nonzero the slots [move rdi, load x, move rdx, FMA], those needed kept. A
    section sets rdi and rdx from the entry pointers (kept in r9 and r10) with lea, so that skipping one leaves
    the next one's addresses right."""
    if not 0 < n_chan <= ACCUMULATORS:
        raise ValueError(f"a group holds 1-{ACCUMULATORS} channels, got {n_chan}")
    positions, owners = np.asarray(positions, np.int64), np.asarray(owners, np.int64)
    n = len(positions)
    sectioned = taps is not None
    taps = np.zeros(n, np.int64) if taps is None else np.asarray(taps, np.int64)
    if n and (taps.min() < 0 or taps.max() >= 32):
        raise ValueError("taps must be 0-31 (one bit each of the call's mask)")
    head = bytearray()
    for j in range(n_chan):  # the bias, broadcast (rdx still at the weights' start), or the partial sum
        if first:
            head += _evex(_VBROADCASTSS, j, 0, _RDX, True, 4 * j, scale=4)
            if has_residual:  # read first: a conv may write over its residual, and blocks write partial sums
                head += _evex(_VADDPS, j, j, _RCX, True, 4 * int(out_offsets[j]))
        else:
            head += _evex(_VMOVUPS_LOAD, j, 0, _RSI, True, 4 * int(out_offsets[j]))
    if sectioned:
        head += _MOV_R9_RDI + _MOV_R10_RDX
    n_bias = n_chan if first else 0
    slots = np.zeros((n, 4, 7), np.uint8)
    keep = np.zeros((n, 4), bool)
    section_starts = np.zeros(0, np.int64)
    if n:
        section = np.ones(n, bool)  # a section's first nonzero
        section[1:] = taps[1:] != taps[:-1]
        section_starts = np.flatnonzero(section)
        new = np.ones(n, bool)
        new[1:] = positions[1:] != positions[:-1]
        new |= section
        x_base = positions // _X_WINDOW * _X_WINDOW + 2048
        x_step = np.diff(x_base[new], prepend=0)  # each load's base against the previous load's
        loads = np.flatnonzero(new)
        moves = loads[x_step != 0]
        keep[moves, 0] = True
        slots[moves, 0] = _add_rows(_RDI, 4 * x_step[x_step != 0])
        w_at = n_bias + np.arange(n)
        w_base = w_at // _W_WINDOW * _W_WINDOW + _W_WINDOW // 2
        w_step = np.diff(w_base, prepend=0)
        keep[:, 2] = w_step != 0
        slots[keep[:, 2], 2] = _add_rows(_RDX, 4 * w_step[keep[:, 2]])
        if sectioned:  # each section's first nonzero sets both bases from the entry pointers
            keep[section_starts, 0] = keep[section_starts, 2] = True
            slots[section_starts, 0] = _imm32_rows(_LEA_RDI_R9, 4 * x_base[section_starts])
            slots[section_starts, 2] = _imm32_rows(_LEA_RDX_R10, 4 * w_base[section_starts])
        keep[new, 1] = True
        slots[new, 1] = _disp8_rows(_VMOVUPS_LOAD, np.full(new.sum(), _X), 0, _RDI,
                                    (positions[new] - x_base[new]) // 16, False)
        keep[:, 3] = True
        slots[:, 3] = _disp8_rows(_VFMADD231PS, owners, _X, _RDX, w_at - w_base, True)
    body = bytearray()
    bounds = list(section_starts) + [n]
    for a, z in zip(bounds[:-1], bounds[1:]):
        section_bytes = slots[a:z][keep[a:z]].tobytes()
        if sectioned:  # test r8d, 1 << tap; jz past the section
            body += _TEST_R8D + (1 << int(taps[a])).to_bytes(4, "little") + _JZ_REL32
            body += len(section_bytes).to_bytes(4, "little", signed=True)
        body += section_bytes
    tail = bytearray()
    relu = relu and last
    if relu:
        tail += _evex(_VPXORD, _ZERO, _ZERO, _ZERO, False)
    for j in range(n_chan):
        if relu:  # max(0, acc): where acc is NaN, vmaxps returns its second source, so NaN propagates as in torch
            tail += _evex(_VMAXPS, j, _ZERO, j, False)
        tail += _evex(_VMOVUPS_STORE, j, 0, _RSI, True, 4 * int(out_offsets[j]))
    return bytes(head) + bytes(body) + bytes(tail) + _VZEROUPPER + _RET


class UnrolledCode:
    """Functions laid out in one executable mapping; `addresses[i]` is function i's entry point (0 where
    functions[i] is None: a block a group has no nonzeros in)."""

    def __init__(self, functions: list):
        if not available():
            raise RuntimeError("unrolled code needs x86-64 with AVX-512F")
        sizes = [0 if f is None else -(-len(f) // 64) * 64 for f in functions]  # each function on a cache line
        starts = np.cumsum([0] + sizes)
        self._map = mmap.mmap(-1, max(int(starts[-1]), 1), prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        for start, function in zip(starts, functions):
            if function is not None:
                self._map[start:start + len(function)] = function
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self.addresses = np.array([0 if f is None else base + int(s) for s, f in zip(starts[:-1], functions)],
                                  np.int64)
        self.nbytes = int(starts[-1])

    def __deepcopy__(self, memo):  # the code never changes once written: a copied plan may share it
        return self


def conv_functions(indptr, positions, values, bias, out_plane: int, has_residual: bool, relu: bool,
                   block_span: int = 0, taps=None):
    """(functions' machine code, weights float32, starts int64, blocks) for a conv whose output channel co has
    nonzeros indptr[co]:indptr[co + 1] at input positions `positions` (floats from a strip's first input) with
    `values`: per group of ACCUMULATORS channels, one function per block of input positions `block_span` floats long
    (whole input channels; 0: one block), group g's block k at [g * blocks + k] (None where the group has no
    nonzeros in it, unless it holds the bias or the epilogue). Each reads weights[starts[g * blocks + k]:] (the
    first of a group its biases, then its nonzeros in position order) and writes channel co's vector at
    co * out_plane floats from the output pointer; blocks after a group's first add to what it wrote.

    Why blocks: a group's whole function reads every input channel its 30 channels touch (a 4x4 map's 512 channels
    at 90%: all of them, 295 KB a cell) and holds 100+ KB of code, fetched again from L2 or L3 for every cell. A
    block's function (a few KB) runs over all of a band's cells from the instruction cache, and every group's
    function of a block reads the same input window (`_unrolled_conv`); each block after the first loads and stores
    the group's partial sums (the plan sizes blocks to pay for that: plan.unrolled_bands).

    taps (each nonzero's tap, 0-31, or None): each function runs its nonzeros tap by tap, each tap only where the
    call's mask holds it (`group_code`, `tap_masks`)."""
    n_out = len(indptr) - 1
    positions = np.asarray(positions, np.int64)
    n_blocks = 1 if block_span <= 0 or len(positions) == 0 else int(positions.max() // block_span) + 1
    functions, weights, starts, at = [], [], [], 0
    for g0 in range(0, n_out, ACCUMULATORS):
        chans = np.arange(g0, min(n_out, g0 + ACCUMULATORS))
        lo, hi = int(indptr[g0]), int(indptr[chans[-1] + 1])
        owners = np.repeat(chans - g0, np.diff(indptr[g0:chans[-1] + 2]))
        order = np.argsort(positions[lo:hi], kind="stable")
        group_positions, group_owners = positions[lo:hi][order], owners[order]
        group_values = np.asarray(values[lo:hi])[order]
        group_taps = None if taps is None else np.asarray(taps, np.int64)[lo:hi][order]
        # Sorted positions: each block is one run of them.
        cuts = np.searchsorted(group_positions, np.arange(n_blocks + 1) * block_span) if n_blocks > 1 else [0, hi - lo]
        used = [k for k in range(n_blocks) if cuts[k + 1] > cuts[k]] or [0]
        for k in range(n_blocks):
            if k not in used:
                functions.append(None)
                starts.append(at)
                continue
            first, last = k == used[0], k == used[-1]
            a, z = int(cuts[k]), int(cuts[k + 1])
            by_tap = np.arange(a, z) if group_taps is None else a + np.argsort(group_taps[a:z], kind="stable")
            functions.append(group_code(group_positions[by_tap], group_owners[by_tap], len(chans), chans * out_plane,
                                        has_residual, relu, first, last,
                                        None if group_taps is None else group_taps[by_tap]))
            block_values = group_values[by_tap]
            block_weights = block_values if not first else np.concatenate([bias[chans], block_values])
            weights.append(np.asarray(block_weights, np.float32))
            starts.append(at)
            at += len(weights[-1])
    return functions, np.concatenate(weights), np.array(starts, np.int64), n_blocks


def tap_masks(h: int, w: int, out_h: int, out_w: int, kernel_size, stride, dilation, pads) -> tuple:
    """(row masks uint32 [out_h], column masks uint32 [out_w]) of a conv whose nonzeros carry their taps
    (`conv_functions`): bit t of row oy's mask is set where tap t's kernel row reads an input row inside the map at
    output row oy, likewise for columns, so output cell (oy, ox) runs the taps of rows[oy] & columns[ox]. Convs
    of more than 32 taps run every tap (all bits set)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    rows, columns = np.full(out_h, 0xFFFFFFFF, np.uint32), np.full(out_w, 0xFFFFFFFF, np.uint32)
    if kh * kw > 32:
        return rows, columns
    ky, kx = np.divmod(np.arange(kh * kw), kw)
    bits = (1 << np.arange(kh * kw)).astype(np.int64)
    for out_cells, masks, size, step, dil, pad, k in ((out_h, rows, h, sh, dh, pads[0], ky),
                                                       (out_w, columns, w, sw, dw, pads[2], kx)):
        for o in range(out_cells):
            at = o * step - pad + k * dil
            masks[o] = int(bits[(at >= 0) & (at < size)].sum())
    return rows, columns


@intrinsic
def call_group(typingctx, address, x, x_at, out, out_at, w, w_at, res, res_at, mask):
    """Call the unrolled group function at `address` with pointers to x[x_at], out[out_at], w[w_at], res[res_at]
    (flat float32 arrays) and the taps `mask` (functions written without tap sections ignore it)."""
    for name, a in (("x", x), ("out", out), ("w", w), ("res", res)):
        if not isinstance(a, types.Array) or a.layout != "C" or a.dtype != types.float32:
            raise TypingError(f"call_group: {name} must be a C-contiguous float32 array, got {a}")
    sig = types.void(types.int64, x, types.intp, out, types.intp, w, types.intp, res, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        f32p = ir.FloatType().as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [f32p, f32p, f32p, f32p, ir.IntType(64)])
        pointers = []
        for array, at, arg_type in ((args[1], args[2], signature.args[1]), (args[3], args[4], signature.args[3]),
                                    (args[5], args[6], signature.args[5]), (args[7], args[8], signature.args[7])):
            data = context.make_array(arg_type)(context, builder, array).data
            pointers.append(builder.gep(data, [at]))
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), pointers + [args[9]])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch_l2(typingctx, address):
    """Prefetch the cache line at `address` (an int64) into L2 (llvm.prefetch: read, locality 2, data; prefetcht1).
    Locality 3 (into L1 as well) ran 3% slower on whole calls: the lines are needed a function later."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):
        i32, pointer = ir.IntType(32), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [pointer, i32, i32, i32])
        function = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(function, [builder.inttoptr(args[0], pointer), i32(0), i32(2), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


_PREFETCH_MAX_BYTES = 32 << 10  # a function's code prefetched at most (blocks' functions hold a few KB)


@njit(inline="always", **OPTIONS)
def _address(words, i):
    """Function i's entry point from its two address words (`address_words`; 0: no function)."""
    return np.int64(words[2 * i]) | (np.int64(words[2 * i + 1]) << 32)


@njit(inline="always", **OPTIONS)
def _prefetch_function(words, starts, weights, i):
    """Prefetch function i's code (up to the next function's entry, which follows it in the mapping) and its
    weights (up to the next function's) into L2."""
    address = _address(words, i)
    if address == 0:
        return
    n = len(starts)
    end = address + 4096  # the last function's length is not recorded: its first 4 KB
    for j in range(i + 1, n):
        following = _address(words, j)
        if following != 0:
            end = following
            break
    for line in range(address, min(end, address + _PREFETCH_MAX_BYTES), 64):
        prefetch_l2(line)
    w_start = weights.ctypes.data + 4 * np.int64(starts[i])
    w_end = weights.ctypes.data + 4 * np.int64(starts[i + 1]) if i + 1 < n else w_start + 4096
    for line in range(w_start, w_end, 64):
        prefetch_l2(line)


def _unrolled_conv(words, starts, n_blocks, weights, x, origin, step_y, step_x, residual, out, wq_out, out_origin,
                   out_h, out_w, lanes, block_rows, blocks_outer, row_masks, col_masks, prefetch_next):
    """The lanes conv (lanes.py's `_lane_conv` addressing: output cell (oy, ox) reads from input cell origin +
    oy * step_y + ox * step_x, writes cell out_origin + oy * wq_out + ox; x, out, residual flat) through the
    unrolled functions of `conv_functions`: group g's block k has the address words[2i] | words[2i + 1] << 32
    (i = g * n_blocks + k; 0: none), its weights start at starts[i]; residual is read where the code was built
    with it. Output cell (oy, ox) of the whole map (border excluded, wq_out cells a row with border) runs the taps
    of row_masks[oy] & col_masks[ox] (`tap_masks`). prefetch_next (blocks outermost): while a function runs over a
    band, the next one's code and weights are prefetched into L2; without, each function's first cell waited for
    its code from L3 (a whole call ran each op 1.2x slower than the op run again at once: CIFAR ResNet18 90% bs 64
    42.0 ms against 33.9 ms for the repeats; code and weights prefetched, paired whole calls 0.975x the time; code
    alone 1.01x the time of both, weights alone 1.03x, into L1 as well 1.03x).

    Order: each 16-lane vector of the cells, then bands of block_rows output rows, then either the groups (in
    parallel) and each group's blocks in turn, or (blocks_outer, a serial plan's) the blocks and every group within
    a block; then the band's cells. Every group reads every input channel, so with groups outermost each group
    streamed the whole input from L3 again (a CIFAR ResNet18 share's layer4 input is 2.4 MB): a band's input rows
    for one vector stay in L2 while all the groups' code runs over them (the plan sizes the bands), and with blocks
    outermost one block's window while every group's function of that block runs."""
    n_vec = lanes // 16
    n_groups = len(starts) // n_blocks
    for v in range(n_vec):
        for oy0 in range(0, out_h, block_rows):
            if blocks_outer:
                for k in range(n_blocks):
                    for g in prange(n_groups):
                        if prefetch_next:  # the function that runs next, while this one runs over the band
                            next_k, next_g = (k, g + 1) if g + 1 < n_groups else (k + 1, 0)
                            if next_k < n_blocks:
                                _prefetch_function(words, starts, weights,
                                                   np.int64(next_g) * np.int64(n_blocks) + np.int64(next_k))
                        _unrolled_band(words, starts, weights, x, origin, step_y, step_x, residual, out, wq_out,
                                       out_origin, out_h, out_w, lanes, block_rows, v, oy0, g * n_blocks + k,
                                       row_masks, col_masks)
            else:
                for g in prange(n_groups):
                    for k in range(n_blocks):
                        _unrolled_band(words, starts, weights, x, origin, step_y, step_x, residual, out, wq_out,
                                       out_origin, out_h, out_w, lanes, block_rows, v, oy0, g * n_blocks + k,
                                       row_masks, col_masks)


@njit(inline="always", **OPTIONS)
def _unrolled_band(words, starts, weights, x, origin, step_y, step_x, residual, out, wq_out, out_origin, out_h,
                   out_w, lanes, block_rows, v, oy0, i, row_masks, col_masks):
    """Function i of the unrolled conv over one band's cells, vector v."""
    address = _address(words, i)
    if address == 0:
        return
    first_col = out_origin % wq_out - 1  # the op's first column in the whole map (an op or band may start anywhere)
    for oy in range(oy0, min(out_h, oy0 + block_rows)):
        row_mask = np.int64(row_masks[(out_origin + oy * wq_out) // wq_out - 1])
        for ox in range(out_w):
            src = (origin + oy * step_y + ox * step_x) * lanes + 16 * v
            dst = (out_origin + oy * wq_out + ox) * lanes + 16 * v
            call_group(address, x, src, out, dst, weights, np.intp(starts[i]), residual, dst,
                       row_mask & np.int64(col_masks[first_col + ox]))


unrolled_conv_par, unrolled_conv_seq = twin(_unrolled_conv)


def address_words(code: UnrolledCode) -> np.ndarray:
    """The functions' addresses as uint32 pairs (low word first: x86-64 is little-endian), for a plan's u32 weights."""
    return code.addresses.view(np.uint32).copy()
