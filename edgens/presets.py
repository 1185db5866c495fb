"""Named ensemble configurations (one registry): ``create_stack("mlp-256x4", input_shape, n_outputs)``.

MLP presets are written ``mlp-MxH``: M members of H hidden units; on Fashion-MNIST each has ~815K parameters in all,
as in the paper. ``cnn-10`` is the paper's CIFAR-10 ensemble; ``densenet-D-KxM`` are its CIFAR-100 DenseNet-BC
ensembles (depth D, growth rate K, M members).
"""

from __future__ import annotations

from typing import Any

from edgens.errors import ConfigError, unknown_choice
from edgens.stack_spec import StackSpec

PRESETS: dict[str, dict[str, Any]] = {
    "mlp-1x1024": {"kind": "mlp", "n_members": 1, "options": {"hidden": (1024,)}},
    "mlp-16x64": {"kind": "mlp", "n_members": 16, "options": {"hidden": (64,)}},
    "mlp-64x16": {"kind": "mlp", "n_members": 64, "options": {"hidden": (16,)}},
    "mlp-256x4": {"kind": "mlp", "n_members": 256, "options": {"hidden": (4,)}},
    "cnn-10": {"kind": "cnn", "n_members": 10,
               "options": {"channels": (32, 64, 64, 128, 128), "strides": (1, 2, 1, 2, 1), "batch_norm": True}},
    "densenet-100-12x4": {"kind": "densenet", "n_members": 4, "options": {"depth": 100, "growth": 12}},
    "densenet-82-8x8": {"kind": "densenet", "n_members": 8, "options": {"depth": 82, "growth": 8}},
    "densenet-64-6x16": {"kind": "densenet", "n_members": 16, "options": {"depth": 64, "growth": 6}},
}
DEFAULT_PRESET = "mlp-256x4"


def check_preset(name: str) -> str:
    """Return ``name`` if it is a preset.

    Raises:
        ConfigError: unknown name; the message lists the valid ones.
    """
    if name not in PRESETS:
        raise unknown_choice("preset", name, list(PRESETS))
    return name


def preset_spec(name: str, input_shape: tuple[int, ...], n_outputs: int, n_members: int | None = None,
                **options: Any) -> StackSpec:
    """The :class:`~edgens.stack_spec.StackSpec` of a preset for the given data, with optional overrides.

    Raises:
        ConfigError: unknown preset or bad override.
    """
    preset = PRESETS[check_preset(name)]
    members = preset["n_members"] if n_members is None else int(n_members)
    if members < 1:
        raise ConfigError(f"member count must be >= 1, got {members}")
    return StackSpec(preset["kind"], members, tuple(int(s) for s in input_shape), int(n_outputs),
                     {**preset["options"], **options})


def create_stack(name: str, input_shape: tuple[int, ...], n_outputs: int, n_members: int | None = None,
                 **options: Any):
    """Build a freshly initialised stack from a preset name (see :func:`preset_spec`)."""
    from edgens.stacks import build_stack

    return build_stack(preset_spec(name, input_shape, n_outputs, n_members, **options))
