"""Latency tables: how long each stack takes on this device, per backend, providers and batch size.

:func:`edgens.runtime.profile.profile_stacks` measures them; ``save_latency_table`` stores a table in
``BUNDLE/latency.json`` atomically, replacing the table of the same (backend, providers, device, power mode).
``latency_ms`` budgets plan with the table that matches the predictor's backend, providers, device and the device's
current power mode, and deadlines use it to avoid starting a stack that cannot finish in time.

Power modes: a Jetson's latency changes several-fold between its modes (7 W and MAXN), so a table records the mode
(``nvpmodel``'s name, :mod:`edgens.runtime.device_info`) and the clocks it was measured under, and a table of another
mode is never used: without a table for the current mode, ``latency_ms`` budgets refuse and deadlines fall back to
the latencies the predictor observes. Machines without power modes record none and match tables without one.

The table times the stack graphs alone; the runtime's own work per call (checking and normalising the input,
combining members) is not in it (tens of microseconds; see ``benchmarks/runtime_bench.py``).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgens.errors import BundleError
from edgens.fileio import atomic_write_json
from edgens.runtime.device_info import PowerMode, power_mode_key
from edgens.runtime.bundle import JsonReader, read_json_file, utc_now

log = logging.getLogger(__name__)

LATENCY_FILE = "latency.json"
LATENCY_FORMAT_VERSION = 1
# How often (at most) latency and deadline calls read the device's power mode, to follow `nvpmodel -m` at run time.
POWER_MODE_CHECK_S = 2.0


@dataclass(frozen=True)
class StackLatency:
    """Latency of one stack at one batch size, in milliseconds."""

    median_ms: float
    p90_ms: float


@dataclass(frozen=True)
class ChainLatency:
    """Median time (ms) to run every general stack once: one after another, and on ``lanes`` parallel lanes."""

    lanes: int
    in_order_ms: float
    lanes_ms: float

    @property
    def speedup(self) -> float:
        return self.in_order_ms / self.lanes_ms if self.lanes_ms > 0 else float("nan")


@dataclass
class LatencyTable:
    """Latencies of a bundle's stacks measured with one backend and provider list on one device.

    Attributes:
        backend: e.g. ``onnxruntime``.
        providers: what really ran the stacks, e.g. ``["CPUExecutionProvider"]``.
        device: the device's name (:func:`edgens.runtime.backends.describe_device`).
        stacks: ``{stack name: {batch size: StackLatency}}``.
        created: ISO-8601 UTC time of measurement.
        warmup: untimed runs before measuring.
        repeats: timed runs per stack and batch size.
        lanes: ``{batch size: ChainLatency}``: every general stack run in order and on the predictor's lanes, as
            measured by ``edgens profile`` (what the lanes achieve on this device; empty in older tables).
        power_mode: the power mode it was measured in (:attr:`PowerMode.key`, e.g. ``MAXN_SUPER``); None where the
            machine has none (or an older edgens measured it).
        clocks: the clocks and temperatures as the measurement ended (:class:`~edgens.runtime.device_info.Clocks`
            as a dict), for the record; None where not read.
    """

    backend: str
    providers: list[str]
    device: str
    stacks: dict[str, dict[int, StackLatency]] = field(default_factory=dict)
    created: str = field(default_factory=utc_now)
    warmup: int = 0
    repeats: int = 0
    lanes: dict[int, ChainLatency] = field(default_factory=dict)
    power_mode: str | None = None
    clocks: dict[str, Any] | None = None

    def matches(self, description: dict[str, Any], power_mode: str | None = None) -> bool:
        """Whether this table was measured with the backend, providers and device in ``description``, in
        ``power_mode`` (a :attr:`PowerMode.key`, None for a machine without power modes)."""
        return self.same_setup(description) and self.power_mode == power_mode

    def same_setup(self, description: dict[str, Any]) -> bool:
        """Whether backend, providers and device match ``description``, whatever the power mode."""
        return (self.backend == description["backend"] and list(self.providers) == list(description["providers"])
                and self.device == description["device"])

    def estimate(self, stack: str, batch: int) -> float | None:
        """Median latency (ms) of ``stack`` at ``batch``, interpolated between measured batch sizes.

        Below the smallest measured size the smallest's latency is used; above the largest, its latency scaled by
        ``batch / largest`` (work grows with the batch). None if the stack was not measured.
        """
        return self._at(stack, batch, "median_ms")

    def p90(self, stack: str, batch: int) -> float | None:
        """The 90th percentile latency (ms) of ``stack`` at ``batch``, interpolated as :meth:`estimate` is."""
        return self._at(stack, batch, "p90_ms")

    def _at(self, stack: str, batch: int, field: str) -> float | None:
        sizes = self.stacks.get(stack)
        if not sizes:
            return None
        if batch in sizes:
            return getattr(sizes[batch], field)
        known = sorted(sizes)
        if batch <= known[0]:
            return getattr(sizes[known[0]], field)
        if batch >= known[-1]:
            return getattr(sizes[known[-1]], field) * batch / known[-1]
        upper = next(b for b in known if b > batch)
        lower = max(b for b in known if b < batch)
        weight = (batch - lower) / (upper - lower)
        return (1 - weight) * getattr(sizes[lower], field) + weight * getattr(sizes[upper], field)

    def _chain_at(self, batch: int, lanes: int) -> ChainLatency | None:
        """The lane measurement with ``lanes`` lanes at the largest measured batch size not above ``batch``."""
        sizes = [b for b, chain in self.lanes.items() if chain.lanes == lanes and b <= batch]
        return self.lanes[max(sizes)] if sizes else None

    def lane_slowdown(self, batch: int, lanes: int) -> float:
        """How much longer one stack takes while ``lanes`` lanes run side by side (``lanes / speedup``, at least 1)
        at the largest measured batch size not above ``batch``: the stacks share the memory bandwidth and caches.
        1 when not measured."""
        chain = self._chain_at(batch, lanes)
        return 1.0 if chain is None else max(1.0, lanes / chain.speedup)

    def lanes_pay(self, batch: int, lanes: int, min_speedup: float) -> bool | None:
        """Whether running the general stacks on ``lanes`` lanes measured at least ``min_speedup`` times faster
        than in order, at the largest measured batch size not above ``batch``; None when the table did not measure
        that lane count (or any batch size that small)."""
        chain = self._chain_at(batch, lanes)
        return None if chain is None else chain.speedup >= min_speedup

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "providers": list(self.providers), "device": self.device,
                "created": self.created, "warmup": self.warmup, "repeats": self.repeats,
                "stacks": {name: {str(batch): {"median_ms": round(v.median_ms, 6), "p90_ms": round(v.p90_ms, 6)}
                                  for batch, v in sorted(sizes.items())}
                           for name, sizes in self.stacks.items()},
                **({"lanes": {str(batch): {"lanes": c.lanes, "in_order_ms": round(c.in_order_ms, 6),
                                           "lanes_ms": round(c.lanes_ms, 6)}
                              for batch, c in sorted(self.lanes.items())}} if self.lanes else {}),
                **({"power_mode": self.power_mode} if self.power_mode is not None else {}),
                **({"clocks": self.clocks} if self.clocks is not None else {})}

    @classmethod
    def from_dict(cls, data: Any, where: str = "latency table") -> LatencyTable:
        """Parse one table of ``latency.json``.

        Raises:
            BundleError: a key is missing or malformed (the message names it).
        """
        try:
            stacks = {str(name): {int(batch): StackLatency(float(v["median_ms"]), float(v["p90_ms"]))
                                  for batch, v in sizes.items()}
                      for name, sizes in data["stacks"].items()}
            lanes = {int(batch): ChainLatency(int(v["lanes"]), float(v["in_order_ms"]), float(v["lanes_ms"]))
                     for batch, v in data.get("lanes", {}).items()}
            return cls(backend=str(data["backend"]), providers=[str(p) for p in data["providers"]],
                       device=str(data["device"]), stacks=stacks, created=str(data.get("created", "")),
                       warmup=int(data.get("warmup", 0)), repeats=int(data.get("repeats", 0)), lanes=lanes,
                       power_mode=None if data.get("power_mode") is None else str(data["power_mode"]),
                       clocks=dict(data["clocks"]) if isinstance(data.get("clocks"), dict) else None)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise BundleError(f"{where}: malformed ({type(err).__name__}: {err}); expected backend, providers, "
                              f"device and stacks {{name: {{batch: {{median_ms, p90_ms}}}}}}; run `edgens profile` "
                              f"again to rewrite it") from None


def load_latency_tables(bundle_dir: str | Path) -> list[LatencyTable]:
    """All tables in ``BUNDLE/latency.json`` (empty if the file does not exist).

    Raises:
        BundleError: the file is unreadable, not JSON, of an unknown format version, or malformed.
    """
    path = Path(bundle_dir) / LATENCY_FILE
    if not path.is_file():
        return []
    fix = "run `edgens profile` to rewrite it"
    data = read_json_file(path, fix)
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != LATENCY_FORMAT_VERSION:
        raise BundleError(f"{path}: format_version: this edgens reads latency tables of version "
                          f"{LATENCY_FORMAT_VERSION}, got {version!r}")
    tables = JsonReader(str(path)).list_(data, "tables", "", "a list of tables")
    return [LatencyTable.from_dict(table, f"{path}: tables[{i}]") for i, table in enumerate(tables)]


def power_mode_matches(table_mode: str | None, current: PowerMode | None) -> bool:
    """Whether a table measured in ``table_mode`` holds for the current power mode."""
    return table_mode == (None if current is None else current.key)


def find_table(tables: list[LatencyTable], description: dict[str, Any],
               power_mode: str | None = None) -> LatencyTable | None:
    """The table measured with ``description``'s backend, providers and device in ``power_mode``, if any."""
    return next((table for table in tables if table.matches(description, power_mode)), None)


def other_modes(tables: list[LatencyTable], description: dict[str, Any], power_mode: str | None) -> list[str]:
    """The power modes of tables with ``description``'s setup but not ``power_mode`` (None shown as "none
    recorded"): what to tell a user whose device has no table for its current mode."""
    return sorted({t.power_mode or "none recorded" for t in tables
                   if t.same_setup(description) and t.power_mode != power_mode})


def save_latency_table(bundle_dir: str | Path, table: LatencyTable) -> Path:
    """Add ``table`` to ``BUNDLE/latency.json`` atomically, replacing the table of the same backend, providers,
    device and power mode.

    A malformed existing file is replaced rather than kept (the tables are cheap to measure again).

    Returns:
        The path written.
    """
    try:
        tables = load_latency_tables(bundle_dir)
    except BundleError:
        tables = []
    key = {"backend": table.backend, "providers": table.providers, "device": table.device}
    kept = [t for t in tables if not t.matches(key, table.power_mode)]
    data = {"format_version": LATENCY_FORMAT_VERSION, "tables": [t.to_dict() for t in [*kept, table]]}
    return atomic_write_json(Path(bundle_dir) / LATENCY_FILE, data)


class _Observations:
    __slots__ = ("times_ms", "skips", "probe_after", "typical_ms")

    def __init__(self, window: int, probe_after: int) -> None:
        self.times_ms: deque[float] = deque(maxlen=window)  # the latest run times, oldest first
        self.skips = 0  # calls since the last run that left the stack out because of its estimate
        self.probe_after = probe_after  # skips after which the estimate is set aside and the stack measured again
        self.typical_ms: float | None = None  # lower median of times_ms; None: to compute (kept off the hot path)

    def typical(self) -> float:
        if self.typical_ms is None:
            ordered = sorted(self.times_ms)
            self.typical_ms = ordered[(len(ordered) - 1) // 2]
        return self.typical_ms


class ObservedLatency:
    """Latencies a predictor observed while running stacks, for deadlines on a bundle without a latency table.

    Per (stack, batch size) it keeps the last ``window`` run times and estimates the lower median of them, so one
    slow call (a stall on a shared or throttled device) does not change the estimate while the stack keeps running.
    A stack whose estimate keeps it out of deadline calls is never measured again, so the estimate could not
    recover: after ``probe_after`` such calls it is set aside (:meth:`estimate` returns None, and the stack runs if
    the deadline has not passed), and the new measurement enters the window. While those measurements stay slow
    the wait doubles (up to ``max_probe_after`` calls), so a stack that really is slow costs an overrun rarely.

    A batch size not seen yet borrows the estimate of the next larger one seen (an upper bound: a smaller batch is
    not slower), so a server whose merged batches vary in size has estimates after a warm-up at its largest batch.

    Recording a run costs an append (every call does it); the median is computed when a deadline call asks.
    """

    def __init__(self, window: int = 8, probe_after: int = 4, max_probe_after: int = 256) -> None:
        self.window, self.first_probe, self.max_probe = window, probe_after, max_probe_after
        self._entries: dict[tuple[str, int], _Observations] = {}
        self._batches: dict[str, list[int]] = {}  # per stack, the batch sizes observed, ascending

    def estimate(self, stack: str, batch: int) -> float | None:
        """The expected latency (ms) of ``stack`` at ``batch``; None when unknown or due to be measured again."""
        entry = self._entry(stack, batch)
        if entry is None or entry.skips >= entry.probe_after:
            return None
        return entry.typical()

    def slowest(self, stack: str, batch: int) -> float | None:
        """The slowest of the latest run times (ms) of ``stack`` at ``batch`` (or the next larger batch seen): what
        stands for a 90th percentile without a latency table."""
        entry = self._entry(stack, batch)
        return None if entry is None else max(entry.times_ms)

    def _entry(self, stack: str, batch: int) -> _Observations | None:
        entry = self._entries.get((stack, batch))
        if entry is None:
            seen = self._batches.get(stack)
            i = bisect.bisect_right(seen, batch) if seen else 0
            if seen and i < len(seen):
                entry = self._entries[(stack, seen[i])]
        return entry

    def observe(self, stack: str, batch: int, ms: float) -> None:
        """Record that ``stack`` ran ``batch`` examples in ``ms``."""
        entry = self._entries.get((stack, batch))
        if entry is None:
            entry = self._entries[(stack, batch)] = _Observations(self.window, self.first_probe)
            bisect.insort(self._batches.setdefault(stack, []), batch)
        elif entry.skips:
            if entry.skips >= entry.probe_after:  # a re-measurement: back off while the stack stays slow
                still_slow = ms >= 0.5 * entry.typical()
                entry.probe_after = min(2 * entry.probe_after, self.max_probe) if still_slow else self.first_probe
            entry.skips = 0
        entry.times_ms.append(ms)
        entry.typical_ms = None

    def skipped(self, stack: str, batch: int) -> None:
        """Record that a deadline call left ``stack`` out because its estimate did not fit."""
        entry = self._entries.get((stack, batch))
        if entry is not None:
            entry.skips += 1


@dataclass(frozen=True, eq=False)
class LatencyView:
    """What a predictor knows of this device's latencies at one moment, published whole (in one assignment), so that
    a call that read it holds a table, its power mode and the reason for a missing table that belong together.
    Compared and hashed by identity: plans are cached per view.

    Attributes:
        table: the latency table of this backend, providers, device and power mode, or None.
        power_mode: the device's power mode (:attr:`~edgens.runtime.device_info.PowerMode.key`) when the table was
            picked; None where the machine has none.
        problem: why ``latency_ms`` budgets cannot plan (no table for this mode, a malformed file), else None.
    """

    table: LatencyTable | None = None
    power_mode: str | None = None
    problem: str | None = None


class LatencyEstimates:
    """How long each stack takes here: the latency table of the current power mode, else what was observed.

    The table follows the device's power mode (``nvpmodel -m`` while running): :meth:`follow_power_mode` reads the
    mode at most every :data:`POWER_MODE_CHECK_S` seconds and, when it changed, publishes a new :class:`LatencyView`
    in one assignment. A call reads :attr:`view` once and plans and runs with that view, whatever another thread
    publishes meanwhile.

    Args:
        bundle_dir: the bundle whose ``latency.json`` holds the tables.
        describe: the backend's description (backend, providers, device) that a table must match.
    """

    def __init__(self, bundle_dir: str | Path, describe: Callable[[], dict[str, Any]]):
        self.bundle_dir = Path(bundle_dir)
        self._describe = describe
        self.view = LatencyView()
        self.observed = ObservedLatency()  # deadlines without a latency table (replaceable, for benchmarks)
        self._observed_lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one reload at a time
        self._check_due = 0.0  # time.monotonic() after which the power mode is read again

    def reload(self, power_mode: str | None = None) -> LatencyView:
        """Read ``latency.json`` (and, unless given, the device's power mode) again and publish the view of this
        backend, providers, device and power mode. Tables of other power modes are never used (their latencies can
        be several times off); finding only those is logged as a warning, and ``latency_ms`` budgets then refuse
        with the fix."""
        with self._reload_lock:
            self._check_due = time.monotonic() + POWER_MODE_CHECK_S
            if power_mode is not None and power_mode == self.view.power_mode:
                return self.view  # another thread saw the same change first
            mode = power_mode if power_mode is not None else power_mode_key()
            view = self._read(mode)
            self.view = view  # the one assignment: calls see the old view or the new, never a mix
        return view

    def _read(self, mode: str | None) -> LatencyView:
        description = self._describe()
        try:
            tables = load_latency_tables(self.bundle_dir)
        except BundleError as err:
            log.warning("latency table ignored: %s", err)
            return LatencyView(None, mode, str(err))
        table = find_table(tables, description, mode)
        others = other_modes(tables, description, mode)
        if table is None and others:
            problem = (f"{self.bundle_dir}/latency.json has tables for this backend and device in power mode "
                       f"{', '.join(others)}, none for the current mode {mode or 'none'}; run `edgens profile "
                       f"{self.bundle_dir}` in this mode")
            log.warning("no latency table for the current power mode: %s", problem)
            return LatencyView(None, mode, problem)
        return LatencyView(table, mode, None)

    def follow_power_mode(self) -> LatencyView:
        """The current view, after picking the table again if the device's power mode changed. The mode is read
        from files only (no process on a call's path), at most every :data:`POWER_MODE_CHECK_S` seconds, so a call
        mostly pays one clock read; a mode that cannot be read (a status file being rewritten) changes nothing."""
        now = time.monotonic()
        if now < self._check_due:
            return self.view
        self._check_due = now + POWER_MODE_CHECK_S
        mode = power_mode_key(query_command=False)
        view = self.view
        if mode is None or mode == view.power_mode:
            return view
        log.warning("power mode changed from %s to %s: picking the latency table again", view.power_mode, mode)
        return self.reload(mode)

    def estimate(self, stack: str, batch: int, view: LatencyView | None = None) -> float | None:
        """The expected latency (ms) of ``stack`` at this batch size: ``view``'s table's (default: the current
        view), else what was observed (None: neither yet)."""
        table = (view or self.view).table
        if table is not None:
            return table.estimate(stack, batch)
        with self._observed_lock:
            return self.observed.estimate(stack, batch)

    def p90(self, stack: str, batch: int, view: LatencyView | None = None) -> float | None:
        """The 90th percentile latency (ms) of ``stack`` at this batch size: ``view``'s table's, else the slowest
        of the latest observed runs (None: neither yet)."""
        table = (view or self.view).table
        if table is not None:
            return table.p90(stack, batch)
        with self._observed_lock:
            return self.observed.slowest(stack, batch)

    def observe(self, stack: str, batch: int, ms: float) -> None:
        """Record that ``stack`` ran ``batch`` examples in ``ms``."""
        with self._observed_lock:
            self.observed.observe(stack, batch, ms)

    def skipped(self, stack: str, batch: int) -> None:
        """Record that a deadline call left ``stack`` out for its observed estimate (it counts toward measuring the
        stack again, :class:`ObservedLatency`)."""
        with self._observed_lock:
            self.observed.skipped(stack, batch)
