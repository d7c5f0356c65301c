"""Epilogue fusion with torch.fx: fold `relu(sparse(x))` and `relu(sparse_conv(x) + r)` into the
sparse kernel, so each fused ReLU or residual add costs no extra pass over the activations and no
extra torch op call (the dominant cost at batch 1).

The result is a torch.fx.GraphModule holding the same submodules under the same names.
"""
from __future__ import annotations

import operator
import warnings

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .modules import SparseConv2d, _SparseBase

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class SparseTracer(torch.fx.Tracer):
    """Keeps sparse modules as leaves (their forward calls Numba, which fx cannot trace)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _SparseBase) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    from .plan import SparseGraphModule  # the graph's runner; plan imports this module's patterns
    graph = SparseTracer().trace(model)
    gm = SparseGraphModule(model, graph, class_name=type(model).__name__)
    if hasattr(model, "_sparsert_arch"):  # the architecture spec io.save records (set by arch.build)
        gm._sparsert_arch = model._sparsert_arch
    return gm


def fuse_epilogues(model: nn.Module) -> nn.Module:
    """Return a SparseGraphModule with ReLU and residual adds fused into sparse layers, which runs
    through a compiled whole-network plan where it can (sparsert.plan); or `model` unchanged
    when fx cannot trace it."""
    try:
        gm = trace(model)
    except Exception as exc:  # data-dependent control flow etc.: run unfused, still correct
        warnings.warn(f"sparsify: torch.fx could not trace {type(model).__name__} ({exc}); epilogues not fused")
        return model
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):  # folded BatchNorms left nn.Identity between conv and ReLU
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.Identity) and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    # A module called at two places cannot take a flag that is right for only one of them.
    fusible = {name for name, m in modules.items() if isinstance(m, _SparseBase) and calls.get(name) == 1}
    for node in list(gm.graph.nodes):
        if not _is_relu(node, modules):
            continue
        src = node.args[0]
        if _is_sparse_call(src, modules, fusible) and len(src.users) == 1:
            modules[src.target].relu = True
        elif _is_add(src) and len(src.users) == 1:
            src = _fuse_residual(src, modules, fusible)
            if src is None:
                continue
        else:
            continue
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _fuse_residual(add: torch.fx.Node, modules, fusible) -> torch.fx.Node | None:
    """Turn `add(conv(x), r)` into `conv(x, residual=r)` with the ReLU flag set; returns the conv node."""
    if add.kwargs or len(add.args) != 2:
        return None
    for conv_node, other in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
        if not (_is_sparse_call(conv_node, modules, fusible) and isinstance(modules[conv_node.target], SparseConv2d)):
            continue
        if len(conv_node.users) != 1 or len(conv_node.args) != 1 or conv_node.kwargs or \
                not isinstance(other, torch.fx.Node):
            continue
        # The residual may be computed after the conv (torchvision's downsample is): move the conv,
        # whose only user is this add, to just before it so its new argument is already defined.
        add.prepend(conv_node)
        conv_node.kwargs = {"residual": other}
        modules[conv_node.target].relu = True
        add.replace_all_uses_with(conv_node)
        add.graph.erase_node(add)
        return conv_node
    return None


def _is_sparse_call(node, modules, fusible) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_module" and node.target in fusible
            and not modules[node.target].relu)


def _is_relu(node: torch.fx.Node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _is_add(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _ADD_FUNCTIONS
