"""Member stacks: all members of an ensemble as one batched model, ``forward(x) -> (M, B, K)``.

Kinds: ``mlp``, ``cnn``, ``densenet``. Build one from a :class:`StackSpec` with :func:`build_stack`, or by preset
name with :func:`edgens.presets.create_stack`.
"""

from __future__ import annotations

from edgens.errors import unknown_choice
from edgens.stacks.base import MemberStack, StackSpec
from edgens.stacks.cnn import CNNStack
from edgens.stacks.densenet import DenseNetStack
from edgens.stacks.mlp import MLPStack

STACK_KINDS: dict[str, type[MemberStack]] = {cls.kind: cls for cls in (MLPStack, CNNStack, DenseNetStack)}

__all__ = ["STACK_KINDS", "CNNStack", "DenseNetStack", "MLPStack", "MemberStack", "StackSpec", "build_stack"]


def build_stack(spec: StackSpec) -> MemberStack:
    """Build a freshly initialised stack from its spec.

    Raises:
        ConfigError: unknown kind or bad options.
    """
    if spec.kind not in STACK_KINDS:
        raise unknown_choice("stack kind", spec.kind, list(STACK_KINDS))
    return STACK_KINDS[spec.kind](spec)
