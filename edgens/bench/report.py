"""Writing a bench's results: JSON, a markdown table and a plot (when matplotlib is installed), atomically."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgens.errors import BackendUnavailableError, ConfigError, RunDirectoryError
from edgens.fileio import atomic_write_text, check_can_create
from edgens.rundir import RunDir

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_VALUE = r"(?:-?[0-9][0-9.eE+-]*|null|true|false)"
# a list of plain values as json.dumps(indent=...) writes it; raw newlines never occur inside JSON strings
_NUMBER_LIST = re.compile(rf"\[\n\s*({_VALUE}(?:,\n\s*{_VALUE})*)\n\s*\]")


def dumps(data: Any) -> str:
    """Indented JSON of :func:`compact` ``data``, with lists of plain values on one line (curves stay readable and
    the files small)."""
    text = json.dumps(compact(data), indent=1, allow_nan=False)
    return _NUMBER_LIST.sub(lambda match: "[" + " ".join(match.group(1).split()) + "]", text)


def check_name(name: str) -> str:
    """A result file stem: letters, digits, ``._+-`` (it becomes NAME.json, NAME.md, NAME.png).

    Raises:
        ConfigError: anything else (e.g. a path).
    """
    if not _NAME.match(name):
        raise ConfigError(f"result name must be letters, digits and ._+- (no path); got {name!r}")
    return name


def check_destination(out: str | Path, name: str) -> str:
    """Check a bench's result name and that ``out`` can take its files, before the bench runs; return the name.

    Raises:
        ConfigError: a bad name (see :func:`check_name`).
        NotWritableError: ``out`` cannot be created or written.
    """
    check_name(name)
    check_can_create(Path(out) / f"{name}.json")
    return name


def pct(value: float | None, se: float | None = None, digits: int = 2) -> str:
    """``12.34%`` or ``12.34 ± 0.05%`` (a missing or NaN standard error is left out)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if se is None or not math.isfinite(se):
        return f"{100 * value:.{digits}f}%"
    return f"{100 * value:.{digits}f} ± {100 * se:.{digits}f}%"


def percent(value: float | None, digits: int = 1) -> str:
    """``12.3%``, or ``-`` when there is no value (the fault tables' cells)."""
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def num(value: float | None, se: float | None = None, digits: int = 4) -> str:
    """``0.1234`` or ``0.1234 ± 0.0005``."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if se is None or not math.isfinite(se):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ± {se:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run_label(config: dict) -> str:
    """A short label for a run from its config.json: ``mlp-256x4 lam=0.99 seed 0`` (+ the method unless modular,
    and the anytime and random-subset weights when set: ``mu=1 nu=2``)."""
    settings = config["config"]
    method = "" if settings.get("method", "modular") == "modular" else f" {settings['method']}"
    terms = "".join(f" {name}={settings[key]:g}" for key, name in (("anytime_weight", "mu"), ("fault_weight", "nu"))
                    if settings.get(key))
    return f"{settings['preset']} lam={settings['lam']:g}{method}{terms} seed {settings['seed']}"


def load_finished(run: str | Path) -> tuple[RunDir, dict]:
    """Open a finished categorical run for a bench.

    Raises:
        DataNotFoundError / RunDirectoryError: not a finished run (see :meth:`RunDir.require_finished`).
        RunDirectoryError: not a classification run (the benches measure errors and F1 scores).
    """
    run_dir = RunDir(run)
    config = run_dir.require_finished()
    family = run_dir.train_config(config).family
    if family != "categorical":
        raise RunDirectoryError(f"{run_dir.path} is a {family} run; the benches need a classification "
                                f"(categorical) run")
    return run_dir, config


def compact(value: Any) -> Any:
    """``value`` for JSON: floats to 6 significant digits (the measurements carry no more), NaN/Inf to None, and
    keys starting with ``_`` left out (plot-only data such as filter images)."""
    if isinstance(value, dict):
        return {key: compact(item) for key, item in value.items() if not str(key).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [compact(item) for item in value]
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


def write_results(out: str | Path, name: str, data: dict, markdown: str,
                  plot: Callable[[dict, Path], list[Path]] | None) -> dict[str, Any]:
    """Write ``out/name.json``, ``out/name.md`` and the plot's PNG files.

    The JSON holds :func:`compact` ``data``; the plot gets all of it. JSON and markdown never depend on matplotlib;
    without it the plot is skipped and the returned ``plot_skipped`` says why (the CLI prints it).

    Returns:
        ``{"json": path, "markdown": path, "plots": [paths], "plot_skipped": reason or None}``.
    """
    out = Path(out)
    check_name(name)
    json_path = atomic_write_text(out / f"{name}.json", dumps(data) + "\n")
    md_path = atomic_write_text(out / f"{name}.md", markdown)
    written: dict[str, Any] = {"json": str(json_path), "markdown": str(md_path), "plots": [], "plot_skipped": None}
    if plot is not None:
        try:
            written["plots"] = [str(p) for p in plot(data, out / f"{name}.png")]
        except BackendUnavailableError as err:
            log.warning("plots skipped: %s", err)
            written["plot_skipped"] = str(err)
    return written
