"""`sparsert` command line: prune, finetune, eval, convert, run, demo (and bench when installed).

Every subcommand handler takes the parsed args and returns an exit code. User errors (bad arguments,
missing files, a checkpoint of another architecture) print `sparsert <cmd>: error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError, TypeError)

EXAMPLES = """examples:
  sparsert demo
  sparsert prune --arch torchvision.models:resnet18 --arch-kwargs '{"num_classes": 10}' \\
      --method global --amount 0.9 --steps 3 --dataset cifar10 --data-dir data -o pruned.pt
  sparsert convert pruned.pt --arch torchvision.models:resnet18 --arch-kwargs '{"num_classes": 10}' -o resnet18.sparse
  sparsert eval resnet18.sparse --dataset cifar10 --data-dir data
  sparsert run resnet18.sparse --random-input 1,3,32,32 -o logits.npy
"""


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsert", description="Run models pruned with torch.nn.utils.prune "
                                     "on sparse weights.", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__
    parser.add_argument("--version", action="version", version=f"sparsert {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_prune(subparsers)
    _add_finetune(subparsers)
    _add_eval(subparsers)
    _add_convert(subparsers)
    _add_run(subparsers)
    _add_demo(subparsers)
    _add_bench(subparsers)
    return parser


def _command(subparsers, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=help, description=description or help,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def _arch_args(parser, required: bool = True) -> None:
    parser.add_argument("--arch", required=required, metavar="SPEC",
                        help="architecture factory: 'package.module:factory' (e.g. torchvision.models:resnet18) "
                             "or 'path/to/file.py:factory'")
    parser.add_argument("--arch-kwargs", default=None, metavar="JSON",
                        help="keyword arguments for the factory, a JSON object, e.g. '{\"num_classes\": 10}'")


def _data_args(parser, required: bool) -> None:
    from .data import DATASETS
    parser.add_argument("--dataset", choices=DATASETS, required=required,
                        help="digits: scikit-learn's 8x8 digits (offline); cifar10: needs --data-dir")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="folder holding cifar-10-batches-py/ (the extracted CIFAR-10 python version)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _train_args(parser, epochs_name: str, epochs_default: int) -> None:
    parser.add_argument(epochs_name, type=int, default=epochs_default, dest="epochs")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)


def _add_prune(subparsers) -> None:
    from .pruning import METHODS, TARGETS
    p = _command(subparsers, "prune", "prune Conv2d/Linear weights with torch.nn.utils.prune",
                 "Prune an architecture (optionally starting from a checkpoint) to a target sparsity and write "
                 "a checkpoint with weight_orig/weight_mask entries. With --dataset, fine-tunes after each step.")
    _arch_args(p)
    p.add_argument("--checkpoint", default=None, help="weights to start from (plain, masked or baked-zero state "
                                                      "dict); default: the factory's initialisation")
    p.add_argument("--method", choices=METHODS, default="global",
                   help="global: L1 over all target weights; layer: L1 per layer; structured: L2 over whole "
                        "output channels (never the last layer)")
    p.add_argument("--amount", type=float, required=True, help="target fraction of target weights masked, e.g. 0.9")
    p.add_argument("--steps", type=int, default=1, help="iterative pruning steps (same fraction of the remaining "
                                                        "weights each step)")
    p.add_argument("--targets", choices=TARGETS, default="all", help="which layer kinds to prune")
    p.add_argument("--no-whole-channels", action="store_true",
                   help="structured: do not also mask pruned channels' bias and following BatchNorm")
    _data_args(p, required=False)
    _train_args(p, "--epochs-per-step", 1)
    p.add_argument("-o", "--output", required=True, help="pruned checkpoint to write (.pt)")
    p.set_defaults(func=cmd_prune)


def _add_finetune(subparsers) -> None:
    p = _command(subparsers, "finetune", "train or fine-tune a (pruned) checkpoint; pruned weights stay zero",
                 "Fine-tune a checkpoint on a dataset. Masks in the checkpoint (weight_orig/weight_mask) stay "
                 "live, and Linear/Conv2d weights with baked-in zeros get a mask from those zeros, so pruned "
                 "weights stay zero. Writes a checkpoint in the masked form.")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="checkpoint to fine-tune (.pt state dict); omit it to train the factory's initialisation")
    _arch_args(p)
    _data_args(p, required=True)
    _train_args(p, "--epochs", 1)
    p.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt)")
    p.set_defaults(func=cmd_finetune)


def _add_eval(subparsers) -> None:
    p = _command(subparsers, "eval", "accuracy of a .sparse model or a checkpoint on a dataset's test split")
    p.add_argument("model", help="a .sparse file, or a checkpoint together with --arch")
    _arch_args(p, required=False)
    _data_args(p, required=True)
    p.add_argument("--trust-arch", action="store_true", help="allow a .sparse file's architecture factory even "
                                                            "if it is not a known builder")
    p.set_defaults(func=cmd_eval)


def _add_convert(subparsers) -> None:
    p = _command(subparsers, "convert", "convert a pruned checkpoint into a .sparse file",
                 "Apply a pruned checkpoint (weight_orig/weight_mask or baked zeros) to the architecture, fold "
                 "BatchNorm, optionally remove structurally pruned channels (--shrink), convert sparse-enough "
                 "layers to CSR/BSR, print the per-layer report and write the .sparse file.")
    p.add_argument("checkpoint", help="pruned checkpoint (.pt state dict)")
    _arch_args(p)
    p.add_argument("-o", "--output", required=True, help=".sparse file to write")
    p.add_argument("--shrink", action="store_true", help="physically remove all-zero output channels where exact "
                                                         "(see sparsert.shrink)")
    from .convert import DEFAULT_MIN_SPARSITY
    p.add_argument("--min-sparsity", type=float, default=DEFAULT_MIN_SPARSITY,
                   help="layers sparser than this run sparse; the rest stay dense")
    p.add_argument("--backend", choices=("auto", "numba", "torch"), default="auto")
    p.add_argument("--format", default="auto", help="auto, csr, or bsr<N> (Linear layers; convs use CSR)")
    p.set_defaults(func=cmd_convert)


def _add_run(subparsers) -> None:
    p = _command(subparsers, "run", "run a .sparse model on inputs from a file or random inputs")
    p.add_argument("model", help=".sparse file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="input tensor: .pt (a tensor saved with torch.save) or .npy")
    source.add_argument("--random-input", metavar="SHAPE", help="random normal input of this shape, e.g. 1,3,32,32")
    p.add_argument("-o", "--output", default=None, help="write the outputs to .pt or .npy")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-input")
    p.add_argument("--trust-arch", action="store_true", help="allow a .sparse file's architecture factory even "
                                                            "if it is not a known builder")
    p.set_defaults(func=cmd_run)


def _add_demo(subparsers) -> None:
    p = _command(subparsers, "demo", "train, prune, convert and time two small models on digits (offline)")
    p.add_argument("--out", default="sparsert-out", help="folder for the .sparse files, demo.json and demo.png")
    p.add_argument("--quick", action="store_true", help="a few seconds' version: tiny models, few epochs")
    p.add_argument("--progress", action="store_true", help="show training progress bars")
    p.set_defaults(func=cmd_demo)


def _add_bench(subparsers) -> None:
    """`bench` lives in sparsert.bench, which may not be installed (or may fail to import)."""
    if importlib.util.find_spec("sparsert.bench") is None:
        return
    try:
        from . import bench
        bench.add_parser(subparsers)
    except Exception as exc:  # a broken optional module must not take the other commands down
        p = _command(subparsers, "bench", "benchmark (unavailable: sparsert.bench failed to import)")
        message = f"sparsert.bench failed to import: {type(exc).__name__}: {exc}"
        p.set_defaults(func=lambda args: _raise(NotImplementedError(message)))


def _raise(exc):
    raise exc


# ----------------------------------------------------------------------------------------- helpers
def _spec(args):
    from . import arch
    return arch.parse(args.arch, args.arch_kwargs)


def _check_output(path: str, suffixes: tuple[str, ...] | None = None) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder {folder} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a folder, expected a file path")
    if suffixes and not path.endswith(suffixes):
        raise ValueError(f"output {path}: expected a file ending in {' or '.join(suffixes)}")
    return path


def _torch_save_atomic(obj, path: str) -> None:
    from .io import torch_save  # imported here: `sparsert --help` stays free of torch
    torch_save(obj, path)


def _datasets(args, need_train: bool):
    from . import data
    if args.dataset == "cifar10" and not args.data_dir:
        raise ValueError("--dataset cifar10 needs --data-dir DIR (the folder holding cifar-10-batches-py/)")
    train_set = data.load_dataset(args.dataset, True, args.data_dir) if need_train else None
    return train_set, data.load_dataset(args.dataset, False, args.data_dir)


def _check_batch_size(args) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")


def _print_sparsity(model, targets: str = "all") -> None:
    from .pruning import sparsity
    stats = sparsity(model, targets)
    for name, value in stats["layers"].items():
        print(f"  {name or '(root)':<32} {value:>8.2%}")
    print(f"  {'global':<32} {stats['global']:>8.2%}")


# ---------------------------------------------------------------------------------------- commands
def cmd_prune(args) -> int:
    from . import arch, pruning, training
    from .checkpoint import read_checkpoint
    spec = _spec(args)
    _check_output(args.output)
    if args.dataset:
        _check_batch_size(args)
    model = arch.build(spec)
    if args.checkpoint:
        pruning.attach_masks(model, read_checkpoint(args.checkpoint))
    train_set, test_set = _datasets(args, need_train=True) if args.dataset else (None, None)

    def finetune(step, m):
        training.train(m, train_set, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       seed=args.seed + step, progress=not args.no_progress, desc=f"step {step}/{args.steps}")

    if args.dataset:
        training.check_input_fits(model, test_set, f"--arch {spec}")
    elif args.steps > 1:
        print("note: no --dataset, so no fine-tuning between the pruning steps", file=sys.stderr)
    pruning.prune_model(model, args.amount, method=args.method, steps=args.steps, targets=args.targets,
                        whole_channels=not args.no_whole_channels, callback=finetune if args.dataset else None)
    print(f"pruned {spec} ({args.method}, {args.steps} step{'s' if args.steps > 1 else ''}); zero weights:")
    _print_sparsity(model, args.targets)
    if test_set is not None:
        result = training.evaluate(model, test_set, batch_size=max(args.batch_size, 256), progress=not args.no_progress)
        print(f"test accuracy {result['accuracy']:.2%} (loss {result['loss']:.4f}, {result['n']} images)")
    _torch_save_atomic(model.state_dict(), args.output)
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1024:.1f} KB, weight_orig/weight_mask form)")
    return 0


def cmd_finetune(args) -> int:
    from . import arch, pruning, training
    from .checkpoint import read_checkpoint
    spec = _spec(args)
    _check_output(args.output)
    _check_batch_size(args)
    model = arch.build(spec)
    if args.checkpoint:
        pruning.attach_masks(model, read_checkpoint(args.checkpoint), keep_zeros=True)
    train_set, test_set = _datasets(args, need_train=True)
    training.check_input_fits(model, test_set, f"--arch {spec}")
    before = pruning.sparsity(model)["global"]
    history = training.train(model, train_set, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                             seed=args.seed, progress=not args.no_progress, desc="finetune")
    for row in history:
        print(f"epoch {row['epoch']}: train loss {row['loss']:.4f}, train accuracy {row['accuracy']:.2%}")
    after = pruning.sparsity(model)["global"]
    result = training.evaluate(model, test_set, batch_size=max(args.batch_size, 256), progress=not args.no_progress)
    print(f"test accuracy {result['accuracy']:.2%} (loss {result['loss']:.4f}, {result['n']} images); "
          f"weight sparsity {before:.2%} -> {after:.2%}")
    _torch_save_atomic(model.state_dict(), args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_eval(args) -> int:
    from . import io, training
    _check_batch_size(args)
    if not os.path.isfile(args.model):
        raise FileNotFoundError(f"{args.model} does not exist")
    if args.model.endswith(".sparse") or io.is_sparsert_file(args.model):  # load says why a .sparse is bad
        model = io.load(args.model, trust_arch=args.trust_arch)
        what = f"{args.model} (sparse)"
    elif args.arch:
        from . import arch
        from .checkpoint import load_pruned
        model = load_pruned(arch.build(_spec(args)), args.model).eval()
        what = f"{args.model} ({args.arch})"
    else:
        raise ValueError(f"{args.model} is not a .sparse file; to evaluate a checkpoint pass --arch")
    _, test_set = _datasets(args, need_train=False)
    training.check_input_fits(model, test_set, what)
    result = training.evaluate(model, test_set, batch_size=args.batch_size, progress=not args.no_progress)
    print(f"{what}: {args.dataset} test accuracy {result['accuracy']:.2%}, loss {result['loss']:.4f}, "
          f"{result['n']} images")
    return 0


def cmd_convert(args) -> int:
    from . import arch, io
    from .checkpoint import load_pruned
    from .convert import format_report, report, sparsify
    spec = _spec(args)
    _check_output(args.output)
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    model = load_pruned(arch.build(spec), args.checkpoint).eval()
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if args.shrink:
        from .shrink import shrink
        model, summary = shrink(model, inplace=True)
        print(summary.format())
        print()
    sparse = sparsify(model, inplace=True, backend=args.backend, min_sparsity=args.min_sparsity, format=args.format)
    print(format_report(report(sparse)))
    io.save(sparse, args.output, arch=spec)
    size = os.path.getsize(args.output)
    checkpoint_size = os.path.getsize(args.checkpoint)
    print(f"\nwrote {args.output}: {size / 1024:.1f} KB; dense fp32 state dict {dense_bytes / 1024:.1f} KB "
          f"({dense_bytes / size:.1f}x smaller); input checkpoint {checkpoint_size / 1024:.1f} KB "
          f"({checkpoint_size / size:.1f}x smaller)")
    return 0


def cmd_run(args) -> int:
    import numpy as np
    import torch

    from . import io
    if args.output:
        _check_output(args.output, (".pt", ".npy"))
    model = io.load(args.model, trust_arch=args.trust_arch)
    dtype = next((t.dtype for t in model.state_dict().values() if t.is_floating_point()), torch.float32)
    if args.random_input:
        shape = _parse_shape(args.random_input)
        inputs = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed), dtype=dtype)
        source = f"random normal {tuple(shape)} (seed {args.seed})"
    else:
        inputs = _read_input(args.input)
        if inputs.is_floating_point() and inputs.dtype != dtype:
            inputs = inputs.to(dtype)  # e.g. float64 .npy files feeding a float32 model
        source = args.input
    from .training import forward_errors
    start = time.perf_counter()
    with torch.inference_mode(), forward_errors(f"the model cannot run on input {source} of shape "
                                                f"{tuple(inputs.shape)}"):
        outputs = model(inputs)
    seconds = time.perf_counter() - start
    if not isinstance(outputs, torch.Tensor):
        raise NotImplementedError(f"the model returned {type(outputs).__name__}; run writes single tensors only")
    outputs = outputs.detach().contiguous()
    print(f"{args.model}: input {source}, {tuple(inputs.shape)} {str(inputs.dtype).replace('torch.', '')}")
    print(f"output {tuple(outputs.shape)} {str(outputs.dtype).replace('torch.', '')} in {seconds * 1e3:.1f} ms; "
          f"min {outputs.min().item():.4g}, max {outputs.max().item():.4g}, mean {outputs.float().mean().item():.4g}")
    if outputs.dim() == 2:
        shown = outputs.argmax(1)[:10].tolist()
        print(f"argmax of the first {len(shown)} rows: {shown}")
    if args.output:
        if args.output.endswith(".npy"):
            np.save(args.output, outputs.numpy())
        else:
            _torch_save_atomic(outputs, args.output)
        print(f"wrote {args.output}")
    return 0


def _parse_shape(text: str) -> list[int]:
    parts = text.replace("x", ",").replace(" ", "").split(",")
    try:
        shape = [int(p) for p in parts if p]
    except ValueError:
        raise ValueError(f"--random-input {text!r}: expected positive integers like 1,3,32,32") from None
    if not shape or any(n <= 0 for n in shape):
        raise ValueError(f"--random-input {text!r}: expected positive integers like 1,3,32,32")
    return shape


def _read_input(path: str):
    import numpy as np
    import torch
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file {path} does not exist")
    if path.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{path}: not a plain .npy array ({exc})") from exc
        return torch.from_numpy(np.ascontiguousarray(array))
    if path.endswith(".pt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a weights-only torch file ({exc})") from exc
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{path}: expected a single tensor saved with torch.save, got {type(obj).__name__}")
        return obj
    raise ValueError(f"input {path}: expected a .pt or .npy file")


def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo
    config = DemoConfig.quick(progress=args.progress) if args.quick else DemoConfig(progress=args.progress)
    run_demo(args.out, config)
    return 0


# -------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"sparsert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsert {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
