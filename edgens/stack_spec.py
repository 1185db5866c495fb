"""What a member stack is, as data: kind, member count, input and output sizes, options (stdlib only).

Kept apart from :mod:`edgens.stacks` (which builds the torch modules) so that torch-free code (presets, the run
directory reader, the CLI) can name and compare stacks without importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StackSpec:
    """Everything needed to build a stack: its kind, member count, input and output sizes, kind-specific options."""

    kind: str
    n_members: int
    input_shape: tuple[int, ...]
    n_outputs: int
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for config.json and checkpoints)."""
        return {"kind": self.kind, "n_members": self.n_members, "input_shape": list(self.input_shape),
                "n_outputs": self.n_outputs, "options": {k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in self.options.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StackSpec:
        """Inverse of :meth:`to_dict`."""
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in data.get("options", {}).items()}
        return cls(data["kind"], int(data["n_members"]), tuple(data["input_shape"]), int(data["n_outputs"]),
                   options)

    def with_members(self, n_members: int) -> StackSpec:
        """The same architecture with another member count."""
        return dataclasses.replace(self, n_members=n_members)
