"""Where edgens looks for data sets on disk."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    """edgens' cache directory for downloaded data ($XDG_CACHE_HOME/edgens, else ~/.cache/edgens)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgens"


def candidate_dirs(data_dir: str | os.PathLike[str] | None, subdir: str) -> list[Path]:
    """Directories searched, in order: ``--data-dir``, ``$EDGENS_DATA``, the user cache.

    Each is searched as given and with ``subdir`` appended (e.g. ``fashion-mnist``).
    """
    roots = [Path(p) for p in (data_dir, os.environ.get("EDGENS_DATA")) if p] + [user_cache_dir()]
    return [d for root in roots for d in (root, root / subdir)]


def download_dir(data_dir: str | os.PathLike[str] | None, subdir: str) -> Path:
    """Where a download goes: ``--data-dir/subdir`` when given, else the user cache."""
    return (Path(data_dir) if data_dir else user_cache_dir()) / subdir
