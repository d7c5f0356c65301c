"""sparsert: run models pruned with torch.nn.utils.prune on sparse weights."""
from .checkpoint import load_pruned
from .convert import fold_batchnorm, format_report, report, sparsify
from .formats import BSR, CSR
from .modules import SparseConv2d, SparseLinear

__version__ = "0.1.0"
__all__ = ["BSR", "CSR", "SparseConv2d", "SparseLinear", "fold_batchnorm", "format_report", "load_pruned",
           "report", "sparsify", "__version__"]
