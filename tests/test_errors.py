"""Bad input gets a clear error (the right type, naming the layer / key / file) and changes nothing."""
import pickle
import re

import numpy as np
import pytest
import torch
from torch import nn

import sparsert
from sparsert import SparseConv2d, SparseLinear
from sparsert.checkpoint import read_checkpoint
from sparsert.formats import CSR

from conftest import (SmallResNet, assert_state_equal, is_live_pruned, prune_model, small_mlp, sparse_matrix,
                      state_snapshot)


def _live_snapshot(model):
    return (state_snapshot(model), model.training,
            {n: list(m._forward_pre_hooks.values()) for n, m in model.named_modules()},
            {n: type(m) for n, m in model.named_modules()})


def _assert_unchanged(model, snap):
    state, training, hooks, types = snap
    assert_state_equal(model, state)
    assert model.training == training
    assert {n: list(m._forward_pre_hooks.values()) for n, m in model.named_modules()} == hooks
    assert {n: type(m) for n, m in model.named_modules()} == types


def _sparse_pair(gen, backend="auto"):
    lin = nn.Linear(16, 8)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    for m in (lin, conv):
        with torch.no_grad():
            m.weight.copy_(sparse_matrix(tuple(m.weight.shape), 0.3, gen))
    return (SparseLinear.from_dense(lin, backend=backend, layer_name="head.fc"),
            SparseConv2d.from_dense(conv, backend=backend, layer_name="features.0"))


# ------------------------------------------------------------------------------------ mask shape
def test_state_dict_mask_shape_mismatch(gen):
    model = small_mlp()
    prune_model(model, "l1", 0.5)
    state = model.state_dict()
    state["2.weight_mask"] = torch.ones(64, 48)  # weight_orig is 64x96
    target = small_mlp()
    before = state_snapshot(target)
    with pytest.raises(ValueError, match=re.escape("mask '2.weight_mask' has shape (64, 48) but its weight "
                                                   "'2.weight_orig' has shape (64, 96)")):
        sparsert.load_pruned(target, state)
    assert_state_equal(target, before)


def _live_model_with_bad_mask():
    model = small_mlp()
    prune_model(model, "l1", 0.9)
    model[2].weight_mask = torch.ones(64, 1)  # broadcasts in the hook, but is not the weight's shape
    model.train()
    return model


def test_live_model_mask_shape_mismatch():
    model = _live_model_with_bad_mask()
    snap = _live_snapshot(model)
    with pytest.raises(ValueError, match=r"weight_mask shape \(64, 1\) differs from weight_orig shape \(64, 96\)"):
        sparsert.sparsify(model)
    _assert_unchanged(model, snap)


def test_live_model_mask_shape_error_names_the_layer():
    with pytest.raises(ValueError, match=r"^2: |'2'|layer 2\b"):
        sparsert.sparsify(_live_model_with_bad_mask())


def _nan_model():
    model = small_mlp()
    prune_model(model, "l1", 0.9)
    with torch.no_grad():
        model[4].weight_orig[0, 0] = float("nan")
    return model


@pytest.mark.parametrize("make", [_live_model_with_bad_mask, _nan_model], ids=["bad-mask", "nan-weight"])
def test_sparsify_inplace_error_changes_nothing(make):
    model = make()
    model.train()
    snap = _live_snapshot(model)
    with pytest.raises(ValueError):
        sparsert.sparsify(model, inplace=True)
    _assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------ wrong checkpoint
def test_checkpoint_from_another_architecture(tmp_path):
    target = SmallResNet()
    before = state_snapshot(target)
    path = tmp_path / "mlp.pt"
    mlp = small_mlp()
    prune_model(mlp, "l1", 0.5)
    torch.save(mlp.state_dict(), path)
    with pytest.raises(ValueError) as info:
        sparsert.load_pruned(target, path)
    msg = str(info.value)
    assert str(path) in msg and "SmallResNet" in msg and "another architecture" in msg
    assert "missing keys" in msg and "'stem.weight'" in msg
    assert "unexpected keys" in msg and "'0.weight'" in msg
    assert_state_equal(target, before)


def test_checkpoint_missing_and_unexpected_keys():
    source = SmallResNet()
    prune_model(source, "l1", 0.5)
    state = source.state_dict()
    del state["fc.bias"]
    state["fc.extra"] = torch.zeros(1)
    target = SmallResNet()
    before = state_snapshot(target)
    with pytest.raises(ValueError, match=r"1 missing keys \['fc\.bias'\], 1 unexpected keys \['fc\.extra'\]"):
        sparsert.load_pruned(target, state)
    assert_state_equal(target, before)


def test_checkpoint_wrong_shapes():
    source = SmallResNet(width=8)
    prune_model(source, "l1", 0.5)
    target = SmallResNet(width=16)
    before = state_snapshot(target)
    with pytest.raises(ValueError, match=r"'stem\.weight' has shape \(8, 3, 3, 3\), SmallResNet expects "
                                         r"\(16, 3, 3, 3\)"):
        sparsert.load_pruned(target, source.state_dict())
    assert_state_equal(target, before)
    with pytest.raises(ValueError, match="has shape"):
        sparsert.load_pruned(target, source.state_dict(), strict=False)
    assert_state_equal(target, before)


class _NotWeights:
    def __init__(self):
        self.payload = torch.ones(2)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("content", ["custom-object", "garbage-bytes", "truncated", "python-pickle",
                                     "not-a-state-dict"])
def test_corrupt_or_unsafe_checkpoint_file(content, tmp_path):
    path = tmp_path / f"{content}.pt"
    if content == "custom-object":
        torch.save({"model": _NotWeights(), "w": torch.ones(1)}, path)
    elif content == "garbage-bytes":
        path.write_bytes(b"\x00not a checkpoint at all" * 10)
    elif content == "truncated":
        torch.save({"w": torch.ones(100)}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif content == "python-pickle":
        path.write_bytes(pickle.dumps(_NotWeights()))
    else:
        torch.save([1, 2, 3], path)
    target = small_mlp()
    before = state_snapshot(target)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        sparsert.load_pruned(target, path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_checkpoint(path)
    assert_state_equal(target, before)


def test_weights_only_refuses_to_run_pickled_code(tmp_path):
    """A malicious pickle must not execute: weights_only=True refuses the REDUCE of an arbitrary callable."""
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    marker.unlink(missing_ok=True)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        sparsert.load_pruned(small_mlp(), path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["missing-file", "missing-dir", "directory"])
def test_missing_checkpoint_path(kind, tmp_path):
    path = {"missing-file": tmp_path / "nope.pt", "missing-dir": tmp_path / "no" / "such.pt",
            "directory": tmp_path}[kind]
    target = small_mlp()
    before = state_snapshot(target)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        sparsert.load_pruned(target, path)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(str(path))
    assert_state_equal(target, before)


# ------------------------------------------------------------------------------------ non-finite weights
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_non_finite_weight_from_dense(kind, value):
    dense = nn.Linear(8, 4) if kind == "linear" else nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        dense.weight.view(-1)[3] = value
    before = state_snapshot(dense)
    cls = SparseLinear if kind == "linear" else SparseConv2d
    with pytest.raises(ValueError, match=r"^blocks\.7: weight contains NaN or Inf"):
        cls.from_dense(dense, layer_name="blocks.7")
    assert_state_equal(dense, before)


@pytest.mark.parametrize("where", ["kept", "pruned-position"])
def test_non_finite_weight_in_model(where):
    model = SmallResNet()
    prune_model(model, "l1", 0.9)
    mask = model.layer1.conv2.weight_mask
    idx = (mask != 0).nonzero()[0] if where == "kept" else (mask == 0).nonzero()[0]
    with torch.no_grad():
        model.layer1.conv2.weight_orig[tuple(idx)] = float("nan")
    snap = _live_snapshot(model)
    with pytest.raises(ValueError, match=r"layer1\.conv2: weight contains NaN or Inf"):
        sparsert.sparsify(model)
    _assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------ bad forward inputs
@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("bad", ["list", "ndarray", "none", "int"])
def test_non_tensor_input(bad, backend, gen):
    lin, conv = _sparse_pair(gen, backend)
    for layer, name, shape in ((lin, "head.fc", (2, 16)), (conv, "features.0", (1, 3, 5, 5))):
        x = {"list": np.zeros(shape).tolist(), "ndarray": np.zeros(shape, np.float32), "none": None, "int": 3}[bad]
        with pytest.raises(TypeError, match=rf"^{re.escape(name)}: expected a torch.Tensor input, got"):
            layer(x)


@pytest.mark.parametrize("backend", ["auto", "numba", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int64, torch.bool], ids=str)
def test_wrong_dtype_input(dtype, backend, gen):
    lin, conv = _sparse_pair(gen, backend)
    for layer, name, shape in ((lin, "head.fc", (2, 16)), (conv, "features.0", (1, 3, 5, 5))):
        with pytest.raises(TypeError, match=rf"^{re.escape(name)}: .*{str(dtype).replace('torch.', '')}"):
            layer(torch.zeros(shape, dtype=dtype))


def test_wrong_dtype_input_after_sparsify_names_the_layer(gen):
    model = small_mlp()
    prune_model(model, "l1", 0.9)
    sparse = sparsert.sparsify(model)
    with pytest.raises(TypeError, match=r"^0: input dtype torch.float64 does not match the layer's weights "
                                        r"\(torch.float32\)"):
        sparse(torch.zeros(2, 48, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_wrong_feature_or_channel_count(backend, gen):
    lin, conv = _sparse_pair(gen, backend)
    with pytest.raises(ValueError, match=r"^head\.fc: input has 15 features, layer expects 16"):
        lin(torch.zeros(2, 15))
    with pytest.raises(ValueError, match=r"^head\.fc: input has 2 features, layer expects 16"):
        lin(torch.zeros(16, 2))
    with pytest.raises(ValueError, match=r"^features\.0: input has 4 channels, layer expects 3"):
        conv(torch.zeros(1, 4, 5, 5))
    with pytest.raises(ValueError, match=r"^features\.0: input has 5 channels, layer expects 3"):
        conv(torch.zeros(1, 5, 5, 3))  # channels-last *shape* is not NCHW
    with pytest.raises(ValueError, match=r"^features\.0: expected a 3 or 4-D input"):
        conv(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"^features\.0: expected a 3 or 4-D input"):
        conv(torch.zeros(1, 1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"^head\.fc: expected a"):
        lin(torch.zeros(()))


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_input_smaller_than_kernel(backend):
    conv = SparseConv2d.from_dense(nn.Conv2d(2, 3, 5), backend=backend, layer_name="c")
    with pytest.raises(ValueError, match=r"^c: input .*smaller than the dilated kernel"):
        conv(torch.zeros(1, 2, 3, 8))


def test_input_on_another_device(gen):
    lin, conv = _sparse_pair(gen)
    with pytest.raises(ValueError, match=r"^head\.fc: input is on meta but the layer's weights are on cpu"):
        lin(torch.zeros(2, 16, device="meta"))
    with pytest.raises(ValueError, match=r"^features\.0: input is on meta"):
        conv(torch.zeros(1, 3, 5, 5, device="meta"))


# ------------------------------------------------------------------------------------ bad options
def test_unknown_backend(gen):
    model = small_mlp()
    snap = _live_snapshot(model)
    for call in (lambda: sparsert.sparsify(model, backend="cuda"),
                 lambda: SparseLinear.from_dense(nn.Linear(4, 4), backend="mkl"),
                 lambda: SparseConv2d.from_dense(nn.Conv2d(1, 1, 1), backend="Numba"),
                 lambda: SparseLinear(CSR.from_dense(np.eye(3, dtype=np.float32)), backend="")):
        with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'numba', 'torch'\)"):
            call()
    _assert_unchanged(model, snap)


def test_invalid_padding_mode():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    conv.padding_mode = "mirror"  # nn.Conv2d validates only in __init__
    with pytest.raises(NotImplementedError, match="padding_mode 'mirror' is not supported"):
        SparseConv2d.from_dense(conv, layer_name="c")
    fmt = CSR.from_dense(np.ones((3, 18), np.float32))
    with pytest.raises(NotImplementedError, match=r"^c: padding_mode 'symmetric'"):
        SparseConv2d(fmt, None, in_channels=2, kernel_size=3, padding_mode="symmetric", layer_name="c")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_numba_backend_forced_on_reduced_precision(dtype, gen):
    lin, conv = _sparse_pair(gen, "numba")
    lin.to(dtype)
    conv.to(dtype)
    with pytest.raises(NotImplementedError, match=r"^head\.fc: the numba backend runs float32/float64 CPU tensors"):
        lin(torch.zeros(2, 16, dtype=dtype))
    with pytest.raises(NotImplementedError, match=r"^features\.0: the numba backend"):
        conv(torch.zeros(1, 3, 5, 5, dtype=dtype))


def test_other_bad_options(gen):
    model = small_mlp()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="min_sparsity must lie in"):
            sparsert.sparsify(model, min_sparsity=bad)
    lin = nn.Linear(20, 12)
    with pytest.raises(ValueError, match="format must be"):
        SparseLinear.from_dense(lin, format="coo")
    with pytest.raises(ValueError, match="does not tile"):
        SparseLinear.from_dense(lin, format="bsr8")
    with pytest.raises(TypeError, match="^x: SparseLinear.from_dense expects nn.Linear, got Conv2d"):
        SparseLinear.from_dense(nn.Conv2d(1, 1, 1), layer_name="x")
    with pytest.raises(TypeError, match="SparseConv2d.from_dense expects nn.Conv2d, got Linear"):
        SparseConv2d.from_dense(lin)
    fmt = CSR.from_dense(np.ones((3, 10), np.float32))
    with pytest.raises(ValueError, match="weight has 10 columns, expected in_channels"):
        SparseConv2d(fmt, None, in_channels=2, kernel_size=3)
    with pytest.raises(ValueError, match="padding='same' requires stride 1"):
        SparseConv2d(CSR.from_dense(np.ones((3, 18), np.float32)), None, in_channels=2, kernel_size=3, stride=2,
                     padding="same")
    assert not is_live_pruned(model)


def test_bad_input_to_a_sparsified_model_names_the_layer():
    """Through sparsify's result (fused graph, execution plan where supported) the layer errors surface."""
    mlp = small_mlp()
    prune_model(mlp, "l1", 0.9)
    sparse_mlp = sparsert.sparsify(mlp)
    cnn = SmallResNet()
    prune_model(cnn, "l1", 0.9)
    sparse_cnn = sparsert.sparsify(cnn.eval())
    for _ in range(2):  # and again, once any plan for the good shape is cached
        with torch.no_grad():
            sparse_mlp(torch.zeros(2, 48))
            sparse_cnn(torch.zeros(2, 3, 8, 8))
        with pytest.raises(ValueError, match=r"^0: input has 47 features, layer expects 48"):
            sparse_mlp(torch.zeros(2, 47))
        with pytest.raises(ValueError, match=r"^stem: input has 4 channels, layer expects 3"):
            sparse_cnn(torch.zeros(2, 4, 8, 8))
        with pytest.raises(TypeError, match=r"^0: input dtype torch.float64 does not match"):
            sparse_mlp(torch.zeros(2, 48, dtype=torch.float64))
        with pytest.raises(TypeError, match=r"^stem: expected a torch.Tensor input, got list"):
            sparse_cnn([[0.0]])
