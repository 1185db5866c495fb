"""Triton's system shared-memory extension: local clients register a POSIX shared-memory region (``/dev/shm``) once,
then requests name it instead of carrying tensor bytes (tritonclient.utils.shared_memory creates such regions).

A region is a registered name for ``byte_size`` bytes at ``offset`` in the shared-memory object ``key``. Every read
and write is checked against the region's bounds, so a request can only touch bytes of a region that was registered
(beyond loopback, registering needs the server's token, as every endpoint but the health checks does). The server
maps only objects under /dev/shm that are regular files, never following a link. Unregistering a region while a
request still uses it is safe: the request finishes with its own reference, and the mapping is closed after it.
Every region is closed at shutdown.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import threading
from pathlib import Path
from typing import Any

from edgens.checks import shown
from edgens.serve.protocol import ProtocolError, RegionUse

SHM_ROOT = Path("/dev/shm")
KEY_PATTERN = re.compile(r"/?[A-Za-z0-9_.\-]{1,250}")  # shm_open's names: one path component
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


class Region:
    """One registered region: its mapping, and how many requests hold it."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int, mapping: mmap.mmap):
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        self.mapping = mapping
        self.users = 0
        self.unregistered = False

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def span(self, use: RegionUse, what: str) -> slice:
        """The bytes of ``use`` in the mapping, after checking them against the region's bounds."""
        if use.offset < 0 or use.byte_size < 0 or use.offset + use.byte_size > self.byte_size:
            raise ProtocolError(f"{what}: {use.byte_size} bytes at offset {use.offset} do not fit shared-memory region "
                                f"{self.name!r} of {self.byte_size} bytes")
        start = self.offset + use.offset
        return slice(start, start + use.byte_size)


class SharedMemoryRegions:
    """The registered regions of one server, by name (thread-safe)."""

    def __init__(self, root: Path = SHM_ROOT):
        self.root = root
        self._lock = threading.Lock()
        self._regions: dict[str, Region] = {}

    def register(self, name: Any, key: Any, offset: Any, byte_size: Any) -> None:
        """Map ``byte_size`` bytes at ``offset`` of the shared-memory object ``key`` as region ``name``.

        Raises:
            ProtocolError: a bad name, key or bound, a name already registered, or an object that is not there.
        """
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise ProtocolError(f"region name: expected letters, digits, '_', '.' or '-', got {shown(name)}")
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key) or key.strip("/") in (".", ".."):
            raise ProtocolError(f"key: expected a shared-memory object's name such as '/input0', got {shown(key)}")
        for label, value in (("offset", offset), ("byte_size", byte_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ProtocolError(f"{label}: expected a whole number of bytes >= 0, got {shown(value)}")
        if byte_size == 0:
            raise ProtocolError("byte_size: expected at least one byte")
        path = self.root / key.lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as err:
            raise ProtocolError(f"cannot open shared-memory object {key!r}: {err.strerror}", 400) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ProtocolError(f"shared-memory object {key!r} is not a shared-memory file")
            if offset + byte_size > info.st_size:
                raise ProtocolError(f"region {name!r}: {byte_size} bytes at offset {offset} exceed the "
                                    f"{info.st_size} bytes of shared-memory object {key!r}")
            mapping = mmap.mmap(fd, info.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        with self._lock:
            if name in self._regions:
                mapping.close()
                raise ProtocolError(f"shared-memory region {name!r} is already registered; unregister it first")
            self._regions[name] = Region(name, key, offset, byte_size, mapping)

    def unregister(self, name: str | None = None) -> list[str]:
        """Unregister region ``name`` (None: every region); regions in use close when their last request ends.

        Raises:
            ProtocolError: 404, no region of that name.
        """
        with self._lock:
            if name is not None and name not in self._regions:
                raise ProtocolError(f"no shared-memory region {name!r} is registered", 404)
            names = [name] if name is not None else list(self._regions)
            for region in (self._regions.pop(n) for n in names):
                region.unregistered = True
                if region.users == 0:
                    region.mapping.close()
        return names

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        """The registered regions (``name``: that one).

        Raises:
            ProtocolError: 404, no region of that name.
        """
        with self._lock:
            if name is not None:
                if name not in self._regions:
                    raise ProtocolError(f"no shared-memory region {name!r} is registered", 404)
                return [self._regions[name].status()]
            return [region.status() for region in self._regions.values()]

    def read(self, use: RegionUse, what: str) -> bytes:
        """A copy of the bytes ``use`` names (the client may reuse the region as soon as it has its answer).

        Raises:
            ProtocolError: an unknown region or bytes beyond it.
        """
        with self._lock:
            region = self._region(use.name, what)
            return bytes(region.mapping[region.span(use, what)])

    def hold(self, use: RegionUse, what: str) -> Region:
        """Keep the region of an output alive until :meth:`write` (it may be unregistered meanwhile).

        Raises:
            ProtocolError: an unknown region or bytes beyond it.
        """
        with self._lock:
            region = self._region(use.name, what)
            region.span(use, what)
            region.users += 1
            return region

    def write(self, region: Region, use: RegionUse, data: bytes, what: str) -> None:
        """Write an output held with :meth:`hold` into its region, and let go of it.

        Raises:
            ProtocolError: the output is larger than the bytes the request gave for it.
        """
        try:
            if len(data) > use.byte_size:
                raise ProtocolError(f"{what}: the output has {len(data)} bytes, more than the "
                                    f"shared_memory_byte_size {use.byte_size} given for it")
            start = region.span(use, what).start
            region.mapping[start:start + len(data)] = data
        finally:
            self.release(region)

    def release(self, region: Region) -> None:
        with self._lock:
            region.users -= 1
            if region.unregistered and region.users == 0:
                region.mapping.close()

    def close(self) -> None:
        """Unregister every region (at shutdown)."""
        self.unregister()

    def _region(self, name: str, what: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise ProtocolError(f"{what}: no shared-memory region {name!r} is registered")
        return region
