"""Checkpoint forms: read_checkpoint, apply_masks, load_pruned, strip_pruning, copy_model."""
import copy
import pathlib

import pytest
import torch
from torch import nn

import sparsert
from sparsert.checkpoint import (apply_masks, as_state_dict, copy_model, plain_keys, read_checkpoint,
                                 strip_pruning)

from conftest import (SmallResNet, assert_close, assert_state_equal, bake, count_sparse, is_live_pruned, prunable,
                      prune_model, randomize_batchnorm, run_sparse, small_mlp, state_snapshot, warm_batchnorm)


@pytest.fixture
def pruned_resnet(gen):
    model = SmallResNet()
    prune_model(model, "global_l1", 0.85)
    prune_model(model, "l1", 0.3, name="bias", types=(nn.Linear,))
    randomize_batchnorm(model, gen)
    warm_batchnorm(model, lambda: torch.randn(4, 3, 8, 8, generator=gen))
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


def _out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------------------------ load_pruned, every form
@pytest.mark.parametrize("source", ["live-state-dict", "baked-state-dict", "live-file", "baked-file", "str-path"])
@pytest.mark.parametrize("target", ["fresh", "live-pruned"])
def test_load_pruned_forms(pruned_resnet, source, target, tmp_path):
    model, x, ref = pruned_resnet
    state = bake(model).state_dict() if source.startswith("baked") else model.state_dict()
    if source.startswith("live"):
        assert any(k.endswith("weight_orig") for k in state) and any(k.endswith("bias_mask") for k in state)
    if source.endswith("file") or source == "str-path":
        path = tmp_path / "ckpt.pth"
        torch.save(state, path)
        state = str(path) if source == "str-path" else path
    dest = SmallResNet()
    if target == "live-pruned":  # a target that is itself mid-pruning: its hooks are baked away first
        prune_model(dest, "l1", 0.5)
    out = sparsert.load_pruned(dest, state)
    assert out is dest and not is_live_pruned(dest)
    assert_close(_out(dest, x), ref)
    for name, m in prunable(model):
        assert torch.equal(dest.get_submodule(name).weight, m.weight.detach())


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state_dict", "model", "module-prefix"])
def test_load_pruned_unwraps_common_wrappers(pruned_resnet, wrapper, tmp_path):
    model, x, ref = pruned_resnet
    state = model.state_dict()
    if wrapper == "module-prefix":  # DataParallel / DDP checkpoints
        ckpt = {f"module.{k}": v for k, v in state.items()}
    else:
        ckpt = {wrapper: state, "epoch": torch.tensor(3)} if wrapper != "model" else {"model": state}
    path = tmp_path / "wrapped.pt"
    torch.save(ckpt, path)
    dest = SmallResNet()
    sparsert.load_pruned(dest, path)
    assert_close(_out(dest, x), ref)


def test_load_pruned_then_sparsify(pruned_resnet, tmp_path):
    model, x, ref = pruned_resnet
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    sparse = sparsert.sparsify(sparsert.load_pruned(SmallResNet(), path))
    assert count_sparse(sparse) >= 4
    assert_close(run_sparse(sparse, x, backend="numba"), ref)


def test_load_pruned_non_strict_partial(pruned_resnet):
    model, x, _ = pruned_resnet
    state = {k: v for k, v in model.state_dict().items() if k.startswith("fc.")}
    dest = SmallResNet()
    before = state_snapshot(dest)
    sparsert.load_pruned(dest, state, strict=False)
    assert torch.equal(dest.fc.weight, model.fc.weight.detach()) and torch.equal(dest.fc.bias, model.fc.bias.detach())
    assert torch.equal(dest.stem.weight, before["stem.weight"])


# ------------------------------------------------------------------------------------ helpers
def test_read_checkpoint_is_weights_only(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, path)
    assert torch.equal(read_checkpoint(path)["w"], torch.ones(2))
    assert torch.equal(read_checkpoint(str(path))["w"], torch.ones(2))


def test_as_state_dict_rejects_non_state_dicts():
    with pytest.raises(ValueError, match="src: expected a state dict"):
        as_state_dict([torch.ones(1)], "src")
    with pytest.raises(ValueError, match="expected a state dict"):
        as_state_dict({"w": torch.ones(1), "step": 3})
    assert as_state_dict({"module.a": torch.ones(1), "module.b": torch.zeros(1)}).keys() == {"a", "b"}
    # only strip when every key has the prefix
    assert as_state_dict({"module.a": torch.ones(1), "b": torch.zeros(1)}).keys() == {"module.a", "b"}


def test_apply_masks():
    orig, mask = torch.randn(3, 4), (torch.rand(3, 4) > 0.5).float()
    out = apply_masks({"l.weight_orig": orig, "l.weight_mask": mask, "l.bias": torch.ones(3)})
    assert set(out) == {"l.weight", "l.bias"}
    assert torch.equal(out["l.weight"], orig * mask)
    with pytest.raises(ValueError, match="'l.weight_mask' has no matching 'l.weight_orig'"):
        apply_masks({"l.weight_mask": mask}, "src")
    with pytest.raises(ValueError, match="'l.weight_orig' has no matching 'l.weight_mask'"):
        apply_masks({"l.weight_orig": orig}, "src")
    bool_mask = apply_masks({"l.weight_orig": orig, "l.weight_mask": mask.bool()})
    assert torch.equal(bool_mask["l.weight"], orig * mask)


def test_strip_pruning_bakes_weight_bias_and_containers(gen):
    model = small_mlp()
    prune_model(model, "l1", 0.5)
    prune_model(model, "random", 0.5)  # PruningContainer
    prune_model(model, "l1", 0.5, name="bias")
    x = torch.randn(3, 48, generator=gen)
    ref = _out(model, x)
    weights = {n: m.weight.detach().clone() for n, m in prunable(model)}
    out = strip_pruning(model)
    assert out is model and not is_live_pruned(model)
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    for name, m in prunable(model):
        assert isinstance(m.weight, nn.Parameter) and torch.equal(m.weight.detach(), weights[name])
        assert 1 - torch.count_nonzero(m.weight).item() / m.weight.numel() == pytest.approx(0.75, abs=0.01)
    assert torch.equal(_out(model, x), ref)


def test_copy_model_after_forward_with_grad(gen):
    model = SmallResNet()
    prune_model(model, "l1", 0.8)
    model.train()
    model(torch.randn(2, 3, 8, 8, generator=gen)).sum().backward()  # weights are now non-leaf hook outputs
    assert not model.stem.weight.is_leaf
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)  # what copy_model exists to work around
    clone = copy_model(model)
    assert is_live_pruned(clone)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    assert torch.equal(_out(clone, x), _out(model, x))
    before = state_snapshot(model)
    with torch.no_grad():
        clone.stem.weight_orig.add_(1.0)
        clone.stem.weight_mask.zero_()
    assert_state_equal(model, before)  # independent storage


def test_plain_keys_of_live_model():
    model = small_mlp()
    prune_model(model, "l1", 0.5)
    prune_model(model, "l1", 0.5, name="bias")
    assert plain_keys(model) == {k: v.shape for k, v in small_mlp().state_dict().items()}


def test_load_pruned_accepts_pathlib_and_str_paths(tmp_path, gen):
    model = small_mlp()
    prune_model(model, "l1", 0.7)
    path = tmp_path / "nested dir" / "mlp ckpt.pt"
    path.parent.mkdir()
    torch.save(model.state_dict(), path)
    x = torch.randn(2, 48, generator=gen)
    for p in (path, str(path), pathlib.PurePath(path)):
        dest = small_mlp()
        sparsert.load_pruned(dest, p)
        assert torch.equal(_out(dest, x), _out(model, x))
