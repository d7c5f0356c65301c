"""sparsert against DeepSparse, case by case, turn by turn: ratios that this VM's slow phases cannot skew.

RUN BY HAND, with DeepSparse installed in its own venv (its licence allows evaluation only; it is
never a dependency, and this script never imports it: it starts bench/deepsparse_compare.py --serve
under that venv's Python and talks to it over a pipe):

    /work/venv/bin/python bench/deepsparse_interleaved.py --deepsparse-python /work/ds-venv/bin/python \\
        --out bench/interleaved_results.json

Why: `sparsert bench` and bench/deepsparse_compare.py run minutes apart, and on this VM an engine's
median moves up to 1.5x between such runs (bench/RESULTS.md). Here both engines stay loaded and take
turns on the same case, `--rounds` times, `--seconds` each, the first turn alternating; each round's
ratio (DeepSparse median / sparsert median, measured seconds apart) is paired, and the table gives
the median of those paired ratios besides each engine's fastest turn.

Models, pruning, inputs and sparsert's model are those of `sparsert bench` (same seed): the ONNX file
is exported afresh into --onnx-dir, sparsert runs `sparsify(model, example_inputs=x)`, and both
outputs are checked against dense torch before any timing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import torch

from sparsert import bench
from sparsert.convert import sparsify
from sparsert.io import write_json
from sparsert.timing import cpu_model, measure

WORKER = Path(__file__).resolve().parent / "deepsparse_compare.py"
DS_TOLERANCE = 1e-3  # as ONNX Runtime's check in sparsert.bench


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepsparse-python", required=True, help="Python of the venv that has deepsparse 1.8")
    p.add_argument("--onnx-dir", help="where the ONNX files go (default: a temporary folder)")
    p.add_argument("--models", nargs="+", choices=list(bench.ALL_MODELS), default=list(bench.MODELS))
    p.add_argument("--prunings", nargs="+", choices=list(bench.PRUNINGS), default=list(bench.PRUNINGS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4, help="turns per engine and case (default: 4)")
    p.add_argument("--seconds", type=float, default=1.5, help="timed seconds per turn (default: 1.5)")
    p.add_argument("--repeats", type=int, default=10, help="minimum timed calls per turn (default: 10)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="interleaved_results.json", help="JSON file to write")
    return p.parse_args(argv)


class DeepSparseWorker:
    """bench/deepsparse_compare.py --serve in the other venv: one JSON request and reply a line."""

    def __init__(self, python: str, onnx_dir: Path, threads: int):
        env = dict(os.environ, NM_DISABLE_ANALYTICS="1", NM_VERSION_CHECK="false")
        self.proc = subprocess.Popen([python, str(WORKER), str(onnx_dir), "--serve", "--num-cores", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.hello = self._reply("start")

    def _reply(self, what: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the DeepSparse worker exited during {what} (exit code {self.proc.poll()}); "
                               f"its messages are above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"DeepSparse worker, {what}: {reply['error']}")
        return reply

    def time(self, what: str, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply(what)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def run_case(worker, model, spec, name: str, pruning: str, onnx_file: str, bs: int, args, tmp: Path) -> dict:
    """Checks, then `args.rounds` alternating turns of each engine on one case."""
    x = bench.case_input(spec.input_shape, bs, args.seed)
    what = f"{name} {pruning} bs {bs}"
    with torch.no_grad():
        expected = model(x)
        sparse = sparsify(model, example_inputs=x)
        close, err, scale = bench.compare(sparse(x), expected, bench.RTOL)
    if not close:
        raise RuntimeError(f"{what}: sparsert output differs from torch (max abs error {err:.3g}, scale {scale:.3g})")
    x_path, y_path = tmp / "x.npy", tmp / "y.npy"
    np.save(x_path, x.numpy())
    turn = dict(file=onnx_file, batch_size=bs, input=str(x_path), seconds=args.seconds, repeats=args.repeats,
                warmup=args.warmup)
    first = worker.time(what, **turn, output=str(y_path))
    close, ds_err, _ = bench.compare(torch.from_numpy(np.load(y_path)), expected, DS_TOLERANCE)
    if not close:
        raise RuntimeError(f"{what}: DeepSparse output differs from torch (max abs error {ds_err:.3g})")
    ds_turns, sp_turns, serial_shares = [], [], []
    with torch.no_grad():
        for r in range(args.rounds):
            order = ("ds", "sp") if r % 2 else ("sp", "ds")
            for engine in order:
                time.sleep(0.2)  # the other engine's worker threads stop spinning
                if engine == "ds":
                    ds_turns.append(worker.time(what, **turn))
                else:
                    before = bench.split_calls(sparse, x)
                    sp_turns.append(measure(lambda: sparse(x), batch_size=bs, repeats=args.repeats,
                                            min_time=args.seconds, warmup=args.warmup))
                    serial_shares.append(bench.serial_share(before, bench.split_calls(sparse, x)))
    paired = [d["median"] / s["median"] for d, s in zip(ds_turns, sp_turns)]
    choice = getattr(sparse, "sparsert_choice", {}).get("choice")
    return dict(model=name, pruning=pruning, batch_size=bs, num_cores=args.threads, auto_choice=choice,
                deepsparse_compile_seconds=first.get("compile_seconds"), deepsparse_max_abs_error=ds_err,
                deepsparse_medians=[d["median"] for d in ds_turns], sparsert_medians=[s["median"] for s in sp_turns],
                sparsert_serial_shares=serial_shares,
                paired_ratios=paired, median_paired_ratio=float(np.median(paired)),
                best_deepsparse=min(d["median"] for d in ds_turns), best_sparsert=min(s["median"] for s in sp_turns))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="sparsert-interleaved-") as tmp:
        onnx_dir = Path(args.onnx_dir or tmp)
        onnx_dir.mkdir(parents=True, exist_ok=True)
        worker = DeepSparseWorker(args.deepsparse_python, onnx_dir, args.threads)
        try:
            print(f"{'model':<15} {'pruning':<13} {'bs':>3} {'DeepSparse ms':>13} {'sparsert ms':>11} "
                  f"{'paired ratio (range)':>24} {'auto':>6}", flush=True)
            for name in args.models:
                for pruning in args.prunings:
                    model = bench.build_case(name, pruning, args.seed)
                    if model is None:
                        continue
                    spec = bench.ALL_MODELS[name]
                    onnx_file = f"{name}-{pruning}.onnx"
                    bench.export_onnx(model, spec.input_shape, str(onnx_dir / onnx_file))
                    for bs in args.batch_sizes:
                        rec = run_case(worker, model, spec, name, pruning, onnx_file, bs, args, Path(tmp))
                        results.append(rec)
                        ratios = f"{rec['median_paired_ratio']:.2f}x ({min(rec['paired_ratios']):.2f}-" \
                                 f"{max(rec['paired_ratios']):.2f})"
                        print(f"{name:<15} {pruning:<13} {bs:>3} {rec['best_deepsparse']:>13.3f} "
                              f"{rec['best_sparsert']:>11.3f} {ratios:>24} {rec['auto_choice'] or '-':>6}", flush=True)
        finally:
            worker.close()
    doc = dict(benchmark="bench/deepsparse_interleaved.py", date=datetime.datetime.now().astimezone().isoformat(
                   timespec="seconds"),
               machine=dict(cpu=cpu_model(), cores=os.cpu_count(), platform=platform.platform()),
               versions=dict(bench.versions(), deepsparse=worker.hello.get("version")),
               settings={k: v for k, v in vars(args).items() if k != "out"}, results=results)
    write_json(args.out, doc)
    met = sum(r["median_paired_ratio"] >= 1 for r in results)
    print(f"{met} of {len(results)} cases at or above DeepSparse (median paired ratio); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
