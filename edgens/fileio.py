"""Atomic file writes, the cleanup of what dead writers left, and checksums (standard library only; the torch-free
runtime uses them too).

A file written here is either the old version or the complete new one, never half of it: the data goes to a
temporary file in the same directory, is flushed to disk, and is renamed over the destination (rename is atomic on
POSIX file systems within one directory).

The one cleanup rule: every temporary file or directory is named after its destination and the id of the process
writing it (``.NAME.PID.XXXX.tmp``, ``.NAME.partial-PID``, ``.NAME.old-PID``). An interrupted write removes its own;
a killed process cannot, so whoever next writes NAME in that directory removes the temporaries of NAME whose
process is gone (:func:`remove_stale_temporaries`), and never those of a live process. (A process id can be reused
by an unrelated live process; its debris is then kept until that process ends: the safe side.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from edgens.errors import DataNotFoundError, NotWritableError

log = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file atomically: ``write`` gets a binary file object; the result is renamed into place.

    Returns:
        The destination path.
    """
    path = Path(path)
    make_directory(path.parent)
    remove_stale_temporaries(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave the temporary file behind.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path


def make_directory(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p path``, with a one-line error.

    Raises:
        NotWritableError: it cannot be made (a file in the way, no permission, a read-only file system).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NotWritableError(f"cannot create the directory {path}: {err.strerror or err}") from None
    return path


def check_can_create(path: str | os.PathLike[str]) -> None:
    """Check, before long work, that ``path`` (a file or directory to be made, or replaced) can be created: its
    nearest existing ancestor is a directory that takes a new file.

    Raises:
        NotWritableError: an ancestor is a file, or the directory cannot be written.
    """
    path = Path(path)
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotWritableError(f"cannot create {path}: {ancestor} is not a directory")
    _probe(ancestor, path)


def _probe(directory: Path, path: Path) -> None:
    """Create and remove a temporary file in ``directory`` (for a write of ``path``)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise NotWritableError(f"cannot write {path}: {err.strerror or err}; make {directory} writable or choose "
                               f"another place") from None


def check_writable(path: str | os.PathLike[str]) -> None:
    """Check, before long work, that :func:`atomic_write` will be able to write ``path``: its directory exists and
    takes a new file (tried, as permissions alone do not tell: root ignores them, a read-only mount does not), and
    ``path`` is not a directory.

    Raises:
        DataNotFoundError: the directory does not exist.
        NotWritableError: it cannot be written, or ``path`` is a directory.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise DataNotFoundError(f"{path.parent} does not exist or is not a directory")
    if path.is_dir():
        raise NotWritableError(f"cannot write {path}: it is a directory; remove it or choose another place")
    _probe(path.parent, path)


def temporary_path(path: str | os.PathLike[str], kind: str) -> Path:
    """The temporary sibling of ``path`` that this process uses for ``kind`` (``partial``, ``old``) of a directory
    written whole, e.g. ``.bundle.partial-1234``."""
    path = Path(path)
    return path.parent / f".{path.name}.{kind}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of ``path`` (see the module docstring) left by processes that no longer exist.

    Returns:
        What was removed.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)\..*\.tmp|(?:partial|old)-(\d+))$")
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or _pid_alive(int(match.group(1) or match.group(2))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        log.info("removed %s, left by a process that no longer runs", entry)
        removed.append(entry)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (with a final newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 digest of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
