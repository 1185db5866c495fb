"""Checkpoint files: torch.save written atomically, loaded with clear errors."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from edgens.errors import DataNotFoundError, RunDirectoryError
from edgens.fileio import atomic_write_bytes


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Serialise ``state`` with torch.save and write it atomically (a crash leaves the previous checkpoint)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint onto ``device``.

    Raises:
        DataNotFoundError: the file is missing.
        RunDirectoryError: the file is not a readable checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"checkpoint {path} is missing")
    try:
        # weights_only=False: our checkpoints hold the optimiser state and metric history (plain Python objects).
        return torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        # a truncated or foreign file: torch.load raises any of these, depending on where the bytes end
        raise RunDirectoryError(f"{path} is not a readable checkpoint ({err})") from None
