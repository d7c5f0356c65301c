"""Hot code: Numba kernels on raw arrays. Knows nothing of torch or nn.Module."""
import numba

# Start Numba's threading layer now: the conv kernels call get_thread_id() even in their serial
# twins, which crashed (SIGSEGV) when loaded from the disk cache before any parallel launch.
numba.get_num_threads()

from .conv import (GRID_BORDER, PADDING, shift_table, grid_conv_par, grid_conv_seq, gather_columns_par, gather_columns_seq, im2col_table, pack_input_par, pack_input_seq,
                   private_gather_gemm_par, private_gather_gemm_seq,
                   sparse_conv_par, sparse_conv_seq, tap_offsets)
from .layout import rows_to_features_par, rows_to_features_seq
from .lanes import LANE_VECTOR, channel_blocks, lane_count, lane_offsets, to_lanes_par, to_lanes_seq
from .linear import (bsr_spmm_par, bsr_spmm_seq, csr_matvec_par, csr_matvec_seq, csr_spmm_blocked_par,
                     csr_spmm_blocked_seq, csr_spmm_dispatch, csr_spmm_par, csr_spmm_seq)
from .sliced import sliced_matvec_par, sliced_matvec_seq
from .taps import TAP_MAPS, phase_columns, tap_conv_par, tap_conv_seq, tap_order
from ._jit import AVX512
from .unrolled import UnrolledCode, address_words, conv_functions as unrolled_conv_functions
from .unrolled import available as unrolled_available, tap_masks as unrolled_tap_masks
from .strip import PAIR_CELL_SIZES, STRIP_VECTORS, VECTOR_BYTES, WIDE_VECTORS, row_strip
from . import executor as _executor


def _drop_stale_cache():
    """Numba keys each cached kernel on its own source file's timestamp, but kernels inline code from the
    other files here (the strip micro-kernel, the conv kernels inside the plan executor): after an edit
    to one file the others' cached machine code still holds the old version, silently. So the cache
    is stamped with a hash of all kernel sources and emptied when they change. (A pip install rewrites
    every file and never needed this; an edited checkout does.)"""
    import hashlib
    import os
    import pathlib
    sources = sorted(pathlib.Path(__file__).parent.glob("*.py"))
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sources)).hexdigest()
    try:
        cache_dir = pathlib.Path(_executor.run_plan._cache._cache_path)
        stamp = cache_dir / "sparsert-kernels.sha256"
        if stamp.is_file() and stamp.read_text() == digest:
            return
        modules = {p.stem for p in sources}
        for entry in cache_dir.glob("*.nb[ic]"):
            if entry.name.split(".")[0] in modules:
                entry.unlink(missing_ok=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, stamp)
    except (AttributeError, OSError):  # no cache locator or a read-only cache: nothing to keep consistent
        pass


_drop_stale_cache()

__all__ = [
    "GRID_BORDER", "PADDING", "grid_conv_par", "grid_conv_seq", "gather_columns_par", "gather_columns_seq", "im2col_table", "pack_input_par", "pack_input_seq", "shift_table",
    "private_gather_gemm_par", "private_gather_gemm_seq",
    "sparse_conv_par", "sparse_conv_seq", "tap_offsets",
    "bsr_spmm_par", "bsr_spmm_seq", "csr_matvec_par", "csr_spmm_blocked_par", "csr_spmm_blocked_seq", "csr_matvec_seq", "csr_spmm_dispatch", "csr_spmm_par",
    "csr_spmm_seq", "LANE_VECTOR", "channel_blocks", "lane_count", "lane_offsets", "to_lanes_par", "to_lanes_seq", "rows_to_features_par", "rows_to_features_seq", "sliced_matvec_par", "sliced_matvec_seq", "TAP_MAPS", "phase_columns", "tap_conv_par", "tap_conv_seq", "tap_order", "PAIR_CELL_SIZES", "STRIP_VECTORS", "VECTOR_BYTES", "WIDE_VECTORS", "row_strip", "AVX512",
    "UnrolledCode", "address_words", "unrolled_conv_functions", "unrolled_available", "unrolled_tap_masks",
]
