"""Hot code: Numba kernels on raw arrays. Knows nothing of torch or nn.Module."""
import numba

# Start Numba's threading layer now: the conv kernels call get_thread_id() even in their serial
# twins, which crashed (SIGSEGV) when loaded from the disk cache before any parallel launch.
numba.get_num_threads()

from .conv import (GRID_BORDER, PADDING, grid_conv_par, grid_conv_seq, gather_columns_par, gather_columns_seq, im2col_table, pack_input_par, pack_input_seq,
                   sparse_conv_par, sparse_conv_seq, tap_offsets)
from .lanes import LANE_VECTOR, channel_block_ptr, lane_count, lane_offsets
from .linear import (bsr_spmm_par, bsr_spmm_seq, csr_matvec_par, csr_matvec_seq, csr_spmm_dispatch, csr_spmm_par,
                     csr_spmm_seq)
from .strip import STRIP_VECTORS, VECTOR_BYTES, row_strip

__all__ = [
    "GRID_BORDER", "PADDING", "grid_conv_par", "grid_conv_seq", "gather_columns_par", "gather_columns_seq", "im2col_table", "pack_input_par", "pack_input_seq",
    "sparse_conv_par", "sparse_conv_seq", "tap_offsets",
    "bsr_spmm_par", "bsr_spmm_seq", "csr_matvec_par", "csr_matvec_seq", "csr_spmm_dispatch", "csr_spmm_par",
    "csr_spmm_seq", "LANE_VECTOR", "channel_block_ptr", "lane_count", "lane_offsets", "STRIP_VECTORS", "VECTOR_BYTES", "row_strip",
]
