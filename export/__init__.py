"""edgens.export: turn a trained run into a deployment bundle (ONNX member stacks, optional TensorRT engines, and a
manifest the torch-free runtime reads).

    from edgens.export import ExportOptions, export_bundle
    report = export_bundle("runs/default", "bundle", ExportOptions(stack_size=16))

Importing this package is light; torch and onnx are imported by the functions that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgens.export.bundle import ExportOptions, ExportReport, export_bundle
    from edgens.export.engines import add_tensorrt

__all__ = ["ExportOptions", "ExportReport", "add_tensorrt", "export_bundle"]


def __getattr__(name: str) -> Any:
    # Lazy: `import edgens.export` must not import torch (the CLI's --help imports command modules).
    if name in ("ExportOptions", "ExportReport", "export_bundle"):
        from edgens.export import bundle

        return getattr(bundle, name)
    if name == "add_tensorrt":
        from edgens.export.engines import add_tensorrt

        return add_tensorrt
    raise AttributeError(f"module 'edgens.export' has no attribute {name!r}")
