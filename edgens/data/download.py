"""Download a file and check its contents against a known sha256 (standard library only)."""

from __future__ import annotations

import gzip
import hashlib
import logging
import urllib.error
import urllib.request
from pathlib import Path

from edgens.errors import DataNotFoundError
from edgens.fileio import atomic_write_bytes

log = logging.getLogger(__name__)


def payload_digest(data: bytes, decompress: bool, algorithm: str = "sha256") -> str:
    """Hex digest of the payload: of the decompressed bytes when ``decompress`` (a .gz IDX file).

    Checksumming the decompressed bytes makes a re-compressed mirror (Debian's copy, say) match the official files.
    """
    return hashlib.new(algorithm, gzip.decompress(data) if decompress else data).hexdigest()


def download_verified(urls: list[str], destination: Path, digest: str, algorithm: str = "sha256",
                      decompress: bool = False, timeout_s: float = 60.0) -> Path:
    """Fetch the first of ``urls`` that answers with the expected payload and write it atomically.

    ``digest`` is the expected hex digest (``algorithm``) of the file, or of its decompressed bytes with
    ``decompress``.

    Raises:
        DataNotFoundError: no URL gave a file with the expected checksum; the message lists what each one did.
    """
    failures = []
    for url in urls:
        try:
            log.info("downloading %s", url)
            with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (URLs are ours or the user's)
                data = response.read()
        except (urllib.error.URLError, OSError, ValueError) as err:
            failures.append(f"{url}: {err}")
            continue
        try:
            got = payload_digest(data, decompress, algorithm)
        except (OSError, EOFError) as err:
            failures.append(f"{url}: not a valid gzip file ({err})")
            continue
        if got != digest:
            failures.append(f"{url}: {algorithm} {got[:16]}..., expected {digest[:16]}...")
            continue
        return atomic_write_bytes(destination, data)
    raise DataNotFoundError(f"could not download {destination.name}: " + "; ".join(failures))
