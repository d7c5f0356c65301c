"""Hot code: Numba kernels on raw arrays. Knows nothing of torch or nn.Module."""
from .conv import gather_columns_par, gather_columns_seq, im2col_table, pack_input_par, pack_input_seq, sparse_conv_par, sparse_conv_seq
from .linear import bsr_spmm_par, bsr_spmm_seq, csr_matvec_par, csr_matvec_seq, csr_spmm_par, csr_spmm_seq

__all__ = [
    "gather_columns_par", "gather_columns_seq", "im2col_table", "pack_input_par", "pack_input_seq", "sparse_conv_par", "sparse_conv_seq",
    "bsr_spmm_par", "bsr_spmm_seq", "csr_matvec_par", "csr_matvec_seq", "csr_spmm_par", "csr_spmm_seq",
]
