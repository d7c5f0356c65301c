"""sparsert.save / sparsert.load and architecture specs: round trips, atomic writes, refusals."""
import json
import os
import struct

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

import sparsert
from sparsert import arch, io, pruning
from sparsert.modules import SparseConv2d, SparseLinear
from sparsert.shrink import shrink

RTOL, ATOL = 1e-4, 1e-5

NET_PY = '''
from torch import nn

def conv_net(width=8, classes=5):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))

def not_a_module():
    return 42

def tied(n=6):
    net = nn.Sequential(nn.Linear(n, n), nn.ReLU(), nn.Linear(n, n))
    net[2].weight = net[0].weight  # one Parameter used by two layers
    return net
'''


@pytest.fixture
def net_file(tmp_path):
    path = tmp_path / "net.py"
    path.write_text(NET_PY)
    return path


def pruned_mlp(amount=0.9, sizes=(32, 64, 48, 10)):
    torch.manual_seed(0)
    model = arch.build("sparsert.models:mlp", {"sizes": list(sizes)})
    pruning.prune_model(model, amount)
    return model.eval()


def outputs(model, x):
    with torch.no_grad():
        return model(x)


def assert_same_outputs(a, b, x):
    torch.testing.assert_close(outputs(a, x), outputs(b, x), rtol=RTOL, atol=ATOL)


def randomize_batchnorms(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)


# ------------------------------------------------------------------------------------- round trips
def test_mlp_round_trip_reproduces_the_pruned_model(tmp_path):
    pruned = pruned_mlp()
    sparse = sparsert.sparsify(pruned)
    path = sparsert.save(sparse, tmp_path / "mlp.sparse",
                         arch={"factory": "sparsert.models:mlp", "kwargs": {"sizes": [32, 64, 48, 10]}})
    loaded = sparsert.load(path)
    assert not loaded.training
    assert any(isinstance(m, SparseLinear) for m in loaded.modules())
    x = torch.randn(6, 32)
    assert_same_outputs(loaded, pruned, x)
    torch.testing.assert_close(outputs(loaded, x), outputs(sparse, x), rtol=0, atol=0)


def test_arch_recorded_by_build_needs_no_arch_argument(tmp_path):
    pruned = pruned_mlp()
    model = sparsert.sparsify(pruned, fuse=False)  # a GraphModule drops the attribute, the plain copy keeps it
    assert arch.spec_of(model).factory == "sparsert.models:mlp"
    sparsert.save(model, tmp_path / "m.sparse")
    assert_same_outputs(sparsert.load(tmp_path / "m.sparse"), pruned, torch.randn(3, 32))


def test_bsr_layers_round_trip(tmp_path):
    torch.manual_seed(0)
    model = arch.build("sparsert.models:mlp", {"sizes": [64, 64, 16]})
    with torch.no_grad():  # block-structured zeros: 8x8 tiles, most of them empty
        keep = torch.rand(8, 8) < 0.2
        model[0].weight.mul_(keep.repeat_interleave(8, 0).repeat_interleave(8, 1))
    sparse = sparsert.sparsify(model, format="bsr8")
    assert any(isinstance(m, SparseLinear) and m.format == "bsr" for m in sparse.modules())
    sparsert.save(sparse, tmp_path / "bsr.sparse", arch=arch.spec_of(model))
    info = io.read_info(tmp_path / "bsr.sparse")
    assert info["layers"]["0"]["format"] == "bsr" and info["layers"]["0"]["block_shape"] == [8, 8]
    assert_same_outputs(sparsert.load(tmp_path / "bsr.sparse"), model.eval(), torch.randn(4, 64))


def test_conv_net_from_a_file_with_folded_batchnorm(tmp_path, net_file):
    spec = arch.parse(f"{net_file}:conv_net", {"width": 8})
    model = arch.build(spec)
    randomize_batchnorms(model)
    pruning.prune_model(model, 0.9)
    model.eval()
    sparse = sparsert.sparsify(model)
    path = tmp_path / "conv.sparse"
    sparsert.save(sparse, path, arch=spec)
    info = io.read_info(path)
    assert info["folded_batchnorm"] == ["1", "4"] and info["format_version"] == io.FORMAT_VERSION
    assert info["layers"]["3"]["kind"] == "sparse_conv2d" and info["layers"]["3"]["stride"] == [2, 2]
    with pytest.raises(ValueError, match="trust_arch"):  # a .py file named by a file is code from that file
        sparsert.load(path)
    loaded = sparsert.load(path, trust_arch=True)
    assert any(isinstance(m, SparseConv2d) for m in loaded.modules())
    assert_same_outputs(loaded, model, torch.randn(2, 3, 9, 9))


def test_dense_layers_below_min_sparsity_keep_their_folded_bias(tmp_path, net_file):
    spec = arch.parse(f"{net_file}:conv_net")
    model = arch.build(spec)
    randomize_batchnorms(model)
    pruning.prune_model(model, 0.3, method="layer")
    model.eval()
    sparse = sparsert.sparsify(model, min_sparsity=0.9)  # every layer stays dense, BN still folds
    sparsert.save(sparse, tmp_path / "dense.sparse", arch=spec)
    layer = io.read_info(tmp_path / "dense.sparse")["layers"]["3"]
    assert layer["kind"] == "conv2d" and layer["bias"] is True  # the arch's conv had bias=False
    assert_same_outputs(sparsert.load(tmp_path / "dense.sparse", trust_arch=True), model, torch.randn(2, 3, 8, 8))


def test_shrunk_layers_round_trip(tmp_path):
    torch.manual_seed(0)
    spec = arch.parse("sparsert.models:mlp", {"sizes": [16, 32, 24, 4]})
    model = arch.build(spec)
    pruning.prune_model(model, 0.5, method="structured")
    model.eval()
    shrunk, _ = shrink(model)
    sparse = sparsert.sparsify(shrunk, min_sparsity=0.0)
    sparsert.save(sparse, tmp_path / "s.sparse", arch=spec)
    loaded = sparsert.load(tmp_path / "s.sparse")
    assert loaded.get_submodule("0").out_features == 16 and loaded.get_submodule("2").in_features == 16
    assert_same_outputs(loaded, model, torch.randn(5, 16))


def test_tied_weights_are_stored_once(tmp_path, net_file):
    spec = arch.parse(f"{net_file}:tied")
    model = arch.build(spec).eval()
    sparsert.save(model, tmp_path / "tied.sparse", arch=spec)
    assert io.read_info(tmp_path / "tied.sparse")["aliases"] == {"2.weight": "0.weight"}
    loaded = sparsert.load(tmp_path / "tied.sparse", trust_arch=True)
    assert loaded[2].weight.data_ptr() == loaded[0].weight.data_ptr()
    assert_same_outputs(loaded, model, torch.randn(3, 6))


def test_float64_model_keeps_its_dtype(tmp_path):
    pruned = pruned_mlp().double()
    sparse = sparsert.sparsify(pruned)
    sparsert.save(sparse, tmp_path / "f64.sparse", arch=arch.spec_of(pruned_mlp()))
    loaded = sparsert.load(tmp_path / "f64.sparse")
    x = torch.randn(3, 32, dtype=torch.float64)
    assert outputs(loaded, x).dtype == torch.float64
    torch.testing.assert_close(outputs(loaded, x), outputs(pruned, x))


@pytest.mark.slow
def test_resnet18_98_percent_file_is_25x_smaller_than_dense_and_round_trips(tmp_path):
    torch.manual_seed(0)
    spec = arch.parse("torchvision.models:resnet18", {"num_classes": 10})
    model = arch.build(spec)
    dense_path = tmp_path / "dense.pt"
    torch.save(model.state_dict(), dense_path)
    pruning.prune_model(model, 0.98, method="global", targets="conv")
    model.eval()
    sparse = sparsert.sparsify(model)
    path = tmp_path / "resnet18.sparse"
    sparsert.save(sparse, path, arch=spec)
    ratio = os.path.getsize(dense_path) / os.path.getsize(path)
    print(f"resnet18 98% conv sparsity: dense {os.path.getsize(dense_path)} B, sparse {os.path.getsize(path)} B, "
          f"{ratio:.1f}x")
    assert ratio >= 25
    loaded = sparsert.load(path)
    assert type(loaded).__name__ == "ResNet" and io.read_info(path)["fused"]
    assert_same_outputs(loaded, model, torch.randn(2, 3, 32, 32))


# ------------------------------------------------------------------------------------ save refusals
def test_save_without_an_arch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pass arch="):
        sparsert.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "x.sparse")
    assert not (tmp_path / "x.sparse").exists()


def test_save_refuses_live_masks(tmp_path):
    with pytest.raises(ValueError, match="pruning mask"):
        sparsert.save(pruned_mlp(), tmp_path / "x.sparse")


def test_save_refuses_a_model_of_another_architecture(tmp_path):
    sparse = sparsert.sparsify(pruned_mlp())
    with pytest.raises(ValueError, match="rebuild|does not create|builds"):
        sparsert.save(sparse, tmp_path / "x.sparse", arch={"factory": "sparsert.models:mlp",
                                                             "kwargs": {"sizes": [32, 10]}})
    assert os.listdir(tmp_path) == []


def test_save_refuses_unknown_replacement_modules(tmp_path):
    model = arch.build("sparsert.models:mlp", {"sizes": [4, 8, 2]})
    model[1] = nn.Tanh()
    with pytest.raises(ValueError, match="layer '1' is a Tanh"):
        sparsert.save(model, tmp_path / "x.sparse")


# ---------------------------------------------------------------------------------------- atomicity
def test_crash_mid_write_leaves_no_file_and_no_temp(tmp_path, monkeypatch):
    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 100)  # half a file on disk
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        sparsert.save(sparsert.sparsify(pruned_mlp()), tmp_path / "m.sparse", arch=arch.spec_of(pruned_mlp()))
    assert os.listdir(tmp_path) == []


def test_crash_while_replacing_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "m.sparse"
    sparse = sparsert.sparsify(pruned_mlp())
    spec = arch.spec_of(pruned_mlp())
    sparsert.save(sparse, target, arch=spec)
    before = target.read_bytes()

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        sparsert.save(sparse, target, arch=spec)
    assert os.listdir(tmp_path) == ["m.sparse"] and target.read_bytes() == before


def test_save_into_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sparsert.save(sparsert.sparsify(pruned_mlp()), tmp_path / "no" / "m.sparse", arch=arch.spec_of(pruned_mlp()))


def test_write_json_failing_mid_document_keeps_the_previous_file_and_no_temp(tmp_path):
    # json.dump writes the document in pieces: an object it cannot encode stops it halfway through the file.
    target = tmp_path / "results.json"
    io.write_json(target, {"rows": [1, 2]})
    assert json.loads(target.read_text()) == {"rows": [1, 2]} and target.read_text().endswith("\n")
    with pytest.raises(TypeError, match="not JSON serializable"):
        io.write_json(target, {"rows": [1, 2], "late": object()})
    assert os.listdir(tmp_path) == ["results.json"] and json.loads(target.read_text()) == {"rows": [1, 2]}


def test_atomic_output_refuses_a_folder_and_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        with io.atomic_output(tmp_path):
            pass
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with io.atomic_output(tmp_path / "no" / "x.json"):
            pass


# ------------------------------------------------------------------------------------ load refusals
@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.sparse"
    sparsert.save(sparsert.sparsify(pruned_mlp()), path, arch=arch.spec_of(pruned_mlp()))
    return path


def rewrite(path, *, metadata_update=None, tensor_update=None):
    """Rewrite a saved file with changed metadata/tensors (a well-formed safetensors file)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    metadata.update(metadata_update or {})
    if tensor_update:
        tensors.update(tensor_update(tensors))
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return tensors


def test_truncated_file_is_refused(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{saved}.*truncated or corrupt"):
        sparsert.load(saved)


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "g.sparse"
    path.write_bytes(b"this is not a model at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        sparsert.load(path)


def test_flipped_tensor_byte_is_caught_by_the_digest(saved):
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's bytes; the header is still valid
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="digest"):
        sparsert.load(saved)


def test_plain_safetensors_file_is_not_a_sparsert_model(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="not a sparsert model"):
        sparsert.load(path)
    assert not io.is_sparsert_file(path)


@pytest.mark.parametrize("version, message", [("2", "version 2.*upgrade"), ("0", "version 0"), ("x", "version x")])
def test_incompatible_format_version_is_refused(saved, version, message):
    rewrite(saved, metadata_update={io.KEY_VERSION: version})
    with pytest.raises(ValueError, match=message):
        sparsert.load(saved)


def test_corrupt_metadata_json_is_refused(saved):
    rewrite(saved, metadata_update={io.KEY_MODEL: "{not json"})
    with pytest.raises(ValueError, match="corrupt sparsert metadata"):
        sparsert.load(saved)


def test_metadata_with_a_wrong_layer_record_is_refused(saved):
    doc = io.read_info(saved)
    doc["layers"]["0"]["sparse_shape"] = [64, 16]  # wrong shape for the stored arrays
    model_doc = {k: doc[k] for k in ("arch", "layers", "folded_batchnorm", "fused", "absent", "graph_sha256",
                                     "aliases") if k in doc}
    rewrite(saved, metadata_update={io.KEY_MODEL: json.dumps(model_doc)})
    with pytest.raises(ValueError, match=str(saved)):
        sparsert.load(saved)


def test_invalid_csr_arrays_are_refused_even_with_a_matching_digest(saved):
    def scramble(tensors):
        indices = tensors["0.indices"].clone()
        indices[0], indices[1] = indices[1].item(), indices[0].item()  # unsorted within the row
        return {"0.indices": indices}

    tensors = rewrite(saved, tensor_update=scramble)
    rewrite(saved, metadata_update={io.KEY_DIGEST: io._digest(tensors)})
    with pytest.raises(ValueError, match="layer '0'.*sorted"):
        sparsert.load(saved)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        sparsert.load(tmp_path / "nothing.sparse")


def test_untrusted_factory_named_by_a_file_is_not_called(saved):
    doc = io.read_info(saved)
    doc["arch"] = {"factory": "os:system", "kwargs": {"command": "echo pwned"}}
    model_doc = {k: doc[k] for k in ("arch", "layers", "folded_batchnorm", "fused", "absent", "graph_sha256",
                                     "aliases") if k in doc}
    rewrite(saved, metadata_update={io.KEY_MODEL: json.dumps(model_doc)})
    with pytest.raises(ValueError, match="trust_arch"):
        sparsert.load(saved)


def test_header_length_overflow_is_refused(saved):
    data = bytearray(saved.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=str(saved)):
        sparsert.load(saved)


# ----------------------------------------------------------------------------------------- arch specs
def test_arch_builds_and_tags_models():
    model = arch.build("torchvision.models:resnet18", '{"num_classes": 7}')
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 7
    assert arch.spec_of(model) == arch.ArchSpec("torchvision.models:resnet18", {"num_classes": 7})


def test_arch_from_a_file(net_file):
    model = arch.build(f"{net_file}:conv_net", {"width": 4})
    assert model[0].out_channels == 4
    assert arch.spec_of(model).factory == f"{net_file}:conv_net" and os.path.isabs(net_file)


@pytest.mark.parametrize("spec, message", [
    ("resnet18", "must look like"),
    ("no_such_module_xyz:net", "cannot be imported"),
    ("torchvision.models:resnet1800", "no attribute 'resnet1800'.*resnet18"),
    ("sparsert.io:FORMAT_VERSION", "not a callable"),
    ("sparsert.models:mlp", None),  # fine
])
def test_arch_errors_name_the_spec(spec, message):
    if message is None:
        assert isinstance(arch.build(spec), nn.Module)
        return
    with pytest.raises(ValueError, match=message) as info:
        arch.build(spec)
    assert spec.split(":")[-1] in str(info.value)


def test_arch_factory_must_return_a_module(net_file):
    with pytest.raises(ValueError, match="not_a_module.*returned a int"):
        arch.build(f"{net_file}:not_a_module")


def test_arch_missing_file_and_bad_kwargs(tmp_path, net_file):
    with pytest.raises(ValueError, match="does not exist"):
        arch.build(f"{tmp_path / 'nope.py'}:net")
    with pytest.raises(ValueError, match="not valid JSON"):
        arch.build("sparsert.models:mlp", "{sizes: [1]}")
    with pytest.raises(ValueError, match="JSON object"):
        arch.build("sparsert.models:mlp", "[1, 2]")
    with pytest.raises(ValueError, match="calling it with kwargs"):
        arch.build("sparsert.models:mlp", {"width": 3})


def test_trusted_factories():
    assert arch.is_trusted("torchvision.models:resnet18")
    assert arch.is_trusted("sparsert.demo:digits_cnn")
    assert arch.is_trusted("torch.nn:Identity")  # an nn.Module class
    assert not arch.is_trusted("os:system")
    assert not arch.is_trusted("torchvision.models:get_weight")
    assert not arch.is_trusted("/tmp/net.py:conv_net")


def test_saved_file_gets_the_usual_permissions(tmp_path):
    import os
    import stat

    import torch

    import sparsert

    model = sparsert.models.mlp((8, 16, 4))
    for layer in (model[0], model[2]):
        torch.nn.utils.prune.l1_unstructured(layer, "weight", 0.9)
    path = tmp_path / "mlp.sparse"
    sparsert.save(sparsert.sparsify(model), path, arch={"factory": "sparsert.models:mlp", "kwargs": {"sizes": [8, 16, 4]}})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
