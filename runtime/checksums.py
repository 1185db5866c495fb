"""Checksums inside the stack graphs: a corrupted weight (or a wrong multiply) shows as a residual on every call.

Algorithm-based fault tolerance (Huang and Abraham) on an MLP stack (``scheme: mlp-abft``, written by
``edgens export``; docs/bundle-format.md has the layout):

- the hidden layer ``z = W x + b`` has a check member, whose first unit is ``-(sum of all rows)`` with bias
  ``-(sum of all biases)`` (its other units are zero), so the pre-activations sum to zero whatever ``x`` is; the
  graph sums them (one ReduceSum) and returns that *hidden residual* as a second output, which the runner writes
  into the check member's output row, the *check row* (:func:`merge`);
- the output layer has two extra columns per member: ``-(sum of the class columns)``, so each member's outputs
  sum to zero, and ``sum of |class and check columns|``, so the graph itself reports the magnitudes its rounding
  scales with (the hidden units are >= 0 after the ReLU, so this column is exactly sum |h w| + |b|).

The runtime's member sum, which every call computes anyway, carries both: for the rows a call uses plus the check
row, the sum over the K class columns and the check column is the output residual plus the hidden residual. A call
fails a stack (kind ``checksum``) when that exceeds the bound of float rounding, per example:

    |residual| <= SAFETY * u * [(sqrt(h + 1) + sqrt(rows + 1) + sqrt(K + 1)) * magnitude
                                + (sqrt(n + 1) + sqrt(units) + 1) * (sum_j a_j |x_j| + sum |b|)]

with ``u`` the graph's unit roundoff, ``n`` the inputs of a hidden unit, ``units`` the hidden pre-activations
summed, ``x`` the example's normalised input and ``a_j = sum_r |W_rj|`` the hidden layer's absolute weights of input
j summed over its rows (check row included), read once from the graph's ``hidden_weight`` initializer
(:func:`input_weights`): ``sum_j a_j |x_j| + sum |b|`` is exactly the sum of the magnitudes of every term the
hidden residual adds up. The runtime writes ``(hidden gain / output gain) * sum_j a_j |x_j|`` into the check row's
magnitude column (zero in the graph) before the rows are summed, so the test stays one small product and one
compare on the sum (:meth:`StackChecksum.bound_inputs`). The square roots are the probabilistic rounding bound of a
sum of n terms (Higham and Mary 2019), the sums of magnitudes the deterministic one's scale. A graph whose weights
cannot be read takes the worst accepted input instead, ``X * sum |W|``, with ``X`` the largest |normalised input|
the runtime accepts (inputs beyond the bundle's range are refused before any stack runs): about 6 times looser on
Fashion-MNIST, where a flip that doubles a hidden weight could stay below it and still change a borderline answer.
On the default bundle's clean validation and test sets the largest residual is about 1% of the per-example bound,
and SAFETY is 4. NaN or infinite residuals, and a magnitude that overflowed, always fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from edgens.errors import BundleError
from edgens.runtime.bundle import ChecksumInfo, InputSpec, Preprocessing, StackInfo
from edgens.runtime.inputs import allowed_range
from edgens.runtime.onnx_weights import weight_tensors

SAFETY = 4.0
"""How many times the rounding bound a residual may reach before the stack fails the call (module docstring)."""

CHECK_OUTPUT = "checks"
"""The name export gives a checked graph's second output (the hidden residual)."""

KIND = "checksum"
"""The failure kind of a stack whose checksums do not hold (:mod:`edgens.runtime.health`)."""

HIDDEN_WEIGHT = "hidden_weight"
"""The name of a checked graph's hidden weights ``((M + 1) h, n)`` (a float16 graph's ends with it)."""


def input_bound(spec: InputSpec, preprocessing: Preprocessing) -> float:
    """The largest |normalised input| the runtime accepts (inf when the bundle records no input range)."""
    allowed = allowed_range(spec)
    if allowed is None:
        return math.inf
    return max(max(abs(allowed[0] - mean), abs(allowed[1] - mean)) / std
               for mean, std in zip(preprocessing.mean, preprocessing.std, strict=True))


class StackChecksum:
    """One checked stack's bounds, worked out once at load.

    Args:
        name: the stack's name.
        rows: its members (the check row's index).
        info: its checksums' description.
        n_outputs: K.
        x_bound: the largest |normalised input| (:func:`input_bound`).
        unit_roundoff: of the arithmetic that runs the graph (default: the graph's own; a backend that computes in
            fewer bits says so, :meth:`~edgens.runtime.backends.Backend.checksum_roundoff`; inf: only non-finite
            residuals fail).
        input_weights: ``a`` ``(n,)`` of the graph (:func:`input_weights`), for the per-example hidden bound; None:
            the bound of the worst accepted input for every example.
    """

    def __init__(self, name: str, rows: int, info: ChecksumInfo, n_outputs: int, x_bound: float,
                 unit_roundoff: float | None = None, input_weights: np.ndarray | None = None):
        self.info, self.name, self.rows, self.k = info, name, rows, n_outputs
        u = info.unit_roundoff if unit_roundoff is None else unit_roundoff
        self.output_gain = SAFETY * u * (math.sqrt(info.output_terms) + math.sqrt(self.rows + 1) +
                                         math.sqrt(n_outputs + 1))
        # A stack's hidden residual does not depend on which of its rows a call uses, only on the input.
        gain = SAFETY * u * (math.sqrt(info.hidden_terms) + math.sqrt(info.hidden_units) + 1)
        self.worst_input_limit = gain * (x_bound * info.hidden_weight_abs + info.hidden_bias_abs)
        # layers-abft graphs compute their hidden bound's magnitude term themselves (into the check row's column
        # K + 1, in units of the output gain): nothing constant is left to add.
        in_graph = info.scheme == "layers-abft"
        per_example = (input_weights is not None and not in_graph and math.isfinite(gain)
                       and 0 < self.output_gain < math.inf)
        # The per-example part of the hidden bound, gain * sum_j a_j |x_j|, travels in the check row's magnitude
        # column (zero in the graph: the check member's output weights are zero), which the output bound multiplies
        # by output_gain: so a_j is stored divided by it, and the test stays one product and one compare.
        self._input_weights = (gain / self.output_gain * input_weights.astype(np.float64)).astype(np.float32) \
            if per_example else None
        self.hidden_limit = 0.0 if in_graph else gain * info.hidden_bias_abs if per_example else \
            self.worst_input_limit
        """The constant part of the hidden bound: its bias term, or the whole bound of the worst accepted input."""
        self._signs = np.ones((n_outputs + 2, 2), dtype=np.float32)
        self._signs[:, 1] = -1
        self._signs[-1] = -self.output_gain if math.isfinite(self.output_gain) else -np.finfo(np.float32).max

    def bound_inputs(self, check_row: np.ndarray, abs_input: np.ndarray | None) -> None:
        """Write the per-example part of the hidden bound for inputs ``abs_input`` ``(B, n)`` (their normalised
        values' absolute values, flattened: :func:`absolute_inputs`) into ``check_row`` ``(B, K + 2)``, the check
        row of a stack's output, before its rows are summed (nothing when the graph's weights are unknown or no
        input is given: then the worst accepted input's bound holds)."""
        if abs_input is not None and self._input_weights is not None:
            check_row[:, self.k + 1] = abs_input @ self._input_weights

    def failure(self, total: np.ndarray, check_row: np.ndarray) -> str | None:
        """Why the checksums of a call's rows do not hold, or None.

        Args:
            total: ``(B, K + 2)``, the sum over the rows the call used and the check row (whose column K is the
                hidden residual, column K + 1 the per-example part of its bound: :meth:`bound_inputs`).
            check_row: ``(B, K + 2)`` (read only to explain a failure).
        """
        # One small product for both signs: |r| <= g T + c  <=>  max(r - g T, -r - g T) <= c, with r the sum of the
        # first K + 1 columns and T the last. NaN propagates through the product and the max, and compares False.
        # A magnitude that overflowed (T = inf: absurd values, e.g. a hidden unit grown 2**128-fold) would let any
        # finite residual pass, so it fails too. (The caller silences numpy's overflow warnings.)
        if (total @ self._signs).max() <= self.hidden_limit and total[:, -1].max() < math.inf:
            return None
        return self._explain(total, check_row.astype(np.float64))

    def _explain(self, total: np.ndarray, check_row: np.ndarray) -> str:
        """Which layer's residual is out of bounds (only on failure: it costs a few more passes)."""
        hidden = check_row[:, self.k]
        hidden_limit = self.hidden_limit + self.output_gain * check_row[:, self.k + 1]
        bad = ~(np.abs(hidden) <= hidden_limit)
        if bad.any():
            worst = int(np.argmax(np.where(np.isfinite(hidden), np.abs(hidden), np.inf)))
            hidden_layers = self.info.layers[:-1]
            where = f"layer {hidden_layers[0]}" if len(hidden_layers) == 1 else f"layers {', '.join(hidden_layers)}"
            return (f"{where}: residual {float(hidden[worst]):.3g} beyond its bound "
                    f"{float(hidden_limit[worst]):.3g} in {int(bad.sum())} of {len(hidden)} examples")
        if not np.isfinite(total[:, -1]).all():
            worst = int(np.argmin(np.isfinite(total[:, -1])))
            return (f"layer {self.info.layers[-1]}: magnitude {float(total[worst, -1]):.3g} (overflowed) in "
                    f"{int((~np.isfinite(total[:, -1])).sum())} of {len(total)} examples")
        residual = total[:, :self.k + 1].sum(axis=1, dtype=np.float64) - hidden
        limit = self.output_gain * (total[:, self.k + 1] - check_row[:, self.k + 1])
        bad = ~(np.abs(residual) <= limit)
        worst = int(np.argmax(np.where(bad, 1.0, 0.0)))
        return (f"layer {self.info.layers[-1]}: residual {float(residual[worst]):.3g} beyond its bound "
                f"{float(limit[worst]):.3g} in {int(bad.sum())} of {len(residual)} examples")

    def verified(self, out: np.ndarray, x: np.ndarray | None) -> np.ndarray:
        """The members' natural parameters of a whole merged output on the normalised inputs ``x`` (None: any
        accepted input), after checking every row.

        Raises:
            ChecksumError: the checksums do not hold.
        """
        self.bound_inputs(out[self.rows], absolute_inputs(x))
        with np.errstate(invalid="ignore", over="ignore"):
            total = out.sum(axis=0, dtype=np.float64)  # the check row included: its column K is the hidden residual
            problem = self.failure(total, out[self.rows])
        if problem is not None:
            raise ChecksumError(self.name, problem)
        return members_view(out, self.rows, self.k)


def absolute_inputs(x: np.ndarray | None) -> np.ndarray | None:
    """``|x|`` flattened to ``(B, n)``, as :meth:`StackChecksum.failure` takes it (None for None)."""
    return None if x is None else np.abs(x.reshape(len(x), -1))


def input_weights(model: bytes | bytearray | memoryview) -> np.ndarray | None:
    """``a`` ``(n,)`` of a checked graph: its hidden weights' absolute values summed over the rows (check row
    included), in float64 then float32; None when the graph holds no 2-D ``hidden_weight`` initializer."""
    for tensor in weight_tensors(model):
        if tensor.name.split(".")[-1] == HIDDEN_WEIGHT and len(tensor.shape) == 2:
            return np.abs(tensor.values(model).astype(np.float64)).sum(axis=0).astype(np.float32)
    return None


def bound_weights(info: ChecksumInfo, read: Callable[[], bytes | None]) -> np.ndarray | None:
    """``a`` (:func:`input_weights`) of a checked graph whose bound takes it from the weights (``mlp-abft``; a
    ``layers-abft`` graph computes its own), reading the graph with ``read`` only then; None for other schemes, or
    where the graph cannot be read or parsed (a damaged file: the pool excludes the stack when it loads it)."""
    if info.scheme != "mlp-abft":
        return None
    model = read()
    if model is None:
        return None
    try:
        return input_weights(model)
    except BundleError:
        return None


def output_shape(stack: StackInfo, n_outputs: int, batch: int) -> tuple[int, int, int]:
    """The shape of a stack graph's ``eta`` output: ``(members, B, K)``, or ``(members + 1, B, K + 2)`` checked."""
    rows = len(stack.members)
    return (rows, batch, n_outputs) if stack.checksum is None else (rows + 1, batch, n_outputs + 2)


def check_columns(info: ChecksumInfo) -> int:
    """The columns of a checked graph's second output: 1 (``mlp-abft``: the hidden residual) or 2
    (``layers-abft``: and its bound's magnitude term)."""
    return 1 if info.scheme == "mlp-abft" else 2


def merge(eta: np.ndarray, checks: np.ndarray) -> np.ndarray:
    """Write a checked graph's second output ``checks`` (``(B, 1)``: the hidden residual; ``(B, 2)``: and its
    bound's magnitude term) into the check row of its ``eta`` output (the last row, from column K: zero until now),
    so that one array carries the stack's outputs, both residuals and the bound."""
    k = eta.shape[2] - 2
    eta[-1, :, k:k + checks.shape[1]] = checks
    return eta


def members_view(out: np.ndarray, rows: int, n_outputs: int) -> np.ndarray:
    """The members' natural parameters ``(rows, B, K)`` of a stack's output (a view; the whole output when the
    stack is unchecked)."""
    return out if out.shape[0] == rows and out.shape[2] == n_outputs else out[:rows, :, :n_outputs]


class ChecksumError(RuntimeError):
    """A stack's checksums do not hold: a corrupted weight, or a wrong computation (``problem`` says which layer)."""

    def __init__(self, stack: str, problem: str):
        super().__init__(f"stack {stack}: checksum: {problem}")
        self.problem = problem


def stack_checksums(stacks: list[StackInfo], n_outputs: int, spec: InputSpec, preprocessing: Preprocessing,
                    roundoff: Callable[[StackInfo], float] | None = None,
                    graph: Callable[[StackInfo], bytes | None] | None = None) -> dict[str, StackChecksum]:
    """The :class:`StackChecksum` of every checked stack, by name (``roundoff``: the unit roundoff of the
    arithmetic that runs a stack, default the graph's; ``graph``: a stack's graph bytes, or None where they cannot
    be read, for its per-example bound)."""
    x_bound = input_bound(spec, preprocessing)
    checks = {}
    for stack in stacks:
        if stack.checksum is None:
            continue
        weights = None if graph is None else bound_weights(stack.checksum, lambda stack=stack: graph(stack))
        checks[stack.name] = StackChecksum(stack.name, len(stack.members), stack.checksum, n_outputs, x_bound,
                                           None if roundoff is None else roundoff(stack), weights)
    return checks
