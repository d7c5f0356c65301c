"""Prune a model's Conv2d/Linear weights to a target sparsity with torch.nn.utils.prune.

Methods:
  global      prune.global_unstructured with L1 magnitude over all target weights together
  layer       prune.l1_unstructured on each target layer, the same fraction everywhere
  structured  prune.ln_structured(n=2, dim=0): whole output channels (conv) / neurons (linear).
              The model's last Linear/Conv2d (the classifier) is never structured-pruned: its
              outputs are the classes. With `whole_channels` (default) a pruned channel's bias and the affine weight
              and bias of a BatchNorm directly after it are masked too, so the channel is exactly zero
              and `sparsert.shrink` can remove it; otherwise BatchNorm turns it into a constant.

Schedules: `steps=1` prunes in one shot. With n steps each step prunes the same fraction g of the
still-unmasked weights (masks compound through torch's PruningContainer), g = 1 - (1 - target)^(1/n),
so 1 - (1 - g)^n == target. Counts are integers: step k leaves round(N * (1 - target)^(k/n)) weights
unmasked (N per layer, or over all layers for `global`), so the last step lands on round(N * target)
masked weights exactly. A `callback(step, model)` runs after every step (the last included), e.g. to
fine-tune before pruning further.

The returned model keeps its live masks: its state dict has `weight_orig` / `weight_mask` entries.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.fx
from torch import nn
from torch.nn.utils import prune

METHODS = ("global", "layer", "structured")
TARGETS = ("all", "conv", "linear")


def target_layers(model: nn.Module, targets: str = "all") -> list[tuple[str, nn.Module]]:
    """(name, module) of each nn.Conv2d / nn.Linear the `targets` kind selects, in registration order."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    kinds = {"all": (nn.Conv2d, nn.Linear), "conv": (nn.Conv2d,), "linear": (nn.Linear,)}[targets]
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def step_fraction(target: float, steps: int) -> float:
    """Per-step fraction g of the remaining weights with 1 - (1 - g)^steps == target."""
    return 1.0 - (1.0 - target) ** (1.0 / steps)


def prune_model(model: nn.Module, amount: float, *, method: str = "global", steps: int = 1,
                targets: str = "all", whole_channels: bool = True,
                callback: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """Prune `model` in place to `amount` (fraction of target weights masked) and return it, masks live.

    Weights already masked (a checkpoint pruned before) count toward the target. Raises ValueError for
    an unknown method/targets, an amount outside [0, 1), steps < 1, or a model with no target layer."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must lie in [0, 1) (a fraction of weights to mask), got {amount}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    layers = target_layers(model, targets)
    if method == "structured" and layers:
        classifier = target_layers(model, "all")[-1]
        layers = [(name, module) for name, module in layers if module is not classifier[1]]
        if not layers:
            raise ValueError(f"structured pruning keeps the last layer '{classifier[0]}' (its outputs are the "
                             f"classes) and {type(model).__name__} has no other {targets} layer")
    if not layers:
        raise ValueError(f"{type(model).__name__} has no {targets} layer (nn.Conv2d / nn.Linear) to prune")
    followers = _following_batchnorms(model) if method == "structured" and whole_channels else {}
    for step in range(1, steps + 1):
        keep_fraction = (1.0 - amount) ** (step / steps)
        if method == "global":
            _global_step(layers, keep_fraction)
        elif method == "layer":
            for _, module in layers:
                count = _count_to_prune(_mask(module), keep_fraction)
                prune.l1_unstructured(module, "weight", amount=count)
        else:
            for name, module in layers:
                _structured_step(model, name, module, keep_fraction, whole_channels, followers)
        if callback is not None:
            callback(step, model)
    return model


def _mask(module: nn.Module, name: str = "weight") -> torch.Tensor:
    mask = getattr(module, name + "_mask", None)
    return mask if mask is not None else torch.ones_like(getattr(module, name))


def _count_to_prune(mask: torch.Tensor, keep_fraction: float) -> int:
    """Unmasked entries to mask now so that round(numel * keep_fraction) stay unmasked."""
    keep = round(mask.numel() * keep_fraction)
    return max(int(mask.count_nonzero()) - keep, 0)


def _global_step(layers, keep_fraction: float) -> None:
    masks = [_mask(module) for _, module in layers]
    total = sum(m.numel() for m in masks)
    unmasked = sum(int(m.count_nonzero()) for m in masks)
    count = max(unmasked - round(total * keep_fraction), 0)
    prune.global_unstructured([(module, "weight") for _, module in layers], pruning_method=prune.L1Unstructured,
                              amount=count)


def _structured_step(model, name, module, keep_fraction, whole_channels, followers) -> None:
    weight_mask = _mask(module)
    channels = weight_mask.shape[0]
    alive = int((weight_mask.reshape(channels, -1).sum(1) != 0).sum())
    count = max(alive - round(channels * keep_fraction), 0)
    prune.ln_structured(module, "weight", amount=count, n=2, dim=0)
    if not whole_channels:
        return
    keep = (module.weight_mask.reshape(channels, -1).sum(1) != 0).to(module.weight_mask.dtype)
    if _has(module, "bias"):
        prune.custom_from_mask(module, "bias", keep)
    bn_name = followers.get(name)
    if bn_name is not None:
        bn = model.get_submodule(bn_name)
        for param in ("weight", "bias"):
            if _has(bn, param):
                prune.custom_from_mask(bn, param, keep.to(getattr(bn, param).dtype))


def _has(module: nn.Module, name: str) -> bool:
    return getattr(module, name, None) is not None


def _following_batchnorms(model: nn.Module) -> dict[str, str]:
    """{conv name: BatchNorm name} where the conv's only consumer is that BatchNorm (via torch.fx)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:
        warnings.warn(f"prune: torch.fx could not trace {type(model).__name__} ({exc}); BatchNorms after pruned "
                      f"channels are not masked, so those channels become constants, not zeros")
        return {}
    pairs = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            src = node.args[0] if node.args else None
            if isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1:
                pairs[src.target] = node.target
    return pairs


# ------------------------------------------------------------------------------------------ queries
def sparsity(model: nn.Module, targets: str = "all") -> dict:
    """Fraction of zero weights per target layer and over all of them: {'global': f, 'layers': {name: f}}.

    Counts zeros of the effective weight (weight_orig * weight_mask while masks are live)."""
    layers, zeros, total = {}, 0, 0
    for name, module in target_layers(model, targets):
        weight = module.weight_orig * module.weight_mask if hasattr(module, "weight_mask") else module.weight
        n_zero = int(weight.numel() - torch.count_nonzero(weight))
        layers[name] = n_zero / weight.numel()
        zeros, total = zeros + n_zero, total + weight.numel()
    return {"global": zeros / total if total else 0.0, "layers": layers}


def attach_masks(model: nn.Module, state_dict: dict[str, torch.Tensor], *, keep_zeros: bool = True) -> nn.Module:
    """Load a checkpoint into `model` with its pruning live again, so further training keeps pruned
    weights at zero. `X_orig`/`X_mask` pairs become prune masks on X; with `keep_zeros`, a Linear/Conv2d
    weight stored with zeros baked in (no mask) gets the mask `weight != 0` when it has any zero."""
    plain = {k: v for k, v in state_dict.items() if not k.endswith(("_orig", "_mask"))}
    masked = {k[: -len("_mask")]: v for k, v in state_dict.items() if k.endswith("_mask")}
    originals = {k[: -len("_orig")]: v for k, v in state_dict.items() if k.endswith("_orig")}
    if set(masked) != set(originals):
        raise ValueError(f"checkpoint has unpaired _orig/_mask entries: {sorted(set(masked) ^ set(originals))[:5]}")
    for full_name, mask in masked.items():
        module, param = _owner(model, full_name)
        if getattr(module, param, None) is None:
            raise ValueError(f"checkpoint masks '{full_name}' but {type(model).__name__} has no such tensor")
        if tuple(mask.shape) != tuple(getattr(module, param).shape):
            raise ValueError(f"checkpoint mask for '{full_name}' has shape {tuple(mask.shape)}, the model's "
                             f"tensor has {tuple(getattr(module, param).shape)}")
        prune.custom_from_mask(module, param, mask)
    if keep_zeros:
        for name, module in target_layers(model):
            key = f"{name}.weight" if name else "weight"
            weight = plain.get(key)
            if weight is not None and key not in masked and weight.shape == module.weight.shape \
                    and torch.count_nonzero(weight) < weight.numel():
                prune.custom_from_mask(module, "weight", (weight != 0).to(weight.dtype))
    state = dict(plain)
    state.update({f"{k}_orig": v for k, v in originals.items()})
    state.update({f"{k}_mask": v for k, v in masked.items()})
    for name, module in model.named_modules():  # masks derived from zeros are in the model, not the file
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                base = f"{name}.{hook._tensor_name}" if name else hook._tensor_name
                if base in plain:
                    state[base + "_orig"] = state.pop(base)
                    state[base + "_mask"] = getattr(module, hook._tensor_name + "_mask")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise ValueError(f"checkpoint does not match {type(model).__name__}: {exc}") from exc
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {type(model).__name__}: {len(missing)} missing keys "
                         f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}")
    return model


def _owner(model: nn.Module, full_name: str) -> tuple[nn.Module, str]:
    parent, _, param = full_name.rpartition(".")
    try:
        return (model.get_submodule(parent) if parent else model), param
    except AttributeError:
        raise ValueError(f"checkpoint has '{full_name}' but {type(model).__name__} has no module '{parent}'") from None
