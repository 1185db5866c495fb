"""Inference backends behind one interface (:mod:`edgens.runtime.backends.base`), and the factory that picks one.

Each backend lives in its own module and imports its heavy library (onnxruntime, tensorrt) only when used, so
importing this package costs nothing. To add a backend, write a module with a :class:`Backend` subclass and add it
to :data:`BACKENDS`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from pathlib import Path
from typing import Any

from edgens.errors import BackendUnavailableError, ConfigError, unknown_choice
from edgens.runtime.backends.base import Backend, StackRunner, describe_device
from edgens.runtime.bundle import Manifest

log = logging.getLogger(__name__)

# name -> "module:class", in the order `auto` tries them.
BACKENDS = {
    "tensorrt": "edgens.runtime.backends.tensorrt:TensorRTBackend",
    "onnxruntime": "edgens.runtime.backends.onnxruntime:OnnxRuntimeBackend",
}
CHOICES = ("auto", *BACKENDS)

__all__ = ["BACKENDS", "CHOICES", "Backend", "StackRunner", "backend_class", "create_backend", "describe_device"]


def backend_class(name: str) -> type[Backend]:
    """The class registered as ``name``.

    Raises:
        ConfigError: an unknown name (the message lists the valid ones).
    """
    if name not in BACKENDS:
        raise unknown_choice("backend", name, list(CHOICES))
    module_name, attribute = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), attribute)


def create_backend(name: str, bundle_dir: str | Path, manifest: Manifest, **options: Any) -> Backend:
    """Make the backend ``name`` for a bundle; ``auto`` picks the best that can run it here.

    ``auto`` takes TensorRT when it is installed and every general stack has an engine built for this GPU and
    TensorRT version, and onnxruntime otherwise (whose own provider order then prefers TensorRT EP and CUDA).

    Args:
        name: ``auto``, ``onnxruntime`` or ``tensorrt``.
        bundle_dir: the bundle.
        manifest: its manifest.
        **options: passed to the backend's constructor (e.g. ``providers``, ``threads`` for onnxruntime;
            ``precision`` for tensorrt). With ``auto``, only the options the chosen backend accepts are passed.

    Raises:
        ConfigError: an unknown backend name, or an option the named backend does not take.
        BackendUnavailableError: the backend (with ``auto``: every backend) cannot run here; the message says what
            to install.
    """
    if name != "auto":
        cls = backend_class(name)
        unknown = sorted(set(options) - set(_option_names(cls)))
        if unknown:
            raise ConfigError(f"the {name} backend has no option {', '.join(unknown)}; its options: "
                              f"{', '.join(_option_names(cls))}")
        return cls(bundle_dir, manifest, **options)
    reasons = []
    for candidate in BACKENDS:
        cls = backend_class(candidate)
        if candidate == "tensorrt" and not any(stack.engines for stack in manifest.stacks):
            reasons.append("tensorrt: the bundle has no engines")
            continue
        try:
            names = _option_names(cls)
            backend = cls(bundle_dir, manifest, **{k: v for k, v in options.items() if k in names})
        except BackendUnavailableError as err:
            reasons.append(f"{candidate}: {err}")
            continue
        if backend.can_run():
            log.info("backend auto: using %s", candidate)
            return backend
        reasons.append(f"{candidate}: no engines for this device")
    raise BackendUnavailableError("no inference backend can run this bundle here: " + "; ".join(reasons))


def _option_names(cls: type[Backend]) -> list[str]:
    """The keyword options a backend's constructor takes besides the bundle and its manifest."""
    return [name for name in inspect.signature(cls.__init__).parameters
            if name not in ("self", "bundle_dir", "manifest")]
