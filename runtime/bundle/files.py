"""The bundle's files: reading and writing ``manifest.json`` (atomically), checking files against their size and
sha256, and reading the ``.npz`` files the manifest points to (calibration examples, self-test data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np

from edgens.arrays import UNREADABLE, load_array
from edgens.errors import BundleError, DataNotFoundError
from edgens.fileio import atomic_write_json, sha256_file
from edgens.runtime.bundle.json_reader import read_json_file
from edgens.runtime.bundle.manifest import Manifest
from edgens.runtime.bundle.types import MANIFEST_FILE, CalibrationInfo, SelfTestInfo


def load_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and check ``BUNDLE/manifest.json``.

    Raises:
        DataNotFoundError: the bundle directory or its manifest does not exist.
        BundleError: the manifest is not valid JSON or breaks the format (the message names the key).
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.is_dir():
        raise DataNotFoundError(f"bundle {bundle_dir} does not exist or is not a directory; expected a directory "
                                f"written by `edgens export` holding {MANIFEST_FILE}")
    if not path.is_file():
        raise DataNotFoundError(f"{path} does not exist; a bundle directory holds {MANIFEST_FILE} (written by "
                                f"`edgens export`)")
    data = read_json_file(path)
    return Manifest.from_dict(data, source=str(path))


def write_manifest(bundle_dir: str | Path, manifest: Manifest) -> Path:
    """Check ``manifest`` and write it to ``BUNDLE/manifest.json`` atomically.

    The manifest goes through the same checks as reading, so a bundle that writes is a bundle that loads.

    Returns:
        The path written.

    Raises:
        BundleError: the manifest breaks the format (the message names the key).
    """
    data = manifest.to_dict()
    Manifest.from_dict(data, source=f"manifest to write to {bundle_dir}")
    return atomic_write_json(Path(bundle_dir) / MANIFEST_FILE, data)


def check_file(bundle_dir: str | Path, relative: str, sha256: str, size: int | None = None) -> str | None:
    """Check that a bundle file exists and matches its size and sha256.

    Returns:
        None if it does, else a short description of the problem (for a warning or an error).
    """
    path = Path(bundle_dir) / relative
    if not path.is_file():
        return f"{relative} is missing"
    if size is not None and path.stat().st_size != size:
        # Cheaper than hashing, and a clearer message for a truncated copy.
        return f"{relative} has {path.stat().st_size} bytes, the manifest says {size}"
    actual = sha256_file(path)
    if actual != sha256:
        return f"{relative} has sha256 {actual[:12]}..., the manifest says {sha256[:12]}..."
    return None


def check_stack_files(bundle_dir: str | Path, manifest: Manifest) -> dict[str, str]:
    """Check every stack's ONNX file.

    Returns:
        ``{stack name: problem}`` for the stacks whose file is missing or does not match the manifest.
    """
    problems = {}
    for stack in manifest.stacks:
        problem = check_file(bundle_dir, stack.file, stack.sha256, stack.bytes)
        if problem is not None:
            problems[stack.name] = problem
    return problems


def read_arrays(bundle_dir: str | Path, info: CalibrationInfo | SelfTestInfo, what: str,
                 names: list[str]) -> dict[str, np.ndarray]:
    """The named arrays of a bundle's ``.npz`` file, after checking it against its sha256.

    Raises:
        BundleError: the file is missing, does not match, is not an archive, lacks an array or is unreadable.
    """
    problem = check_file(bundle_dir, info.file, info.sha256)
    if problem is not None:
        raise BundleError(f"{what}: {problem}")
    fix = f"export the bundle again (or copy its {PurePath(info.file).name} again)"
    data = load_array(Path(bundle_dir) / info.file, BundleError, fix)
    if not hasattr(data, "files"):
        raise BundleError(f"{what} {info.file}: a single array, expected an .npz archive; {fix}")
    with data:
        missing = [name for name in names if name not in data.files]
        if missing:
            raise BundleError(f"{what} {info.file}: expected arrays {', '.join(missing[:6])}, found "
                              f"{', '.join(data.files[:12]) or 'none'}; {fix}")
        try:
            return {name: data[name] for name in names}
        except UNREADABLE as err:
            raise BundleError(f"{what} {info.file}: unreadable ({type(err).__name__}: {err}); {fix}") from None


def read_calibration(bundle_dir: str | Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """The bundle's raw validation examples ``(x, y)``, or None if it has none.

    Raises:
        BundleError: the file is missing, does not match its sha256, or lacks the arrays x and y.
    """
    if manifest.calibration is None:
        return None
    arrays = read_arrays(bundle_dir, manifest.calibration, "calibration data", ["x", "y"])
    return arrays["x"], arrays["y"]


@dataclass(frozen=True)
class SelfTestData:
    """What ``selftest.npz`` holds (see :class:`SelfTestInfo`).

    Attributes:
        x: raw inputs ``(N, ...)``.
        outputs: per stack, its outputs on the first few inputs ``(members, n, K)``.
        sums: per stack, each member's sum of its outputs over all N inputs ``(members, K)``.
        squares: per stack, each member's sum of squared outputs over all N inputs ``(members, K)``.
    """

    x: np.ndarray
    outputs: dict[str, np.ndarray]
    sums: dict[str, np.ndarray]
    squares: dict[str, np.ndarray]


def read_self_test(bundle_dir: str | Path, manifest: Manifest) -> SelfTestData | None:
    """The self-test's inputs and every stack's expected outputs on them, or None if the bundle has none.

    Raises:
        BundleError: the file is missing, does not match its sha256, or lacks ``x`` or a stack's arrays.
    """
    if manifest.self_test is None:
        return None
    names = [stack.name for stack in manifest.stacks]
    arrays = read_arrays(bundle_dir, manifest.self_test, "self-test data",
                          ["x", *names, *(f"{n}.sum" for n in names), *(f"{n}.square" for n in names)])
    return SelfTestData(x=arrays["x"], outputs={n: arrays[n] for n in names},
                        sums={n: arrays[f"{n}.sum"] for n in names}, squares={n: arrays[f"{n}.square"] for n in names})
