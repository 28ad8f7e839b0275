"""The serving formats (backends): one module each in this package, found by pkgutil.

A backend module defines `BACKEND = Backend(...)`: its name, the file it writes and loads, what it can do
(GPU, gradients, served by TorchServe), how export checks it (exact or a precision gate), and its export and
load functions. Adding a module here is all it takes to add a backend. Modules import torch, ONNX Runtime etc.
inside their functions: this package imports without them (the guard and the archive checks import no torch),
and a backend whose optional package is missing still lists, saying why in `available()`.
"""

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from model_src.manifest import Manifest


@dataclass
class ExportJob:
    """What an exporter starts from."""

    model: "torch.nn.Module"  # the eager model, eval mode
    # fuse_for_export(copy of model), eval mode: what traced/compiled formats start from
    fused: "torch.nn.Module"
    example: "torch.Tensor"  # a real validation batch (the check batch)
    calibration: (
        "Callable[[], Iterable[torch.Tensor]] | None"  # training-split batches (post-training quantisation)
    )
    manifest: "Manifest"  # what training and export know (model_args, class names, preprocessing, ...)


def usable() -> str | None:
    """Always usable: the `available` of a backend that needs no optional package."""
    return None


@dataclass(frozen=True)
class Backend:
    """One serving format: its file, what it can do, how export checks it, its export and load functions."""

    name: str  # "onnx", "torchscript", "eager", "int8", ...
    file: str  # the file it writes and loads, e.g. "model.onnx" (unique across backends)
    gpu: bool  # can run on CUDA (False: the handler runs it on the CPU even in a GPU worker)
    differentiable: (
        bool  # has gradients: explanations run on the served model; else on the eager weights beside it
    )
    server: bool  # TorchServe can serve it (False for the phone formats ptl/pte)
    exact: bool  # export check: max |Δprob| vs eager <= 1e-4 (True) or a precision gate (False: int8, bf16)
    precision: str  # "fp32", "bf16", "int8"
    export: Callable[[ExportJob, str], None]  # write the file at path
    # (path, device, threads) -> callable float (B, C, H, W) -> logits (B, K) float32 CPU tensor
    load: Callable[[str, str, int | None], Callable[..., Any]]
    available: Callable[[], str | None] = usable  # None if usable here, else why not (missing package, ...)
    # In the default export set. False: exported only when named (the OpenVINO variants: three conversions and
    # an int8 calibration that the digits quickstart does not need)
    default: bool = True
    runtime: str = ""  # what runs the file, in words (bench/mobile.py's rows); "" for the backend's name

    @property
    def runner(self) -> str:
        """What runs the file, in words: `runtime`, or else the backend's name."""
        return self.runtime or self.name


class BackendUnavailable(RuntimeError):
    """A backend's optional package (or hardware) is missing here."""


class ExportError(RuntimeError):
    """A backend cannot write its file for this model (an operator it cannot lower, ...)."""


_REGISTRY: dict[str, Backend] | None = None


def discover(package: str = __name__) -> dict[str, Backend]:
    """Every backend of the modules in `package`, by name: a module's `BACKEND`, or its `BACKENDS` when one
    file serves several precisions of one runtime (modules starting with "_" are helpers)."""
    found: dict[str, Backend] = {}
    files: dict[str, str] = {}
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        declared = getattr(module, "BACKENDS", None) or [getattr(module, "BACKEND", None)]
        for backend in (b for b in declared if isinstance(b, Backend)):
            for what, key, seen in (("name", backend.name, found), ("file", backend.file, files)):
                if key in seen:
                    raise RuntimeError(f"two backends have the {what} {key!r} ({package}.{info.name})")
            found[backend.name], files[backend.file] = backend, backend.name
    return found


def all_backends() -> dict[str, Backend]:
    """Every backend by name (discovered once per process; the dict is a copy)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = discover()
    return dict(_REGISTRY)


def served() -> dict[str, Backend]:
    """The backends TorchServe can serve (what an archive may ship)."""
    return {name: b for name, b in all_backends().items() if b.server}


def get(name: str) -> Backend:
    """The backend called `name`; ValueError naming the known ones otherwise."""
    backends = all_backends()
    if name not in backends:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(backends)}")
    return backends[name]


def by_file(file: str) -> Backend:
    """The backend that writes `file` (a base name): only where a file name is all there is (old archives)."""
    for backend in all_backends().values():
        if backend.file == file:
            return backend
    raise ValueError(
        f"{file!r} is the file of no backend; known: {sorted(b.file for b in all_backends().values())}"
    )


DEFAULT = (
    "onnx"  # what an archive serves unless told: ONNX Runtime served the most requests/s (docs/benchmarks.md)
)


def reference() -> Backend:
    """The eager weights: what export checks compare with, and what explanations of a backend without
    gradients run on. (Not named `eager`: importing the submodule eager sets that attribute of this
    package.)"""
    return get("eager")


def load(path: str, name: str, device: str = "cpu", threads: int | None = None):
    """The backend `name`'s file at `path`, loaded: a callable float batch -> logits."""
    backend = get(name)
    if why := backend.available():
        raise BackendUnavailable(f"the {name} backend cannot run here: {why}")
    return backend.load(path, device, threads)
