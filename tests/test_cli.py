"""The `sparsert` command line, run in-process through sparsert.cli.main (one subprocess check)."""
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import sparsert
from sparsert import arch, cli, data, io
from sparsert.checkpoint import load_pruned

MLP = "sparsert.demo:digits_mlp"
MLP_KWARGS = '{"hidden": [48, 32]}'
COMMANDS = ("prune", "finetune", "eval", "convert", "run", "demo")


def sparsert_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `sparsert argv...`."""
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def mlp_model():
    return arch.build(MLP, MLP_KWARGS)


def make_fake_cifar(root, per_batch=8, seed=0):
    """A CIFAR-10 python-version folder in the real format (pickled dicts of uint8 [N, 3072] + labels)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "filenames": [f"img{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch,
                     "num_vis": 3072}, handle, protocol=2)
    return root


# ------------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: sparsert {command}" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_python_dash_m_sparsert_works():
    result = subprocess.run([sys.executable, "-m", "sparsert", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


def test_cli_works_without_the_bench_module(monkeypatch, capsys):
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "sparsert.bench" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as info:
        cli.main(["bench"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_a_broken_bench_module_only_breaks_bench(monkeypatch, capsys):
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",  # "it exists" ...
                        lambda name, *a: object() if name == "sparsert.bench" else real_find_spec(name, *a))
    monkeypatch.delattr(sparsert, "bench", raising=False)
    monkeypatch.setitem(sys.modules, "sparsert.bench", None)  # ... but `from . import bench` raises ImportError
    code, _, err = sparsert_cli(capsys, "bench")
    assert code == 2 and "sparsert bench: error: sparsert.bench failed to import" in err
    code, _, err = sparsert_cli(capsys, "run", "nothing.sparse", "--random-input", "1")  # others still work
    assert code == 2 and "no such sparsert model file" in err


# ------------------------------------------------------------------------------- digits pipeline
def test_digits_pipeline_train_prune_finetune_convert_eval_run(tmp_path, capsys):
    dense, pruned, tuned, sparse_path = (tmp_path / n for n in ("dense.pt", "pruned.pt", "tuned.pt", "m.sparse"))
    common = ["--arch", MLP, "--arch-kwargs", MLP_KWARGS]
    code, out, err = sparsert_cli(capsys, "finetune", *common, "--dataset", "digits", "--epochs", "3",
                                  "--lr", "3e-3", "--no-progress", "-o", dense)
    assert code == 0, err
    assert "test accuracy" in out and dense.exists()

    code, out, err = sparsert_cli(capsys, "prune", *common, "--checkpoint", dense, "--amount", "0.8", "--steps", "2",
                                  "--dataset", "digits", "--epochs-per-step", "1", "--no-progress", "-o", pruned)
    assert code == 0, err
    state = torch.load(pruned, weights_only=True)
    assert {"1.weight_orig", "1.weight_mask", "5.weight_orig", "5.weight_mask"} <= set(state)
    masks = [v for k, v in state.items() if k.endswith("weight_mask")]
    total = sum(m.numel() for m in masks)
    assert sum(int((m == 0).sum()) for m in masks) == round(0.8 * total)
    expected_sparsity = f"{round(0.8 * total) / total:.2%}"
    assert f"global {expected_sparsity}" in " ".join(out.split())

    code, out, err = sparsert_cli(capsys, "finetune", pruned, *common, "--dataset", "digits", "--epochs", "1",
                                  "--no-progress", "-o", tuned)
    assert code == 0, err
    tuned_state = torch.load(tuned, weights_only=True)
    for key, mask in state.items():
        if key.endswith("_mask"):
            assert torch.equal(tuned_state[key], mask), f"fine-tuning changed {key}"
    assert f"{expected_sparsity} -> {expected_sparsity}" in out

    code, out, err = sparsert_cli(capsys, "convert", tuned, *common, "-o", sparse_path)
    assert code == 0, err
    assert "sparse KB" in out and "compression" in out and f"wrote {sparse_path}" in out
    reference = load_pruned(mlp_model(), tuned).eval()

    code, out_sparse, err = sparsert_cli(capsys, "eval", sparse_path, "--dataset", "digits", "--no-progress")
    assert code == 0, err
    code, out_dense, err = sparsert_cli(capsys, "eval", tuned, *common, "--dataset", "digits", "--no-progress")
    assert code == 0, err
    accuracy = out_sparse.split("accuracy ")[1].split(",")[0]
    assert accuracy == out_dense.split("accuracy ")[1].split(",")[0]

    x = np.random.default_rng(0).normal(size=(5, 1, 8, 8))  # float64: cast to the model's float32
    np.save(tmp_path / "x.npy", x)
    code, out, err = sparsert_cli(capsys, "run", sparse_path, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy")
    assert code == 0, err
    with torch.no_grad():
        expected = reference(torch.from_numpy(x).float())
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "y.npy")), expected, rtol=1e-4, atol=1e-5)

    torch.save(torch.from_numpy(x).float(), tmp_path / "x.pt")
    code, out, err = sparsert_cli(capsys, "run", sparse_path, "--input", tmp_path / "x.pt", "-o", tmp_path / "y.pt")
    assert code == 0, err
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), expected, rtol=1e-4, atol=1e-5)

    code, out, err = sparsert_cli(capsys, "run", sparse_path, "--random-input", "2x1x8x8")
    assert code == 0, err
    assert "output (2, 10)" in out and "argmax" in out


def test_convert_with_shrink_removes_structured_channels(tmp_path, capsys):
    torch.manual_seed(0)
    common = ["--arch", MLP, "--arch-kwargs", MLP_KWARGS]
    code, _, err = sparsert_cli(capsys, "prune", *common, "--method", "structured", "--amount", "0.5",
                                "-o", tmp_path / "s.pt")
    assert code == 0, err
    code, out, err = sparsert_cli(capsys, "convert", tmp_path / "s.pt", *common, "--shrink", "--min-sparsity", "0",
                                  "-o", tmp_path / "s.sparse")
    assert code == 0, err
    assert "48 -> 24" in out and "removed 40 channels" in out
    loaded = sparsert.load(tmp_path / "s.sparse")
    assert loaded.get_submodule("1").out_features == 24 and loaded.get_submodule("3").in_features == 24
    reference = load_pruned(mlp_model(), tmp_path / "s.pt").eval()
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- cifar10 pipeline
@pytest.mark.slow
def test_cifar10_pipeline_on_a_fake_folder_with_resnet18(tmp_path, capsys):
    root = make_fake_cifar(tmp_path / "data")
    common = ["--arch", "torchvision.models:resnet18", "--arch-kwargs", '{"num_classes": 10}']
    cifar = ["--dataset", "cifar10", "--data-dir", root, "--batch-size", "16", "--no-progress"]
    code, out, err = sparsert_cli(capsys, "prune", *common, "--amount", "0.9", "--targets", "conv", *cifar,
                                  "--epochs-per-step", "1", "-o", tmp_path / "p.pt")
    assert code == 0, err
    assert "test accuracy" in out
    code, out, err = sparsert_cli(capsys, "finetune", tmp_path / "p.pt", *common, *cifar, "--epochs", "1",
                                  "-o", tmp_path / "f.pt")
    assert code == 0, err
    code, out, err = sparsert_cli(capsys, "convert", tmp_path / "f.pt", *common, "-o", tmp_path / "r.sparse")
    assert code == 0, err
    assert "layer4.1.conv2" in out
    code, out, err = sparsert_cli(capsys, "eval", tmp_path / "r.sparse", *cifar)
    assert code == 0, err
    assert "cifar10 test accuracy" in out and "8 images" in out
    reference = load_pruned(arch.build("torchvision.models:resnet18", {"num_classes": 10}), tmp_path / "f.pt").eval()
    x = torch.stack([data.cifar10(root, train=False)[i][0] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(sparsert.load(tmp_path / "r.sparse")(x), reference(x), rtol=1e-4, atol=1e-4)


def test_fake_cifar_reads_like_torchvision(tmp_path):
    root = make_fake_cifar(tmp_path, per_batch=3)
    train, test = data.cifar10(root, train=True), data.cifar10(root, train=False)
    assert len(train) == 15 and len(test) == 3
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        raw = pickle.load(handle, encoding="latin1")
    image, label = test[1]
    assert image.shape == (3, 32, 32) and int(label) == raw["labels"][1]
    pixel = raw["data"][1].reshape(3, 32, 32)[2, 5, 7] / 255.0  # channel-major rows, like torchvision
    assert image[2, 5, 7].item() == pytest.approx((pixel - data.CIFAR_MEAN[2]) / data.CIFAR_STD[2], abs=1e-5)
    # pointing at the cifar-10-batches-py folder itself works too
    assert len(data.cifar10(root / "cifar-10-batches-py", train=False)) == 3


def test_cifar_batches_may_hold_only_arrays(tmp_path):
    root = make_fake_cifar(tmp_path, per_batch=2)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({"data": Evil(), "labels": [0]}, handle)
    with pytest.raises(ValueError, match="refusing to load"):
        data.cifar10(root, train=False)


# ------------------------------------------------------------------------------------ user errors
@pytest.fixture
def small_files(tmp_path):
    """A plain checkpoint of the MLP and its .sparse file."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "mlp.pt"
    torch.save(mlp_model().state_dict(), checkpoint)
    sparse = tmp_path / "mlp.sparse"
    io.save(sparsert.sparsify(mlp_model(), min_sparsity=0.0), sparse, arch=arch.parse(MLP, MLP_KWARGS))
    return checkpoint, sparse


@pytest.mark.parametrize("argv, message", [
    (["convert", "{ckpt}", "--arch", "no_such_module_xyz:net", "-o", "{tmp}/x.sparse"], "no_such_module_xyz"),
    (["convert", "{tmp}/missing.pt", "--arch", MLP, "-o", "{tmp}/x.sparse"], "does not exist"),
    (["convert", "{ckpt}", "--arch", "torchvision.models:resnet18", "-o", "{tmp}/x.sparse"], "another architecture"),
    (["convert", "{ckpt}", "--arch", MLP, "--arch-kwargs", "{bad json", "-o", "{tmp}/x.sparse"], "not valid JSON"),
    (["convert", "{ckpt}", "--arch", MLP, "--arch-kwargs", MLP_KWARGS, "-o", "{tmp}/no/x.sparse"], "does not exist"),
    (["convert", "{ckpt}", "--arch", MLP, "--arch-kwargs", MLP_KWARGS, "--min-sparsity", "2", "-o", "{tmp}/x.sparse"],
     "min_sparsity"),
    (["prune", "--arch", MLP, "--amount", "1.5", "-o", "{tmp}/p.pt"], "amount"),
    (["prune", "--arch", "torchvision.models:resnet18", "--amount", "0.5", "--dataset", "digits", "-o", "{tmp}/p.pt"],
     "does not accept"),
    (["finetune", "--arch", MLP, "--dataset", "cifar10", "-o", "{tmp}/f.pt"], "--data-dir"),
    (["finetune", "--arch", MLP, "--dataset", "cifar10", "--data-dir", "{tmp}", "-o", "{tmp}/f.pt"],
     "cifar-10-batches-py lacks data_batch_1"),
    (["eval", "{ckpt}", "--dataset", "digits"], "pass --arch"),
    (["eval", "{ckpt}", "--arch", MLP, "--dataset", "digits", "--batch-size", "0"], "batch-size"),
    (["run", "{sparse}", "--random-input", "2,a"], "positive integers"),
    (["run", "{sparse}", "--random-input", "2,3,8,8"], "cannot run|channels|features"),
    (["run", "{sparse}", "--input", "{ckpt}"], "single tensor"),
    (["run", "{sparse}", "--input", "{tmp}/x.txt"], "does not exist|.pt or .npy"),
    (["run", "{ckpt}", "--random-input", "1,64"], "not a readable safetensors file"),
    (["run", "{sparse}", "--random-input", "1,64", "-o", "{tmp}/y.csv"], ".pt or .npy"),
])
def test_user_errors_exit_2_with_a_message(argv, message, small_files, tmp_path, capsys):
    checkpoint, sparse = small_files
    argv = [a.replace("{ckpt}", str(checkpoint)).replace("{sparse}", str(sparse)).replace("{tmp}", str(tmp_path))
            for a in argv]
    code, _, err = sparsert_cli(capsys, *argv)
    assert code == 2
    assert err.startswith(f"sparsert {argv[0]}: error: ")
    assert "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("argv", [
    ["prune", "--arch", MLP, "-o", "x.pt"],             # --amount missing
    ["prune", "--arch", MLP, "--amount", "0.5", "--method", "random", "-o", "x.pt"],
    ["convert", "x.pt", "-o", "x.sparse"],              # --arch missing
    ["eval", "x.sparse", "--dataset", "mnist"],
    ["run", "x.sparse"],                                # no input
    ["no-such-command"],
])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: sparsert" in capsys.readouterr().err


def test_eval_of_a_truncated_sparse_file_says_so(tmp_path, small_files, capsys):
    _, sparse = small_files
    sparse.write_bytes(sparse.read_bytes()[:100])
    code, _, err = sparsert_cli(capsys, "eval", sparse, "--dataset", "digits")
    assert code == 2 and "truncated or corrupt" in err
