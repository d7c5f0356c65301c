"""bench/deepsparse_interleaved.py and deepsparse_compare.py --serve, end to end, on a tiny case.

DeepSparse itself is never installed (its licence allows evaluation only): a stand-in `deepsparse`
package backed by ONNX Runtime plays it, under this venv's Python, so the pipe protocol, the output
checks and the paired turns are what is tested. No timing is checked."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

BENCH = Path(__file__).resolve().parent.parent / "bench"

FAKE = '''
__version__ = "0.0-standin"
import onnxruntime

FACTOR = {factor}  # 1: the model's own output

class Engine:
    def __init__(self, path, batch_size, num_cores):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_cores
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.batch_size = batch_size

    def run(self, inputs):
        assert inputs[0].shape[0] == self.batch_size
        return [FACTOR * y for y in self.session.run(None, {"input": inputs[0]})]

def compile_model(path, batch_size, num_cores):
    return Engine(path, batch_size, num_cores)
'''


def _driver():
    spec = importlib.util.spec_from_file_location("deepsparse_interleaved", BENCH / "deepsparse_interleaved.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_python(tmp_path, factor=1):
    """A 'python' that sees the stand-in deepsparse package first."""
    package = tmp_path / "fake" / "deepsparse"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE.replace("{factor}", str(factor)))
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path / 'fake'} exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def test_interleaved_turns_pair_each_round(tmp_path):
    out = tmp_path / "result.json"
    argv = ["--deepsparse-python", _fake_python(tmp_path), "--onnx-dir", str(tmp_path / "onnx"), "--models",
            "tiny_mlp", "--prunings", "per-layer-90", "--batch-sizes", "1", "3", "--rounds", "3", "--seconds", "0.01",
            "--repeats", "2", "--warmup", "0", "--out", str(out)]
    assert _driver().main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["versions"]["deepsparse"] == "0.0-standin"
    assert [r["batch_size"] for r in doc["results"]] == [1, 3]
    for r in doc["results"]:
        assert len(r["deepsparse_medians"]) == len(r["sparsert_medians"]) == len(r["paired_ratios"]) == 3
        assert len(r["sparsert_serial_shares"]) == 3
        assert all(share is None or 0.0 <= share <= 1.0 for share in r["sparsert_serial_shares"])
        assert r["paired_ratios"] == [d / s for d, s in zip(r["deepsparse_medians"], r["sparsert_medians"])]
        assert r["best_sparsert"] == min(r["sparsert_medians"]) and r["deepsparse_max_abs_error"] < 1e-4


def test_interleaved_refuses_a_deepsparse_output_that_differs(tmp_path):
    python = _fake_python(tmp_path, factor=2)  # twice the model's output: stopped before any timing
    argv = ["--deepsparse-python", python, "--models", "tiny_mlp", "--prunings", "per-layer-90", "--batch-sizes", "2",
            "--rounds", "1", "--seconds", "0.01", "--out", str(tmp_path / "r.json")]
    with pytest.raises(RuntimeError, match="tiny_mlp per-layer-90 bs 2: DeepSparse output differs"):
        _driver().main(argv)
    assert not (tmp_path / "r.json").exists()


def test_serve_reports_a_failed_request_and_keeps_serving(tmp_path):
    """A request whose input file is missing gets an error reply naming it; an empty line ends the worker."""
    proc = subprocess.run([_fake_python(tmp_path), str(BENCH / "deepsparse_compare.py"), str(tmp_path), "--serve"],
                          input=json.dumps(dict(file="missing.onnx", batch_size=1, input=str(tmp_path / "x.npy"),
                                                seconds=0.01, repeats=1, warmup=0)) + "\n\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["ready"] and lines[0]["version"] == "0.0-standin"
    assert "x.npy" in lines[1]["error"] and len(lines) == 2
