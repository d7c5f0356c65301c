"""Micro-benchmark settings: every engine gets the same thread count (SPARSERT_BENCH_THREADS, default 2).

torch (OpenMP/MKL) and Numba read it here, once, before any case runs; scipy.sparse is single-threaded.
"""
import os

import numba
import pytest
import torch

THREADS = min(int(os.environ.get("SPARSERT_BENCH_THREADS", "2")), numba.config.NUMBA_NUM_THREADS)


def pytest_configure(config):
    torch.set_num_threads(THREADS)
    numba.set_num_threads(THREADS)


@pytest.hookimpl(optionalhook=True)  # pytest-benchmark's hook; absent without the plugin
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["threads"] = THREADS
    machine_info["torch"] = torch.__version__
    machine_info["numba"] = numba.__version__
