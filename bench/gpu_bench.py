"""GPU bench (issue: the GPU path): sparse vs cuBLAS dense vs torch.compile dense, fp32 and fp16.

Cases: Linear 4096x4096 and torchvision resnet18 (32x32 input), pruned to 90% and 98% (L1), batch 64.
Run on a machine with a CUDA GPU:  python bench/gpu_bench.py --out gpu_results.json
Timings are CUDA-event medians after warm-up; speedup = dense median / sparse median, same run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys

import torch
import torchvision
from torch.nn.utils import prune

import sparsert
from sparsert.io import write_json


def cuda_median_ms(fn, repeats=50, warmup=10):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def build(model_name, sparsity):
    torch.manual_seed(0)
    if model_name == "linear4096":
        model = torch.nn.Sequential(torch.nn.Linear(4096, 4096))
        shape = (4096,)
    else:
        model = torchvision.models.resnet18(num_classes=10)
        shape = (3, 32, 32)
    model.eval()
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            prune.l1_unstructured(m, "weight", sparsity)
            prune.remove(m, "weight")
    return model, shape


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="gpu_results.json")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile dense baseline")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; nothing measured", file=sys.stderr)
        return 2
    rows = []
    for model_name in ("linear4096", "resnet18"):
        for sparsity in (0.9, 0.98):
            for dtype in (torch.float32, torch.float16):
                model, shape = build(model_name, sparsity)
                sparse = sparsert.sparsify(model).to("cuda", dtype)
                dense = model.to("cuda", dtype)
                x = torch.randn(args.batch_size, *shape, device="cuda", dtype=dtype)
                with torch.no_grad():
                    torch.testing.assert_close(sparse(x).float(), dense(x).float(), rtol=5e-2, atol=5e-2)
                    row = dict(model=model_name, sparsity=sparsity, dtype=str(dtype).replace("torch.", ""),
                               batch=args.batch_size, dense_ms=cuda_median_ms(lambda: dense(x)),
                               sparse_ms=cuda_median_ms(lambda: sparse(x)))
                    if not args.no_compile:
                        compiled = torch.compile(dense)
                        row["compile_dense_ms"] = cuda_median_ms(lambda: compiled(x))
                row["speedup_vs_cublas"] = row["dense_ms"] / row["sparse_ms"]
                if "compile_dense_ms" in row:
                    row["speedup_vs_compile"] = row["compile_dense_ms"] / row["sparse_ms"]
                rows.append(row)
                print(json.dumps(row))
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                sparsert=sparsert.__version__, python=platform.python_version())
    write_json(args.out, dict(meta=meta, results=rows), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
