"""`sparsert bench` and the bench/ scripts run end to end on the tiny cases and write what they document.
No timing is checked."""
import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsert import bench, ops
from sparsert.convert import sparsify
from sparsert.kernels.lanes import lane_conv_seq
from sparsert.plan import lane_channel_block

RECORD_FIELDS = {"engine", "version", "versions", "model", "pruning", "sparsity", "batch_size", "num_cores",
                 "scenario", "input_shapes", "benchmark_result", "speedup_vs_torch", "speedup_vs_best_dense",
                 "convert_seconds", "first_call_ms", "check"}
RESULT_FIELDS = {"scenario", "items_per_sec", "seconds_ran", "iterations", "median", "mean", "std", "90.0%"}
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None


def test_tiny_run_writes_json_png_and_onnx(tmp_path):
    onnx_dir = tmp_path / "onnx"
    assert bench.main(["--tiny", "--onnxruntime", "--out", tmp_path, "--export-onnx", onnx_dir]) == 0

    doc = json.loads((tmp_path / "results.json").read_text())
    assert {"benchmark", "date", "machine", "versions", "settings", "notes", "results"} <= doc.keys()
    assert {"torch", "numba", "sparsert", "onnxruntime"} <= doc["versions"].keys()
    records = doc["results"]
    assert records
    for r in records:
        assert RECORD_FIELDS <= r.keys(), RECORD_FIELDS - r.keys()
        assert RESULT_FIELDS <= r["benchmark_result"].keys()
        assert r["check"] in ("reference", "ok")
        assert 0.0 < r["sparsity"] < 1.0
        if r["engine"] == "sparsert":  # the fraction of timed calls on one thread, where the plan has that choice
            assert r["serial_share"] is None or 0.0 <= r["serial_share"] <= 1.0
    engines = {r["engine"] for r in records}
    assert engines == ({"torch", "sparsert", "onnxruntime"} if HAS_ORT else {"torch", "sparsert"})
    if not HAS_ORT:
        assert any("onnxruntime" in note for note in doc["notes"])
    # one record per engine per (model, pruning, batch size); tiny_mlp has no conv for global-98
    cases = {(r["model"], r["pruning"], r["batch_size"]) for r in records}
    assert ("tiny_mlp", "global-98", 1) not in cases and ("tiny_cnn", "global-98", 1) in cases
    assert all(r["sparse_layers_default"].split("/")[0] != "0" for r in records if r["engine"] == "sparsert")

    assert (tmp_path / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    files = {m["file"] for m in manifest["models"]}
    assert files == {"tiny_mlp-per-layer-90.onnx", "tiny_cnn-per-layer-90.onnx", "tiny_cnn-global-98.onnx"}
    assert all((onnx_dir / f).stat().st_size > 0 for f in files)
    assert sorted(p.name for p in onnx_dir.iterdir()) == sorted(files | {"manifest.json"})  # no temp file left


def test_export_only_times_nothing(tmp_path):
    out = tmp_path / "out"
    argv = ["--tiny", "--models", "tiny_mlp", "--prunings", "per-layer-90", "--out", out,
            "--export-onnx", tmp_path / "onnx", "--export-only"]
    assert bench.main(argv) == 0
    assert (tmp_path / "onnx" / "tiny_mlp-per-layer-90.onnx").is_file()
    assert not out.exists()


def test_add_parser_registers_bench_subcommand():
    parser = argparse.ArgumentParser(prog="sparsert")
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--tiny", "--batch-sizes", "1", "2", "--threads", "1"])
    assert args.func is bench.run
    assert args.batch_sizes == [1, 2] and args.threads == [1] and args.tiny


def _bench_script(name: str):
    """bench/<name>.py loaded as a module (bench/ is a folder of scripts, not a package)."""
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_strip_ceiling_script_runs(capsys):
    """bench/strip_ceiling.py (the strip kernel's L1 ceiling, aligned vs not) runs and prints every row."""
    rows = _bench_script("strip_ceiling").main(repeats=2)
    assert [r[0] for r in rows] == ["4 vectors, 4 accumulators", "4 vectors, 2 x 4 accumulators",
                                    "6 vectors, 6 accumulators", "8 vectors, 8 accumulators",
                                    "6 vectors, 19 nonzeros a strip", "  the same, run-time masked tail"]
    assert all(aligned > 0 and shifted > 0 for _, aligned, shifted in rows[:4])
    assert all(aligned > 0 for _, aligned, _ in rows[4:])
    assert "dense sgemm" in capsys.readouterr().out


@pytest.mark.parametrize("planes, block", [(16, 5), (16, 16), (4, 5)])
def test_conv_ceiling_times_a_real_conv(planes, block):
    """bench/conv_ceiling.py's conv is the 3x3 'same' conv + ReLU of its weights over the input it builds (with
    channel c reading plane c % planes), in channel blocks or one: its figures are a real conv's."""
    conv_ceiling = _bench_script("conv_ceiling")
    channels, size, rows, lanes = 16, 8, 3, 32
    args, macs, w = conv_ceiling.conv_case(channels, size, rows, lanes, 0.3, block, planes)
    out, x = args[11], args[3]
    out[:] = np.nan  # every output cell the conv covers must be written
    lane_conv_seq(*args)
    plane = out.shape[1]
    grid = x.reshape(planes, plane)[:, :(size + 2) ** 2 * lanes].reshape(planes, size + 2, size + 2, lanes)
    maps = torch.from_numpy(np.ascontiguousarray(grid[np.arange(channels) % planes, 1:-1, 1:-1].transpose(3, 0, 1, 2)))
    weight = torch.from_numpy(w.toarray().reshape(channels, channels, 3, 3))
    expected = torch.relu(torch.nn.functional.conv2d(maps, weight, padding=1))[:, :, :rows]
    cells = out[:, :(size + 2) ** 2 * lanes].reshape(channels, size + 2, size + 2, lanes)[:, 1:1 + rows, 1:-1]
    torch.testing.assert_close(torch.from_numpy(np.ascontiguousarray(cells.transpose(3, 0, 1, 2))), expected,
                               rtol=1e-4, atol=1e-4)
    assert macs == w.nnz * rows * size * lanes


def test_conv_ceiling_script_runs(capsys):
    rows = _bench_script("conv_ceiling").main(["--channels", "16", "--size", "8", "--densities", "0.3",
                                               "--repeats", "2"])
    assert len(rows) == 1 and rows[0][:2] == (0.3, lane_channel_block(16, 9, 32, 0.3)) and all(r > 0 for r in rows[0][2:])
    assert "window in L1" in capsys.readouterr().out


def test_profile_plan_times_every_op_of_the_plan(capsys):
    profile_plan = _bench_script("profile_plan")
    result = profile_plan.profile("tiny_cnn", "per-layer-90", 64, repeats=2)
    model = bench.build_case("tiny_cnn", "per-layer-90", 0)
    plan = sparsify(model).plan_for(torch.zeros(64, 3, 16, 16))
    assert [r["op"] for r in result["rows"]] == [profile_plan.OP_NAMES[int(c)] for c in plan.ops[:, 0]]
    assert [r["layer"] for r in result["rows"]] == list(plan.op_layers)
    assert result["parts"] == plan.parts and result["call_ms"] > 0
    assert all(r["ms"] > 0 for r in result["rows"])
    convs = [r for r in result["rows"] if r["op"] == "lane_conv"]
    assert convs and all(r["gmacs"] > 0 for r in convs)  # batch 64 runs batch-in-lanes convs
    assert all(r["gmacs"] is None for r in result["rows"] if r["op"] in ("nchw_to_cnhw", "to_lanes"))
    assert profile_plan.main(["--model", "tiny_mlp", "--pruning", "per-layer-90", "--batch-size", "1",
                              "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    first_linear = "linear_sliced" if ops.SLICED_MATVEC else "linear_csr"  # the host's batch-1 matvec
    assert f"| 1 | 0 | {first_linear} |" in table and "whole call" in table  # op 1: the MLP's first Linear, "0"


def test_profile_plan_names_a_pruning_that_does_not_apply():
    with pytest.raises(SystemExit, match="does not apply to 'tiny_mlp'"):
        _bench_script("profile_plan").profile("tiny_mlp", "global-98", 1, repeats=1)


def test_fastest_seconds_warms_up_once_and_keeps_the_fastest_call():
    from sparsert.timing import fastest_seconds
    naps = iter([0.05, 0.03, 0.002, 0.03])  # the warm-up call's nap is the longest and must not count
    calls = []

    def nap():
        calls.append(1)
        time.sleep(next(naps))

    best = fastest_seconds(nap, repeats=3)
    assert len(calls) == 4
    assert 0.002 <= best < 0.03


def test_ab_plan_times_the_layers_a_setting_changes(capsys, monkeypatch):
    """Plan B splits every lanes conv with edge pixels into its grid of regions (work alone, any saving): each
    layer is timed in A and B, the split ones with more ops in B, and whole calls pair up turn by turn. (Both
    without row bands, which would cut A's whole maps into more ops than B's regions.)"""
    ab_plan = _bench_script("ab_plan")
    from sparsert import plan as plan_module
    monkeypatch.setattr(plan_module, "BAND_BYTES", 0)
    before = (plan_module.LANE_REGION_GAIN, plan_module.UNROLLED_CONV, plan_module.LANE_STRIP_EXPONENT)
    settings = {"LANE_REGION_GAIN": 1.0, "UNROLLED_CONV": 0, "LANE_STRIP_EXPONENT": 0.0}  # (unrolled: whole maps)
    result = ab_plan.compare("tiny_cnn", "per-layer-90", 64, settings, turns=2, whole_turns=2, turn_seconds=0.01)
    assert (plan_module.LANE_REGION_GAIN, plan_module.UNROLLED_CONV,
            plan_module.LANE_STRIP_EXPONENT) == before  # restored after planning
    assert result["ops"][1] > result["ops"][0]  # B runs regions as their own ops
    ops = {r["layer"]: r["ops"] for r in result["layers"]}
    assert set(ops) == set(plan_ops_layers("tiny_cnn", 64))  # every layer, "input" (its conversion) included
    assert any(b > a for a, b in ops.values()) and all(b >= a for a, b in ops.values())
    assert all(ms > 0 for r in result["layers"] for ms in r["ms"])
    assert len(result["paired"]) == 2 and all(ratio > 0 for ratio in result["paired"])
    assert ab_plan.main(["--model", "tiny_cnn", "--pruning", "per-layer-90", "--batch-size", "64", "--set",
                         "LANE_REGION_GAIN=1", "--set", "LANE_STRIP_EXPONENT=0", "--turns", "1",
                         "--whole-turns", "1"]) == 0
    report = capsys.readouterr().out
    assert "B: LANE_REGION_GAIN=1.0, LANE_STRIP_EXPONENT=0.0" in report and "| layer | ops A |" in report


def test_ab_plan_compares_layers_of_plans_that_split_the_batch_differently():
    """A split plan runs a layer's rows on every share at once, so its layer times are the whole batch's, as those
    of the per-op plan (how bench/RESULTS.md found which layers gain from the split)."""
    ab_plan = _bench_script("ab_plan")
    result = ab_plan.compare("tiny_cnn", "per-layer-90", 64, {"SPLIT_MIN_SHARE": 1000}, turns=2, whole_turns=1,
                             turn_seconds=0.01)
    assert result["parts"] == [2, 1]
    assert {r["layer"] for r in result["layers"]} == set(plan_ops_layers("tiny_cnn", 64))
    assert all(ms > 0 for r in result["layers"] for ms in r["ms"])


def plan_ops_layers(name, batch):
    model = bench.build_case(name, "per-layer-90", 0)
    return sparsify(model).plan_for(torch.zeros(batch, *bench.ALL_MODELS[name].input_shape)).op_layers


def test_ab_plan_refuses_a_setting_that_is_not_a_plan_constant(capsys):
    ab_plan = _bench_script("ab_plan")
    for bad in ("NO_SUCH_CONSTANT=1", "LANE_REGION_GAIN", "LANE_REGION_GAIN=fast", "kernels.LANE_VECTOR=8",
                "ops.NO_SUCH_CONSTANT=1"):
        with pytest.raises(SystemExit):
            ab_plan.main(["--model", "tiny_cnn", "--set", bad])
    assert "not a number" in capsys.readouterr().err
    # sparsert.ops's constants that planning reads are named ops.NAME, and keep their type
    assert ab_plan.parse_setting("ops.IM2COL_GATHER_COST=4") == ("ops.IM2COL_GATHER_COST", 4.0)
    assert ab_plan.parse_setting("LANE_MAX_REGIONS=4") == ("LANE_MAX_REGIONS", 4)


def test_serial_share_counts_only_the_calls_between_two_readings():
    assert bench.serial_share([10, 2], [40, 12]) == 10 / 40
    assert bench.serial_share([10, 2], [10, 2]) is None  # no call in between
    assert bench.serial_share(None, [1, 1]) is None and bench.serial_share([1, 1], None) is None
