"""Compile a sparsified network into one execution plan (op table + arena) for `kernels.executor`.

`SparseGraphModule` is the fused fx graph: a CPU float32 call whose every node the plan supports
runs as one Numba call; anything else (CUDA, other dtypes, unsupported ops, dense convs) runs the
graph eagerly, so the plan is never the reason a model fails. Plans are built per input shape on
first use and cached; `plan_for(x)` exposes the one a call would use.
"""
from __future__ import annotations

import contextlib
import io
import math
import threading
import time
from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from . import bands, kernels, ops
from .choice import SERIAL, SplitChoice
from .fuse import _ADD_FUNCTIONS, _RELU_FUNCTIONS
from .kernels import executor as ex
from .formats import CSR, column_blocks, sliced_ell
from .modules import SparseConv2d, SparseLinear, block_diagonal, explicit_pads


class Unsupported(Exception):
    """The plan cannot express this graph; the caller runs it eagerly."""


CACHE_LINE = 64  # bytes


def aligned_empty(size: int) -> np.ndarray:
    """float32[size] starting on a cache line. The builder places every buffer at a multiple of 16
    floats, so all of them start on a line too: a 64-float row read at a 16-byte offset spans five
    lines instead of four, and every vector load splits (2x slower SpMM, A/B-measured)."""
    raw = np.empty(size + CACHE_LINE // 4, dtype=np.float32)
    skip = (-raw.ctypes.data % CACHE_LINE) // 4
    return raw[skip:skip + size]


@dataclass
class Plan:
    ops: np.ndarray       # int64 [n_ops, 2 + N_PARAMS]
    f32: np.ndarray       # float32 weights and biases
    u32: np.ndarray       # uint32 index arrays
    u16: np.ndarray       # uint16 index arrays (those whose values fit), 2-byte column steps of the sliced matvec
    u8: np.ndarray        # uint8 column steps of the batch-1 sliced matvec
    arena_size: int       # float32 elements of activations + scratch (buffers reused by liveness), all parts
    output: tuple         # (offset, layout, shape): where (one part's share of) the result lies in its part
    input_shape: tuple
    parts: int = 1        # batch split: the ops run once per part, on its share of the batch (see batch_parts)
    part_len: int = 0     # float32 elements of one part's arena (its stride in the arena)
    code: tuple = ()      # unrolled machine code the ops call (kernels.UnrolledCode): kept alive with the plan
    op_layers: tuple = ()  # per op row, the graph node it was lowered from: a module's name ("layer1.0.conv1"),
                           # a function node's ("add_1"), "input" or "output"; for per-layer profiles

    def __post_init__(self):
        # One arena reused across calls: a fresh 100+ MB allocation per call cost more in page
        # faults and zero-filling than the sparse arithmetic. A concurrent caller gets its own.
        self._arena = None
        self._lock = threading.Lock()
        self._output_size = math.prod(self.output[2])  # np.prod here cost ~6 us a call
        # A plan that splits ops between threads also keeps them all on one, and each call runs the table that
        # recent calls measured faster (sparsert.choice; SPLIT_CHOICE). Same arena, same weights, same sums.
        self.choice = None
        if SPLIT_CHOICE and self.parts == 1 and self.ops[:, 1].any():
            self.serial_ops = self.ops.copy()
            self.serial_ops[:, 1] = 0
            self.choice = SplitChoice()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x_flat = x.detach().contiguous().numpy().reshape(-1)
        if self._lock.acquire(blocking=False):
            try:
                if self._arena is None:
                    self._arena = aligned_empty(self.arena_size)
                if self.choice is None:
                    return self._run(self._arena, x_flat, self.ops)
                start = time.perf_counter()
                table = self.choice.next(start)
                self.run_ops(self.serial_ops if table == SERIAL else self.ops, self._arena, x_flat)
                end = time.perf_counter()
                self.choice.record(table, end - start, end)
                return self._output(self._arena)
            finally:
                self._lock.release()
        chosen = self.serial_ops if self.choice is not None and self.choice.chosen == SERIAL else self.ops
        return self._run(aligned_empty(self.arena_size), x_flat, chosen)

    def run_ops(self, rows, arena, x_flat) -> None:
        """Run the op rows `rows` (the whole table, or a slice of it: bench/profile_plan.py) on arena: once, or
        once per part of a split batch, each part on its own thread."""
        if self.parts == 1:
            ex.run_plan(rows, arena, self.f32, self.u32, self.u16, self.u8, x_flat)
        else:
            ex.run_plan_parts(ex.run_plan_pointer().address, np.ascontiguousarray(rows), arena, self.part_len, self.f32, self.u32,
                              self.u16, self.u8, np.ascontiguousarray(x_flat), self.parts)

    def run_rows(self, rows, x_flat) -> None:
        """`run_ops` on the plan's own arena, where a call leaves its activations: for the profiling scripts
        (bench/profile_plan.py, bench/ab_plan.py), which time ops one at a time."""
        if self._arena is None:
            self._arena = aligned_empty(self.arena_size)
        self.run_ops(rows, self._arena, x_flat)

    def _run(self, arena, x_flat, rows) -> torch.Tensor:
        self.run_ops(rows, arena, x_flat)
        return self._output(arena)

    def _output(self, arena) -> torch.Tensor:
        """The result a run of the ops left in arena, as a tensor of its own."""
        offset, layout, shape = self.output
        if self.parts == 1:
            out = arena[offset:offset + self._output_size].reshape(shape).copy()
        else:
            starts = range(offset, self.arena_size, self.part_len)
            # Both layouts keep the batch on axis 1: the parts' shares join there, in one copy.
            out = np.concatenate([arena[s:s + self._output_size].reshape(shape) for s in starts], axis=1)
        ops.CALLS["numba.plan"] += 1
        out = torch.from_numpy(out)
        return out.t() if layout == "features" else out.permute(1, 0, 2, 3)  # to [B, F] / NCHW views


class SparseGraphModule(torch.fx.GraphModule):
    """The fused graph of a sparsified model; calls run through a compiled plan where possible.

    Plan path: one CPU float32 tensor argument, no autograd, every node supported. It bypasses
    forward hooks on this top-level module (hooks on submodules never fire in a plan either);
    `plan_for(x)` tells whether a call would take it."""

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs:
            plan = self.plan_for(args[0])
            if plan is not None:
                return plan(args[0])
        return super().__call__(*args, **kwargs)

    def plan_for(self, x):
        """The plan a call with `x` would run, or None (eager)."""
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu"
                and x.dim() in (2, 4) and x.shape[0] > 0) or (torch.is_grad_enabled() and x.requires_grad):
            return None
        plans = self.__dict__.setdefault("_plans", {})
        parts = batch_parts(x.shape)
        key = (tuple(x.shape), parts)  # a thread count that changes the split gets its own plan
        if key not in plans:
            try:
                # ShapeProp prints a traceback for inputs the model rejects; the eager call that
                # follows raises the layer's own clear error instead.
                with contextlib.redirect_stderr(io.StringIO()):
                    plans[key] = plan_for_shape(self, key[0], parts)
            except Exception:  # Unsupported, or an input the model rejects: run eagerly
                plans[key] = None
        return plans[key]

    def _apply(self, fn, *args, **kwargs):
        self.__dict__["_plans"] = {}  # weights may have moved or changed dtype: rebuild on next call
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__["_plans"] = {}  # plans hold copies of the weights: rebuild after new ones load
        return super()._load_from_state_dict(*args, **kwargs)


# ----------------------------------------------------------------------------------------- builder
class _Builder:
    def __init__(self):
        self.rows: list[list[int]] = []
        self.f32: list[np.ndarray] = []
        self.u32: list[np.ndarray] = []
        self.n_f32 = 0
        self.n_u32 = 0
        self.u16: list[np.ndarray] = []
        self.n_u16 = 0
        self.u8: list[np.ndarray] = []
        self.n_u8 = 0
        self.arena = 0
        self.free_blocks: list[tuple[int, int]] = []  # (offset, size), reusable arena ranges
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, int] = {}                 # buffer offset -> pending readers
        self.aliases: dict[int, int] = {}              # grid buffer base -> its allocation (guard first)
        self.temps: list[int] = []                     # buffers freed once the current node is lowered
        self.converted: dict[tuple, tuple] = {}        # (offset, layout) -> that buffer converted to layout
        self.masks: dict[tuple, int] = {}              # grid geometry (H, W) -> border mask in f32
        self.lanes = False                             # 4-D activations batch-in-lanes (kernels.lanes)
        self.tiles = False                             # batch 1: large maps tiled into lanes (see TILES)
        self.halo_masks = -1                           # u32 offset of the tiled lanes convs' halo masks (once)
        self.relu_flag: dict = {}                      # node -> [(row, param)]: the ReLU flags of the ops writing it
        self.modules: dict[str, nn.Module] = {}        # the graph's submodules, by name
        self.fused: dict = {}                          # node -> its buffer, already written by an earlier op
        self.border_op: dict[int, int] = {}            # lanes buffer offset -> row of the conv that zeroes its border
        self.border_rows: set[int] = set()             # every such row
        self.border_read: set[int] = set()             # ... those whose border some reader reads
        self.serial = False                            # every op serial: one thread runs each part of a split batch
        self.layer = ""                                # the node being lowered: each emitted op row is labelled with it
        self.layers: list[str] = []                    # per op row, that label
        self.lane_rows: dict[int, bands.LaneRows] = {}  # LANE_CONV row -> the rows it reads and writes (bands.py)
        self.unrolled: dict[int, tuple] = {}         # LANE_CONV row -> its CSR, to unroll once its flags are final
        self.code: list = []                           # the plan's unrolled machine code (kernels.UnrolledCode)

    def alloc(self, size: int) -> int:
        """First-fit from freed blocks, else grow the arena. Sizes padded to 64 B."""
        size = (int(size) + 15) // 16 * 16 + 16
        for i, (offset, free) in enumerate(self.free_blocks):
            if free >= size:
                if free == size:
                    self.free_blocks.pop(i)
                else:
                    self.free_blocks[i] = (offset + size, free - size)
                self.sizes[offset] = size
                self.border_op.pop(offset, None)
                return offset
        offset = self.arena
        self.arena += size
        self.sizes[offset] = size
        return offset

    def alloc_grid(self, c: int, n: int, h: int, w: int) -> int:
        """A grid activation (see kernels.conv._grid_conv): returns the base of channel 0, which follows
        a guard of at least W+3 floats, rounded to keep the base on a cache line."""
        _, _, row_len, guard = grid_geometry(n, h, w)
        lead = -(-guard // 16) * 16
        offset = self.alloc(lead + c * row_len)
        self.aliases[offset + lead] = offset
        return offset + lead

    def free(self, offset: int) -> None:
        for key in [k for k in self.converted if k[0] == offset]:  # conversions live exactly as long as it does
            self.free(self.converted.pop(key)[0])
        offset = self.aliases.pop(offset, offset)
        self.free_blocks.append((offset, self.sizes.pop(offset)))
        self.free_blocks.sort()
        merged = []  # coalesce neighbours so large buffers can be reused later
        for off, size in self.free_blocks:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + size)
            else:
                merged.append((off, size))
        self.free_blocks = merged

    def read_border(self, buf) -> None:
        """A reader of lanes activation buf reads its border cells: the conv that wrote it must zero them."""
        if buf[1] == "lanes" and buf[0] in self.border_op:
            self.border_read.add(self.border_op[buf[0]])

    def unread_borders(self) -> None:
        """Lanes convs whose output border no reader reads skip zeroing it (their zero-border rows param = 0):
        a 3x3 conv's regions, a 1x1 conv, pools, residual reads and conversions read interior cells only. A
        512-channel 1x1 map at batch 64 is 8/9 border: zeroing it took 0.1 ms for a conv of 0.01 ms."""
        for row in self.border_rows - self.border_read:
            self.rows[row][2 + bands.BORDER_ROWS] = 0

    def hold(self, offset: int, readers: int) -> None:
        self.refs[offset] = self.refs.get(offset, 0) + readers

    def release(self, offset: int) -> None:
        self.refs[offset] -= 1
        if self.refs[offset] == 0:
            del self.refs[offset]
            self.free(offset)

    def _store(self, pool: str, a, dtype) -> int:
        """Append `a` (flattened, as dtype) to one of the weight pools; returns its offset there.
        An integer pool refuses values its dtype cannot hold: the cast would wrap them silently (a CSR
        indptr past 2^32 nonzeros in u32), and the kernels would read wrong weights."""
        a = np.asarray(a)
        if np.issubdtype(dtype, np.integer) and a.size:
            low, high = int(a.min()), int(a.max())
            if low < 0 or high > np.iinfo(dtype).max:
                raise Unsupported(f"{pool} weight pool: values in [{low}, {high}] do not fit {np.dtype(dtype).name}")
        a = np.ascontiguousarray(a).astype(dtype, copy=False).reshape(-1)
        offset = getattr(self, "n_" + pool)
        getattr(self, pool).append(a)
        setattr(self, "n_" + pool, offset + a.size)
        return offset

    def weights_f32(self, a) -> int:
        return self._store("f32", a, np.float32)

    def weights_u32(self, a) -> int:
        return self._store("u32", a, np.uint32)

    def weights_u8(self, a) -> int:
        return self._store("u8", a, np.uint8)

    def weights_u16(self, a) -> int:
        return self._store("u16", a, np.uint16)

    def indices(self, a) -> tuple[int, int]:
        """Store an index array in u16 when its values fit, else u32: (offset, 1 if u16 else 0)."""
        a = np.asarray(a)
        if a.size and int(a.max()) >= 1 << 16:
            return self.weights_u32(a), 0
        return self.weights_u16(a), 1

    def runs_parallel(self, work: int) -> bool:
        """Whether an op of this much work runs on the parallel twin of its kernel (emit's flag)."""
        return work >= ops.PARALLEL_MIN_WORK and not self.serial

    def emit(self, code: int, work: int, *params: int):
        if len(params) > ex.N_PARAMS:
            raise AssertionError("op has more parameters than the table holds")
        self.rows.append([code, int(self.runs_parallel(work)), *map(int, params)] + [0] * (ex.N_PARAMS - len(params)))
        self.layers.append(self.layer)


# Ops with a fused ReLU flag: where it and the output offset sit in their parameters (kernels.executor).
_RELU_PARAM = {ex.LANE_CONV: 7, ex.CONV_GEMM: 6, ex.LINEAR_CSR: 5, ex.LINEAR_SLICED: 4, ex.CONV: 9, ex.GRID_CONV: 6,
               ex.TAP_CONV: 5}
_OUTPUT_PARAM = {ex.LANE_CONV: 3, ex.CONV_GEMM: 3, ex.LINEAR_CSR: 1, ex.LINEAR_SLICED: 1, ex.CONV: 3, ex.GRID_CONV: 3,
                 ex.TAP_CONV: 2}


# Whether a plan whose ops split their work between threads also keeps a table with every op on one thread, and
# runs whichever recent calls measured faster (sparsert.choice: the host may put this VM's two cores on two
# dies, where a split op's reads of the other core's output cost 6x more). False: always the split table.
SPLIT_CHOICE = True

# A batch of at least this many images per thread is split between the threads: each runs the whole
# network serially on its share, in its own part of the arena, so every activation a core reads is one
# it wrote itself. Splitting each op's work instead (rows, channels) made every op read lines the other
# core had just written: on two threads a plan's ops ran 1.47x slower in order than each alone
# (torchvision resnet18 98%, batch 64); on one thread 1.06x. Below this share, per-op splitting keeps
# more work per call. Conv nets only: an MLP's Linears stream their
# weights, and split, each core streams all of them instead of half (MLP 90% at batch 64: 0.97x).
# (It was 32 until the 25th session; on the Zen 4 at batch 32, shares of 16 against the per-op plan, paired whole
# calls: CIFAR ResNet18 90% 2.4x, 98% 1.10x; torchvision resnet18 90% 1.67x, 98% 1.49x.)
SPLIT_MIN_SHARE = 16
# ... and a thread's share runs as several parts, one after another, where its largest activation map would
# outgrow this: a part of a multiple of 16 images (one lane vector) whose map fits, or else of 16. Each part
# streams all the weights again, but its maps, the input and residual a conv reads beside the map it writes,
# stay in cache (L2 1 MB, L3 32 MB shared by both cores). Zen 4, paired whole calls, parts of 16 against one
# part a thread: CIFAR ResNet18 (256 KB a map an image) batch 64 (8 MB a share) 90% 1.18x, global-98 1.26x,
# 98% 1.10x; batch 128 1.48x (against 2 parts of 32 a thread: 1.19x); torchvision resnet18 (64 KB) batch 64
# 90% 1.00x, global-98 0.96x, 98% 0.89x (2 MB a share), batch 128 (4 MB) 0.90x.
SPLIT_MAX_MAP_BYTES = 6 << 20
# ... and only where a share's activations (its arena) outweigh half the weights, which every core then
# streams whole. A/B at batch 64 (split / per-op, medians of paired turns): torchvision resnet18 98% 1.35x
# (arena / weights 2.0), global-98 1.04x (0.68); CIFAR ResNet18 90% 1.09x (0.69), 98% 1.05x (3.6), global-98
# 1.05x (10); torchvision resnet18 90% 0.90x (0.40: 7 MB of weights against 2.8 MB). Those on the Xeon. On the Zen 4,
# with row pairs and bands, torchvision resnet18 90% (a share's arena 2.69 MB against 5.28 MB of weights: 0.51, split
# by a hair at 0.5) ran split in 0.50x the per-op plan's time (one die; two dies alike), so the floor is 0.25.
SPLIT_MIN_ARENA_PER_WEIGHT = 0.25
# A split plan's lanes convs run depth-first in bands of output rows of about this many bytes, at least one row
# (sparsert.bands; 0: one whole map after another). CIFAR ResNet18 per-layer 98% at batch 64 (AMD EPYC Zen 3,
# 512 KB L2, 32 MB L3; paired whole calls, fastest): 129.5 ms whole maps; 256 KB (one row, 278 KB, a band in
# layer1) 100.8; 512 KB 104.3; 1 MB (3 rows) 126.3; 2 MB 125.9.
BAND_BYTES = 256 << 10


def batch_parts(shape) -> int:
    """How many threads split a batch of images of this shape into shares: the Numba thread count when the
    batch divides evenly into shares of at least SPLIT_MIN_SHARE, else 1 (each op splits its own work).
    A share may run in several parts (`thread_parts`)."""
    n = shape[0]
    if len(shape) != 4 or n < 2 * SPLIT_MIN_SHARE:  # every call asks: spare batch 1 the ~1 us thread-count query
        return 1
    threads = numba.get_num_threads()
    return threads if threads > 1 and n % threads == 0 and n // threads >= SPLIT_MIN_SHARE else 1


def thread_parts(gm: torch.fx.GraphModule, input_shape: tuple, threads: int) -> int:
    """Parts each thread's share of a batch split between `threads` runs in: the fewest whose images, a multiple
    of the lane vector, keep the largest activation map within SPLIT_MAX_MAP_BYTES (else the smallest such part;
    1 where the share is no multiple of it)."""
    share = input_shape[0] // threads
    try:
        ShapeProp(gm).propagate(torch.zeros((1, *input_shape[1:])))
    except Exception:  # a model that takes no single image: its share stays one part (build_plan judges the input)
        return 1
    metas = (node.meta.get("tensor_meta") for node in gm.graph.nodes)
    map_bytes = max(4 * math.prod(m.shape) for m in metas if hasattr(m, "shape"))
    counts = [k for k in range(1, share + 1) if share % k == 0 and (k == 1 or share // k % kernels.LANE_VECTOR == 0)]
    return next((k for k in counts if share // k * map_bytes <= SPLIT_MAX_MAP_BYTES), counts[-1])


def plan_for_shape(gm: torch.fx.GraphModule, input_shape: tuple, parts: int) -> Plan:
    """The split plan for `parts` threads' shares, each in `thread_parts` parts, where its activations outweigh
    the weights enough (see above), else the per-op plan."""
    if parts > 1:
        parts *= thread_parts(gm, input_shape, parts)
    plan = build_plan(gm, input_shape, parts)
    weight_bytes = sum(a.nbytes for a in (plan.f32, plan.u32, plan.u16, plan.u8))
    if parts > 1 and 4 * plan.part_len < SPLIT_MIN_ARENA_PER_WEIGHT * weight_bytes:
        plan = build_plan(gm, input_shape, 1)
    return plan


def build_plan(gm: torch.fx.GraphModule, input_shape: tuple, parts: int = 1) -> Plan:
    """The plan for inputs of input_shape; with parts > 1, one serial plan for a 1/parts share of the batch
    that `Plan` runs once per part, in parallel."""
    modules = dict(gm.named_modules())
    if not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in modules.values()):
        raise Unsupported("no sparse layer: torch runs a dense model faster than the plan")
    if parts < 1 or input_shape[0] % parts:
        raise ValueError(f"a batch of {input_shape[0]} does not split into {parts} equal parts")
    full_shape, input_shape = tuple(input_shape), (input_shape[0] // parts, *input_shape[1:])
    example = torch.zeros(input_shape)
    ShapeProp(gm).propagate(example)
    b = _Builder()
    b.modules = modules
    b.serial = parts > 1
    buffers: dict[torch.fx.Node, tuple] = {}  # node -> (offset, layout, shape in that layout)
    output = None
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        b.layer = {"placeholder": "input", "output": "output", "call_module": str(node.target)}.get(node.op, node.name)
        if node.op == "placeholder":
            if buffers:
                raise Unsupported("more than one input")
            shape = tuple(input_shape)
            if len(shape) == 4:
                n, c, h, w = shape
                b.lanes = n >= LANE_MIN_BATCH
                b.tiles = n == 1 and _tile_plan(gm, modules)
                off = b.alloc(n * c * h * w)
                b.emit(ex.NCHW_TO_CNHW, 0, off, n, c, h, w)
                buffers[node] = (off, "cnhw", (c, n, h, w))
            else:
                bs, f = shape
                off = b.alloc(bs * f)
                b.emit(ex.ROWS_TO_FEATURES, bs * f, off, bs, f)
                buffers[node] = (off, "features", (f, bs))
        elif node.op == "output":
            result = node.args[0]
            if not isinstance(result, torch.fx.Node) or result not in buffers:
                raise Unsupported("output is not a single tensor")
            output = _cnhw(b, buffers[result]) if buffers[result][1] in ("grid", "lanes", "tiles") else buffers[result]
        elif node.op == "call_module":
            first_row = len(b.rows)
            buffers[node] = _lower_module(b, modules[node.target], node, buffers, meta)
            # The ops that wrote this node's output, if they have a ReLU flag: the last such op and those right
            # before it (a lanes conv's regions); an earlier op that wrote a temporary at that offset is not one.
            for row in range(len(b.rows) - 1, first_row - 1, -1):
                code = b.rows[row][0]
                if not (code in _RELU_PARAM and b.rows[row][2 + _OUTPUT_PARAM[code]] == buffers[node][0]):
                    if node in b.relu_flag:
                        break
                    continue
                b.relu_flag.setdefault(node, []).append((row, _RELU_PARAM[code]))
        elif node.op in ("call_function", "call_method"):
            buffers[node] = _lower_function(b, node, buffers, meta)
        else:
            raise Unsupported(f"node {node.op}")
        if node.op != "output":
            # Liveness: the buffer stays reserved until its last reader has been lowered.
            b.hold(buffers[node][0], len(node.users))
            for source in node.all_input_nodes:
                b.release(buffers[source][0])
        for temp in b.temps:
            b.free(temp)
        b.temps.clear()
    if output is None:
        raise Unsupported("no output")
    b.unread_borders()
    _unroll(b)
    if b.serial and BAND_BYTES:
        b.rows, b.layers = bands.schedule(b.rows, b.layers, b.lane_rows, BAND_BYTES)
    part_len = b.arena + 16  # a multiple of 16 floats: every part starts on a cache line
    return Plan(ops=np.array(b.rows, dtype=np.int64).reshape(-1, 2 + ex.N_PARAMS),
                f32=np.concatenate(b.f32) if b.f32 else np.zeros(1, np.float32),
                u32=np.concatenate(b.u32) if b.u32 else np.zeros(1, np.uint32),
                u16=np.concatenate(b.u16) if b.u16 else np.zeros(1, np.uint16),
                u8=np.concatenate(b.u8) if b.u8 else np.zeros(1, np.uint8),
                arena_size=parts * part_len, output=output, input_shape=full_shape, parts=parts, part_len=part_len,
                op_layers=tuple(b.layers), code=tuple(b.code))


def _arg(node, buffers, i=0):
    a = node.args[i] if i < len(node.args) else None
    if not isinstance(a, torch.fx.Node) or a not in buffers:
        raise Unsupported(f"{node.name}: argument {i} is not a planned tensor")
    return buffers[a]


def _lower_module(b: _Builder, m: nn.Module, node, buffers, meta):
    if node in b.fused:  # a max pool its conv computed (_lower_lane_conv)
        return b.fused.pop(node)
    if isinstance(m, (nn.Identity, nn.Dropout)) or (isinstance(m, nn.Flatten) and m.start_dim == 1
                                                      and _arg(node, buffers)[1] == "features"):
        return _arg(node, buffers)
    if isinstance(m, SparseConv2d):
        return _lower_conv(b, m, node, buffers)
    if isinstance(m, SparseLinear):
        return _lower_linear(b, m, _arg(node, buffers), sparse=True)
    if type(m) is nn.Conv2d and not node.kwargs:
        return _lower_dense_conv(b, m, _arg(node, buffers))
    if isinstance(m, nn.Linear) and not node.kwargs:
        return _lower_linear(b, m, _arg(node, buffers), sparse=False)
    if isinstance(m, nn.ReLU):
        return _relu(b, node, _arg(node, buffers))
    if isinstance(m, nn.MaxPool2d):
        return _lower_maxpool(b, m, _arg(node, buffers))
    if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)) and _arg(node, buffers)[1] == "lanes":
        off_in, _, (c, n, h, w) = _arg(node, buffers)
        off = b.alloc(c * n)
        lanes, _, _, plane = lane_geometry(n, h, w)
        b.emit(ex.LANE_AVGPOOL, c * lanes * h * w, off_in, off, c, n, h, w, lanes, plane)
        return (off, "cnhw", (c, n, 1, 1))
    if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
        off_in, layout, (c, n, h, w) = _cnhw(b, _arg(node, buffers))
        off = b.alloc(c * n)
        b.emit(ex.GLOBAL_AVGPOOL, c * n * h * w, off_in, off, c, n, h * w)
        return (off, "cnhw", (c, n, 1, 1))
    if isinstance(m, nn.Flatten) and m.start_dim == 1:
        return _flatten(b, _arg(node, buffers))
    raise Unsupported(f"module {type(m).__name__}")


def _lower_function(b: _Builder, node, buffers, meta):
    target = node.target
    if (node.op == "call_function" and target in _RELU_FUNCTIONS) or (node.op == "call_method" and target in
                                                                          ("relu", "relu_")):
        return _relu(b, node, _arg(node, buffers))
    if node.op == "call_function" and target in _ADD_FUNCTIONS and len(node.args) == 2 and not node.kwargs:
        a, c = _arg(node, buffers, 0), _arg(node, buffers, 1)
        if a[1] != c[1] and "lanes" in (a[1], c[1]):  # one layout for both: border zeros add to zero
            a, c = _lanes(b, a), _lanes(b, c)
        elif a[1] != c[1] and "tiles" in (a[1], c[1]):  # over whole planes too: the sum of two halos is the sum's
            a, c = _tiles(b, a), _tiles(b, c)
        elif a[1] != c[1] and "grid" in (a[1], c[1]):
            a, c = _grid(b, a), _grid(b, c)
        if a[1:] != c[1:]:
            raise Unsupported("add of tensors with different shapes or layouts")
        b.read_border(a)  # elementwise over whole planes: the sum's border is the inputs' borders added
        b.read_border(c)
        off = _alloc_like(b, a)
        b.emit(ex.ADD, 0, a[0], c[0], off, _size(a), 0)
        return (off, a[1], a[2])
    is_flatten = (node.op == "call_function" and target is torch.flatten) or (node.op == "call_method" and
                                                                             target == "flatten")
    if is_flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        if start != 1 or len(node.args) > 2 or set(node.kwargs) - {"start_dim"}:
            raise Unsupported("flatten other than flatten(x, 1)")
        return _flatten(b, _arg(node, buffers))
    raise Unsupported(f"function {getattr(target, '__name__', target)}")


GRID_BORDER = kernels.GRID_BORDER  # zero cells around each image of a grid activation (kernels.conv)


def grid_geometry(n: int, h: int, w: int) -> tuple[int, int, int, int]:
    """(cells per image, cells per grid row, channel row length, guard) of a grid activation: a guard
    of W+3 floats before channel 0 and after the last image covers the border cells' reads."""
    wq = w + 2 * GRID_BORDER
    cells = (h + 2 * GRID_BORDER) * wq
    guard = wq + 1
    return cells, wq, ops.packed_row_len(n * cells + guard), guard


def _size(buf) -> int:
    """Floats an op over the whole buffer covers (a grid's channel rows, guard tails included)."""
    if buf[1] == "grid":
        c, n, h, w = buf[2]
        return c * grid_geometry(n, h, w)[2]
    if buf[1] == "lanes":
        c, n, h, w = buf[2]
        return c * lane_geometry(n, h, w)[3]
    if buf[1] == "tiles":
        c, _, h, w = buf[2]
        return c * tile_geometry(h, w)[3]
    return int(np.prod(buf[2]))


def _cnhw(b, buf):
    """The 4-D activation buf as dense CNHW, converting a grid one once (the copy lives as long as buf)."""
    if buf[1] == "grid":
        if (buf[0], "cnhw") not in b.converted:
            off_in, _, (c, n, h, w) = buf
            off = b.alloc(c * n * h * w)
            b.emit(ex.PACK, c * n * h * w, off_in, off, c, n, h, w, 0, 0, 1, 1, h, w, n * h * w, 1,
                   grid_geometry(n, h, w)[2])
            b.converted[(buf[0], "cnhw")] = (off, "cnhw", (c, n, h, w))
        return b.converted[(buf[0], "cnhw")]
    if buf[1] == "lanes":
        if (buf[0], "cnhw") not in b.converted:
            off_in, _, (c, n, h, w) = buf
            lanes, _, _, plane = lane_geometry(n, h, w)
            off = b.alloc(c * n * h * w)
            b.emit(ex.FROM_LANES, c * n * h * w, off_in, off, c, n, h, w, lanes, plane)
            b.converted[(buf[0], "cnhw")] = (off, "cnhw", (c, n, h, w))
        return b.converted[(buf[0], "cnhw")]
    if buf[1] == "tiles":
        if (buf[0], "cnhw") not in b.converted:
            off_in, _, (c, n, h, w) = buf
            lanes, _, _, plane = tile_geometry(h, w)
            off = b.alloc(c * h * w)
            b.emit(ex.FROM_TILES, c * h * w, off_in, off, c, h, w, *TILES, lanes, plane)
            b.converted[(buf[0], "cnhw")] = (off, "cnhw", (c, n, h, w))
        return b.converted[(buf[0], "cnhw")]
    if buf[1] != "cnhw":
        raise Unsupported("expected a 4-D activation")
    return buf


def _grid(b, buf):
    """The 4-D activation buf as a grid, packing a dense one once (the copy lives as long as buf)."""
    if buf[1] == "grid":
        return buf
    if (buf[0], "grid") not in b.converted:
        off_in, _, (c, n, h, w) = _cnhw(b, buf)
        base = b.alloc_grid(c, n, h, w)
        _, _, row_len, _ = grid_geometry(n, h, w)
        b.emit(ex.PACK, c * row_len, off_in, base, c, n, h, w, GRID_BORDER, GRID_BORDER, 1, 1,
               h + 2 * GRID_BORDER, w + 2 * GRID_BORDER, row_len, 0, 0)
        b.converted[(buf[0], "grid")] = (base, "grid", (c, n, h, w))
    return b.converted[(buf[0], "grid")]


def _grid_mask(b, h: int, w: int) -> int:
    """f32 offset of the per-image mask of a grid: 1.0 on interior cells, 0.0 on the border."""
    if (h, w) not in b.masks:
        mask = np.zeros((h + 2 * GRID_BORDER, w + 2 * GRID_BORDER), np.float32)
        mask[GRID_BORDER:GRID_BORDER + h, GRID_BORDER:GRID_BORDER + w] = 1.0
        b.masks[(h, w)] = b.weights_f32(mask)
    return b.masks[(h, w)]


def _alloc_like(b, buf) -> int:
    return b.alloc_grid(*buf[2]) if buf[1] == "grid" else b.alloc(_size(buf))


def _relu(b, node, buf):
    """A ReLU folds into the epilogue of the op that wrote its input when it is that output's only reader
    (layers kept dense are not fused by fuse.py). Else elementwise on any layout: a zero border stays zero."""
    source = node.args[0]
    if source in b.relu_flag and len(source.users) == 1:
        for row, param in b.relu_flag.pop(source):
            b.rows[row][2 + param] = 1
        return buf
    b.read_border(buf)
    off = _alloc_like(b, buf)
    b.emit(ex.RELU, 0, buf[0], off, _size(buf))
    return (off, buf[1], buf[2])


def _flatten(b, buf):
    if buf[1] == "features":
        return buf
    off_in, _, (c, n, h, w) = _cnhw(b, buf)
    if h * w == 1:  # CNHW with 1x1 pixels is already feature-major [C, N]
        return (off_in, "features", (c, n))
    off = b.alloc(c * n * h * w)
    b.emit(ex.CNHW_TO_FEATURES, 0, off_in, off, c, n, h * w)
    return (off, "features", (c * h * w, n))


def _maxpool_window(m: nn.MaxPool2d):
    """(kernel, stride, pad) of a square, dilation-1, floor-mode max pool (the kernels' only kind), else None."""
    k, s, pad, d = (m.kernel_size, m.stride, m.padding, m.dilation)
    if not all(isinstance(v, int) for v in (k, s, pad, d)) or d != 1 or m.ceil_mode or m.return_indices:
        return None
    return k, s, pad


def _pooled_size(h: int, w: int, k: int, s: int, pad: int) -> tuple[int, int]:
    return (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1


def _lower_maxpool(b, m: nn.MaxPool2d, buf):
    window = _maxpool_window(m)
    if window is None:
        raise Unsupported("maxpool other than square, dilation 1, floor mode")
    k, s, pad = window
    c, n, h, w = buf[2]
    out_h, out_w = _pooled_size(h, w, k, s, pad)
    if buf[1] == "lanes":
        lanes, _, _, plane_in = lane_geometry(n, h, w)
        plane_out = lane_geometry(n, out_h, out_w)[3]
        off = b.alloc(c * plane_out)
        b.emit(ex.LANE_MAXPOOL, c * lanes * out_h * out_w * k * k, buf[0], off, c, h, w, out_h, out_w, k, s, pad, lanes,
               plane_in, plane_out)
        return (off, "lanes", (c, n, out_h, out_w))
    off_in, _, (c, n, h, w) = _cnhw(b, buf)
    off = b.alloc(c * n * out_h * out_w)
    b.emit(ex.MAXPOOL, c * n * out_h * out_w * k * k, off_in, off, c, n, h, w, out_h, out_w, k, s, pad)
    return (off, "cnhw", (c, n, out_h, out_w))


# Layers kept dense run inside the plan on the CSR kernels with every weight stored: BLAS calls from
# Numba bring their own thread pools, which stalled ours 50x on a busy 2-core machine. Past this
# size MKL's dense kernels win by more than the plan saves, so such models run eagerly.
PLAN_MAX_DENSE_WEIGHTS = 1 << 20


# A dense layer with more multiply-adds than this per call belongs to MKL/oneDNN: the model then
# runs eagerly (per-layer calls cost little next to such a layer; our CSR kernel at full density
# is 3-4x slower than oneDNN's conv at batch 64). Below it, the plan wins: CIFAR ResNet18 with
# global 98% pruning at batch 64 keeps its stem and 1x1 downsamples dense (35-70% sparse, up to
# 134M multiply-adds each); in the plan it ran 1.5-1.7x faster than dense torch, eager 0.8-0.9x
# (torch's and Numba's thread pools take turns per layer).
PLAN_MAX_DENSE_WORK = 1 << 28


def _dense_as_csr(module, columns: int) -> CSR:
    if module.weight.numel() > PLAN_MAX_DENSE_WEIGHTS or module.weight.dtype != torch.float32 or \
            module.weight.numel() * columns > PLAN_MAX_DENSE_WORK:
        raise Unsupported("large or non-float32 dense layer")
    weight = module.weight.detach()
    return CSR.from_dense(block_diagonal(weight, module.groups) if isinstance(module, nn.Conv2d) else weight)


def _lower_linear(b, m, buf, sparse: bool):
    if buf[1] != "features":
        raise Unsupported("Linear on a 4-D activation")
    off_in, _, (in_f, n_batch) = buf
    if in_f != m.in_features or (sparse and (m.values.dtype != torch.float32 or m.backend == "torch")):
        raise Unsupported("Linear input size, dtype or backend")
    off = b.alloc(m.out_features * n_batch)
    if sparse:
        values, indptr, indices = m.values.detach().numpy(), m.indptr.numpy(), m.indices.numpy()
        bias, relu, code, (br, bc) = m.bias_or_zeros.detach().numpy(), m.relu, \
            (ex.LINEAR_BSR if m.format == "bsr" else ex.LINEAR_CSR), m.block_shape
    else:
        fmt = _dense_as_csr(m, n_batch)
        values, indptr, indices, (br, bc), relu, code = fmt.data, fmt.indptr, fmt.indices, (1, 1), False, ex.LINEAR_CSR
        bias = m.bias.detach().numpy() if m.bias is not None else np.zeros(m.out_features, np.float32)
    n_blocks = 0
    if code == ex.LINEAR_CSR and ops.use_column_blocks(values.size, m.out_features, in_f, n_batch):
        indptr, indices, values, n_blocks = column_blocks(indptr, indices, values, m.out_features, ops.BLOCKED_WIDTH)
    sliced = sliced_ell(indptr, indices, values, m.out_features) \
        if code == ex.LINEAR_CSR and n_batch == 1 and ops.SLICED_MATVEC else None
    if sliced is not None:
        # Batch 1: the sliced matvec (1- or 2-byte column steps, kernels/sliced.py); `sums` is its scratch.
        slice_ptr, steps, stored, first_col, lengths, rows = sliced
        sums = b.alloc(lengths.size)
        b.temps.append(sums)
        wide_steps = steps.dtype == np.uint16
        b.emit(ex.LINEAR_SLICED, stored.size, off_in, off, in_f, m.out_features, int(relu), b.weights_u32(slice_ptr),
               slice_ptr.size, b.weights_u16(steps) if wide_steps else b.weights_u8(steps), b.weights_f32(stored),
               stored.size, b.weights_u32(first_col), b.weights_u32(lengths), b.weights_u32(rows), lengths.size,
               b.weights_f32(bias), sums, int(wide_steps))
        return (off, "features", (m.out_features, n_batch))
    idx_off, idx_u16 = b.indices(indices) if code == ex.LINEAR_CSR else (b.weights_u32(indices), 0)
    b.emit(code, values.size * n_batch, off_in, off, in_f, m.out_features, n_batch, int(relu),
           b.weights_u32(indptr), indptr.size, idx_off, indices.size,
           b.weights_f32(values), values.size, b.weights_f32(bias), br, bc, idx_u16, n_blocks)
    return (off, "features", (m.out_features, n_batch))


def _lower_dense_conv(b: _Builder, m: nn.Conv2d, buf):
    """A conv kept dense (sparse would not pay): gather columns + SpMM with every weight stored."""
    if m.padding_mode != "zeros":
        raise Unsupported("dense conv with a padding mode other than zeros")
    c, n, h, w = buf[2]
    pads = explicit_pads(m.padding, m.kernel_size, m.dilation)
    out_h, out_w, _, _ = ops.conv_geometry(h, w, pads, m.stride, m.dilation, m.kernel_size)
    fmt = _dense_as_csr(m, n * out_h * out_w)
    bias = m.bias.detach().numpy() if m.bias is not None else np.zeros(m.out_channels, np.float32)
    if b.lanes or _runs_tiled(b, h, w, m.kernel_size, m.stride, m.dilation, pads):
        return _lower_lane_conv(b, buf, None, fmt.indptr, fmt.indices, fmt.data, bias, False, m.kernel_size, m.stride,
                                m.dilation, pads, tiled=not b.lanes)[0]
    return _lower_im2col_conv(b, _cnhw(b, buf)[0], (c, n, h, w), -1, fmt.indptr, fmt.indices, fmt.data, bias, False,
                              m.kernel_size, m.stride, m.dilation, pads)


def _taps_inside(n_out: int, n_in: int, k: int, stride: int, dilation: int, pad: int) -> np.ndarray:
    """bool[n_out, k]: along one axis, whether output o's tap t reads the input (not padding)."""
    pos = np.arange(n_out)[:, None] * stride - pad + np.arange(k)[None, :] * dilation
    return (pos >= 0) & (pos < n_in)


def live_taps(h: int, w: int, out_h: int, out_w: int, kernel_size, stride, dilation, pads) -> np.ndarray:
    """bool[kh * kw]: whether tap (i, j) reads the input for at least one output pixel. A dead tap reads
    only padding (a 3x3 'same' conv on a 1x1 map has one live tap of nine), so its weights multiply zeros."""
    live_y = _taps_inside(out_h, h, kernel_size[0], stride[0], dilation[0], pads[0]).any(axis=0)
    live_x = _taps_inside(out_w, w, kernel_size[1], stride[1], dilation[1], pads[2]).any(axis=0)
    return (live_y[:, None] & live_x[None, :]).reshape(-1)


def drop_dead_taps(indptr, indices, values, taps: int, live, compact: bool):
    """The CSR of a conv (columns c * taps + t) without its nonzeros at dead taps (exactly zero terms:
    weights are finite, checked at conversion). compact: renumber the columns c * n_live + rank of t,
    for an im2col that gathers live taps only."""
    indptr, indices = np.asarray(indptr).astype(np.int64), np.asarray(indices).astype(np.int64)
    if live.all():
        return indptr, indices, values
    keep = live[indices % taps]
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    kept_per_row = np.bincount(rows[keep], minlength=len(indptr) - 1)
    new_indptr = np.concatenate([[0], np.cumsum(kept_per_row)])
    new_indices = indices[keep]
    if compact:
        rank = np.cumsum(live) - 1
        new_indices = new_indices // taps * int(live.sum()) + rank[new_indices % taps]
    return new_indptr, new_indices, np.asarray(values)[keep]


# An im2col conv whose product runs in parallel and whose gather is too small to split (below PARALLEL_MIN_WORK)
# gathers its columns once per thread, each into its own copy, so that each thread's share of the product reads only lines
# it wrote itself (kernels.conv._private_gather_gemm). Serial gather, parallel product made the second core
# pull every column over from the first: on this VM, whose two vCPUs sit on different dies of the host for
# minutes at a time (round trip 330 ns against 55), torchvision resnet18 global-98 at batch 1 took 0.73 ms
# against 0.46 (paired, bench/RESULTS.md), and 0.356 against 0.321 with both on one die. Gathers big enough
# to split keep the split: gathering twice as much cost CIFAR ResNet18 at batch 1 1-3.5% on one die.
PRIVATE_GATHER = True
# A stride-1 'same' conv's columns are its input shifted per tap (kernels.shift_table): gathered 16 values at a time
# by masked moves instead of a table lookup per value (one core, 128 channels of 4x4: 6.5 -> 1.9 us; torchvision
# resnet18 global-98 at batch 1, its 4x4 convs before the tap conv took them: 16 -> 11 us).
SHIFTED_GATHER = True


def _lower_im2col_conv(b: _Builder, off_in, shape, res_off, indptr, indices, values, bias, relu, kernel_size, stride,
                       dilation, pads):
    """Gather the live taps' columns of the CNHW activation at off_in, then one CSR SpMM."""
    c, n, h, w = shape
    out_h, out_w, _, _ = ops.conv_geometry(h, w, pads, stride, dilation, kernel_size)
    out_channels = len(indptr) - 1
    table = kernels.im2col_table(n, h, w, out_h, out_w, kernel_size, stride, dilation, pads)
    taps, pixels = table.shape
    live = live_taps(h, w, out_h, out_w, kernel_size, stride, dilation, pads)
    indptr, indices, values = drop_dead_taps(indptr, indices, values, taps, live, compact=True)
    table = table[live]
    n_live = table.shape[0]
    # Rows of fewer pixels than a vector are packed tight: padded to whole cache lines, a 1x1 or 2x2 map's
    # columns spread over 16x or 4x the memory (torchvision resnet18 98% bs 1 plan, alternating A/B:
    # 0.34 ms padded, 0.30 ms tight; the gather alone timed the same either way).
    row_len = pixels if pixels < kernels.LANE_VECTOR else ops.packed_row_len(pixels)
    out = b.alloc(out_channels * n * out_h * out_w)
    idx_off, idx_u16 = b.indices(indices)
    threads = numba.config.NUMBA_NUM_THREADS
    gather_work, product_work = c * n_live * pixels, len(values) * pixels
    result = (out, "cnhw", (out_channels, n, out_h, out_w))
    # Where every pixel reads itself (a 1x1 map's centre tap, a small map's 1x1 stride-1 conv), the columns are the
    # input as it lies and the product reads it there (torchvision resnet18 at batch 1: layer 4's 2 us gathers
    # beside 2 us products, global-98).
    gathered = not _reads_itself(table, n * h * w, row_len)
    shifts = kernels.shift_table(table) if SHIFTED_GATHER else None
    if shifts is not None:
        table = shifts
    if gathered and PRIVATE_GATHER and threads > 1 and b.runs_parallel(product_work) and \
            not b.runs_parallel(gather_work):
        cols = b.alloc(threads * c * n_live * row_len)
        b.emit(ex.GATHER_GEMM, product_work, off_in, n * h * w, c, n_live, pixels, b.weights_u32(table),
               row_len, cols, threads, out, out_channels, res_off, int(relu), b.weights_u32(indptr), idx_off,
               len(values), b.weights_f32(values), b.weights_f32(bias), idx_u16, int(shifts is not None))
        b.free(cols)
        return result
    cols, rows = off_in, c
    if gathered:
        cols, rows = b.alloc(c * n_live * row_len), c * n_live
        b.emit(ex.IM2COL, gather_work, off_in, n * h * w, cols, c, n_live, pixels, b.weights_u32(table), row_len,
               int(shifts is not None))
    b.emit(ex.CONV_GEMM, product_work, cols, rows, pixels, out, out_channels, res_off, int(relu),
           b.weights_u32(indptr), idx_off, len(values), b.weights_f32(values), b.weights_f32(bias), row_len, idx_u16)
    if gathered:
        b.free(cols)
    return result


def _reads_itself(table, plane_len: int, row_len: int) -> bool:
    """Whether an im2col table (live taps only) copies the input as it lies: one tap, output pixel p reading input
    pixel p, rows as long as the input's."""
    return table.shape[0] == 1 and table.shape[1] == plane_len == row_len and (table[0] == np.arange(plane_len)).all()


# ops.uses_im2col's gather cost where the other path is the grid conv (plan only), not the eager direct conv: it
# reads its taps in place, with no pack. torchvision resnet18 at batch 1 on Zen 4, whose layer1 convs (8x8, 10%
# dense) took im2col at the eager cost (3): paired whole calls 1.09x and 1.33x faster at 12 (90%; two runs), 1.03x
# (98%); the CIFAR ResNet18 plans (tiled) 0.997-1.03x.
GRID_GATHER_COST = 12.0


# Batch 1: a 3x3 'same' conv on a map of kernels.TAP_MAPS (8x8, 4x4) sums each tap's nonzeros over whole input maps
# in registers and shifts the sum into place (kernels.taps). torchvision resnet18 at 32x32, whose layer1 and layer2
# run on these maps (Zen 4, A/B against the grid conv and the gathers): layer1's convs 23 -> 11 us (global-98, 27%
# dense), 11 -> 6 us (90%); layer2's 10 -> 8 us; whole calls 0.71x the time (global-98), 0.86x (90%), 0.91x (98%).
TAP_CONV = True


# ... and a stride-2 conv (3x3 pad 1, or 1x1: a ResNet's downsampling pair) whose output is one of these maps: the tap
# conv over its input's four stride phases, one pack shared by both convs of the pair (kernels.taps.phase_columns).
# CIFAR ResNet18 at batch 1 (Zen 4, A/B against the gathers and the direct conv): layer3.0.conv1 (16x16 -> 8x8) 0.58x
# the time at global-98, 0.94x at 90%. Not to 4x4 maps: the pack of 8x8 phases (an element-wise loop, 27 us for 256
# channels) made layer4.0.conv1 1.4-1.8x slower, and torchvision resnet18's layer2.0.conv1 1.7x.
STRIDED_TAP_MAPS = ((8, 8),)
STRIDED_TAP_CONV = True


def _runs_tap_conv(m, n: int, h: int, w: int) -> bool:
    """A batch-1 sparse conv the tap conv computes: 3x3 stride 1 pad 1 on a map it is compiled for, or (stride 2)
    3x3 pad 1 or 1x1 pad 0 on a map of twice such a size."""
    if not (TAP_CONV and isinstance(m, SparseConv2d) and m.format == "csr" and m.padding_mode == "zeros" and n == 1
            and m.dilation == (1, 1)):
        return False
    same = (m.kernel_size == (3, 3) and m.pads == (1, 1, 1, 1))
    if m.stride == (1, 1):
        return same and (h, w) in kernels.TAP_MAPS
    shortcut = m.kernel_size == (1, 1) and m.pads == (0, 0, 0, 0)
    return (STRIDED_TAP_CONV and m.stride == (2, 2) and h % 2 == 0 and w % 2 == 0
            and (h // 2, w // 2) in STRIDED_TAP_MAPS and (same or shortcut))


def _phases(b: _Builder, buf):
    """A batch-1 4-D activation's four stride-2 phases as CNHW maps of half its size (channel c * 4 + py * 2 + px
    holds pixels (2 y + py, 2 x + px)), packed once: the copy lives as long as buf."""
    key = (buf[0], "phases")
    if key not in b.converted:
        off_in, _, (c, n, h, w) = _cnhw(b, buf)
        size = c * 4 * (h // 2) * (w // 2)
        off = b.alloc(size)
        b.emit(ex.PACK, size, off_in, off, c, n, h, w, 0, 0, 2, 2, h // 2, w // 2, (h // 2) * (w // 2), 0, 0)
        b.converted[key] = (off, "cnhw", (c * 4, n, h // 2, w // 2))
    return b.converted[key]


def _lower_tap_conv(b: _Builder, m: SparseConv2d, src, res):
    """CNHW to CNHW, each output channel's taps summed over whole input maps and shifted in registers; a strided
    conv's over its input's stride phases."""
    columns = m.indices.numpy()
    if m.stride == (2, 2):
        src = _phases(b, src)
        columns = kernels.phase_columns(columns, m.kernel_size, m.pads)
    else:
        src = _cnhw(b, src)
    c, n, h, w = src[2]
    bounds, chans, values = kernels.tap_order(m.indptr.numpy(), columns, m.values.detach().numpy())
    out = b.alloc(m.out_channels * h * w)
    chan_off, chan_u16 = b.indices(chans)
    b.emit(ex.TAP_CONV, m.nnz * h * w, src[0], c, out, m.out_channels, -1 if res is None else res[0], int(m.relu),
           h, w, b.weights_u32(bounds), chan_off, len(values), b.weights_f32(values),
           b.weights_f32(m.bias_or_zeros.detach().numpy()), chan_u16)
    return (out, "cnhw", (m.out_channels, n, h, w))


def _runs_on_grid(m, n: int, h: int, w: int) -> bool:
    """A stride-1 sparse conv whose output has its input's size, whose padding fits the grid border,
    and which would not take the im2col path at this size: it runs grid to grid."""
    if not isinstance(m, SparseConv2d) or m.format != "csr" or m.padding_mode != "zeros" or _runs_tap_conv(m, n, h, w):
        return False
    kh, kw = m.kernel_size
    pad = (kh - 1) // 2
    return (m.stride == (1, 1) and m.dilation == (1, 1) and kh == kw and kh in (1, 3) and m.pads == (pad,) * 4
            and not ops.uses_im2col(n, h, w, h + 2 * pad, w + 2 * pad, m.out_channels, m.density, GRID_GATHER_COST))


def _feeds_grid_conv(node, n: int, h: int, w: int) -> bool:
    """Whether a reader of node's output (as input or residual) is a conv that runs on the grid."""
    gm = node.graph.owning_module
    return any(user.op == "call_module" and _runs_on_grid(gm.get_submodule(user.target), n, h, w)
               for user in node.users)


# Output channels one grid-conv work item computes over its strip (see kernels.conv._grid_conv).
GRID_CO_BLOCK = 64


def _lower_conv(b: _Builder, m: SparseConv2d, node, buffers):
    if m.padding_mode != "zeros" or m.format != "csr" or m.values.dtype != torch.float32 or m.backend == "torch":
        raise Unsupported("conv outside the numba kernel's scope")
    src = _arg(node, buffers)
    if src[1] not in ("cnhw", "grid", "lanes", "tiles"):
        raise Unsupported("expected a 4-D activation")
    c, n, h, w = src[2]
    residual = node.kwargs.get("residual")
    if set(node.kwargs) - {"residual"} or len(node.args) != 1:
        raise Unsupported("conv call signature")
    out_h, out_w, hq, wq = ops.conv_geometry(h, w, m.pads, m.stride, m.dilation, m.kernel_size)
    out_shape = (m.out_channels, n, out_h, out_w)
    res = None
    if residual is not None:
        res = buffers.get(residual)
        if res is None or res[1] not in ("cnhw", "grid", "lanes", "tiles") or tuple(res[2]) != out_shape:
            raise Unsupported("residual shape differs from the conv output")
    if b.lanes:
        pool = _sole_maxpool(b, node) if res is None else None
        out, pooled = _lower_lane_conv(b, src, res, m.indptr.numpy(), m.indices.numpy(), m.values.detach().numpy(),
                                       m.bias_or_zeros.detach().numpy(), m.relu, m.kernel_size, m.stride, m.dilation,
                                       m.pads, pool=None if pool is None else pool[1])
        if pooled:
            b.fused[pool[0]] = out
        return out
    if _runs_tiled(b, h, w, m.kernel_size, m.stride, m.dilation, m.pads):
        return _lower_lane_conv(b, src, res, m.indptr.numpy(), m.indices.numpy(), m.values.detach().numpy(),
                                m.bias_or_zeros.detach().numpy(), m.relu, m.kernel_size, m.stride, m.dilation, m.pads,
                                tiled=True)[0]
    if src[1] == "tiles":  # the kernels below read dense or grid activations
        src = _cnhw(b, src)
    if res is not None and res[1] == "tiles":
        res = _cnhw(b, res)
    im2col = ops.uses_im2col(n, out_h, out_w, hq, wq, m.out_channels, m.density)
    if _runs_tap_conv(m, n, h, w):
        return _lower_tap_conv(b, m, src, None if res is None else _cnhw(b, res))
    if _runs_on_grid(m, n, h, w):
        return _lower_grid_conv(b, m, _grid(b, src), None if res is None else _grid(b, res))
    if im2col:
        res_off = -1 if res is None else _cnhw(b, res)[0]
        return _lower_im2col_conv(b, _cnhw(b, src)[0], (c, n, h, w), res_off, m.indptr.numpy(), m.indices.numpy(),
                                  m.values.detach().numpy(), m.bias_or_zeros.detach().numpy(), m.relu, m.kernel_size,
                                  m.stride, m.dilation, m.pads)
    # A strided conv feeding grid convs writes its output (borders included) as a grid: no pack after.
    grid_out = _feeds_grid_conv(node, n, out_h, out_w)
    if grid_out:
        res_off = -1 if res is None else _grid(b, res)[0]
        off, out_row_len = b.alloc_grid(*out_shape), grid_geometry(n, out_h, out_w)[2]
    else:
        res_off = -1 if res is None else _cnhw(b, res)[0]
        off, out_row_len = b.alloc(int(np.prod(out_shape))), n * out_h * out_w
    max_off = m.max_dy * wq + m.max_dx
    work = m.nnz * n * hq * wq
    sh, sw = m.stride
    if max_off == 0 and (sh, sw) == (1, 1) and m.pads == (0, 0, 0, 0) and src[1] == "cnhw":
        xq_off, xq_rows, xq_len = src[0], c, n * h * w  # 1x1 conv reads the CNHW activation directly
    else:  # pack (pad, stride phases) from either layout
        xq_rows, xq_len = c * sh * sw, ops.packed_row_len(n * hq * wq + max_off)
        xq_off = b.alloc(xq_rows * xq_len)
        from_grid = src[1] == "grid"
        b.emit(ex.PACK, xq_rows * xq_len, src[0], xq_off, c, n, h, w, m.pads[0], m.pads[2], sh, sw, hq, wq, xq_len,
               int(from_grid), grid_geometry(n, h, w)[2] if from_grid else 0)
        b.temps.append(xq_off)
    offsets = m.tap_offsets(xq_len, wq)
    if offsets.dtype != np.uint32:
        raise Unsupported("packed conv input past 2**32 elements")
    rows_per_tile = ops.conv_rows_per_tile(xq_rows, wq)
    threads = numba.config.NUMBA_NUM_THREADS
    scratch_len = ops.packed_row_len(rows_per_tile * wq)
    scratch = b.alloc(threads * scratch_len)
    b.emit(ex.CONV, work, xq_off, xq_rows, xq_len, off, *out_shape, res_off, int(m.relu), hq, wq, rows_per_tile,
           scratch, threads, b.weights_u32(m.indptr.numpy()), b.weights_u32(offsets), m.nnz,
           b.weights_f32(m.values.detach().numpy()), b.weights_f32(m.bias_or_zeros.detach().numpy()), scratch_len,
           out_row_len, int(grid_out))
    b.free(scratch)
    return (off, "grid" if grid_out else "cnhw", out_shape)


# Batch-in-lanes activations (kernels.lanes) from this batch on: below it a cell's lanes would be mostly
# padding and the pixel-major grid wins.
LANE_MIN_BATCH = 16
# Vectors a stride-1 lanes conv's strip covers (the cells of a work item: this x 16 floats over the lanes): 8 where
# Numba targets AVX-512; on AVX2, where 8 spill (kernels.strip), 6.
LANE_STRIP_VECTORS = 8 if kernels.AVX512 else 6
LANE_CO_BLOCK = 64         # output channels a lane-conv work item computes over its cells
# Output rows a work item covers in a lanes conv whose cells read adjacent input cells (stride 1 along the row),
# where AVX-512's registers hold two rows' wide strips
# (kernels.strip.row_pair_strip): each nonzero's index and weight then serve 16 vectors, and an input-channel
# block's window is 4 input rows for 2 output rows.
LANE_ITEM_ROWS = 2 if kernels.AVX512 else 1
LANE_STRIDED_ITEM_ROWS = LANE_ITEM_ROWS  # the same for stride-2 convs (cells 2 apart) at 16, 32 or 64 lanes
# ... and for a conv fused with its max pool (a ResNet stem), at stride 1 or 2. torchvision resnet18's stem at batch 64
# (7x7 stride 2, 32 lanes a share), op alone: 90% 0.374 -> 0.330 ms, global-98 0.219 -> 0.175.
POOLED_ITEM_ROWS = LANE_ITEM_ROWS
LANE_WINDOW_BYTES = 16 << 10  # an input-channel block's window (channels x taps x lanes): with the strip's halo, ~L1
LANE_BLOCK_MIN_NNZ = 8     # nonzeros per row a channel block must hold to pay its partial-sum pass
LANE_BLOCK_STRIP_NNZ = 25  # nonzeros per row a channel block gets even past the window (lane_channel_block)
LANE_REGION_GAIN = 1.15    # split a stride-1 lane conv into regions where region_cost rates that this much faster
LANE_STRIDED_REGION_GAIN = 1.3  # ... a strided one where the split saves this much work
UNROLLED_REGION_GAIN = 1.3  # ... a stride-1 one a serial plan unrolls: row regions of a 4x4 map (1.2) stay whole
LANE_MAX_REGIONS = 9       # ... into at most this many (a 3x3 conv's 9; each region is one more op to launch)
LANE_STRIP_EXPONENT = 0.5  # region_cost: a strip of v of a whole strip's V vectors runs at (v / V) ** this of its speed
LANE_MIN_ITEMS = 8         # work items a lane-conv op should offer its threads
LANE_POOL_SCRATCH_BYTES = 512 << 10  # conv maps a fused conv + max pool work item holds: a quarter of L2
# Unrolled lanes convs (kernels.unrolled): per-layer machine code holding 30 output channels in registers.
UNROLLED_CONV = 1          # 0: the strip kernels run every lanes conv
UNROLLED_PREFETCH = 1      # prefetch the next function's code and weights while one runs (a serial plan's blocks)
UNROLLED_TAP_SECTIONS = 1  # unrolled code skips each edge cell's border taps (one op a map); 0: regions as measured
UNROLLED_WINDOW_BYTES = 512 << 10  # input a band of output rows reads (one vector a cell): half of L2
UNROLLED_MAX_CELLS = 1024  # unrolled only on output maps of at most this many cells (32x32)
UNROLLED_MIN_DENSITY = 0.01  # ... and at least this density over the live taps, except on maps of at most
UNROLLED_SMALL_CELLS = 4     # this many cells. Batch 64, 2% density, layer by layer (before tap sections): 32x32 and
                             # 16x16 maps 1.2-1.3x slower unrolled, 8x8 and 4x4 even, 2x2 and 1x1 1.5-1.9x faster. With
                             # tap sections, paired whole calls at bs 64, 0.01 against 0.05: CIFAR ResNet18 98% 0.95,
                             # global-98 0.985, torchvision resnet18 98% 0.90; 0.0 against 0.01 even
# A serial plan's unrolled convs run in blocks of input channels (`unrolled_bands`; CIFAR ResNet18 bs 64, paired whole
# calls: 90% 1.03x, 64 KB against 32 KB 1.07x, 128 KB even; blocks on 32x32 maps, UNROLLED_MIN_BLOCK_CHANNELS 4: 0.97x)
UNROLLED_BLOCK_BYTES = 64 << 10     # input window of a block (0: one block)
UNROLLED_PARTIAL_BYTES = 256 << 10  # partial sums of a band's cells (128 KB: 0.97x)
UNROLLED_MIN_BLOCK_CHANNELS = 8     # no blocks where the window allows fewer channels (32x32 maps)
UNROLLED_BLOCK_MIN_NNZ = 24         # nonzeros an output channel a block holds at least (0: 0.97x, 48: even)


def lane_strip_cells(lanes: int) -> int:
    """Output cells a stride-1 lanes conv's strip covers: as many as fit LANE_STRIP_VECTORS vectors, at least one.
    AVX2, CIFAR ResNet18 at batch 64 (32-lane shares, paired whole calls): 3-cell 6-vector strips 1.31-1.33x faster
    than 4-cell 8-vector ones at 90% and global-98, 1.02x at 98%. torchvision resnet18 90% (64 lanes, per-op plan):
    one 4-vector cell ran 0.92x as fast as two in the 8-vector strip while strips masked their last vector, and
    1.08-1.09x as fast since they take whole vectors (kernels.strip), so a cell that fills fewer than 6 vectors is
    no longer paired into the spilling 8-vector strip."""
    return max(1, LANE_STRIP_VECTORS * kernels.LANE_VECTOR // lanes)


def lane_geometry(n: int, h: int, w: int, border: int = 1) -> tuple[int, int, int, int]:
    """(lanes, rows, cells per row, channel plane length) of a lanes activation with the given border."""
    lanes = kernels.lane_count(n)
    hq, wq = h + 2 * border, w + 2 * border
    return lanes, hq, wq, ops.packed_row_len(hq * wq * lanes)


def _lanes(b, buf, border: int = 1):
    """The 4-D activation buf batch-in-lanes with this border, converting once (the copy lives as long as buf)."""
    if buf[1] == "lanes" and border == 1:
        return buf
    key = (buf[0], f"lanes{border}")
    if key not in b.converted:
        off_in, _, (c, n, h, w) = _cnhw(b, buf)
        lanes, _, _, plane = lane_geometry(n, h, w, border)
        off = b.alloc(c * plane)
        b.emit(ex.TO_LANES, c * plane, off_in, off, c, n, h, w, border, lanes, plane)
        b.converted[key] = (off, "lanes", (c, n, h, w))
    return b.converted[key]


# Batch 1: a conv whose output map is at least TILE_MIN_CELLS x that many cells per tile runs on the map cut into
# TILES (rows x columns of tiles), one tile per lane (kernels.lanes._to_tiles): the lanes conv then runs with whole
# 16-float vectors on cache-line-aligned cells, where the batch-1 grid conv's +-1 tap shifts split its loads. Each
# tile's border cells hold its neighbours' edge pixels (the halo): the conversion and every tiled conv write it
# (kernels.lanes.write_halo), elementwise ops keep it (the sum of two halos is the sum's halo).
TILES = (4, 4)  # 16 tiles: one float32 vector of lanes (kernels.lanes.write_halo assumes it)
# Output tiles of fewer cells a side lost (CIFAR ResNet18 global-98's layer3 on 2x2 tiles: its ops faster, whole
# calls 1.08x slower, paired turns). So did stride-1 convs with few nonzeros per output channel, whose strips are
# mostly epilogue (per-layer 98%: 12-23 a row, 1.07-1.4x slower tiled than on the grid; 58 at 90%: 1.2-1.4x
# faster), while strided convs gained at any density (2.5-3.3x: no pack of stride phases). Conversions between
# tiles and the other layouts cost about what one such conv gains (64 x 32 x 32: 0.06 ms), so a plan tiles all the
# convs it can or none: all where their nonzeros per output channel average TILE_MIN_ROW_NNZ, weighted by work.
TILE_MIN_CELLS = 4
TILE_MIN_ROW_NNZ = 32


def tile_geometry(h: int, w: int) -> tuple[int, int, int, int]:
    """(lanes, tile rows, tile cols, channel plane length) of a tiled activation of an h x w map."""
    th, tw = h // TILES[0], w // TILES[1]
    lanes, _, _, plane = lane_geometry(TILES[0] * TILES[1], th, tw)
    return lanes, th, tw, plane


def _tile_plan(gm: torch.fx.GraphModule, modules: dict) -> bool:
    """Whether a batch-1 plan tiles its convs (after ShapeProp): those that can (`_fits_tiles`) average at least
    TILE_MIN_ROW_NNZ nonzeros per output channel, weighted by their multiply-adds."""
    work = row_nnz_work = 0.0
    for node in gm.graph.nodes:
        m = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(m, (SparseConv2d, nn.Conv2d)) or not node.args or "tensor_meta" not in node.meta:
            continue
        _, _, h, w = node.args[0].meta["tensor_meta"].shape
        pads = m.pads if isinstance(m, SparseConv2d) else explicit_pads(m.padding, m.kernel_size, m.dilation)
        if not _fits_tiles(h, w, m.kernel_size, m.stride, m.dilation, pads):
            continue
        nnz = m.nnz if isinstance(m, SparseConv2d) else m.weight.numel()
        out_h, out_w = node.meta["tensor_meta"].shape[2:]
        work += nnz * out_h * out_w
        row_nnz_work += nnz / m.out_channels * nnz * out_h * out_w
    return work > 0 and row_nnz_work / work >= TILE_MIN_ROW_NNZ


def _runs_tiled(b: _Builder, h: int, w: int, kernel_size, stride, dilation, pads) -> bool:
    """Whether this conv of a batch-1 plan that tiles (`_tile_plan`) runs on tiles."""
    return b.tiles and _fits_tiles(h, w, kernel_size, stride, dilation, pads)


def _fits_tiles(h: int, w: int, kernel_size, stride, dilation, pads) -> bool:
    """Whether a conv can run on tiles: the input map and the output map split into TILES evenly, with output
    tiles of at least TILE_MIN_CELLS cells a side, and every tap of every output pixel reads its own input tile or
    the one-cell halo around it."""
    if h % TILES[0] or w % TILES[1]:
        return False
    out_h, out_w, _, _ = ops.conv_geometry(h, w, pads, stride, dilation, kernel_size)
    for size, out, tiles, k, s, d, pad in ((h, out_h, TILES[0], kernel_size[0], stride[0], dilation[0], pads[0]),
                                           (w, out_w, TILES[1], kernel_size[1], stride[1], dilation[1], pads[2])):
        tile_in, tile_out = size // tiles, out // tiles
        if out % tiles or tile_out < TILE_MIN_CELLS or tile_in != tile_out * s or pad > 1:
            return False
        if (tile_out - 1) * s - pad + (k - 1) * d > tile_in:  # the last pixel's taps reach past the halo
            return False
    return True


def _tiles(b, buf):
    """The batch-1 4-D activation buf on TILES, halo included, converting once (the copy lives as long as buf)."""
    if buf[1] == "tiles":
        return buf
    key = (buf[0], "tiles")
    if key not in b.converted:
        off_in, _, (c, n, h, w) = _cnhw(b, buf)
        lanes, _, _, plane = tile_geometry(h, w)
        off = b.alloc(c * plane)
        b.emit(ex.TO_TILES, c * plane, off_in, off, c, h, w, *TILES, lanes, plane)
        b.converted[key] = (off, "tiles", (c, n, h, w))
    return b.converted[key]


def _halo_masks(b) -> int:
    """u32 offset of the 9 masks a tiled lanes conv writes its halo with (kernels.lanes.write_halo): bit t of mask
    (dy + 1) * 3 + dx + 1 is set where tile t has a neighbour at (dy, dx)."""
    if b.halo_masks < 0:
        ty, tx = np.divmod(np.arange(TILES[0] * TILES[1]), TILES[1])
        b.halo_masks = b.weights_u32([
            int(np.sum(((0 <= ty + dy) & (ty + dy < TILES[0]) & (0 <= tx + dx) & (tx + dx < TILES[1])) << np.arange(ty.size)))
            for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return b.halo_masks


def lane_channel_block(n_chan: int, taps: int, lanes: int, density: float) -> int:
    """Input channels per block of a lane conv (kernels.lanes._lane_conv): blocks whose window fills
    about L1, or all channels in one block when such a block would hold fewer than LANE_BLOCK_MIN_NNZ
    nonzeros per row. A/B at batch 64, ResNet18 conv shapes: blocks ran 1.1-1.55x faster at 10-25%
    density; at 2-5% one block was as fast or up to 1.2x faster (too few nonzeros to pay each block's
    partial-sum pass).
    Between the two, a block holds at least LANE_BLOCK_STRIP_NNZ nonzeros per row, past the window if it
    must: each block pass loads and stores every strip's partial sums, which a short strip pays for more
    than the window's misses (Zen 4, 64-channel 3x3 conv, one core: at 10% 28 channels ran as fast as 14,
    at 20-30% 14 ran 1.15-1.25x faster than 28; CIFAR ResNet18 global-98 at batch 64, whose 32x32 convs are
    27-30% dense, 1.10x paired against the fixed 28-channel window, bench/RESULTS.md)."""
    window = max(1, LANE_WINDOW_BYTES // (taps * lanes * 4))
    if window * taps * density < LANE_BLOCK_MIN_NNZ:
        return n_chan
    return min(n_chan, max(window, math.ceil(LANE_BLOCK_STRIP_NNZ / (taps * density))))


def _axis_runs(n_out: int, n_in: int, k: int, stride: int, dilation: int, pad: int) -> list:
    """[(first output, count, bool[k] taps inside the input)]: runs of outputs along one axis whose taps read
    the same in-range set (a 3x3 'same' conv: first, middle and last outputs)."""
    inside = _taps_inside(n_out, n_in, k, stride, dilation, pad)
    runs = []
    for o in range(n_out):
        if runs and (runs[-1][2] == inside[o]).all():
            runs[-1][1] += 1
        else:
            runs.append([o, 1, inside[o]])
    return runs


def _reads_border(regions, tap_nnz, h: int, w: int, out_h: int, out_w: int, kernel_size, stride, dilation,
                  pads) -> bool:
    """Whether a lanes conv's ops read their input's border cells (its zero padding): through a tap holding
    nonzeros that one of its regions keeps although it lands outside the input for some pixel of that region
    (a single op over the whole map, or regions of whole rows; a grid region keeps only taps that read the
    input for all of its pixels)."""
    inside_y = _taps_inside(out_h, h, kernel_size[0], stride[0], dilation[0], pads[0])
    inside_x = _taps_inside(out_w, w, kernel_size[1], stride[1], dilation[1], pads[2])
    for y0, ny, x0, nx, live in regions:
        always = (inside_y[y0:y0 + ny].all(axis=0)[:, None] & inside_x[x0:x0 + nx].all(axis=0)[None, :]).reshape(-1)
        if ((tap_nnz > 0) & live & ~always).any():
            return True
    return False


def lane_regions(h: int, w: int, out_h: int, out_w: int, kernel_size, stride, dilation, pads,
                 whole_rows: bool = False) -> list:
    """[(oy0, rows, ox0, cols, live bool[kh * kw])]: the output map cut into rectangles whose every pixel reads
    the input (not padding) through the same taps. whole_rows: cut along rows only, each region as wide as the
    map and keeping the taps that read the input for any of its pixels (the others read the zero border)."""
    rows = _axis_runs(out_h, h, kernel_size[0], stride[0], dilation[0], pads[0])
    cols = _axis_runs(out_w, w, kernel_size[1], stride[1], dilation[1], pads[2])
    if whole_rows:
        cols = [(0, out_w, np.any([live_x for _, _, live_x in cols], axis=0))]
    return [(y0, ny, x0, nx, (live_y[:, None] & live_x[None, :]).reshape(-1))
            for y0, ny, live_y in rows for x0, nx, live_x in cols]


def region_cost(regions, tap_nnz, lanes: int, cells_per_strip: int) -> float:
    """Estimated time of a lanes conv run as these regions: each region's multiply-adds (its live taps'
    nonzeros x its cells), divided by the speed of its strips relative to a full one. A region narrower than
    a strip runs short ones: at 32 lanes one cell is a 2-vector strip against 6 or 8 (LANE_STRIP_EXPONENT)."""
    full = cells_per_strip * lanes // kernels.LANE_VECTOR  # vectors of a whole strip (lane_strip_cells)
    cost = 0.0
    for _, ny, _, nx, live in regions:
        vectors = min(full, min(nx, cells_per_strip) * lanes // kernels.LANE_VECTOR)
        cost += float(tap_nnz[live].sum()) * ny * nx / (vectors / full) ** LANE_STRIP_EXPONENT
    return cost


def lane_region_split(h: int, w: int, out_h: int, out_w: int, kernel_size, stride, dilation, pads, tap_nnz,
                      lanes: int, cells_per_strip: int, whole, gain: float = LANE_REGION_GAIN) -> list:
    """The regions a lanes conv runs as. Stride 1: the whole map (one op), a grid of regions of equal live
    taps, or regions of whole rows, whichever `region_cost` rates fastest; a split must beat one op by `gain`.
    Strided: the grid where it saves LANE_STRIDED_REGION_GAIN of the multiply-adds, else
    the whole map. At most LANE_MAX_REGIONS regions.

    Measured per layer, ops of two plans interleaved turn by turn (batch 64 split into two 32-lane shares):
    3x3 convs on 4x4 maps ran 1.45-1.6x faster as 3 row regions than as the 9-region grid (whose one-cell
    regions run 2-vector strips), and the grid held 5.4 copies of each weight where rows hold 2.3;
    on 2x2 maps the 4 one-cell regions beat 2 row regions by 1.2-1.5x; a stride-2 conv from 8x8 split into 4
    regions ran 1.7x slower than whole (so strided convs keep the rule measured before, on work alone)."""
    if tuple(stride) != (1, 1):
        regions = lane_regions(h, w, out_h, out_w, kernel_size, stride, dilation, pads)
        split_work = sum(ny * nx * tap_nnz[live].sum() for _, ny, _, nx, live in regions)
        whole_work = out_h * out_w * tap_nnz[whole[4]].sum()
        if split_work * LANE_STRIDED_REGION_GAIN > whole_work or len(regions) > LANE_MAX_REGIONS:
            return [whole]
        return regions
    best, best_cost = [whole], region_cost([whole], tap_nnz, lanes, cells_per_strip) / gain
    for whole_rows in (False, True):
        regions = lane_regions(h, w, out_h, out_w, kernel_size, stride, dilation, pads, whole_rows)
        if 1 < len(regions) <= LANE_MAX_REGIONS:
            cost = region_cost(regions, tap_nnz, lanes, cells_per_strip)
            if cost < best_cost:
                best, best_cost = regions, cost
    return best


def _may_overwrite(b: _Builder, res, x, size: int) -> bool:
    """Whether a lanes conv may write its output over its residual buffer: this conv is the buffer's last
    reader, the buffer is not the conv's input, no conversion of it is cached (that copy would go stale),
    and the sizes match. Each strip then reads a cell's residual and writes the sum back to the same
    cache lines, instead of pulling a second buffer's lines in to write them (bs 64, residual convs:
    CIFAR ResNet18 global-98 40.0 -> 38.0 ms, torchvision resnet18 90% 2.38 -> 2.20 ms, A/B)."""
    return (b.refs.get(res[0]) == 1 and res[0] != x[0] and _size(res) == size
            and not any(key[0] == res[0] for key in b.converted))


def pool_co_block(n_out: int, map_len: int) -> int:
    """Output channels per work item of a conv fused with its max pool: their conv maps (float32 x map_len each)
    fill about LANE_POOL_SCRATCH_BYTES, and every thread gets at least two items where the layer has them."""
    block = max(1, min(n_out, LANE_POOL_SCRATCH_BYTES // (4 * map_len)))
    while block > 1 and -(-n_out // block) < 2 * numba.config.NUMBA_NUM_THREADS:
        block //= 2
    return block


def _sole_maxpool(b: _Builder, node):
    """(node, module) of the max pool that is node's only reader, if a lanes conv can compute it too
    (kernels.lanes._lane_conv_maxpool), else None."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    m = b.modules.get(user.target) if user.op == "call_module" else None
    if not isinstance(m, nn.MaxPool2d) or user.kwargs or len(user.args) != 1 or _maxpool_window(m) is None:
        return None
    return user, m


def _lower_lane_conv(b: _Builder, src, res, indptr, indices, values, bias, relu, kernel_size, stride, dilation, pads,
                     pool: nn.MaxPool2d | None = None, tiled: bool = False):
    """A conv (any kernel, stride, dilation, padding) from a lanes activation to one (kernels.lanes).
    Returns (buffer, pooled): with `pool` (a max pool, the conv's only reader) the op also pools, and the
    buffer is the pool's output, where the conv runs as one op (no region split); otherwise pooled is False.

    On small maps most taps of the edge pixels read the zero border: a 3x3 conv on a 2x2 map computes 9 taps
    per pixel where 4 read the input. Where cutting the map into regions (`lane_region_split`: a grid of regions
    of equal live taps, or regions of whole rows) pays, each region runs as its own op with only its live taps'
    nonzeros; otherwise one op covers the map, without the taps no pixel reads (`live_taps`).
    A/B at batch 64 (one 64-lane plan), 10% density: 3x3 convs on 2x2 maps 1.4-1.5x faster as a grid, from
    4x4 to 2x2 at stride 2 1.2x, on 4x4 maps 1.04-1.1x, on 8x8 maps even (edge regions one cell wide run
    half-width strips); at 32 lanes see `lane_region_split`.

    tiled: a batch-1 conv on tiles (`_runs_tiled`), tile by tile as if each were an image of a batch, except that a
    tile's border is its halo: every tap is live, there are no regions, and the op writes its output's halo too."""
    c, n, h, w = src[2]
    if tiled:
        image_out = ops.conv_geometry(h, w, pads, stride, dilation, kernel_size)[:2]
        n, h, w = TILES[0] * TILES[1], h // TILES[0], w // TILES[1]
        pool = None
    out_channels = len(indptr) - 1
    out_h, out_w, _, _ = ops.conv_geometry(h, w, pads, stride, dilation, kernel_size)
    border = max(1, *pads)
    x = _tiles(b, src) if tiled else _lanes(b, src, border)
    lanes, _, wq_in, plane_in = lane_geometry(n, h, w, border)
    _, hq_out, wq_out, plane_out = lane_geometry(n, out_h, out_w)
    (kh, kw), (sh, sw) = kernel_size, stride
    taps = kh * kw
    indptr, indices = np.asarray(indptr).astype(np.int64), np.asarray(indices).astype(np.int64)
    tap_nnz = np.bincount(indices % taps, minlength=taps)
    whole = (0, out_h, 0, out_w, np.ones(taps, bool) if tiled else
             live_taps(h, w, out_h, out_w, kernel_size, stride, dilation, pads))
    if sw == 1:  # a row's cells read adjacent input cells: wide strips
        cells_per_strip, item_rows = lane_strip_cells(lanes), int(POOLED_ITEM_ROWS if pool else LANE_ITEM_ROWS)
    elif sw == 2 and lanes in kernels.PAIR_CELL_SIZES and (POOLED_ITEM_ROWS if pool else LANE_STRIDED_ITEM_ROWS) == 2:
        # two rows' wide strips where both fill one (kernels.strip.row_pair_strip), pairs of cells elsewhere
        cells_per_strip, item_rows = lane_strip_cells(lanes), 2
    else:  # two cells a strip where a gapped strip holds them (kernels.lanes.cells_strip)
        cells_per_strip, item_rows = (2 if lanes in kernels.PAIR_CELL_SIZES else 1), 1
    # An unrolled conv runs whole, each edge cell skipping its border taps (tap sections, up to 32 taps). Without
    # them, a serial plan's regions are each their own code, streamed again for every share (UNROLLED_REGION_GAIN).
    unrolls = (pool is None and not tiled
               and _unrolls(lanes, out_h * out_w, len(indices), out_channels * c * int(whole[4].sum())))
    tap_sections = unrolls and UNROLLED_TAP_SECTIONS and 1 < taps <= 32
    gain = UNROLLED_REGION_GAIN if b.serial and unrolls else LANE_REGION_GAIN
    regions = [whole] if tiled or tap_sections else lane_region_split(
        h, w, out_h, out_w, kernel_size, stride, dilation, pads, tap_nnz, lanes, cells_per_strip, whole, gain)
    layout = "tiles" if tiled else "lanes"
    native_res = res is not None and res[1] == layout
    if res is not None:
        res = _tiles(b, res) if tiled else _lanes(b, res)
    if len(regions) > 1 or res is not None:
        pool = None
    if not tiled and (pool is not None or
                      _reads_border(regions, tap_nnz, h, w, out_h, out_w, kernel_size, stride, dilation, pads)):
        b.read_border(x)  # (a tiled activation always carries its halo)
    if pool is not None:
        # The unfused pair wrote and re-read the whole conv map: torchvision resnet18's stem at batch 64 is a
        # 5.3 MB map, and conv and pool both ran at memory speed.
        k, s, pad = _maxpool_window(pool)
        pool_h, pool_w = _pooled_size(out_h, out_w, k, s, pad)
        plane_pool = lane_geometry(n, pool_h, pool_w)[3]
        out = b.alloc(out_channels * plane_pool)
    elif native_res and _may_overwrite(b, res, x, out_channels * plane_out):
        out = res[0]
    else:
        out = b.alloc(out_channels * plane_out)
    for i, (oy0, rows, ox0, cols, live) in enumerate(regions):
        r_indptr, r_indices, r_values = drop_dead_taps(indptr, indices, values, taps, live, compact=False)
        offsets = kernels.lane_offsets(r_indices, kernel_size, dilation, plane_in, wq_in, lanes)
        if offsets.dtype != np.uint32:
            raise Unsupported("lanes activation past 2**32 elements")
        # The block rule as measured (over all taps; counting live taps only ran 1x1 maps ~10% slower).
        block = lane_channel_block(c, taps, lanes, len(r_indices) / max(1, out_channels * c * taps))
        if pool is not None:
            co_block = pool_co_block(out_channels, rows * cols * lanes)
        else:
            segments = -(-cols // cells_per_strip)
            co_block = LANE_CO_BLOCK
            while co_block > 8 and -(-rows // item_rows) * segments * -(-out_channels // co_block) < LANE_MIN_ITEMS:
                co_block //= 2  # a small region still gives every thread work
        unrolled = None
        if pool is None and not tiled and _unrolls(lanes, out_h * out_w, len(r_indices),
                                                   out_channels * c * int(live.sum())):
            # The CSR in its own order (kernels.unrolled sorts each group's nonzeros by position); its code is
            # written once the ReLU flag and residual are final (`_unroll`). The strip kernels' arrays are not stored.
            block_rows, block_channels = unrolled_bands(c, out_channels, rows, cols, wq_in,
                                                        (kh - 1) * dilation[0] + 1, sh, b.serial,
                                                        len(r_indices) / max(1, out_channels * c))
            # Each nonzero's tap, so that a cell at the map's edge skips the taps that read the zero border.
            tap_ids = r_indices % taps if tap_sections else None
            unrolled = (r_indptr, offsets.astype(np.int64), np.asarray(r_values, np.float32),
                        np.asarray(bias, np.float32), plane_out, block_rows, block_channels * plane_in, tap_ids,
                        kernels.unrolled_tap_masks(h, w, out_h, out_w, kernel_size, stride, dilation, pads))
            strip_arrays = (0, 0, 0, len(r_indices), 0, 0)
        else:
            bounds, order = kernels.channel_blocks(r_indptr, r_indices, taps, block, c, co_block)
            strip_arrays = (b.weights_u32(bounds), bounds.shape[1] // 2, b.weights_u32(offsets[order]),
                            len(r_indices), b.weights_f32(np.asarray(r_values)[order]), b.weights_f32(bias))
        origin = (border - pads[0] + oy0 * sh) * wq_in + border - pads[2] + ox0 * sw
        if pool is not None:
            threads = numba.config.NUMBA_NUM_THREADS
            scratch = b.alloc(threads * co_block * rows * cols * lanes)
            b.emit(ex.LANE_CONV_MAXPOOL, len(r_indices) * lanes * rows * cols + out_channels * lanes * pool_h * pool_w * k * k,
                   x[0], c, plane_in, out, out_channels, plane_pool, int(relu), origin, sh * wq_in, sw, rows, cols, lanes,
                   cells_per_strip, *strip_arrays, k, s, pad, pool_h, pool_w, co_block, scratch, threads, item_rows)
            b.free(scratch)
            return (out, "lanes", (out_channels, n, pool_h, pool_w)), True
        if i == 0 and not tiled:
            b.border_op[out] = len(b.rows)
            b.border_rows.add(len(b.rows))
        if not tiled:  # (a tiled conv writes its tiles' halos: it stays whole, outside any band run)
            b.lane_rows[len(b.rows)] = bands.LaneRows(
                first_row=oy0, in_row=border - pads[0] + oy0 * sh, stride=sh, reach=(kh - 1) * dilation[0] + 1,
                in_row_len=wq_in * lanes, out_row_len=wq_out * lanes, out_h=out_h, whole_width=(ox0, cols) == (0, out_w))
        b.emit(ex.LANE_CONV, len(r_indices) * lanes * rows * cols, x[0], c, plane_in, out, out_channels, plane_out,
               -1 if res is None else res[0], int(relu), origin, sh * wq_in, sw, rows, cols, lanes, cells_per_strip,
               co_block, *strip_arrays, (oy0 + 1) * wq_out + ox0 + 1,
               hq_out if i == 0 and not tiled else 0, wq_out, TILES[1] if tiled else 0, _halo_masks(b) if tiled else 0,
               0, hq_out, item_rows, -1, 0)
        if unrolled is not None:
            b.unrolled[len(b.rows) - 1] = unrolled
    if tiled:
        return (out, "tiles", (out_channels, 1, *image_out)), False
    return (out, "lanes", (out_channels, n, out_h, out_w)), False


def unrolled_bands(c: int, out_channels: int, rows: int, cols: int, wq_in: int, reach: int, stride: int,
                   serial: bool, nnz_per_channel: float = float("inf")) -> tuple[int, int]:
    """(output rows a band, input channels a block; 0: one block) of an unrolled conv over `rows` x `cols` output
    cells (kernels.unrolled: its functions run band by band, each over the band's cells).

    Per-op plans (groups in parallel, each group's blocks in turn): bands whose input rows, one vector of every
    channel, fit UNROLLED_WINDOW_BYTES (in L2 while every group's code runs over it), one block. A serial plan (one
    share of a split batch) runs block by block, every group within a block: a band holds as many rows as keep the
    partial sums of all its output channels within UNROLLED_PARTIAL_BYTES, and a block as many input channels as
    keep its window within UNROLLED_BLOCK_BYTES, but enough for UNROLLED_BLOCK_MIN_NNZ nonzeros an output channel
    (`nnz_per_channel`: an output channel's nonzeros from one input channel): each block loads and stores a
    group's 30 partial sums, which a 1x1 conv's blocks of 9 channels at 10% (one nonzero each) paid for every
    27 multiply-adds. Each group's function of a block (a few KB of code) then runs over every cell of the band
    from the instruction cache, where a whole group's function (100+ KB on a 512-channel 4x4 map) came from L2
    or L3 again for every cell."""
    vector = 4 * kernels.LANE_VECTOR
    if serial and UNROLLED_BLOCK_BYTES:
        band = max(1, min(rows, UNROLLED_PARTIAL_BYTES // (out_channels * cols * vector)))
        in_rows = (band - 1) * stride + reach
        channels = UNROLLED_BLOCK_BYTES // (in_rows * wq_in * vector)
        if channels >= UNROLLED_MIN_BLOCK_CHANNELS:
            channels = max(channels, math.ceil(UNROLLED_BLOCK_MIN_NNZ / max(nnz_per_channel, 1e-9)))
            return band, 0 if channels >= c else int(channels)
    window_rows = max(1, UNROLLED_WINDOW_BYTES // (c * wq_in * vector))  # input rows a band's window holds
    return max(1, (window_rows - reach) // stride + 1), 0


def _unrolls(lanes: int, out_cells: int, nnz: int, live_weights: int) -> bool:
    """Whether a lanes conv runs as unrolled machine code (kernels.unrolled) rather than the strip kernels."""
    return bool(UNROLLED_CONV and kernels.unrolled_available() and lanes % kernels.LANE_VECTOR == 0
                and out_cells <= UNROLLED_MAX_CELLS
                and (out_cells <= UNROLLED_SMALL_CELLS or nnz >= UNROLLED_MIN_DENSITY * max(1, live_weights)))


def _unroll(b: _Builder):
    """Write the unrolled code of the lanes convs `_lower_lane_conv` marked, now that their ReLU flags and
    residuals are final, all into one executable mapping: per op, its table in u32 (functions, rows a band, input
    channel blocks, output rows, output columns, whether to prefetch, address words, weight starts, row and column
    tap masks) and its weights in f32."""
    functions, pending = [], []
    for row, (indptr, positions, values, bias, plane_out, block_rows, block_span, taps, masks) in b.unrolled.items():
        p = b.rows[row][2:]
        group_functions, weights, starts, n_blocks = kernels.unrolled_conv_functions(
            indptr, positions, values, bias, plane_out, p[6] >= 0, p[7] != 0, block_span, taps)
        pending.append((row, len(functions), weights, starts, block_rows, n_blocks, masks))
        functions += group_functions
    if not functions:
        return
    code = kernels.UnrolledCode(functions)
    b.code.append(code)
    words = kernels.address_words(code).reshape(-1, 2)
    for row, first, weights, starts, block_rows, n_blocks, (row_masks, col_masks) in pending:
        table = np.concatenate([[len(starts), block_rows, n_blocks, len(row_masks), len(col_masks), UNROLLED_PREFETCH],
                                words[first:first + len(starts)].reshape(-1), starts, row_masks, col_masks])
        b.rows[row][2 + 30] = b.weights_u32(table.astype(np.uint32))
        b.rows[row][2 + 31] = b.weights_f32(weights)


def _lower_grid_conv(b: _Builder, m: SparseConv2d, src, res):
    """Same-size stride-1 conv from grid to grid: no pack, no scratch (kernels.conv._grid_conv)."""
    c, n, h, w = src[2]
    cells, wq, row_len, _ = grid_geometry(n, h, w)
    offsets = m.tap_offsets(row_len, wq)
    if offsets.dtype != np.uint32:
        raise Unsupported("grid activation past 2**32 elements")
    out = b.alloc_grid(m.out_channels, n, h, w)
    shift = m.pads[0] * (wq + 1)
    b.emit(ex.GRID_CONV, m.nnz * n * cells, src[0], c, row_len, out, m.out_channels, -1 if res is None else res[0],
           int(m.relu), shift, _grid_mask(b, h, w), cells, n, GRID_CO_BLOCK,
           b.weights_u32(m.indptr.numpy()), b.weights_u32(offsets), m.nnz, b.weights_f32(m.values.detach().numpy()),
           b.weights_f32(m.bias_or_zeros.detach().numpy()))
    return (out, "grid", (m.out_channels, n, h, w))
