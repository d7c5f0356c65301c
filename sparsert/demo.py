"""`sparsert demo`: the whole pipeline on scikit-learn digits, offline, in about a minute on 2 cores.

For a small CNN and a 64-256-128-10 MLP: train dense, prune globally (L1, iterative with fine-tuning
after each step) to each target sparsity, convert with `sparsert.sparsify`, save with `sparsert.save`,
and compare accuracy (dense / pruned / sparse, where sparse must predict exactly what pruned does),
file size (torch.save'd dense state dict vs .sparse file) and latency at batch 1 and a larger batch.
Writes the .sparse files, demo.json and demo.png (accuracy and speedup against sparsity) to `out_dir`.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numba
import torch
from torch import nn

from . import arch, data, pruning, training
from .checkpoint import copy_model
from .convert import sparsify
from .io import save, save_figure, torch_save, write_json


def digits_cnn(channels: tuple[int, int] = (32, 64), hidden: int = 128, num_classes: int = 10) -> nn.Sequential:
    """CNN for 1x8x8 digits: two 3x3 convs, a 2x2 max-pool to 4x4, then two Linear layers."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def digits_mlp(hidden: tuple[int, ...] = (256, 128), num_classes: int = 10) -> nn.Sequential:
    """The tutorials' 784-256-128-10 MLP sized for 8x8 digits: 64-256-128-10 (flattens its input)."""
    sizes = (64, *hidden, num_classes)
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class DemoConfig:
    """Defaults are the full demo; tests shrink epochs, sizes and timing budgets."""

    sparsities: tuple[float, ...] = (0.9, 0.98)
    epochs: int = 15
    prune_steps: int = 3
    finetune_epochs: int = 6  # after each pruning step; 98% needs them (about 60% accuracy with 2)
    lr: float = 2e-3
    finetune_lr: float = 3e-3
    batch_size: int = 64
    cnn_channels: tuple[int, int] = (16, 32)
    cnn_hidden: int = 128
    mlp_hidden: tuple[int, ...] = (256, 128)
    large_batch: int = 256
    latency_seconds: float = 0.3  # timing budget per (model, batch size) measurement
    threads: int = 2
    seed: int = 0
    progress: bool = False

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """Seconds instead of a minute: tiny models and epochs; accuracies mean little, every stage runs."""
        settings = dict(sparsities=(0.9,), epochs=2, prune_steps=2, finetune_epochs=1, cnn_channels=(8, 16),
                        cnn_hidden=32, mlp_hidden=(32,), large_batch=32, latency_seconds=0.02)
        settings.update(overrides)
        return cls(**settings)


@dataclass
class DemoRow:
    model: str
    sparsity: float
    acc_dense: float
    acc_pruned: float
    acc_sparse: float
    agree: int
    n_test: int
    dense_bytes: int
    sparse_bytes: int
    latency: dict = field(default_factory=dict)  # {batch: {"dense": s, "sparse": s}}


def run_demo(out_dir="sparsert-out", config: DemoConfig | None = None, *, echo=print) -> dict:
    """Run the demo, print its table through `echo`, and return {'rows', 'plot', 'json', 'seconds'}."""
    config = config or DemoConfig()
    if not config.sparsities or not all(0.0 < s < 1.0 for s in config.sparsities):
        raise ValueError(f"demo: sparsities must lie in (0, 1), got {config.sparsities}")
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    numba.set_num_threads(max(1, min(config.threads, numba.config.NUMBA_NUM_THREADS)))
    os.makedirs(out_dir, exist_ok=True)
    train_set, test_set = data.digits(train=True), data.digits(train=False)
    specs = {
        "cnn": arch.parse("sparsert.demo:digits_cnn",
                          {"channels": list(config.cnn_channels), "hidden": config.cnn_hidden}),
        "mlp": arch.parse("sparsert.demo:digits_mlp", {"hidden": list(config.mlp_hidden)}),
    }
    rows: list[DemoRow] = []
    for model_name, spec in specs.items():
        torch.manual_seed(config.seed)
        dense = arch.build(spec)
        stage = time.perf_counter()
        training.train(dense, train_set, epochs=config.epochs, lr=config.lr, batch_size=config.batch_size,
                       seed=config.seed, progress=config.progress, desc=f"{model_name} dense")
        acc_dense = training.evaluate(dense, test_set, progress=False)["accuracy"]
        echo(f"[{model_name}] trained dense for {config.epochs} epochs: {acc_dense:.2%} test accuracy "
             f"({time.perf_counter() - stage:.1f} s)")
        dense_path = os.path.join(out_dir, f"{model_name}-dense.pt")
        torch_save(dense.state_dict(), dense_path)
        for target in config.sparsities:
            rows.append(_prune_convert_measure(model_name, spec, dense, target, acc_dense, dense_path, train_set,
                                               test_set, out_dir, config, echo))
    echo("")
    echo(format_table(rows, config.large_batch))
    plot_path = _plot(rows, os.path.join(out_dir, "demo.png"), config.large_batch)
    json_path = os.path.join(out_dir, "demo.json")
    write_json(json_path, {"config": asdict(config), "rows": [asdict(r) for r in rows]}, indent=1)
    seconds = time.perf_counter() - started
    echo(f"\nplot: {plot_path}\nresults: {json_path}\ntotal {seconds:.1f} s")
    return {"rows": rows, "plot": plot_path, "json": json_path, "seconds": seconds}


def _prune_convert_measure(model_name, spec, dense, target, acc_dense, dense_path, train_set, test_set, out_dir,
                           config, echo) -> DemoRow:
    stage = time.perf_counter()
    pruned = copy_model(dense)

    def finetune(step, model):
        training.train(model, train_set, epochs=config.finetune_epochs, lr=config.finetune_lr,
                       batch_size=config.batch_size, seed=config.seed + step, progress=config.progress,
                       desc=f"{model_name} {target:.0%} step {step}")

    pruning.prune_model(pruned, target, method="global", steps=config.prune_steps, callback=finetune)
    pruned_eval = training.evaluate(pruned, test_set, progress=False)
    echo(f"[{model_name}] pruned to {target:.0%} in {config.prune_steps} steps, {config.finetune_epochs} fine-tuning "
         f"epochs after each: {pruned_eval['accuracy']:.2%} ({time.perf_counter() - stage:.1f} s)")
    sparse = sparsify(pruned)
    sparse_eval = training.evaluate(sparse, test_set, progress=False)
    agree = int((pruned_eval["predictions"] == sparse_eval["predictions"]).sum())
    if agree != pruned_eval["n"]:
        raise AssertionError(f"{model_name} at {target:.0%}: the sparse model predicts differently from the pruned "
                             f"model on {pruned_eval['n'] - agree} of {pruned_eval['n']} test images")
    sparse_path = os.path.join(out_dir, f"{model_name}-{round(target * 100)}.sparse")
    save(sparse, sparse_path, arch=spec)  # sparsify's fused GraphModule does not carry the spec over
    row = DemoRow(model_name, target, acc_dense, pruned_eval["accuracy"], sparse_eval["accuracy"], agree,
                  pruned_eval["n"], os.path.getsize(dense_path), os.path.getsize(sparse_path))
    inputs = torch.stack([test_set[i % len(test_set)][0] for i in range(config.large_batch)])
    for batch in (1, config.large_batch):
        dense_s, sparse_s = best_latencies(dense, sparse, inputs[:batch], config.latency_seconds)
        row.latency[batch] = {"dense": dense_s, "sparse": sparse_s}
    return row


@torch.inference_mode()
def best_latencies(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, budget_seconds: float = 0.3,
                   max_calls: int = 2000) -> tuple[float, float]:
    """Best (minimum) seconds per forward call of each model: warm-up calls (which also trigger JIT
    compilation), then as many timed calls as fit in half the budget, one model after the other.

    Minimum, not median: on a shared machine other processes only ever add time. Blocks, not
    alternating calls: torch's and Numba's thread pools each spin for a while after their own
    parallel region, and alternating would make every call pay for the other's spinning."""
    best = []
    for model in (dense, sparse):
        for _ in range(3):
            model(x)
        fastest, calls = float("inf"), 0
        deadline = time.perf_counter() + budget_seconds / 2
        while calls < 5 or (time.perf_counter() < deadline and calls < max_calls):
            start = time.perf_counter()
            model(x)
            fastest = min(fastest, time.perf_counter() - start)
            calls += 1
        best.append(fastest)
    return best[0], best[1]


def _fmt_time(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def format_table(rows: list[DemoRow], large_batch: int) -> str:
    head = (f"{'model':<5} {'sparsity':>8} {'acc dense':>9} {'pruned':>7} {'sparse':>7} {'agree':>9} "
            f"{'dense KB':>9} {'sparse KB':>9} {'smaller':>7} {'b1 dense':>9} {'b1 sparse':>9} {'speedup':>7} "
            f"{f'b{large_batch} dense':>10} {f'b{large_batch} sparse':>11} {'speedup':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        small, large = r.latency[1], r.latency[large_batch]
        lines.append(
            f"{r.model:<5} {r.sparsity:>8.0%} {r.acc_dense:>9.2%} {r.acc_pruned:>7.2%} {r.acc_sparse:>7.2%} "
            f"{f'{r.agree}/{r.n_test}':>9} {r.dense_bytes / 1024:>9.1f} {r.sparse_bytes / 1024:>9.1f} "
            f"{r.dense_bytes / r.sparse_bytes:>6.1f}x {_fmt_time(small['dense']):>9} {_fmt_time(small['sparse']):>9} "
            f"{small['dense'] / small['sparse']:>6.2f}x {_fmt_time(large['dense']):>10} "
            f"{_fmt_time(large['sparse']):>11} {large['dense'] / large['sparse']:>6.2f}x")
    lines.append("agree: test images where the sparse model predicts the same class as the pruned (masked) model; "
                 "latency: fastest call")
    return "\n".join(lines)


def _plot(rows: list[DemoRow], path: str, large_batch: int) -> str:
    import matplotlib
    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_speed) = plt.subplots(1, 2, figsize=(10, 4))
    for model_name in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model_name]
        xs = [0.0] + [r.sparsity * 100 for r in mine]
        ax_acc.plot(xs, [mine[0].acc_dense * 100] + [r.acc_sparse * 100 for r in mine], marker="o",
                    label=f"{model_name} (sparse = pruned)")
        for batch, style in ((1, "-"), (large_batch, "--")):
            ax_speed.plot(xs, [1.0] + [r.latency[batch]["dense"] / r.latency[batch]["sparse"] for r in mine],
                          style, marker="o", label=f"{model_name}, batch {batch}")
    ax_acc.set(xlabel="weight sparsity (%)", ylabel="test accuracy (%)", title="digits: accuracy")
    ax_speed.axhline(1.0, color="grey", linewidth=0.8)
    ax_speed.set(xlabel="weight sparsity (%)", ylabel="speedup over dense (x)", title="sparse vs dense latency")
    for ax in (ax_acc, ax_speed):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
