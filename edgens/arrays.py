"""Reading numpy files with errors that name the file and say what to do (numpy and the standard library only).

Every numpy file the project reads goes through :func:`load_array`: run outputs (``outputs/*.npy``), ``edgens infer
--input`` files, ``npz:`` data sets and a bundle's calibration data. A truncated, corrupt or foreign file is a
one-line error of the caller's choosing, never a numpy traceback.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgens.errors import DataNotFoundError, EdgensError

# What np.load raises for a file that is not a complete numpy file (truncated, corrupt, pickled objects).
UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile)


def load_array(path: str | os.PathLike[str], error: type[EdgensError], fix: str, mmap_mode: str | None = None) -> Any:
    """``np.load(path)`` without pickles: an array (``.npy``) or an open archive (``.npz``).

    Args:
        path: the file.
        error: the error class for an unreadable file (e.g. RunDirectoryError, InputError).
        fix: what the user can do about it, appended to the message.
        mmap_mode: as for ``np.load`` (``.npy`` only).

    Raises:
        DataNotFoundError: the file does not exist.
        error: the file is not a readable numpy file (the message names it and says ``fix``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{path}: no such file; {fix}")
    try:
        with open(path, "rb") as handle:
            is_zip = handle.read(4) == b"PK\x03\x04"  # what np.load looks for to read an .npz
        if is_zip:  # open its index first: np.load leaks the open file when a damaged index fails it
            with zipfile.ZipFile(path):
                pass
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except UNREADABLE as err:
        raise error(f"{path}: not a readable numpy file ({type(err).__name__}: {err}); {fix}") from None
