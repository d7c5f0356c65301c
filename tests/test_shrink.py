"""sparsert.shrink: removed channels change nothing (1e-5), kept ones are reported with the reason."""
import pytest
import torch
import torchvision
from torch import nn

import sparsert
from sparsert import models, pruning
from sparsert.shrink import shrink

ATOL = 1e-5


def check_same(reference: nn.Module, shrunk: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), reference(x), rtol=0, atol=ATOL)


def test_mlp_whole_neurons_are_removed_from_both_sides():
    torch.manual_seed(0)
    model = models.mlp((20, 32, 16, 5))
    pruning.prune_model(model, 0.5, method="structured")
    model.eval()
    shrunk, summary = shrink(model)
    assert [(r.layer, r.channels_before, r.channels_after, r.consumer) for r in summary.records] == \
        [("0", 32, 16, "2"), ("2", 16, 8, "4")]
    assert shrunk[0].weight.shape == (16, 20) and shrunk[2].weight.shape == (8, 16) and shrunk[4].weight.shape == (5, 8)
    assert summary.removed == 24 and not summary.kept
    check_same(model, shrunk, torch.randn(7, 20))
    assert hasattr(model[0], "weight_mask"), "shrink works on a copy unless inplace=True"


def test_constant_neurons_fold_into_the_next_linear_bias():
    torch.manual_seed(0)
    model = models.mlp((20, 32, 5))
    pruning.prune_model(model, 0.5, method="structured", whole_channels=False)  # biases stay: constant outputs
    with torch.no_grad():
        model[0].bias.copy_(torch.linspace(-1, 1, 32))  # both signs: relu kills some, others are constants
    model.eval()
    shrunk, summary = shrink(model)
    record = summary.records[0]
    assert record.channels_after == 16 and record.folded_constants > 0
    check_same(model, shrunk, torch.randn(7, 20))


def conv_chain(second_kernel: int, padding: int):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, second_kernel, padding=padding), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def randomize_batchnorm(bn: nn.BatchNorm2d, bias_sign: float = 0.0) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        if bias_sign:
            bn.bias.copy_(bias_sign * torch.rand_like(bn.bias) + bias_sign * 0.1)
            bn.running_mean.zero_()  # a dead channel's BN output is then its bias: sign known


def test_conv_bn_relu_conv_whole_channels_are_removed():
    torch.manual_seed(0)
    model = conv_chain(3, 1)
    randomize_batchnorm(model[1])
    pruning.prune_model(model, 0.5, method="structured")
    model.eval()
    shrunk, summary = shrink(model)
    first = summary.records[0]
    assert (first.layer, first.channels_after, first.consumer) == ("0", 4, "3")
    assert isinstance(shrunk[1], nn.Identity), "BatchNorm is folded first"
    assert shrunk[3].in_channels == 4
    check_same(model, shrunk, torch.randn(2, 3, 9, 9))


def test_positive_constant_before_a_zero_padded_conv_is_kept_and_reported():
    torch.manual_seed(0)
    model = conv_chain(3, 1)
    pruning.prune_model(model, 0.5, method="structured", whole_channels=False)
    randomize_batchnorm(model[1], bias_sign=+1.0)  # dead channels output relu(beta) > 0
    model.eval()
    shrunk, summary = shrink(model)
    first = summary.records[0]
    assert first.removed == 0 and first.zero_channels == 4
    assert "zero padding" in first.reason and first in summary.kept
    check_same(model, shrunk, torch.randn(2, 3, 9, 9))


def test_negative_constant_is_zero_after_relu_and_removed():
    torch.manual_seed(0)
    model = conv_chain(3, 1)
    pruning.prune_model(model, 0.5, method="structured", whole_channels=False)
    randomize_batchnorm(model[1], bias_sign=-1.0)
    model.eval()
    shrunk, summary = shrink(model)
    assert summary.records[0].channels_after == 4 and summary.records[0].folded_constants == 0
    check_same(model, shrunk, torch.randn(2, 3, 9, 9))


def test_positive_constant_folds_into_an_unpadded_conv():
    torch.manual_seed(0)
    model = conv_chain(1, 0)
    pruning.prune_model(model, 0.5, method="structured", whole_channels=False)
    randomize_batchnorm(model[1], bias_sign=+1.0)
    model.eval()
    shrunk, summary = shrink(model)
    assert summary.records[0].channels_after == 4 and summary.records[0].folded_constants == 4
    check_same(model, shrunk, torch.randn(2, 3, 9, 9))


def test_conv_feeding_flatten_is_kept_with_reason():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    pruning.prune_model(model, 0.5, method="structured")
    shrunk, summary = shrink(model)
    assert summary.records[0].removed == 0 and "Flatten" in summary.records[0].reason
    check_same(model.eval(), shrunk, torch.randn(2, 1, 4, 4))


@pytest.mark.slow
def test_resnet18_shrinks_block_interiors_and_reports_residual_layers():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            randomize_batchnorm(module)
    pruning.prune_model(model, 0.5, method="structured")
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    shrunk, summary = shrink(model)
    records = {r.layer: r for r in summary.records}
    for block in ("layer1.0", "layer2.1", "layer4.0"):
        inner = records[f"{block}.conv1"]
        assert inner.channels_after == inner.channels_before // 2 and inner.consumer == f"{block}.conv2"
        assert shrunk.get_submodule(f"{block}.conv2").in_channels == inner.channels_after
        outer = records[f"{block}.conv2"]
        assert outer.removed == 0 and "residual" in outer.reason
    assert records["conv1"].removed == 0 and "residual" in records["conv1"].reason
    assert records["layer2.0.downsample.0"].removed == 0
    assert len(summary.kept) == 12  # stem + 8 block outputs + 3 downsamples: all feed additions
    check_same(model, shrunk, x)
    # and the shrunk model converts, saves and loads like any other
    sparse = sparsert.sparsify(shrunk, min_sparsity=0.3)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-4, atol=ATOL)


def test_untraceable_model_is_refused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="torch.fx cannot trace"):
        shrink(Branchy())


def test_summary_format_lists_every_record():
    model = models.mlp((8, 16, 4))
    pruning.prune_model(model, 0.5, method="structured")
    _, summary = shrink(model)
    text = summary.format()
    assert "16 -> 8" in text and "removed 8 channels" in text
