"""DeepSparse reference timings for the ONNX models that `sparsert.bench --export-onnx` writes.

RUN BY HAND ONLY, IN A SEPARATE VIRTUAL ENVIRONMENT. DeepSparse's license allows evaluation only:
it is never a dependency of sparsert, never installed by the project, and nothing else imports it.
This script imports it, and nothing of sparsert or torch (the venv needs neither):

    python3 -m venv /work/ds-venv
    /work/ds-venv/bin/pip install "deepsparse==1.8.0" onnxruntime onnx numpy
    /work/venv/bin/python -m sparsert.bench --export-onnx /tmp/dsbench --export-only   # project venv
    /work/ds-venv/bin/python bench/deepsparse_compare.py /tmp/dsbench --out bench/deepsparse_results.json

For each model in the folder's manifest.json and each batch size: deepsparse.compile_model(path,
batch_size, num_cores) (compile time kept apart), one timed first call, the output checked against
ONNX Runtime on the same input, then the same timing loop as sparsert.bench (median etc. in ms per
batch). ONNX Runtime (dense, same thread count) is timed too, before DeepSparse, as a same-moment
reference: both run in this one process, one engine at a time, each freed before the next.

With --serve it is instead the DeepSparse half of bench/deepsparse_interleaved.py, which starts it and
alternates it with sparsert case by case: one JSON request a line on stdin, one JSON reply a line on
stdout (see `serve`).
"""
from __future__ import annotations

import os

os.environ["NM_DISABLE_ANALYTICS"] = "1"  # before deepsparse is imported: no usage reporting,
os.environ["NM_VERSION_CHECK"] = "false"  # no version check over the network

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

CHECK_TOLERANCE = 1e-3  # relative, and absolute as a fraction of max |output|


def _load_timing():
    """sparsert/timing.py by path: the same timing loop as sparsert.bench, without importing sparsert
    (whose package imports torch, absent from this venv)."""
    path = Path(__file__).resolve().parent.parent / "sparsert" / "timing.py"
    spec = importlib.util.spec_from_file_location("sparsert_timing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_timing = _load_timing()
measure, PERCENTILES, cpu_model = _timing.measure, _timing.PERCENTILES, _timing.cpu_model


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def cpu_flags() -> list[str]:
    """The vector-ISA flags (avx512*, amx*) of /proc/cpuinfo: the figures depend on them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(x for x in line.split(":", 1)[1].split() if x.startswith(("avx512", "amx")))
    except OSError:
        pass
    return []


def check(actual, expected) -> tuple[bool, float]:
    err = float(np.abs(actual.astype(np.float64) - expected).max())
    scale = float(np.abs(expected).max())
    return bool(np.allclose(actual, expected, rtol=CHECK_TOLERANCE, atol=CHECK_TOLERANCE * scale + 1e-12)), err


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("onnx_dir", help="folder written by `python -m sparsert.bench --export-onnx DIR`")
    p.add_argument("--models", nargs="+", help="only these manifest files (e.g. mlp-per-layer-98.onnx)")
    p.add_argument("--batch-sizes", nargs="+", type=int, help="default: the manifest's")
    p.add_argument("--num-cores", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-onnxruntime", action="store_true", help="skip the ONNX Runtime check and timing")
    p.add_argument("--out", default="deepsparse_results.json", help="JSON file to write")
    p.add_argument("--serve", action="store_true", help="answer timing requests on stdin (for "
                                                        "bench/deepsparse_interleaved.py) instead")
    return p.parse_args(argv)


def serve(folder: Path, num_cores: int, requests=sys.stdin, replies=sys.stdout) -> int:
    """Answer one request a line: {"file", "batch_size", "input" (a .npy of the batch), "seconds", "warmup",
    "repeats", "output" (optional .npy path for the first call's result)}. The reply is a JSON line: the
    timing loop's fields, plus compile_seconds when this request compiled the engine. One engine is kept:
    a request for another (file, batch size) frees it and compiles the next. An empty line or EOF ends."""
    import deepsparse
    from deepsparse import compile_model

    key, engine = None, None
    print(json.dumps(dict(ready=True, version=deepsparse.__version__, numpy=np.__version__)), file=replies, flush=True)
    for line in requests:
        if not line.strip():
            break
        req = json.loads(line)
        reply = {}
        try:
            x = np.load(req["input"])
            if key != (req["file"], req["batch_size"]):
                engine, key = None, None
                gc.collect()
                engine, reply["compile_seconds"] = timed(lambda: compile_model(
                    str(folder / req["file"]), batch_size=req["batch_size"], num_cores=num_cores))
                key = (req["file"], req["batch_size"])
            if req.get("output"):
                np.save(req["output"], engine.run([x])[0])
            reply.update(measure(lambda: engine.run([x]), batch_size=req["batch_size"], repeats=req["repeats"],
                                 min_time=req["seconds"], warmup=req["warmup"]))
        except Exception as exc:  # reported to the driver, which names the case
            reply = dict(error=f"{type(exc).__name__}: {exc}")
        print(json.dumps(reply), file=replies, flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(Path(args.onnx_dir), args.num_cores)
    import deepsparse
    from deepsparse import compile_model

    ort = None
    if not args.no_onnxruntime:
        try:
            import onnxruntime as ort
        except ImportError:
            print("onnxruntime not installed: outputs unchecked, no ONNX Runtime timings", file=sys.stderr)

    folder = Path(args.onnx_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    entries = [m for m in manifest["models"] if not args.models or m["file"] in args.models]
    timing = dict(repeats=args.repeats, min_time=args.min_time, warmup=args.warmup)
    versions = {"deepsparse": deepsparse.__version__, "numpy": np.__version__, "python": platform.python_version(),
                "onnxruntime": ort.__version__ if ort else None}
    doc = dict(benchmark="bench/deepsparse_compare.py", engine="deepsparse", version=deepsparse.__version__,
               versions=versions, exported_by=manifest.get("created_by"), exporter_versions=manifest.get("versions"),
               date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               machine=dict(cpu=cpu_model(), cpu_flags=cpu_flags(), cores=os.cpu_count(), platform=platform.platform(),
                            loadavg_at_start=list(os.getloadavg())),
               settings=dict(num_cores=args.num_cores, **timing), notes=[], results=[])
    if os.getloadavg()[0] > 0.5:
        doc["notes"].append(f"1-minute load average {os.getloadavg()[0]:.2f} at start: other processes share the "
                            f"cores; medians of multi-threaded engines are inflated (see min and 10.0%)")
    print(f"{'file':<34} {'bs':>4} {'engine':>11} {'median ms':>10} {'p90 ms':>9} {'compile s':>9} "
          f"{'supported':>9} {'check':>8}")
    for entry in entries:
        path = str(folder / entry["file"])
        for bs in args.batch_sizes or entry["batch_sizes"]:
            x = np.random.default_rng(bs).standard_normal((bs, *entry["input_shape"]), dtype=np.float32)
            base = dict(model=entry["model"], pruning=entry["pruning"], sparsity=entry["sparsity"],
                        file=entry["file"], batch_size=bs, num_cores=args.num_cores, scenario="singlestream",
                        input_shapes=[list(x.shape)])
            expected = None
            if ort:
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.num_cores
                options.inter_op_num_threads = 1
                session, build_s = timed(lambda: ort.InferenceSession(path, options,
                                                                      providers=["CPUExecutionProvider"]))
                feed = {entry["input_name"]: x}
                out, first_s = timed(lambda: session.run(None, feed)[0])
                expected = out.astype(np.float64)
                rec = dict(base, engine="onnxruntime", version=ort.__version__, compile_seconds=build_s,
                           first_call_ms=first_s * 1e3, check="reference",
                           benchmark_result=measure(lambda: session.run(None, feed), batch_size=bs, **timing))
                doc["results"].append(rec)
                _print(rec)
                del session
                gc.collect()
            engine, compile_s = timed(lambda: compile_model(path, batch_size=bs, num_cores=args.num_cores))
            out, first_s = timed(lambda: engine.run([x])[0])
            rec = dict(base, engine="deepsparse", version=deepsparse.__version__, compile_seconds=compile_s,
                       first_call_ms=first_s * 1e3, engine_repr=repr(engine),
                       fraction_of_supported_ops=getattr(engine, "fraction_of_supported_ops", None),
                       cpu_avx_type=getattr(engine, "cpu_avx_type", None))
            if expected is not None:
                ok, rec["max_abs_error_vs_onnxruntime"] = check(out, expected)
                rec["check"] = "ok" if ok else "mismatch"
            else:
                rec["check"] = "unchecked"
            rec["benchmark_result"] = measure(lambda: engine.run([x]), batch_size=bs, **timing)
            doc["results"].append(rec)
            _print(rec)
            del engine
            gc.collect()
    doc["machine"]["loadavg_at_end"] = list(os.getloadavg())
    # Written beside, then renamed: a run cut short never leaves half a file (sparsert.io.write_json does the same,
    # but this venv has no sparsert).
    tmp = Path(f"{args.out}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0 if all(r["check"] in ("ok", "reference", "unchecked") for r in doc["results"]) else 1


def _print(r):
    b = r["benchmark_result"]
    supported = r.get("fraction_of_supported_ops")
    print(f"{r['file']:<34} {r['batch_size']:>4} {r['engine']:>11} {b['median']:>10.3f} {b['90.0%']:>9.3f} "
          f"{r['compile_seconds']:>9.2f} {('-' if supported is None else f'{supported:.2f}'):>9} {r['check']:>8}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
