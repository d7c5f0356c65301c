"""Depth-first order for the lanes convs of a serial plan: each conv's output cut into bands of rows, and the
bands of consecutive convs interleaved, so that a band a conv writes is read by the next convs while it is still
in cache.

Why: a plan that splits the batch runs each share's ops in order, one whole map after the other. On a
32 MB L3 a CIFAR ResNet18 32-image share's layer1 map is 9.5 MB (64 channels x 34 x 34 cells x 32 lanes), two shares'
maps with their residual outweigh the cache, and every conv read its input and residual back from memory:
layer1's convs ran 11.6-13.8 ms, against 5.6-7.9 ms for the same rows rerun while in cache (per-layer 98%,
batch 64, AMD EPYC Zen 3; bench/RESULTS.md). DeepSparse's "pyramids" run such layers depth-first too.

Correctness does not depend on which convs fuse: the bands' order is any order that keeps every dependency of
the plan's own order. Each band's reads (input rows its taps reach, residual rows) and writes (output rows, the
border cells it zeroes) are address ranges of the arena; a band runs after every band of an earlier op whose
writes meet its reads or writes, and whose reads meet its writes (arena buffers are reused once dead, and a conv
may write over its residual). Among the ready bands the one furthest down the network goes first.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernels import executor as ex

# LANE_CONV parameters (kernels.executor) the schedule reads or rewrites; BORDER_ROWS (output rows whose border
# the op zeroes first, 0: none) is also the one plan.unread_borders clears
_X, _C_IN, _PLANE_IN, _OUT, _C_OUT, _PLANE_OUT, _RES = 0, 1, 2, 3, 4, 5, 6
_ORIGIN, _STEP_Y, _ROWS, _FIRST_CELL, BORDER_ROWS, _CELLS_PER_ROW, _ZERO_FROM, _ZERO_TO = 8, 9, 11, 22, 23, 24, 27, 28
_ITEM_ROWS = 29


@dataclass(frozen=True)
class LaneRows:
    """What a LANE_CONV op's rows read, beyond its parameters (plan._lower_lane_conv records it)."""
    first_row: int      # the op's first output row (a region's top), in the output map
    in_row: int         # the input row, border included, that the first output row's top taps read
    stride: int         # input rows between output rows
    reach: int          # input rows one output row's taps span: (kernel rows - 1) x dilation + 1
    in_row_len: int     # floats a row of the input holds (cells x lanes)
    out_row_len: int    # ... of the output
    out_h: int          # rows of the output map, border excluded
    whole_width: bool   # the op writes whole rows (not a region of some columns)


def _access(base: int, planes: int, plane: int, row_len: int, first: int, end: int) -> tuple:
    return base, planes * plane, plane, row_len, first, end


def _meet(a: tuple, b: tuple) -> bool:
    """Whether two accesses (base, extent, plane length, row length, first row, end row) share arena memory. Each
    is one range of floats per plane (channel): [base + plane x p + row length x first row, ... x end row)."""
    if a[0] == b[0] and a[2] == b[2] and a[3] == b[3]:  # one layout at one base: compare rows
        return a[4] < b[5] and b[4] < a[5]
    if not (a[0] < b[0] + b[1] and b[0] < a[0] + a[1]):
        return False
    # Buffers of two layouts over the same arena memory (one freed, the other allocated there): for each plane p
    # of a, whether some plane q of b has start_b + q x plane_b < end_a(p) and end_b + q x plane_b > start_a(p).
    start_a = a[0] + a[3] * a[4] + a[2] * np.arange(a[1] // a[2])
    end_a = start_a + a[3] * (a[5] - a[4])
    start_b, end_b, planes_b = b[0] + b[3] * b[4], b[0] + b[3] * b[5], b[1] // b[2]
    q_low = np.maximum(np.floor_divide(start_a - end_b, b[2]) + 1, 0)      # first q with end_b(q) > start_a
    q_high = np.minimum(-np.floor_divide(start_b - end_a, b[2]) - 1, planes_b - 1)  # last q with start_b(q) < end_a
    return bool((q_low <= q_high).any())


def _band(row, d: LaneRows, first: int, end: int):
    """(op row, reads, writes) of output rows first..end-1 of LANE_CONV op `row` (its own rows: itself)."""
    p = row[2:]
    q = list(p)  # the band's parameters
    shift = first - d.first_row
    q[_ORIGIN] += shift * p[_STEP_Y]
    q[_ROWS] = end - first
    q[_FIRST_CELL] += shift * p[_CELLS_PER_ROW]
    written = [first + 1, end + 1]  # rows with border: output row r is row r + 1
    if p[BORDER_ROWS]:
        if (first, end) != (d.first_row, d.first_row + p[_ROWS]):  # a band zeroes its own rows' border cells
            q[_ZERO_FROM] = first + 1 if first > 0 else 0
            q[_ZERO_TO] = end + 1 if end < d.out_h else p[BORDER_ROWS]
        written = [min(written[0], q[_ZERO_FROM]), max(written[1], q[_ZERO_TO])]
    band = [*row[:2], *q]
    in_first = d.in_row + shift * d.stride
    reads = [_access(p[_X], p[_C_IN], p[_PLANE_IN], d.in_row_len, in_first,
                     in_first + (end - first - 1) * d.stride + d.reach)]
    if p[_RES] >= 0:
        reads.append(_access(p[_RES], p[_C_OUT], p[_PLANE_OUT], d.out_row_len, first + 1, end + 1))
    writes = [_access(p[_OUT], p[_C_OUT], p[_PLANE_OUT], d.out_row_len, *written)]
    return band, reads, writes


def _bands(row, d: LaneRows, band_bytes: int) -> list:
    """The op's bands: output rows of about band_bytes each, a multiple of the rows its work items cover (so that
    pairs of rows stay pairs). An op that writes part of its rows' columns, or zeroes a border beyond its own rows
    (a region of several, whose first zeroes the map's), stays whole."""
    p = row[2:]
    rows = p[_ROWS]
    whole_map = d.first_row == 0 and rows == d.out_h
    item_rows = max(1, p[_ITEM_ROWS])
    per_band = max(1, band_bytes // (4 * p[_C_OUT] * d.out_row_len) // item_rows) * item_rows
    if not d.whole_width or (p[BORDER_ROWS] and not whole_map) or per_band >= rows:
        return [_band(row, d, d.first_row, d.first_row + rows)]
    return [_band(row, d, first, min(first + per_band, d.first_row + rows))
            for first in range(d.first_row, d.first_row + rows, per_band)]


def _schedule_run(rows: list, layers: list, lane_rows: list, band_bytes: int) -> tuple[list, list]:
    """One run of consecutive LANE_CONV ops, banded and interleaved depth-first."""
    bands = [_bands(row, d, band_bytes) for row, d in zip(rows, lane_rows)]
    # needs[j][k]: for band k of op j, {earlier op i: bands of i that must have run}
    needs = []
    for j, op_bands in enumerate(bands):
        needs.append([])
        for _, reads, writes in op_bands:
            need = {}
            for i in range(j):
                for k in range(len(bands[i]) - 1, -1, -1):
                    _, r, w = bands[i][k]
                    if (any(_meet(a, b) for a in w for b in reads + writes)
                            or any(_meet(a, b) for a in r for b in writes)):
                        need[i] = k + 1
                        break
            needs[j].append(need)
    done = [0] * len(bands)
    order_rows, order_layers = [], []
    total = sum(map(len, bands))
    while len(order_rows) < total:
        for j in range(len(bands) - 1, -1, -1):  # the deepest op whose next band is ready
            k = done[j]
            if k < len(bands[j]) and all(done[i] >= n for i, n in needs[j][k].items()):
                order_rows.append(bands[j][k][0])
                order_layers.append(layers[j])
                done[j] += 1
                break
        else:  # the first op with bands left depends on finished ops only
            raise AssertionError("band schedule found no ready band")
    return order_rows, order_layers


def schedule(rows: list, layers: list, lane_rows: dict, band_bytes: int) -> tuple[list, list]:
    """The plan's op rows (and their layer labels) with every run of consecutive LANE_CONV ops that `lane_rows`
    describes (row index -> LaneRows) banded and interleaved; other ops keep their places."""
    out_rows, out_layers = [], []
    i = 0
    while i < len(rows):
        j = i
        while j < len(rows) and rows[j][0] == ex.LANE_CONV and j in lane_rows:
            j += 1
        if j == i:
            out_rows.append(rows[i])
            out_layers.append(layers[i])
            i += 1
            continue
        run_rows, run_layers = _schedule_run(rows[i:j], layers[i:j], [lane_rows[k] for k in range(i, j)], band_bytes)
        out_rows += run_rows
        out_layers += run_layers
        i = j
    return out_rows, out_layers
