"""edgens: anytime, fault-tolerant ensembles for edge devices.

Importing ``edgens`` is light on purpose (no torch): the on-device runtime (``edgens.runtime``) and the CLI's
``--help`` must work without it. Training, stacks and export import torch in their own modules.
"""

__version__ = "0.1.0"

from edgens.errors import EdgensError  # noqa: E402  (re-exported for users: `except edgens.EdgensError`)

__all__ = ["EdgensError", "__version__"]
