"""sparsert: run models pruned with torch.nn.utils.prune on sparse weights."""
from .checkpoint import load_pruned
from .convert import fold_batchnorm, format_report, report, sparsify
from .formats import BSR, CSR
from .io import load, save
from .modules import SparseConv2d, SparseLinear

__version__ = "0.1.0"
__all__ = ["BSR", "CSR", "SparseConv2d", "SparseLinear", "fold_batchnorm", "format_report", "load_pruned",
           "report", "sparsify", "load", "save", "__version__"]
