"""Fault injection: make chosen stacks of a predictor fail on purpose, loudly or silently, for tests and benchmarks.

    with inject_faults(predictor, {"general-001": "raise", "general-003": Fault("sleep", sleep_ms=50)}):
        prediction = predictor.predict(x)     # the prediction of the other stacks' members

    flips = random_bit_faults(model_bytes, bits=EXPONENT_BITS, grow_only=True, seed=7)
    with inject_bit_faults(predictor, {"general-001": flips}):
        prediction = predictor.predict(x)     # a weight of general-001 corrupted in memory

Loud faults: a :class:`FaultyRunner` wraps a stack's real runner and, per call, raises, returns NaN, Inf or a wrongly
shaped output, or sleeps before running the real stack (a slow stack; with a stack timeout it times out). The sleep
stops early when the runner is cancelled, as a real timed-out run is.

Silent faults: :class:`BitFault` flips a bit of a weight, or holds it at 0 or 1 (stuck-at), in the stack's ONNX
bytes; :func:`inject_bit_faults` runs the stack from those bytes, after the file on disk passed its checksum, as
memory corrupted after loading would. The ``flip`` fault kind corrupts activations instead: one bit of every output
of one member. Every random choice comes from a seed, so a draw can be rerun.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from edgens.errors import ConfigError, unknown_choice
from edgens.runtime.backends.base import StackRunner
from edgens.runtime.onnx_weights import WeightTensor, weight_tensors
from edgens.runtime.predictor import Predictor

FAULT_KINDS = ("raise", "nan", "inf", "shape", "sleep", "flip", "hold")
BIT_MODES = ("flip", "stuck-0", "stuck-1")
# float32 bit positions: 0-22 mantissa, 23-30 exponent, 31 sign.
MANTISSA_BITS, EXPONENT_BITS, SIGN_BIT = tuple(range(23)), tuple(range(23, 31)), 31


class InjectedFault(RuntimeError):
    """The error a ``raise`` fault raises (it stands for a backend crashing, so it is not an EdgensError)."""


@dataclass(frozen=True)
class Fault:
    """What a faulty stack does.

    Attributes:
        kind: ``raise``, ``nan`` (NaN in its output), ``inf``, ``shape`` (one member row missing), ``sleep``
            (wait ``sleep_ms``, then answer correctly), ``flip`` (a silent fault: flip ``bit`` of every float32
            output of the stack's member row ``row``, a corrupted activation) or ``hold`` (wait until
            :meth:`FaultyRunner.release`, or ``sleep_ms`` when given, then answer correctly: a stack busy for
            exactly as long as a test needs, without guessing a duration).
        sleep_ms: the delay of a ``sleep`` fault; the longest wait of a ``hold`` fault (0: until released).
        times: fail only this many calls, then behave (None: every call).
        bit: the bit a ``flip`` fault flips (0-31).
        row: the member row (in the stack) a ``flip`` fault corrupts.
    """

    kind: str
    sleep_ms: float = 0.0
    times: int | None = None
    bit: int = 27
    row: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise unknown_choice("fault kind", self.kind, FAULT_KINDS)
        if not 0 <= self.bit < 32:
            raise ConfigError(f"fault bit {self.bit} is out of range; expected 0-31 (float32)")


class FaultyRunner(StackRunner):
    """Wraps a runner and applies a :class:`Fault` to its calls.

    Attributes:
        calls: calls so far.
        faults: calls that were made to fail.
        entered: set when a faulty call begins (a test waits on it instead of sleeping).
    """

    def __init__(self, inner: StackRunner, fault: Fault):
        super().__init__(inner.stack, inner.input_shape, inner.n_outputs)
        self.inner = inner
        self.fault = fault
        self.calls = 0
        self.faults = 0
        self.entered = threading.Event()
        self._cancelled = threading.Event()
        self._released = threading.Event()

    def release(self) -> None:
        """Let a ``hold`` fault's calls, now and later, answer."""
        self._released.set()

    @property
    def is_active(self) -> bool:
        return self.inner.is_active

    @property
    def providers(self) -> list[str]:
        return self.inner.providers

    def activate(self) -> None:
        self.inner.activate()

    def deactivate(self) -> None:
        self.inner.deactivate()

    def cancel(self) -> None:
        self._cancelled.set()
        self.inner.cancel()

    def run(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.fault.times is not None and self.faults >= self.fault.times:
            return self.inner.run(x)
        self.faults += 1
        self.entered.set()
        kind = self.fault.kind
        if kind == "hold":
            self._released.wait(self.fault.sleep_ms / 1e3 if self.fault.sleep_ms else None)
            return self.inner.run(x)
        if kind == "raise":
            raise InjectedFault(f"injected fault in stack {self.name}")
        if kind == "sleep":
            self._cancelled.clear()
            self._cancelled.wait(self.fault.sleep_ms / 1e3)
            return self.inner.run(x)
        out = self.inner.run(x)
        if kind == "shape":
            return out[:-1] if len(out) > 1 else out[:, :, :-1]
        out = out.copy()
        if kind == "flip":
            out[self.fault.row].view(np.uint32)[...] ^= np.uint32(1 << self.fault.bit)
            return out
        out[0, 0, 0] = np.nan if kind == "nan" else np.inf
        return out


@contextmanager
def inject_faults(predictor: Predictor, faults: Mapping[str, Fault | str]) -> Iterator[dict[str, FaultyRunner]]:
    """Make the named stacks of ``predictor`` faulty inside the ``with`` block; restore them afterwards.

    Args:
        predictor: a loaded predictor.
        faults: ``{stack name: Fault or fault kind}``; only loaded stacks can be made faulty.

    Yields:
        ``{stack name: FaultyRunner}``, to inspect calls.

    Raises:
        ConfigError: an unknown stack (or one that is not loaded) or fault kind.
    """
    wrapped = {}
    for name, fault in faults.items():
        if name not in predictor.runners:
            raise unknown_choice("loaded stack", name, list(predictor.runners))
        wrapped[name] = FaultyRunner(predictor.runners[name], Fault(fault) if isinstance(fault, str) else fault)
    originals = predictor.replace_runners(wrapped)
    try:
        yield wrapped
    finally:
        predictor.replace_runners(originals)
        for runner in wrapped.values():
            runner.release()  # no call stays held after the block


def random_faults(stacks: Sequence[str], fraction: float, seed: int | np.random.Generator = 0,
                  fault: Fault | str = "raise") -> dict[str, Fault | str]:
    """Pick ``round(fraction * len(stacks))`` stacks at random and give each ``fault``."""
    rng = np.random.default_rng(seed)
    n = int(round(fraction * len(stacks)))
    chosen = rng.choice(len(stacks), size=n, replace=False) if n else []
    return {stacks[int(i)]: fault for i in chosen}


# ------------------------------------------------------------------------------------------- silent weight faults


@dataclass(frozen=True)
class BitFault:
    """One bit of one weight changed: flipped, or stuck at 0 or 1.

    Attributes:
        tensor: the initializer's name in the stack's ONNX graph (e.g. ``first.weight``).
        index: the weight's flat (C-order) index in that tensor.
        bit: the bit (0 = least significant; float32: 0-22 mantissa, 23-30 exponent, 31 sign).
        mode: ``flip``, ``stuck-0`` or ``stuck-1``.
    """

    tensor: str
    index: int
    bit: int
    mode: str = "flip"

    def __post_init__(self) -> None:
        if self.mode not in BIT_MODES:
            raise unknown_choice("bit fault mode", self.mode, BIT_MODES)


def apply_bit_faults(model: bytes, faults: Sequence[BitFault]) -> bytes:
    """The serialized ONNX ``model`` with ``faults`` applied to its weights (every other byte unchanged).

    Raises:
        ConfigError: an unknown tensor, or an index or bit out of its range.
        BundleError: ``model`` is not a well-formed ONNX model.
    """
    buf = bytearray(model)
    tensors = {tensor.name: tensor for tensor in weight_tensors(buf)}
    for fault in faults:
        tensor = tensors.get(fault.tensor)
        if tensor is None:
            raise unknown_choice("weight tensor", fault.tensor, list(tensors))
        if not 0 <= fault.index < tensor.size:
            raise ConfigError(f"weight index {fault.index} is out of range for {tensor.name} of {tensor.size} values")
        if not 0 <= fault.bit < tensor.bits:
            raise ConfigError(f"bit {fault.bit} is out of range for {tensor.name} ({tensor.dtype}); expected "
                              f"0-{tensor.bits - 1}")
        words = np.frombuffer(buf, _word(tensor), tensor.size, tensor.offset)  # a writable view of the bytes
        mask = words.dtype.type(1 << fault.bit)
        if fault.mode == "flip":
            words[fault.index] ^= mask
        elif fault.mode == "stuck-1":
            words[fault.index] |= mask
        else:
            words[fault.index] &= ~mask
    return bytes(buf)


def _word(tensor: WeightTensor) -> np.dtype:
    return np.dtype(f"<u{tensor.dtype.itemsize}")


def _select(model: bytes, tensors: Sequence[str] | None) -> list[WeightTensor]:
    found = weight_tensors(model)
    if tensors is None:
        return found
    names = [t.name for t in found]
    for name in tensors:
        if name not in names:
            raise unknown_choice("weight tensor", name, names)
    return [t for t in found if t.name in tensors]


def random_bit_faults(model: bytes, count: int = 1, bits: Sequence[int] | None = None, seed: int | np.random.Generator
                      = 0, grow_only: bool = False, tensors: Sequence[str] | None = None, mode: str = "flip"
                      ) -> list[BitFault]:
    """``count`` bit faults in distinct weights drawn uniformly over every weight value of the model.

    Args:
        model: the serialized ONNX stack.
        count: how many weights to corrupt (one bit each).
        bits: the bit positions to draw from (default: every bit of the weight's type).
        seed: a seed or generator (the same seed draws the same faults).
        grow_only: draw only bits that are 0 in the weight (so a float32 exponent bit makes the weight grow by
            2**(2**(bit - 23))); a weight with none of ``bits`` at 0 is drawn again.
        tensors: draw from these initializers only (default: all weights).
        mode: ``flip``, ``stuck-0`` or ``stuck-1``.

    Raises:
        ConfigError: bad arguments, or no weight with a bit to draw.
    """
    rng = np.random.default_rng(seed)
    chosen = _select(model, tensors)
    sizes = np.array([t.size for t in chosen], dtype=np.int64)
    if count < 1 or count > sizes.sum():
        raise ConfigError(f"cannot corrupt {count} weights of a model with {int(sizes.sum())}")
    faults: list[BitFault] = []
    used: set[tuple[str, int]] = set()
    attempts = 0
    while len(faults) < count and attempts < 1000 * count:
        attempts += 1
        flat = int(rng.integers(sizes.sum()))
        which = int(np.searchsorted(np.cumsum(sizes), flat, side="right"))
        tensor, index = chosen[which], flat - int(sizes[:which].sum())
        if (tensor.name, index) in used:
            continue
        candidates = list(range(tensor.bits)) if bits is None else [b for b in bits if 0 <= b < tensor.bits]
        if grow_only:
            word = int(np.frombuffer(model, _word(tensor), 1, tensor.offset + index * tensor.dtype.itemsize)[0])
            candidates = [b for b in candidates if not word >> b & 1]
        if not candidates:
            continue
        used.add((tensor.name, index))
        faults.append(BitFault(tensor.name, index, int(rng.choice(candidates)), mode))
    if len(faults) == count:
        return faults
    raise ConfigError(f"found only {len(faults)} of {count} weights with a bit to corrupt among bits {bits}")


def bit_faults_at_rate(model: bytes, rate: float, bits: Sequence[int] | None = None,
                       seed: int | np.random.Generator = 0, tensors: Sequence[str] | None = None) -> list[BitFault]:
    """Flip each of the given bits of every weight independently with probability ``rate`` (a bit error rate)."""
    if not 0 <= rate <= 1:
        raise ConfigError(f"bit error rate {rate} is out of range; expected 0-1")
    rng = np.random.default_rng(seed)
    faults = []
    for tensor in _select(model, tensors):
        positions = list(range(tensor.bits)) if bits is None else [b for b in bits if 0 <= b < tensor.bits]
        total = tensor.size * len(positions)
        hits = rng.choice(total, size=rng.binomial(total, rate), replace=False) if total else []
        faults += [BitFault(tensor.name, int(hit) // len(positions), positions[int(hit) % len(positions)])
                   for hit in hits]
    return faults


def weight_row(tensor: WeightTensor, index: int, rows: int) -> int | None:
    """Which member row of a stack of ``rows`` members the weight ``index`` of ``tensor`` belongs to: edgens' stacks
    keep members on the leading axis of every weight (``rows * k`` entries: k per member; a checked graph's
    ``(rows + 1) * k``, the last k its check member's). None when the weight is not a member's own (the check
    member's, or a leading axis that is no multiple of the members)."""
    if not tensor.shape:
        return None
    for owners in (rows, rows + 1):
        if tensor.shape[0] % owners == 0:
            per_leading = tensor.size // tensor.shape[0]
            row = int(index // per_leading) // (tensor.shape[0] // owners)
            return row if row < rows else None
    return None


@contextmanager
def inject_bit_faults(predictor: Predictor, faults: Mapping[str, Sequence[BitFault]]
                      ) -> Iterator[dict[str, StackRunner]]:
    """Run the named stacks of ``predictor`` from their ONNX bytes with ``faults`` applied inside the ``with`` block
    (the file on disk stays intact and verified: memory corrupted after loading); restore them afterwards.

    Raises:
        ConfigError: the predictor does not run the onnxruntime backend, an unknown or unloaded stack, or a bad
            fault.
    """
    corrupted = {}
    for name, stack_faults in faults.items():
        if name not in predictor.runners:
            raise unknown_choice("loaded stack", name, list(predictor.runners))
        stack = predictor.manifest.stack(name)
        model = apply_bit_faults((predictor.bundle_dir / stack.file).read_bytes(), stack_faults)
        runner = predictor.backend.graph_runner(stack, model)
        runner.activate()
        corrupted[name] = runner
    originals = predictor.replace_runners(corrupted)
    try:
        yield corrupted
    finally:
        predictor.replace_runners(originals)
        for runner in corrupted.values():
            runner.deactivate()
