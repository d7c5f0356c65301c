"""Shrink: physically remove the output channels/neurons that structured pruning zeroed.

Only exact removals are made. A channel of a Linear/Conv2d "producer" whose weight row is all zero
outputs the constant c = its bias (BatchNorm after it is folded first, so c includes it). It feeds a
"consumer" Linear/Conv2d through a chain of pass-through ops (nn.Identity, dropout, ReLU, pooling).
The channel is removed from the producer's outputs and from the consumer's inputs when

  * its output reaching the consumer is exactly 0: c == 0, or c <= 0 with a ReLU in the chain; or
  * it is a known constant v (v = relu(c) or c) that the consumer sees everywhere, so v times the
    consumer's weights for that input moves into the consumer's bias: a Linear consumer, or a conv
    consumer without zero padding (zero padding makes a constant channel non-constant at the borders),
    with no pooling in the chain.

Anything else is left alone and reported, with the reason:
  * the output has more than one consumer, e.g. ResNet block outputs and the stem: every tensor in a
    residual addition must keep the same channels, so they are shared with the skip path;
  * the chain reaches an op that mixes or reshapes channels (flatten, add, cat, ...), or the model output
    (the classifier's outputs are the classes);
  * grouped/depthwise convs (output channels are tied to input groups), modules called more than once,
    a BatchNorm that could not be folded.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .checkpoint import copy_model, strip_pruning
from .convert import _set_submodule, fold_batchnorm

_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)


@dataclass
class ShrinkRecord:
    """One producer layer that had all-zero output channels, and what happened to them."""

    layer: str
    channels_before: int
    channels_after: int
    zero_channels: int
    consumer: str | None = None
    folded_constants: int = 0  # removed channels whose constant output moved into the consumer's bias
    reason: str = ""           # why zero channels stayed (empty when all removable ones went)

    @property
    def removed(self) -> int:
        return self.channels_before - self.channels_after


@dataclass
class ShrinkSummary:
    records: list[ShrinkRecord] = field(default_factory=list)

    @property
    def removed(self) -> int:
        return sum(r.removed for r in self.records)

    @property
    def kept(self) -> list[ShrinkRecord]:
        """Layers whose zero channels (some or all) could not be removed."""
        return [r for r in self.records if r.zero_channels > r.removed]

    def format(self) -> str:
        if not self.records:
            return "shrink: no layer has all-zero output channels; nothing to remove"
        head = f"{'layer':<28} {'channels':>13} {'zero':>5} {'removed':>7}  consumer / why zero channels stay"
        lines = [head, "-" * len(head)]
        for r in self.records:
            note = r.reason or (f"-> {r.consumer}" + (f" ({r.folded_constants} constants folded into its bias)"
                                                      if r.folded_constants else ""))
            lines.append(f"{r.layer[:28]:<28} {r.channels_before:>5} -> {r.channels_after:<5} {r.zero_channels:>5} "
                         f"{r.removed:>7}  {note}")
        lines.append(f"removed {self.removed} channels in {sum(1 for r in self.records if r.removed)} layers; "
                     f"{len(self.kept)} layers keep zero channels")
        return "\n".join(lines)


def shrink(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, ShrinkSummary]:
    """Return (eval-mode model with zero channels removed where exact, summary).

    Prune masks are baked in and BatchNorm is folded first (eval-mode statistics), as `sparsify` does.
    The result computes the same function as the pruned model up to float rounding. ValueError when
    torch.fx cannot trace the model (no graph, no safe removal)."""
    if not inplace:
        model = copy_model(model)
    model.eval()
    strip_pruning(model)
    _trace(model)  # fail before folding anything
    fold_batchnorm(model)
    graph = _trace(model)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    summary = ShrinkSummary()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        producer = model.get_submodule(node.target)
        if type(producer) not in (nn.Linear, nn.Conv2d):
            continue
        zero = _zero_rows(producer)
        if zero.any():
            summary.records.append(_shrink_producer(model, node, producer, zero, calls))
    return model, summary


def _trace(model: nn.Module) -> torch.fx.Graph:
    try:
        return torch.fx.symbolic_trace(model).graph
    except Exception as exc:
        raise ValueError(f"shrink: torch.fx cannot trace {type(model).__name__} ({exc}); without its graph "
                         f"no channel can be removed safely") from exc


def _zero_rows(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().reshape(layer.weight.shape[0], -1).eq(0).all(dim=1)


def _shrink_producer(model, node, producer, zero, calls) -> ShrinkRecord:
    name, n_out = node.target, producer.weight.shape[0]
    record = ShrinkRecord(name, n_out, n_out, int(zero.sum()))
    if calls[name] != 1:
        record.reason = "kept: the module is called more than once"
        return record
    if isinstance(producer, nn.Conv2d) and producer.groups != 1:
        record.reason = "kept: grouped conv (output channels are tied to input groups)"
        return record
    consumer_node, has_relu, has_pool, reason = _follow_chain(model, node, calls)
    if consumer_node is None:
        record.reason = "kept: " + reason
        return record
    consumer = model.get_submodule(consumer_node.target)
    record.consumer = consumer_node.target

    bias = producer.bias.detach() if producer.bias is not None else torch.zeros(n_out, dtype=producer.weight.dtype)
    exactly_zero = zero & ((bias == 0) | (has_relu & (bias <= 0)))
    constant = zero & ~exactly_zero
    can_fold = not has_pool and (isinstance(consumer, nn.Linear) or _no_zero_padding(consumer))
    removable = exactly_zero | (constant if can_fold else torch.zeros_like(constant))
    if constant.any() and not can_fold:
        record.reason = (f"{int(constant.sum())} zero-weight channels output a nonzero constant (their bias) that "
                         + ("a pooling layer" if has_pool else "the consumer's zero padding")
                         + " makes non-constant, so they stay")
    if removable.all():  # keep one (dead) channel rather than build a zero-width layer
        removable[int(torch.nonzero(removable)[0])] = False
    keep = ~removable
    if not removable.any():
        return record
    folded_bias = None
    if (constant & removable).any():
        value = bias.clamp(min=0) if has_relu else bias
        value = torch.where(constant & removable, value, torch.zeros_like(value))
        weight = consumer.weight.detach()
        per_input = weight if weight.dim() == 2 else weight.sum(dim=(2, 3))  # [out, in]
        folded_bias = per_input @ value.to(per_input.dtype)
        record.folded_constants = int((constant & removable).sum())
    _set_submodule(model, name, _take_outputs(producer, keep))
    _set_submodule(model, consumer_node.target, _take_inputs(consumer, keep, folded_bias))
    record.channels_after = int(keep.sum())
    return record


def _follow_chain(model, node, calls):
    """(consumer node, ReLU seen, pooling seen, reason if no consumer) walking single-user pass-through ops."""
    producer_is_conv = isinstance(model.get_submodule(node.target), nn.Conv2d)
    current, has_relu, has_pool = node, False, False
    while True:
        users = list(current.users)
        if len(users) != 1:
            names = ", ".join(_describe(u, model) for u in users)
            why = " (a residual connection: the channels are shared with the skip path)" \
                if any(_is_add(u) for u in users) else " (the channels are shared by several consumers)"
            return None, has_relu, has_pool, f"output feeds {len(users)} ops: {names}{why}"
        user = users[0]
        module = model.get_submodule(user.target) if user.op == "call_module" else None
        if module is not None and calls[user.target] == 1 and type(module) is (nn.Conv2d if producer_is_conv
                                                                             else nn.Linear):
            if user.args[0] is not current or len(user.args) != 1 or user.kwargs:
                return None, has_relu, has_pool, f"output reaches {user.target} in an unexpected position"
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                return None, has_relu, has_pool, f"consumer {user.target} is a grouped conv"
            return user, has_relu, has_pool, ""
        if isinstance(module, _PASS_THROUGH):
            pass
        elif isinstance(module, nn.ReLU) or _is_relu_call(user):
            has_relu = True
        elif isinstance(module, _POOLS) and producer_is_conv:
            has_pool = True
        else:
            why = " (a residual connection: the channels must match the skip path)" if _is_add(user) else ""
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                why = " (a BatchNorm that could not be folded)"
            elif user.op == "output":
                why = " (the model output)"
            return None, has_relu, has_pool, f"output feeds {_describe(user, model)}{why}"
        if not user.args or user.args[0] is not current:
            return None, has_relu, has_pool, f"output reaches {_describe(user, model)} in an unexpected position"
        current = user


def _is_relu_call(node) -> bool:
    return (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or \
        (node.op == "call_method" and node.target in ("relu", "relu_"))


def _is_add(node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)) or \
        (node.op == "call_method" and node.target in ("add", "add_"))


def _describe(node, model) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(model.get_submodule(node.target)).__name__})"
    if node.op == "output":
        return "the model output"
    return getattr(node.target, "__name__", str(node.target))


def _no_zero_padding(conv: nn.Conv2d) -> bool:
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        return True
    if conv.padding == "same":
        return all(k == 1 for k in conv.kernel_size)
    return all(p == 0 for p in conv.padding)


def _factory(layer):
    return dict(device=layer.weight.device, dtype=layer.weight.dtype)


@torch.no_grad()
def _take_outputs(layer, keep: torch.Tensor) -> nn.Module:
    n_keep = int(keep.sum())
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, n_keep, bias=has_bias, **_factory(layer))
    else:
        new = nn.Conv2d(layer.in_channels, n_keep, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                        1, has_bias, layer.padding_mode, **_factory(layer))
    new.weight.copy_(layer.weight[keep])
    if has_bias:
        new.bias.copy_(layer.bias[keep])
    return new.train(layer.training)


@torch.no_grad()
def _take_inputs(layer, keep: torch.Tensor, folded_bias: torch.Tensor | None) -> nn.Module:
    n_keep = int(keep.sum())
    has_bias = layer.bias is not None or folded_bias is not None
    if isinstance(layer, nn.Linear):
        new = nn.Linear(n_keep, layer.out_features, bias=has_bias, **_factory(layer))
    else:
        new = nn.Conv2d(n_keep, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                        1, has_bias, layer.padding_mode, **_factory(layer))
    new.weight.copy_(layer.weight[:, keep])
    if has_bias:
        bias = layer.bias.detach().clone() if layer.bias is not None else torch.zeros_like(new.bias)
        new.bias.copy_(bias + folded_bias if folded_bias is not None else bias)
    return new.train(layer.training)
