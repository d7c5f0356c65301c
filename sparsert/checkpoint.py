"""Pruned checkpoints in every form users have them -> plain state dicts with masked weights.

Forms: a live model with prune reparametrization (`weight_orig` + `weight_mask` + hook), a state
dict saved during pruning (`<layer>.weight_orig` / `<layer>.weight_mask`), or zeros baked in by
`prune.remove`. Any pruned tensor name works (`bias_orig`/`bias_mask` too).
"""
from __future__ import annotations

import copy
import os
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import prune

ORIG, MASK = "_orig", "_mask"


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True (never unpickles arbitrary objects); unwraps common wrappers."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle of arbitrary objects
        raise ValueError(f"{path}: not a loadable weights-only PyTorch checkpoint ({exc})") from exc
    return as_state_dict(obj, path)


def as_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors)")
    # Checkpoints saved from DataParallel/DDP prefix every key with 'module.'
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def apply_masks(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Replace each `X_orig` / `X_mask` pair by `X = X_orig * X_mask`; other entries pass through."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(MASK):
            base = key[: -len(MASK)]
            if base + ORIG not in state_dict:
                raise ValueError(f"{source}: '{key}' has no matching '{base}{ORIG}'")
            continue
        if key.endswith(ORIG):
            base = key[: -len(ORIG)]
            mask = state_dict.get(base + MASK)
            if mask is None:
                raise ValueError(f"{source}: '{key}' has no matching '{base}{MASK}'")
            if mask.shape != value.shape:
                raise ValueError(f"{source}: mask '{base}{MASK}' has shape {tuple(mask.shape)} but its weight "
                                 f"'{key}' has shape {tuple(value.shape)}")
            out[base] = value * mask.to(value.dtype)
        else:
            out[key] = value
    return out


def strip_pruning(model: nn.Module) -> nn.Module:
    """Bake live prune reparametrizations into plain parameters (prune.remove on each), in place."""
    pruned = [(path, module, hook._tensor_name) for path, module in model.named_modules()
              for hook in list(module._forward_pre_hooks.values()) if isinstance(hook, prune.BasePruningMethod)]
    for path, module, name in pruned:  # check every mask before baking any: an error changes nothing
        mask, orig = getattr(module, name + MASK), getattr(module, name + ORIG)
        if mask.shape != orig.shape:
            raise ValueError(f"{path or type(module).__name__}: {name}_mask shape {tuple(mask.shape)} differs "
                             f"from {name}_orig shape {tuple(orig.shape)}")
    for _, module, name in pruned:  # a PruningContainer (iterative pruning) carries _tensor_name too
        prune.remove(module, name)
    return model


def copy_model(model: nn.Module) -> nn.Module:
    """deepcopy that also works on a live pruned model after a forward pass, whose hook-computed
    `weight` is a non-leaf tensor that deepcopy refuses: those are copied detached."""
    memo = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                tensor = module.__dict__.get(hook._tensor_name)
                if isinstance(tensor, torch.Tensor) and not tensor.is_leaf:
                    memo[id(tensor)] = tensor.detach().clone()
    return copy.deepcopy(model, memo)


def plain_keys(model: nn.Module) -> dict[str, torch.Size]:
    """The state-dict keys and shapes the model has once its pruning is baked in."""
    return {k: v.shape for k, v in apply_masks(model.state_dict(), type(model).__name__).items()}


def load_pruned(model: nn.Module, checkpoint, *, strict: bool = True) -> nn.Module:
    """Apply a pruned checkpoint (path or state dict, any of the three forms) to an architecture instance.

    Everything is validated before anything is written: on error the model is unchanged."""
    source = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "checkpoint"
    state = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else \
        as_state_dict(checkpoint, source)
    state = apply_masks(state, source)
    expected = plain_keys(model)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if strict and (missing or unexpected):
        raise ValueError(f"{source} does not match {type(model).__name__}: "
                         f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:5]}; is it a checkpoint of another architecture?")
    for key, shape in expected.items():
        if key in state and state[key].shape != shape:
            raise ValueError(f"{source}: '{key}' has shape {tuple(state[key].shape)}, "
                             f"{type(model).__name__} expects {tuple(shape)}")
    strip_pruning(model)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=strict)
    return model
