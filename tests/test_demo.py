"""The demo, shrunk (DemoConfig.quick): every stage runs and its outputs are consistent."""
import json

import torch

import sparsert
from sparsert import cli, data
from sparsert.demo import DemoConfig, digits_cnn, digits_mlp, run_demo


def test_demo_factories_take_digits():
    x = torch.rand(2, 1, 8, 8)
    assert digits_cnn()(x).shape == (2, 10)
    assert digits_mlp()(x).shape == (2, 10)
    assert digits_mlp(hidden=(256, 128))[1].in_features == 64


def test_quick_demo_writes_table_plot_json_and_loadable_models(tmp_path):
    lines = []
    result = run_demo(tmp_path, DemoConfig.quick(), echo=lines.append)
    text = "\n".join(lines)
    rows = result["rows"]
    assert [(r.model, r.sparsity) for r in rows] == [("cnn", 0.9), ("mlp", 0.9)]
    for row in rows:
        assert row.agree == row.n_test == len(data.digits(train=False))
        assert row.acc_sparse == row.acc_pruned
        assert row.sparse_bytes < row.dense_bytes
        assert set(row.latency) == {1, 32} and all(v > 0 for t in row.latency.values() for v in t.values())
        assert f"{row.agree}/{row.n_test}" in text
    assert "speedup" in text and str(result["plot"]) in text
    with open(result["plot"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(result["json"]) as handle:
        assert len(json.load(handle)["rows"]) == 2
    # the saved .sparse files reproduce the demo's sparse accuracy on their own
    test_set = data.digits(train=False)
    x = torch.stack([test_set[i][0] for i in range(len(test_set))])
    y = torch.stack([test_set[i][1] for i in range(len(test_set))])
    for row in rows:
        model = sparsert.load(tmp_path / f"{row.model}-90.sparse")
        with torch.no_grad():
            correct = int((model(x).argmax(1) == y).sum())
        assert correct == round(row.acc_sparse * len(y))


def test_demo_command_quick(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "acc dense" in out and "plot:" in out and (tmp_path / "demo.png").exists()
