"""Ops: validate inputs, pick the backend, allocate outputs, call a kernel.

Two backends run the same sparse weights:
  numba  Numba kernels in `sparsert.kernels` (CPU, fp32/fp64)
  torch  torch.sparse CSR/BSR matmul (CPU or CUDA, any float dtype torch supports there)
`backend="auto"` picks numba for fp32/fp64 CPU tensors and torch otherwise.
`CALLS` counts kernel launches by name, so tests can prove which path ran.
"""
from __future__ import annotations

from collections import Counter

import numba
import torch
import torch.nn.functional as F

from . import kernels

BACKENDS = ("auto", "numba", "torch")
NUMBA_DTYPES = (torch.float32, torch.float64)
CALLS: Counter = Counter()

# Below this many multiply-adds a parallel launch costs more than it saves (measured, bench/RESULTS.md).
PARALLEL_MIN_WORK = 32_768
# Output-grid floats one conv work item accumulates: fits L1 with room for the input rows it reads.
CONV_TILE = 2048


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, x: torch.Tensor, layer: str) -> str:
    if backend == "auto":
        return "numba" if x.device.type == "cpu" and x.dtype in NUMBA_DTYPES else "torch"
    if backend == "numba" and (x.device.type != "cpu" or x.dtype not in NUMBA_DTYPES):
        raise NotImplementedError(
            f"{layer}: the numba backend runs float32/float64 CPU tensors, got {x.dtype} on {x.device}; "
            f"use backend='torch' or 'auto'")
    return backend


def check_input(x, layer: str, weight: torch.Tensor, ndims: tuple[int, ...], dim: int, expected: int, what: str):
    """TypeError/ValueError naming the layer when x is not what the layer expects."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: expected a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{layer}: expected a floating-point input, got {x.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(f"{layer}: input dtype {x.dtype} does not match the layer's weights ({weight.dtype}); "
                        f"cast the input or call .to({weight.dtype}) on the model")
    if x.device != weight.device:
        raise ValueError(f"{layer}: input is on {x.device} but the layer's weights are on {weight.device}")
    if x.dim() not in ndims:
        raise ValueError(f"{layer}: expected a {' or '.join(map(str, ndims))}-D input, got shape {tuple(x.shape)}")
    if x.shape[dim] != expected:
        raise ValueError(f"{layer}: input has {x.shape[dim]} {what}, layer expects {expected} "
                         f"(input shape {tuple(x.shape)})")


def _np(t: torch.Tensor):
    return t.detach().numpy()


def _parallel(work: int) -> bool:
    return work >= PARALLEL_MIN_WORK and numba.get_num_threads() > 1


# ----------------------------------------------------------------------------------------- Linear
def linear_numba(x2d, fmt, values, indices, indptr, bias, relu=False):
    """y[B, out] = x2d[B, in] @ W.T + bias with W in CSR/BSR arrays. Returns a transposed view
    of a feature-major [out, B] buffer, so a following sparse Linear reads it without a copy."""
    n_batch = x2d.shape[0]
    n_out = indptr.shape[0] - 1 if fmt == "csr" else (indptr.shape[0] - 1) * values.shape[1]
    if n_batch == 1 and fmt == "csr":
        x = x2d[0].contiguous()
        out = torch.empty(n_out, dtype=x.dtype)
        kernel = kernels.csr_matvec_par if _parallel(values.shape[0]) else kernels.csr_matvec_seq
        kernel(_np(indptr), _np(indices), _np(values), _np(x), _np(bias), relu, _np(out))
        CALLS["numba.csr_matvec"] += 1
        return out.unsqueeze(0)
    xt = x2d.t().contiguous()  # free when x2d is itself a transposed view of a previous output
    out = torch.empty(n_out, n_batch, dtype=x2d.dtype)
    name = "csr_spmm" if fmt == "csr" else "bsr_spmm"
    par = _parallel(values.numel() * n_batch)
    kernel = getattr(kernels, f"{name}_{'par' if par else 'seq'}")
    kernel(_np(indptr), _np(indices), _np(values), _np(xt), _np(bias), relu, _np(out))
    CALLS[f"numba.{name}"] += 1
    return out.t()


def linear_torch(x2d, weight_sparse, bias, relu=False):
    """torch.sparse path (cuSPARSE on CUDA, MKL on CPU); the same code on both devices."""
    out = torch.mm(weight_sparse, x2d.t()).t()
    if bias is not None:
        out = out + bias
    CALLS[f"torch.{weight_sparse.layout}".replace("torch.torch.", "torch.")] += 1
    return torch.relu(out) if relu else out


# ----------------------------------------------------------------------------------------- Conv2d
def conv_geometry(height, width, pads, stride, dilation, kernel_size):
    """Output size, and the phase-grid size (hq, wq) of the packed input."""
    pad_t, pad_b, pad_l, pad_r = pads
    padded_h, padded_w = height + pad_t + pad_b, width + pad_l + pad_r
    out_h = (padded_h - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    out_w = (padded_w - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    hq = -(-padded_h // stride[0])
    wq = -(-padded_w // stride[1])
    return out_h, out_w, hq, wq


def conv2d_numba(x, layer, residual=None, relu=False):
    """Direct sparse conv of NCHW-indexed x (any strides). Returns an NCHW view of a CNHW buffer,
    so the next sparse conv reads channel rows without a transpose."""
    n_img, _, height, width = x.shape
    stride, pads = layer.stride, layer.pads
    out_h, out_w, hq, wq = conv_geometry(height, width, pads, stride, layer.dilation, layer.kernel_size)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"{layer.layer_name}: input {height}x{width} is smaller than the dilated kernel")
    out = torch.empty(layer.out_channels, n_img, out_h, out_w, dtype=x.dtype)
    if n_img == 0:
        return out.permute(1, 0, 2, 3)
    max_off = layer.max_dy * wq + layer.max_dx
    work = layer.values.shape[0] * n_img * hq * wq
    par = _parallel(work)
    cnhw = x.transpose(0, 1)
    if max_off == 0 and stride == (1, 1) and pads == (0, 0, 0, 0) and cnhw.is_contiguous():
        xq = cnhw.reshape(cnhw.shape[0], -1)  # 1x1 conv on our own CNHW output: no packing at all
    else:
        xq = torch.empty(x.shape[1] * stride[0] * stride[1], n_img * hq * wq + max_off, dtype=x.dtype)
        pack = kernels.pack_input_par if par else kernels.pack_input_seq
        pack(_np(x), pads[0], pads[2], stride[0], stride[1], hq, wq, _np(xq))
    rows_per_tile = max(1, CONV_TILE // wq)
    scratch = torch.empty(numba.get_num_threads(), rows_per_tile * wq, dtype=x.dtype)
    has_residual = residual is not None
    res = residual.transpose(0, 1) if has_residual else out  # placeholder array when unused
    kernel = kernels.sparse_conv_par if par else kernels.sparse_conv_seq
    kernel(_np(layer.indptr), _np(layer.tap_chan), _np(layer.tap_dy), _np(layer.tap_dx), _np(layer.values),
           _np(xq), hq, wq, _np(layer.bias_or_zeros), _np(res), has_residual, relu, rows_per_tile,
           _np(scratch), _np(out))
    CALLS["numba.sparse_conv"] += 1
    return out.permute(1, 0, 2, 3)


def conv2d_torch(x, layer, residual=None, relu=False):
    """unfold (implicit im2col) + torch.sparse mm. Groups need no special case: the stored
    weight is block-diagonal over (out channel, in channel * tap)."""
    pad_t, pad_b, pad_l, pad_r = layer.pads
    if any(layer.pads):
        x = F.pad(x, (pad_l, pad_r, pad_t, pad_b))
    n_img = x.shape[0]
    out_h, out_w, _, _ = conv_geometry(x.shape[2], x.shape[3], (0, 0, 0, 0), layer.stride, layer.dilation,
                                       layer.kernel_size)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"{layer.layer_name}: input is smaller than the dilated kernel")
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)  # [N, C*kk, L]
    cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)
    out = torch.mm(layer.torch_weight(), cols)
    out = out.reshape(layer.out_channels, n_img, out_h, out_w).permute(1, 0, 2, 3)
    if layer.has_bias:
        out = out + layer.bias_or_zeros.view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual
    CALLS[f"torch.conv.{layer.format}"] += 1
    return torch.relu(out) if relu else out
