"""Save and load sparse models as one safetensors file: tensors plus JSON metadata, no pickle.

File layout (format version 1):
  tensors   the model's full state dict: `<layer>.values/indices/indptr/bias_or_zeros` for every
            SparseLinear/SparseConv2d (CSR or BSR arrays), every other parameter and buffer dense.
  metadata  str -> str:
    sparsert.format          "sparsert.model" (marks the file as ours)
    sparsert.format_version  "1"; a file with another version is refused, never guessed at
    sparsert.version         the sparsert version that wrote it
    sparsert.sha256          digest of every tensor's name, dtype, shape and bytes (catches corruption
                             that safetensors' own header checks cannot see)
    sparsert.model           JSON: {"arch": {"factory", "kwargs"}, "layers": {name: record},
                             "folded_batchnorm": [names], "aliases": {name: name}}

`layers` lists every module whose structure differs from what the architecture factory builds:
sparse layers (format, shape, conv geometry, backend, relu flag), nn.Identity in place of a folded
BatchNorm, and Linear/Conv2d/BatchNorm with new shapes (shrunk) or a new bias (folded BN). `load`
rebuilds the factory's model, applies those records, validates every sparse array, loads the tensors.

`sparsify` returns a torch.fx.GraphModule when it fuses ReLU / residual epilogues into sparse layers.
Its generated code is never stored (it would be code from a file); instead the file says `fused`, the
layers are rebuilt unfused and `sparsert.fuse.fuse_epilogues` runs again, and the result must match
the saved graph's sha256 (`graph_sha256`) and relu flags. `absent` names the factory's modules the
fused graph no longer calls (fused ReLUs); they are rebuilt but hold no saved state.
`save` performs this whole rebuild in memory before writing, so it never writes a file it cannot load.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets

import safetensors
import safetensors.torch
import torch
import torch.fx
from torch import nn
from torch.nn.utils import prune

from . import arch as arch_mod
from .formats import BSR, CSR
from .modules import SparseConv2d, SparseLinear

FORMAT_NAME = "sparsert.model"
FORMAT_VERSION = 1
KEY_FORMAT, KEY_VERSION = "sparsert.format", "sparsert.format_version"
KEY_SPARSERT, KEY_DIGEST, KEY_MODEL = "sparsert.version", "sparsert.sha256", "sparsert.model"

_BATCHNORMS = {"batchnorm1d": nn.BatchNorm1d, "batchnorm2d": nn.BatchNorm2d}


# ------------------------------------------------------------------------------------------------ save
def save(model: nn.Module, path, *, arch=None) -> str:
    """Write `model` to `path` atomically (temp file in the same folder, fsync, os.replace).

    `arch` ('module:factory', a {'factory', 'kwargs'} dict or an ArchSpec) names the code that builds
    the model's architecture; default: the spec the model carries (set by `sparsert.arch.build`; the
    GraphModule that `sparsify` returns when it fuses epilogues does not carry it, so pass `arch`).
    The model is rebuilt in memory from what the file will hold before anything is written: a model
    the format cannot describe is a ValueError, never a file that loads as something else. On any
    error nothing is left at `path` (or its previous content is untouched) and no temp file remains.
    Returns the path."""
    path = os.fspath(path)
    spec = arch_mod.parse(arch) if arch is not None else arch_mod.spec_of(model)
    if spec is None:
        raise ValueError("sparsert.save: the model does not say which architecture it is; pass "
                         "arch='package.module:factory' (or a {'factory': ..., 'kwargs': {...}} dict)")
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                raise ValueError(f"sparsert.save: layer '{name}' still carries a pruning mask on "
                                 f"'{hook._tensor_name}'; convert it first (sparsert.sparsify bakes masks in)")
    fused = isinstance(model, torch.fx.GraphModule)
    doc = _describe(model, arch_mod.build(spec), spec, fused)
    tensors, doc["aliases"] = _tensors_for_file(model)
    try:  # prove the description is complete: rebuild exactly as `load` will
        _rebuild(doc, tensors, trust_arch=True)
    except ValueError as exc:
        raise ValueError(f"sparsert.save: the file would not rebuild this model ({exc})") from exc
    from . import __version__
    metadata = {KEY_FORMAT: FORMAT_NAME, KEY_VERSION: str(FORMAT_VERSION), KEY_SPARSERT: __version__,
                KEY_DIGEST: _digest(tensors), KEY_MODEL: json.dumps(doc, sort_keys=True)}
    _atomic_write(tensors, metadata, path)
    return path


def _module_record(module: nn.Module) -> dict | None:
    """JSON description of a module this format can rebuild, or None for any other module type."""
    if isinstance(module, (SparseLinear, SparseConv2d)):
        record = dict(kind="sparse_conv2d" if isinstance(module, SparseConv2d) else "sparse_linear",
                      format=module.format, sparse_shape=list(module.sparse_shape),
                      block_shape=list(module.block_shape), backend=module.backend, relu=bool(module.relu),
                      has_bias=bool(module.has_bias), layer_name=module.layer_name)
        if isinstance(module, SparseConv2d):
            record.update(_conv_geometry(module))
        return record
    kind = type(module)
    if kind is nn.Identity:
        return {"kind": "identity"}
    if kind is nn.Linear:
        return dict(kind="linear", in_features=module.in_features, out_features=module.out_features,
                    bias=module.bias is not None)
    if kind is nn.Conv2d:
        return dict(kind="conv2d", out_channels=module.out_channels, bias=module.bias is not None,
                    **_conv_geometry(module))
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        return dict(kind=kind.__name__.lower(), num_features=module.num_features, eps=module.eps,
                    momentum=module.momentum, affine=module.affine,
                    track_running_stats=module.track_running_stats)
    return None


def _conv_geometry(module) -> dict:
    padding = module.padding if isinstance(module.padding, str) else list(module.padding)
    return dict(in_channels=module.in_channels, kernel_size=list(module.kernel_size), stride=list(module.stride),
                padding=padding, dilation=list(module.dilation), groups=module.groups,
                padding_mode=module.padding_mode)


def _signature(module: nn.Module) -> dict:
    kind = type(module)
    return _module_record(module) or {"kind": "other", "class": f"{kind.__module__}.{kind.__qualname__}"}


def _describe(model: nn.Module, reference: nn.Module, spec, fused: bool) -> dict:
    """The metadata document (without aliases): `layers` = {name: record} for each module of `model`
    that differs from the factory's fresh `reference`, BatchNorms replaced by nn.Identity (folded into
    the conv before them), and for a fused GraphModule the modules it no longer holds."""
    layers, folded, absent = {}, [], []
    replaced: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in replaced):
            continue
        # A GraphModule's root and fx's stand-ins for container modules (plain nn.Module) carry no
        # behaviour: the graph does, and it is checked by its digest.
        if fused and (not name or type(module) is nn.Module):
            continue
        try:
            ref = reference.get_submodule(name)
        except AttributeError:
            raise ValueError(f"sparsert.save: the model has a module '{name}' ({type(module).__name__}) that "
                             f"the architecture {spec} does not create") from None
        mine = _signature(module)
        if mine == _signature(ref):
            continue
        if not name:
            raise ValueError(f"sparsert.save: the model is a {type(module).__name__} but the architecture {spec} "
                             f"builds a {type(ref).__name__}")
        if mine["kind"] == "other":
            raise ValueError(f"sparsert.save: layer '{name}' is a {type(module).__name__} where the architecture "
                             f"{spec} has a {type(ref).__name__}; the file format records only sparse layers, "
                             f"nn.Identity, and Linear/Conv2d/BatchNorm with changed shapes")
        layers[name] = mine
        replaced.append(name + ".")
        if mine["kind"] == "identity" and isinstance(ref, nn.modules.batchnorm._BatchNorm):
            folded.append(name)
    if fused:
        present = dict(model.named_modules())
        gone: list[str] = []
        for name, ref in reference.named_modules():
            if not name or name in present or any(name.startswith(prefix) for prefix in gone):
                continue
            gone.append(name + ".")
            # fuse_epilogues erases the nn.Identity left by a folded BatchNorm, and fused ReLUs.
            if isinstance(ref, nn.modules.batchnorm._BatchNorm):
                layers[name] = {"kind": "identity"}
                folded.append(name)
            else:
                absent.append(name)
    doc = {"arch": spec.to_dict(), "layers": layers, "folded_batchnorm": folded, "fused": fused}
    if fused:
        doc["absent"] = absent
        doc["graph_sha256"] = _graph_digest(model)
    return doc


def _graph_digest(model: torch.fx.GraphModule) -> str:
    return hashlib.sha256(model.code.encode()).hexdigest()


def _tensors_for_file(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU contiguous copies of the state dict; a tensor identical to an earlier one (tied weights)
    is stored once and recorded as an alias."""
    tensors, aliases, seen, storages = {}, {}, {}, set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if tensor.numel():
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                   tuple(tensor.stride()), tensor.dtype, tensor.device)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
        tensor = tensor.cpu().contiguous()
        if tensor.numel():
            # safetensors refuses tensors sharing memory; partial overlaps (not aliases) become copies.
            if tensor.untyped_storage().data_ptr() in storages:
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    return tensors, aliases


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        if tensor.numel():
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _atomic_write(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str) -> None:
    with atomic_output(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        umask = os.umask(0)  # safetensors creates the file 0600: give it the permissions any new file gets
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)


# ------------------------------------------------------------------------------------- any output file
@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside `path` for the block to write; when the block succeeds, fsync that file and
    rename it over `path`. `path` then holds its old content or the whole new file, never a part of one. On any
    error (KeyboardInterrupt included) the temporary file is removed and `path` is left as it was. Every file
    sparsert writes (models, checkpoints, JSON results, plots) goes through here."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: folder {directory} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"cannot write {path}: it is a folder")
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable; not possible on every platform
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path, doc, *, indent: int = 2) -> None:
    """`doc` as JSON text at `path`, written through `atomic_output`."""
    with atomic_output(path) as tmp:
        with open(tmp, "w") as handle:
            json.dump(doc, handle, indent=indent)
            handle.write("\n")


def torch_save(obj, path) -> None:
    """torch.save through `atomic_output`: never a half-written checkpoint."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def save_figure(fig, path, *, dpi: int = 110) -> None:
    """A matplotlib figure as PNG at `path`, through `atomic_output` (the temp name has no .png suffix, so the
    format is given)."""
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


# ------------------------------------------------------------------------------------------------ load
def load(path, *, trust_arch: bool = False) -> nn.Module:
    """Rebuild the model saved at `path`: eval mode, on CPU, ready to run without any other file.

    The architecture factory named in the file is called only when `arch.is_trusted` admits it
    (nn.Module classes, torchvision builders, sparsert's factories) or `trust_arch=True`.
    ValueError naming the file for anything that is not an intact sparsert file of this format version."""
    path = os.fspath(path)
    metadata, tensors = _read(path)
    doc = _parse_doc(metadata, path)
    try:
        return _rebuild(doc, tensors, trust_arch=trust_arch, source=path)
    except ValueError as exc:
        if path in str(exc):
            raise
        raise ValueError(f"{path}: {exc}") from exc
    except (KeyError, TypeError, IndexError, AttributeError, RuntimeError, NotImplementedError) as exc:
        raise ValueError(f"{path}: does not describe a model this sparsert can rebuild "
                         f"({type(exc).__name__}: {exc})") from exc


def read_info(path) -> dict:
    """The metadata of a sparsert file (format version, writer version, arch, layer records), checked
    like `load` checks it, without building the model."""
    path = os.fspath(path)
    metadata, _ = _read(path, with_tensors=False)
    doc = _parse_doc(metadata, path)
    return {"format_version": int(metadata[KEY_VERSION]), "sparsert_version": metadata.get(KEY_SPARSERT, "?"),
            **doc}


def is_sparsert_file(path) -> bool:
    """True when `path` is a readable safetensors file marked as a sparsert model (any version)."""
    try:
        with safetensors.safe_open(os.fspath(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(KEY_FORMAT) == FORMAT_NAME
    except Exception:
        return False


def _read(path: str, with_tensors: bool = True):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such sparsert model file")
    try:
        with safetensors.safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            ours = metadata.get(KEY_FORMAT) == FORMAT_NAME and metadata.get(KEY_VERSION) == str(FORMAT_VERSION)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if ours and with_tensors else {}
    except Exception as exc:  # SafetensorError: truncated file, garbage header, not safetensors at all
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt ({exc})") from exc
    if metadata.get(KEY_FORMAT) != FORMAT_NAME:
        raise ValueError(f"{path}: a safetensors file but not a sparsert model (no '{KEY_FORMAT}' = "
                         f"'{FORMAT_NAME}' metadata); sparsert.load reads files written by sparsert.save")
    version = metadata.get(KEY_VERSION, "")
    if version != str(FORMAT_VERSION):
        from . import __version__
        newer = version.isdigit() and int(version) > FORMAT_VERSION
        raise ValueError(f"{path}: sparsert file format version {version or '(missing)'}, but sparsert "
                         f"{__version__} reads only version {FORMAT_VERSION}"
                         + ("; upgrade sparsert to load it" if newer else ""))
    if with_tensors and metadata.get(KEY_DIGEST) != _digest(tensors):
        raise ValueError(f"{path}: tensor data does not match its recorded sha256 digest; the file is corrupt")
    return metadata, tensors


def _parse_doc(metadata: dict[str, str], path: str) -> dict:
    try:
        doc = json.loads(metadata[KEY_MODEL])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt sparsert metadata: '{KEY_MODEL}' is missing or not JSON ({exc})") \
            from exc
    if not (isinstance(doc, dict) and isinstance(doc.get("arch"), dict) and isinstance(doc.get("layers"), dict)
            and isinstance(doc.get("aliases", {}), dict) and isinstance(doc.get("folded_batchnorm", []), list)
            and isinstance(doc.get("absent", []), list) and isinstance(doc.get("fused", False), bool)):
        raise ValueError(f"{path}: corrupt sparsert metadata: '{KEY_MODEL}' lacks the arch/layers records")
    return doc


def _rebuild(doc: dict, tensors: dict[str, torch.Tensor], *, trust_arch: bool, source: str = "") -> nn.Module:
    spec = arch_mod.parse(doc["arch"])
    if not trust_arch and not arch_mod.is_trusted(spec):
        raise ValueError(f"{source}: its architecture factory {spec.factory!r} is neither an nn.Module class nor a "
                         f"known model builder, and loading calls it with arguments taken from the file; if you "
                         f"trust this file, pass trust_arch=True (CLI: --trust-arch)")
    fused = doc.get("fused", False)
    model = arch_mod.build(spec)
    # Parents before children; a record never sits under another record (save skips replaced subtrees).
    for name, record in sorted(doc["layers"].items(), key=lambda item: item[0].count(".")):
        if not name:
            raise ValueError("a layer record replaces the model's root module")
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            raise ValueError(f"layer '{name}': the architecture {spec} has no module '{parent_name}'") from None
        if not hasattr(parent, child):
            raise ValueError(f"layer '{name}': the architecture {spec} has no such module")
        # Fused files are rebuilt unfused: fusion below sets the relu flags again.
        setattr(parent, child, _module_from_record(name, record, tensors, relu=record.get("relu") and not fused))
    state = dict(tensors)
    for name, target in doc.get("aliases", {}).items():
        state[name] = tensors[target]
    absent = tuple(name + "." for name in doc.get("absent", []))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)  # assign: keep dtypes
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"the stored tensors do not fit the architecture {spec}: {exc}") from exc
    missing = [key for key in missing if not key.startswith(absent)]
    if missing or unexpected:
        raise ValueError(f"the stored tensors do not fit the architecture {spec}: {len(missing)} missing "
                         f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    if fused:
        model = _refuse(model, doc, state)
    model.eval()
    setattr(model, arch_mod.ARCH_ATTRIBUTE, spec)
    return model


def _refuse(model: nn.Module, doc: dict, state: dict) -> nn.Module:
    """Run the epilogue fusion again and check it reproduces the saved graph."""
    from .fuse import fuse_epilogues
    fused = fuse_epilogues(model)
    if not isinstance(fused, torch.fx.GraphModule) or _graph_digest(fused) != doc.get("graph_sha256"):
        raise ValueError("fusing the rebuilt layers does not reproduce the saved graph (written by an "
                         "incompatible sparsert version?)")
    modules = dict(fused.named_modules())
    for name, record in doc["layers"].items():
        if record["kind"].startswith("sparse_") and bool(modules[name].relu) != bool(record["relu"]):
            raise ValueError(f"layer '{name}': fused relu flag {modules[name].relu}, the file says {record['relu']}")
    if set(fused.state_dict()) != set(state):
        raise ValueError("the fused graph's state does not match the stored tensors")
    return fused


def _module_from_record(name: str, record: dict, tensors: dict[str, torch.Tensor], relu: bool) -> nn.Module:
    kind = record["kind"]
    if kind == "identity":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(record["in_features"], record["out_features"], bias=record["bias"])
    if kind == "conv2d":
        return nn.Conv2d(record["in_channels"], record["out_channels"], _ints(record["kernel_size"]),
                         stride=_ints(record["stride"]), padding=_padding(record["padding"]),
                         dilation=_ints(record["dilation"]), groups=record["groups"], bias=record["bias"],
                         padding_mode=record["padding_mode"])
    if kind in _BATCHNORMS:
        return _BATCHNORMS[kind](record["num_features"], eps=record["eps"], momentum=record["momentum"],
                                 affine=record["affine"], track_running_stats=record["track_running_stats"])
    if kind in ("sparse_linear", "sparse_conv2d"):
        return _sparse_from_record(name, record, tensors, relu)
    raise ValueError(f"layer '{name}': unknown layer kind {kind!r}")


def _sparse_from_record(name: str, record: dict, tensors: dict[str, torch.Tensor], relu: bool) -> nn.Module:
    try:
        values, indices, indptr, bias = (tensors[f"{name}.{key}"]
                                         for key in ("values", "indices", "indptr", "bias_or_zeros"))
    except KeyError as exc:
        raise ValueError(f"layer '{name}': sparse array {exc} is missing from the file") from None
    data = values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
    cls = BSR if record["format"] == "bsr" else CSR
    if record["format"] not in ("csr", "bsr"):
        raise ValueError(f"layer '{name}': unknown sparse format {record['format']!r}")
    try:
        fmt = cls(data.numpy(), indices.numpy(), indptr.numpy(), _ints(record["sparse_shape"]),
                  _ints(record["block_shape"]))
        fmt.check(full=True)
    except ValueError as exc:
        raise ValueError(f"layer '{name}': invalid {record['format'].upper()} arrays: {exc}") from exc
    bias_arg = bias.float() if record["has_bias"] else None
    common = dict(backend=record["backend"], relu=bool(relu), layer_name=record["layer_name"])
    if record["kind"] == "sparse_linear":
        return SparseLinear(fmt, bias_arg, **common)
    return SparseConv2d(fmt, bias_arg, in_channels=record["in_channels"], kernel_size=_ints(record["kernel_size"]),
                        stride=_ints(record["stride"]), padding=_padding(record["padding"]),
                        dilation=_ints(record["dilation"]), groups=record["groups"],
                        padding_mode=record["padding_mode"], **common)


def _ints(values) -> tuple[int, ...]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"expected a list of integers, got {values!r}")
    return tuple(values)


def _padding(value):
    return value if isinstance(value, str) else _ints(value)


__all__ = ["FORMAT_VERSION", "is_sparsert_file", "load", "read_info", "save"]
