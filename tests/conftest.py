"""Shared fixtures and helpers for the core sparsert test suite.

Helpers:
  prune_model(model, method, amount)   apply torch.nn.utils.prune to every Conv2d/Linear
  checkpoint_form(model, form)          the live model, or its state dict, or its pruning baked in
  assert_close(actual, expected)        fp32-tight comparison, atol scaled by the result's magnitude
  sparse_guard(model) / run_sparse(...) prove that sparse kernels ran: per-call ops.CALLS deltas, and
                                        torch.nn.functional.linear/conv2d and dense weight rebuilding
                                        raise while inside a sparse module's forward
"""
from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import sparsert
import sparsert.checkpoint
import sparsert.models
from sparsert import ops
from sparsert.modules import _SparseBase

SEED = 20240611
DENSITIES = (0.0, 0.01, 0.1, 0.5, 1.0)
BATCHES = (0, 1, 7, 64)
BACKENDS = ("numba", "torch")
PRUNABLE = (nn.Conv2d, nn.Linear)


# ------------------------------------------------------------------------------------ seeding
@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(SEED)
    yield


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


# ------------------------------------------------------------------------------------ tolerances
def assert_close(actual, expected, rtol: float = 1e-5, atol: float = 1e-5, **kw):
    """torch.testing.assert_close with atol scaled by max(1, |expected|max): sums reordered by the
    sparse kernels differ by a few ulps of the largest partial sums, not of each output."""
    assert isinstance(actual, torch.Tensor), f"expected a tensor result, got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    if not np.isfinite(scale):
        scale = 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * max(1.0, scale), **kw)


# ------------------------------------------------------------------------------------ random sparse data
def random_mask(shape, density: float, gen: torch.Generator | None = None, block: tuple[int, int] | None = None):
    """0/1 float mask with exactly round(density * n) kept entries (or kept blocks when `block`)."""
    if block is None:
        n = int(np.prod(shape))
        keep = int(round(density * n))
        perm = torch.randperm(n, generator=gen)
        mask = torch.zeros(n)
        mask[perm[:keep]] = 1.0
        return mask.reshape(shape)
    rows, cols = shape
    br, bc = block
    assert rows % br == 0 and cols % bc == 0
    coarse = random_mask((rows // br, cols // bc), density, gen)
    return coarse.repeat_interleave(br, 0).repeat_interleave(bc, 1)


def sparse_matrix(shape, density: float, gen: torch.Generator | None = None, block=None, dtype=torch.float32):
    """Random normal matrix with a random mask applied; no accidental zeros among kept entries."""
    values = torch.randn(shape, generator=gen, dtype=torch.float64)
    values = values + torch.sign(values) * 0.1  # keep kept entries away from 0
    return (values * random_mask(shape, density, gen, block).double()).to(dtype)


def set_sparse_weight(module: nn.Module, density: float, gen: torch.Generator | None = None) -> nn.Module:
    with torch.no_grad():
        w = module.weight
        module.weight.copy_(sparse_matrix(tuple(w.shape), density, gen).to(w.dtype))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen).to(w.dtype))
    return module


def force_conv_algorithm(monkeypatch, algorithm: str) -> None:
    """Make the numba backend use one conv algorithm on any input: 'direct' (packed-input sparse conv)
    or 'im2col' (im2col + CSR SpMM, normally for small feature maps)."""
    assert algorithm in ("direct", "im2col")
    if hasattr(ops, "uses_im2col"):
        monkeypatch.setattr(ops, "uses_im2col", lambda *args, **kwargs: algorithm == "im2col")
    elif algorithm == "im2col":
        pytest.skip("this sparsert has no im2col conv path")


# ------------------------------------------------------------------------------------ pruning helpers
def prunable(model: nn.Module, types=PRUNABLE):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, types)]


def prune_model(model: nn.Module, method: str, amount: float, *, name: str = "weight", types=PRUNABLE,
                skip=()) -> nn.Module:
    """Prune every Conv2d/Linear of `model` in place (live reparametrization: weight_orig/weight_mask).

    method: 'global_l1' (one global L1 threshold), 'l1' (per-layer L1), 'random' (per-layer random),
    'ln_structured' (per-layer L2 over output channels)."""
    layers = [(n, m) for n, m in prunable(model, types) if n not in skip]
    if method == "global_l1":
        prune.global_unstructured([(m, name) for _, m in layers], pruning_method=prune.L1Unstructured,
                                  amount=amount)
    elif method == "l1":
        for _, m in layers:
            prune.l1_unstructured(m, name, amount)
    elif method == "random":
        for _, m in layers:
            prune.random_unstructured(m, name, amount)
    elif method == "ln_structured":
        for _, m in layers:
            prune.ln_structured(m, name, amount, n=2, dim=0)
    else:
        raise ValueError(f"unknown pruning method {method!r}")
    return model


def is_live_pruned(model: nn.Module) -> bool:
    return any(isinstance(h, prune.BasePruningMethod) for m in model.modules() for h in m._forward_pre_hooks.values())


def bake(model: nn.Module) -> nn.Module:
    """Copy of a live pruned model with the masks baked in by prune.remove (zeros in plain weights)."""
    baked = sparsert.checkpoint.copy_model(model)
    for module in baked.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    assert not is_live_pruned(baked)
    return baked


def checkpoint_form(model: nn.Module, form: str, make_plain, tmp_path=None) -> nn.Module:
    """The pruned `model` in one of the checkpoint forms, as a model ready for sparsify:

    'live'        the live model itself (weight_orig/weight_mask + forward pre-hooks)
    'state_dict'  its state dict (weight_orig/weight_mask keys) loaded by sparsert.load_pruned into
                  a fresh plain architecture from make_plain()
    'file'        the same, through torch.save and a checkpoint path
    'removed'     zeros baked in via prune.remove"""
    if form == "live":
        assert is_live_pruned(model)
        return model
    if form in ("state_dict", "file"):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        assert any(k.endswith("_orig") for k in state) and any(k.endswith("_mask") for k in state)
        target = make_plain()
        if form == "file":
            path = tmp_path / "pruned.pt"
            torch.save(state, path)
            state = path
        out = sparsert.load_pruned(target, state)
        assert out is target and not is_live_pruned(target)
        return target
    if form == "removed":
        return bake(model)
    raise ValueError(form)


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, snapshot: dict[str, torch.Tensor]):
    now = model.state_dict()
    assert list(now) == list(snapshot), "state_dict keys changed"
    for key, value in snapshot.items():
        assert now[key].dtype == value.dtype and now[key].shape == value.shape, key
        if not torch.equal(now[key], value):  # NaN != NaN: compare NaN positions and the rest exactly
            torch.testing.assert_close(now[key], value, rtol=0, atol=0, equal_nan=True, msg=f"{key} changed")


def randomize_batchnorm(model: nn.Module, gen: torch.Generator | None = None) -> nn.Module:
    """Non-trivial BN affine parameters (running stats come from train-mode forwards)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model


def warm_batchnorm(model: nn.Module, make_input, steps: int = 3) -> nn.Module:
    """A few train-mode forwards with grad enabled (running stats move; live pruned weights become
    non-leaf tensors computed by the hook), then eval mode."""
    model.train()
    for _ in range(steps):
        out = model(make_input())
        out = out.logits if hasattr(out, "logits") else out
        out.sum().backward()
    model.zero_grad(set_to_none=True)
    return model.eval()


# ------------------------------------------------------------------------------------ proving sparse kernels ran
class _Tripwire(Exception):
    pass


class SparseGuard:
    """What one guarded forward did: per sparse-module call, which ops.CALLS counters moved (`records`),
    and the CALLS delta over the whole forward (`total`)."""

    def __init__(self):
        self.records: list[tuple[str, Counter, tuple | None]] = []
        self.total: Counter = Counter()
        self.depth = 0


def _weight_arg(args, kwargs):
    w = kwargs.get("weight", args[1] if len(args) > 1 else None)
    return w if isinstance(w, torch.Tensor) else None


@contextlib.contextmanager
def sparse_guard(model: nn.Module):
    """While `model` runs: F.linear/F.conv1d/F.conv2d raise when called inside a sparse module's forward,
    or anywhere with a weight that is not a parameter/buffer of one of the model's own dense modules
    (a dense fallback rebuilding a sparse layer's weight); rebuilding a sparse layer's dense weight
    (`dense_weight_2d`, behind `.weight`) raises too. Forward hooks on the sparse modules record the
    kernel launches of each call. (A whole-network plan runs no submodule forwards: then only `total`
    moves.)"""
    guard = SparseGuard()
    sparse_modules = [m for m in model.modules() if isinstance(m, _SparseBase)]
    # storages, not tensors: MultiheadAttention passes slices of in_proj_weight to F.linear
    allowed = {t.untyped_storage().data_ptr() for m in model.modules() if not isinstance(m, _SparseBase)
               for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))}
    originals = {"linear": F.linear, "conv2d": F.conv2d, "conv1d": F.conv1d}

    def trap(name):
        original = originals[name]

        def wrapped(*args, **kwargs):
            if guard.depth:
                raise _Tripwire(f"dense F.{name} called inside a sparse module's forward")
            weight = _weight_arg(args, kwargs)
            if weight is not None and weight.untyped_storage().data_ptr() not in allowed:
                raise _Tripwire(f"dense F.{name} with a weight that belongs to no dense layer of the model "
                                f"(a sparse layer's weight rebuilt densely?)")
            return original(*args, **kwargs)
        return wrapped

    def trapped_dense(self):
        raise _Tripwire(f"{self.layer_name}: dense weight rebuilt during a forward")

    handles = []
    snapshots = {}

    def pre(mod, args):
        guard.depth += 1
        snapshots[id(mod), guard.depth] = Counter(ops.CALLS)

    def post(mod, args, output):
        before = snapshots.pop((id(mod), guard.depth))
        guard.depth -= 1
        delta = Counter(ops.CALLS)
        delta.subtract(before)
        x = args[0] if args else None
        guard.records.append((getattr(mod, "layer_name", type(mod).__name__), +delta,
                              tuple(x.shape) if isinstance(x, torch.Tensor) else None))

    for m in sparse_modules:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    patches = [(F, "linear", trap("linear")), (F, "conv2d", trap("conv2d")), (F, "conv1d", trap("conv1d")),
               (_SparseBase, "dense_weight_2d", trapped_dense)]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    start = Counter(ops.CALLS)
    try:
        for obj, attr, new in patches:
            setattr(obj, attr, new)
        yield guard
    finally:
        for obj, attr, old in saved:
            setattr(obj, attr, old)
        for h in handles:
            h.remove()
        total = Counter(ops.CALLS)
        total.subtract(start)
        guard.total = +total


def _matches(key, kernel):
    return key in ((kernel,) if isinstance(kernel, str) else tuple(kernel))


def assert_kernels_ran(guard: SparseGuard, backend: str | None = None, expected_calls: int | None = None,
                       kernel=None):
    """Sparse kernels of the expected backend ran: either one whole-network plan launch, or one counted
    launch per sparse module call (a conv on an empty batch launches none on the numba path).
    `kernel`: the expected CALLS key (or a tuple of acceptable keys) of each per-module launch."""
    assert guard.total or guard.records, "no sparse kernel ran and no sparse module was called"
    if backend is not None:
        wrong = [k for k in guard.total if not k.startswith(backend + ".")]
        assert not wrong, f"kernels of another backend ran: {wrong} (expected {backend})"
    if guard.total.get("numba.plan"):
        # A whole-network plan ran (one Numba call for the network; building it on the first call with
        # a new input shape may run the layers eagerly once, which launches their own kernels too).
        assert guard.total["numba.plan"] == 1, dict(guard.total)
        return
    assert guard.records, f"CALLS moved by {dict(guard.total)} but no sparse module forward ran"
    if expected_calls is not None:
        assert len(guard.records) == expected_calls, [r[0] for r in guard.records]
    for name, delta, shape in guard.records:
        total = sum(delta.values())
        empty = shape is not None and 0 in shape
        if empty and total == 0:
            continue
        assert total == 1, f"{name}: expected one sparse kernel launch, CALLS moved by {dict(delta)}"
        (key,) = delta
        if backend is not None:
            assert key.startswith(backend + "."), f"{name}: ran {key}, expected the {backend} backend"
        if kernel is not None:
            assert _matches(key, kernel), f"{name}: ran {key}, expected {kernel}"


def run_sparse(model: nn.Module, *args, backend: str | None = None, kernel=None,
               expected_calls: int | None = None, warmup: bool = False, **kwargs):
    """model(*args) under sparse_guard (no grad), then assert_kernels_ran; returns the output.
    `warmup`: call once before, unguarded (a whole model's first call with an input shape may build
    and cache an execution plan, which runs the layers an extra time)."""
    if warmup:
        with torch.no_grad():
            model(*args, **kwargs)
    with torch.no_grad(), sparse_guard(model) as guard:
        out = model(*args, **kwargs)
    assert_kernels_ran(guard, backend=backend, kernel=kernel, expected_calls=expected_calls)
    return out


def count_sparse(model: nn.Module) -> int:
    return sum(isinstance(m, _SparseBase) for m in model.modules())


# ------------------------------------------------------------------------------------ small reference models
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-style CNN: BN after every conv, residual blocks, a strided projection shortcut."""

    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_mlp():
    return sparsert.models.mlp((48, 96, 64, 10))
