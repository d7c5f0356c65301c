"""sparsify on whole pruned models (every checkpoint form), BatchNorm folding, min_sparsity, report()."""
import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune
from torchvision.models.vision_transformer import VisionTransformer

import sparsert
from sparsert.formats import block_density
from sparsert.modules import _SparseBase

from conftest import (SmallResNet, assert_close, assert_kernels_ran, assert_state_equal, bake, checkpoint_form,
                      count_sparse, is_live_pruned, prunable, prune_model, randomize_batchnorm, run_sparse,
                      small_mlp, sparse_guard, sparse_matrix, state_snapshot, warm_batchnorm)

FORMS = ["live", "state_dict", "file", "removed"]


def _sparse_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, _SparseBase)}


def _bn_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def _assert_bn_folded(sparse, names, *, identity_required=False):
    """No BatchNorm2d left; where a BN was there is an nn.Identity (or, after epilogue fusion dropped
    the Identity from the traced graph, nothing)."""
    assert names, "the model has no BatchNorm to fold"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sparse.modules())
    for bn in names:
        try:
            module = sparse.get_submodule(bn)
        except AttributeError:
            assert not identity_required, f"{bn} vanished; expected nn.Identity in its place"
            continue
        assert isinstance(module, nn.Identity), f"{bn} is {type(module).__name__}, not folded"


def _check_converted(model, sparse, x, ref, *, rtol=1e-5, atol=1e-5):
    """Eval mode, no prune hooks, the sparse kernels ran (numba, fp32 CPU) and the output matches the
    pruned dense model: on the first call, on a repeated call (whole-network plan, if any, cached), and
    on the eager path (an input that requires grad never takes a plan); an earlier output stays valid
    after later calls."""
    assert not sparse.training
    modal = (nn.Dropout, nn.modules.batchnorm._BatchNorm)  # modules whose output depends on the mode
    assert all(not m.training for m in sparse.modules() if isinstance(m, modal))
    assert not is_live_pruned(sparse)
    with torch.no_grad():
        first = sparse(x)
    assert_close(first, ref, rtol=rtol, atol=atol)
    y = run_sparse(sparse, x, backend="numba", expected_calls=count_sparse(sparse))
    assert_close(y, ref, rtol=rtol, atol=atol)
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad(), sparse_guard(sparse) as guard:
        eager = sparse(xg)
    assert "numba.plan" not in guard.total
    assert_kernels_ran(guard, backend="numba", expected_calls=count_sparse(sparse))
    assert_close(eager.detach(), ref, rtol=rtol, atol=atol)
    with torch.no_grad():
        sparse(torch.randn_like(x))
    assert_close(first, ref, rtol=rtol, atol=atol)
    assert_close(y, ref, rtol=rtol, atol=atol)
    return y


def _make_pruned(make, method, amount, make_input, gen):
    model = make()
    prune_model(model, method, amount)
    randomize_batchnorm(model, gen)
    warm_batchnorm(model, make_input)  # train-mode forwards with grad: BN stats, non-leaf hook weights
    assert not model.training
    with torch.no_grad():
        x = make_input()
        ref = model(x)
    return model, x, ref


# ------------------------------------------------------------------------------------ whole models x forms
SMALL_MODELS = {
    "small_resnet": (SmallResNet, lambda g: torch.randn(4, 3, 12, 12, generator=g)),
    "mlp": (small_mlp, lambda g: torch.randn(5, 48, generator=g)),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", ["global_l1", "l1"])
@pytest.mark.parametrize("arch", list(SMALL_MODELS))
def test_small_models_every_form(arch, method, form, gen, tmp_path):
    make, make_input = SMALL_MODELS[arch]
    model, x, ref = _make_pruned(make, method, 0.9, lambda: make_input(gen), gen)
    assert ref.std() > 0
    source = checkpoint_form(model, form, make, tmp_path)
    before = state_snapshot(source)
    sparse = sparsert.sparsify(source)
    assert_state_equal(source, before)
    _check_converted(model, sparse, x, ref)
    layers = prunable(model)
    # 90% overall: per-layer L1 makes every layer 90% sparse; the global threshold may leave a few
    # layers denser than min_sparsity, which stay dense.
    expected = sum(1 for _, m in layers
                   if 1 - torch.count_nonzero(m.weight).item() / m.weight.numel() >= 0.7)
    assert count_sparse(sparse) == expected
    if method == "l1":
        assert expected == len(layers)
    if arch == "small_resnet":
        _assert_bn_folded(sparse, _bn_names(model))


def _resnet18_unit_scale():
    """resnet18 with unit-scale random weights (times a random per-layer factor in [0.5, 2]): with
    torchvision's fan-out init, one global L1 threshold at 98% empties whole late layers and the logits
    stop depending on the input. BatchNorm absorbs the scale."""
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for _, m in prunable(model):
            m.weight.normal_().mul_(0.5 + 1.5 * torch.rand(()))
    return model


@pytest.fixture(scope="module", params=["global_l1", "l1"])
def resnet18_pruned(request):
    """torchvision resnet18(num_classes=10) pruned to 98% by global or per-layer L1, non-trivial BN
    stats from train-mode forwards with grad, eval mode."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    make = _resnet18_unit_scale if request.param == "global_l1" else lambda: torchvision.models.resnet18(num_classes=10)
    model, x, ref = _make_pruned(make, request.param, 0.98, lambda: torch.randn(4, 3, 64, 64, generator=gen), gen)
    return request.param, model, x, ref


@pytest.mark.slow
@pytest.mark.parametrize("form", ["live", "state_dict", "removed"])
def test_resnet18_98_percent(resnet18_pruned, form, tmp_path):
    method, model, x, ref = resnet18_pruned
    assert ref.std(dim=0).min() > 0, "logits must depend on the input"
    bn_stats = [m.running_var for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not torch.allclose(v, torch.ones_like(v)) for v in bn_stats), "BN stats must be non-trivial"
    source = checkpoint_form(model, form, lambda: torchvision.models.resnet18(num_classes=10), tmp_path)
    before = state_snapshot(source)
    sparse = sparsert.sparsify(source)
    assert_state_equal(source, before)
    y = _check_converted(model, sparse, x, ref, rtol=1e-4, atol=1e-4)
    # logits within 1e-4 relative (to the largest logit) of the pruned dense model
    assert float((y - ref).abs().max() / ref.abs().max()) <= 1e-4
    total = sum(m.weight.numel() for _, m in prunable(model))
    nonzero = sum(torch.count_nonzero(m.weight).item() for _, m in prunable(model))
    assert 1 - nonzero / total == pytest.approx(0.98, abs=1e-3)
    min_sparsity = sparsert.convert.DEFAULT_MIN_SPARSITY
    dense_enough = [n for n, m in prunable(model)
                    if 1 - torch.count_nonzero(m.weight).item() / m.weight.numel() < min_sparsity]
    assert count_sparse(sparse) == len(prunable(model)) - len(dense_enough)
    assert count_sparse(sparse) >= 15 and (method == "global_l1" or not dense_enough)
    _assert_bn_folded(sparse, _bn_names(model))


@pytest.mark.parametrize("form", FORMS)
def test_bias_masks(form, gen, tmp_path):
    model = small_mlp()
    prune_model(model, "l1", 0.8)
    prune_model(model, "l1", 0.5, name="bias")
    assert all(hasattr(m, "bias_mask") for _, m in prunable(model))
    with torch.no_grad():
        x = torch.randn(6, 48, generator=gen)
        ref = model(x)
    source = checkpoint_form(model, form, small_mlp, tmp_path)
    sparse = sparsert.sparsify(source)
    _check_converted(model, sparse, x, ref)
    for name, layer in _sparse_layers(sparse).items():
        expected_bias = model.get_submodule(name).bias.detach()
        assert (expected_bias == 0).sum() == expected_bias.numel() // 2
        assert torch.equal(layer.bias, expected_bias)


@pytest.mark.parametrize("form", FORMS)
def test_iterative_pruning_container(form, gen, tmp_path):
    model = SmallResNet()
    prune_model(model, "l1", 0.5)
    prune_model(model, "l1", 0.6)  # the same layers again: PruningContainer, 80% in total
    prune.random_unstructured(model.fc, "weight", 0.5)  # and a third time, another method: 90%
    hooks = [h for h in model.stem._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
    assert len(hooks) == 1 and isinstance(hooks[0], prune.PruningContainer)
    assert len(model.fc._forward_pre_hooks[next(iter(model.fc._forward_pre_hooks))]) == 3
    randomize_batchnorm(model, gen)
    warm_batchnorm(model, lambda: torch.randn(4, 3, 10, 10, generator=gen))
    with torch.no_grad():
        x = torch.randn(3, 3, 10, 10, generator=gen)
        ref = model(x)
    sparse = sparsert.sparsify(checkpoint_form(model, form, SmallResNet, tmp_path))
    _check_converted(model, sparse, x, ref)
    assert count_sparse(sparse) == len(prunable(model))
    assert _sparse_layers(sparse)["stem"].density == pytest.approx(0.2, abs=0.01)
    assert _sparse_layers(sparse)["fc"].density == pytest.approx(0.1, abs=0.02)


# ------------------------------------------------------------------------------------ torchvision zoo
def _tiny_vit():
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=10)
    with torch.no_grad():  # torchvision zero-inits the head and class token: make the logits informative
        vit.heads.head.weight.normal_()
        vit.heads.head.bias.normal_()
        vit.class_token.normal_()
    return vit


def _vgg11_small():
    vgg = torchvision.models.vgg11(num_classes=10)
    # Same conv stack; the 25088x4096 classifier only fits 224x224 inputs and dominates the runtime.
    vgg.avgpool = nn.AdaptiveAvgPool2d(1)
    vgg.classifier = nn.Sequential(nn.Linear(512, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    return vgg


ZOO = {
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 32),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 32),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10), 32),
    "squeezenet1_1": (lambda: torchvision.models.squeezenet1_1(num_classes=10), 48),
    "densenet_small": (lambda: torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16,
                                                           bn_size=2, num_classes=10), 32),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 32),
    "regnet_x_400mf": (lambda: torchvision.models.regnet_x_400mf(num_classes=10), 32),
    "googlenet": (lambda: torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True), 32),
    "mnasnet0_5": (lambda: torchvision.models.mnasnet0_5(num_classes=10), 32),
    "vgg11_small_head": (_vgg11_small, 32),
    "vit_tiny": (_tiny_vit, 32),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ZOO))
def test_torchvision_zoo(arch, gen):
    make, size = ZOO[arch]
    model = make()
    prune_model(model, "l1", 0.9)
    randomize_batchnorm(model, gen)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, size, size, generator=gen))
    model.eval()
    x = torch.randn(2, 3, size, size, generator=gen)
    with torch.no_grad():
        ref = model(x)
    assert ref.std() > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = sparsert.sparsify(model)
    assert not [w for w in caught if "could not trace" in str(w.message)], [str(w.message) for w in caught]
    _check_converted(model, sparse, x, ref)
    protected = {f"{name}.out_proj" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    converted = set(_sparse_layers(sparse))
    assert converted == {name for name, _ in prunable(model)} - protected
    for name in protected:  # MultiheadAttention reads out_proj.weight directly: kept dense, still correct
        assert type(sparse.get_submodule(name)) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_transformer_encoder_layer_keeps_the_layers_its_fast_path_reads_dense(gen):
    """In eval mode torch's fast path reads linear1/linear2 .weight directly: converting them would
    only rebuild dense weights on every call, so they stay dense (the nn.MultiheadAttention policy)."""
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    prune_model(layer, "l1", 0.9)
    layer.eval()
    x = torch.randn(3, 5, 32, generator=gen)
    with torch.no_grad():
        ref = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx cannot trace it: nothing to fold or fuse anyway
        sparse = sparsert.sparsify(layer)
    assert not _sparse_layers(sparse)
    assert type(sparse.linear1) is nn.Linear and type(sparse.linear2) is nn.Linear
    with torch.no_grad():
        assert_close(sparse(x), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["small_resnet", "mlp"])
def test_reduced_precision_model_through_torch_backend(arch, dtype, gen):
    """sparsify, then model.to(bf16/fp16): every sparse layer runs torch.sparse on CPU, in that dtype."""
    make, make_input = SMALL_MODELS[arch]
    model, x, _ = _make_pruned(make, "l1", 0.9, lambda: make_input(gen), gen)
    sparse = sparsert.sparsify(model).to(dtype)
    assert {m.values.dtype for m in _sparse_layers(sparse).values()} == {dtype}
    assert {m.effective_backend() for m in _sparse_layers(sparse).values()} == {"torch"}
    with torch.no_grad():
        ref = copy.deepcopy(bake(model)).to(dtype)(x.to(dtype)).float()
    y = run_sparse(sparse, x.to(dtype), backend="torch", warmup=True, expected_calls=count_sparse(sparse))
    assert y.dtype == dtype
    tol = 16 * torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


# ------------------------------------------------------------------------------------ sparsify semantics
@pytest.mark.parametrize("arch", ["mlp", "small_resnet"])
def test_sparsify_returns_eval_mode_throughout(arch):
    model = small_mlp() if arch == "mlp" else SmallResNet()
    prune_model(model, "l1", 0.9)
    model.train()
    sparse = sparsert.sparsify(model)
    assert count_sparse(sparse) == len(prunable(model))
    assert [n for n, m in sparse.named_modules() if m.training] == []


def _mixed_model():
    """conv at 90%, conv at 50%, linear at 95% (block-pruned 16x16), linear dense."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    prune.l1_unstructured(model[0], "weight", 0.9)
    prune.l1_unstructured(model[2], "weight", 0.5)
    mask = (sparse_matrix((64, 64), 0.25, None, block=(16, 16)) != 0).float()
    prune.custom_from_mask(model[6], "weight", mask)
    return model


def test_sparsify_leaves_input_untouched(gen):
    model = _mixed_model()
    model.train()
    before = state_snapshot(model)
    hooks = {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()}
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        ref_train = model(x)
    sparse = sparsert.sparsify(model)
    assert sparse is not model
    assert model.training and all(m.training for m in model.modules())
    assert_state_equal(model, before)
    assert {n: dict(m._forward_pre_hooks) for n, m in model.named_modules()} == hooks
    assert not any(isinstance(m, _SparseBase) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), ref_train)
    assert not sparse.training


@pytest.mark.parametrize("arch", ["mlp", "mixed"])
def test_sparsify_inplace_converts_the_model_itself(arch, gen):
    model = small_mlp() if arch == "mlp" else _mixed_model()
    if arch == "mlp":
        prune_model(model, "l1", 0.9)
    x = torch.randn(3, 48, generator=gen) if arch == "mlp" else torch.randn(2, 3, 8, 8, generator=gen)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    out = sparsert.sparsify(model, inplace=True)
    assert not is_live_pruned(model) and count_sparse(model) >= 2 and not model.training
    # The passed model was converted in place and computes what it did (the returned module too).
    assert_close(run_sparse(model, x, backend="numba"), ref)
    assert_close(run_sparse(out, x, backend="numba"), ref)


class _ResidualNoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        return torch.relu(self.c2(y) + x)


def test_sparsify_inplace_model_with_fused_residual_still_correct(gen):
    model = _ResidualNoBN()
    prune_model(model, "l1", 0.8)
    model.eval()
    x = torch.randn(2, 4, 6, 6, generator=gen)
    with torch.no_grad():
        ref = model(x)
    out = sparsert.sparsify(model, inplace=True)
    assert_close(run_sparse(out, x, backend="numba"), ref)
    assert_close(run_sparse(model, x, backend="numba"), ref)


def test_fused_residual_model_matches(gen):
    model = _ResidualNoBN()
    prune_model(model, "l1", 0.8)
    model.eval()
    x = torch.randn(2, 4, 6, 6, generator=gen)
    with torch.no_grad():
        ref = model(x)
    sparse = sparsert.sparsify(model)
    assert_close(run_sparse(sparse, x, backend="numba", warmup=True, expected_calls=2), ref)
    with torch.no_grad():
        assert torch.equal(model(x), ref), "the input model must be unaffected by fusion"


@pytest.mark.parametrize("min_sparsity,expected", [(0.0, {"0", "2", "6", "8"}), (0.5, {"0", "2", "6"}),
                                                   (0.7, {"0", "6"}), (0.89, {"0"}), (0.95, set()), (1.0, set())],
                         ids=["min0", "min0.5", "min0.7", "min0.89", "min0.95", "min1"])
def test_min_sparsity_keeps_denser_layers_dense(min_sparsity, expected, gen):
    model = _mixed_model().eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        ref = model(x)
    sparse = sparsert.sparsify(model, min_sparsity=min_sparsity)
    assert set(_sparse_layers(sparse)) == expected
    for name in {"0", "2", "6", "8"} - expected:
        assert type(sparse.get_submodule(name)) in (nn.Conv2d, nn.Linear)
    if expected:
        assert_close(run_sparse(sparse, x, backend="numba", warmup=True, expected_calls=len(expected)), ref)
    else:
        with torch.no_grad():
            assert_close(sparse(x), ref)


def test_backend_and_format_options(gen):
    model = _mixed_model().eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        ref = model(x)
    torch_model = sparsert.sparsify(model, backend="torch")
    assert {m.backend for m in _sparse_layers(torch_model).values()} == {"torch"}
    assert_close(run_sparse(torch_model, x, backend="torch"), ref)
    auto = _sparse_layers(sparsert.sparsify(model))
    assert auto["6"].format == "bsr" and auto["6"].block_shape == (16, 16) and auto["0"].format == "csr"
    csr = _sparse_layers(sparsert.sparsify(model, format="csr"))
    assert csr["6"].format == "csr"


def test_batchnorm_folded_exactly(gen):
    model = SmallResNet()
    randomize_batchnorm(model, gen)
    warm_batchnorm(model, lambda: torch.randn(8, 3, 10, 10, generator=gen))
    x = torch.randn(3, 3, 10, 10, generator=gen)
    with torch.no_grad():
        ref = model(x)
    for fuse in (False, True):
        sparse = sparsert.sparsify(model, min_sparsity=0.0, fuse=fuse)  # every layer converted, dense ones too
        assert count_sparse(sparse) == len(prunable(model))
        _assert_bn_folded(sparse, _bn_names(model), identity_required=not fuse)
        assert_close(run_sparse(sparse, x, backend="numba", warmup=True, expected_calls=len(prunable(model))), ref)
    unfolded = sparsert.sparsify(model, min_sparsity=0.0, fold_bn=False)
    assert all(isinstance(unfolded.get_submodule(bn), nn.BatchNorm2d) for bn in _bn_names(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules() if m.training)
    assert_close(run_sparse(unfolded, x, backend="numba"), ref)


def test_fold_batchnorm_directly(gen):
    model = SmallResNet()
    randomize_batchnorm(model, gen)
    warm_batchnorm(model, lambda: torch.randn(8, 3, 10, 10, generator=gen))
    x = torch.randn(3, 3, 10, 10, generator=gen)
    with torch.no_grad():
        ref = model(x)
    pairs = sparsert.fold_batchnorm(model)
    assert sorted(pairs) == sorted([("stem", "bn"), ("layer1.conv1", "layer1.bn1"), ("layer1.conv2", "layer1.bn2"),
                                    ("layer2.conv1", "layer2.bn1"), ("layer2.conv2", "layer2.bn2"),
                                    ("layer2.shortcut.0", "layer2.shortcut.1")])
    with torch.no_grad():
        assert_close(model(x), ref)


class _SharedConvOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y  # the conv output has a second user: folding would change it


def test_batchnorm_not_folded_when_conv_output_reused(gen):
    model = _SharedConvOutput()
    prune_model(model, "l1", 0.8)
    randomize_batchnorm(model, gen)
    warm_batchnorm(model, lambda: torch.randn(4, 3, 6, 6, generator=gen))
    x = torch.randn(2, 3, 6, 6, generator=gen)
    with torch.no_grad():
        ref = model(x)
    sparse = sparsert.sparsify(model)
    assert isinstance(sparse.get_submodule("bn"), nn.BatchNorm2d)
    assert_close(run_sparse(sparse, x, backend="numba", warmup=True), ref)


def test_fold_batchnorm_skips_train_mode_bn(gen):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    warm_batchnorm(model, lambda: torch.randn(4, 3, 8, 8, generator=gen)).train()
    x = torch.randn(4, 3, 8, 8, generator=gen)
    with torch.no_grad():
        ref = model(x)  # a train-mode forward updates running stats itself: snapshot after it
    before = state_snapshot(model)
    pairs = sparsert.fold_batchnorm(model)
    assert pairs == []
    assert_state_equal(model, before)
    with torch.no_grad():
        assert_close(model(x), ref)


# ------------------------------------------------------------------------------------ report
def test_report_rows(gen):
    model = _mixed_model().eval()
    sparse = sparsert.sparsify(model)  # "0" csr, "6" bsr16; "2" and "8" stay dense
    rows = {r["name"]: r for r in sparsert.report(sparse)}
    assert set(rows) == {"0", "2", "6", "8"}
    keys = {"name", "kind", "shape", "sparsity", "format", "backend", "dense_bytes", "sparse_bytes",
            "density_b16", "density_b32", "density_b64"}
    for row in rows.values():
        assert keys <= set(row), set(row) ^ keys
    dense_weights = {name: model.get_submodule(name).weight.detach() for name in rows}
    for name, row in rows.items():
        w = dense_weights[name]
        assert row["shape"] == list(w.shape)
        assert row["sparsity"] == pytest.approx(1 - torch.count_nonzero(w).item() / w.numel())
        bias = model.get_submodule(name).bias
        assert row["dense_bytes"] == (w.numel() + bias.numel()) * 4
        w2d = w.reshape(w.shape[0], -1)
        for b in (16, 32, 64):
            assert row[f"density_b{b}"] == pytest.approx(block_density(w2d, b))
    assert rows["0"]["format"] == "csr" and rows["0"]["kind"] == "SparseConv2d" and rows["0"]["backend"] == "numba"
    assert rows["6"]["format"] == "bsr16" and rows["6"]["kind"] == "SparseLinear"
    assert rows["6"]["density_b16"] == pytest.approx(0.25) and rows["6"]["sparsity"] == pytest.approx(0.75)
    for name in ("2", "8"):
        assert rows[name]["format"] == "dense" and rows[name]["backend"] == "torch"
        assert rows[name]["sparse_bytes"] == rows[name]["dense_bytes"]
    for name in ("0", "6"):
        assert rows[name]["sparse_bytes"] < rows[name]["dense_bytes"]
    layer0 = _sparse_layers(sparse)["0"]
    assert rows["0"]["sparse_bytes"] == (layer0.values.numel() * 4 + layer0.indices.numel() * 2
                                         + layer0.indptr.numel() * 4 + 8 * 4)
    text = sparsert.format_report(sparsert.report(sparse))
    for part in ("layer", "bsr16", "csr", "dense", "total", "compression"):
        assert part in text
    assert len(text.splitlines()) == 4 + 4


def test_report_grouped_and_torch_backend(gen):
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1))
    prune_model(model, "l1", 0.75)
    sparse = sparsert.sparsify(model, backend="torch")
    rows = sparsert.report(sparse)
    assert [r["shape"] for r in rows] == [[8, 1, 3, 3], [16, 8, 1, 1]]
    assert [r["backend"] for r in rows] == ["torch", "torch"]
    assert all(r["sparsity"] == pytest.approx(0.75, abs=0.02) for r in rows)
    assert all(r["sparse_bytes"] < r["dense_bytes"] for r in rows)
