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
import numpy as np
import torch
import torch.nn.functional as F

from . import kernels

BACKENDS = ("auto", "numba", "torch")
NUMBA_DTYPES = (torch.float32, torch.float64)
CALLS: Counter = Counter()

# Below this many multiply-adds a parallel launch costs more than it saves (measured, bench/RESULTS.md).
PARALLEL_MIN_WORK = 32_768
# Column-blocked SpMM (`column_blocks`): at batch >= 64 (full 4-vector strips), when a row averages at
# least 16 nonzeros per block. Each block's input slab is 64 KB (256 columns x 64 floats): near the 48 KB
# L1, where the whole 4096 x 64 input (1 MB) sits in L2. Linear(4096, 4096) at batch 64: 30% dense 1.3x,
# 10% 1.03-1.2x (module / prototype); at 2% a block row holds ~5 nonzeros and the extra out load and
# store per block made it 1.6x slower. 192-column blocks ran within noise of 256 on the MLP at 90%
# (sixth session); 128 leaves a 10%-dense row under 16 nonzeros per block.
BLOCKED_MIN_BATCH = 64
BLOCKED_WIDTH = 256
BLOCKED_MIN_SEGMENT = 16
# Batch 1 runs the sliced matvec (one 16-lane gather a step) where AVX-512's gathers are fast, else the CSR row
# loop: on Zen 3 (AVX2), the sliced one ran 1.4-1.9x slower (2% and 10% dense, one and two threads).
SLICED_MATVEC = kernels.AVX512
# Output-grid floats one conv work item accumulates: CONV_TILE_MAX (8 KB, in L1) unless the tile's
# slice of all packed input channels (~CONV_TILE_L2 floats) would overflow L2. Per-op timings of
# CIFAR ResNet18 at batch 64: 2048 beat 512 by 1.5x (per-tile zeroing and epilogue amortised).
CONV_TILE_MAX = 2048
CONV_TILE_L2 = 256 * 1024


def use_column_blocks(nnz: int, n_rows: int, n_cols: int, n_batch: int) -> bool:
    """Whether a CSR SpMM of this shape runs column-blocked (see BLOCKED_*)."""
    n_blocks = -(-n_cols // BLOCKED_WIDTH)
    return n_batch >= BLOCKED_MIN_BATCH and n_blocks > 1 and nnz >= BLOCKED_MIN_SEGMENT * n_rows * n_blocks


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


_UNSIGNED = {np.dtype(np.int16): np.uint16, np.dtype(np.int32): np.uint32, np.dtype(np.int64): np.uint64}


def unsigned_view(t: torch.Tensor) -> np.ndarray:
    """Unsigned view of a non-negative index tensor: Numba adds a wraparound check to every signed
    index, which made the kernels 2-3x slower."""
    a = t.detach().numpy()
    return a.view(_UNSIGNED[a.dtype])


def _parallel(work: int) -> bool:
    return work >= PARALLEL_MIN_WORK and numba.get_num_threads() > 1


# ----------------------------------------------------------------------------------------- Linear
def linear_numba(x2d, layer):
    """y[B, out] = x2d[B, in] @ W.T + bias with W in CSR/BSR arrays. Returns a transposed view
    of a feature-major [out, B] buffer, so a following sparse Linear reads it without a copy."""
    indptr, indices, values, bias = layer.numba_arrays()
    n_batch = x2d.shape[0]
    if n_batch == 1 and layer.format == "csr":
        # NumPy allocates and views here: each torch call on this path cost ~1 us, against a 2%-dense
        # Linear(4096, 4096)'s ~50 us product.
        out = np.empty((1, layer.out_features), values.dtype)
        x = x2d.detach().contiguous().numpy()[0]
        par = _parallel(values.shape[0])
        sliced = layer.sliced_arrays() if SLICED_MATVEC else None
        if sliced is not None:  # 16 rows a slice, one gather a step; 1-byte column steps where they fit
            kernel = kernels.sliced_matvec_par if par else kernels.sliced_matvec_seq
            kernel(*sliced, bias, x, layer.relu, np.empty(sliced[3].shape[0], np.float32), out[0])
            CALLS["numba.sliced_matvec"] += 1
        else:
            kernel = kernels.csr_matvec_par if par else kernels.csr_matvec_seq
            kernel(indptr, indices, values, x, bias, layer.relu, out[0])
            CALLS["numba.csr_matvec"] += 1
        return torch.from_numpy(out)
    par = _parallel(values.size * n_batch)
    xt = _features_major(x2d, par)
    out = torch.empty(layer.out_features, n_batch, dtype=x2d.dtype)
    if layer.format == "csr" and use_column_blocks(values.size, layer.out_features, layer.in_features, n_batch):
        ptr, blocked_indices, blocked_values, n_blocks = layer.column_blocked_arrays(BLOCKED_WIDTH)
        kernel = kernels.csr_spmm_blocked_par if par else kernels.csr_spmm_blocked_seq
        kernel(ptr, blocked_indices, blocked_values, n_blocks, xt.detach().numpy(), bias, layer.relu, out.numpy())
        CALLS["numba.csr_spmm_blocked"] += 1
        return out.t()
    if layer.format == "csr":
        kernels.csr_spmm_dispatch(indptr, indices, values, xt.detach().numpy(), bias, out.numpy(), False,
                                  layer.relu, out.numpy(), par)
    else:
        kernel = kernels.bsr_spmm_par if par else kernels.bsr_spmm_seq
        kernel(indptr, indices, values, xt.detach().numpy(), bias, layer.relu, out.numpy())
    CALLS[f"numba.{layer.format}_spmm"] += 1
    return out.t()


def _features_major(x2d: torch.Tensor, parallel: bool) -> torch.Tensor:
    """x2d[B, F] as a contiguous [F, B] tensor: free when x2d is itself a transposed view of a previous
    sparse output; float32 rows through the register-tile transpose (4096 x 64: 0.3 ms in torch's
    `.t().contiguous()`, 0.03 ms here)."""
    if x2d.t().is_contiguous() or x2d.dtype != torch.float32:
        return x2d.t().contiguous()
    src = x2d.detach().contiguous()
    xt = torch.empty(src.shape[1], src.shape[0], dtype=src.dtype)
    transpose = kernels.rows_to_features_par if parallel else kernels.rows_to_features_seq
    transpose(src.numpy(), xt.numpy())
    return xt


def sparse_mm(weight: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """weight (torch CSR/BSR) @ dense. CUDA BSR in fp16/bf16 with blocks >= 16 goes through torch's
    Triton kernel (`bsr_dense_mm`), the fast GPU BSR path; everything else through torch.mm
    (cuSPARSE on CUDA, MKL on CPU)."""
    if weight.is_cuda and weight.layout == torch.sparse_bsr and weight.dtype in (torch.float16, torch.bfloat16) \
            and min(weight.values().shape[-2:]) >= 16 and _triton_bsr_dense_mm() is not None:
        CALLS["torch.triton_bsr_dense_mm"] += 1
        return _triton_bsr_dense_mm()(weight, dense.contiguous())
    return torch.mm(weight, dense)


def _triton_bsr_dense_mm():
    try:
        from torch.sparse._triton_ops import bsr_dense_mm
    except ImportError:  # torch built without Triton: torch.mm still handles CUDA BSR
        return None
    return bsr_dense_mm


def linear_torch(x2d, layer):
    """torch.sparse path (cuSPARSE or Triton on CUDA, MKL on CPU); the same code on both devices."""
    weight = layer.torch_weight()
    out = sparse_mm(weight, x2d.t().to(weight.dtype)).t()
    if layer.has_bias:
        out = out + layer.bias_or_zeros.to(weight.dtype)
    CALLS[f"torch.linear.{layer.format}"] += 1
    out = torch.relu(out) if layer.relu else out
    return out.to(x2d.dtype)


# ----------------------------------------------------------------------------------------- Conv2d
def conv_rows_per_tile(packed_rows: int, wq: int) -> int:
    """Grid rows per direct-conv work item (see CONV_TILE_MAX / CONV_TILE_L2)."""
    tile = min(CONV_TILE_MAX, max(128, CONV_TILE_L2 // packed_rows))
    return max(1, tile // wq)


def conv_geometry(height, width, pads, stride, dilation, kernel_size):
    """Output size, and the phase-grid size (hq, wq) of the packed input."""
    pad_t, pad_b, pad_l, pad_r = pads
    padded_h, padded_w = height + pad_t + pad_b, width + pad_l + pad_r
    out_h = (padded_h - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    out_w = (padded_w - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    hq = -(-padded_h // stride[0])
    wq = -(-padded_w // stride[1])
    return out_h, out_w, hq, wq


# im2col + CSR SpMM against the direct kernel. The direct kernel computes every cell of its padded grid
# (hq*wq per image, `waste` = hq*wq / (out_h*out_w) times the outputs); im2col computes only outputs but
# first gathers C*taps values per output pixel, costing about IM2COL_GATHER_COST multiply-adds each
# (per-op timings of CIFAR/torchvision ResNet18 plans at 90% and 98%, batch 1 and 64). So im2col wins when
#     nnz * pixels * (waste - 1) > IM2COL_GATHER_COST * C * taps * pixels,
# i.e. when out_channels * density * (waste - 1) > IM2COL_GATHER_COST: small maps (large waste) and
# denser layers. Outputs of at most IM2COL_MAX_PIXELS pixels always take im2col (the direct kernel's
# per-item costs dominate there).
IM2COL_GATHER_COST = 3.0
IM2COL_MAX_PIXELS = 16


def uses_im2col(n_img: int, out_h: int, out_w: int, hq: int, wq: int, out_channels: int, density: float,
                gather_cost: float | None = None) -> bool:
    """The cost model above; gather_cost replaces IM2COL_GATHER_COST (read at each call) where the other path
    is not the direct conv (plan.GRID_GATHER_COST)."""
    if n_img * out_h * out_w <= IM2COL_MAX_PIXELS:
        return True
    waste = hq * wq / (out_h * out_w)
    return out_channels * density * (waste - 1.0) > (IM2COL_GATHER_COST if gather_cost is None else gather_cost)


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
    if uses_im2col(n_img, out_h, out_w, hq, wq, layer.out_channels, layer.density):
        return _conv2d_im2col(x, layer, residual, relu, out, out_h, out_w)
    max_off = layer.max_dy * wq + layer.max_dx
    work = layer.nnz * n_img * hq * wq
    par = _parallel(work)
    cnhw = x.transpose(0, 1)
    if max_off == 0 and stride == (1, 1) and pads == (0, 0, 0, 0) and cnhw.is_contiguous():
        xq = cnhw.detach().reshape(cnhw.shape[0], -1)  # 1x1 conv on our own CNHW output: no packing at all
    else:
        xq = torch.empty(x.shape[1] * stride[0] * stride[1], packed_row_len(n_img * hq * wq + max_off), dtype=x.dtype)
        pack = kernels.pack_input_par if par else kernels.pack_input_seq
        flat, strides = flat_with_strides(x)
        pack(flat, strides, *x.shape, pads[0], pads[2], stride[0], stride[1], hq, wq, xq.numpy())
    rows_per_tile = conv_rows_per_tile(xq.shape[0], wq)
    # get_thread_id() can reach the pool size even after numba.set_num_threads() lowered the count
    scratch = torch.empty(numba.config.NUMBA_NUM_THREADS, packed_row_len(rows_per_tile * wq), dtype=x.dtype)
    has_residual = residual is not None
    out2d = out.view(layer.out_channels, -1)
    res = residual.detach().transpose(0, 1).reshape(layer.out_channels, -1) if has_residual else out2d
    kernel = kernels.sparse_conv_par if par else kernels.sparse_conv_seq
    indptr, _, _, _, _, values, bias = layer.numba_arrays()
    kernel(indptr, layer.tap_offsets(xq.shape[1], wq), values, xq.numpy(), hq, wq, bias, res.numpy(), has_residual,
           relu, rows_per_tile, scratch.numpy(), n_img, out_h, out_w, False, out2d.numpy())
    CALLS["numba.sparse_conv"] += 1
    return out.permute(1, 0, 2, 3)


def packed_row_len(length: int) -> int:
    """Row length (floats) for a buffer whose rows the strip kernel reads at one column offset: a whole
    number of cache lines, so rows start on a line when the buffer does (torch and the plan's arena
    allocate on 64-byte boundaries), and an odd number of them, so rows spread over all cache sets. At
    1024 floats (4 KB) every row's strip fell into the same L1/L2 sets: 1.5x slower im2col SpMM."""
    lines = -(-length // 16)
    return (lines + 1 - lines % 2) * 16


def flat_with_strides(x: torch.Tensor):
    """(flat NumPy array spanning x's storage from its first element, element strides (n, c, h, w)):
    lets the pack kernel read NCHW, CNHW, channels_last or sliced inputs without a copy."""
    x = x.detach()
    if any(st < 0 for st in x.stride()):
        x = x.contiguous()
    span = 1 + sum((size - 1) * st for size, st in zip(x.shape, x.stride())) if x.numel() else 1
    flat = torch.as_strided(x, (span,), (1,)).numpy()
    return flat, np.array(x.stride(), dtype=np.int64)


def _conv2d_im2col(x, layer, residual, relu, out, out_h, out_w):
    n_img, n_chan, height, width = x.shape
    pixels = n_img * out_h * out_w
    par = _parallel(layer.nnz * pixels)
    planes = x.detach().transpose(0, 1).contiguous().view(n_chan, -1)  # CNHW: free for our own outputs
    table = layer.im2col_table(n_img, height, width, out_h, out_w)
    cols = torch.empty(table.shape[0] * n_chan, packed_row_len(pixels), dtype=x.dtype)  # pixels used per row
    (kernels.gather_columns_par if par else kernels.gather_columns_seq)(planes.numpy(), table, cols.numpy(), False)
    indptr, indices, _, _, _, values, bias = layer.numba_arrays()
    out2d = out.view(layer.out_channels, pixels)
    has_residual = residual is not None
    res = residual.detach().transpose(0, 1).reshape(layer.out_channels, pixels).contiguous() if has_residual else out2d
    kernels.csr_spmm_dispatch(indptr, indices, values, cols.numpy(), bias, res.numpy(), has_residual, relu,
                              out2d.numpy(), par)
    CALLS["numba.im2col_conv"] += 1
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
    weight = layer.torch_weight()
    cols = F.unfold(x.to(weight.dtype), layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
    cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [C*kh*kw, N*L]
    out = sparse_mm(weight, cols)
    out = out.reshape(layer.out_channels, n_img, out_h, out_w).permute(1, 0, 2, 3)
    if layer.has_bias:
        out = out + layer.bias_or_zeros.to(weight.dtype).view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual.to(weight.dtype)
    CALLS[f"torch.conv.{layer.format}"] += 1
    out = torch.relu(out) if relu else out
    return out.to(x.dtype)
