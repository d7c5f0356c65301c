"""The timing loop every engine in the benches uses. NumPy and the standard library only: the
DeepSparse driver, which runs in a venv without torch, loads this file by path."""
from __future__ import annotations

import os
import platform
import time
from typing import Callable

import numpy as np

PERCENTILES = (10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9)


def fastest_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls of fn, after one warm-up call: what a kernel costs when nothing
    else gets in its way (bench scripts that compare kernels or ops, not engines)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(fn: Callable[[], object], *, repeats: int, min_time: float, warmup: int, batch_size: int) -> dict:
    """Time `fn` after `warmup` calls: at least `repeats` calls and `min_time` seconds.

    Returns DeepSparse's `benchmark_result` fields: latencies in ms per batch, items_per_sec."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    seconds_ran = time.perf_counter() - start
    ms = np.asarray(times) * 1e3
    result = dict(scenario="singlestream", items_per_sec=batch_size * len(times) / seconds_ran,
                  seconds_ran=seconds_ran, iterations=len(times), median=float(np.median(ms)),
                  mean=float(ms.mean()), std=float(ms.std()), min=float(ms.min()))
    result.update({f"{p:.1f}%": float(v) for p, v in zip(PERCENTILES, np.percentile(ms, PERCENTILES))})
    # Other processes on the cores stall every OpenMP barrier: keep the load seen, to spot noisy runs.
    result["loadavg_1min"] = os.getloadavg()[0]
    return result


def cpu_model() -> str:
    """The CPU's marketing name, for result files."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
