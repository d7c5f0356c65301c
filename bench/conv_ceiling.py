"""Where a lanes conv's time goes below the strip's ceiling: one 3x3 conv, one core, GMAC/s per core.

    python bench/conv_ceiling.py                 # 64 channels, 32x32 map, one output row, 32 lanes
    python bench/conv_ceiling.py --channels 256 --size 8 --rows 8

`bench/strip_ceiling.py` runs the strip micro-kernel on an input that sits in L1. A whole conv
(`kernels.lanes.lane_conv_seq`, as a plan runs it on one share of a split batch) adds two costs: its input
window overflows L1 (every output channel's nonzeros read 3 rows x (cells + 2) cells of every input channel
in the block), and every input-channel block after the first loads and stores each strip's partial sums. This
prints the same conv's speed with each cost taken away in turn, on synthetic weights (uniform random mask):

  as planned        channel blocks by `plan.lane_channel_block`, the real map
  one block         every input channel in one block: no partial-sum passes, the window from L2
  window in L1      blocks as planned, but every input channel reads one of 4 planes: the same loads and
                    the same code, the window ~9 KB
  both              one block and the 4 planes

Timings are never asserted anywhere; rerun it and compare the rows of one run.
"""
from __future__ import annotations

import argparse

import numba
import numpy as np
import scipy.sparse

from sparsert import plan
from sparsert.kernels.lanes import channel_blocks, lane_conv_seq, lane_offsets
from sparsert.timing import fastest_seconds

ALIASED_PLANES = 4  # input planes the "window in L1" rows read: 4 x 3 rows x 6 cells x 128 B


def conv_case(channels: int, size: int, rows: int, lanes: int, density: float, block: int, planes: int, seed: int = 0):
    """(arguments of lane_conv_seq, multiply-adds per call, the weights as CSR [out, in x 3 x 3]) for a
    channels -> channels 3x3 'same' conv with ReLU over the first `rows` output rows of a size x size map, whose
    input channel c is plane c % planes of x (a lanes activation: zero border, interior random)."""
    rng = np.random.default_rng(seed)
    lanes, hq, wq, plane = plan.lane_geometry(lanes, size, size)  # the planner's padded plane
    cells = plan.lane_strip_cells(lanes)
    x = plan.aligned_empty(planes * plane)
    x[:] = 0
    grid = x.reshape(planes, plane)[:, :hq * wq * lanes].reshape(planes, hq, wq, lanes)
    grid[:, 1:-1, 1:-1] = rng.standard_normal((planes, size, size, lanes))
    out = plan.aligned_empty(channels * plane).reshape(channels, plane)
    out[:] = 0
    w = scipy.sparse.random(channels, channels * 9, density=density, format="csr", random_state=seed,
                            dtype=np.float32)
    w.sort_indices()
    bounds, order = channel_blocks(w.indptr, w.indices, 9, block, channels, plan.LANE_CO_BLOCK)
    columns = w.indices[order]
    columns = (columns // 9 % planes) * 9 + columns % 9
    offsets = lane_offsets(columns, (3, 3), (1, 1), plane, wq, lanes)
    bias = np.zeros(channels, np.float32)
    args = (bounds, offsets, w.data[order], x, 0, wq, 1, bias, out, False, True, out, wq, wq + 1, rows, size, lanes,
            cells, plan.LANE_CO_BLOCK, 0, np.zeros(9, np.uint32), plan.LANE_ITEM_ROWS)
    return args, w.nnz * rows * size * lanes, w


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=32, help="map height and width")
    p.add_argument("--rows", type=int, default=1, help="output rows per call (a row band: 1)")
    p.add_argument("--lanes", type=int, default=32, help="batch lanes per cell (a 64-image batch split in two: 32)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    rows = []
    try:
        print(f"{'density':>7} {'block':>5}  {'as planned':>10} {'one block':>10} {'window in L1':>12} {'both':>6}"
              f"   (GMAC/s, one core)")
        for density in args.densities:
            block = plan.lane_channel_block(args.channels, 9, args.lanes, density)
            rates = []
            for one_block, planes in ((False, args.channels), (True, args.channels), (False, ALIASED_PLANES),
                                      (True, ALIASED_PLANES)):
                conv, macs, _ = conv_case(args.channels, args.size, args.rows, args.lanes, density,
                                          args.channels if one_block else block, planes)
                rates.append(macs / fastest_seconds(lambda: lane_conv_seq(*conv), args.repeats) / 1e9)
            print(f"{density:7.2f} {block:5d}  {rates[0]:10.1f} {rates[1]:10.1f} {rates[2]:12.1f} {rates[3]:6.1f}")
            rows.append((density, block, *rates))
    finally:
        numba.set_num_threads(threads)
    return rows


if __name__ == "__main__":
    main()
