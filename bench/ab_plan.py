"""A/B of two plan settings on one model, layer by layer and whole calls, turns interleaved.

    python bench/ab_plan.py --model cifar_resnet18 --pruning per-layer-90 --batch-size 64 \\
        --set LANE_STRIP_EXPONENT=0 --set LANE_REGION_GAIN=1.3

Plan A uses `sparsert.plan`'s constants as they are; plan B the same model planned with each `--set NAME=VALUE`
applied to them (`ops.NAME` for those of `sparsert.ops` the planner reads) (the example: lanes convs split into regions by work alone, the rule before
`plan.lane_region_split`). Why interleaved: this VM's speed moves up to 2x for seconds at a time
(bench/RESULTS.md), so two plans timed one after the other compare phases, not plans. Here each layer's ops of
A and of B take turns (`--turns`; the fastest turn of each is kept), then whole calls take turns and each pair
of neighbouring turns gives a ratio; the median ratio is the verdict. Every layer is timed, also those whose
ops the settings leave alone: their A/B shows the noise left. A layer's time is the whole batch's also in a plan
that splits the batch (its rows run on every share at once), so a split plan compares with a per-op one layer by
layer (`--set SPLIT_MIN_ARENA_PER_WEIGHT=0` splits, `=100` does not). Both plans' outputs are checked against torch
first.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sparsert import bench
from sparsert import ops as ops_module
from sparsert import plan as plan_module
from sparsert.convert import sparsify
from sparsert.timing import measure


MODULES = {"plan": plan_module, "ops": ops_module}  # whose constants --set may change: planning reads both


def _target(name: str):
    """(module, constant) for 'NAME' (sparsert.plan) or 'ops.NAME' (sparsert.ops)."""
    module, _, constant = name.rpartition(".")
    return MODULES.get(module or "plan"), constant


def parse_setting(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    module, constant = _target(name)
    if not sep or module is None or not isinstance(getattr(module, constant, None), (int, float)):
        raise argparse.ArgumentTypeError(f"--set wants NAME=VALUE with NAME a numeric constant of sparsert.plan "
                                         f"(or ops.NAME, of sparsert.ops), got {text!r}")
    try:
        return name, type(getattr(module, constant))(float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--set {name}: {value!r} is not a number") from None


def build(model, x, settings: dict):
    """The model's plan for x with `settings` applied while it is built (restored after)."""
    targets = {name: _target(name) for name in settings}
    saved = {name: getattr(module, constant) for name, (module, constant) in targets.items()}
    try:
        for name, value in settings.items():
            setattr(*targets[name], value)
        plan = sparsify(model).plan_for(x)
    finally:
        for name, value in saved.items():
            setattr(*targets[name], value)
    if plan is None:
        raise SystemExit("the model runs eagerly at this batch size: no plan to compare")
    return plan


def layer_rows(plan, layer: str) -> np.ndarray:
    """The op rows lowered from `layer` (consecutive in the table)."""
    index = [i for i, name in enumerate(plan.op_layers) if name == layer]
    return plan.ops[index[0]:index[-1] + 1]


def compare(model_name: str, pruning: str, batch_size: int, settings: dict, turns: int = 25, whole_turns: int = 16,
            turn_seconds: float = 0.4, seed: int = 0) -> dict:
    """{'parts', 'ops', 'layers': [{'layer', 'ops', 'ms'}], 'calls_ms', 'paired'}: per layer, the number of ops
    and fastest-turn ms of A and B; the median ms of each whole-call turn; the A/B time ratio of each pair."""
    model = bench.build_case(model_name, pruning, seed)
    if model is None:
        raise SystemExit(f"pruning {pruning!r} does not apply to {model_name!r} (no conv weights)")
    x = bench.case_input(bench.ALL_MODELS[model_name].input_shape, batch_size, seed)
    x_flat = x.contiguous().numpy().reshape(-1)
    with torch.no_grad():
        expected = model(x)
        plans = (build(model, x, {}), build(model, x, settings))
        for plan in plans:  # also leaves each op's inputs in its arena, as a call does
            torch.testing.assert_close(plan(x), expected, rtol=1e-3, atol=1e-3)
    layers = []
    # A layer's rows run on every share of a split plan at once, so both plans' times are the whole batch's, also
    # where one plan splits the batch and the other does not.
    for layer in dict.fromkeys(plans[0].op_layers):
        if layer not in plans[1].op_layers:
            continue
        rows = [layer_rows(plan, layer) for plan in plans]
        best = [float("inf"), float("inf")]
        for turn in range(turns):
            for k in ((0, 1) if turn % 2 else (1, 0)):
                start = time.perf_counter()
                plans[k].run_rows(rows[k], x_flat)
                best[k] = min(best[k], time.perf_counter() - start)
        layers.append({"layer": layer, "ops": [len(r) for r in rows], "ms": [b * 1e3 for b in best]})
    calls = ([], [])
    with torch.no_grad():
        for turn in range(whole_turns):
            for k in ((0, 1) if turn % 2 else (1, 0)):
                turn_result = measure(lambda: plans[k](x), repeats=1, min_time=turn_seconds, warmup=0,
                                      batch_size=batch_size)
                calls[k].append(turn_result["median"])
    return {"parts": [p.parts for p in plans], "ops": [len(p.ops) for p in plans], "layers": layers,
            "calls_ms": calls, "paired": [a / b for a, b in zip(*calls)]}


def format_report(result: dict, settings: dict) -> str:
    change = ", ".join(f"{name}={value}" for name, value in settings.items()) or "nothing"
    lines = [f"A: sparsert.plan as it is; B: {change}. Parts A/B {result['parts'][0]}/{result['parts'][1]}, "
             f"ops {result['ops'][0]}/{result['ops'][1]}", ""]
    if result["layers"]:
        lines += ["| layer | ops A | ops B | A ms | B ms | A/B |", "|---|---|---|---|---|---|"]
        for r in result["layers"]:
            (oa, ob), (ta, tb) = r["ops"], r["ms"]
            lines.append(f"| {r['layer']} | {oa} | {ob} | {ta:.3f} | {tb:.3f} | {ta / tb:.2f} |")
        lines.append("")
    a, b, paired = result["calls_ms"][0], result["calls_ms"][1], result["paired"]
    lines.append(f"whole calls: A {np.median(a):.3f} ms, B {np.median(b):.3f} ms (medians of turns); A/B paired: "
                 f"median {np.median(paired):.3f} (range {min(paired):.2f}-{max(paired):.2f}, {len(paired)} pairs)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench.add_case_arguments(p, pruning="per-layer-90")
    p.add_argument("--set", dest="settings", action="append", type=parse_setting, default=[], metavar="NAME=VALUE",
                   help="a numeric constant of sparsert.plan (or ops.NAME: sparsert.ops) for plan B (repeatable)")
    p.add_argument("--turns", type=int, default=25, help="turns per layer; the fastest of each plan is kept")
    p.add_argument("--whole-turns", type=int, default=16, help="whole-call turns per plan")
    args = p.parse_args(argv)
    settings = dict(args.settings)
    result = compare(args.model, args.pruning, args.batch_size, settings, args.turns, args.whole_turns)
    print(format_report(result, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
