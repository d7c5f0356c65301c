"""Conversion: fold BatchNorm, swap eligible Linear/Conv2d layers for sparse ones, report per layer."""
from __future__ import annotations

import time
import warnings

import torch
import torch.fx
from torch import nn

from . import ops
from .checkpoint import copy_model, strip_pruning
from .formats import block_density
from .fuse import fuse_epilogues
from .modules import SparseConv2d, SparseLinear, _SparseBase, block_diagonal

# Sparse kernels beat dense ones from about this weight sparsity on (bench/RESULTS.md, micro table).
DEFAULT_MIN_SPARSITY = 0.7
# With example inputs and no explicit min_sparsity, every layer at least this sparse is timed dense vs
# sparse: the strip kernels beat MKL at 50-70% sparsity on a 4096x4096 Linear (bench/RESULTS.md), so a
# fixed 0.7 rule kept layers dense that measured faster sparse. Denser layers never win, so they are
# not timed at all.
MEASURE_MIN_SPARSITY = 0.25
# A sparse model must beat dense by this fraction in `sparsify(example_inputs=...)`'s end-to-end
# timing to be chosen: the timing takes ~0.5 s, and on this shared 2-core machine a model that won by
# less lost in a longer run (a mixed eager ResNet: 0.79x of dense in the bench; a 50%-dense Linear at
# batch 64: 0.74x). The per-layer "measured" model must beat the rule's by as much: its layers are kept
# dense by eager timings the plan does not share (torchvision resnet18 global-98 at batch 64 kept layer1
# dense: 4.1 ms a call against the rule's 3.6-3.9, or 19-25 ms eager when a kept layer was too big for a
# plan; picked once in a DeepSparse run, it ran 5.5 ms, 0.87x of DeepSparse against 0.96x).
AUTO_MIN_GAIN = 0.10

# Parents whose forward reads a child's `.weight` tensor directly instead of calling it.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def sparsify(model: nn.Module, *, inplace: bool = False, backend: str = "auto",
             min_sparsity: float | None = None, format: str = "auto", fold_bn: bool = True,
             fuse: bool = True, example_inputs=None) -> nn.Module:
    """Return an eval-mode copy of `model` with its sparse-enough Linear/Conv2d layers on sparse weights.

    Prune reparametrizations are baked in first; BatchNorm after a conv is folded into it where exact
    (eval mode, conv output used only by the BN). Layers below `min_sparsity` (default
    DEFAULT_MIN_SPARSITY) stay dense, as do layers whose parent reads their `.weight` directly
    (nn.MultiheadAttention's out_proj).
    `inplace=True` converts the passed object itself (same identity, no fusion) and returns it.
    With `fuse`, ReLUs and residual adds after sparse layers run in the kernels' epilogues, and the
    result is a torch.fx.GraphModule with the same submodule names (see sparsert.fuse).
    With `example_inputs` (a tensor, or a tuple of positional arguments) the choice is measured at
    that input's batch size: each candidate layer is timed dense and sparse on the input it receives
    there and stays dense unless sparse is faster (timings on each layer as `.measured`; without an
    explicit `min_sparsity`, every layer at least MEASURE_MIN_SPARSITY sparse is a candidate); then that
    model, the one the `min_sparsity` rule alone gives, and the plain dense model are timed end to end
    and the fastest as measured is returned (its `.sparsert_choice` says which, with the timings), a
    sparse one only if it beats dense by AUTO_MIN_GAIN: slower than dense only by more than the timing
    noise of that measurement; the per-layer model only if it beats the rule's by as much."""
    ops.check_backend(backend)
    if min_sparsity is not None and not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must lie in [0, 1], got {min_sparsity}")
    rule = DEFAULT_MIN_SPARSITY if min_sparsity is None else min_sparsity
    measure_from = MEASURE_MIN_SPARSITY if min_sparsity is None else min_sparsity
    if inplace:
        # Convert a copy, then move its state into the caller's object: an error half-way leaves the
        # caller's model untouched. No fusion: the caller's own forward still applies its ReLUs/adds.
        converted = _convert(model, backend, rule if example_inputs is None else measure_from, format, fold_bn,
                             False, example_inputs)
        if converted is not model and type(converted) is type(model):
            model.__dict__.update(converted.__dict__)
            return model
        return converted  # the model was itself one layer: the sparse layer replaces it
    if example_inputs is None or not fuse:
        return _convert(model, backend, rule if example_inputs is None else measure_from, format, fold_bn, fuse,
                        example_inputs)
    # Measured at this batch size: per-layer choices can misjudge (eager timings carry Python
    # overhead the compiled plan does not), so the whole models are timed too.
    dense = copy_model(model).eval()
    strip_pruning(dense)
    candidates = {"measured": _convert(model, backend, measure_from, format, fold_bn, True, example_inputs),
                  "rule": _convert(model, backend, rule, format, fold_bn, True, None),
                  "dense": dense}
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    times = _time_models(candidates, args)
    best = min(times, key=times.get)
    if best == "measured" and times["measured"] > times["rule"] * (1.0 - AUTO_MIN_GAIN):
        best = "rule"  # per-layer choices from eager timings: winning by less, they lost in longer runs
    if times[best] > times["dense"] * (1.0 - AUTO_MIN_GAIN):
        best = "dense"
    chosen = candidates[best]
    chosen.sparsert_choice = dict(choice=best, **{f"{name}_ms": ms for name, ms in times.items()})
    return chosen


def _convert(model, backend, min_sparsity, format, fold_bn, fuse, example_inputs) -> nn.Module:
    model = copy_model(model)
    model.eval()
    strip_pruning(model)
    if fold_bn:
        fold_batchnorm(model)
    protected = {id(child) for parent in model.modules() if isinstance(parent, _READS_CHILD_WEIGHTS)
                 for child in parent.children()}
    candidates = [(name, module) for name, module in model.named_modules()
                  if id(module) not in protected and _eligible(module) and weight_sparsity(module.weight) >= min_sparsity]
    layer_inputs = _capture_inputs(model, [m for _, m in candidates], example_inputs) if example_inputs is not None \
        else {}
    for name, module in candidates:
        if isinstance(module, nn.Conv2d):
            sparse = SparseConv2d.from_dense(module, backend=backend, layer_name=name)
        else:
            sparse = SparseLinear.from_dense(module, backend=backend, format=format, layer_name=name)
        if id(module) in layer_inputs:
            dense_ms, sparse_ms = _time_pair(module, sparse, layer_inputs[id(module)])
            sparse.measured = dict(dense_ms=dense_ms, sparse_ms=sparse_ms)
            if sparse_ms >= dense_ms:
                module.measured = sparse.measured  # kept dense: sparse would not pay at this batch size
                continue
        if not name:  # the model is itself one eligible layer
            return sparse.eval()
        _set_submodule(model, name, sparse)
    return (fuse_epilogues(model) if fuse else model).eval()


def _time_models(models: dict[str, nn.Module], args: tuple, min_rounds: int = 5, budget_s: float = 0.5
                 ) -> dict[str, float]:
    """Fastest ms per model. Rounds of blocks: in each round every model gets one untimed call, then
    3 timed calls. Blocks, because a call right after another engine's call pays for that engine's
    still-spinning OpenMP workers (torch and Numba each bring a pool); rounds, so that slow drift of
    the machine's state hits every candidate alike. The fastest call, not the median: other tenants
    of a shared machine only ever add time, and with medians a burst during one candidate's calls
    once made a 50%-dense Linear look 10% faster sparse than dense (it runs 1.1x slower)."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(*args)  # first call builds plans and loads kernels
        start, rounds = time.perf_counter(), 0
        while rounds < min_rounds or (time.perf_counter() - start < budget_s and rounds < 100):
            for name, model in models.items():
                model(*args)  # absorbs the switch from the previous engine
                for _ in range(3):
                    t0 = time.perf_counter()
                    model(*args)
                    times[name].append(time.perf_counter() - t0)
            rounds += 1
    return {name: min(t) * 1e3 for name, t in times.items()}


def _capture_inputs(model: nn.Module, modules: list[nn.Module], example_inputs) -> dict[int, torch.Tensor]:
    """The first input each of `modules` receives in one forward pass of `example_inputs`."""
    seen: dict[int, torch.Tensor] = {}

    def hook(module, args):
        seen.setdefault(id(module), args[0].detach())

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            model(*example_inputs) if isinstance(example_inputs, tuple) else model(example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _time_pair(dense: nn.Module, sparse: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Fastest ms of dense(x) and sparse(x), timed as `_time_models` does."""
    times = _time_models({"dense": dense, "sparse": sparse}, (x,), min_rounds=3, budget_s=0.1)
    return times["dense"], times["sparse"]


def _eligible(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, nn.Conv2d) or (
        isinstance(module, (nn.Linear, nn.Conv2d)) and not isinstance(module, _SparseBase))


def weight_sparsity(weight: torch.Tensor) -> float:
    return 1.0 - torch.count_nonzero(weight).item() / weight.numel() if weight.numel() else 0.0


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# ----------------------------------------------------------------------------------- BatchNorm folding
def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold each eval-mode BatchNorm2d into the Conv2d that feeds only it; returns the (conv, bn) pairs.

    The graph comes from torch.fx; a model fx cannot trace is left unfolded (with a warning)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # data-dependent control flow etc.: correctness first, no folding
        warnings.warn(f"sparsify: torch.fx could not trace {type(model).__name__} ({exc}); BatchNorm not folded")
        return []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        conv, bn = model.get_submodule(src.target), model.get_submodule(node.target)
        # Shared modules (called twice) cannot be folded without changing the other call site.
        if type(conv) is not nn.Conv2d or calls[src.target] != 1 or calls[node.target] != 1:
            continue
        if bn.training or bn.running_mean is None or bn.running_var is None:
            continue  # a training-mode BatchNorm normalises by batch statistics: folding is not exact
        _fold(conv, bn)
        _set_submodule(model, node.target, nn.Identity())
        pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * scale
    if bn.bias is not None:
        new_bias = new_bias + bn.bias
    conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)


# ------------------------------------------------------------------------------------------- report
REPORT_BLOCKS = (16, 32, 64)


def report(model: nn.Module) -> list[dict]:
    """One row per Linear/Conv2d layer, sparse or dense: name, kind, shape, sparsity, format, backend,
    dense_bytes, sparse_bytes, and the density a square BSR block of 16/32/64 would keep."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, _SparseBase):
            weight_2d = module.dense_weight_2d().float().cpu()
            element = module.values.element_size()
            shape = list(module.weight.shape)
            nnz = module.nnz if module.format == "csr" else int(torch.count_nonzero(weight_2d))
            stored = sum(t.numel() * t.element_size() for t in (module.values, module.indices, module.indptr))
            bias_bytes = module.bias_or_zeros.numel() * element if module.has_bias else 0
            fmt = module.format if module.format == "csr" else f"bsr{module.block_shape[0]}"
            rows.append(_row(name, type(module).__name__, shape, nnz, weight_2d, element, bias_bytes,
                             stored + bias_bytes, fmt, module.effective_backend()))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            w = module.weight.detach().float().cpu()
            weight_2d = block_diagonal(w, module.groups) if isinstance(module, nn.Conv2d) else w
            element = module.weight.element_size()
            bias_bytes = module.bias.numel() * element if module.bias is not None else 0
            dense_bytes = w.numel() * element + bias_bytes
            rows.append(_row(name, type(module).__name__, list(w.shape), int(torch.count_nonzero(w)), weight_2d,
                             element, bias_bytes, dense_bytes, "dense", "torch"))
    return rows


def _row(name, kind, shape, nnz, weight_2d, element, bias_bytes, stored_bytes, fmt, backend):
    numel = 1
    for s in shape:
        numel *= s
    row = dict(name=name, kind=kind, shape=shape, sparsity=1.0 - nnz / numel if numel else 0.0, format=fmt,
               backend=backend, dense_bytes=numel * element + bias_bytes, sparse_bytes=stored_bytes)
    for block in REPORT_BLOCKS:
        row[f"density_b{block}"] = block_density(weight_2d.numpy(), block)
    return row


def format_report(rows: list[dict]) -> str:
    """Fixed-width text table of `report` rows, with totals."""
    head = f"{'layer':<28} {'shape':<18} {'sparsity':>8} {'format':>6} {'backend':>7} {'dense KB':>9} " \
           f"{'sparse KB':>9}  bsr16/32/64 density"
    lines = [head, "-" * len(head)]
    for r in rows:
        blocks = "/".join(f"{r[f'density_b{b}']:.2f}" for b in REPORT_BLOCKS)
        lines.append(f"{r['name'][:28]:<28} {'x'.join(map(str, r['shape'])):<18} {r['sparsity']:>8.2%} "
                     f"{r['format']:>6} {r['backend']:>7} {r['dense_bytes'] / 1024:>9.1f} "
                     f"{r['sparse_bytes'] / 1024:>9.1f}  {blocks}")
    dense = sum(r["dense_bytes"] for r in rows)
    sparse = sum(r["sparse_bytes"] for r in rows)
    lines.append("-" * len(head))
    lines.append(f"{'total':<28} {'':<18} {'':>8} {'':>6} {'':>7} {dense / 1024:>9.1f} {sparse / 1024:>9.1f}  "
                 f"compression {dense / max(sparse, 1):.1f}x")
    return "\n".join(lines)
