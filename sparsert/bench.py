"""End-to-end benchmark behind `sparsert bench` (also `python -m sparsert.bench`).

Each case is a model x a pruning x a batch size x a thread count. The model is built with a fixed
seed, pruned with torch.nn.utils.prune, its BatchNorm statistics are filled by a few train-mode
forwards on random data (so folding is not the identity), and the masks are baked in. Engines:

  torch        eager dense model, eval mode, torch.no_grad
  onnxruntime  dense ONNX export (opset 13, TorchScript exporter) on CPUExecutionProvider (--onnxruntime)
  sparsert     sparsert.sparsify(model, example_inputs=x) at each batch size: every layer timed dense
               vs sparse on its real input and kept dense unless sparse wins (the `auto` policy);
               the plain sparsify(model) conversion is timed apart (convert_seconds), the per-layer
               measurement too (measure_seconds); output checked against torch before any timing;
               serial_share: the fraction of timed calls its plan ran on one thread (sparsert.choice)

Timing: one first call (Numba compile or cache load, allocator warm-up) timed on its own, `--warmup`
untimed calls, then calls until both `--repeats` calls and `--min-time` seconds are done. Engines of
a case run one after another in this process, dense first. Results: a table on stdout, and in --out
`results.json` (per engine: the fields of DeepSparse's benchmark JSON, `engine`, `version`,
`batch_size`, `num_cores`, `scenario`, `benchmark_result` {items_per_sec, median, mean, std, "90.0%",
...} in ms, plus model, pruning, sparsity, speedups, convert and first-call times) and `speedup.png`.
`--export-onnx DIR` writes the pruned dense ONNX models (masks baked in) and a manifest.json for
bench/deepsparse_compare.py.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numba
import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

from . import __version__
from .checkpoint import strip_pruning
from .convert import report, sparsify
from .io import atomic_output, save_figure, write_json
from .models import cifar_resnet18, mlp
from .timing import PERCENTILES, cpu_model, measure  # noqa: F401  (PERCENTILES: part of this module's interface)

DEFAULT_OUT = os.path.join("sparsert-out", "bench")
# Sparse output vs the dense torch output: relative tolerance, and absolute tolerance as a fraction
# of the largest |output| (float32 sums in another order through up to ~20 folded layers).
RTOL, ATOL_SCALE = 1e-4, 1e-4
ORT_TOLERANCE = 1e-3  # ORT's own fusions and conv algorithms; checked, reported, never fatal


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one item, without the batch dimension
    description: str


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


MODELS = {
    "resnet18": ModelSpec(lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32),
                          "torchvision resnet18(num_classes=10), 32x32 input"),
    "cifar_resnet18": ModelSpec(cifar_resnet18, (3, 32, 32), "ResNet18, 3x3 stride-1 stem, no max-pool, 32x32"),
    "mlp": ModelSpec(lambda: mlp((1024, 4096, 4096, 1000)), (1024,), "MLP 1024-4096-4096-1000, ReLU"),
}
TINY_MODELS = {
    "tiny_mlp": ModelSpec(lambda: mlp((64, 256, 256, 10)), (64,), "MLP 64-256-256-10 (smoke test)"),
    "tiny_cnn": ModelSpec(_tiny_cnn, (3, 16, 16), "2 conv + BN + linear, 16x16 (smoke test)"),
}
ALL_MODELS = {**MODELS, **TINY_MODELS}

# name -> (scope, amount). per-layer: l1_unstructured on every Conv2d/Linear weight;
# global: one global L1 threshold over the Conv2d weights only (Linear layers stay dense).
PRUNINGS = {
    "per-layer-90": ("per-layer", 0.90),
    "per-layer-98": ("per-layer", 0.98),
    "global-98": ("global-conv", 0.98),
}
TINY = dict(models=list(TINY_MODELS), prunings=["per-layer-90", "global-98"], batch_sizes=[1, 4],
            repeats=5, min_time=0.02, warmup=1)


# ----------------------------------------------------------------------------------- arguments
DESCRIPTION = ("Time pruned reference models dense (torch eager, optionally ONNX Runtime) and sparse (sparsert), "
               "check the sparse output against the dense one, and write results.json and speedup.png.")
EXAMPLES = """examples:
  sparsert bench --onnxruntime                                 # every case; minutes on 2 cores
  sparsert bench --models mlp --prunings per-layer-98 --batch-sizes 1 --repeats 100
  sparsert bench --tiny --out /tmp/bench                       # seconds-long smoke run
  sparsert bench --export-onnx /tmp/dsbench --export-only      # ONNX files for bench/deepsparse_compare.py
"""

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--models", nargs="+", choices=list(ALL_MODELS), metavar="MODEL",
                        help=f"models to run (default: {' '.join(MODELS)}; --tiny: {' '.join(TINY_MODELS)})")
    parser.add_argument("--prunings", nargs="+", choices=list(PRUNINGS), metavar="PRUNING",
                        help=f"prunings: {', '.join(PRUNINGS)} (default: all; a global conv pruning is "
                             f"skipped for models without Conv2d)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, metavar="N", help="batch sizes (default: 1 64)")
    parser.add_argument("--threads", nargs="+", type=int, metavar="N",
                        help="thread counts for torch, Numba and ONNX Runtime (default: all cores)")
    parser.add_argument("--repeats", type=int, help="minimum timed calls per engine (default: 20)")
    parser.add_argument("--min-time", type=float, help="minimum timed seconds per engine (default: 1.0)")
    parser.add_argument("--warmup", type=int, help="untimed calls after the first call (default: 3)")
    parser.add_argument("--onnxruntime", action="store_true",
                        help="also time the dense model in ONNX Runtime (skipped with a note if not installed)")
    parser.add_argument("--export-onnx", metavar="DIR",
                        help="write each pruned model as ONNX (masks baked in) plus manifest.json to DIR")
    parser.add_argument("--export-only", action="store_true", help="with --export-onnx: export, time nothing")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for results.json and speedup.png "
                                                            f"(default: {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default: 0)")
    parser.add_argument("--tiny", action="store_true",
                        help="seconds-long smoke run: tiny models, few repeats (used by the tests)")
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on the `sparsert` command's subparsers."""
    parser = subparsers.add_parser("bench", help="time dense vs sparse inference on pruned reference models",
                                   description=DESCRIPTION, epilog=EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsert.bench", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(None if argv is None else [os.fspath(a) for a in argv])
    try:
        _settings(args)
    except ValueError as exc:
        parser.error(str(exc))
    return run(args)


def _settings(args) -> dict:
    tiny = TINY if args.tiny else {}
    max_threads = numba.config.NUMBA_NUM_THREADS
    s = dict(
        models=args.models or tiny.get("models") or list(MODELS),
        prunings=args.prunings or tiny.get("prunings") or list(PRUNINGS),
        batch_sizes=args.batch_sizes or tiny.get("batch_sizes") or [1, 64],
        threads=args.threads or [max_threads],
        repeats=args.repeats if args.repeats is not None else tiny.get("repeats", 20),
        min_time=args.min_time if args.min_time is not None else tiny.get("min_time", 1.0),
        warmup=args.warmup if args.warmup is not None else tiny.get("warmup", 3),
        seed=args.seed,
    )
    if any(n < 1 or n > max_threads for n in s["threads"]):
        raise ValueError(f"--threads must lie in [1, {max_threads}] (Numba's NUMBA_NUM_THREADS), "
                         f"got {s['threads']}")
    if any(b < 1 for b in s["batch_sizes"]) or s["repeats"] < 1 or s["min_time"] < 0 or s["warmup"] < 0:
        raise ValueError("batch sizes and --repeats must be >= 1, --min-time and --warmup >= 0")
    if args.export_only and not args.export_onnx:
        raise ValueError("--export-only needs --export-onnx DIR")
    return s


# ---------------------------------------------------------------------------------- model setup
def prune_model(model: nn.Module, pruning: str) -> bool:
    """Apply `pruning` in place (live prune reparametrizations); False when it has nothing to prune."""
    scope, amount = PRUNINGS[pruning]
    if scope == "per-layer":
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for layer in layers:
            prune.l1_unstructured(layer, "weight", amount=amount)
        return bool(layers)
    convs = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d)]
    if convs:
        prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=amount)
    return bool(convs)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, input_shape, generator: torch.Generator, steps: int = 4,
                        batch: int = 16) -> None:
    """Fill BatchNorm running statistics from train-mode forwards on random data (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for _ in range(steps):
        model(torch.randn(batch, *input_shape, generator=generator))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over all Conv2d/Linear weights."""
    total = zeros = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            total += m.weight.numel()
            zeros += m.weight.numel() - int(torch.count_nonzero(m.weight))
    return zeros / total if total else 0.0


def build_case(model_name: str, pruning: str, seed: int) -> nn.Module | None:
    """Pruned, calibrated, eval-mode model with the masks baked in; None if the pruning does not apply."""
    spec = ALL_MODELS[model_name]
    torch.manual_seed(seed)
    model = spec.build()
    if not prune_model(model, pruning):
        return None
    calibrate_batchnorm(model, spec.input_shape, torch.Generator().manual_seed(seed + 1))
    strip_pruning(model)
    return model.eval().requires_grad_(False)


def add_case_arguments(parser: argparse.ArgumentParser, pruning: str) -> None:
    """--model, --pruning (default `pruning`) and --batch-size: one case, for the bench/ scripts that study one."""
    parser.add_argument("--model", default="cifar_resnet18", choices=list(ALL_MODELS))
    parser.add_argument("--pruning", default=pruning, choices=list(PRUNINGS))
    parser.add_argument("--batch-size", type=int, default=64)


def case_input(input_shape, batch_size: int, seed: int) -> torch.Tensor:
    """The input a case is timed on at this batch size: by `sparsert bench` and by the bench/ scripts, so
    that their figures describe the same call."""
    return torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(seed + batch_size))


def export_onnx(model: nn.Module, input_shape, path: str) -> None:
    """Dense ONNX export with a dynamic batch dimension (input 'input', output 'output')."""
    example = torch.zeros(1, *input_shape)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        with atomic_output(path) as tmp:  # a file DeepSparse might later read: whole or absent
            torch.onnx.export(model, (example,), tmp, opset_version=13, dynamo=False, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


# ---------------------------------------------------------------------------------------- timing


def timed_first_call(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3


def compare(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> tuple[bool, float, float]:
    """(close, max abs error, output scale); atol = ATOL_SCALE * max |expected|."""
    actual = torch.as_tensor(np.asarray(actual)) if not isinstance(actual, torch.Tensor) else actual
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    err = float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    try:
        torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=ATOL_SCALE * scale + 1e-12)
        return True, err, scale
    except AssertionError:
        return False, err, scale


# -------------------------------------------------------------------------------------- versions
def versions() -> dict:
    out = {"sparsert": __version__, "torch": torch.__version__, "numba": numba.__version__,
           "numpy": np.__version__, "python": platform.python_version()}
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = None
    return out


# ------------------------------------------------------------------------------------------- run
def run(args) -> int:
    """Run the selected cases; print a table, write results.json and speedup.png. 1 if a check failed."""
    s = _settings(args)
    notes: list[str] = []
    load_at_start = os.getloadavg()[0]
    if load_at_start > 0.5:
        notes.append(f"1-minute load average {load_at_start:.2f} at start: other processes share the cores, "
                     f"multi-threaded timings are unreliable")
    ort = None
    if args.onnxruntime and not args.export_only:
        try:
            import onnxruntime as ort
        except ImportError:
            notes.append("onnxruntime is not installed: ONNX Runtime engine skipped (pip install onnxruntime)")
    export_dir = Path(args.export_onnx) if args.export_onnx else None
    if export_dir:
        export_dir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    vers = versions()
    saved_threads = (torch.get_num_threads(), numba.get_num_threads())
    records: list[dict] = []
    manifest: list[dict] = []
    failed = False
    try:
        with tempfile.TemporaryDirectory(prefix="sparsert-bench-") as tmp:
            for model_name in s["models"]:
                for pruning in s["prunings"]:
                    model = build_case(model_name, pruning, s["seed"])
                    if model is None:
                        notes.append(f"{model_name} x {pruning}: skipped, the model has no Conv2d weight to prune")
                        continue
                    spec = ALL_MODELS[model_name]
                    sparsity = weight_sparsity(model)
                    onnx_path, export_s = None, None
                    if export_dir or ort:
                        name = f"{model_name}-{pruning}.onnx"
                        onnx_path = str(export_dir / name if export_dir else Path(tmp) / name)
                        t0 = time.perf_counter()
                        export_onnx(model, spec.input_shape, onnx_path)
                        export_s = time.perf_counter() - t0
                        if export_dir:
                            manifest.append(dict(file=name, model=model_name, pruning=pruning, sparsity=sparsity,
                                                 input_name="input", input_shape=list(spec.input_shape),
                                                 batch_sizes=s["batch_sizes"], seed=s["seed"],
                                                 description=spec.description))
                    if args.export_only:
                        print(f"exported {onnx_path} (sparsity {sparsity:.2%})")
                        continue
                    case = dict(model=model_name, pruning=pruning, sparsity=sparsity)
                    records_case, ok = _run_case(model, spec, case, s, ort, onnx_path, export_s, vers, notes)
                    failed |= not ok
                    print(format_table(records_case, header=not records), flush=True)
                    records.extend(records_case)
    finally:
        torch.set_num_threads(saved_threads[0])
        numba.set_num_threads(saved_threads[1])
    if export_dir:
        write_json(export_dir / "manifest.json", dict(created_by=f"sparsert.bench {__version__}", versions=vers,
                                                      models=manifest))
    if args.export_only:
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = dict(benchmark="sparsert.bench", date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               machine=dict(cpu=cpu_model(), cores=os.cpu_count(), platform=platform.platform(),
                            loadavg_at_start=load_at_start, loadavg_at_end=os.getloadavg()[0]),
               versions=vers, settings=s, notes=notes, results=records)
    write_json(out_dir / "results.json", doc)
    plot(records, out_dir / "speedup.png")
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'speedup.png'}")
    return 1 if failed else 0


def _run_case(model, spec, case, s, ort, onnx_path, export_s, vers, notes) -> tuple[list[dict], bool]:
    """All engines, thread counts and batch sizes of one (model, pruning). Returns (records, checks ok)."""
    t0 = time.perf_counter()
    sparse_model = sparsify(model)
    convert_s = time.perf_counter() - t0
    rows = report(sparse_model)
    n_sparse = sum(r["format"] != "dense" for r in rows)
    layers = f"{n_sparse}/{len(rows)}"
    timing = dict(repeats=s["repeats"], min_time=s["min_time"], warmup=s["warmup"])
    records, ok = [], True
    for threads in s["threads"]:
        torch.set_num_threads(threads)
        numba.set_num_threads(threads)
        for bs in s["batch_sizes"]:
            x = case_input(spec.input_shape, bs, s["seed"])
            base = dict(case, batch_size=bs, num_cores=threads, scenario="singlestream",
                        input_shapes=[[bs, *spec.input_shape]], versions=vers)
            group = []
            with torch.no_grad():
                expected, first_ms = timed_first_call(lambda: model(x))
                result = measure(lambda: model(x), batch_size=bs, **timing)
                group.append(dict(base, engine="torch", version=vers["torch"], dense=True, first_call_ms=first_ms,
                                  convert_seconds=0.0, benchmark_result=result, check="reference"))
                if ort is not None:
                    group.append(_run_ort(ort, onnx_path, x, expected, threads, bs, timing, base, vers, export_s))
                # `auto` policy at this batch size: each layer timed dense vs sparse on its real input,
                # kept dense unless sparse wins (sparsify(example_inputs=...)); timed apart from the
                # plain conversion above, which is the figure the conversion target refers to.
                t0 = time.perf_counter()
                measured = sparsify(model, example_inputs=x)
                measured_rows = report(measured)
                rec = dict(base, engine="sparsert", version=vers["sparsert"], dense=False, convert_seconds=convert_s,
                           measure_seconds=time.perf_counter() - t0,
                           sparse_layers=f"{sum(r['format'] != 'dense' for r in measured_rows)}/{len(measured_rows)}",
                           sparse_layers_default=layers,
                           auto_choice=getattr(measured, "sparsert_choice", {}).get("choice"))
                sparse_model = measured
                y, rec["first_call_ms"] = timed_first_call(lambda: sparse_model(x))
                close, rec["max_abs_error"], rec["output_scale"] = compare(y, expected, RTOL)
                if close:
                    rec["check"] = "ok"
                    before = split_calls(sparse_model, x)
                    rec["benchmark_result"] = measure(lambda: sparse_model(x), batch_size=bs, **timing)
                    rec["serial_share"] = serial_share(before, split_calls(sparse_model, x))
                else:
                    ok = False
                    rec["check"] = "mismatch"
                    notes.append(f"{case['model']} {case['pruning']} bs={bs}: sparsert output differs from torch "
                                 f"(max abs error {rec['max_abs_error']:.3g}, output scale {rec['output_scale']:.3g});"
                                 f" not timed")
                group.append(rec)
            _add_speedups(group)
            records.extend(group)
    return records, ok


def split_calls(model, x) -> list | None:
    """[split, serial]: the calls so far of the plan a call with x runs that ran its ops split between threads and
    all on one (sparsert.choice); None where that plan has no such choice (or there is no plan)."""
    plan = model.plan_for(x) if hasattr(model, "plan_for") else None
    return list(plan.choice.calls) if plan is not None and plan.choice is not None else None


def serial_share(before, after) -> float | None:
    """The fraction of the calls between two `split_calls` that ran on one thread."""
    if before is None or after is None or sum(after) == sum(before):
        return None
    return (after[1] - before[1]) / (sum(after) - sum(before))


def _run_ort(ort, onnx_path, x, expected, threads, bs, timing, base, vers, export_s) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    t0 = time.perf_counter()
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    session_s = time.perf_counter() - t0
    feed = {"input": x.numpy()}
    y, first_ms = timed_first_call(lambda: session.run(None, feed)[0])
    close, err, scale = compare(y, expected, ORT_TOLERANCE)
    rec = dict(base, engine="onnxruntime", version=vers["onnxruntime"], dense=True, first_call_ms=first_ms,
               convert_seconds=export_s + session_s, check="ok" if close else "mismatch", max_abs_error=err,
               output_scale=scale)
    rec["benchmark_result"] = measure(lambda: session.run(None, feed), batch_size=bs, **timing)
    del session  # its spinning intra-op threads must not overlap the next engine's timings
    return rec


def _add_speedups(group: list[dict]) -> None:
    medians = {r["engine"]: r["benchmark_result"]["median"] for r in group if "benchmark_result" in r}
    dense = [medians[r["engine"]] for r in group if r["dense"] and r["engine"] in medians]
    best_dense = min(dense) if dense else math.nan
    torch_ms = medians.get("torch", math.nan)
    for r in group:
        med = medians.get(r["engine"])
        r["speedup_vs_torch"] = torch_ms / med if med else None
        r["speedup_vs_best_dense"] = best_dense / med if med else None


# ------------------------------------------------------------------------------------- reporting
COLUMNS = (("model", 14, "{}"), ("pruning", 12, "{}"), ("sparsity", 8, "{:.2%}"), ("bs", 4, "{}"),
           ("thr", 3, "{}"), ("engine", 11, "{}"), ("median ms", 10, "{:.3f}"), ("p90 ms", 9, "{:.3f}"),
           ("items/s", 10, "{:.1f}"), ("vs torch", 8, "{:.2f}x"), ("vs dense", 8, "{:.2f}x"),
           ("convert s", 9, "{:.2f}"), ("first ms", 9, "{:.1f}"), ("check", 8, "{}"))


def _cells(r: dict) -> dict:
    b = r.get("benchmark_result", {})
    return {"model": r["model"], "pruning": r["pruning"], "sparsity": r["sparsity"], "bs": r["batch_size"],
            "thr": r["num_cores"], "engine": r["engine"], "median ms": b.get("median"), "p90 ms": b.get("90.0%"),
            "items/s": b.get("items_per_sec"), "vs torch": r.get("speedup_vs_torch"),
            "vs dense": r.get("speedup_vs_best_dense"), "convert s": r.get("convert_seconds"),
            "first ms": r.get("first_call_ms"), "check": r.get("check")}


def format_table(records: list[dict], header: bool = True) -> str:
    lines = []
    if header:
        lines.append(" ".join(f"{name:>{width}}" for name, width, _ in COLUMNS))
        lines.append("-" * len(lines[0]))
    for r in records:
        cells = _cells(r)
        lines.append(" ".join(f"{(fmt.format(cells[name]) if cells[name] is not None else '-'):>{width}}"
                              for name, width, fmt in COLUMNS))
    return "\n".join(lines)


def plot(records: list[dict], path) -> None:
    """Speedup of sparsert over torch eager and over the best dense engine, against weight sparsity."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    sparse = [r for r in records if r["engine"] == "sparsert" and r.get("speedup_vs_torch")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    markers = dict(zip(ALL_MODELS, "osD^vP"))
    batch_sizes = sorted({r["batch_size"] for r in sparse})
    colors = dict(zip(batch_sizes, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    multi_thread = len({r["num_cores"] for r in sparse}) > 1
    for ax, key, title in ((axes[0], "speedup_vs_torch", "sparsert vs torch eager"),
                           (axes[1], "speedup_vs_best_dense", "sparsert vs best dense engine")):
        seen = set()
        for r in sparse:
            label = f"{r['model']} bs={r['batch_size']}" + (f" thr={r['num_cores']}" if multi_thread else "")
            ax.scatter(100 * r["sparsity"], r[key], marker=markers.get(r["model"], "o"),
                       color=colors[r["batch_size"]], label=None if label in seen else label,
                       alpha=0.6 if r["num_cores"] != max(x["num_cores"] for x in sparse) else 1.0)
            seen.add(label)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel("weight sparsity of Conv2d/Linear layers (%)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup (median latency ratio)")
    if sparse:
        axes[1].legend(fontsize=7, loc="best")
    else:
        axes[0].text(0.5, 0.5, "no sparsert timings", transform=axes[0].transAxes, ha="center")
    fig.suptitle(f"sparsert {__version__}, {cpu_model()}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
