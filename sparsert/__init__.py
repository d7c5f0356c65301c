"""sparsert: run models pruned with torch.nn.utils.prune on sparse weights."""
from .formats import BSR, CSR
from .modules import SparseConv2d, SparseLinear

__version__ = "0.1.0"
__all__ = ["BSR", "CSR", "SparseConv2d", "SparseLinear", "__version__"]
