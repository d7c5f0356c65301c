"""sparsert.pruning: exact target sparsity for every method and schedule, masks stay live."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from sparsert import load_pruned, models, pruning
from sparsert.demo import digits_cnn


def conv_bn_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


def masked_count(layers) -> int:
    return sum(int((module.weight_mask == 0).sum()) for _, module in layers)


@pytest.mark.parametrize("steps", [1, 3, 5])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.98])
def test_global_hits_the_target_count_exactly(target, steps):
    torch.manual_seed(0)
    model = models.mlp((64, 96, 48, 10))
    pruning.prune_model(model, target, method="global", steps=steps)
    layers = pruning.target_layers(model)
    total = sum(module.weight.numel() for _, module in layers)
    assert masked_count(layers) == round(target * total)
    assert pruning.sparsity(model)["global"] == pytest.approx(round(target * total) / total)


@pytest.mark.parametrize("steps", [1, 4])
def test_layer_method_prunes_every_layer_to_the_target(steps):
    torch.manual_seed(0)
    model = digits_cnn(channels=(4, 8), hidden=16)
    pruning.prune_model(model, 0.8, method="layer", steps=steps)
    for name, module in pruning.target_layers(model):
        assert int((module.weight_mask == 0).sum()) == round(0.8 * module.weight.numel()), name


@pytest.mark.parametrize("steps", [1, 3])
def test_structured_prunes_whole_output_channels_but_not_the_classifier(steps):
    torch.manual_seed(0)
    model = conv_bn_net()
    pruning.prune_model(model, 0.5, method="structured", steps=steps)
    for index, channels in ((0, 8), (3, 16)):
        mask = model[index].weight_mask.reshape(channels, -1)
        rows_dead = (mask.sum(1) == 0)
        assert int(rows_dead.sum()) == channels // 2
        assert bool(((mask.sum(1) == 0) | (mask.sum(1) == mask.shape[1])).all()), "partial channels pruned"
        # whole channels: the bias and the following BatchNorm's affine parameters are masked too
        assert torch.equal(model[index].bias_mask == 0, rows_dead)
        assert torch.equal(model[index + 1].weight_mask == 0, rows_dead)
        assert torch.equal(model[index + 1].bias_mask == 0, rows_dead)
    assert not hasattr(model[8], "weight_mask"), "the classifier's outputs are the classes"


def test_structured_without_whole_channels_leaves_bias_and_batchnorm():
    model = conv_bn_net()
    pruning.prune_model(model, 0.5, method="structured", whole_channels=False)
    assert hasattr(model[0], "weight_mask")
    assert not hasattr(model[0], "bias_mask") and not hasattr(model[1], "weight_mask")


def test_step_fraction_compounds_to_the_target():
    for target in (0.5, 0.9, 0.98):
        for steps in (1, 2, 3, 7):
            g = pruning.step_fraction(target, steps)
            assert 1 - (1 - g) ** steps == pytest.approx(target, abs=1e-12)


def test_iterative_schedule_masks_the_planned_counts_and_calls_back_after_each_step():
    torch.manual_seed(0)
    model = models.mlp((64, 96, 48, 10))
    total = sum(module.weight.numel() for _, module in pruning.target_layers(model))
    seen = []

    def callback(step, m):
        assert m is model
        seen.append((step, masked_count(pruning.target_layers(m))))

    pruning.prune_model(model, 0.9, steps=3, callback=callback)
    assert [s for s, _ in seen] == [1, 2, 3]
    expected = [total - round(total * 0.1 ** (k / 3)) for k in (1, 2, 3)]
    assert [count for _, count in seen] == expected


def test_fine_tuning_between_steps_keeps_pruned_weights_zero():
    torch.manual_seed(0)
    model = models.mlp((16, 32, 4))
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))

    def finetune(step, m):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            optimizer.step()

    pruning.prune_model(model, 0.75, steps=2, callback=finetune)
    for _, module in pruning.target_layers(model):
        assert torch.all(module.weight[module.weight_mask == 0] == 0)


def test_checkpoint_carries_masks_and_loads_into_a_fresh_architecture():
    torch.manual_seed(0)
    model = models.mlp((16, 32, 4))
    pruning.prune_model(model, 0.7)
    state = model.state_dict()
    assert {"0.weight_orig", "0.weight_mask", "2.weight_orig", "2.weight_mask"} <= set(state)
    fresh = load_pruned(models.mlp((16, 32, 4)), state)
    x = torch.randn(5, 16)
    torch.testing.assert_close(fresh(x), model(x))


def test_pruning_again_counts_existing_masks():
    torch.manual_seed(0)
    model = models.mlp((32, 64, 10))
    pruning.prune_model(model, 0.5)
    pruning.prune_model(model, 0.8, steps=2)
    layers = pruning.target_layers(model)
    total = sum(module.weight.numel() for _, module in layers)
    assert masked_count(layers) == round(0.8 * total)


def test_targets_select_layer_kinds():
    model = digits_cnn(channels=(4, 8), hidden=16)
    pruning.prune_model(model, 0.5, targets="conv")
    assert hasattr(model[0], "weight_mask") and hasattr(model[2], "weight_mask")
    assert not hasattr(model[6], "weight_mask") and not hasattr(model[8], "weight_mask")


@pytest.mark.parametrize("kwargs, message", [
    (dict(amount=1.0), "amount"), (dict(amount=-0.1), "amount"), (dict(amount=0.5, method="random"), "method"),
    (dict(amount=0.5, steps=0), "steps"), (dict(amount=0.5, targets="rnn"), "targets"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pruning.prune_model(models.mlp((4, 4, 2)), **kwargs)


def test_structured_on_a_single_layer_model_has_nothing_to_prune():
    with pytest.raises(ValueError, match="last layer"):
        pruning.prune_model(nn.Sequential(nn.Linear(4, 2)), 0.5, method="structured")


def test_attach_masks_restores_live_masks_and_masks_baked_zeros():
    torch.manual_seed(0)
    source = models.mlp((16, 32, 4))
    pruning.prune_model(source, 0.6)
    masked_state = source.state_dict()
    target = pruning.attach_masks(models.mlp((16, 32, 4)), masked_state)
    assert torch.equal(target[0].weight_mask, source[0].weight_mask)
    x = torch.randn(3, 16)
    torch.testing.assert_close(target(x), source(x))

    prune.remove(source[0], "weight")
    prune.remove(source[2], "weight")
    baked = source.state_dict()
    assert "0.weight_mask" not in baked
    again = pruning.attach_masks(models.mlp((16, 32, 4)), baked)
    assert torch.equal(again[0].weight_mask, (baked["0.weight"] != 0).float())
    torch.testing.assert_close(again(x), source(x))


def test_attach_masks_refuses_a_checkpoint_of_another_shape():
    state = models.mlp((16, 32, 4)).state_dict()
    with pytest.raises(ValueError, match="does not match"):
        pruning.attach_masks(models.mlp((16, 8, 4)), state)
