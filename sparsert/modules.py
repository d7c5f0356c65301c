"""nn.Modules that hold CSR/BSR weights: SparseLinear and SparseConv2d.

Sparse arrays live in buffers, so `.to(device)`, `.to(dtype)`, `.half()` move and convert them
with the model. `forward` validates the input, then hands off to `sparsert.ops`.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .formats import BSR, CSR, choose_format, column_blocks, sliced_ell
from .kernels import im2col_table, tap_offsets


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _host_copy(t):
    """CPU copy for conversion: float64 stays float64, fp16/bf16 go to fp32 (NumPy has no bf16)."""
    if t is None:
        return None
    t = t.detach().cpu()
    return t if t.dtype == torch.float64 else t.float()


def _check_finite(weight: torch.Tensor, layer: str) -> None:
    # Refuse rather than guess: a NaN at a pruned position is NaN in dense (0 * NaN) but absent in sparse.
    if not torch.isfinite(weight).all():
        raise ValueError(f"{layer}: weight contains NaN or Inf; sparsert refuses to convert non-finite weights")


class _SparseBase(nn.Module):
    """Buffers: values, indices, indptr (+ bias). Format is 'csr' or 'bsr'."""

    def _init_sparse(self, fmt: CSR | BSR, bias: torch.Tensor | None, backend: str, layer_name: str):
        self.backend = ops.check_backend(backend)
        self.layer_name = layer_name
        self.format = "bsr" if isinstance(fmt, BSR) else "csr"
        self.block_shape = tuple(fmt.block_shape)
        self.sparse_shape = tuple(fmt.shape)
        self.register_buffer("values", torch.from_numpy(np.ascontiguousarray(fmt.data)))
        self.register_buffer("indices", torch.from_numpy(np.ascontiguousarray(fmt.indices)))
        self.register_buffer("indptr", torch.from_numpy(np.ascontiguousarray(fmt.indptr)))
        self.has_bias = bias is not None
        b = bias.detach().clone() if bias is not None else torch.zeros(fmt.shape[0], dtype=self.values.dtype)
        self.register_buffer("bias_or_zeros", b.to(self.values.dtype))
        self._torch_cache = (None, None)
        self._numba_cache = (None, None)

    # -- views of the stored weight
    def to_format(self) -> CSR | BSR:
        data, idx, ptr = (t.detach().cpu() for t in (self.values, self.indices, self.indptr))
        if data.dtype in (torch.float16, torch.bfloat16):
            data = data.float()
        cls = BSR if self.format == "bsr" else CSR
        return cls(data.numpy(), idx.numpy(), ptr.numpy(), self.sparse_shape, self.block_shape)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        rows, cols = self.sparse_shape
        return self.nnz / (rows * cols) if rows * cols else 0.0

    @property
    def bias(self):
        return self.bias_or_zeros if self.has_bias else None

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """dtype the torch backend multiplies in: the stored dtype, except fp16/bf16 on CPU, where
        torch's CSR/BSR matmul has no kernel (torch 2.15: 'addmm_out_sparse_csr_impl_mkl' not
        implemented for 'BFloat16'); there products run in fp32 and the result is cast back."""
        low = self.values.dtype in (torch.float16, torch.bfloat16)
        return torch.float32 if low and device.type == "cpu" else self.values.dtype

    def torch_weight(self) -> torch.Tensor:
        """The weight as a torch sparse CSR/BSR tensor on the buffers' device, in compute_dtype (cached)."""
        dtype = self.compute_dtype(self.values.device)
        key = (self.values.data_ptr(), self.values.dtype, self.values.device, self.indices.data_ptr())
        if self._torch_cache[0] != key:
            idx_dtype = torch.int32 if self.values.numel() < 2**31 else torch.int64
            ptr, idx = self.indptr.to(idx_dtype), self.indices.to(idx_dtype)
            make = torch.sparse_bsr_tensor if self.format == "bsr" else torch.sparse_csr_tensor
            with warnings.catch_warnings():  # "sparse CSR support is in beta" on every construction
                warnings.simplefilter("ignore", UserWarning)
                w = make(ptr, idx, self.values.to(dtype), self.sparse_shape, check_invariants=False)
            self._torch_cache = (key, w)
        return self._torch_cache[1]

    def numba_arrays(self) -> tuple:
        """(indptr, indices, values, bias) as NumPy views for the kernels (indices unsigned), plus the
        conv tap arrays; cached, since building them costs more than a small layer's whole product."""
        # Buffers straight from _buffers: nn.Module's __getattr__ costs ~0.8 us a lookup, a sixth of a
        # batch-1 call's whole overhead.
        buffers = self._buffers
        values = buffers["values"]
        key = (values.data_ptr(), values.dtype, buffers["bias_or_zeros"].data_ptr(), buffers["indices"].data_ptr())
        if self._numba_cache[0] != key:
            index_tensors = [self.indptr, self.indices] + [getattr(self, n) for n in ("tap_chan", "tap_dy", "tap_dx")
                                                          if hasattr(self, n)]
            arrays = tuple(ops.unsigned_view(t) for t in index_tensors)
            self._numba_cache = (key, arrays + (self.values.detach().numpy(), self.bias_or_zeros.detach().numpy()))
        return self._numba_cache[1]

    def column_blocked_arrays(self, width: int) -> tuple:
        """(ptr, indices, values, n_blocks): the CSR regrouped into `width`-column blocks
        (`formats.column_blocks`), ptr as uint32 (uint64 past 2^32 nonzeros); cached."""
        def build(indptr, indices, values):
            ptr, idx, vals, n_blocks = column_blocks(indptr, indices, values, self.sparse_shape[0], width)
            return ptr.astype(np.uint32 if ptr[-1] < 2**32 else np.uint64), idx, vals, n_blocks
        return self._derived_arrays(("column_blocks", width), build)

    def sliced_arrays(self):
        """The CSR as `formats.sliced_ell` arrays for the batch-1 matvec, or None where those cannot hold
        it, the weights are not float32 or the format is not CSR; cached."""
        def build(indptr, indices, values):
            usable = self.format == "csr" and values.dtype == np.float32
            return sliced_ell(indptr, indices, values, self.sparse_shape[0]) if usable else None
        return self._derived_arrays(("sliced",), build)

    def _derived_arrays(self, name: tuple, build):
        """build(indptr, indices, values) on the kernel arrays, cached per name. The result is a reordered
        copy, so the key holds the buffers' in-place versions as well as their addresses."""
        buffers = self._buffers
        key = tuple((t.data_ptr(), t._version) for t in (buffers["indptr"], buffers["indices"], buffers["values"]))
        cache = self.__dict__.setdefault("_derived_cache", {})
        if name not in cache or cache[name][0] != key:
            arrays = self.numba_arrays()
            cache[name] = (key, build(arrays[0], arrays[1], arrays[-2]))
        return cache[name][1]

    def dense_weight_2d(self) -> torch.Tensor:
        """Dense reconstruction of the stored (rows, cols) matrix; O(dense size), for compatibility only."""
        return self.torch_weight().to_dense()

    def effective_backend(self) -> str:
        """The backend a forward on the weights' own device and dtype uses."""
        if self.backend != "auto":
            return self.backend
        cpu_float = self.values.device.type == "cpu" and self.values.dtype in ops.NUMBA_DTYPES
        return "numba" if cpu_float else "torch"

    def _backend_for(self, x: torch.Tensor) -> str:
        return ops.resolve_backend(self.backend, x, self.layer_name)

    def _summary(self) -> str:
        block = f", block={self.block_shape[0]}x{self.block_shape[1]}" if self.format == "bsr" else ""
        return (f"density={self.density:.4f}, nnz={self.nnz}, format={self.format}{block}, "
                f"backend={self.backend}, dtype={str(self.values.dtype).replace('torch.', '')}")


class SparseLinear(_SparseBase):
    """y = x @ W.T + b with W stored as CSR or BSR. Accepts any leading batch dims, like nn.Linear."""

    def __init__(self, fmt: CSR | BSR, bias: torch.Tensor | None = None, *, backend: str = "auto",
                 relu: bool = False, layer_name: str = "SparseLinear"):
        super().__init__()
        self.out_features, self.in_features = fmt.shape
        self.relu = relu  # fused epilogue, set by the converter when a ReLU follows
        self._init_sparse(fmt, bias, backend, layer_name)

    @classmethod
    def from_dense(cls, module: nn.Linear, *, backend: str = "auto", format: str = "auto",
                   layer_name: str | None = None) -> "SparseLinear":
        name = layer_name or type(module).__name__
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name}: SparseLinear.from_dense expects nn.Linear, got {type(module).__name__}")
        weight, bias = _host_copy(module.weight), _host_copy(module.bias)
        _check_finite(weight, name)
        layer = cls(_make_format(weight, format), bias, backend=backend, layer_name=name)
        return layer.to(device=module.weight.device, dtype=module.weight.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dense weight, rebuilt on demand for code that reads `.weight` (e.g. MultiheadAttention)."""
        return self.dense_weight_2d()

    def forward(self, x):
        ops.check_input(x, self.layer_name, self._buffers["values"], tuple(range(1, 9)), -1, self.in_features,
                        "features")
        x2d = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self._backend_for(x) == "numba":
            y = ops.linear_numba(x2d, self)
        else:
            y = ops.linear_torch(x2d, self)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
                f"{self._summary()}" + (", relu=True" if self.relu else ""))


class SparseConv2d(_SparseBase):
    """Conv2d with W stored as CSR over (out_channels, in_channels * kh * kw).

    Groups are stored block-diagonally (absolute input channel per nonzero), so one kernel covers
    regular, grouped and depthwise convs. Padding modes other than 'zeros' pad with F.pad first,
    as nn.Conv2d itself does."""

    def __init__(self, fmt: CSR | BSR, bias: torch.Tensor | None, *, in_channels: int, kernel_size, stride=1,
                 padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros", backend: str = "auto",
                 relu: bool = False, layer_name: str = "SparseConv2d"):
        super().__init__()
        self.out_channels = fmt.shape[0]
        self.in_channels = in_channels
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.groups = groups
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise NotImplementedError(f"{layer_name}: padding_mode {padding_mode!r} is not supported")
        if fmt.shape[1] != in_channels * self.kernel_size[0] * self.kernel_size[1]:
            raise ValueError(f"{layer_name}: weight has {fmt.shape[1]} columns, expected in_channels * kh * kw = "
                             f"{in_channels * self.kernel_size[0] * self.kernel_size[1]}")
        if isinstance(self.padding, str) and self.padding == "same" and self.stride != (1, 1):
            raise ValueError(f"{layer_name}: padding='same' requires stride 1, as in nn.Conv2d")
        self.relu = relu
        self._init_sparse(fmt, bias, backend, layer_name)
        self._decode_taps()

    @property
    def pads(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) zero padding seen by the kernel (0 when padding_mode pads first)."""
        if self.padding_mode != "zeros":
            return (0, 0, 0, 0)
        return self._explicit_pads()

    def _explicit_pads(self):
        return explicit_pads(self.padding, self.kernel_size, self.dilation)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._decode_taps()  # the tap arrays derive from the indices just loaded

    def _decode_taps(self):
        """Per nonzero: packed-input channel (input channel x stride phase) and tap offset (dy, dx)."""
        self._numba_cache = (None, None)
        self.__dict__["_tap_offsets"] = {}
        if self.format != "csr":
            raise NotImplementedError(f"{self.layer_name}: SparseConv2d stores CSR weights")
        kh, kw = self.kernel_size
        (sh, sw), (dh, dw) = self.stride, self.dilation
        cols = self.indices.cpu().numpy().astype(np.int64)
        channel, tap = cols // (kh * kw), cols % (kh * kw)
        oy, ox = (tap // kw) * dh, (tap % kw) * dw
        chan = (channel * sh + oy % sh) * sw + ox % sw
        self.register_buffer("tap_chan", torch.from_numpy(chan.astype(np.int32)), persistent=False)
        self.register_buffer("tap_dy", torch.from_numpy((oy // sh).astype(np.int32)), persistent=False)
        self.register_buffer("tap_dx", torch.from_numpy((ox // sw).astype(np.int32)), persistent=False)
        self.max_dy = int(oy.max() // sh) if len(cols) else 0
        self.max_dx = int(ox.max() // sw) if len(cols) else 0

    def tap_offsets(self, row_len: int, wq: int) -> np.ndarray:
        """Per nonzero, its shift into the flat packed input (kernels.tap_offsets), cached per geometry."""
        cache = self.__dict__["_tap_offsets"]
        if (row_len, wq) not in cache:
            _, _, chan, dy, dx, _, _ = self.numba_arrays()
            cache[(row_len, wq)] = tap_offsets(chan, dy, dx, row_len, wq)
        return cache[(row_len, wq)]

    def im2col_table(self, n_img, height, width, out_h, out_w) -> np.ndarray:
        """Gather table for the im2col path (kernels.im2col_table), cached per input geometry."""
        key = (n_img, height, width)
        cache = self.__dict__.setdefault("_im2col_tables", {})
        if key not in cache:
            cache[key] = im2col_table(n_img, height, width, out_h, out_w, self.kernel_size, self.stride,
                                      self.dilation, self.pads)
        return cache[key]

    @classmethod
    def from_dense(cls, module: nn.Conv2d, *, backend: str = "auto", layer_name: str | None = None
                   ) -> "SparseConv2d":
        name = layer_name or type(module).__name__
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"{name}: SparseConv2d.from_dense expects nn.Conv2d, got {type(module).__name__}")
        weight, bias = _host_copy(module.weight), _host_copy(module.bias)
        _check_finite(weight, name)
        fmt = CSR.from_dense(block_diagonal(weight, module.groups))
        layer = cls(fmt, bias, in_channels=module.in_channels, kernel_size=module.kernel_size,
                    stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups,
                    padding_mode=module.padding_mode, backend=backend, layer_name=name)
        return layer.to(device=module.weight.device, dtype=module.weight.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dense [out, in/groups, kh, kw] weight, rebuilt on demand for code that reads `.weight`."""
        full = self.dense_weight_2d().reshape(self.out_channels, self.in_channels, *self.kernel_size)
        per_group_out, per_group_in = self.out_channels // self.groups, self.in_channels // self.groups
        parts = [full[g * per_group_out:(g + 1) * per_group_out, g * per_group_in:(g + 1) * per_group_in]
                 for g in range(self.groups)]
        return torch.cat(parts, 0)

    def forward(self, x, residual=None):
        ops.check_input(x, self.layer_name, self.values, (3, 4), -3, self.in_channels, "channels")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
            residual = residual.unsqueeze(0) if residual is not None else None
        if self.padding_mode != "zeros":
            t, b, l, r = self._explicit_pads()
            x = F.pad(x, (l, r, t, b), mode=self.padding_mode)
        if residual is not None and residual.shape != self.output_shape(x):
            # The fuser cannot see shapes: a broadcasting add stays a separate torch op.
            y = self._conv(x, None, False) + residual
            y = torch.relu(y) if self.relu else y
        else:
            y = self._conv(x, residual, self.relu)
        return y.squeeze(0) if unbatched else y

    def _conv(self, x, residual, relu):
        if self._backend_for(x) == "numba":
            return ops.conv2d_numba(x, self, residual, relu)
        return ops.conv2d_torch(x, self, residual, relu)

    def output_shape(self, x) -> torch.Size:
        out_h, out_w, _, _ = ops.conv_geometry(x.shape[2], x.shape[3], self.pads, self.stride, self.dilation,
                                               self.kernel_size)
        return torch.Size((x.shape[0], self.out_channels, out_h, out_w))

    def extra_repr(self) -> str:
        pad = self.padding if isinstance(self.padding, str) else tuple(self.padding)
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={pad}, dilation={self.dilation}, groups={self.groups}, bias={self.has_bias}, "
                f"{self._summary()}" + (", relu=True" if self.relu else ""))


def explicit_pads(padding, kernel_size, dilation) -> tuple[int, int, int, int]:
    """nn.Conv2d padding (int, pair, 'same', 'valid') as (top, bottom, left, right)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    kernel_size, dilation = _pair(kernel_size), _pair(dilation)
    if padding == "same":  # nn.Conv2d puts the odd extra pixel at the bottom/right
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        return (total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2)
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


def block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[out, in/g, kh, kw] grouped weight -> [out, in * kh * kw] with zeros outside each group's block."""
    out_ch, in_per_group, kh, kw = weight.shape
    out_per_group = out_ch // groups
    full = torch.zeros(out_ch, in_per_group * groups, kh, kw, dtype=weight.dtype)
    for g in range(groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        full[rows, g * in_per_group:(g + 1) * in_per_group] = weight[rows]
    return full.reshape(out_ch, -1)


def _make_format(weight_2d: torch.Tensor, format: str):
    if format == "auto":
        return choose_format(weight_2d)
    if format == "csr":
        return CSR.from_dense(weight_2d)
    if format.startswith("bsr"):
        block = int(format[3:] or 16)
        return BSR.from_dense(weight_2d, (block, block))
    raise ValueError(f"format must be 'auto', 'csr' or 'bsr<N>', got {format!r}")
