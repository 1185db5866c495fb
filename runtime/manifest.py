"""Deprecated: the bundle format moved to :mod:`edgens.runtime.bundle`; this module re-exports it for one release
(``from edgens.runtime.bundle import ...`` instead)."""

from edgens.runtime.bundle import *  # noqa: F403
from edgens.runtime.bundle import __all__  # noqa: F401
