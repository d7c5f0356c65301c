"""Architecture specs: how a saved model names the code that builds its nn.Module.

A spec is a factory plus JSON keyword arguments:

    "torchvision.models:resnet18"  + {"num_classes": 10}    an importable module and attribute
    "path/to/net.py:Net"           + {}                      a Python file and attribute

`build` calls the factory and checks that it returns an nn.Module. Every model built here carries its
spec as `model._sparsert_arch`, so `sparsert.save` knows how to rebuild it (deepcopy keeps it).

Loading a .sparse file calls the factory named inside the file. That is code execution chosen by the
file, so `is_trusted` admits only nn.Module classes, torchvision's registered model builders and
sparsert's own factories; anything else (a plain function, any .py file) needs an explicit opt-in.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

ARCH_ATTRIBUTE = "_sparsert_arch"

# Plain-function factories that are safe to call with kwargs read from a file.
TRUSTED_FACTORIES = frozenset({
    "sparsert.models:cifar_resnet18", "sparsert.models:mlp",
    "sparsert.demo:digits_cnn", "sparsert.demo:digits_mlp",
})


@dataclass(frozen=True)
class ArchSpec:
    """`factory` is 'module.path:attr' or '/absolute/path/file.py:attr'; `kwargs` must be JSON-serialisable."""

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_file(self) -> bool:
        return _is_file_target(self.factory.rpartition(":")[0])

    def to_dict(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": dict(self.kwargs)}

    def __str__(self) -> str:
        return self.factory + (f" {json.dumps(self.kwargs, sort_keys=True)}" if self.kwargs else "")

    def build(self) -> nn.Module:
        return build(self)


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def parse(spec, kwargs=None) -> ArchSpec:
    """ArchSpec from 'module:factory' / 'file.py:factory' (+ kwargs as a dict or a JSON object string),
    a {'factory', 'kwargs'} dict, or an ArchSpec. File paths are made absolute. ValueError when malformed."""
    if isinstance(spec, ArchSpec):
        base, base_kwargs = spec.factory, dict(spec.kwargs)
    elif isinstance(spec, dict):
        if not isinstance(spec.get("factory"), str):
            raise ValueError(f"arch spec {spec!r}: expected a dict with a 'factory' string")
        base, base_kwargs = spec["factory"], spec.get("kwargs") or {}
        if not isinstance(base_kwargs, dict):
            raise ValueError(f"arch spec {spec!r}: 'kwargs' must be a JSON object")
    elif isinstance(spec, str):
        base, base_kwargs = spec.strip(), {}
    else:
        raise ValueError(f"arch spec must be a string like 'torchvision.models:resnet18', got {type(spec).__name__}")
    target, _, attr = base.rpartition(":")
    if not target or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise ValueError(f"arch spec {base!r} must look like 'package.module:factory' or 'path/to/file.py:factory'")
    if _is_file_target(target):
        target = os.path.abspath(os.path.expanduser(target))
    elif not all(part.isidentifier() for part in target.split(".")):
        raise ValueError(f"arch spec {base!r}: {target!r} is not a module path")
    merged = dict(base_kwargs)
    merged.update(parse_kwargs(kwargs, base))
    try:
        json.dumps(merged)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"arch spec {base!r}: kwargs must be JSON-serialisable ({exc})") from exc
    return ArchSpec(f"{target}:{attr}", merged)


def parse_kwargs(kwargs, spec_name: str = "arch") -> dict[str, Any]:
    """None, a dict, or a JSON object string -> dict."""
    if kwargs is None or kwargs == "":
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"arch spec {spec_name!r}: kwargs {kwargs!r} are not valid JSON ({exc})") from exc
    if not isinstance(kwargs, dict):
        raise ValueError(f"arch spec {spec_name!r}: kwargs must be a JSON object like '{{\"num_classes\": 10}}', "
                         f"got {kwargs!r}")
    return dict(kwargs)


def resolve(spec) -> Callable[..., Any]:
    """The factory object a spec names (imports its module or executes its file). ValueError if missing."""
    spec = parse(spec)
    target, _, attr = spec.factory.rpartition(":")
    module = _import_file(target, spec) if spec.is_file else _import_module(target, spec)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"arch spec {spec.factory!r}: {target} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"arch spec {spec.factory!r}: {attr} is a {type(obj).__name__}, not a callable factory")
    return obj


def _import_module(name: str, spec: ArchSpec):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"arch spec {spec.factory!r}: module {name!r} cannot be imported ({exc})") from exc
    except Exception as exc:  # the module itself is broken: say so instead of a bare traceback
        raise ValueError(f"arch spec {spec.factory!r}: importing {name!r} failed: {type(exc).__name__}: {exc}") \
            from exc


def _import_file(path: str, spec: ArchSpec):
    if not os.path.isfile(path):
        raise ValueError(f"arch spec {spec.factory!r}: file {path} does not exist")
    # One module object per file, so repeated builds share classes (type checks compare them).
    name = "sparsert_arch_" + hashlib.sha1(path.encode()).hexdigest()[:16]
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ValueError(f"arch spec {spec.factory!r}: executing {path} failed: {type(exc).__name__}: {exc}") \
            from exc
    return module


def build(spec, kwargs=None) -> nn.Module:
    """Call the factory with its kwargs; the result must be an nn.Module. It is tagged with its spec."""
    spec = parse(spec, kwargs)
    factory = resolve(spec)
    try:
        model = factory(**spec.kwargs)
    except TypeError as exc:
        raise ValueError(f"arch spec {spec.factory!r}: calling it with kwargs {spec.kwargs} failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"arch spec {spec.factory!r} returned a {type(model).__name__}, not a torch.nn.Module")
    setattr(model, ARCH_ATTRIBUTE, spec)
    return model


def spec_of(model: nn.Module) -> ArchSpec | None:
    """The spec a model was built from (set by `build`, or by hand), or None."""
    spec = getattr(model, ARCH_ATTRIBUTE, None)
    return parse(spec) if spec is not None else None


def is_trusted(spec) -> bool:
    """Whether calling the spec's factory with arbitrary JSON kwargs is safe enough to do unasked:
    nn.Module subclasses, torchvision's registered model builders, and sparsert's own factories.
    Files are never trusted (executing them is arbitrary code)."""
    spec = parse(spec)
    if spec.is_file:
        return False
    if spec.factory in TRUSTED_FACTORIES:
        return True
    module_name, _, attr = spec.factory.rpartition(":")
    try:
        obj = resolve(spec)  # imports an installed module: code the user already has, not code from the file
    except ValueError:
        return False
    if inspect.isclass(obj) and issubclass(obj, nn.Module):
        return True
    if module_name == "torchvision.models" or module_name.startswith("torchvision.models."):
        import torchvision.models
        return "." not in attr and attr in set(torchvision.models.list_models())
    return False
