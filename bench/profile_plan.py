"""Where a compiled plan's time goes, op by op: each op of the plan timed alone.

    python bench/profile_plan.py --model cifar_resnet18 --pruning global-98 --batch-size 64

Models and pruning are those of `sparsert bench` (same seed); the model is `sparsify(model)` with its
defaults. A whole call runs first, so every op then finds its inputs where a call leaves them; each op
then runs alone (`--repeats` times, the fastest kept), on the plan's threads (a batch split between
threads runs its ops once per share, in parallel, as in a call). The ops' sum runs below a whole call: an op
run again at once is faster than its first run in a call (CIFAR ResNet18 90% at batch 64, a call running each op
twice: 42.0 ms for the first runs, 33.9 ms for the repeats), and writing 96 MB between the repeats did not slow
them, so it is not only the data caches (bench/RESULTS.md).

Sparse products also show their multiply-adds per second: nonzeros x the outputs each one meets (the
lanes conv counts padding lanes and the grid conv its border cells: what the kernel computes; the unrolled lanes
conv skips the taps that read the zero border, which are counted, so on small maps its rate reads high). Put it beside
DeepSparse's per-layer times (`deepsparse.debug_analysis -b 64 -ncores 2 model.onnx`, in its own venv)
to see which layers a gap comes from (bench/RESULTS.md).
"""
from __future__ import annotations

import argparse

import torch

from sparsert import bench
from sparsert.convert import sparsify
from sparsert.kernels import executor as ex
from sparsert.timing import fastest_seconds

OP_NAMES = {getattr(ex, name): name.lower() for name in dir(ex)  # the op codes: public upper-case ints
            if name.isupper() and name[0] != "_" and name != "N_PARAMS" and isinstance(getattr(ex, name), int)}


def multiply_adds(op) -> int:
    """Multiply-adds one run of this op row computes (one share of a split batch), or 0 for non-products."""
    code, p = int(op[0]), op[2:]
    if code == ex.LANE_CONV:  # nnz x output rows x cells a row x lanes
        return int(p[19] * p[11] * p[12] * p[13])
    if code == ex.TAP_CONV:  # nnz x pixels
        return int(p[10] * p[6] * p[7])
    if code == ex.GRID_CONV:  # nnz x cells per image x images
        return int(p[14] * p[9] * p[10])
    if code == ex.CONV:  # nnz x grid positions (images x padded rows x padded row length)
        return int(p[17] * p[5] * p[10] * p[11])
    if code == ex.CONV_GEMM:  # nnz x pixels
        return int(p[9] * p[2])
    if code == ex.LINEAR_CSR:  # nnz x batch
        return int(p[9] * p[4])
    if code == ex.LINEAR_BSR:  # blocks x block size x batch
        return int(p[9] * p[13] * p[14] * p[4])
    if code == ex.LINEAR_SLICED:  # stored steps, slice padding included (batch 1)
        return int(p[9])
    return 0


def profile(model_name: str, pruning: str, batch_size: int, repeats: int, seed: int = 0) -> dict:
    """{'parts', 'call_ms', 'rows': [{'index', 'layer', 'op', 'parallel', 'ms', 'gmacs'}]} for the model's plan
    (layer: the graph node the op was lowered from, `Plan.op_layers`)."""
    model = bench.build_case(model_name, pruning, seed)
    if model is None:
        raise SystemExit(f"pruning {pruning!r} does not apply to {model_name!r} (no conv weights)")
    x = bench.case_input(bench.ALL_MODELS[model_name].input_shape, batch_size, seed)
    sparse = sparsify(model)
    with torch.no_grad():
        plan = sparse.plan_for(x) if hasattr(sparse, "plan_for") else None
        if plan is None:
            raise SystemExit(f"{model_name} {pruning} at batch {batch_size} runs eagerly: no plan to profile")
        torch.testing.assert_close(plan(x), model(x), rtol=1e-3, atol=1e-3)  # a wrong plan's times mean nothing
    x_flat = x.contiguous().numpy().reshape(-1)
    call = fastest_seconds(lambda: plan(x), repeats)
    rows = []
    for i in range(plan.ops.shape[0]):
        ops = plan.ops[i:i + 1]
        seconds = fastest_seconds(lambda: plan.run_rows(ops, x_flat), repeats)
        macs = multiply_adds(plan.ops[i]) * plan.parts
        rows.append({"index": i, "layer": plan.op_layers[i], "op": OP_NAMES.get(int(plan.ops[i, 0]), str(int(plan.ops[i, 0]))),
                     "parallel": bool(plan.ops[i, 1]), "ms": seconds * 1e3,
                     "gmacs": macs / seconds / 1e9 if macs else None})
    return {"parts": plan.parts, "call_ms": call * 1e3, "rows": rows}


def format_table(result: dict) -> str:
    total = sum(r["ms"] for r in result["rows"])
    lines = [f"batch split into {result['parts']} part(s); whole call {result['call_ms']:.3f} ms, ops alone sum to "
             f"{total:.3f} ms", "", "| # | layer | op | parallel | ms | % of sum | GMAC/s |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        rate = f"{r['gmacs']:.1f}" if r["gmacs"] is not None else ""
        lines.append(f"| {r['index']} | {r['layer']} | {r['op']} | {'yes' if r['parallel'] else 'no'} | {r['ms']:.3f} | "
                     f"{100 * r['ms'] / total:.1f} | {rate} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_case_arguments(p, pruning="global-98")
    p.add_argument("--repeats", type=int, default=10, help="runs per op; the fastest is kept")
    args = p.parse_args(argv)
    print(format_table(profile(args.model, args.pruning, args.batch_size, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
